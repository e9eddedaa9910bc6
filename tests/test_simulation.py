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

#: Seeds that find an engine bug once its fix is reverted (checked with ``python -m sim.teeth``):
#: seed -> (steps, the bug).  A change to the harness, or to the messages the engine sends, changes
#: the schedules, so re-check these with the teeth tool after one.  Fixes 3, 5 and 7 are pinned by
#: paper tests only; fix 8 by soak seeds at 20000 steps (no seed below 500 catches it at 10000).
#: (Re-pinned when heartbeats began to ask for unacknowledged appends: fix 2 was seed 75, fix 4
#: seed 59; and when nodes began to wait behind a longer log (fix 8): fix 2 was seed 119, the
#: Figure 8 rule seed 2013, fix 5 seed 2263 -- fix 8 also keeps stale candidates out of the way
#: of the up-to-date nodes, and no seed found since catches fix 5.)
PINNED = {
    17: (10000, "fix 1: a learner added after the leader purged its log was never sent a snapshot "
                "(_send_append fell back to a snapshot only when prev index > 0); first found by seed 30"),
    188: (10000, "fix 2: a restarted node trusted a saved commit point that its durable log did not hold, "
                 "and applied a stale entry; first found by seed 75"),
    268: (10000, "fix 4: a voter that an uncommitted C_new leaves out never campaigned, though only it "
                 "could commit C_new; first found by seed 66"),
    9236: (10000, "fix 6: a node voted before its initial configuration was on disk; a crash then left "
                  "it with a term and no configuration, for ever"),
    203: (10000, "the Figure 8 rule: a leader that commits an entry of an earlier term by counting "
                 "replicas (the teeth tool's figure8 mutant; a few seeds in 1000 catch it)"),
    1000095: (20000, "fix 8: without PreVote, two voters with stale logs and a stale configuration that "
                     "does not list the up-to-date node raised the term in step with it (it learned their "
                     "terms only from refusals), so it nearly always campaigned in a term they had "
                     "taken; a refusal now carries the voter's last log id, and a node that a refusal or "
                     "a vote request shows to be behind waits an extra election timeout"),
    1004160: (20000, "fix 8 again: one stale candidate, and the one voter the up-to-date node needs keeps "
                     "voting for it in every term"),
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
