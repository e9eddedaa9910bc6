"""Does the simulation have teeth?  Inject real bugs into the engine and count the seeds that catch each.

Each mutant is one exact text edit of ``pyraft/engine/core.py``.  The edited
source is compiled into a separate module in memory and the harness runs it
instead of the real engine: the file on disk is never modified, so nobody
editing or testing the engine concurrently is affected and nothing needs
reverting.

    cd tests && python -m sim.teeth [--seeds 500] [--steps 10000] [--jobs 2] [--no-direct-checks] [mutant ...]

``--no-direct-checks`` drops the harness's direct ordering-contract checks
(vote on disk before it is granted, entries on disk before they are
acknowledged), leaving only the Figure 3 invariants: then a durability bug is
caught only when a crash turns it into a safety violation.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mutants", nargs="*")
    ap.add_argument("--seeds", type=int, default=500)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-direct-checks", action="store_true",
                    help="only the Figure 3 invariants, not the direct ordering-contract checks")
    a = ap.parse_args()
    names = a.mutants or list(MUTANTS)
    seeds = list(range(a.seeds))
    for name in names:
        t0 = time.time()
        fails = run_mutant(name, seeds, a.steps, a.jobs, not a.no_direct_checks)
        dt = time.time() - t0
        first = fails[0] if fails else None
        print(f"{name}: {MUTANTS[name][0]}")
        print(f"   caught by {len(fails)}/{len(seeds)} seeds ({dt:.0f}s); first seed: "
              f"{first[0] if first else '-'}  {first[1] if first else ''}", flush=True)


if __name__ == "__main__":
    main()
