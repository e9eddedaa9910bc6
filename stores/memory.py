"""In-memory storage, FOR TESTS ONLY: nothing here survives the process.

:class:`MemoryLogStore` implements :class:`pyraft.storage.LogStore` and
:class:`MemoryStateMachine` implements :class:`pyraft.storage.StateMachine`
(the KV command format of :mod:`pyraft.kv.commands`), so that whole clusters
run in one process with no disk.  They keep the observable behaviour of the
LMDB versions: entries are stored encoded (an entry LMDB could not store
fails here too, and reads return fresh decoded copies), batches are atomic,
and both are safe to use from several threads.

``close()`` keeps the data: a test can "restart" a node by handing the same
store object to a new ``Raft``.
"""
from __future__ import annotations

import bisect
import functools
import io
import threading
import uuid
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import msgpack

from pyraft.codec import decode_entry, encode_entry, snapshot_meta_from_wire, snapshot_meta_to_wire
from pyraft.engine.commands import AppendToLog, PurgeLog, SaveCommitted, SaveVote, TruncateLog
from pyraft.errors import CodecError, StorageError
from pyraft.kv.commands import DEFAULT_SESSION_TTL, DEFAULT_WATCH_HISTORY, Session, apply_entries
from pyraft.kv.encoding import decode_key, decode_value, encode_key, record_header, record_value
from pyraft.kv.reads import ApplyListeners, KVReads
from pyraft.storage import LogOp, LogState
from pyraft.types import Entry, EntryKind, LogId, SnapshotMeta, StoredMembership, Vote, log_index

__all__ = ["MemoryLogStore", "MemoryStateMachine"]


class MemoryLogStore:
    """A :class:`~pyraft.storage.LogStore` in memory.  Test-only: nothing is durable."""

    def __init__(self) -> None:
        # _lock guards _log, _vote, _committed and _state: a write() changes them
        # all under it, so a reader sees whole batches or nothing.
        self._lock = threading.Lock()
        self._log: dict[int, bytes] = {}  # index -> codec.encode_entry bytes; keys consecutive
        self._vote: Vote | None = None
        self._committed: LogId | None = None
        self._state = LogState(None, None)

    def read_vote(self) -> Vote | None:
        with self._lock:
            return self._vote

    def read_committed(self) -> LogId | None:
        with self._lock:
            return self._committed

    def log_state(self) -> LogState:
        with self._lock:
            return self._state

    def read(self, start: int, stop: int) -> list[Entry]:
        with self._lock:
            raw = []
            i = max(start, 1)
            if i != start:
                return []
            while i < stop and i in self._log:
                raw.append((i, self._log[i]))
                i += 1
        return [decode_entry(i, data) for i, data in raw]

    def write(self, ops: Sequence[LogOp]) -> None:
        """Apply ``ops`` atomically: everything is checked and encoded before anything changes."""
        encoded: list[list[tuple[LogId, bytes]] | None] = []
        for op in ops:
            if isinstance(op, AppendToLog):
                rows = op.encoded if op.encoded is not None else [encode_entry(e) for e in op.entries]
                if len(rows) != len(op.entries):
                    raise StorageError(f"log store: {len(rows)} encodings for {len(op.entries)} entries")
                encoded.append([(e.log_id, data) for e, data in zip(op.entries, rows)])
            elif isinstance(op, (SaveVote, SaveCommitted, TruncateLog, PurgeLog)):
                encoded.append(None)
            else:
                raise StorageError(f"log store: unknown operation {op!r}")
        with self._lock:
            self._check(ops, encoded)
            purged, last = self._state.last_purged, self._state.last_log_id
            for op, pairs in zip(ops, encoded):
                if pairs is not None:
                    for lid, data in pairs:
                        self._log[lid.index] = data
                        last = lid
                elif isinstance(op, SaveVote):
                    self._vote = op.vote
                elif isinstance(op, SaveCommitted):
                    self._committed = op.log_id
                elif isinstance(op, TruncateLog):
                    i = max(op.since, 1)
                    while i <= log_index(last):
                        self._log.pop(i, None)
                        i += 1
                    if log_index(last) >= op.since:
                        prev = max(op.since, 1) - 1
                        last = (LogId(decode_entry(prev, self._log[prev]).term, prev)
                                if prev in self._log else purged)
                elif isinstance(op, PurgeLog):
                    if purged is not None and op.upto.index <= purged.index:
                        continue
                    i = log_index(purged) + 1
                    while i <= min(op.upto.index, log_index(last)):
                        self._log.pop(i, None)
                        i += 1
                    purged = op.upto
                    if log_index(last) <= op.upto.index:
                        last = op.upto
            self._state = LogState(purged, last)

    def _check(self, ops: Sequence[LogOp], encoded: list) -> None:
        """Dry run over indexes only: raise before anything changed if an append leaves a hole."""
        purged = log_index(self._state.last_purged)
        last = log_index(self._state.last_log_id)
        for op, rows in zip(ops, encoded):
            if rows is not None:
                for lid, _ in rows:
                    if lid.index != last + 1:
                        raise StorageError(f"log store: entry {lid} does not continue the log "
                                           f"(last index {last})")
                    last = lid.index
            elif isinstance(op, TruncateLog):
                if op.since <= last:
                    last = max(op.since - 1, purged)
            elif isinstance(op, PurgeLog):
                if op.upto.index > purged:
                    purged = op.upto.index
                    last = max(last, purged)

    def close(self) -> None:
        """Nothing to release; the data stays for a simulated restart."""

    def __repr__(self) -> str:
        return f"MemoryLogStore(state={self._state})"


# ---------------------------------------------------------------------------

class _MemoryBackend:
    """A KVBackend over the state machine's containers, with an undo log for the batch."""

    def __init__(self, st: "_MemoryState") -> None:
        self.st = st
        self.undo: list[Callable[[], object]] = []  # run last to first on rollback; results ignored
        self.lease_changes: list[tuple[int, float | None]] = []
        self._ev_rev = 0
        self._ev_sub = 0

    def get(self, key: bytes) -> bytes | None:
        return self.st.data.get(key)

    def put(self, key: bytes, record: bytes) -> None:
        st = self.st
        old = st.data.get(key)
        if old is None:
            bisect.insort(st.keys, key)

            def undo() -> None:
                st.data.pop(key)
                st.keys.remove(key)
            self.undo.append(undo)
        else:
            self.undo.append(lambda: st.data.__setitem__(key, old))
        st.data[key] = record

    def delete(self, key: bytes) -> None:
        st = self.st
        old = st.data.pop(key)
        st.keys.remove(key)

        def undo() -> None:
            st.data[key] = old
            bisect.insort(st.keys, key)
        self.undo.append(undo)

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self.st.scan(start, stop)

    def add_event(self, revision: int, event: bytes) -> None:
        if revision != self._ev_rev:
            self._ev_rev, self._ev_sub = revision, 0
        else:
            self._ev_sub += 1
        ev = self.st.events
        ev.append((revision, self._ev_sub, event))
        self.undo.append(ev.pop)

    def get_lease(self, lease_id: int) -> float | None:
        return self.st.leases.get(lease_id)

    def put_lease(self, lease_id: int, ttl: float) -> None:
        st = self.st
        st.leases[lease_id] = ttl
        st.lease_keys[lease_id] = set()
        self.undo.append(lambda: (st.leases.pop(lease_id), st.lease_keys.pop(lease_id)))
        self.lease_changes.append((lease_id, ttl))

    def delete_lease(self, lease_id: int) -> None:
        st = self.st
        ttl, keys = st.leases.pop(lease_id), st.lease_keys.pop(lease_id)

        def undo() -> None:
            st.leases[lease_id] = ttl
            st.lease_keys[lease_id] = keys
        self.undo.append(undo)
        self.lease_changes.append((lease_id, None))

    def attach(self, lease_id: int, key: bytes) -> None:
        keys = self.st.lease_keys[lease_id]
        keys.add(key)
        self.undo.append(lambda: keys.discard(key))

    def detach(self, lease_id: int, key: bytes) -> None:
        keys = self.st.lease_keys[lease_id]
        keys.discard(key)
        self.undo.append(lambda: keys.add(key))

    def lease_keys(self, lease_id: int) -> list[bytes]:
        return sorted(self.st.lease_keys[lease_id])

    def get_session(self, client: bytes) -> Session | None:
        return self.st.sessions.get(client)

    def put_session(self, client: bytes, session: Session, old: Session | None) -> None:
        sessions = self.st.sessions
        prev = sessions.pop(client, None)
        sessions[client] = session  # re-inserted last: the dict stays ordered by index

        def undo() -> None:
            sessions.pop(client, None)
            if prev is not None:
                sessions[client] = prev  # (its place in the order may change: rollback is for tests' failures)
        self.undo.append(undo)

    def expire_sessions(self, before_index: int) -> None:
        sessions = self.st.sessions
        while sessions:
            client, s = next(iter(sessions.items()))
            if s.index >= before_index:
                return
            sessions.pop(client)
            self.undo.append(functools.partial(sessions.__setitem__, client, s))

    def compact_events(self, before: int) -> None:
        ev = self.st.events
        n = bisect.bisect_left(ev, (before,))
        if n:
            gone = ev[:n]
            del ev[:n]
            self.undo.append(lambda: ev.__setitem__(slice(0, 0), gone))

    def compact_history(self, before: int) -> None:
        self.compact_events(before)
        st, floor = self.st, self.st.history_floor
        if before > floor:
            st.history_floor = before
            self.undo.append(lambda: setattr(st, "history_floor", floor))

    def rollback(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()


class _MemoryState:
    """Everything a MemoryStateMachine holds but its snapshot (guarded by the machine's lock)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.keys: list[bytes] = []  # sorted: the keys of data
        self.sessions: dict[bytes, Session] = {}
        self.events: list[tuple[int, int, bytes]] = []  # the watch history, in order
        self.leases: dict[int, float] = {}
        self.lease_keys: dict[int, set[bytes]] = {}
        self.history_floor = 1
        self.last_applied: LogId | None = None
        self.membership: StoredMembership | None = None

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        keys = self.keys
        i = bisect.bisect_left(keys, start)
        j = bisect.bisect_left(keys, stop)
        return iter([(k, self.data[k]) for k in keys[i:j]])


class _MemoryView:
    """A KVView of a MemoryStateMachine (its lock is held while the view is used)."""

    def __init__(self, st: _MemoryState, history: int) -> None:
        self.st = st
        self.revision = log_index(st.last_applied)
        self.history_start = max(st.history_floor, self.revision + 1 - history)

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self.st.scan(start, stop)

    def count(self, start: bytes, stop: bytes) -> int:
        keys = self.st.keys
        return max(0, bisect.bisect_left(keys, stop) - bisect.bisect_left(keys, start))

    def events(self, revision: int, sub: int) -> Iterator[tuple[int, int, bytes]]:
        ev = self.st.events
        return iter(ev[bisect.bisect_left(ev, (revision, sub)):])

    def leases(self) -> Iterator[tuple[int, float]]:
        return iter(sorted(self.st.leases.items()))


_SNAPSHOT_VERSION = 2


class MemoryStateMachine(KVReads, ApplyListeners):
    """A :class:`~pyraft.storage.StateMachine` running KV commands in memory.  Test-only.

    Same commands, results, watch history and listeners as
    :class:`pyraft.kv.KVStateMachine`.  A snapshot is one msgpack value held
    in memory; ``open_snapshot`` returns an ``io.BytesIO`` over it.  Local
    reads: :meth:`get`, :meth:`items`, :meth:`range`, :meth:`events`, ...
    """

    def __init__(self, *, session_ttl: int = DEFAULT_SESSION_TTL, watch_history: int = DEFAULT_WATCH_HISTORY) -> None:
        # The same checks as KVStateMachine's: the two must agree on every command.
        if type(session_ttl) is not int or session_ttl < 1:
            raise ValueError(f"session_ttl must be an integer >= 1 (log entries), got {session_ttl!r}")
        if type(watch_history) is not int or watch_history < 1:
            raise ValueError(f"watch_history must be an integer >= 1 (revisions), got {watch_history!r}")
        self._session_ttl = session_ttl
        self._history = watch_history
        # _lock guards _st and _snapshot: apply/install change them under it,
        # readers and the snapshot builder copy under it.
        self._lock = threading.Lock()
        self._st = _MemoryState()
        self._snapshot: tuple[SnapshotMeta, bytes] | None = None

    # -- reads --------------------------------------------------------------------

    @contextmanager
    def view(self) -> Iterator[_MemoryView]:
        with self._lock:
            yield _MemoryView(self._st, self._history)

    def get(self, key: Any) -> Any:
        k = encode_key(key)
        with self._lock:
            raw = self._st.data.get(k)
        return None if raw is None else decode_value(record_value(raw))

    def items(self) -> list[tuple[Any, Any]]:
        with self._lock:
            rows = [(k, self._st.data[k]) for k in self._st.keys]
        return [(decode_key(k), decode_value(record_value(v))) for k, v in rows]

    def applied_state(self) -> tuple[LogId | None, StoredMembership | None]:
        with self._lock:
            return self._st.last_applied, self._st.membership

    @property
    def revision(self) -> int:
        with self._lock:
            return log_index(self._st.last_applied)

    # -- apply ------------------------------------------------------------------------

    def apply(self, entries: Sequence[Entry]) -> list[Any]:
        if not entries:
            return []
        with self._lock:
            st = self._st
            expect = log_index(st.last_applied) + 1
            for e in entries:
                if e.index != expect:
                    raise StorageError(f"state machine: entry {e.log_id} applied out of order "
                                       f"(next expected index {expect})")
                expect += 1
            backend = _MemoryBackend(st)
            membership = st.membership
            try:
                results = apply_entries(backend, entries, self._session_ttl)
                for e in entries:
                    if e.kind == EntryKind.MEMBERSHIP:
                        membership = StoredMembership(e.log_id, e.payload)
                backend.compact_events(entries[-1].index + 1 - self._history)
            except BaseException:
                backend.rollback()
                raise
            st.last_applied = entries[-1].log_id
            st.membership = membership
        if self._listeners:
            self._notify(entries[-1].index, tuple(backend.lease_changes))
        return results

    # -- snapshots ------------------------------------------------------------------------

    def build_snapshot(self) -> SnapshotMeta:
        with self._lock:
            st = self._st
            data = [(k, st.data[k]) for k in st.keys]
            sessions = [(c, s.to_bytes()) for c, s in st.sessions.items()]
            leases = sorted(st.leases.items())
            last, membership = st.last_applied, st.membership
        meta = SnapshotMeta(last, membership, f"{last or 'empty'}-{uuid.uuid4().hex[:12]}")
        blob = msgpack.packb({"version": _SNAPSHOT_VERSION, "meta": snapshot_meta_to_wire(meta),
                              "data": data, "sessions": sessions, "leases": leases}, use_bin_type=True)
        with self._lock:
            if self._snapshot is None or _newer(meta, self._snapshot[0]):
                self._snapshot = (meta, blob)
            return self._snapshot[0]

    def current_snapshot(self) -> SnapshotMeta | None:
        with self._lock:
            return None if self._snapshot is None else self._snapshot[0]

    def open_snapshot(self) -> tuple[SnapshotMeta, BinaryIO] | None:
        with self._lock:
            if self._snapshot is None:
                return None
            meta, blob = self._snapshot
        return meta, io.BytesIO(blob)

    def begin_receiving_snapshot(self) -> BinaryIO:
        return io.BytesIO()

    def install_snapshot(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        try:
            data.seek(0)
            blob = data.read()
        finally:
            data.close()
        st = _MemoryState()
        try:
            v = msgpack.unpackb(blob, raw=False, use_list=True, strict_map_key=False)
            if type(v) is not dict or v.get("version") != _SNAPSHOT_VERSION:
                raise CodecError("not a pyraft memory snapshot of a known version")
            snapshot_meta_from_wire(v["meta"])  # validates
            for lease_id, ttl in v["leases"]:
                st.leases[int(lease_id)] = float(ttl)
                st.lease_keys[int(lease_id)] = set()
            for k, rec in v["data"]:
                k, rec = bytes(k), bytes(rec)
                decode_key(k)
                lease = record_header(rec)[3]
                if lease:
                    st.lease_keys[lease].add(k)
                st.data[k] = rec
            st.keys = sorted(st.data)
            rows = [(bytes(c), Session.from_bytes(s)) for c, s in v["sessions"]]
        except CodecError as e:
            raise CodecError(f"state machine: snapshot {meta.snapshot_id} is malformed: {e}") from None
        except Exception as e:  # msgpack and shape errors of a corrupt blob
            raise CodecError(f"state machine: snapshot {meta.snapshot_id} is malformed: "
                             f"{e.__class__.__name__}: {e}") from None
        rows.sort(key=lambda r: r[1].index)
        st.sessions = dict(rows)
        st.last_applied = meta.last_log_id
        st.membership = meta.last_membership
        st.history_floor = log_index(meta.last_log_id) + 1
        with self._lock:
            self._st = st
            self._snapshot = (meta, blob)
        self._notify(log_index(meta.last_log_id), None)

    def close(self) -> None:
        """Nothing to release; the state stays for a simulated restart."""


def _newer(a: SnapshotMeta, b: SnapshotMeta) -> bool:
    return log_index(a.last_log_id) >= log_index(b.last_log_id)
