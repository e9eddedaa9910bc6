"""The threads around RaftCore: replication workers, the vote sender, the state-machine worker.

Each thread owns what it touches: a replication worker owns its connection
(one DEALER for ZeroMQ) and only reads the log store; the state-machine
worker is the only caller of ``apply`` and ``install_snapshot``.  They talk
to RaftCore only through its inbox (``core.post``).
"""
from __future__ import annotations

import abc
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, BinaryIO, Callable, ContextManager, Protocol

from ..codec import EncodedEntries, encode_entries
from ..config import Config
from ..engine.commands import Replicate, SendSnapshot
from ..errors import CodecError, ForwardToLeader
from ..messages import AppendEntriesRequest, InstallSnapshotRequest, InstallSnapshotResponse
from ..metrics import write_response
from ..network import Connection, Transport
from ..storage import LogStore, StateMachine
from ..types import LogId, Node, log_index
from .cache import EntryCache
from .futures import complete_all, fail

log = logging.getLogger("pyraft.runtime")

_STOP = object()
#: how often a snapshot chunk is sent before the transfer counts as failed
_CHUNK_TRIES = 3
#: seconds between connection attempts to a target that cannot be connected to: doubling from min to max
_CONNECT_BACKOFF_MIN, _CONNECT_BACKOFF_MAX = 0.1, 5.0
#: seconds between two log lines about the same recurring problem
_LOG_EVERY = 10.0


class RateLimitedLog:
    """Logs a recurring warning once per ``interval`` seconds per key, with how many were not logged."""

    def __init__(self, interval: float = _LOG_EVERY) -> None:
        self.interval = interval
        self._lock = threading.Lock()  # guards _last
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when last logged, suppressed since)

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            when, suppressed = self._last.get(key, (-1e18, 0))
            if now - when < self.interval:
                self._last[key] = (when, suppressed + 1)
                return
            self._last[key] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} more like it not logged)"
        log.warning(msg, *args)


rate_limited = RateLimitedLog()


class WorkerHost(Protocol):
    """What the workers use of RaftCore (which is one): its inbox, its parts, its counters.

    The workers know RaftCore only through this: it starts them, never the other way round.
    """

    node_id: int
    config: Config
    transport: Transport
    log_store: LogStore
    state_machine: StateMachine
    #: the newest entries and their encodings (cache.py)
    cache: EntryCache
    #: client writes whose future the SM worker completed (RaftCore.pending_writes; this worker only)
    writes_released_sm: int
    #: ``with replies_held():`` makes the replies sent inside it leave together
    replies_held: Callable[[], ContextManager[Any]]

    def post(self, item: tuple) -> None:
        """Put an item on RaftCore's inbox (dropped once it stopped)."""

    def post_reply(self, item: tuple) -> None:
        """Put a peer's reply on RaftCore's inbox, in the lane for replies."""

    def post_applied(self, applied: LogId) -> None:
        """Tell RaftCore the state machine applied up to ``applied`` (waking it only if someone waits)."""

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one of RaftCore's metrics counters."""

    def set_replication_error(self, worker: ReplicationWorker, error: str | None) -> None:
        """Show (or clear) why ``worker`` cannot reach its target."""


class _Worker(threading.Thread, abc.ABC):
    """A thread that reports an unexpected exception to RaftCore, which turns the node Fatal."""

    def __init__(self, core: WorkerHost, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.core = core
        self.q: queue.Queue = queue.Queue()

    def run(self) -> None:
        try:
            self.work()
        except BaseException as e:  # noqa: BLE001 - any death must be visible
            log.exception("thread %s died", self.name)
            self.core.post(("fatal", f"thread {self.name} died: {e!r}"))

    @abc.abstractmethod
    def work(self) -> None:
        """The thread's body; an exception from it makes the node Fatal."""

    def stop(self) -> None:
        self.q.put(_STOP)


class ReplicationWorker(_Worker):
    """Replicates to one target while this node leads (the seed's replication task).

    Executes ``Replicate`` and ``SendSnapshot`` commands from RaftCore: reads
    entries from the log store (never writes), sends AppendEntries without
    waiting for replies (the engine bounds how many are in flight), and
    forwards every reply to RaftCore.
    """

    def __init__(self, core: WorkerHost, target: int, node: Node, term: int) -> None:
        super().__init__(core, f"pyraft-repl-{core.node_id}->{target}")
        self.target = target
        self.node = node
        self.term = term
        self.conn: Connection | None = None  # this thread's, once connected (None while it cannot connect)
        self._snapshot_rids: set[int] = set()
        self._connect_failures = 0  # in a row
        self._retry_at = 0.0  # monotonic time of the next connection attempt
        self._problem: str | None = None  # the connection's ``problem`` last shown in the metrics

    def submit(self, cmd: Any) -> None:
        self.q.put(cmd)
        conn = self.conn
        if conn is not None:
            conn.wake()

    def stop(self) -> None:
        self.submit(_STOP)

    def work(self) -> None:
        held = None  # a command taken off the queue while waiting to reconnect, executed next
        try:
            while True:
                if self.conn is None and time.monotonic() >= self._retry_at:
                    self._connect()
                while True:
                    if held is not None:
                        cmd, held = held, None
                    else:
                        try:
                            cmd = self.q.get_nowait()
                        except queue.Empty:
                            break
                    if cmd is _STOP:
                        return
                    conn = self.conn
                    if conn is None:
                        # Not connected: the message is lost, as on a network that is down;
                        # the engine probes again at its next heartbeat.
                        self.core.post(("repl_failed", self.target))
                    elif isinstance(cmd, Replicate):
                        self._replicate(conn, cmd)
                    elif isinstance(cmd, SendSnapshot):
                        if not self._send_snapshot(conn, cmd):
                            return
                if self.conn is None:
                    try:
                        held = self.q.get(timeout=max(0.0, self._retry_at - time.monotonic()))
                    except queue.Empty:
                        pass
                    continue
                r = self.conn.recv(1.0)
                while r is not None:
                    self.core.post_reply(("resp", self.target, r[1]))
                    r = self.conn.recv(0)
                problem = getattr(self.conn, "problem", None)
                if problem != self._problem:
                    self._problem = problem
                    self.core.set_replication_error(self, problem)
        finally:
            if self.conn is not None:
                self.conn.close()

    def _connect(self) -> None:
        """Open the connection to the target; on failure, show it and schedule the next attempt.

        A target's address comes from a committed membership entry: one the
        transport cannot use (a typo that skipped the check of ``add_learner``,
        a name that no longer resolves) must not stop the leader, or every
        next leader would stop the same way.  The worker keeps retrying, with
        back-off, until the membership changes the address or drops the target.
        """
        core = self.core
        try:
            self.conn = core.transport.connect(self.target, self.node)
        except Exception as e:  # noqa: BLE001 - whatever the transport raises, the target is unreachable
            self._connect_failures += 1
            delay = min(_CONNECT_BACKOFF_MAX, _CONNECT_BACKOFF_MIN * 2 ** min(self._connect_failures - 1, 16))
            self._retry_at = time.monotonic() + delay
            why = f"cannot connect to {self.node.addr!r}: {type(e).__name__}: {e}"
            core.count("replication_connect_failures")
            core.set_replication_error(self, why)
            rate_limited.warning(f"connect {core.node_id}->{self.target}", "node %s: replication to %s: %s "
                                 "(retrying; fix the address with add_learner)", core.node_id, self.target, why)
            return
        if self._connect_failures:
            self._connect_failures = 0
            core.set_replication_error(self, None)

    def _replicate(self, conn: Connection, cmd: Replicate) -> None:
        start = log_index(cmd.prev_log_id) + 1
        core = self.core
        if cmd.end > start:
            # The newest entries come from the cache with their stored encodings, which go
            # on the wire as they are; older ones are read back from the store.
            got = core.cache.get(start, cmd.end)
            if got is not None:
                entries, encoded = got
            else:
                entries = core.log_store.read(start, cmd.end)
                encoded = encode_entries(entries)
        else:
            entries, encoded = [], []
        # Terms never decrease along a log: checking the last entry checks them all.
        if len(entries) != cmd.end - start or (entries and entries[-1].log_id.term > cmd.term):
            # purged meanwhile, or the log changed under a stale leader: let the engine decide
            core.post(("repl_failed", self.target))
            return
        prev = cmd.prev_log_id
        max_bytes = core.config.max_payload_bytes
        i, n = 0, len(entries)
        if sum(map(len, encoded)) <= max_bytes:
            conn.send(AppendEntriesRequest(cmd.term, core.node_id, prev, EncodedEntries(entries, encoded),
                                                cmd.leader_commit, cmd.seq))
            return
        while True:  # split by size (a single larger entry goes alone)
            j, size = i, 0
            while j < n and (j == i or size + len(encoded[j]) <= max_bytes):
                size += len(encoded[j])
                j += 1
            conn.send(AppendEntriesRequest(cmd.term, core.node_id, prev,
                                                EncodedEntries(entries[i:j], encoded[i:j]),
                                                cmd.leader_commit, cmd.seq))
            if j >= n:
                return
            prev, i = entries[j - 1].log_id, j

    def _send_snapshot(self, conn: Connection, cmd: SendSnapshot) -> bool:
        """Stream the snapshot chunk by chunk, each acknowledged; False when told to stop."""
        opened = self.core.state_machine.open_snapshot()
        if opened is None:
            self.core.post(("repl_failed", self.target))
            return True
        meta, f = opened
        cfg = self.core.config
        try:
            offset = 0
            while True:
                data = f.read(cfg.snapshot_chunk_size)
                nxt = f.read(1)
                done = not nxt
                if nxt:
                    f.seek(-1, 1)
                req = InstallSnapshotRequest(cmd.term, self.core.node_id, meta, offset, data, done)
                # A chunk is acknowledged at once; the last one only once the target
                # installed the snapshot, which takes longer.  A lost chunk (or its
                # ack) is sent again rather than the whole snapshot.
                tries = 1 if done else _CHUNK_TRIES
                for _ in range(tries):
                    rid = conn.send(req)
                    resp = self._await_reply(conn, rid, cfg.rpc_timeout * (5 if done else 1))
                    if resp is not None:
                        break
                if resp is _STOP:
                    return False
                if resp is None or not isinstance(resp, InstallSnapshotResponse):
                    self.core.post(("repl_failed", self.target))
                    return True
                if resp.term != cmd.term or (done and resp.done):
                    self.core.post_reply(("resp", self.target, resp))
                    return True
                if done:
                    # The target could not install it (it lost a chunk): the engine
                    # must leave the SNAPSHOT state and try again.
                    self.core.post(("repl_failed", self.target))
                    return True
                offset += len(data)
        finally:
            f.close()

    def _await_reply(self, conn: Connection, rid: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r = conn.recv(left)
            if r is None:
                # woken: a stop request must not wait for a slow snapshot
                try:
                    cmd = self.q.get_nowait()
                except queue.Empty:
                    continue
                if cmd is _STOP:
                    return _STOP
                continue  # other commands are superseded by the snapshot in progress
            if r[0] == rid:
                return r[1]
            self.core.post_reply(("resp", self.target, r[1]))


class VoteSender(_Worker):
    """Sends vote requests and TimeoutNow without blocking RaftCore, and forwards the replies."""

    def __init__(self, core: WorkerHost) -> None:
        super().__init__(core, f"pyraft-sender-{core.node_id}")
        self.conns: dict[int, tuple[Node, Connection]] = {}
        self._poll_until = 0.0  # replies are polled for until then

    def send(self, target: int, node: Node, msg: Any) -> None:
        self.q.put((target, node, msg))

    def work(self) -> None:
        try:
            while True:
                polling = time.monotonic() < self._poll_until
                try:
                    item = self.q.get(timeout=0.002) if polling else self.q.get()
                except queue.Empty:
                    item = None
                if item is _STOP:
                    return
                if item is not None:
                    target, node, msg = item
                    entry = self.conns.get(target)
                    if entry is None or entry[0] != node:
                        if entry is not None:
                            entry[1].close()
                            del self.conns[target]
                        entry = self._connect(target, node)
                    if entry is not None:
                        entry[1].send(msg)
                        self._poll_until = time.monotonic() + self.core.config.rpc_timeout
                for target, (_node, conn) in self.conns.items():
                    r = conn.recv(0)
                    while r is not None:
                        self.core.post_reply(("resp", target, r[1]))
                        r = conn.recv(0)
        finally:
            for _node, conn in self.conns.values():
                conn.close()

    def _connect(self, target: int, node: Node) -> tuple[Node, Any] | None:
        """A connection to ``target``, or None (the message is lost) when the transport cannot make one."""
        core = self.core
        try:
            entry = self.conns[target] = (node, core.transport.connect(target, node))
        except Exception as e:  # noqa: BLE001 - an unusable address must not stop the node (see ReplicationWorker)
            core.count("vote_connect_failures")
            rate_limited.warning(f"vote-connect {core.node_id}->{target}", "node %s: cannot connect to %s at %r: "
                                 "%s: %s", core.node_id, target, node.addr, type(e).__name__, e)
            return None
        return entry


class SMWorker(_Worker):
    """Applies committed entries in batches, completes client futures, builds and installs snapshots."""

    def __init__(self, core: WorkerHost) -> None:
        super().__init__(core, f"pyraft-sm-{core.node_id}")
        self.applied: LogId | None = core.state_machine.applied_state()[0]
        # the snapshot being received: its file, its id, and whether a chunk went missing
        self._recv_file: BinaryIO | None = None
        self._recv_id: str | None = None
        self._recv_broken = False
        self._builder: threading.Thread | None = None
        self._in_flight: dict[int, tuple[LogId, Future]] = {}

    def work(self) -> None:
        sm = self.core.state_machine
        held = None  # an item taken off the queue while coalescing Applies, handled next
        while True:
            item, held = (held, None) if held is not None else (self.q.get(), None)
            if item is _STOP:
                break
            kind = item[0]
            if kind == "apply":
                upto, futures = item[1], item[2]
                # Batched apply: every Apply queued behind this one joins it, so that one
                # state-machine batch (one transaction, one fsync for an LMDB machine)
                # covers what RaftCore committed in several turns while we were busy.
                while True:
                    try:
                        nxt = self.q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP or nxt[0] != "apply":
                        held = nxt
                        break
                    upto = nxt[1]  # the Applies of RaftCore only go forward
                    futures.update(nxt[2])
                self._apply(upto, futures)
            elif kind == "build":
                self._start_builder()
            elif kind == "chunk":
                self._write_chunk(item[1])
            elif kind == "install":
                meta, token = item[1], item[2]
                f, broken = self._recv_file, self._recv_broken or self._recv_id != meta.snapshot_id
                self._recv_file, self._recv_id, self._recv_broken = None, None, False
                if f is None or broken:
                    log.warning("node %s: snapshot %s arrived incomplete; the leader will send it again",
                                self.core.node_id, meta.snapshot_id)
                    if f is not None:
                        f.close()
                    self.core.post(("snapshot_failed", token, meta))
                    continue
                f.flush()
                f.seek(0)
                try:
                    sm.install_snapshot(meta, f)
                except CodecError as e:
                    # The content was refused (storage.py: CodecError means the snapshot does
                    # not decode or validate; the state is unchanged).  Whoever sent it is told
                    # to try again; a disk or a user state machine failing raises anything
                    # else, and that stops the node.
                    self.core.count("snapshots_refused")
                    rate_limited.warning(f"snapshot {self.core.node_id}", "node %s: refused snapshot %s: %s",
                                         self.core.node_id, meta.snapshot_id, e)
                    self.core.post(("snapshot_failed", token, meta))
                    continue
                self.applied = sm.applied_state()[0]
                log.info("node %s: installed snapshot %s from the leader, up to %s", self.core.node_id,
                         meta.snapshot_id, meta.last_log_id)
                self.core.post(("snapshot_installed", meta, token))
        b = self._builder
        if b is not None:
            b.join()
        if self._recv_file is not None:
            self._recv_file.close()

    @property
    def builder(self) -> threading.Thread | None:
        """The snapshot builder thread, if one was started (it may have ended)."""
        return self._builder

    def drop_futures(self) -> list[Future]:
        """After the thread ended: the client futures of the applies it never got to (or died in)."""
        out = [fut for _lid, fut in self._in_flight.values()]
        self._in_flight = {}
        while True:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                return out
            if item is not _STOP and item[0] == "apply":
                out.extend(fut for _lid, fut in item[2].values())

    def _apply(self, upto: LogId, futures: dict[int, tuple[LogId, Future]]) -> None:
        self._in_flight = futures  # if apply raises, drop_futures() fails what is left
        self._apply_batches(upto, futures)
        self._in_flight = {}

    def _apply_batches(self, upto: LogId, futures: dict[int, tuple[LogId, Future]]) -> None:
        sm = self.core.state_machine
        store = self.core.log_store
        cache = self.core.cache
        batch_max = self.core.config.max_apply_batch
        while log_index(self.applied) < upto.index:
            start = log_index(self.applied) + 1
            stop = min(upto.index + 1, start + batch_max)
            entries = cache.get_entries(start, stop) or store.read(start, stop)
            if not entries:
                raise RuntimeError(f"committed entries {start}..{upto.index} are missing from the log")
            results = sm.apply(entries)
            if len(results) != len(entries):
                raise RuntimeError(f"state machine returned {len(results)} results for {len(entries)} entries")
            # Set before the futures complete: a lease read (RaftCore.lease_read) made by whoever
            # got a write's answer must return an index that covers the write.
            self.applied = entries[-1].log_id
            if futures:
                with self.core.replies_held():  # the batch's replies leave together (see there)
                    self._complete(entries, results, futures)
            self.core.post_applied(self.applied)
        self.core.writes_released_sm += len(futures)
        for lid, fut in futures.values():  # below our applied point: superseded by a snapshot
            fail(fut, ForwardToLeader(None, None, f"write {lid} was superseded by a snapshot"))
        futures.clear()

    def _complete(self, entries: list, results: list, futures: dict[int, tuple[LogId, Future]]) -> None:
        """Complete the client futures of ``entries`` with their ``results``."""
        pop = futures.pop
        done: list[tuple[Future, Any, bool]] = []
        append = done.append
        for e, res in zip(entries, results):
            elid = e.log_id
            w = pop(elid.index, None)
            if w is None:
                continue
            lid, fut = w
            if lid is not elid and lid != elid:
                append((fut, ForwardToLeader(None, None, f"write {lid} was overwritten by a new leader"), True))
            elif isinstance(res, BaseException):
                append((fut, res, True))
            else:
                append((fut, write_response(lid, res), False))
        # Released before they complete: a done-callback that writes again must not
        # find these writes still counted against Config.max_pending_writes.
        self.core.writes_released_sm += len(done)
        complete_all(done)  # a future its caller cancelled stays as it is

    def _start_builder(self) -> None:
        b = self._builder
        if b is not None:
            b.join()

        def build() -> None:
            try:
                meta = self.core.state_machine.build_snapshot()
            except BaseException as e:  # noqa: BLE001
                log.exception("snapshot build failed")
                self.core.post(("fatal", f"snapshot builder died: {e!r}"))
                return
            log.info("node %s: built snapshot %s, up to %s", self.core.node_id, meta.snapshot_id, meta.last_log_id)
            self.core.post(("snapshot_built", meta))

        self._builder = threading.Thread(target=build, name=f"pyraft-snapshot-{self.core.node_id}", daemon=True)
        self._builder.start()

    def _write_chunk(self, req: InstallSnapshotRequest) -> None:
        if req.offset == 0:
            if self._recv_file is not None:
                self._recv_file.close()
            self._recv_file = self.core.state_machine.begin_receiving_snapshot()
            self._recv_id = req.meta.snapshot_id
            self._recv_broken = False
        f = self._recv_file
        if f is None or self._recv_id != req.meta.snapshot_id or req.offset > f.tell():
            self._recv_broken = True  # a gap: the install will be refused and the leader starts over
            return
        if req.offset < f.tell():  # a chunk sent again (its ack was lost): rewrite from there
            f.seek(req.offset)
            f.truncate()
        f.write(req.data)
