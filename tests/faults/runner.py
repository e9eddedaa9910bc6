"""The fault-injection runner: a ``pyraft-kv serve`` cluster, a recorded workload, nemeses, and the checks.

:func:`run` does one run:

1. start ``nodes`` node processes (:class:`~.nemesis.FaultCluster`, each with
   a ``--fault-control`` file) with small snapshot thresholds, so restarted
   and lagging nodes are caught up by snapshots too;
2. start ``clients`` threads, each with its own :class:`~pyraft.kv.KVClient`,
   doing put / get / cas / delete with unique values on ``keys`` keys at a
   time (the key set changes every ``key_lifetime`` seconds, so every key's
   history stays short enough to check); every operation is recorded with its
   call and return times, or as indeterminate when it ended in ``Timeout`` or
   any other trouble that leaves its outcome unknown;
3. meanwhile run the nemeses (:class:`~.nemesis.Scheduler`) for ``duration`` s;
4. heal everything (network, disks, paused and dead nodes, membership), let
   the clients go on for ``recovery`` s (the cluster must serve again), stop
   them, commit a barrier write, wait until every node applied it, and read
   every key linearizably (those reads join the history);
5. check: the history is linearizable per key (:mod:`pyraft.checker`), every
   acknowledged write is present or superseded, the nodes' logs agree up to
   their commit indexes (read after stopping them, with the read-only log
   reader), and the state machines hold the same items, equal to the final
   reads.  Nodes that exited by themselves or logged errors, faults that
   could not be healed and a cluster that does not serve after healing fail
   the run too.  A :class:`LogAuditor` thread compares the nodes' committed
   log entries during the run as well (snapshots purge the logs); no entry
   it saw committed may lie above the final commit index.  Election Safety
   holds over the whole run (no two leaders of one term, from the nodes'
   logs) and every node's current snapshot file reads back whole.

With power nemeses (``power-*``) the nodes' data lives on lazy filesystems
(``RunConfig.lazyfs``, tests/powerloss/) and every power cut is checked on
the spot (:mod:`.durability`).

:class:`RunResult` holds the counts, the problems found and a one-line
:meth:`~RunResult.summary`.  Every process started is stopped, also on
failure.  The run's directory (node data and logs, ``history.jsonl``,
``events.txt``) is deleted when the run passes, unless ``keep``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from pyraft.checker import Op, check_history
from pyraft.errors import RaftError
from pyraft.kv import KVClient, KVCommandError

from . import offline
from .nemesis import NEMESES, POWER_NEMESES, FaultCluster, Scheduler, parse_nemeses

__all__ = ["RunConfig", "RunResult", "run", "run_with_signals", "parse_nemeses", "NEMESES", "POWER_NEMESES",
           "RAFT_CONFIG", "POWER_CONFIG", "check_logs", "check_acknowledged", "check_election_safety",
           "check_snapshot_files", "compare_state_machines", "History", "Keyspace", "LogAuditor", "scan_node_logs",
           "varied_config"]

#: Node settings for fault runs on a busy machine: quick but not twitchy elections, and
#: snapshots (with short logs behind them) often enough that catching up uses them.
RAFT_CONFIG = {"heartbeat_interval": 0.05, "election_timeout": [0.3, 0.6], "rpc_timeout": 0.5,
               "snapshot_every": 1000, "max_in_snapshot_log_to_keep": 500}

#: The same for runs with power losses: snapshots every few hundred entries, so that many
#: cuts find a node with a fresh snapshot file (whose bytes must have been synced).
POWER_CONFIG = {**RAFT_CONFIG, "snapshot_every": 300, "max_in_snapshot_log_to_keep": 100}


def varied_config(seed: int) -> dict:
    """Node settings drawn from ``seed``: other code paths than :data:`RAFT_CONFIG` takes.

    With or without PreVote, CheckQuorum and lease reads, tiny AppendEntries batches and
    pipelines, snapshots every few hundred entries with no log kept behind
    them, snapshot transfers in many small chunks, one-entry apply and
    proposal batches.
    """
    rng = random.Random(f"config-{seed}")
    c = dict(RAFT_CONFIG)
    c["election_timeout"] = rng.choice([[0.3, 0.6], [0.2, 0.4]])
    c["pre_vote"] = rng.random() < 0.6
    c["check_quorum"] = rng.random() < 0.6
    c["max_payload_entries"] = rng.choice([4, 64, 1024])
    c["max_inflight"] = rng.choice([1, 4, 16])
    c["snapshot_every"] = rng.choice([200, 1000, 5000])
    c["max_in_snapshot_log_to_keep"] = rng.choice([0, 50, 500])
    c["snapshot_chunk_size"] = rng.choice([256, 4096, 1 << 20])
    c["max_apply_batch"] = rng.choice([1, 64, 4096])
    c["max_proposal_batch"] = rng.choice([1, 16, 4096])
    c["lease_reads"] = c["check_quorum"] and rng.random() < 0.5
    return c


@dataclass
class RunConfig:
    nodes: int = 3
    duration: float = 30.0
    seed: int = 0
    nemeses: tuple[str, ...] = NEMESES
    clients: int = 6
    keys: int = 3
    key_lifetime: float = 8.0
    #: KVClient timeouts, client i gets client_timeouts[i % len]: short ones give many
    #: indeterminate operations (a write that times out may still take effect later).
    client_timeouts: tuple[float, ...] = (0.5, 1.0, 3.0)
    recovery: float = 4.0
    raft_config: dict = field(default_factory=lambda: dict(RAFT_CONFIG))
    base_dir: str | None = None
    keep: bool = False
    verbose: bool = True
    log: Callable[[str], None] | None = None
    check_timeout: float = 600.0
    #: The nodes' data on lazy filesystems that lose power ("strict" or "ext4": the rule that makes
    #: names durable, see tests/powerloss/); None: on the machine's own disk.  The power nemeses need it.
    lazyfs: str | None = None
    #: Run the nodes with this durability bug patched in (tests/faults/mutants.py); None: as shipped.
    mutant: str | None = None
    #: Faults run first, one at a time and in this order, before the random schedule.
    first_faults: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(k in POWER_NEMESES for k in self.nemeses):
            if self.lazyfs is None:
                self.lazyfs = "strict"
            if self.raft_config == RAFT_CONFIG:
                self.raft_config = dict(POWER_CONFIG)


@dataclass
class RunResult:
    config: RunConfig
    base_dir: str = ""
    ops: Counter = field(default_factory=Counter)  # ok / failed / indeterminate
    by_op: Counter = field(default_factory=Counter)  # "put ok", "get indeterminate", ...
    faults: Counter = field(default_factory=Counter)
    linearizable: bool | None = None
    checker: dict = field(default_factory=dict)
    lost_writes: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)
    sm_problems: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    commit_index: int = 0
    audited: int = 0  # committed log indexes whose entries were read from the nodes and compared
    keys: int = 0
    elapsed: float = 0.0
    ok_after_heal: int = 0
    #: power cuts: cuts, bytes and names forgotten, bytes written back; state machines rebuilt after a reboot
    forgotten: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return (self.linearizable is True and not self.lost_writes and not self.log_problems
                and not self.sm_problems and not self.problems)

    def all_problems(self) -> list[str]:
        out = list(self.problems)
        if self.linearizable is False:
            out.append(self.checker.get("report", "the history is not linearizable"))
        elif self.linearizable is None:
            out.append(f"linearizability unknown: {self.checker.get('reason', 'the checker did not finish')}")
        out += [f"lost write: {w}" for w in self.lost_writes]
        out += [f"logs: {p}" for p in self.log_problems]
        out += [f"state machines: {p}" for p in self.sm_problems]
        return out

    def summary(self) -> str:
        c = self.config
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        lin = {True: "yes", False: "NO", None: "unknown"}[self.linearizable]
        verdict = "PASS" if self.ok else "FAIL"
        varied = "" if c.raft_config in (RAFT_CONFIG, POWER_CONFIG) else " config=varied"
        disk = f" lazyfs={c.lazyfs}" if c.lazyfs else ""
        mutant = f" mutant={c.mutant}" if c.mutant else ""
        f = self.forgotten
        power = (f"power cuts {f['cuts']} (forgot {f['bytes']} unsynced bytes, {f['names']} name changes; "
                 f"{f['written_back']} bytes written back; {f['rebuilds']} state machines rebuilt); "
                 if c.lazyfs else "")
        line = (f"pyraft-faults seed={c.seed} nodes={c.nodes} duration={c.duration:g}s{varied}{disk}{mutant} "
                f"nemeses={','.join(c.nemeses)}: ops {self.ops['ok']} ok / {self.ops['failed']} failed / "
                f"{self.ops['indeterminate']} indeterminate; faults {sum(self.faults.values())} ({faults}); {power}"
                f"linearizable {lin} ({self.keys} keys); lost writes {len(self.lost_writes)}; "
                f"logs {'agree' if not self.log_problems else 'DIFFER'} (commit {self.commit_index}, "
                f"{self.audited} entries audited); "
                f"state machines {'equal' if not self.sm_problems else 'DIFFER'}; "
                f"{self.elapsed:.0f}s; verdict {verdict}")
        if not self.ok:
            probs = self.all_problems()
            line += "\n" + "\n".join(f"  - {p}" for p in probs[:20])
            if len(probs) > 20:
                line += f"\n  ... {len(probs) - 20} more"
            if self.base_dir:
                line += f"\n  run directory (node logs, history.jsonl, events.txt): {self.base_dir}"
        return line


# ---------------------------------------------------------------------------
# The workload

class History:
    """Operations from many threads; each one ok, failed (definitely not applied) or indeterminate."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._lock = threading.Lock()  # guards ops and errors
        self.ops: list[Op] = []
        self.outcome: list[str] = []  # parallel to ops
        self.errors: Counter = Counter()

    def record(self, client: Any, op: str, key: Any, args: tuple, fn: Callable[[], Any]) -> tuple[str, Any]:
        t0 = self.clock()
        try:
            result = fn()
        except KVCommandError as e:  # refused by the state machine: not applied
            with self._lock:
                self.ops.append(Op(client, op, key, args, t0, self.clock(), None))
                self.outcome.append("failed")
                self.errors[f"KVCommandError: {e}"] += 1
            return "failed", e
        except RaftError as e:  # Timeout, connection trouble, ...: the outcome is unknown
            with self._lock:
                self.ops.append(Op(client, op, key, args, t0, None, None))
                self.outcome.append("indeterminate")
                self.errors[type(e).__name__] += 1
            return "indeterminate", e
        t1 = self.clock()
        with self._lock:
            self.ops.append(Op(client, op, key, args, t0, t1, result))
            self.outcome.append("ok")
        return "ok", result

    def snapshot(self) -> tuple[list[Op], list[str]]:
        with self._lock:
            return list(self.ops), list(self.outcome)


class Keyspace:
    """The keys in use: ``keys`` of them, replaced by fresh ones every ``lifetime`` seconds."""

    def __init__(self, keys: int, lifetime: float, t0: float) -> None:
        self.keys, self.lifetime, self.t0 = keys, lifetime, t0

    def current(self) -> list[str]:
        gen = int((time.monotonic() - self.t0) / self.lifetime)
        return [f"g{gen}-k{j}" for j in range(self.keys)]


def _client_loop(cid: int, cluster: FaultCluster, cfg: RunConfig, keyspace: Keyspace, history: History,
                 stop: threading.Event, problems: list[str]) -> None:
    rng = random.Random(cfg.seed * 7919 + cid)
    seen: dict[str, Any] = {}  # key -> the last value this client saw or wrote
    n = 0
    try:
        timeout = cfg.client_timeouts[cid % len(cfg.client_timeouts)]
        with KVClient(dict(cluster.addrs), timeout=timeout, cluster_name=cluster.cluster_name) as kv:
            while not stop.is_set():
                k = rng.choice(keyspace.current())
                n += 1
                v = f"c{cid}-{n}"  # unique values
                r = rng.random()
                if r < 0.3:
                    out, res = history.record(cid, "put", k, (v,), lambda: kv.put(k, v))
                    if out == "ok":
                        seen[k] = v
                elif r < 0.65:
                    out, res = history.record(cid, "get", k, (), lambda: kv.get(k))
                    if out == "ok":
                        seen[k] = res
                elif r < 0.9:
                    e = seen.get(k) if rng.random() < 0.85 else None
                    out, res = history.record(cid, "cas", k, (e, v), lambda: kv.cas(k, e, v))
                    if out == "ok" and res:
                        seen[k] = v
                else:
                    out, res = history.record(cid, "delete", k, (), lambda: kv.delete(k))
                    if out == "ok":
                        seen[k] = None
                if out == "indeterminate":
                    stop.wait(rng.uniform(0.0, 0.05))
    except Exception as e:  # noqa: BLE001 - a workload bug must not pass unnoticed
        problems.append(f"client {cid} failed: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------
# Checks

def check_acknowledged(ops: list[Op], outcome: list[str], final: dict[Any, Any]) -> list[str]:
    """Every acknowledged write is in the final state or superseded by a write that may come after it.

    A write is a put, a cas that swapped, or a delete; ``final`` is each key's
    value read at the end (None: absent).  A write w is superseded when
    another write w' (acknowledged, or indeterminate) on the key did not
    return before w was called, so w' may be ordered after w.
    """
    writes: dict[Any, list[tuple[Op, str]]] = defaultdict(list)
    for o, out in zip(ops, outcome):
        if out == "failed" or o.op == "get":
            continue
        if o.op == "cas" and out == "ok" and not o.result:
            continue  # did not swap: wrote nothing
        writes[o.key].append((o, out))
    lost = []
    for key, ws in writes.items():
        if key not in final:
            continue
        for w, out in ws:
            if out != "ok":
                continue
            value = None if w.op == "delete" else w.args[-1]
            if final[key] == value:
                continue
            if any(w2 is not w and (w2.return_time is None or w2.return_time >= w.call_time) for w2, _ in ws):
                continue
            lost.append(f"{w} acknowledged, but {key!r} ends as {final[key]!r} and no later write explains it")
    return lost


def _read_logs(cluster: FaultCluster) -> tuple[dict[int, dict[int, Any]], dict[int, int], list[str]]:
    """Each node's log entries (index -> (term, kind, payload)) and commit index (max of stored and applied)."""
    logs: dict[int, dict[int, Any]] = {}
    commits: dict[int, int] = {}
    problems = []
    for i in sorted(set(cluster.ids) - cluster.unpowered):  # compare_state_machines reports the others
        try:
            entries, committed, purged = cluster.reader.call(offline.log_and_commit, cluster.data_dir(i))
        except Exception as e:  # noqa: BLE001
            problems.append(f"node {i}: cannot read its stores: {type(e).__name__}: {e}")
            continue
        logs[i] = entries
        commits[i] = committed
        if entries:
            idx = sorted(entries)
            if idx[-1] - idx[0] + 1 != len(idx):
                problems.append(f"node {i}: its log has holes between {idx[0]} and {idx[-1]}")
            first = idx[0]
            if first != purged + 1:
                problems.append(f"node {i}: its log starts at {first}, but purged is {purged}")
            terms = [entries[j][0] for j in idx]
            if any(a > b for a, b in zip(terms, terms[1:])):
                problems.append(f"node {i}: terms decrease along its log")
    return logs, commits, problems


class LogAuditor:
    """Reads every node's committed log entries while the run goes on, and checks they agree.

    Snapshots purge the logs, so what is left at the end covers only the
    last entries; this thread reads each node's log every ``interval``
    seconds (read-only, :func:`.offline.committed_entries`, also while the
    node is paused or down, but not while it is down after a power cut) from
    where it stopped last time up to the node's commit index, and checks each
    entry against the one first seen committed at that index on any node.
    """

    def __init__(self, cluster: FaultCluster, interval: float = 0.5) -> None:
        self.cluster = cluster
        self.interval = interval
        self.committed: dict[int, tuple] = {}  # index -> (term, kind, payload), first seen committed
        self.seen_by: dict[int, int] = {}  # index -> the node it was first read from
        self.read_upto: dict[int, int] = {i: 0 for i in cluster.ids}
        self.problems: list[str] = []
        self.checked = 0
        self.missed = 0  # committed entries purged before they were read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="log-auditor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.audit_once()

    def audit_once(self) -> None:
        for i in self.cluster.ids:
            if len(self.problems) > 20:
                return
            try:
                with self.cluster.reading(i) as readable:  # not across a power cut of the node
                    if readable:
                        self._audit_node(i)
            except Exception as e:  # noqa: BLE001 - a node being created or restarted; next time
                if "no LMDB environment" not in str(e):
                    self.problems.append(f"auditor: node {i}: cannot read its stores: {type(e).__name__}: {e}")

    def _audit_node(self, i: int) -> None:
        start = self.read_upto[i] + 1
        upto, first, entries = self.cluster.reader.call(offline.committed_entries, self.cluster.data_dir(i), start)
        if upto < start:
            return
        if first > start:
            self.missed += first - start
        for index, term, kind, payload in entries:
            self._check(i, index, (term, kind, payload))
        self.read_upto[i] = upto

    def _check(self, node: int, index: int, entry: tuple) -> None:
        self.checked += 1
        known = self.committed.get(index)
        if known is None:
            self.committed[index] = entry
            self.seen_by[index] = node
        elif known != entry:
            self.problems.append(
                f"committed entry {index} differs: node {self.seen_by[index]} had term {known[0]} {known[1]} "
                f"{known[2]!r}, node {node} has term {entry[0]} {entry[1]} {entry[2]!r}")


def check_logs(logs: dict[int, dict[int, Any]], commits: dict[int, int]) -> list[str]:
    """Pairwise: committed entries agree, and Log Matching holds (same index and term: same entry and prefix)."""
    problems = []
    ids = sorted(logs)
    for a_pos, a in enumerate(ids):
        for b in ids[a_pos + 1:]:
            la, lb = logs[a], logs[b]
            common = sorted(set(la) & set(lb))
            limit = min(commits[a], commits[b])
            # The highest index where both have an entry of the same term: everything below must match.
            match = max((j for j in common if la[j][0] == lb[j][0]), default=0)
            for j in common:
                if j > max(limit, match):
                    break
                if la[j] != lb[j]:
                    why = "committed" if j <= limit else f"below their common entry {match} (Log Matching)"
                    problems.append(f"nodes {a} and {b} differ at index {j} ({why}): "
                                    f"term {la[j][0]} {la[j][1]} {la[j][2]!r} vs term {lb[j][0]} {lb[j][1]} "
                                    f"{lb[j][2]!r}")
                    break
    return problems


#: Node log lines that mean something went wrong inside a node, whatever the faults.
_BAD_LOG_LINES = (" ERROR ", " CRITICAL ", "Traceback", "dropped an invalid", "a second reply",
                  "request failed:", "dropped a message of", "dropped a frame of", "could not save the commit point")


def scan_node_logs(paths: dict[int, str], per_node: int = 5) -> list[str]:
    """Lines of the nodes' logs (stderr) that report errors: exceptions, invalid messages, failed handlers."""
    problems = []
    for i, path in sorted(paths.items()):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                bad = [line.rstrip() for line in f if any(b in line for b in _BAD_LOG_LINES)]
        except OSError:
            continue
        for line in bad[:per_node]:
            problems.append(f"node {i} logged: {line[:300]}")
        if len(bad) > per_node:
            problems.append(f"node {i} logged {len(bad) - per_node} more such lines")
    return problems


def count_rebuilds(paths: dict[int, str]) -> int:
    """How many times the nodes' KV state machines were rebuilt after a reboot (from the nodes' logs)."""
    n = 0
    for path in paths.values():
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                n += sum("rebuilding it from the newest snapshot" in line for line in f)
        except OSError:
            continue
    return n


def compare_state_machines(cluster: FaultCluster, final: dict[Any, Any]) -> tuple[list[str], dict[int, int]]:
    """Every node's KV items (read after they stopped) are equal, and equal to the final reads."""
    problems = []
    items: dict[int, dict] = {}
    applied: dict[int, int] = {}
    for i in cluster.ids:
        if i in cluster.unpowered:
            problems.append(f"node {i} never served again after its last power cut")
            continue
        try:
            applied[i], items[i] = cluster.reader.call(offline.state, cluster.data_dir(i))
        except Exception as e:  # noqa: BLE001
            problems.append(f"node {i}: cannot read its state machine: {type(e).__name__}: {e}")
    ids = sorted(items)
    for i in ids[1:]:
        a, b = items[ids[0]], items[i]
        if a != b:
            diff = sorted((set(a) ^ set(b)) | {k for k in set(a) & set(b) if a[k] != b[k]}, key=repr)
            problems.append(f"nodes {ids[0]} (applied {applied[ids[0]]}) and {i} (applied {applied[i]}) hold "
                            f"different items: {len(diff)} keys differ, e.g. "
                            + ", ".join(f"{k!r}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff[:5]))
    for i in ids:
        bad = [k for k, v in final.items() if items[i].get(k) != v]
        if bad:
            problems.append(f"node {i}: {len(bad)} keys differ from the final linearizable reads, e.g. "
                            + ", ".join(f"{k!r}: {items[i].get(k)!r} vs read {final[k]!r}" for k in bad[:5]))
    return problems, applied


_LEADER_LINE = re.compile(r"node (\d+): Leader in term (\d+),")


def check_election_safety(paths: dict[int, str]) -> list[str]:
    """Election Safety over the whole run: at most one node became leader in any term (from the nodes' logs).

    A node that forgot a vote it had granted (or the term it was in) may vote
    twice in one term, and two leaders of one term can then both commit.
    """
    leaders: dict[int, set[int]] = defaultdict(set)
    for i, path in sorted(paths.items()):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    m = _LEADER_LINE.search(line)
                    if m:
                        leaders[int(m.group(2))].add(int(m.group(1)))
        except OSError:
            continue
    return [f"Election Safety: nodes {sorted(ids)} were all leader in term {term}"
            for term, ids in sorted(leaders.items()) if len(ids) > 1]


def check_snapshot_files(cluster: FaultCluster) -> list[str]:
    """Every node's current snapshot file (the one its state machine points at) exists and reads back whole."""
    problems = []
    for i in sorted(set(cluster.ids) - cluster.unpowered):  # compare_state_machines reports the others
        try:
            cluster.reader.call(offline.check_current_snapshot, cluster.data_dir(i))
        except Exception as e:  # noqa: BLE001
            problems.append(f"node {i}: its current snapshot is unreadable: {type(e).__name__}: {e}")
    return problems


# ---------------------------------------------------------------------------
# One run

def _say(cfg: RunConfig) -> Callable[[str], None]:
    if cfg.log is not None:
        return cfg.log
    if cfg.verbose:
        return lambda s: print(s, flush=True)
    return lambda s: None


def _most_applied_state(cluster: FaultCluster, keys: list[Any], problems: list[str]) -> dict[Any, Any]:
    """Each of ``keys``' value (None: absent) in the state machine of the node that applied the most (read offline)."""
    best: tuple[int, int, dict] | None = None
    for i in sorted(set(cluster.ids) - cluster.unpowered):  # torn until rebuilt
        try:
            applied, items = cluster.reader.call(offline.state, cluster.data_dir(i))
        except Exception:  # noqa: BLE001 - compare_state_machines reports it
            continue
        if best is None or applied > best[0]:
            best = (applied, i, items)
    if best is None:
        problems.append("the cluster did not serve after healing and no node's state machine could be read")
        return {}
    problems.append(f"the cluster did not serve after healing: acknowledged writes judged by node {best[1]}'s "
                    f"state machine (applied index {best[0]})")
    return {k: best[2].get(k) for k in keys}


def _applied(cluster: FaultCluster, i: int) -> int:
    st = cluster.status(i, 1.0)
    return (st or {}).get("applied") or 0


def run(cfg: RunConfig) -> RunResult:
    say = _say(cfg)
    res = RunResult(cfg)
    base = cfg.base_dir or tempfile.mkdtemp(prefix="pyraft-faults-")
    os.makedirs(base, exist_ok=True)
    res.base_dir = base
    started = time.monotonic()
    cluster: FaultCluster | None = None
    stop_clients = threading.Event()
    threads: list[threading.Thread] = []
    sched: Scheduler | None = None
    auditor: LogAuditor | None = None
    events_file = os.path.join(base, "events.txt")
    events_out = open(events_file, "a", encoding="utf-8")

    log_lock = threading.Lock()

    def log(s: str) -> None:
        with log_lock:
            events_out.write(s + "\n")
            events_out.flush()
            say(s)

    try:
        log(f"pyraft-faults: seed {cfg.seed}, {cfg.nodes} nodes, {cfg.duration:g} s of "
            f"{','.join(cfg.nemeses)}, {cfg.clients} clients; run directory {base}")
        log(f"node config: {json.dumps(cfg.raft_config, sort_keys=True)}")
        if cfg.lazyfs:
            log(f"node data on lazy filesystems (names durable by the {cfg.lazyfs} rule)"
                + (f"; nodes run with mutant {cfg.mutant}" if cfg.mutant else ""))
        cluster = FaultCluster(os.path.join(base, "cluster"), cfg.nodes, config=cfg.raft_config, log_level="INFO",
                               lazyfs=cfg.lazyfs, mutant=cfg.mutant)
        cluster.start_all(timeout=30)
        cluster.wait_leader(30)
        t0 = time.monotonic()
        history = History(lambda: time.monotonic() - t0)
        keyspace = Keyspace(cfg.keys, cfg.key_lifetime, t0)
        workload_problems: list[str] = []
        for cid in range(cfg.clients):
            t = threading.Thread(target=_client_loop, name=f"client-{cid}",
                                 args=(cid, cluster, cfg, keyspace, history, stop_clients, workload_problems),
                                 daemon=True)
            t.start()
            threads.append(t)

        # -- faults
        auditor = LogAuditor(cluster)
        auditor.start()
        sched = Scheduler(cluster, cfg.nemeses, random.Random(cfg.seed), t0, log=log, first=cfg.first_faults)
        sched.start()
        end = time.monotonic() + cfg.duration
        last_report = time.monotonic()
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            if cfg.verbose and time.monotonic() - last_report >= 15:
                last_report = time.monotonic()
                _, outs = history.snapshot()
                cnt = Counter(outs)
                log(f"[{time.monotonic() - t0:7.2f}] workload: {cnt['ok']} ok, {cnt['failed']} failed, "
                    f"{cnt['indeterminate']} indeterminate")
        sched.stop()
        res.faults = Counter(sched.counts)
        res.problems += sched.problems

        # -- heal, and the cluster must serve again
        log(f"[{time.monotonic() - t0:7.2f}] healing: network, disks, paused and dead nodes, membership")
        heal_t = time.monotonic() - t0
        res.problems += cluster.heal_all()
        try:
            cluster.restore_membership(timeout=60)
        except RaftError as e:
            res.problems.append(f"membership not restored after healing: {e}")
        time.sleep(cfg.recovery)
        stop_clients.set()
        for t in threads:
            t.join(max(cfg.client_timeouts) * 3 + 10)
            if t.is_alive():
                res.problems.append(f"{t.name} did not stop")
        res.problems += workload_problems
        ops, outcome = history.snapshot()
        res.ok_after_heal = sum(1 for o, out in zip(ops, outcome) if out == "ok" and o.call_time >= heal_t)
        if res.ok_after_heal == 0:
            res.problems.append(f"no operation succeeded in the {cfg.recovery:g} s after healing")

        # -- barrier: a committed write every node applies, then linearizable reads of every key
        res.problems += [f"node {i} exited by itself with code {code}" for i, code in cluster.unexpected_exits()]
        barrier_index = 0
        serving = True
        with KVClient(dict(cluster.addrs), timeout=30, cluster_name=cluster.cluster_name) as kv:
            try:
                kv.put("barrier", "after-heal")
                lead = cluster.wait_leader(30)
                barrier_index = (cluster.status(lead, 2.0) or {}).get("committed") or 0
            except (RaftError, Exception) as e:  # noqa: BLE001
                res.problems.append(f"the barrier write failed after healing: {type(e).__name__}: {e}")
                serving = False
            deadline = time.monotonic() + 60
            lagging = list(cluster.ids)
            while lagging and time.monotonic() < deadline:
                lagging = [i for i in lagging if _applied(cluster, i) < barrier_index]
                if lagging:
                    time.sleep(0.1)
            if lagging:
                res.problems.append(f"nodes {lagging} did not apply index {barrier_index} within 60 s of healing")
            keys = sorted({o.key for o in ops})
            res.keys = len(keys)
            final: dict[Any, Any] = {}
            for k in keys if serving else ():  # else each read would only time out, 5 times a key
                for _attempt in range(5):
                    out, v = history.record("final", "get", k, (), lambda: kv.get(k))
                    if out == "ok":
                        final[k] = v
                        break
                else:
                    res.problems.append(f"the final read of {k!r} failed 5 times")
        ops, outcome = history.snapshot()
        res.ops = Counter(outcome)
        res.by_op = Counter(f"{o.op} {out}" for o, out in zip(ops, outcome))
        with open(os.path.join(base, "history.jsonl"), "w", encoding="utf-8") as f:
            for o, out in zip(ops, outcome):
                f.write(json.dumps({"client": o.client, "op": o.op, "key": o.key, "args": list(o.args),
                                    "call": o.call_time, "return": o.return_time, "result": repr(o.result),
                                    "outcome": out}) + "\n")

        # -- stop the nodes, then read their stores (the auditor first: LMDB opens an
        #    environment once per process, so no two readers of one node at a time)
        auditor.stop()
        cluster.close()
        for i, p in cluster.procs.items():
            if p.returncode not in (0, None):
                res.problems.append(f"node {i} exited with code {p.returncode} when stopped")
        node_logs = {i: cluster.log_path(i) for i in cluster.ids}
        res.problems += scan_node_logs(node_logs)
        if not serving:
            # No final reads: judge the acknowledged writes by the most advanced node's state machine.
            final = _most_applied_state(cluster, keys, res.problems)
        res.sm_problems, _applied_at = compare_state_machines(cluster, final)
        res.sm_problems += check_snapshot_files(cluster)
        logs, commits, problems = _read_logs(cluster)
        res.log_problems = problems + check_logs(logs, commits) + check_election_safety(node_logs)
        res.commit_index = max(commits.values(), default=0)
        auditor.audit_once()  # everything up to the final commit indexes
        res.log_problems += auditor.problems
        res.audited = len(auditor.committed)
        seen = max(auditor.committed, default=0)
        if seen > res.commit_index:
            res.log_problems.append(f"committed entries lost: entry {seen} was read committed on node "
                                    f"{auditor.seen_by[seen]} during the run, but at the end the highest commit "
                                    f"index of any node is {res.commit_index}")

        # -- the history
        res.lost_writes = check_acknowledged(ops, outcome, final)
        t_check = time.monotonic()
        checked = [o for o, out in zip(ops, outcome) if out != "failed"]
        ok, info = check_history(checked, timeout=cfg.check_timeout)
        res.linearizable = ok
        res.checker = {k: v for k, v in info.items() if k in ("keys", "ops", "explored", "key", "report")}
        if ok is None:
            res.checker["reason"] = f"the checker ran out of its {cfg.check_timeout:g} s on key {info.get('key')!r}"
        log(f"checked {len(checked)} operations on {info.get('keys')} keys in {time.monotonic() - t_check:.1f} s: "
            f"linearizable {ok}")
        if res.ops["failed"]:
            res.problems.append(f"{res.ops['failed']} operations were refused by the state machine: "
                                f"{dict(history.errors)}")
    except KeyboardInterrupt:
        res.problems.append("interrupted")
        raise
    except Exception as e:  # noqa: BLE001 - the run failed; say why, stop everything
        import traceback
        res.problems.append(f"the run failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        stop_clients.set()
        if sched is not None:
            sched._stop.set()
        if auditor is not None:
            auditor.stop()
        if cluster is not None:
            _stop_everything(cluster)
            res.forgotten = Counter(cluster.forgotten, rebuilds=count_rebuilds(
                {i: cluster.log_path(i) for i in cluster.ids}))
            cluster.release()
        res.elapsed = time.monotonic() - started
        for line in res.summary().splitlines():
            events_out.write(line + "\n")
        events_out.close()
        if res.ok and not cfg.keep:
            shutil.rmtree(base, ignore_errors=True)
    return res


def _stop_everything(cluster: FaultCluster) -> None:
    """Stop every node process (SIGCONT, SIGTERM, then SIGKILL); nothing may be left running."""
    try:
        cluster.close()
    finally:
        for p in cluster.procs.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(10)
                except Exception:  # noqa: BLE001
                    pass


def run_with_signals(cfg: RunConfig) -> RunResult:
    """:func:`run` with SIGTERM and SIGINT turned into KeyboardInterrupt, so the nodes are always stopped."""
    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run(cfg)
    except KeyboardInterrupt:
        print("pyraft-faults: interrupted; every node process was stopped", file=sys.stderr)
        raise SystemExit(130)
    finally:
        for s, h in old.items():
            signal.signal(s, h)

