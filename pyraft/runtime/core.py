"""RaftCore: the one thread that owns the engine and every write to the log store.

Each loop turn drains the inbox (API calls, incoming RPCs, notifications from
the other threads), feeds the engine, and executes its commands.  The
storage commands of a turn go to the log store as one ``write`` (group
commit: one transaction, one fsync), which returns only when they are
durable; only then does the engine hear ``on_log_flushed`` and only then are
the network commands of that turn executed.  Ticks come from the inbox's
``get`` timeout: there is no timer thread.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from concurrent.futures import Future
from typing import Any

from ..config import Config
from ..engine.commands import (AppendToLog, Apply, BuildSnapshot, InstallSnapshot, PurgeLog,
                               ReceiveSnapshotChunk, Replicate, Respond, RespondRead, SendSnapshot,
                               SendTimeoutNow, SendVote, STORAGE_COMMANDS, TruncateLog,
                               UpdateReplication)
from ..engine.core import Engine, RestoredState
from ..errors import Fatal, ForwardToLeader, RaftError, ShutDown
from ..metrics import RaftMetrics
from ..types import EntryKind, LogId, ServerState, StoredMembership, log_index
from .workers import ReplicationWorker, SMWorker, VoteSender

log = logging.getLogger("pyraft.runtime")

_MAX_DRAIN = 8192
_LOG_CHANGES = (AppendToLog, TruncateLog, PurgeLog)


class _Stop(Exception):
    pass


def restore_state(log_store: Any, state_machine: Any) -> RestoredState:
    """Read what the stores hold into the engine's start-up state."""
    ls = log_store.log_state()
    applied, sm_membership = state_machine.applied_state()
    memberships: list[StoredMembership] = [sm_membership] if sm_membership is not None else []
    start = max(log_index(applied), log_index(ls.last_purged)) + 1
    last = log_index(ls.last_log_id)
    while start <= last:
        chunk = log_store.read(start, min(last + 1, start + 4096))
        if not chunk:
            break
        for e in chunk:
            if e.kind == EntryKind.MEMBERSHIP:
                memberships.append(StoredMembership(e.log_id, e.payload))
        start = chunk[-1].index + 1

    def term_at(i: int) -> int | None:
        r = log_store.read(i, i + 1)
        return r[0].log_id.term if r else None

    return RestoredState(vote=log_store.read_vote(), last_purged=ls.last_purged, last_log_id=ls.last_log_id,
                         committed=log_store.read_committed(), applied=applied,
                         snapshot=state_machine.current_snapshot(), memberships=memberships, term_at=term_at)


class RaftCore(threading.Thread):
    def __init__(self, node_id: int, config: Config, transport: Any, log_store: Any, state_machine: Any,
                 rng: Any = None) -> None:
        super().__init__(name=f"pyraft-core-{node_id}", daemon=True)
        self.node_id = node_id
        self.config = config
        self.transport = transport
        self.log_store = log_store
        self.state_machine = state_machine
        self.inbox: queue.Queue = queue.Queue()
        self.engine = Engine(node_id, config, rng or random.Random(), time.monotonic(),
                             restore_state(log_store, state_machine))
        # guarded by _post_lock: once closed, nothing more enters the inbox
        self._post_lock = threading.Lock()
        self._closed = False
        self.fatal: str | None = None
        self.shut_down = False
        # client futures, owned by this thread until handed to the SM worker with an Apply
        self._pending_writes: dict[int, tuple[LogId, Future]] = {}
        self._read_waiters: list[tuple[int, LogId, Future]] = []
        self._applied = self.engine.applied
        self.workers: dict[int, ReplicationWorker] = {}
        self.sm_worker = SMWorker(self)
        self.sender = VoteSender(self)
        # metrics: published after every turn; the condition wakes waiters
        self.cond = threading.Condition()
        self.metrics: RaftMetrics = self._build_metrics()

    # ------------------------------------------------------------------ posting

    def post(self, item: tuple) -> None:
        """Put an item on the inbox; silently dropped once the core has stopped."""
        with self._post_lock:
            if not self._closed:
                self.inbox.put(item)

    def call(self, item: tuple) -> None:
        """Like post, but raise ShutDown/Fatal when the core no longer runs."""
        with self._post_lock:
            if self._closed:
                raise self.stopped_error()
            self.inbox.put(item)

    def stopped_error(self) -> RaftError:
        if self.fatal is not None:
            return Fatal(f"node {self.node_id} stopped: {self.fatal}")
        return ShutDown(f"node {self.node_id} has been shut down")

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        try:
            self.sm_worker.start()
            self.sender.start()
            self._run_engine()
            self._publish()
            self._loop()
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - any failure stops the node visibly
            self._go_fatal(f"{type(e).__name__}: {e}", exc=e)
        finally:
            self._teardown()

    def _loop(self) -> None:
        eng = self.engine
        tick = min(self.config.heartbeat_interval, self.config.election_timeout[0]) / 4
        next_tick = time.monotonic() + tick
        get, get_nowait = self.inbox.get, self.inbox.get_nowait
        while True:
            try:
                items = [get(timeout=max(0.0, next_tick - time.monotonic()))]
            except queue.Empty:
                items = []
            try:
                while len(items) < _MAX_DRAIN:
                    items.append(get_nowait())
            except queue.Empty:
                pass
            eng.advance_clock(time.monotonic())
            stop = False
            writes: list = []
            max_batch = self.config.max_proposal_batch
            for it in items:
                kind = it[0]
                if kind == "write":
                    writes.append(it)
                    if len(writes) < max_batch:
                        continue
                if writes:
                    self._propose(writes)
                    writes = []
                if kind == "write":
                    continue
                if kind == "stop":
                    stop = True
                else:
                    self._handle(it)
            if writes:
                self._propose(writes)
            # Timers fire after the messages that arrived up to now are handled:
            # a long turn must not make a follower time out on heartbeats
            # that are already in its inbox.
            now = time.monotonic()
            eng.tick(now)
            if now >= next_tick:
                next_tick = now + tick
            self._run_engine()
            self._publish()
            if stop:
                raise _Stop()

    def _handle(self, it: tuple) -> None:
        kind = it[0]
        eng = self.engine
        if kind == "resp":
            eng.step(it[1], it[2])
        elif kind == "rpc":
            _, from_id, msg, reply = it
            try:
                eng.step(from_id, msg, reply)
            except ValueError as e:
                log.warning("node %s: dropped an invalid %s from %s: %s", self.node_id,
                            type(msg).__name__, from_id, e)
        elif kind == "applied":
            self._applied = it[1]
            eng.on_applied(it[1])
            self._release_reads()
        elif kind == "api":
            fn, fut = it[1], it[2]
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(eng))
                except RaftError as e:
                    fut.set_exception(e)
        elif kind == "read":
            fut = it[1]
            try:
                eng.read_index(fut)
            except RaftError as e:
                fut.set_exception(e)
        elif kind == "repl_failed":
            eng.on_replication_failed(it[1])
        elif kind == "snapshot_built":
            eng.on_snapshot_built(it[1])
        elif kind == "snapshot_installed":
            self._applied = it[1].last_log_id
            eng.on_snapshot_installed(it[1], it[2])
            self._release_reads()
        elif kind == "fatal":
            raise RuntimeError(it[1])
        else:
            raise RuntimeError(f"unknown inbox item {kind!r}")

    def _propose(self, writes: list) -> None:
        try:
            log_ids = self.engine.propose([w[1] for w in writes])
        except RaftError as e:
            for w in writes:
                w[2].set_exception(e)
            return
        pending = self._pending_writes
        for lid, w in zip(log_ids, writes):
            old = pending.get(lid.index)
            if old is not None:
                old[1].set_exception(ForwardToLeader(None, None, f"write {old[0]} was overwritten"))
            pending[lid.index] = (lid, w[2])

    def _run_engine(self) -> None:
        eng = self.engine
        while True:
            cmds = eng.take_output()
            if not cmds:
                return
            self._execute(cmds)

    def _execute(self, cmds: list) -> None:
        """Execute one output: its storage commands first, as one durable batch, then the rest in order."""
        storage = [c for c in cmds if isinstance(c, STORAGE_COMMANDS)]
        if storage:
            self.log_store.write(storage)
            if any(isinstance(c, _LOG_CHANGES) for c in storage):
                self.engine.on_log_flushed(self.engine.log.last)
        for c in cmds:
            t = type(c)
            if t is Replicate or t is SendSnapshot:
                w = self.workers.get(c.target)
                if w is not None:
                    w.submit(c)
            elif t is Respond:
                c.token.reply(c.message)
            elif t is Apply:
                self._submit_apply(c)
            elif t is SendVote:
                nodes = self.engine.membership.membership.nodes
                for target in c.targets:
                    if target in nodes:
                        self.sender.send(target, nodes[target], c.request)
            elif t is SendTimeoutNow:
                node = self.engine.membership.membership.nodes.get(c.target)
                if node is not None:
                    self.sender.send(c.target, node, c.request)
            elif t is UpdateReplication:
                self._update_workers(c)
            elif t is RespondRead:
                self._on_read_ready(c)
            elif t is BuildSnapshot:
                self.sm_worker.q.put(("build",))
            elif t is ReceiveSnapshotChunk:
                self.sm_worker.q.put(("chunk", c.request))
            elif t is InstallSnapshot:
                self.sm_worker.q.put(("install", c.meta, c.token))

    def _submit_apply(self, c: Apply) -> None:
        futures: dict[int, tuple[LogId, Future]] = {}
        pending = self._pending_writes
        if pending:
            for idx in [i for i in pending if i <= c.upto.index]:
                futures[idx] = pending.pop(idx)
        self.sm_worker.q.put(("apply", c.upto, futures))

    def _update_workers(self, c: UpdateReplication) -> None:
        for target, w in list(self.workers.items()):
            if target not in c.targets or w.node != c.targets[target] or w.term != c.term:
                w.stop()
                del self.workers[target]
        for target, node in c.targets.items():
            if target not in self.workers:
                w = ReplicationWorker(self, target, node, c.term)
                self.workers[target] = w
                w.start()

    def _on_read_ready(self, c: RespondRead) -> None:
        fut: Future = c.token
        if not c.ok:
            m = self.engine.membership
            node = m.membership.nodes.get(c.leader_id) if (m and c.leader_id is not None) else None
            fut.set_exception(ForwardToLeader(c.leader_id, node))
            return
        if log_index(self._applied) >= c.read_log_id.index:
            fut.set_result(c.read_log_id)
        else:
            self._read_waiters.append((c.read_log_id.index, c.read_log_id, fut))

    def _release_reads(self) -> None:
        if not self._read_waiters:
            return
        applied = log_index(self._applied)
        keep = []
        for idx, lid, fut in self._read_waiters:
            if idx <= applied:
                fut.set_result(lid)
            else:
                keep.append((idx, lid, fut))
        self._read_waiters = keep

    # ------------------------------------------------------------------ metrics

    def _build_metrics(self, state: ServerState | None = None) -> RaftMetrics:
        e = self.engine
        m = e.membership
        snap = e.snapshot
        counters = getattr(self.transport, "stats", None)
        return RaftMetrics(
            id=self.node_id,
            state=state or e.state,
            current_term=e.vote.term,
            vote=e.vote,
            last_log_index=e.log.last_index,
            committed=e.committed,
            last_applied=self._applied,
            snapshot=snap.last_log_id if snap else None,
            purged=e.log.purged,
            current_leader=e.leader_id,
            membership=m.membership if m else None,
            membership_log_id=m.log_id if m else None,
            replication=e.replication() if e.state == ServerState.LEADER else {},
            error=self.fatal,
            counters=dict(counters) if isinstance(counters, dict) else {},
        )

    def _publish(self, state: ServerState | None = None) -> None:
        m = self._build_metrics(state)
        old = self.metrics
        if (m.state, m.current_term, m.current_leader) != (old.state, old.current_term, old.current_leader):
            log.info("node %s: %s in term %s, leader %s", self.node_id, m.state, m.current_term, m.current_leader)
        with self.cond:
            self.metrics = m
            self.cond.notify_all()

    # ------------------------------------------------------------------ stopping

    def _go_fatal(self, reason: str, exc: BaseException | None = None) -> None:
        self.fatal = reason
        log.error("node %s stopped as Fatal: %s", self.node_id, reason, exc_info=exc)

    def _teardown(self) -> None:
        with self._post_lock:
            self._closed = True
        err = self.stopped_error()
        for w in self.workers.values():
            w.stop()
        self.sm_worker.stop()
        self.sender.stop()
        try:
            self.transport.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the transport failed")
        for w in list(self.workers.values()) + [self.sm_worker, self.sender]:
            if w.is_alive():
                w.join()
        # Everything still waiting gets the reason (what was durable stays durable).
        for lid, fut in self._pending_writes.values():
            _fail(fut, err)
        self._pending_writes.clear()
        for _i, _l, fut in self._read_waiters:
            _fail(fut, err)
        while True:
            try:
                it = self.inbox.get_nowait()
            except queue.Empty:
                break
            if it[0] in ("write", "api"):
                _fail(it[2], err)
            elif it[0] == "read":
                _fail(it[1], err)
        self._publish(ServerState.FATAL if self.fatal is not None else ServerState.SHUTDOWN)


def _fail(fut: Future, err: BaseException) -> None:
    if not fut.done():
        try:
            fut.set_exception(err)
        except Exception:  # noqa: BLE001 - a racing completion is fine
            pass
