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

import contextlib
import itertools
import logging
import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, cast

from ..config import Config
from ..engine.commands import (AppendToLog, Apply, BuildSnapshot, InstallSnapshot, PurgeLog,
                               ReceiveSnapshotChunk, Replicate, Respond, RespondRead, SaveCommitted,
                               SendSnapshot, SendTimeoutNow, SendVote, STORAGE_COMMANDS, TruncateLog,
                               UpdateReplication)
from ..engine.core import Engine, RestoredState
from ..errors import Fatal, ForwardToLeader, Overloaded, RaftError, ShutDown, StorageError
from ..messages import InstallSnapshotResponse
from ..metrics import RaftMetrics
from ..network import Transport
from ..storage import LogStore, StateMachine
from ..codec import encode_entries, normal_entry_prefix
from ..types import EntryKind, LogId, ServerState, StoredMembership, log_index
from .cache import EntryCache
from .futures import fail, succeed
from .inbox import Inbox, Lane
from .workers import ReplicationWorker, SMWorker, VoteSender, rate_limited

log = logging.getLogger("pyraft.runtime")

_MAX_DRAIN = 8192
_LOG_CHANGES = (AppendToLog, TruncateLog, PurgeLog)
_SNAPSHOT_COMMANDS = (BuildSnapshot, ReceiveSnapshotChunk, InstallSnapshot, SendSnapshot)


class _Stop(Exception):
    pass


def restore_state(log_store: Any, state_machine: Any) -> RestoredState:
    """Read what the stores hold into the engine's start-up state."""
    ls = log_store.log_state()
    applied, sm_membership = state_machine.applied_state()
    if log_index(applied) < log_index(ls.last_purged):
        # The entries in between are neither in the log nor in the state machine: applying
        # on would skip them.  (A state machine that does not fsync what it applies must be
        # durable up to every snapshot before the log is purged to it: see KVStateMachine.)
        raise StorageError(f"the state machine has applied up to index {log_index(applied)} but the log is "
                           f"purged up to {ls.last_purged}: entries {log_index(applied) + 1}.."
                           f"{log_index(ls.last_purged)} are lost on this node; wipe its data directory "
                           f"and let it catch up from the cluster")
    # A state machine applies committed entries only, which the log holds (or, purged, a snapshot
    # covers): applied past both, or at an index where the log holds another term, is not this
    # node's history (files changed, or copied from another node).  Taken as true, it would make
    # the node skip the cluster's writes and, elected, overwrite them everywhere.
    snap = state_machine.current_snapshot()
    ai = log_index(applied)
    if ai > log_index(ls.last_log_id) and ai > log_index(snap.last_log_id if snap is not None else None):
        raise StorageError(f"the state machine has applied up to {applied}, past the log's last entry "
                           f"{ls.last_log_id} and its snapshot: its files were changed or come from another "
                           f"node; wipe this node's data directory and let it catch up from the cluster")
    from_snapshot = snap is not None and snap.last_log_id == applied
    # (A snapshot installed just before a crash is applied before the log drops the entries it
    # replaces, which may be another term's at its index: the snapshot is the truth then.)
    if applied is not None and not from_snapshot and log_index(ls.last_purged) < ai <= log_index(ls.last_log_id):
        held = log_store.read(ai, ai + 1)
        if held and held[0].log_id != applied:
            raise StorageError(f"the state machine has applied {applied}, but the log holds {held[0].log_id} "
                               f"at that index: its files were changed or come from another node; wipe this "
                               f"node's data directory and let it catch up from the cluster")
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


def _encoded(c: AppendToLog) -> list[bytes]:
    assert c.encoded is not None, "RaftCore encodes every AppendToLog before it writes or caches it"
    return c.encoded


class RaftCore(threading.Thread):
    def __init__(self, node_id: int, config: Config, transport: Transport, log_store: LogStore,
                 state_machine: StateMachine, rng: random.Random | None = None) -> None:
        super().__init__(name=f"pyraft-core-{node_id}", daemon=True)
        self.node_id = node_id
        self.config = config
        self.transport = transport
        self.log_store = log_store
        self.state_machine = state_machine
        #: ``with core.replies_held():`` around completing many client futures in a row: their
        #: replies leave together (ZmqTransport.replies_held), when the transport offers it
        self.replies_held = getattr(transport, "replies_held", None) or contextlib.nullcontext
        self.inbox = Inbox()
        # What peers can put in the inbox is bounded (inbox.py): their requests, and
        # the replies to this node's requests, each in its own lane so that a flood
        # of one cannot crowd out the other.
        self.rpc_lane = Lane(config.max_queued_rpcs)
        self.reply_lane = Lane(config.max_queued_rpcs)
        # Client writes in flight, for Config.max_pending_writes, counted without a lock
        # on the client's path.  ``writes_accepted`` is the last ticket that
        # Raft.client_write_async drew from ``write_tickets`` (next() is atomic; racing
        # callers may store theirs out of order, which undercounts by at most their
        # number until the next write).  ``writes_released`` (this thread only) and
        # ``writes_released_sm`` (the SM worker only) count the writes whose future left
        # this node's hands: completed, failed or overwritten.  One writer each: no
        # count is ever lost, so the difference cannot drift.
        self.write_tickets = itertools.count(1)
        self.writes_accepted = 0
        self.writes_released = 0
        self.writes_released_sm = 0
        # Bytes of the large writes in flight (Config.max_pending_write_bytes): few, so a
        # lock and a done-callback per write cost nothing that matters (hold_write_bytes).
        self._write_bytes_lock = threading.Lock()
        self.write_bytes = 0
        # RaftCore's own metrics counters, bumped from any thread (refusals, overload,
        # connection failures), and each replication worker's connection error while it
        # has one (target -> (worker, error)); both guarded by _counters_lock.
        self._counters_lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._repl_errors: dict[int, tuple[ReplicationWorker, str]] = {}
        #: the newest entries (written, or being written) with their encodings, for the workers (cache.py)
        self.cache = EntryCache()
        #: entry tuples of this turn's AppendEntries that carry their encodings (codec.EncodedEntries)
        self._enc_hints: list = []
        #: this turn's proposals: index of the first -> (its LogIds, the payloads as the clients packed them)
        self._packed_runs: dict[int, tuple[list[LogId], list[bytes]]] = {}
        self.engine = Engine(node_id, config, rng or random.Random(), time.monotonic(),
                             restore_state(log_store, state_machine))
        # _closed: set (under _post_lock) when the core stops; post/call read it without the lock
        self._post_lock = threading.Lock()
        self._closed = False
        self.fatal: str | None = None
        self.shut_down = False
        # client futures, owned by this thread until handed to the SM worker with an Apply
        self._pending_writes: dict[int, tuple[LogId, Future]] = {}
        self._pending_top = 0  # the highest index ever put in _pending_writes
        #: a SaveCommitted not written yet: it goes with the next write (see _execute)
        self._deferred_commit: SaveCommitted | None = None
        #: the highest index handed to the SM worker in an Apply (pending writes at or below it are gone)
        self._apply_sent = log_index(self.engine.applied)
        #: this turn's newest Apply, handed to the SM worker as the turn's last act (see _flush_apply)
        self._apply_due: Apply | None = None
        self._read_waiters: list[tuple[int, LogId, Future]] = []
        #: API results of this turn, delivered after its writes are durable
        self._api_done: list[tuple[Future, Any]] = []
        #: inbox items a failing turn did not get to (failed by _teardown)
        self._leftover: list = []
        self._applied = self.engine.applied
        #: the engine's read lease (Engine.read_lease), published before each batch of its output is
        #: carried out: a step-down or a transfer's TimeoutNow never leaves before the lease is gone.
        #: Read by any thread (lease_read); None without Config.lease_reads.
        self.read_lease: tuple[float, int] | None = None
        self._lease_reads = config.lease_reads
        #: reads served by the lease (the "lease_reads" counter), from tickets as writes_accepted is
        self._lease_read_tickets = itertools.count(1)
        self.lease_reads_served = 0
        self.workers: dict[int, ReplicationWorker] = {}
        #: workers told to stop that may still be finishing (a snapshot chunk in flight)
        self._stopped_workers: list[ReplicationWorker] = []
        self.sm_worker = SMWorker(self)
        self.sender = VoteSender(self)
        #: the engine's election and removal news already logged (see _log_engine_news)
        self._campaign_logged = self.engine.last_campaign
        self._removed_logged = False
        self._listed_once = False  # a membership this node knew listed it (see _publish)
        # metrics: published after every turn; the condition wakes waiters
        self.cond = threading.Condition()
        #: threads in raft.wait() (guarded by cond): they want the applied index as it moves
        self.metrics_waiters = 0
        self._published: RaftMetrics = self._build_metrics()

    @property
    def metrics(self) -> RaftMetrics:
        """The metrics published after RaftCore's last turn, with the state machine's applied point as it is now.

        The SM worker tells a sleeping RaftCore about an applied batch only when
        someone waits for it (post_applied), so the published ``last_applied``
        can lag behind the SM worker's; whoever got a write's answer and reads
        the metrics next must see the write applied.  The applied point is read
        first: RaftCore hands an Apply to the SM worker only after publishing a
        commit point that covers it (_flush_apply comes after _publish, and
        _to_sm_worker publishes before it flushes), so the metrics read after it
        cover what it applied.  A snapshot the SM worker installed before
        RaftCore heard of it is past the published commit point: shown once
        RaftCore publishes it (it answers no client's write).
        """
        applied = self.sm_worker.applied
        m = self._published
        if log_index(m.last_applied) < log_index(applied) <= log_index(m.committed):
            return replace(m, last_applied=applied)
        return m

    # ------------------------------------------------------------------ posting

    # No lock on these paths (every client write takes one): ``_closed`` is set before
    # _teardown drains the inbox for the last time, so an item appended before that
    # drain is failed by it, and one appended after it sees ``_closed`` on the second
    # look (GIL order) and is refused here.  An item both see is failed twice, which
    # ``_fail`` tolerates.

    def post(self, item: tuple) -> None:
        """Put an item on the inbox; silently dropped once the core has stopped."""
        if not self._closed:
            self.inbox.put(item)

    def post_applied(self, applied: LogId) -> None:
        """The SM worker applied up to ``applied``.

        This wakes a sleeping RaftCore only when someone waits for it: a read
        waiting for its index to be applied, or a thread in ``raft.wait()``.
        Otherwise the news waits for the next turn (a tick at the latest): the
        cache trim, the snapshot policy and the published metrics can wait
        that long (``metrics`` reads the SM worker's applied point itself, so
        whoever got a write's answer sees the write applied there), and the
        node saves a thread wake-up and a whole turn per applied batch.
        """
        if not self._closed:
            self.inbox.put_lazy(("applied", applied), self._applied_is_urgent)

    def _applied_is_urgent(self) -> bool:
        # Called while RaftCore sleeps (see Inbox.put_lazy): _read_waiters stands still.
        return bool(self._read_waiters) or self.metrics_waiters > 0

    def call(self, item: tuple) -> None:
        """Like post, but raise ShutDown/Fatal when the core no longer runs."""
        if self._closed:
            raise self.stopped_error()
        self.inbox.put(item)
        if self._closed:
            raise self.stopped_error()  # maybe after the last drain: nobody will see the item

    def post_rpc(self, item: tuple) -> None:
        """Put a peer's request on the inbox, unless its lane is full (then it is dropped, and counted)."""
        if not self._closed and self.rpc_lane.admit():
            self.inbox.put(item)

    def post_reply(self, item: tuple) -> None:
        """Put a peer's reply to this node's request on the inbox, unless its lane is full."""
        if not self._closed and self.reply_lane.admit():
            self.inbox.put(item)

    def pending_writes(self) -> int:
        """Client writes accepted and not yet released (approximate; see ``write_tickets``)."""
        return self.writes_accepted - self.writes_released - self.writes_released_sm

    def overloaded(self) -> Overloaded:
        """Count a write refused for Config.max_pending_writes; the error to raise."""
        self.count("writes_refused_overloaded")
        return Overloaded(f"node {self.node_id} has {self.pending_writes()} client writes in flight "
                          f"(Config.max_pending_writes={self.config.max_pending_writes}); nothing was "
                          f"proposed, retry later")

    def hold_write_bytes(self, fut: Future, n: int) -> None:
        """Count the ``n`` encoded bytes of a large write until ``fut`` is done; ``Overloaded`` past the budget.

        Called by ``Raft.client_write_async`` before the write is handed over, so
        the release (``fut``'s first done-callback) runs before any callback of
        the caller's.  ``fut`` is marked running: a large write, once taken,
        cannot be cancelled (``cancel()`` returns False, as for any running
        call), so its bytes stay counted until it completes or fails.
        """
        with self._write_bytes_lock:
            held = self.write_bytes
            budget = self.config.max_pending_write_bytes
            if held and held + n > budget:
                self.count("writes_refused_overloaded")
                raise Overloaded(f"node {self.node_id} has {held} bytes of large client writes in flight; "
                                 f"this one of {n} bytes would pass Config.max_pending_write_bytes={budget}; "
                                 f"nothing was proposed, retry later")
            self.write_bytes = held + n

        def release(_fut: Future) -> None:
            with self._write_bytes_lock:
                self.write_bytes -= n

        fut.set_running_or_notify_cancel()
        fut.add_done_callback(release)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one of RaftCore's metrics counters.  Any thread."""
        with self._counters_lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def set_replication_error(self, worker: ReplicationWorker, error: str | None) -> None:
        """Show (or clear) why ``worker`` cannot reach its target; shown while it is the target's worker."""
        with self._counters_lock:
            if error is not None:
                if self.workers.get(worker.target) is not worker:
                    return  # a stopped worker's last word must not hide its successor's error
                self._repl_errors[worker.target] = (worker, error)
            elif self._repl_errors.get(worker.target, (None,))[0] is worker:
                del self._repl_errors[worker.target]

    def owns_current_thread(self) -> bool:
        """True on a thread this node joins when it stops: joining from it would wait for itself."""
        me = threading.current_thread()
        if me is self or me is self.sm_worker or me is self.sender or me is self.sm_worker.builder:
            return True
        return any(me is w for w in list(self.workers.values()) + self._stopped_workers)

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
            self._flush_apply()
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
        drain = self.inbox.drain
        while True:
            items = drain(max(0.0, next_tick - time.monotonic()), _MAX_DRAIN)
            eng.advance_clock(time.monotonic())
            stop = False
            writes: list = []
            max_batch = self.config.max_proposal_batch
            pos = 0
            try:
                for pos, it in enumerate(items):
                    kind = it[0]
                    if kind == "write":
                        writes.append(it)
                        if len(writes) < max_batch:
                            continue
                    elif kind == "burst":  # client writes and reads the transport delivered together
                        for sub in it[1]:
                            if sub[0] == "write":
                                writes.append(sub)
                                if len(writes) >= max_batch:
                                    self._propose(writes)
                                    writes = []
                            else:  # a read: it follows the writes before it, as if posted alone
                                if writes:
                                    self._propose(writes)
                                    writes = []
                                self._handle(sub)
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
                    writes = []
            except BaseException:
                # The node stops: what this turn had not handled yet is failed by _teardown
                # (an item failed twice is harmless: completing a done future is a no-op).
                self._leftover = writes + list(items[pos:])
                raise
            # Timers fire after the messages that arrived up to now are handled:
            # a long turn must not make a follower time out on heartbeats
            # that are already in its inbox.
            now = time.monotonic()
            eng.tick(now)
            if now >= next_tick:
                next_tick = now + tick
            self._run_engine()
            if self._api_done:
                # API results go out once this turn's writes are durable (initialize's
                # membership entry, a membership change's entry).
                done, self._api_done = self._api_done, []
                for fut, value in done:
                    succeed(fut, value)
            self._publish()
            self._flush_apply()
            if stop:
                raise _Stop()

    def _handle(self, it: tuple) -> None:
        kind = it[0]
        eng = self.engine
        if kind == "resp":
            self.reply_lane.taken += 1
            self._step(it[1], it[2], None)
        elif kind == "rpc":
            self.rpc_lane.taken += 1
            _, from_id, msg, reply = it
            ents = getattr(msg, "entries", None)
            if ents and getattr(ents, "encoded", None) is not None:
                self._enc_hints.append(ents)  # the stored encodings came with them: no need to encode again
            self._step(from_id, msg, reply)
        elif kind == "applied":
            self._applied = it[1]
            eng.on_applied(it[1])
            if self._read_waiters:
                with self.replies_held():
                    self._release_reads()
            self._trim_cache(it[1].index)
        elif kind == "api":
            fn, fut = it[1], it[2]
            try:
                self._api_done.append((fut, fn(eng)))
            except RaftError as e:
                fail(fut, e)
            except BaseException as e:
                fail(fut, Fatal(f"node {self.node_id}: {type(e).__name__}: {e}"))
                raise
        elif kind == "read":
            fut = it[1]
            lid = self.lease_read()
            if lid is not None:
                succeed(fut, lid)
                return
            try:
                eng.read_index(fut)
            except RaftError as e:
                fail(fut, e)
        elif kind == "repl_failed":
            eng.on_replication_failed(it[1])
        elif kind == "snapshot_built":
            eng.on_snapshot_built(it[1])
        elif kind == "snapshot_installed":
            self._applied = it[1].last_log_id
            self._apply_sent = max(self._apply_sent, log_index(it[1].last_log_id))
            eng.on_snapshot_installed(it[1], it[2])
            self._release_reads()
            # Writes this node accepted as leader at indexes the snapshot covers will
            # never be applied here one by one: their fate is in the snapshot.
            self._fail_writes(lambda i: i <= log_index(it[1].last_log_id), "was superseded by a snapshot")
        elif kind == "snapshot_failed":
            # The snapshot could not be installed (a chunk went missing, or the state
            # machine refused its content): tell the sender now rather than let it
            # time out; it starts over.
            eng.on_snapshot_refused(it[2])
            it[1].reply(InstallSnapshotResponse(eng.vote.term))
        elif kind == "fatal":
            raise RuntimeError(it[1])
        else:
            raise RuntimeError(f"unknown inbox item {kind!r}")

    def _step(self, from_id: int, msg: Any, reply: Any) -> None:
        """A peer's message (a request, or a reply to ours) into the engine; a refusal is counted, not fatal."""
        try:
            self.engine.step(from_id, msg, reply)
        except ValueError as e:  # RemoteProtocolError: refused before it changed anything
            reason = getattr(e, "reason", "invalid_message")
            self.count("refused_" + reason)
            rate_limited.warning(f"refused {self.node_id} {reason}", "node %s: refused a %s from node %s (%s): %s",
                                 self.node_id, type(msg).__name__, from_id, reason, e)

    def _propose(self, writes: list) -> None:
        try:
            log_ids = self.engine.propose([w[1] for w in writes])
        except RaftError as e:
            # Released before their futures complete (and run their callbacks), here and below.
            self.writes_released += len(writes)
            for w in writes:
                fail(w[2], e)
            return
        pending = self._pending_writes
        if not log_ids:
            return
        first, top = log_ids[0].index, log_ids[-1].index
        self._packed_runs[first] = (log_ids, [w[3] for w in writes])
        if pending and self._pending_top >= first:
            # Indexes this node proposed before (a leader again after losing entries): fail those.
            for lid, w in zip(log_ids, writes):
                old = pending.get(lid.index)
                if old is not None:
                    self.writes_released += 1
                    _fail(old[1], ForwardToLeader(None, None, f"write {old[0]} was overwritten"))
                pending[lid.index] = (lid, w[2])
        else:  # the usual case: above every index ever pending, so none can be overwritten
            pending.update(zip(range(first, top + 1), zip(log_ids, [w[2] for w in writes])))
        if top > self._pending_top:
            self._pending_top = top

    def _run_engine(self) -> None:
        eng = self.engine
        while True:
            if self._lease_reads:
                self.read_lease = eng.read_lease()
            cmds = eng.take_output()
            if not cmds:
                self._enc_hints.clear()
                self._packed_runs.clear()
                return
            self._execute(cmds)

    def _trim_cache(self, applied: int) -> None:
        """Drop the cached entries nobody needs any more: applied, and (leading) held by every target.

        Short-lived entries are cheap: they die young, before the garbage
        collector promotes them and walks them again at every full collection.
        A target that lags (or is down) keeps them, up to the cache's bound.
        """
        upto = applied
        for p in self.engine.progress.values():
            m = p.matched_index
            if m < upto:
                upto = m
        if upto > 0:
            self.cache.purge(upto)

    def _encodings(self, entries: list) -> list[bytes]:
        """The stored encoding of each entry: from this turn's AppendEntries when they came with them,
        or from the payloads the clients packed when these are this turn's proposals."""
        runs = self._packed_runs
        if runs:
            out: list[bytes] = []
            n = len(entries)
            while len(out) < n:
                k = len(out)
                run = runs.get(entries[k].index)
                # The very entries proposed (not others at the same index: a new leader's,
                # after this node stepped down and truncated in the same turn).
                if run is None or k + len(run[0]) > n or entries[k].log_id is not run[0][0] \
                        or entries[k + len(run[0]) - 1].log_id is not run[0][-1]:
                    break
                prefix = normal_entry_prefix(run[0][0].term)
                out += [prefix + p for p in run[1]]
            if len(out) == n:
                return out
        if self._enc_hints:
            known: dict[int, bytes] = {}
            for ents in self._enc_hints:  # alive until the turn ends, so id() is unambiguous
                known.update(zip(map(id, ents), ents.encoded))
            try:
                return [known[id(e)] for e in entries]
            except KeyError:
                pass
        return encode_entries(entries)

    def _execute(self, cmds: list) -> None:
        """Execute one output: its storage commands first, as one durable batch, then the rest in order.

        One exception, Raft's "the leader writes to its disk in parallel with
        replicating" (thesis 10.2.1): when the batch only appends entries (and
        saves the commit point), the ``Replicate`` sends go out first, so the
        followers write while this node does.  The engine counts this node in a
        quorum only after ``on_log_flushed``, so nothing commits on an entry that
        is not durable here or on enough followers.  Never with a ``SaveVote``,
        ``TruncateLog`` or ``PurgeLog`` in the batch: those keep the strict order.
        """
        storage = [c for c in cmds if isinstance(c, STORAGE_COMMANDS)]
        sent_early = False
        if storage:
            if all(type(c) is SaveCommitted for c in storage):
                # The commit point alone is a hint (storage.py: committed entries are never
                # lost without it): it costs no fsync of its own, but rides with the next write.
                self._deferred_commit = cast(SaveCommitted, storage[-1])  # (all are, checked above)
                storage = []
            elif self._deferred_commit is not None:
                storage.insert(0, self._deferred_commit)  # a SaveCommitted later in the batch wins
                self._deferred_commit = None
        if storage:
            # Encode once, here: the store writes these bytes, the cache keeps them for the
            # replication workers (they go on the wire as they are) and the SM worker.
            storage = [AppendToLog(c.entries, self._encodings(c.entries)) if type(c) is AppendToLog else c
                       for c in storage]
            cache = self.cache
            if self.workers and all(type(c) is AppendToLog or type(c) is SaveCommitted for c in storage) \
                    and not any(type(c) is UpdateReplication for c in cmds):
                for c in storage:  # the workers read them from the cache while the store writes them
                    if type(c) is AppendToLog:
                        cache.append(c.entries, _encoded(c))
                self._send_replication(cmds)
                sent_early = True
                self.log_store.write(storage)
            else:
                self.log_store.write(storage)
                for c in storage:  # the cache follows the store, once the batch is durable
                    if type(c) is AppendToLog:
                        cache.append(c.entries, _encoded(c))
                    elif type(c) is TruncateLog:
                        cache.truncate(c.since)
                    elif type(c) is PurgeLog:
                        cache.purge(c.upto.index)
            if any(isinstance(c, _LOG_CHANGES) for c in storage):
                self.engine.on_log_flushed(self.engine.log.last)
            if self._pending_writes:
                for c in storage:
                    if type(c) is TruncateLog:
                        # A truncated entry was never committed and never will be (the leader
                        # that made us truncate lacks it): its write failed, say so now rather
                        # than when (if ever) the index is applied again.
                        self._fail_writes(lambda i, since=c.since: i >= since, "was overwritten by a new leader")
        replied = False
        if len(cmds) > 1 and not any(type(c) in _SNAPSHOT_COMMANDS for c in cmds):
            # Replies first: an acknowledgement is on a leader's critical path; the rest
            # (handing entries to the SM worker, above all) is not, and would delay it.
            for c in cmds:
                if type(c) is Respond:
                    c.token.reply(c.message)
            replied = True
        reads: list[RespondRead] = []
        for c in cmds:
            t = type(c)
            if t is Replicate or t is SendSnapshot:
                if not sent_early:
                    w = self.workers.get(c.target)
                    if w is not None:
                        w.submit(c)
            elif t is Respond:
                if not replied:
                    c.token.reply(c.message)
            elif t is Apply:
                self._apply_due = c  # the Applies of a turn only go forward: the last one covers them all
            elif t is SendVote:
                nodes = self.engine.effective_membership.membership.nodes
                for target in c.targets:
                    if target in nodes:
                        self.sender.send(target, nodes[target], c.request)
            elif t is SendTimeoutNow:
                node = self.engine.effective_membership.membership.nodes.get(c.target)
                if node is not None:
                    self.sender.send(c.target, node, c.request)
            elif t is UpdateReplication:
                self._update_workers(c)
            elif t is RespondRead:
                reads.append(c)
            elif t is BuildSnapshot:
                self._to_sm_worker(("build",))
            elif t is ReceiveSnapshotChunk:
                self._to_sm_worker(("chunk", c.request))
            elif t is InstallSnapshot:
                self._to_sm_worker(("install", c.meta, c.token))
        if reads:  # the reads confirmed together are answered together (replies_held)
            with self.replies_held():
                for r in reads:
                    self._on_read_ready(r)

    def _send_replication(self, cmds: list) -> None:
        workers = self.workers
        for c in cmds:
            t = type(c)
            if t is Replicate or t is SendSnapshot:
                w = workers.get(c.target)
                if w is not None:
                    w.submit(c)

    def _fail_writes(self, which: Any, why: str) -> None:
        """Fail the pending client writes whose log index satisfies ``which(index)``."""
        pending = self._pending_writes
        for idx in [i for i in pending if which(i)]:
            lid, fut = pending.pop(idx)
            self.writes_released += 1
            _fail(fut, ForwardToLeader(self.engine.leader_id, self.engine.leader_node, f"write {lid} {why}"))

    def _to_sm_worker(self, item: tuple) -> None:
        """Queue snapshot work for the SM worker, after the turn's Apply: it works in the engine's order."""
        if self._apply_due is not None:
            # The Apply leaves before the turn's end: the metrics go out first, so that the
            # published commit point covers whatever the SM worker applies (see metrics).
            self._publish()
        self._flush_apply()
        self.sm_worker.q.put(item)

    def _flush_apply(self) -> None:
        """Hand the turn's Apply to the SM worker.

        Done last in a turn, after the replies went out and the metrics were
        published: the SM worker then takes the GIL as this thread goes to
        sleep, instead of competing for it with the transport thread that
        sends our acknowledgement (a follower) or with the rest of the turn.
        """
        c = self._apply_due
        if c is not None:
            self._apply_due = None
            self._submit_apply(c)

    def _submit_apply(self, c: Apply) -> None:
        futures: dict[int, tuple[LogId, Future]] = {}
        pending = self._pending_writes
        upto = c.upto.index
        if pending:
            lo = self._apply_sent + 1
            if upto - lo < 4 * len(pending):
                # Writes are proposed above the last Apply (at last_index + 1 > committed),
                # so the ones this Apply covers are all in lo..upto: no scan of the rest.
                pop = pending.pop
                for idx in range(lo, upto + 1):
                    w = pop(idx, None)
                    if w is not None:
                        futures[idx] = w
            else:
                for idx in [i for i in pending if i <= upto]:
                    futures[idx] = pending.pop(idx)
        if upto > self._apply_sent:
            self._apply_sent = upto
        self.sm_worker.q.put(("apply", c.upto, futures))

    def _update_workers(self, c: UpdateReplication) -> None:
        for target, w in list(self.workers.items()):
            if target not in c.targets or w.node != c.targets[target] or w.term != c.term:
                w.stop()
                del self.workers[target]
                self._stopped_workers.append(w)  # joined at teardown, so shutdown() leaves no thread
        self._stopped_workers = [w for w in self._stopped_workers if w.is_alive()]
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
            fail(fut, ForwardToLeader(c.leader_id, node))
            return
        read = c.read_log_id
        assert read is not None, "a read that succeeded has its read index (RespondRead)"
        # The SM worker's own applied point: its news reaches this thread lazily (post_applied).
        if max(log_index(self._applied), log_index(self.sm_worker.applied)) >= read.index:
            succeed(fut, read)
        else:
            self._read_waiters.append((read.index, read, fut))

    def lease_read(self) -> LogId | None:
        """With a read lease that holds now: what the state machine has applied, which any thread may
        read linearizably at once (see Engine.read_lease); else None (a ReadIndex round is needed)."""
        lease = self.read_lease
        if lease is None or self._closed or time.monotonic() >= lease[0]:
            return None
        applied = self.sm_worker.applied
        if applied is None or applied.index < lease[1]:
            return None
        self.lease_reads_served = next(self._lease_read_tickets)
        return applied

    def _release_reads(self) -> None:
        if not self._read_waiters:
            return
        applied = log_index(self._applied)
        keep = []
        for idx, lid, fut in self._read_waiters:
            if idx <= applied:
                succeed(fut, lid)
            else:
                keep.append((idx, lid, fut))
        self._read_waiters = keep

    # ------------------------------------------------------------------ metrics

    def _build_metrics(self, state: ServerState | None = None) -> RaftMetrics:
        e = self.engine
        m = e.membership
        snap = e.snapshot
        counters = getattr(self.transport, "stats", None)
        counters = dict(counters) if isinstance(counters, dict) else {}
        counters["inbox_dropped_rpcs"] = self.rpc_lane.dropped
        if self._lease_reads:
            counters["lease_reads"] = self.lease_reads_served
        counters["inbox_dropped_replies"] = self.reply_lane.dropped
        with self._counters_lock:
            counters.update(self._counters)
            repl_errors = {t: err for t, (w, err) in self._repl_errors.items() if self.workers.get(t) is w}
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
            counters=counters,
            replication_errors=repl_errors,
        )

    def _log_engine_news(self) -> None:
        """Log why each election started (at INFO), and once that this node was removed."""
        e = self.engine
        c = e.last_campaign
        if c is not None and c is not self._campaign_logged:
            old, self._campaign_logged = self._campaign_logged, c
            if c.refused:
                log.error("node %s: %s; restore a backup into a new cluster to recover", self.node_id, c.reason)
            elif old is None or c.number != old.number:
                log.info("node %s: starts %s for term %s: %s", self.node_id,
                         "a pre-vote" if c.pre_vote else "an election", c.term, c.reason)
        if e.removed != self._removed_logged:
            self._removed_logged = e.removed
            if e.removed:
                m = e.committed_membership
                assert m is not None, "removed means a committed configuration left this node out"
                log.info("node %s: the committed configuration at %s (voters %s) no longer lists this node: "
                         "it was removed from the cluster and does not campaign", self.node_id, m.log_id,
                         sorted(m.membership.voter_ids))

    def _publish(self, state: ServerState | None = None) -> None:
        self._log_engine_news()
        m = self._build_metrics(state)
        old = self._published
        if (m.state, m.current_term, m.current_leader) != (old.state, old.current_term, old.current_leader):
            # A node started without the membership (a new member, before the leader's first
            # entries reach it) is a learner until it learns one that lists it: say so.  Not for
            # a node that was listed once (removed since: it says so itself, _log_engine_news).
            if m.membership is not None and self.node_id in m.membership.nodes:
                self._listed_once = True
            waiting = m.state is ServerState.LEARNER and not self._listed_once and not self.engine.removed
            log.info("node %s: %s in term %s, leader %s%s", self.node_id, m.state, m.current_term, m.current_leader,
                     " (waiting to learn a membership that lists this node)" if waiting else "")
        if m.membership_log_id != old.membership_log_id and m.membership is not None:
            ms = m.membership
            log.info("node %s: membership at %s: voters %s, learners %s", self.node_id, m.membership_log_id,
                     " -> ".join(str(sorted(c)) for c in ms.configs), sorted(ms.learner_ids))
        with self.cond:
            self._published = m
            self.cond.notify_all()

    # ------------------------------------------------------------------ stopping

    def close_transport(self) -> None:
        try:
            self.transport.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the transport failed")

    def _go_fatal(self, reason: str, exc: BaseException | None = None) -> None:
        self.fatal = reason
        log.error("node %s stopped as Fatal: %s", self.node_id, reason, exc_info=exc)

    def _teardown(self) -> None:
        self.read_lease = None
        with self._post_lock:
            self._closed = True
        err = self.stopped_error()
        for w in self.workers.values():
            w.stop()
        self.sm_worker.stop()
        self.sender.stop()
        if self.fatal is None:
            self.close_transport()
        # else a Fatal node keeps its transport until Raft.shutdown() closes it: it answers
        # "metrics" with the state Fatal and the reason, and every other request with the
        # Fatal error, so that a health check tells "dead, and why" from "unreachable".
        if self._deferred_commit is not None and self.fatal is None:
            try:  # the commit hint that was waiting for a write: a restart then applies that far at once
                self.log_store.write([self._deferred_commit])
            except Exception:  # noqa: BLE001 - only a hint
                log.warning("node %s: could not save the commit point on shutdown", self.node_id)
        threads: list[threading.Thread] = [*self.workers.values(), *self._stopped_workers, self.sm_worker,
                                           self.sender]
        for th in threads:
            if th.is_alive():
                th.join()
        # Everything still waiting gets the reason (what was durable stays durable).
        for lid, fut in self._pending_writes.values():
            _fail(fut, err)
        self._pending_writes.clear()
        for _i, _l, fut in self._read_waiters:
            _fail(fut, err)
        for fut in self.engine.drop_reads():  # reads the engine still held (no quorum yet)
            _fail(fut, err)
        for fut, _value in self._api_done:
            _fail(fut, err)
        for fut in self.sm_worker.drop_futures():  # applies it never got to
            _fail(fut, err)
        leftover = self._leftover
        while True:
            try:
                it = leftover.pop() if leftover else self.inbox.get_nowait()
            except queue.Empty:
                break
            if it[0] in ("write", "api"):
                _fail(it[2], err)
            elif it[0] == "burst":
                for sub in it[1]:  # ("write", command, future, packed) or ("read", future)
                    _fail(sub[2] if sub[0] == "write" else sub[1], err)
            elif it[0] == "read":
                _fail(it[1], err)
        self._publish(ServerState.FATAL if self.fatal is not None else ServerState.SHUTDOWN)


_fail = fail
