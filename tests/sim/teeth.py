"""Does the simulation have teeth?  Inject real bugs into the engine and count the seeds that catch each.

Each mutant is one exact text edit of ``pyraft/engine/core.py``.  The edited
source is compiled into a separate module in memory and the harness runs it
instead of the real engine: the file on disk is never modified, so nobody
editing or testing the engine concurrently is affected and nothing needs
reverting.

    cd tests && python -m sim.teeth [--seeds 500] [--steps 10000] [--jobs 2] [--no-direct-checks]
                                    [--suite] [--markdown] [mutant ...]

``--no-direct-checks`` drops the harness's direct checks (a vote on disk
before it is granted, entries on disk before they are acknowledged, a leader's
view of a follower's log, the election and commit quorums of every voter set,
the Figure 8 rule, the vote lease, transfers to caught-up targets),
leaving only the Figure 3 invariants: then a durability bug is caught only
when a crash turns it into a safety violation.

``--suite`` also runs, under each mutant, what else the default test suite
runs against the engine: the pinned seeds of ``test_simulation.py`` and the
deterministic engine tests (:data:`SUITE_TESTS`), each in a fresh process
whose ``pyraft.engine.core`` is the mutant.  ``--markdown`` prints the
results as the table rows of ``docs/testing.md``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time
import types

import pyraft.engine.core as real_core

CORE = real_core.__file__

MUTANTS: dict[str, tuple[str, str, str]] = {
    # name: (description, exact text in core.py, replacement)
    "figure8": (
        "a leader commits an entry of an earlier term by counting replicas (no current-term check)",
        "if n > log_index(self.committed) and self.log.term_at(n) == self.vote.term:\n"
        "            self._set_committed(LogId(self.vote.term, n))",
        "if n > log_index(self.committed):\n"
        "            self._set_committed(self.log.log_id_at(n))",
    ),
    "vote-not-saved": (
        "a vote is granted without SaveVote (kept in memory only)",
        "            self._set_vote(Vote(self.vote.term, msg.candidate_id))\n            self._reset_election_timer()\n        self._reply_vote(msg, token, ok)",
        "            self.vote = Vote(self.vote.term, msg.candidate_id)\n            self._reset_election_timer()\n        self._reply_vote(msg, token, ok)",
    ),
    "grant-before-save": (
        "the vote is granted (Respond) before it is saved (SaveVote)",
        "            self._set_vote(Vote(self.vote.term, msg.candidate_id))\n            self._reset_election_timer()\n        self._reply_vote(msg, token, ok)",
        "            self._reply_vote(msg, token, ok)\n            self._set_vote(Vote(self.vote.term, msg.candidate_id))\n            self._reset_election_timer()\n            return\n        self._reply_vote(msg, token, ok)",
    ),
    "truncate-on-heartbeat": (
        "a follower truncates everything after prev on an AppendEntries without entries (no conflict)",
        "        # prev matches.  Append what is new; truncate only on a real conflict.\n",
        "        # prev matches.  Append what is new; truncate only on a real conflict.\n"
        "        if not msg.entries and floor <= prev_index < self.log.last_index:\n"
        "            self._truncate(prev_index + 1)\n",
    ),
    "ack-before-flush": (
        "a follower acknowledges entries before they are flushed",
        "        durable = log_index(self.flushed)\n",
        "        durable = self.log.last_index\n",
    ),
    "leader-counts-unflushed": (
        "the leader counts itself in a quorum for entries it has not flushed",
        "        matched[self.id] = log_index(self.flushed)\n",
        "        matched[self.id] = self.log.last_index\n",
    ),
    "no-election-restriction": (
        "a node votes for a candidate whose log is less up-to-date",
        "        mine = self.log.last\n        if last is None:",
        "        return True\n        mine = self.log.last\n        if last is None:",
    ),
    "follower-commit-past-match": (
        "a follower takes leader_commit beyond the entries the leader matched",
        "new_commit = min(msg.leader_commit, log_index(matched))",
        "new_commit = min(msg.leader_commit, self.log.last_index)",
    ),
    "fix2-trust-saved-commit": (
        "on restart, trust a saved commit point the durable log does not hold (the engine before fix 2)",
        "            i = min(saved.index, self.log.last_index)\n"
        "            saved = LogId(saved.term, i) if self.log.term_at(i) == saved.term else None\n",
        "            if saved.index > self.log.last_index:\n"
        "                saved = self.log.last\n",
    ),
    # --- the engine fixes made while building the simulation, reverted one at a time
    "fix1-no-snapshot-at-prev-0": (
        "a target whose next index is 1 gets no snapshot when entry 1 is purged (the engine before fix 1)",
        "            if prev_index < self.log.purged_index:\n",
        "            if prev_index > 0 and prev is None:\n",
    ),
    "fix3-older-snapshot-installed": (
        "an older snapshot is installed after a newer one still on its way (the engine before fix 3)",
        "        if log_index(last) < self._installing:\n",
        "        if False:\n",
    ),
    "fix4-no-outside-campaign": (
        "a voter left out of an uncommitted C_new never campaigns (the engine before fix 4)",
        "            if self._may_campaign():\n",
        "            if self.is_voter():\n",
    ),
    "fix5-refused-vote-resets-timer": (
        "a refused higher-term vote request restarts the election timer (the engine before fix 5)",
        "self._become_follower(term, None, reset_timer=False)",
        "self._become_follower(term, None)",
    ),
    "fix6-vote-before-config-durable": (
        "a node campaigns (saves a vote) before its first configuration is on disk (the engine before fix 6)",
        "        if not self._membership_durable():\n            return False\n        if self.is_voter():",
        "        if self.is_voter():",
    ),
    "fix7-no-membership-prune-on-restart": (
        "a restarted node keeps configurations its commit point covers before the committed one "
        "(the engine before fix 7)",
        "        while len(self.memberships) > 1 and log_index(self.memberships[1].log_id) <= log_index(self.committed):\n"
        "            self.memberships.pop(0)\n        self._become_follower(self.vote.term, None)",
        "        self._become_follower(self.vote.term, None)",
    ),
    "fix8-no-wait-behind-a-longer-log": (
        "a node that a vote refusal or request shows a longer log than its own campaigns as soon as "
        "ever (the engine before fix 8; caught by soak seeds 1000095 and 1004160 at 20000 steps)",
        "        if last is not None and not self._log_behind and",
        "        if False and",
    ),
    "read-without-quorum": (
        "ReadIndex answers without confirming leadership with a quorum",
        "            if not m.is_quorum(acked):\n                break\n            self._emit(RespondRead",
        "            self._emit(RespondRead",
    ),
    # --- issue 16: the mutants a consensus reviewer would try first
    "no-joint-consensus": (
        "a membership change switches to the new voter set in one step (no joint configuration)",
        "        new = Membership(configs=(old, voters), nodes=dict(m.nodes), leaving=leaving)",
        "        new = Membership(configs=(voters,), nodes={k: v for k, v in m.nodes.items() if k not in leaving})",
    ),
    "joint-commit-new-only": (
        "while joint, entries commit with a majority of the new voter set only",
        "        n = self.effective_membership.membership.quorum_index(matched)",
        "        from ..types import _majority_index\n"
        "        new = self.effective_membership.membership.configs[-1]\n"
        "        n = _majority_index([matched.get(x, 0) for x in new], len(new))",
    ),
    "joint-election-new-only": (
        "while joint, a candidate wins with a majority of the new voter set only",
        "        if m.is_quorum(self._granted & m.voter_ids):",
        "        if len(self._granted & m.configs[-1]) * 2 > len(m.configs[-1]):",
    ),
    "read-before-term-commit": (
        "ReadIndex serves a new leader before it committed an entry of its own term",
        "        if self.committed is None or self.committed.term != self.vote.term:\n"
        "            self._reads_waiting_commit.append(token)",
        "        if self.committed is None:\n            self._reads_waiting_commit.append(token)",
    ),
    "read-round-not-bumped": (
        "a ReadIndex read does not start a new heartbeat round (older acknowledgements confirm it)",
        "        self._pending_reads.append((token, self.committed, self._next_seq()))",
        "        self._pending_reads.append((token, self.committed, self._seq))",
    ),
    "snapshot-rolls-back-commit": (
        "installing a snapshot older than the commit point (committed meanwhile) sets the commit point back",
        "        if last is None or log_index(last) <= log_index(self.committed):\n            if token is not None:",
        "        if last is None:\n            if token is not None:",
    ),
    "snapshot-ignores-membership": (
        "installing a snapshot keeps the old configuration instead of the snapshot's",
        "        self.memberships = ([base] if base is not None else self.memberships[:1]) + later",
        "        self.memberships = (self.memberships[:1] if self.memberships else [base]) + later",
    ),
    "snapshot-drops-matching-suffix": (
        "installing a snapshot drops the log after it even where the log matches it",
        "        if self.log.term_at(last.index) not in (None, last.term):\n"
        "            self._truncate(last.index)  # a conflicting (uncommitted) suffix",
        "        if self.log.last_index > last.index:\n            self._truncate(last.index + 1)",
    ),
    "up-to-date-by-last-term": (
        "the election restriction compares last terms only, not log lengths",
        "        return mine is None or last >= mine",
        "        return mine is None or last.term >= mine.term",
    ),
    "removed-leader-stays": (
        "a leader that a committed configuration removed goes on leading (no hand-over, no step-down)",
        "                    self._emit(SendTimeoutNow(best, TimeoutNowRequest(self.vote.term, self.id)))\n"
        "                self._become_follower(self.vote.term, None)",
        "                    pass",
    ),
    "lease-ignored": (
        "CheckQuorum's vote lease is ignored: a follower of a live leader votes for a later term",
        "        if not self.cfg.check_quorum:\n            return False\n        if self.state == _LEADER:",
        "        if True:\n            return False\n        if self.state == _LEADER:",
    ),
    # --- read leases (Config.lease_reads): each guard of Engine.read_lease taken out in turn
    "lease-too-long": (
        "a read lease lasts longer than the vote guard that protects it (1.5 minimum election timeouts)",
        "LEASE_SHARE = 0.9\n",
        "LEASE_SHARE = 1.5\n",
    ),
    "lease-from-ack-time": (
        "a read lease counts from when an acknowledgment arrived, not from when its round was sent",
        "                at = sent.get(p.acked_seq)\n                if at is not None:\n                    since[t] = at",
        "                at = sent.get(p.acked_seq)\n                if at is not None:\n                    since[t] = p.last_ack",
    ),
    "lease-no-restart-guard": (
        "a restarted node votes at once, forgetting the lease rounds it acknowledged before",
        "if config.lease_reads and self.vote.term > 0",
        "if False",
    ),
    "lease-guard-forgets-on-term-change": (
        "the vote guard ends when a node's leader is cleared (a higher term seen), not a minimum "
        "election timeout after its leader's last message",
        "        return self.now < self._vote_guard_until\n",
        "        return self.leader_id is not None and self.now - self._last_leader_contact < self.cfg.election_timeout[0]\n",
    ),
    "lease-campaign-inside-guard": (
        "a node whose vote guard holds campaigns when told to (trigger.elect()): its own vote breaks a lease",
        "        if self.cfg.lease_reads and not transfer and self._in_leader_lease():",
        "        if False:",
    ),
    "lease-before-term-applied": (
        "a new leader serves lease reads before its state machine applied its first entry of the term",
        "        return start + self.cfg.election_timeout[0] * LEASE_SHARE, self._term_start",
        "        return start + self.cfg.election_timeout[0] * LEASE_SHARE, 0",
    ),
    "lease-survives-transfer": (
        "a leader whose transfer sent TimeoutNow and then timed out serves lease reads again in that term",
        "            self._lease_forfeit = True\n            self._emit(SendTimeoutNow(",
        "            self._emit(SendTimeoutNow(",
    ),
    "transfer-not-caught-up": (
        "leadership transfer sends TimeoutNow to a target whose log is not caught up",
        "        if p is not None and log_index(p.matched) == self.log.last_index:",
        "        if p is not None:",
    ),
    "transfer-accepts-proposals": (
        "a leader that is transferring its leadership still accepts proposals",
        "        if self.transferee is not None:\n            m = self.effective_membership.membership",
        "        if False:\n            m = self.effective_membership.membership",
    ),
    "bug1-ack-with-current-term": (
        "a follower's delayed AppendEntries ack carries its term when the flush completes, not the "
        "request's (issue 16, bug 1)",
        "AppendEntriesResponse(term, True, matched=matched, seq=seq)",
        "AppendEntriesResponse(self.vote.term, True, matched=matched, seq=seq)",
    ),
    "bug2-stale-refusal-echoes-round": (
        "a refusal of a stale-term AppendEntries echoes its heartbeat round and prev index (issue 16, bug 2)",
        "                return self._emit(Respond(token, AppendEntriesResponse(self.vote.term, False)))",
        "                return self._emit(Respond(token, AppendEntriesResponse(self.vote.term, False, seq=msg.seq,\n"
        "                                                                       rejected=log_index(msg.prev_log_id))))",
    ),
}


def load_mutant(name: str) -> types.ModuleType:
    _, old, new = MUTANTS[name]
    with open(CORE, encoding="utf-8") as f:
        src = f.read()
    if src.count(old) != 1:
        raise SystemExit(f"mutant {name}: the text to replace occurs {src.count(old)} times in {CORE}")
    mod = types.ModuleType("pyraft.engine.core")
    mod.__file__ = CORE
    mod.__package__ = "pyraft.engine"
    exec(compile(src.replace(old, new), CORE + f" [mutant {name}]", "exec"), mod.__dict__)
    return mod


def _install(name: str | None, direct: bool = True) -> None:
    from . import cluster
    cluster.DIRECT_CHECKS = direct
    if name is not None:
        mod = load_mutant(name)
        cluster.Engine = mod.Engine
        cluster.RestoredState = mod.RestoredState


def _run(args: tuple[str | None, list[int], int, bool]) -> list[tuple[int, str]]:
    name, seeds, steps, direct = args
    _install(name, direct)
    from .cluster import run_seed
    out = []
    for s in seeds:
        r = run_seed(s, steps)
        if not r["ok"]:
            out.append((s, r["kind"] + ": " + r["error"][:150]))
    return out


def run_mutant(name: str | None, seeds: list[int], steps: int, jobs: int,
               direct: bool = True) -> list[tuple[int, str]]:
    chunks = [(name, seeds[i::jobs * 4], steps, direct) for i in range(jobs * 4)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        res = pool.map(_run, chunks)
    return sorted(x for part in res for x in part)


#: The deterministic tests of the default suite that drive the engine (scenarios, regressions).
SUITE_TESTS = ("test_raft_paper.py", "test_engine_freshness.py", "test_engine_hostile.py", "test_lease_reads.py")


def _pinned() -> dict[int, tuple[int, str]]:
    from test_simulation import PINNED  # tests/ is the working directory (see the module docstring)
    return PINNED


def run_pinned(name: str) -> list[int]:
    """The pinned seeds of the default suite that fail under mutant ``name``."""
    by_steps: dict[int, list[int]] = {}
    for seed, (steps, _why) in _pinned().items():
        by_steps.setdefault(steps, []).append(seed)
    out = []
    for steps, seeds in sorted(by_steps.items()):
        out += [s for s, _ in _run((name, seeds, steps, True))]
    return sorted(out)


_TESTS_MAIN = """
import sys
import pytest
import sim.teeth as teeth
sys.modules["pyraft.engine.core"] = teeth.load_mutant(sys.argv[1])
import pyraft.engine
pyraft.engine.core = sys.modules["pyraft.engine.core"]
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", *sys.argv[2:]]))
"""


def run_tests(name: str) -> list[str]:
    """The deterministic suite tests that fail under mutant ``name`` (run in a fresh process)."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _TESTS_MAIN, name, *SUITE_TESTS], cwd=here,
                       capture_output=True, text=True)
    return [line.split(" ")[1].split("::")[-1] for line in r.stdout.splitlines() if line.startswith("FAILED ")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mutants", nargs="*")
    ap.add_argument("--seeds", type=int, default=500)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-direct-checks", action="store_true",
                    help="only the Figure 3 invariants, not the harness's direct checks")
    ap.add_argument("--suite", action="store_true",
                    help="also the pinned seeds and the deterministic engine tests of the default suite")
    ap.add_argument("--markdown", action="store_true", help="print table rows for docs/testing.md")
    a = ap.parse_args()
    names = a.mutants or list(MUTANTS)
    seeds = list(range(a.seeds))
    for name in names:
        t0 = time.time()
        fails = run_mutant(name, seeds, a.steps, a.jobs, not a.no_direct_checks) if seeds else []
        pinned = run_pinned(name) if a.suite else []
        tests = run_tests(name) if a.suite else []
        dt = time.time() - t0
        first = fails[0] if fails else None
        if a.markdown:
            what = first[1].split(":")[0] + ": " + first[1].split(":", 1)[1].strip()[:70] if first else "-"
            print(f"| `{name}`: {MUTANTS[name][0]} "
                  f"| {len(fails)}/{len(seeds)} ({100 * len(fails) / max(1, len(seeds)):.1f}%) "
                  f"| {first[0] if first else '-'} | {what.replace('|', '/')} "
                  f"| {', '.join(map(str, pinned)) or '-'} | {len(tests)} |", flush=True)
            continue
        print(f"{name}: {MUTANTS[name][0]}")
        print(f"   caught by {len(fails)}/{len(seeds)} seeds ({dt:.0f}s); first seed: "
              f"{first[0] if first else '-'}  {first[1] if first else ''}", flush=True)
        if a.suite:
            print(f"   pinned seeds failing: {pinned or '-'}; deterministic tests failing: {len(tests)} "
                  f"{tests[:4]}", flush=True)


if __name__ == "__main__":
    main()
