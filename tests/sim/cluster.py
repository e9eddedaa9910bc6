"""A deterministic simulation of whole pyraft clusters (FoundationDB / TigerBeetle VOPR style).

One seed fixes everything: the cluster shape, the configuration, every
message delay, loss, duplicate, partition, crash, disk flush and client
operation.  Time is simulated (a priority queue of events); nothing reads a
real clock, so a failing seed replays exactly.

What is simulated, per node (:class:`SimNode`):

* a **disk**: the durable log, vote, committed log id and state-machine
  snapshot.  ``SaveVote``/``SaveCommitted`` are durable at once (the runtime
  writes them synchronously before later commands); ``AppendToLog``,
  ``TruncateLog`` and ``PurgeLog`` go to an unflushed buffer that is flushed
  after a short random delay, after which the engine hears
  ``on_log_flushed``; now and then a disk stalls for longer than an election
  timeout.  A crash loses the buffer (a random prefix of it may have reached
  the disk) and may strike between any two commands of one ``take_output()``
  batch;
* a **process** that may be paused (SIGSTOP) for longer than an election
  timeout: it handles nothing meanwhile, then everything that waited;
* a **state machine** worker (FIFO: Apply, BuildSnapshot, InstallSnapshot)
  whose state is ``(applied log id, hash chain of the applied entries)``,
  volatile, rebuilt on restart from the durable snapshot and a replay of the
  durable log;
* a **clock** that drifts a little from global time;
* **replication**: ``Replicate`` reads the entries from the node's own log
  (sometimes a little later, as a replication worker would), snapshots go out
  in one or several chunks with an RPC timeout.

The **network** loses, duplicates and reorders messages (random delays),
delivers a few of them late enough to outlive an election or a restart of
either end, and has symmetric and one-way partitions.  A **client**
proposes, reads (ReadIndex), changes membership (and sometimes loses or
stops the leader while the joint configuration is open), transfers
leadership and triggers snapshots, purges, elections.  Fault phases
alternate with healed phases in which a leader must be elected and a fresh
proposal commit within ten maximum election timeouts (liveness).

:mod:`invariants` checks the safety properties after every event.  The
harness itself checks what only it can see (``DIRECT_CHECKS``): a vote is on
disk when granted and an entry when acknowledged or counted as flushed; a
leader's view of what a follower holds is in the leader's log and on the
follower's disk; a new leader had the votes of a majority of every voter set
of its configuration; a leader commits by counting replicas only an entry of
its own term, held on the disks of a majority of every voter set; no node
grants a vote while CheckQuorum's lease binds it; a
leader sends TimeoutNow only to a caught-up target and accepts no proposal
while it transfers; client writes are linearizable (one proposed after
another was acknowledged is ordered after it in the log).

Manual mode (``Sim(..., manual=True)``) turns every delay to zero and every
random activity off; scenario tests (``tests/test_raft_paper.py``) drive it
with :meth:`Sim.stabilize`, :meth:`Sim.advance` and network filters.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
from collections import deque
from typing import Any, Callable

from pyraft.config import Config
from pyraft.engine import commands as C
from pyraft.engine.core import Engine, RestoredState
from pyraft.errors import RaftError
from pyraft.messages import InstallSnapshotRequest, InstallSnapshotResponse, AppendEntriesRequest, \
    AppendEntriesResponse, VoteRequest, VoteResponse
from pyraft.types import EntryKind, LogId, Node, ServerState, SnapshotMeta, StoredMembership, Vote

from .invariants import InvariantViolation, Invariants, chain

LEADER = ServerState.LEADER
MEMBERSHIP = EntryKind.MEMBERSHIP  # (a global: an Enum class attribute is a slow lookup)

#: Check the ordering contract and the quorum rules directly where they are observable (a vote is on
#: disk when granted, an acknowledged or flushed entry is on disk, a leader's view of a follower's log
#: is true, a leader won and commits with majorities of every voter set, a transfer goes to a
#: caught-up target).  ``sim.teeth --no-direct-checks`` turns this off to see whether the
#: Figure 3 invariants alone catch a durability bug, through crashes.
DIRECT_CHECKS = True


class LivenessFailure(AssertionError):
    """The cluster did not recover (elect a leader and commit) in time after faults healed."""


def idx(log_id: LogId | None) -> int:
    return 0 if log_id is None else log_id.index


def addr(node_id: int) -> Node:
    return Node(f"sim://{node_id}")


# --------------------------------------------------------------------------- log


class SimLog:
    """A log with the prefix hash of every entry (see :func:`invariants.chain`).

    Entry ``i`` is at ``ents[i - base - 1]``; ``base`` is the purged index.
    """

    __slots__ = ("purged", "purged_h", "base", "ents", "hs")

    def __init__(self) -> None:
        self.purged: LogId | None = None
        self.purged_h = 0
        self.base = 0
        self.ents: list = []
        self.hs: list[int] = []

    def copy(self) -> "SimLog":
        c = SimLog()
        c.purged, c.purged_h, c.base, c.ents, c.hs = self.purged, self.purged_h, self.base, list(self.ents), list(self.hs)
        return c

    @property
    def last_index(self) -> int:
        return self.base + len(self.ents)

    @property
    def purged_index(self) -> int:
        return self.base

    @property
    def last(self) -> LogId | None:
        return self.ents[-1].log_id if self.ents else self.purged

    def get(self, i: int):
        k = i - self.base - 1
        return self.ents[k] if 0 <= k < len(self.ents) else None

    def term_at(self, i: int) -> int | None:
        k = i - self.base - 1
        if 0 <= k < len(self.ents):
            return self.ents[k].log_id.term
        if k == -1:
            return self.purged.term if self.purged is not None else 0
        return None

    def hash_at(self, i: int) -> int | None:
        k = i - self.base - 1
        if 0 <= k < len(self.hs):
            return self.hs[k]
        if k == -1:
            return self.purged_h
        return None

    def append(self, e, h: int | None = None) -> int:
        li = self.base + len(self.ents)
        if e.log_id.index != li + 1:
            raise InvariantViolation(f"AppendToLog {e.log_id} does not continue the log (last index {li})")
        prev = self.hs[-1] if self.hs else self.purged_h
        last = self.last
        if last is not None and e.log_id.term < last.term:
            raise InvariantViolation(f"AppendToLog {e.log_id} after {last}: terms decrease along the log")
        if h is None:
            h = chain(prev, e)
        self.ents.append(e)
        self.hs.append(h)
        return h

    def truncate(self, since: int) -> None:
        if since <= self.base:
            raise InvariantViolation(f"TruncateLog({since}) reaches purged entries (purged {self.purged})")
        k = since - self.base - 1
        del self.ents[k:]
        del self.hs[k:]

    def purge(self, upto: LogId, h: int) -> None:
        if upto.index <= self.base:
            return
        k = upto.index - self.base
        del self.ents[:k]
        del self.hs[:k]
        self.base = upto.index
        self.purged = upto
        self.purged_h = h


class Snap:
    """A durable state-machine snapshot: meta, prefix hash of its last entry, and its bytes."""

    __slots__ = ("meta", "h", "data")

    def __init__(self, meta: SnapshotMeta, h: int, data: bytes) -> None:
        self.meta, self.h, self.data = meta, h, data


def encode_snapshot(lid: LogId, h: int, pad: int) -> bytes:
    body = f"{lid.term}:{lid.index}:{h}|".encode() + b"#" * pad
    return f"{len(body) + 8:08d}".encode() + body


def decode_snapshot(data: bytes) -> tuple[LogId, int] | None:
    try:
        if int(data[:8]) != len(data):
            return None
        term, index, h = data[8:].split(b"|", 1)[0].split(b":")
        return LogId(int(term), int(index)), int(h)
    except ValueError:
        return None


# --------------------------------------------------------------------------- node


class SimNode:
    def __init__(self, sim: "Sim", node_id: int, drift: float) -> None:
        self.sim = sim
        self.id = node_id
        self.rate = 1.0 + drift
        self.alive = False
        self.inc = 0                 # incarnation: events of an earlier life are ignored
        self.engine: Engine | None = None
        self.led_term = -1           # the last term this node led (Leader Append-Only)
        # disk
        self.d_log = SimLog()
        self.d_vote: Vote | None = None
        self.d_committed: LogId | None = None
        self.d_snap: Snap | None = None
        # volatile
        self.log = SimLog()          # what the log store returns: durable + unflushed
        self.buf: list[tuple] = []   # unflushed log writes
        self.flush_pending = False
        self.sm_applied: LogId | None = None
        self.sm_h = 0
        self.sm_membership: StoredMembership | None = None
        self.smq: deque = deque()
        self.sm_busy = False
        self.recv: list | None = None        # [snapshot_id, bytearray, intact]
        self.repl_term = 0
        self.repl_targets: frozenset[int] = frozenset()
        self.transfers: dict[int, list] = {}  # target -> [tid, term, meta, data, offset, end, chunk]
        self.seen_committed: Any = None
        self.saved_committed: LogId | None = None   # the last SaveCommitted of this incarnation
        self.decommissioned = False                  # shut down by the operator (see Sim._heal)
        self.stall_until = 0.0                       # its disk completes no flush before then
        self.paused = False                          # the process is stopped (SIGSTOP): events wait
        self.deferred: list[tuple] = []              # the events that arrived while it was paused
        #: (term, local time) of the last AppendEntries/InstallSnapshot of a leader it took (lease check)
        self.contact: tuple[int, float] | None = None
        #: client writes this incarnation proposed and has not applied yet: index -> (log id, floor)
        self.writes: dict[int, tuple[LogId, int]] = {}
        #: (term, target, heartbeat round) of every AppendEntries this incarnation sent
        self.rounds: set[tuple[int, int, int]] = set()
        #: what _check_node last checked (see there)
        self.checked: tuple | None = None

    def now(self) -> float:
        return self.sim.t * self.rate

    def __repr__(self) -> str:
        e = self.engine
        if not self.alive:
            return f"n{self.id}(down)"
        return (f"n{self.id}({e.state.value} t{e.vote.term} v{e.vote.node_id} last={e.log.last} "
                f"commit={e.committed} applied={e.applied} flushed={e.flushed} "
                f"mem={_fmt_membership(e.membership)})")


def _fmt_membership(sm: StoredMembership | None) -> str:
    if sm is None:
        return "-"
    m = sm.membership
    cfgs = "/".join("".join(str(i) for i in sorted(c)) for c in m.configs)
    learners = "".join(str(i) for i in sorted(m.learner_ids))
    return f"{cfgs}" + (f"+L{learners}" if learners else "") + f"@{sm.log_id}"


# --------------------------------------------------------------------------- the simulation


def sim_config(rng: random.Random) -> Config:
    """Small timings and small batch/snapshot sizes, to reach the edges often."""
    return Config(
        heartbeat_interval=0.05,
        election_timeout=(0.15, 0.3),
        rpc_timeout=0.5,
        pre_vote=rng.random() < 0.85,
        check_quorum=rng.random() < 0.85,
        max_payload_entries=rng.choice([1, 2, 3, 8, 64]),
        max_inflight=rng.choice([1, 2, 4, 16]),
        snapshot_every=rng.choice([5, 10, 25, 60, None]),
        max_in_snapshot_log_to_keep=rng.choice([0, 0, 1, 3, 10]),
        snapshot_chunk_size=rng.choice([8, 16, 1 << 20]),
    )


class Sim:
    """A cluster of engines on simulated time, network and disks.

    ``voters``: the initial voters (ids 1..voters); ``spares``: further
    pristine nodes the client may add as learners and then promote.
    """

    def __init__(self, seed: int, *, voters: int | None = None, spares: int | None = None,
                 config: Config | None = None, manual: bool = False, init: str | None = None,
                 trace_len: int = 60) -> None:
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.manual = manual
        if voters is None:
            voters = rng.choice([3, 3, 5, 5, 1]) if not manual else 3
        if spares is None:
            spares = rng.choice([0, 0, 1, 2]) if not manual else 0
        self.cfg = config if config is not None else sim_config(rng)
        if config is None and self.cfg.check_quorum and seed % 2:
            # Read leases in half the seeds that can have them (drawn from the seed, not the rng:
            # the other seeds' runs stay as they were).
            self.cfg = dataclasses.replace(self.cfg, lease_reads=True)
        if init is None:
            init = rng.choice(["all", "all", "one", "some"]) if not manual else "all"
        self.shape = f"{voters} voters + {spares} spares, init={init}, {self._cfg_str()}"
        self.inv = Invariants()
        self.q: list = []
        self._seq = itertools.count(1)   # the tie-breaker of events due at the same time: FIFO
        self.t = 0.0
        self.steps = 0
        self.trace: deque = deque(maxlen=trace_len)
        ids = list(range(1, voters + spares + 1))
        drift = 0.0 if manual else 0.02
        self.nodes: dict[int, SimNode] = {i: SimNode(self, i, rng.uniform(-drift, drift)) for i in ids}
        self.voter_ids = list(range(1, voters + 1))
        # network
        self.blocked: set[tuple[int, int]] = set()
        self.loss = 0.0
        self.dup = 0.0
        self.delay = (0.0, 0.0) if manual else (0.0005, 0.005)
        self.ghost = 0.0            # the share of messages delayed long enough to outlive an election
        self.write_acked = 0        # the highest index of a client write acknowledged so far
        #: while a VoteRequest is handled: (voter id, request, whether the voter's lease held, its term)
        self._voting: tuple[int, Any, bool, int] | None = None
        #: (term, candidate) -> the nodes that granted it their vote (sent, not necessarily received)
        self.grants: dict[tuple[int, int], set[int]] = {}
        self.on_send: Callable[[int, int, Any], bool] | None = None  # manual-mode filter
        self.hold_flush: set[int] = set()                 # manual mode: these flush only on Sim.flush
        self.reads_done: dict[Any, C.RespondRead] = {}   # manual mode: completed reads
        # disk / state machine / replication-worker latencies
        self.flush_delay = (0.0, 0.0) if manual else (0.0005, 0.01)
        self.sm_delay = (0.0, 0.0) if manual else (0.0002, 0.004)
        self.read_delay_p = 0.0 if manual else 0.3
        # faults
        self.phase = "fault"
        self.p_mid_crash = 0.0
        self.heal_deadline = 0.0
        self.probes: dict[tuple[int, int], LogId] = {}
        self.recoveries = 0
        self.payload = 0
        self.read_token = 0
        self.tid = 0
        self.stats = {"crashes": 0, "elections": 0, "snap_installs": 0, "commits": 0, "truncations": 0,
                      "mid_batch_crashes": 0, "pauses": 0, "stalls": 0, "ghosts": 0, "joint": 0,
                      "writes_acked": 0, "lease_checks": 0}
        for n in self.nodes.values():
            self._boot(n)
        nodes = {i: addr(i) for i in self.voter_ids}
        if init == "all":
            init_ids = self.voter_ids
        elif init == "one":
            init_ids = [rng.choice(self.voter_ids)]
        else:
            init_ids = sorted(rng.sample(self.voter_ids, rng.randint(1, voters)))
        self.init_ids, self.init_nodes = init_ids, nodes
        for i in init_ids:
            self.call(i, lambda e: e.initialize(nodes))
        if not manual:
            self._at(0.0, self._client)
            self._at(rng.uniform(0.2, 1.0), self._fault)
            self._at(rng.uniform(1.0, 2.5), self._heal)

    def _cfg_str(self) -> str:
        c = self.cfg
        return (f"pre_vote={c.pre_vote} check_quorum={c.check_quorum} lease_reads={c.lease_reads} "
                f"max_payload={c.max_payload_entries} inflight={c.max_inflight} snapshot_every={c.snapshot_every} "
                f"keep={c.max_in_snapshot_log_to_keep} chunk={c.snapshot_chunk_size}")

    # ------------------------------------------------------------------ events

    def _at(self, delay: float, fn: Callable, *args: Any) -> None:
        heapq.heappush(self.q, (self.t + delay, next(self._seq), fn, args))

    def run(self, steps: int) -> None:
        """Process ``steps`` events (a step is one event)."""
        q = self.q
        pop = heapq.heappop
        done = self.steps
        try:
            while done < steps and q:
                t, _, fn, args = pop(q)
                self.t = t
                done += 1
                fn(*args)
        finally:
            self.steps = done  # (counted in a local; only reports read it, after the run)

    def note(self, node_id: int | str, what: str | int, obj: Any = "") -> None:
        self.trace.append((self.t, node_id, what, obj))

    def format_trace(self, last: int = 30) -> str:
        lines = []
        for t, n, what, obj in list(self.trace)[-last:]:
            if type(what) is int:
                what = f"<-n{what}"
            lines.append(f"  {t:9.5f} n{n} {what} {obj}")
        return "\n".join(lines)

    def describe(self) -> str:
        return "\n".join(f"  {n!r}" for n in self.nodes.values())

    # ------------------------------------------------------------------ engine plumbing

    def call(self, node_id: int, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` on a live node and execute its output; RaftErrors are returned, not raised."""
        n = self.nodes[node_id]
        if not n.alive or n.paused:
            return None
        n.engine.advance_clock(self.t * n.rate)
        try:
            r = fn(n.engine)
        except RaftError as err:
            r = err
        self.run_output(n)
        return r

    def _boot(self, n: SimNode) -> None:
        """Start (or restart) a node from its disk only."""
        n.inc += 1
        n.alive = True
        n.log = n.d_log.copy()
        n.buf = []
        n.flush_pending = False
        n.smq = deque()
        n.sm_busy = False
        n.recv = None
        n.transfers = {}
        n.repl_term, n.repl_targets = 0, frozenset()
        n.paused, n.deferred, n.contact, n.writes, n.stall_until = False, [], None, {}, 0.0
        n.rounds = set()
        s = n.d_snap
        n.sm_applied = s.meta.last_log_id if s else None
        n.sm_h = s.h if s else 0
        n.sm_membership = s.meta.last_membership if s else None
        if s:
            self.inv.on_snapshot_state(n.id, n.sm_applied, n.sm_h)
        mems = [n.sm_membership] if n.sm_membership is not None else []
        for e in n.log.ents:
            if e.kind == EntryKind.MEMBERSHIP and e.log_id.index > idx(n.sm_applied):
                mems.append(StoredMembership(e.log_id, e.payload))
        rs = RestoredState(vote=n.d_vote, last_purged=n.d_log.purged, last_log_id=n.d_log.last,
                           committed=n.d_committed, applied=n.sm_applied, snapshot=s.meta if s else None,
                           memberships=mems, term_at=n.d_log.term_at)
        erng = random.Random(f"{self.seed}/{n.id}/{n.inc}")
        n.engine = Engine(n.id, self.cfg, erng, n.now(), rs)
        n.seen_committed = None
        n.saved_committed = None
        n.checked = None
        self.note(n.id, "boot", f"vote={n.d_vote} log={n.d_log.purged}..{n.d_log.last} committed={n.d_committed} "
                                f"snapshot={n.sm_applied}")
        self.run_output(n)
        if not self.manual:
            self._at(self.rng.uniform(0.0, 0.02), self._tick, n, n.inc)

    def crash(self, node_id: int, why: str = "crash", down_for: float | None = None) -> None:
        n = self.nodes[node_id]
        if not n.alive:
            return
        self.stats["crashes"] += 1
        k = self.rng.randrange(len(n.buf) + 1) if n.buf and not self.manual else 0
        self._write_durable(n, n.buf[:k])
        self.note(n.id, why, f"{k} of {len(n.buf)} unflushed writes reached the disk")
        n.buf = []
        n.alive = False
        n.engine = None
        n.inc += 1
        n.log = SimLog()
        n.smq = deque()
        n.transfers = {}
        n.paused, n.deferred, n.writes = False, [], {}
        self._check_durable()
        if not self.manual:
            self._at(self.rng.uniform(0.01, 0.8) if down_for is None else down_for, self._restart, n.id, n.inc)

    def restart(self, node_id: int) -> None:
        n = self.nodes[node_id]
        if not n.alive:
            self._boot(n)

    def _restart(self, node_id: int, inc: int) -> None:
        n = self.nodes[node_id]
        if n.inc == inc and not n.alive and not n.decommissioned:
            self._boot(n)

    def _held(self, n: SimNode, fn: Callable, *args: Any) -> bool:
        """A paused process handles nothing: its events wait, in order, until it resumes."""
        if n.paused:
            n.deferred.append((fn, args))
            return True
        return False

    def pause(self, node_id: int, why: str = "pause", down_for: float | None = None) -> None:
        """SIGSTOP: the node handles nothing (timers, messages, its disk's completions) until resumed."""
        n = self.nodes[node_id]
        if not n.alive or n.paused:
            return
        n.paused = True
        self.stats["pauses"] += 1
        self.note(node_id, why)
        if not self.manual:
            self._at(self.rng.uniform(0.2, 1.2) if down_for is None else down_for, self._resume, node_id, n.inc)

    def _resume(self, node_id: int, inc: int) -> None:
        n = self.nodes[node_id]
        if n.inc != inc or not n.paused:
            return
        n.paused = False
        self.note(node_id, "resume", f"{len(n.deferred)} events waited")
        events, n.deferred = n.deferred, []
        for fn, args in events:
            self._at(0.0, fn, *args)

    def _check_durable(self) -> None:
        inv = self.inv
        cm = inv.committed_membership
        c = inv.c_max
        if cm is None or c == 0:
            return
        want = inv.committed[c]
        holders = {}
        for v in cm.membership.configs[-1]:
            n = self.nodes.get(v)
            if n is None:
                holders[v] = False
                continue
            ok = (n.d_log.hash_at(c) == want or c <= n.d_log.base
                  or (n.d_snap is not None and idx(n.d_snap.meta.last_log_id) >= c))
            holders[v] = ok
        inv.check_durable(holders)

    def run_output(self, n: SimNode) -> None:
        """Execute the engine's commands in order, as the runtime would (maybe crashing midway)."""
        e = n.engine
        dispatch = self._DISPATCH
        while n.alive:
            cmds = e.take_output()
            if not cmds:
                break
            if self.p_mid_crash and self.rng.random() < self.p_mid_crash:
                crash_at = self.rng.randrange(len(cmds))
                for k, cmd in enumerate(cmds):
                    if k == crash_at:
                        self.stats["mid_batch_crashes"] += 1
                        self.crash(n.id, f"crash before command {k + 1} of {len(cmds)} ({type(cmd).__name__})")
                        return
                    dispatch[type(cmd)](self, n, cmd)
            else:
                for cmd in cmds:
                    dispatch[type(cmd)](self, n, cmd)
        if n.alive:
            self._check_node(n)

    def _check_node(self, n: SimNode) -> None:
        e = n.engine
        if e.state is LEADER:
            inv = self.inv
            term = e.vote.term
            if n.led_term != term:
                n.led_term = term
                self.stats["elections"] += 1
                self.note(n.id, "LEADER", f"term {term} last={e.log.last}")
                inv.on_leader(n.id, term, n.log)
                if DIRECT_CHECKS:
                    self._check_election(n, term)
                for other in self.nodes.values():
                    # (A leader of an older term, elected by late votes, is harmless: the quorum that
                    # gave the lease is past its term, and every quorum it needs meets that one.)
                    if other is not n and other.alive and other.engine.vote.term < term and self._lease_holds(other):
                        inv.fail(f"node {n.id} is elected in term {term} while node {other.id}'s read lease "
                                 f"of term {other.engine.vote.term} holds ({other.engine.read_lease()} at "
                                 f"its time {other.now():.4f})")
                if self.phase == "fault" and not self.manual and self.rng.random() < 0.2:
                    # buggify: a leader lost right after its election leaves entries of several
                    # terms half replicated -- the histories of the paper's Figure 8
                    self._at(self.rng.uniform(0.0, 0.03), self._depose, n.id, n.inc)
            # (Without Config.lease_reads, read_lease() is always None: no lease to check.)
            if self.cfg.lease_reads and self._lease_holds(n):
                newest = max(m.led_term for m in self.nodes.values())
                if newest > e.vote.term:
                    inv.fail(f"node {n.id}'s read lease of term {e.vote.term} holds, but term {newest} has had "
                             f"a leader")
                if idx(n.sm_applied) < self.write_acked:
                    inv.fail(f"linearizability: node {n.id} would serve a lease read from state applied up to "
                             f"{n.sm_applied}, but the write at index {self.write_acked} was acknowledged")
        c = e.committed
        log = e.log
        # Most outputs change none of what the checks below read: skip them then (the same objects,
        # which are immutable; a flush or crash that changes the disk clears the key).
        key = (c, e.applied, e.flushed, log.last, log.purged)
        if key == n.checked:
            return
        n.checked = key
        inv = self.inv
        ci = idx(c)
        if not idx(e.applied) <= ci <= e.log.last_index:
            inv.fail(f"node {n.id}: expected applied <= committed <= last log index, got "
                     f"{e.applied}, {c}, {e.log.last}")
        if e.log.last != n.log.last or e.log.purged != n.log.purged:
            inv.fail(f"node {n.id}: the engine's log ({e.log.purged}..{e.log.last}) and the log store "
                     f"({n.log.purged}..{n.log.last}) disagree")
        fl = e.flushed
        if DIRECT_CHECKS and fl is not None and n.d_log.term_at(fl.index) != fl.term and \
                not (n.d_snap is not None and idx(n.d_snap.meta.last_log_id) >= fl.index):
            inv.fail(f"node {n.id}: the engine counts {fl} as flushed, but it is not on disk "
                     f"(durable log {n.d_log.purged}..{n.d_log.last})")
        if c is not n.seen_committed:
            n.seen_committed = c
            inv.check_commit_point(n.id, c, n.log)

    # ------------------------------------------------------------------ storage commands

    def _write_durable(self, n: SimNode, ops: list) -> None:
        n.checked = None
        d = n.d_log
        for op in ops:
            kind = op[0]
            if kind == "A":
                d.append(op[1], op[2])
            elif kind == "T":
                d.truncate(op[1])
            else:
                d.purge(op[1], op[2])

    def _schedule_flush(self, n: SimNode) -> None:
        if not n.flush_pending:
            n.flush_pending = True
            if self.manual:
                self._at(0.0, self._flush, n, n.inc)
                return
            lo, hi = self.flush_delay
            delay = lo + (hi - lo) * self.rng.random()  # rng.uniform(lo, hi), inlined
            self._at(delay, self._flush, n, n.inc)
            if self.p_mid_crash and self.rng.random() < self.p_mid_crash:
                # power loss while writes (and maybe a SaveCommitted after them) are not on disk yet
                self._at(self.rng.uniform(0.0, delay), self._crash_event, n.id, n.inc, "crash before a flush")

    def _depose(self, node_id: int, inc: int) -> None:
        n = self.nodes[node_id]
        if n.inc != inc or not n.alive or self.phase != "fault":
            return
        if self.rng.random() < 0.5:
            self.crash(node_id, "crash the new leader")
        else:
            self.isolate(node_id)
            self.note("*", "isolate the new leader", node_id)

    def _crash_event(self, node_id: int, inc: int, why: str, down_for: float | None = None) -> None:
        n = self.nodes[node_id]
        if n.inc == inc and n.alive:
            self.stats["mid_batch_crashes"] += 1
            self.crash(node_id, why, down_for)

    def _flush(self, n: SimNode, inc: int) -> None:
        if n.inc != inc or not n.alive or (n.paused and self._held(n, self._flush, n, inc)):
            return
        if n.stall_until > self.t:
            # a disk that stalls (longer than an election timeout): the flush completes later
            self._at(min(n.stall_until - self.t, 0.05), self._flush, n, inc)
            return
        n.flush_pending = False
        if n.id in self.hold_flush:
            return
        self.flush(n)

    def flush(self, n: SimNode | int) -> None:
        """Make the node's unflushed log writes durable and tell its engine."""
        if isinstance(n, int):
            n = self.nodes[n]
        self._write_durable(n, n.buf)
        n.buf = []
        e = n.engine
        e.advance_clock(self.t * n.rate)
        e.on_log_flushed(n.d_log.last)
        self.run_output(n)

    def _c_save_vote(self, n: SimNode, cmd: C.SaveVote) -> None:
        old = n.d_vote
        v = cmd.vote
        if old is not None:
            if v.term < old.term:
                self.inv.fail(f"node {n.id}: SaveVote {v} goes back from {old}")
            if v.term == old.term and old.node_id is not None and v.node_id != old.node_id:
                self.inv.fail(f"node {n.id}: SaveVote {v} changes its vote in term {v.term} (was {old})")
        n.d_vote = v
        self.note(n.id, "SaveVote", v)

    def _c_append(self, n: SimNode, cmd: C.AppendToLog) -> None:
        inv = self.inv
        log = n.log
        buf = n.buf
        for e in cmd.entries:
            h = log.append(e)
            inv.on_append(n.id, e, h)
            buf.append(("A", e, h))
        self._schedule_flush(n)

    def _c_truncate(self, n: SimNode, cmd: C.TruncateLog) -> None:
        self.note(n.id, "TruncateLog", cmd.since)
        if cmd.since <= n.log.last_index:
            self.stats["truncations"] += 1
        self.inv.on_truncate(n.id, cmd.since, n.log, n.led_term, n.engine.vote.term)
        if cmd.since <= n.log.last_index:
            n.log.truncate(cmd.since)
        n.buf.append(("T", cmd.since))
        self._schedule_flush(n)
        if self.phase == "fault" and not self.manual and self.rng.random() < 0.15:
            # buggify: lose power before this truncation (and what follows it) is on disk
            self._at(self.rng.uniform(0.0, self.flush_delay[0]), self._crash_event, n.id, n.inc,
                     "crash before a truncation is flushed")

    def _c_purge(self, n: SimNode, cmd: C.PurgeLog) -> None:
        upto = cmd.upto
        self.note(n.id, "PurgeLog", upto)
        s = n.d_snap
        if s is None or idx(s.meta.last_log_id) < upto.index:
            self.inv.fail(f"node {n.id}: PurgeLog({upto}) but its snapshot on disk covers only "
                          f"{s.meta.last_log_id if s else None}")
        if upto.index <= n.log.last_index and upto.index > n.log.base:
            if n.log.term_at(upto.index) != upto.term:
                self.inv.fail(f"node {n.id}: PurgeLog({upto}) but its log has term {n.log.term_at(upto.index)} there")
            h = n.log.hash_at(upto.index)
        elif upto.index <= n.log.base:
            return
        else:
            if s.meta.last_log_id != upto:
                self.inv.fail(f"node {n.id}: PurgeLog({upto}) past its last entry {n.log.last}, "
                              f"but its snapshot is {s.meta.last_log_id}")
            h = s.h
        n.log.purge(upto, h)
        n.buf.append(("P", upto, h))
        self._schedule_flush(n)

    def _c_save_committed(self, n: SimNode, cmd: C.SaveCommitted) -> None:
        lid = cmd.log_id
        if n.saved_committed is not None and lid.index <= n.saved_committed.index:
            # (a restarted node may save less than its disk had: that saved point was a hint)
            self.inv.fail(f"node {n.id}: SaveCommitted {lid} does not advance from {n.saved_committed}")
        n.d_committed = n.saved_committed = lid
        self.stats["commits"] += 1
        e = n.engine
        if DIRECT_CHECKS and e.state is LEADER and n.led_term == e.vote.term:
            self._check_leader_commit(n, lid)
        leaders = [(m.id, m.engine.vote.term, m.log) for m in self.nodes.values()
                   if m.alive and m.engine.state is LEADER]
        self.inv.on_commit(n.id, n.engine.vote.term, lid, n.log,
                           n.d_snap.meta.last_membership if n.d_snap else None, leaders)

    # ------------------------------------------------------------------ network commands

    def send(self, src: int, dst: int, msg: Any, ctx: Any, is_resp: bool) -> None:
        if (src, dst) in self.blocked:
            return
        if self.manual:
            if self.on_send is not None and not self.on_send(src, dst, msg):
                return
            self._at(0.0, self._deliver, src, dst, msg, ctx, is_resp)
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            return
        lo, hi = self.delay
        d = lo + (hi - lo) * rng.random()  # rng.uniform(lo, hi), inlined
        if self.ghost and rng.random() < self.ghost:
            # a message that outlives an election or a restart of its sender or receiver
            d = rng.uniform(0.3, 2.0)
            self.stats["ghosts"] += 1
        heapq.heappush(self.q, (self.t + d, next(self._seq), self._deliver, (src, dst, msg, ctx, is_resp)))
        if self.dup and rng.random() < self.dup:
            self._at(rng.uniform(lo, 2 * hi), self._deliver, src, dst, msg, ctx, is_resp)

    def _deliver(self, src: int, dst: int, msg: Any, ctx: Any, is_resp: bool) -> None:
        if (src, dst) in self.blocked:
            return
        n = self.nodes[dst]
        if not n.alive or (n.paused and self._held(n, self._deliver, src, dst, msg, ctx, is_resp)):
            return
        self.note(dst, src, msg)  # (an int: "<-n{src}", formatted only when the trace is printed)
        e = n.engine
        e.advance_clock(self.t * n.rate)
        if is_resp:
            if DIRECT_CHECKS and type(msg) is AppendEntriesResponse and msg.seq and e.state is LEADER \
                    and msg.term == e.vote.term and (msg.term, src, msg.seq) not in n.rounds:
                # it would count as an answer to a heartbeat round it never sent (ReadIndex)
                self.inv.fail(f"leader {n.id} of term {msg.term} gets a reply of heartbeat round {msg.seq} from "
                              f"node {src}, a round it never sent it in this term (a reply to an earlier run?)")
            p = e.progress.get(src) if e.state is LEADER else None
            before = p.matched if p is not None else None
            e.step(src, msg, None)
            if p is not None and p.matched is not before and p is e.progress.get(src):
                self._check_ack(n, src, p.matched)
            self.run_output(n)
            if ctx is not None and n.alive:
                self._snapshot_progress(n, src, msg, ctx)
        else:
            t = type(msg)
            if t is VoteRequest:
                self._voting = (n.id, msg, self._lease_held(n), e.vote.term)
            e.step(src, msg, (src, ctx, msg))
            if (t is AppendEntriesRequest or t is InstallSnapshotRequest) and e.vote.term == msg.term \
                    and e.leader_id == msg.leader_id:
                n.contact = (msg.term, self.t * n.rate)
            self.run_output(n)
            self._voting = None

    # ------------------------------------------------------------------ checks that fail on availability

    def _lease_held(self, n: SimNode) -> bool:
        """CheckQuorum's vote lease (thesis 4.2.3): a node that heard from its term's leader within the
        minimum election timeout (or leads) grants no vote or pre-vote for a later term, bar a transfer."""
        if not self.cfg.check_quorum:
            return False
        e = n.engine
        if e.state is LEADER:
            return True
        c = n.contact
        return c is not None and c[0] == e.vote.term and n.now() - c[1] < self.cfg.election_timeout[0]

    def _lease_holds(self, n: SimNode) -> bool:
        """``n`` would serve a linearizable read without a round now (RaftCore.lease_read's test)."""
        lease = n.engine.read_lease()
        if lease is None or n.now() >= lease[0]:
            return False
        self.stats["lease_checks"] += 1
        return idx(n.sm_applied) >= lease[1]

    def _check_election(self, n: SimNode, term: int) -> None:
        """A new leader won a majority of every voter set of its configuration (both, when joint)."""
        votes = self.grants.get((term, n.id), set()) | {n.id}
        for cfg in n.engine.membership.membership.configs:
            if len(votes & cfg) * 2 <= len(cfg):
                self.inv.fail(f"node {n.id} leads term {term} with the votes of {sorted(votes)}, not a majority "
                              f"of voter set {sorted(cfg)} of its configuration {_fmt_membership(n.engine.membership)}")

    def _check_leader_commit(self, n: SimNode, lid: LogId) -> None:
        """A leader commits by counting replicas only an entry of its own term (the paper's Figure 8),
        held on the disks of a majority of every voter set of its configuration (both, when joint)."""
        e = n.engine
        term = e.vote.term
        if lid.term != term:
            self.inv.fail(f"leader {n.id} of term {term} commits {lid}, an entry of an earlier term, by counting "
                          f"replicas (Figure 8: only an entry of the leader's term commits that way)")
        h = n.log.hash_at(lid.index)
        for cfg in e.membership.membership.configs:
            holders = []
            for v in cfg:
                f = self.nodes.get(v)
                d = f.d_log if f is not None else None
                if d is not None and (d.hash_at(lid.index) == h or lid.index <= d.base
                                      or (f.d_snap is not None and idx(f.d_snap.meta.last_log_id) >= lid.index)):
                    holders.append(v)
            if len(holders) * 2 <= len(cfg):
                self.inv.fail(f"leader {n.id} commits {lid}, held on the disks of only {sorted(holders)} of voter "
                              f"set {sorted(cfg)} of its configuration {_fmt_membership(e.membership)}")

    def _check_ack(self, n: SimNode, src: int, m: LogId | None) -> None:
        """A leader's view of what a follower holds: in the leader's log, and on the follower's disk."""
        if m is None or not DIRECT_CHECKS:
            return
        i, log = m.index, n.log
        if i > log.last_index or (i > log.base and log.term_at(i) != m.term):
            self.inv.fail(f"leader {n.id} records node {src} as holding {m}, which its own log "
                          f"({log.purged}..{log.last}) does not hold")
        f = self.nodes[src]
        term = n.engine.vote.term
        if (f.engine.vote.term if f.alive else (f.d_vote.term if f.d_vote else 0)) != term or i <= log.base:
            return  # the follower has moved on to a later term: it may have truncated since
        d = f.d_log
        if not (d.hash_at(i) == log.hash_at(i) or i <= d.base
                or (f.d_snap is not None and idx(f.d_snap.meta.last_log_id) >= i)):
            self.inv.fail(f"leader {n.id} records node {src} as holding {m}, but node {src}'s disk does not "
                          f"hold it (durable log {d.purged}..{d.last})")

    def _c_update_replication(self, n: SimNode, cmd: C.UpdateReplication) -> None:
        targets = frozenset(cmd.targets)
        if cmd.term != n.repl_term:
            n.transfers = {}
        else:
            for t in list(n.transfers):
                if t not in targets:
                    del n.transfers[t]
        n.repl_term, n.repl_targets = cmd.term, targets

    def _c_replicate(self, n: SimNode, cmd: C.Replicate) -> None:
        if cmd.target not in n.repl_targets or cmd.term != n.repl_term:
            self.inv.fail(f"node {n.id}: {cmd} for a target outside UpdateReplication "
                          f"(term {n.repl_term}, targets {sorted(n.repl_targets)})")
        if self.read_delay_p and self.rng.random() < self.read_delay_p:
            # a replication worker reads the log a little later
            self._at(0.0 + (0.003 - 0.0) * self.rng.random(), self._replicate_read, n, n.inc, cmd)  # rng.uniform, inlined
        else:
            self._replicate_read(n, n.inc, cmd, now=True)

    def _replicate_read(self, n: SimNode, inc: int, cmd: C.Replicate, now: bool = False) -> None:
        if n.inc != inc or not n.alive or (not now and n.paused and self._held(n, self._replicate_read, n, inc, cmd)):
            return
        if not now and (cmd.term != n.repl_term or cmd.target not in n.repl_targets):
            return  # the worker was stopped
        log = n.log
        prev = cmd.prev_log_id
        pi = idx(prev)
        if pi < log.base:
            # the entries are purged: fall back to a snapshot
            n.engine.on_replication_failed(cmd.target)
            if not now:
                self.run_output(n)
            return
        if pi and log.term_at(pi) != prev.term:
            return  # the log changed under a stale leader: drop
        if cmd.end - 1 > log.last_index:
            return  # truncated meanwhile: drop
        a, b = pi - log.base, cmd.end - 1 - log.base
        entries = tuple(log.ents[a:b])
        if entries and entries[-1].log_id.term > cmd.term:
            return
        req = AppendEntriesRequest(cmd.term, n.id, prev, entries, cmd.leader_commit, cmd.seq)
        n.rounds.add((cmd.term, cmd.target, cmd.seq))
        self.send(n.id, cmd.target, req, None, False)

    def _c_send_snapshot(self, n: SimNode, cmd: C.SendSnapshot) -> None:
        if cmd.target not in n.repl_targets or cmd.term != n.repl_term:
            self.inv.fail(f"node {n.id}: {cmd} for a target outside UpdateReplication")
        s = n.d_snap
        if s is None:
            self.inv.fail(f"node {n.id}: SendSnapshot but no snapshot on disk")
        self.note(n.id, "SendSnapshot", f"->n{cmd.target} {s.meta.last_log_id}")
        self.tid += 1
        chunk = self.cfg.snapshot_chunk_size
        n.transfers[cmd.target] = [self.tid, cmd.term, s.meta, s.data, 0, 0, chunk]
        self._send_chunk(n, cmd.target)

    def _send_chunk(self, n: SimNode, target: int) -> None:
        tr = n.transfers[target]
        tid, term, meta, data, off, _, chunk = tr
        end = min(len(data), off + chunk)
        tr[5] = end
        req = InstallSnapshotRequest(term, n.id, meta, off, data[off:end], end == len(data))
        self.send(n.id, target, req, ("snap", tid, end), False)
        if not self.manual:
            self._at(self.cfg.rpc_timeout, self._snapshot_timeout, n, n.inc, target, tid, end)

    def _snapshot_progress(self, n: SimNode, src: int, msg: Any, ctx: Any) -> None:
        tr = n.transfers.get(src)
        if tr is None or tr[0] != ctx[1] or tr[5] != ctx[2] or not isinstance(msg, InstallSnapshotResponse):
            return
        if msg.term > tr[1]:
            del n.transfers[src]
            return
        if tr[5] == len(tr[3]):
            del n.transfers[src]
            if not msg.done:
                n.engine.on_replication_failed(src)
                self.run_output(n)
            return
        tr[4] = tr[5]
        self._send_chunk(n, src)

    def _snapshot_timeout(self, n: SimNode, inc: int, target: int, tid: int, end: int) -> None:
        if n.inc != inc or not n.alive or (n.paused and self._held(n, self._snapshot_timeout, n, inc, target, tid, end)):
            return
        tr = n.transfers.get(target)
        if tr is None or tr[0] != tid or tr[5] != end:
            return
        del n.transfers[target]
        self.note(n.id, "snapshot transfer timed out", f"->n{target}")
        n.engine.advance_clock(n.now())
        n.engine.on_replication_failed(target)
        self.run_output(n)

    def _c_send_vote(self, n: SimNode, cmd: C.SendVote) -> None:
        n.contact = None  # a candidate follows no leader
        for t in cmd.targets:
            self.send(n.id, t, cmd.request, None, False)

    def _c_timeout_now(self, n: SimNode, cmd: C.SendTimeoutNow) -> None:
        self.note(n.id, "TimeoutNow", f"->n{cmd.target}")
        t, last = self.nodes[cmd.target], n.log.last_index
        if DIRECT_CHECKS and t.alive and t.engine.vote.term <= cmd.request.term and last > n.log.base:
            d = t.d_log
            if not (d.hash_at(last) == n.log.hash_at(last) or last <= d.base
                    or (t.d_snap is not None and idx(t.d_snap.meta.last_log_id) >= last)):
                self.inv.fail(f"unsafe transfer: leader {n.id} sends TimeoutNow to node {t.id}, whose log "
                              f"({d.purged}..{d.last} on disk) lacks its last entry {n.log.last}")
        self.send(n.id, cmd.target, cmd.request, None, False)

    def _c_respond(self, n: SimNode, cmd: C.Respond) -> None:
        to, ctx, req = cmd.token
        m = cmd.message
        if not DIRECT_CHECKS:
            pass
        elif type(m) is AppendEntriesResponse:
            if m.success and m.term != req.term:
                # Figure 2's "currentTerm, for leader to update itself" is the term of the exchange: an
                # acknowledgement sent late (after a flush) still answers the request's leader
                self.inv.fail(f"node {n.id} acknowledges an AppendEntries of term {req.term} with term {m.term}")
            if m.success and m.matched is not None:
                i = m.matched.index
                if n.d_log.term_at(i) != m.matched.term and \
                        not (n.d_snap is not None and idx(n.d_snap.meta.last_log_id) >= i):
                    self.inv.fail(f"node {n.id} acknowledges {m.matched} to n{to} before it is on disk "
                                  f"(durable log {n.d_log.purged}..{n.d_log.last})")
        elif type(m) is VoteResponse:
            if m.granted and not m.pre_vote:
                if n.d_vote != Vote(m.term, to):
                    self.inv.fail(f"node {n.id} grants its vote in term {m.term} to n{to} "
                                  f"but its vote on disk is {n.d_vote}")
                self.grants.setdefault((m.term, to), set()).add(n.id)
            v = self._voting
            if m.granted and v is not None and v[0] == n.id and v[2] and not v[1].transfer and m.term > v[3]:
                self.inv.fail(f"leader lease ignored: node {n.id} grants a {'pre-' if m.pre_vote else ''}vote "
                              f"for term {m.term} to n{to} while it follows a live leader (CheckQuorum)")
        self.send(n.id, to, m, ctx, True)
        if type(m) is VoteResponse and m.granted and not m.pre_vote and self.phase == "fault" \
                and not self.manual and self.rng.random() < 0.15:
            # buggify: the voter loses power right after voting and is back within the same
            # election -- it must still remember whom it voted for
            self._at(self.rng.uniform(0.0, 0.001), self._crash_event, n.id, n.inc, "crash right after voting",
                     self.rng.uniform(0.001, 0.01))

    # ------------------------------------------------------------------ state machine commands

    def _c_apply(self, n: SimNode, cmd: C.Apply) -> None:
        self._sm_push(n, ("apply", cmd.upto))

    def _c_build_snapshot(self, n: SimNode, cmd: C.BuildSnapshot) -> None:
        self._sm_push(n, ("build",))

    def _c_receive_chunk(self, n: SimNode, cmd: C.ReceiveSnapshotChunk) -> None:
        r = cmd.request
        sid = r.meta.snapshot_id
        if r.offset == 0:
            n.recv = [sid, bytearray(r.data), True]
            return
        cur = n.recv
        if cur is None or cur[0] != sid:
            n.recv = [sid, bytearray(), False]
        elif r.offset == len(cur[1]):
            cur[1].extend(r.data)
        elif r.offset + len(r.data) <= len(cur[1]) and cur[1][r.offset:r.offset + len(r.data)] == r.data:
            pass  # a duplicate
        else:
            cur[2] = False  # a gap: this file is useless

    def _c_install_snapshot(self, n: SimNode, cmd: C.InstallSnapshot) -> None:
        r = n.recv
        meta = cmd.meta
        n.recv = None
        dec = decode_snapshot(bytes(r[1])) if r is not None and r[0] == meta.snapshot_id and r[2] else None
        if dec is None:
            self.note(n.id, "InstallSnapshot dropped: incomplete file", meta.last_log_id)
            return
        lid, h = dec
        if lid != meta.last_log_id:
            self.inv.fail(f"node {n.id}: received snapshot data for {lid}, but its meta says {meta.last_log_id}")
        self._sm_push(n, ("install", meta, h, bytes(r[1]), cmd.token))

    def _sm_delay(self) -> float:
        if self.manual:
            return 0.0
        lo, hi = self.sm_delay
        return lo + (hi - lo) * self.rng.random()  # rng.uniform(lo, hi), inlined

    def _sm_push(self, n: SimNode, task: tuple) -> None:
        n.smq.append(task)
        if not n.sm_busy:
            n.sm_busy = True
            self._at(self._sm_delay(), self._sm_run, n, n.inc)

    def _sm_run(self, n: SimNode, inc: int) -> None:
        if n.inc != inc or not n.alive or (n.paused and self._held(n, self._sm_run, n, inc)):
            return
        task = n.smq.popleft()
        e = n.engine
        e.advance_clock(self.t * n.rate)
        kind = task[0]
        if kind == "apply":
            upto = task[1]
            start = idx(n.sm_applied) + 1
            if upto.index >= start:
                h = n.sm_h
                log = n.log
                inv = self.inv
                for i in range(start, upto.index + 1):
                    ent = log.get(i)
                    if ent is None:
                        inv.fail(f"node {n.id}: Apply({upto}) but entry {i} is not in its log "
                                 f"({log.purged}..{log.last})")
                    h = chain(h, ent)
                    inv.on_apply(n.id, ent.log_id, h)
                    if n.writes:
                        self._ack_write(n, ent.log_id)
                    if ent.kind == MEMBERSHIP:
                        n.sm_membership = StoredMembership(ent.log_id, ent.payload)
                if ent.log_id != upto:
                    inv.fail(f"node {n.id}: Apply({upto}) but its log has {ent.log_id} there")
                n.sm_applied = upto
                n.sm_h = h
                e.on_applied(upto)
        elif kind == "build":
            if n.sm_applied is None:
                e.on_snapshot_built(None)
            else:
                self.tid += 1
                meta = SnapshotMeta(n.sm_applied, n.sm_membership, f"{n.id}.{self.tid}")
                data = encode_snapshot(n.sm_applied, n.sm_h, self.rng.randrange(0, 40))
                n.d_snap = Snap(meta, n.sm_h, data)
                self.note(n.id, "snapshot built", n.sm_applied)
                e.on_snapshot_built(meta)
        else:
            _, meta, h, data, token = task
            if idx(meta.last_log_id) < idx(n.sm_applied):
                self.inv.fail(f"node {n.id}: InstallSnapshot {meta.last_log_id} would take the state "
                              f"machine back from {n.sm_applied}")
            self.stats["snap_installs"] += 1
            self.note(n.id, "snapshot installed", meta.last_log_id)
            for i in [i for i in n.writes if i <= idx(meta.last_log_id)]:
                del n.writes[i]  # their fate is in the snapshot: the runtime fails them
            n.sm_applied, n.sm_h, n.sm_membership = meta.last_log_id, h, meta.last_membership
            n.d_snap = Snap(meta, h, data)
            self.inv.on_snapshot_state(n.id, meta.last_log_id, h)
            e.on_snapshot_installed(meta, token)
        self.run_output(n)
        if n.alive and n.inc == inc:
            if n.smq:
                self._at(self._sm_delay(), self._sm_run, n, inc)
            else:
                n.sm_busy = False

    # ------------------------------------------------------------------ client commands

    def _c_respond_read(self, n: SimNode, cmd: C.RespondRead) -> None:
        self.note(n.id, "RespondRead", cmd)
        self.inv.on_read_done(cmd.token, cmd.read_log_id, cmd.ok)
        if self.manual:
            self.reads_done[cmd.token] = cmd

    def propose(self, node_id: int, payloads: list) -> Any:
        """A client write: proposed on ``node_id``, acknowledged when that node (this incarnation)
        applies it at the log id it got.  Checks real-time order: a write proposed after another was
        acknowledged is ordered after it in the log (linearizability of writes)."""
        n = self.nodes[node_id]
        busy = n.alive and n.engine.transferee is not None
        r = self.call(node_id, lambda e: e.propose(payloads))
        if isinstance(r, list) and r:
            if busy:
                self.inv.fail(f"node {node_id} accepts proposals {r} while it transfers its leadership")
            for lid in r:
                n.writes[lid.index] = (lid, self.write_acked)
        return r

    def _ack_write(self, n: SimNode, lid: LogId) -> None:
        w = n.writes.pop(lid.index, None)
        if w is None or w[0] != lid:
            return  # not a write of this incarnation, or overwritten (the runtime fails those)
        if lid.index <= w[1]:
            self.inv.fail(f"linearizability: write {lid} on node {n.id} was proposed after the write at "
                          f"index {w[1]} was acknowledged, yet it is ordered before it")
        self.stats["writes_acked"] += 1
        if lid.index > self.write_acked:
            self.write_acked = lid.index

    def read_index(self, node_id: int) -> Any:
        """Start a ReadIndex on ``node_id``; returns the token (None if refused at once)."""
        self.read_token += 1
        token = ("read", self.read_token)
        self.inv.on_read_start(token, node_id)
        r = self.call(node_id, lambda e: e.read_index(token))
        if isinstance(r, RaftError) or r is not None or not self.nodes[node_id].alive:
            self.inv.reads.pop(token, None)
            return None
        return token

    _DISPATCH = {
        C.SaveVote: _c_save_vote,
        C.AppendToLog: _c_append,
        C.TruncateLog: _c_truncate,
        C.PurgeLog: _c_purge,
        C.SaveCommitted: _c_save_committed,
        C.Replicate: _c_replicate,
        C.SendSnapshot: _c_send_snapshot,
        C.SendVote: _c_send_vote,
        C.SendTimeoutNow: _c_timeout_now,
        C.Respond: _c_respond,
        C.UpdateReplication: _c_update_replication,
        C.Apply: _c_apply,
        C.BuildSnapshot: _c_build_snapshot,
        C.ReceiveSnapshotChunk: _c_receive_chunk,
        C.InstallSnapshot: _c_install_snapshot,
        C.RespondRead: _c_respond_read,
    }

    # ------------------------------------------------------------------ random activity

    def _tick(self, n: SimNode, inc: int) -> None:
        if n.inc != inc or not n.alive or (n.paused and self._held(n, self._tick, n, inc)):
            return
        n.engine.tick(self.t * n.rate)  # (n.now(), inlined: a tick is a third of all events)
        self.run_output(n)
        if n.alive:
            # self._at(self.rng.uniform(0.005, 0.03), ...), inlined (the same arithmetic as uniform())
            heapq.heappush(self.q, (self.t + (0.005 + (0.03 - 0.005) * self.rng.random()), next(self._seq),
                                    self._tick, (n, inc)))

    def leaders(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive and n.engine.state is LEADER]

    def _client(self) -> None:
        rng = self.rng
        self._at(0.002 + (0.04 - 0.002) * rng.random(), self._client)  # rng.uniform(0.002, 0.04), inlined
        alive = [n for n in self.nodes.values() if n.alive]
        if not alive:
            return
        leaders = [n for n in alive if n.engine.state is LEADER]
        n = rng.choice(leaders) if leaders and rng.random() < 0.9 else rng.choice(alive)
        e = n.engine
        r = rng.random()
        if r < 0.55:
            k = rng.randint(1, 3)
            payloads = list(range(self.payload + 1, self.payload + k + 1))
            self.payload += k
            self.propose(n.id, payloads)
        elif r < 0.65:
            tok = self.read_index(n.id)
            self.note(n.id, "read_index", tok)
        elif r < 0.70:
            self.note(n.id, "trigger_snapshot")
            self.call(n.id, lambda e: e.trigger_snapshot())
        elif r < 0.74:
            upto = rng.randint(0, idx(e.applied))
            self.note(n.id, "trigger_purge", upto)
            self.call(n.id, lambda e: e.trigger_purge(upto))
        elif r < 0.79:
            m = e.membership.membership if e.membership else None
            if m is None:
                return
            cands = [i for i in self.nodes if i not in m.nodes]
            if cands:
                i = rng.choice(cands)
                res = self.call(n.id, lambda e: e.add_learner(i, addr(i)))
                if self.nodes[i].decommissioned and isinstance(res, LogId):
                    self.nodes[i].decommissioned = False   # the operator starts it to add it
                    self.restart(i)
                self.note(n.id, f"add_learner({i})", res)
        elif r < 0.85:
            m = e.membership.membership if e.membership else None
            if m is None:
                return
            pool = sorted(m.nodes)
            size = min(len(pool), rng.choice([1, 2, 3, 3, 3, 4, 5, 5]))
            voters = sorted(rng.sample(pool, size))
            retain = rng.random() < 0.5
            res = self.call(n.id, lambda e: e.change_membership(voters, retain))
            self.note(n.id, f"change_membership({voters}, retain={retain})", res)
            if isinstance(res, LogId):
                self.stats["joint"] += 1
                if self.phase == "fault" and rng.random() < 0.3:
                    # keep the joint phase open: lose (or stop) the leader before it commits the change
                    if rng.random() < 0.5:
                        self._at(rng.uniform(0.0, 0.03), self._depose, n.id, n.inc)
                    else:
                        self.pause(n.id, "pause the leader of a joint phase")
        elif r < 0.89:
            m = e.membership.membership if e.membership else None
            if m is None:
                return
            target = rng.choice(sorted(m.voter_ids))
            res = self.call(n.id, lambda e: e.transfer_leader(target))
            self.note(n.id, f"transfer_leader({target})", res)
        elif r < 0.91:
            self.note(n.id, "trigger_elect")
            self.call(n.id, lambda e: e.trigger_elect())
        else:
            self.call(n.id, lambda e: e.trigger_heartbeat())

    def _fault(self) -> None:
        rng = self.rng
        self._at(rng.uniform(0.05, 0.4), self._fault)
        if self.phase != "fault":
            return
        ids = list(self.nodes)
        r = rng.random()
        leaders = self.leaders()
        if leaders and rng.random() < 0.3:
            # Depose a leader while it may hold uncommitted entries: the
            # histories of the paper's Figure 8 need these.
            x = rng.choice(leaders).id
            what = rng.random()
            if what < 0.3:
                self.crash(x, "crash the leader")
            elif what < 0.55:
                self.blocked |= {(x, y) for y in ids} | {(y, x) for y in ids}
                self.note("*", "isolate the leader", x)
            elif what < 0.75:
                # a stopped process: it wakes up believing it still leads, with work queued up
                self.pause(x, "pause the leader")
            else:
                others = [i for i in ids if i != x]
                a = {x} | set(rng.sample(others, rng.randint(0, max(0, (len(ids) - 1) // 2))))
                self.blocked = {(p, q) for p in ids for q in ids if (p in a) != (q in a)}
                self.note("*", "partition, leader in minority", f"{sorted(a)} | {sorted(set(ids) - a)}")
            return
        if r < 0.25:
            alive = [i for i in ids if self.nodes[i].alive]
            if alive:
                self.crash(rng.choice(alive))
        elif r < 0.37:
            a = set(rng.sample(ids, rng.randint(1, max(1, len(ids) // 2))))
            self.blocked = {(x, y) for x in ids for y in ids if (x in a) != (y in a)}
            self.note("*", "partition", f"{sorted(a)} | {sorted(set(ids) - a)}")
        elif r < 0.45:
            x, y = rng.sample(ids, 2) if len(ids) > 1 else (ids[0], ids[0])
            self.blocked.add((x, y))
            self.note("*", "one-way block", f"{x}->{y}")
        elif r < 0.51:
            x = rng.choice(ids)
            self.blocked |= {(x, y) for y in ids} | {(y, x) for y in ids}
            self.note("*", "isolate", x)
        elif r < 0.61:
            self.blocked = set()
            self.note("*", "network healed")
        elif r < 0.69:
            self.loss = rng.choice([0.0, 0.0, 0.02, 0.1, 0.3])
            self.dup = rng.choice([0.0, 0.0, 0.02, 0.1])
            self.note("*", "loss/dup", (self.loss, self.dup))
        elif r < 0.75:
            self.delay = rng.choice([(0.0005, 0.005), (0.001, 0.03), (0.001, 0.12)])
            self.note("*", "delay", self.delay)
        elif r < 0.81:
            self.pause(rng.choice(ids))
        elif r < 0.88:
            # a disk that stalls for longer than an election timeout (fsync behind a busy device)
            for x in rng.sample(ids, min(len(ids), rng.choice([1, 1, 2]))):
                n = self.nodes[x]
                n.stall_until = max(n.stall_until, self.t + rng.uniform(0.2, 1.0))
                self.stats["stalls"] += 1
                self.note(x, "disk stalls until", f"{n.stall_until:.4f}")
        elif r < 0.93:
            self.ghost = rng.choice([0.0, 0.01, 0.03, 0.1])
            self.note("*", "messages outliving elections", self.ghost)
        else:
            self.p_mid_crash = rng.choice([0.0, 0.002, 0.01, 0.03])

    def _heal(self) -> None:
        """End a fault phase: heal everything; a leader must commit a fresh entry soon."""
        self.phase = "heal"
        self.blocked = set()
        self.loss = self.dup = self.ghost = 0.0  # (ghosts already on their way still arrive)
        self.delay = (0.0005, 0.005)
        self.p_mid_crash = 0.0
        for n in self.nodes.values():
            n.stall_until = 0.0
            self._resume(n.id, n.inc)
        self.probes = {}
        self.heal_deadline = self.t + 10 * self.cfg.election_timeout[1]
        self.note("*", "HEAL", f"liveness deadline {self.heal_deadline:.4f}")
        members = self._members() if not self.cfg.pre_vote else set(self.nodes)
        for n in self.nodes.values():
            n.decommissioned = n.id not in members
            if n.decommissioned:
                # Without PreVote, servers removed from the cluster can disrupt elections for
                # ever (Raft thesis 4.2.3: the leader lease helps only while there is a leader):
                # like an operator, shut them down; one is started again when it is re-added.
                if n.alive:
                    self.crash(n.id, "decommission (removed, no PreVote)")
            elif not n.alive:
                self._boot(n)
        for i in self.init_ids:
            n = self.nodes[i]
            if n.alive and n.engine.is_pristine():
                # its initialize() never reached the disk: the operator retries it
                self.note(i, "initialize again")
                self.call(i, lambda e: e.initialize(self.init_nodes))
        self._probe()

    def _members(self) -> set[int]:
        """Who may still be needed: the most up-to-date node, and every node of every configuration
        it knows (the committed one and the uncommitted ones after it)."""
        best = max(self.nodes.values(),
                   key=lambda n: (n.engine.log.last if n.alive else n.d_log.last) or LogId(-1, -1))
        out = {best.id}
        if best.alive:
            mems = [m.membership for m in best.engine.memberships]
        else:  # from its disk (over-inclusive: every configuration it holds)
            mems = [e.payload for e in best.d_log.ents if e.kind == EntryKind.MEMBERSHIP]
            if best.d_snap is not None and best.d_snap.meta.last_membership is not None:
                mems.append(best.d_snap.meta.last_membership.membership)
        if not mems:
            return set(self.nodes)
        for m in mems:
            out |= set(m.nodes)
        return out

    def _probe(self) -> None:
        if self.phase != "heal":
            return
        inv = self.inv
        for (nid, term), lid in self.probes.items():
            if inv.committed.get(lid.index, 0) == inv.entries.get((lid.index, lid.term)):
                self.phase = "fault"
                self.recoveries += 1
                self.note("*", "RECOVERED", f"probe {lid} committed")
                self._at(self.rng.uniform(1.0, 3.0), self._heal)
                return
        if self.t > self.heal_deadline:
            raise LivenessFailure(
                f"liveness: {10 * self.cfg.election_timeout[1]:.2f}s after the faults healed, no leader "
                f"committed a fresh entry (probes: {self.probes})")
        for n in self.leaders():
            e = n.engine
            key = (n.id, e.vote.term)
            if key not in self.probes and e.transferee is None:
                self.payload += 1
                p = self.payload
                r = self.call(n.id, lambda e: e.propose([-p]))  # a negative payload marks a probe
                if isinstance(r, list):
                    self.probes[key] = r[0]
                    self.note(n.id, "liveness probe", r[0])
        self._at(0.01, self._probe)

    # ------------------------------------------------------------------ manual-mode helpers (scenario tests)

    def engine(self, node_id: int) -> Engine:
        return self.nodes[node_id].engine

    def stabilize(self, max_events: int = 100_000) -> None:
        """Process every pending event (manual mode: messages, flushes, state-machine work)."""
        q = self.q
        for _ in range(max_events):
            if not q:
                return
            t, _, fn, args = heapq.heappop(q)
            self.t = max(self.t, t)
            fn(*args)
        raise AssertionError("the cluster did not stabilize")

    def advance(self, dt: float, step: float = 0.01, only: set[int] | None = None) -> None:
        """Move time forward by ``dt``, ticking every live node every ``step`` and stabilizing."""
        end = self.t + dt
        while self.t < end - 1e-12:
            self.t = min(end, self.t + step)
            for n in self.nodes.values():
                if n.alive and (only is None or n.id in only):
                    n.engine.tick(n.now())
                    self.run_output(n)
            self.stabilize()

    def skip(self, dt: float) -> None:
        """Move time forward without ticking anyone (leases and timers expire; nothing fires yet)."""
        self.t += dt

    def load_disk(self, node_id: int, entries: list, vote: Vote | None = None,
                  committed: LogId | None = None) -> None:
        """Replace a node's disk with a log of ``entries`` and restart it (scenario set-up)."""
        n = self.nodes[node_id]
        if n.alive:
            self.crash(node_id, "crash (load_disk)")
        d = SimLog()
        for e in entries:
            d.append(e)
        n.d_log, n.d_vote, n.d_committed, n.d_snap = d, vote, committed, None
        self._boot(n)

    def isolate(self, node_id: int) -> None:
        ids = list(self.nodes)
        self.blocked |= {(node_id, y) for y in ids} | {(y, node_id) for y in ids}

    def heal(self) -> None:
        self.blocked = set()

    def leader(self) -> int | None:
        """The id of the leader of the highest term among live leaders."""
        ls = self.leaders()
        if not ls:
            return None
        return max(ls, key=lambda n: n.engine.vote.term).id


# --------------------------------------------------------------------------- seeds


def replay_command(seed: int, steps: int) -> str:
    return f"python -m pytest tests/test_simulation.py --sim-seed {seed} --sim-steps {steps} -x"


def run_seeds(args: tuple[list[int], int]) -> tuple[list[dict], dict]:
    """Run several seeds (in a worker process): the failures, and the summed statistics."""
    seeds, steps = args
    failures, stats = [], {}
    for s in seeds:
        r = run_seed(s, steps)
        if r["ok"]:
            for k, v in r["stats"].items():
                stats[k] = stats.get(k, 0) + v
        else:
            failures.append(r)
    return failures, stats


def run_seed(seed: int, steps: int, trace_lines: int = 30) -> dict:
    """Run one seed; returns {'seed', 'ok', 'report', 'stats'}.  Never raises for a failing seed."""
    sim = None
    try:
        sim = Sim(seed)
        sim.run(steps)
        return {"seed": seed, "ok": True, "report": "", "stats": dict(sim.stats, t=sim.t, recoveries=sim.recoveries)}
    except Exception as err:  # noqa: BLE001 - every failure is reported with its seed
        import traceback
        kind = type(err).__name__
        tb = traceback.format_exc(limit=-6)
        lines = [f"SIMULATION FAILURE: seed {seed}, step {sim.steps if sim else 0}, "
                 f"t={sim.t if sim else 0:.5f}s"]
        if sim is not None:
            lines.append(f"  cluster: {sim.shape}")
        lines.append(f"  {kind}: {err}")
        lines.append(f"  replay: {replay_command(seed, steps)}")
        if sim is not None:
            lines.append("  nodes:")
            lines.append(sim.describe())
            lines.append(f"  last {trace_lines} events:")
            lines.append(sim.format_trace(trace_lines))
        if not isinstance(err, (InvariantViolation, LivenessFailure)):
            lines.append(tb)
        return {"seed": seed, "ok": False, "report": "\n".join(lines), "kind": kind, "error": str(err)}
