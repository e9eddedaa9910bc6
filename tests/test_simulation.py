"""Seeded deterministic simulation of whole clusters (FoundationDB / TigerBeetle VOPR style).

Each seed builds a cluster (1, 3 or 5 voters, 0-2 spare nodes that join as
learners and may be promoted) and runs it through a schedule of message
loss, duplication, reordering, partitions, crashes (also between two
commands of one engine output), restarts from disk, membership changes,
snapshots, purges, leadership transfers and ReadIndex reads, checking the
Raft safety properties after every event and liveness after every heal.
See ``tests/sim/cluster.py`` and ``tests/sim/invariants.py``.

    pytest tests/test_simulation.py                       # the default seeds
    pytest tests/test_simulation.py --sim-seed 1234 -x    # replay one seed, with its trace
    pytest tests/test_simulation.py --sim-seeds 20000     # more seeds
    pytest -m soak tests/test_simulation.py               # the long soak

A failure prints each failing seed with the command that replays it.
"""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from sim.cluster import replay_command, run_seed, run_seeds

DEFAULT_SEEDS = 500
DEFAULT_STEPS = 10000
SOAK_SEEDS = 5000
SOAK_STEPS = 20000
SOAK_FIRST_SEED = 1_000_000

#: Seeds that find an engine bug once its fix is reverted (checked with ``python -m sim.teeth --suite``):
#: seed -> (steps, the bug).  A change to the harness, or to the messages the engine sends, changes
#: the schedules, so re-check these with the teeth tool after one.  Fixes 3, 5, 7 and 8 are pinned by
#: paper tests only (none of the first 100 seeds catches them at 10000 steps; see docs/testing.md
#: for the table); the Figure 8 rule, once paper-test only, fails most seeds now that the harness
#: checks it directly.  (Re-pinned when the simulation learned disk stalls, pauses and messages
#: that outlive elections (issue 16): fix 1 was seed 17, fix 2 seed 188, fix 4 seed 268, the Figure 8
#: rule seed 203, fix 8 soak seeds 1000095 and 1004160; before that, when heartbeats began to ask for
#: unacknowledged appends: fix 2 was seed 75, fix 4 seed 59.)
PINNED = {
    13: (10000, "read leases: a lease longer than the vote guard behind it, or counted from an "
                "acknowledgment's arrival instead of its round's sending, lets another node be elected "
                "while it holds (the teeth tool's lease-too-long and lease-from-ack-time mutants)"),
    22: (10000, "fix 1: a learner added after the leader purged its log was never sent a snapshot "
                "(_send_append fell back to a snapshot only when prev index > 0); first found by seed 30"),
    231: (10000, "fix 2: a restarted node trusted a saved commit point that its durable log did not hold, "
                 "and applied a stale entry; first found by seed 75"),
    15: (10000, "fix 4: a voter that an uncommitted C_new leaves out never campaigned, though only it "
                "could commit C_new; first found by seed 66"),
    9236: (10000, "fix 6: a node voted before its initial configuration was on disk; a crash then left "
                  "it with a term and no configuration, for ever"),
    107: (10000, "joint consensus: a candidate in a joint configuration won with a majority of the new "
                 "voter set only (the teeth tool's joint-election-new-only mutant; 7 seeds in 500 before the "
                 "harness checked election quorums directly)"),
    0: (10000, "issue 16, bug 1: a follower's late AppendEntries acknowledgement carried its term at flush "
               "time, not the request's"),
    9: (10000, "issue 16, bug 2: a refusal of a stale-term AppendEntries echoed the heartbeat round, and a "
               "leader re-elected after a restart took it for an answer to its own round"),
}


def _opt(config, name: str, default):
    v = config.getoption(name)
    return default if v is None else v


def run_many(seeds: list[int], steps: int, jobs: int) -> tuple[list[dict], dict]:
    """Run ``seeds`` over ``jobs`` worker processes; the failures (by seed) and the summed statistics."""
    if jobs <= 1 or len(seeds) < 4 * jobs:
        parts = [run_seeds((seeds, steps))]
    else:
        n = jobs * 8
        chunks = [(seeds[i::n], steps) for i in range(n)]
        # spawn, not fork: the parent may have threads running (other tests' clusters)
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            parts = pool.map(run_seeds, chunks, chunksize=1)
    failures = sorted((f for fs, _ in parts for f in fs), key=lambda f: f["seed"])
    stats: dict = {}
    for _, st in parts:
        for k, v in st.items():
            stats[k] = stats.get(k, 0) + v
    return failures, stats


def failure_message(failures: list[dict], n_seeds: int, steps: int) -> str:
    lines = [f"{len(failures)} of {n_seeds} simulation seeds failed ({steps} steps each):"]
    for f in failures[:40]:
        lines.append(f"  seed {f['seed']}: {f['kind']}: {f['error'][:160]}")
        lines.append(f"      replay: {replay_command(f['seed'], steps)}")
    if len(failures) > 40:
        lines.append(f"  ... and {len(failures) - 40} more")
    lines.append("")
    lines.append("first failure in full:")
    lines.append(failures[0]["report"])
    return "\n".join(lines)


def _run_range(request, n_default: int, steps_default: int, first_default: int) -> None:
    cfg = request.config
    steps = _opt(cfg, "--sim-steps", steps_default)
    seed = cfg.getoption("--sim-seed")
    if seed is not None:
        r = run_seed(seed, steps, trace_lines=60)
        if not r["ok"]:
            pytest.fail(r["report"], pytrace=False)
        return
    n = _opt(cfg, "--sim-seeds", n_default)
    first = _opt(cfg, "--sim-first-seed", first_default)
    jobs = _opt(cfg, "--sim-jobs", os.cpu_count() or 1)
    seeds = list(range(first, first + n))
    t0 = time.time()
    failures, stats = run_many(seeds, steps, jobs)
    dt = time.time() - t0
    print(f"\nsimulation: {n} seeds x {steps} steps in {dt:.1f}s on {jobs} processes; passing seeds "
          f"covered: {stats}")
    if failures:
        pytest.fail(failure_message(failures, n, steps), pytrace=False)


@pytest.mark.timeout(900)  # about a minute on 2 idle cores; room for a loaded machine
def test_simulation_seeds(request):
    """The default seeds: every Figure 3 invariant after every event, liveness after every heal."""
    _run_range(request, DEFAULT_SEEDS, DEFAULT_STEPS, 0)


@pytest.mark.parametrize("seed", sorted(PINNED))
def test_pinned_seed(seed):
    steps, why = PINNED[seed]
    r = run_seed(seed, steps, trace_lines=60)
    assert r["ok"], f"regression ({why}):\n{r['report']}"


def test_a_seed_replays_exactly():
    """Same seed, same run: the replay command really reproduces a failure."""
    from sim.cluster import Sim

    def fingerprint():
        s = Sim(12345)
        s.run(1500)
        return s.t, s.stats, s.describe(), s.format_trace(60)

    assert fingerprint() == fingerprint()


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_simulation_soak(request):
    """Long runs over many seeds (deselected by default; ``pytest -m soak``)."""
    _run_range(request, SOAK_SEEDS, SOAK_STEPS, SOAK_FIRST_SEED)


def test_every_teeth_mutant_still_applies_to_the_engine():
    """``python -m sim.teeth`` shows each guard of the engine is needed by taking it out; a mutant
    whose text the engine no longer holds shows nothing (two had drifted unnoticed)."""
    from sim import teeth
    for name in teeth.MUTANTS:
        try:
            teeth.load_mutant(name)
        except SystemExit as e:
            pytest.fail(str(e))
