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

import io
import threading
import uuid
from typing import Any, BinaryIO, Sequence

import msgpack

from pyraft.codec import decode_entry, encode_entry, snapshot_meta_from_wire, snapshot_meta_to_wire
from pyraft.engine.commands import AppendToLog, PurgeLog, SaveCommitted, SaveVote, TruncateLog
from pyraft.errors import CodecError, StorageError
from pyraft.kv.commands import (DEFAULT_SESSION_TTL, Session, apply_command, decode_key, decode_value,
                                encode_key)
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
            for op, rows in zip(ops, encoded):
                if rows is not None:
                    for lid, data in rows:
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
    """A KVBackend over the state machine's dicts, with an undo log for the batch."""

    def __init__(self, data: dict[bytes, bytes], sessions: dict[bytes, Session]) -> None:
        self.data = data
        self.sessions = sessions  # insertion order == order of Session.index
        self.undo: list[tuple[str, bytes, Any]] = []

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.undo.append(("d", key, self.data.get(key)))
        self.data[key] = value

    def delete(self, key: bytes) -> bool:
        if key not in self.data:
            return False
        self.undo.append(("d", key, self.data.pop(key)))
        return True

    def get_session(self, client: bytes) -> Session | None:
        return self.sessions.get(client)

    def put_session(self, client: bytes, session: Session, old: Session | None) -> None:
        self.undo.append(("s", client, self.sessions.pop(client, None)))
        self.sessions[client] = session  # re-inserted last: the dict stays ordered by index

    def expire_sessions(self, before_index: int) -> None:
        while self.sessions:
            client, s = next(iter(self.sessions.items()))
            if s.index >= before_index:
                return
            self.undo.append(("s", client, self.sessions.pop(client)))

    def rollback(self) -> None:
        for kind, k, old in reversed(self.undo):
            target: dict = self.data if kind == "d" else self.sessions
            if old is None:
                target.pop(k, None)
            else:
                target[k] = old
        self.undo.clear()


_SNAPSHOT_VERSION = 1


class MemoryStateMachine:
    """A :class:`~pyraft.storage.StateMachine` running KV commands in memory.  Test-only.

    Same commands and results as :class:`pyraft.kv.KVStateMachine`.  A
    snapshot is one msgpack value held in memory; ``open_snapshot`` returns
    an ``io.BytesIO`` over it.  Local reads: :meth:`get`, :meth:`items`.
    """

    def __init__(self, *, session_ttl: int = DEFAULT_SESSION_TTL) -> None:
        self._session_ttl = session_ttl
        # _lock guards every field below: apply/install change them under it,
        # readers and the snapshot builder copy under it.
        self._lock = threading.Lock()
        self._data: dict[bytes, bytes] = {}
        self._sessions: dict[bytes, Session] = {}
        self._last_applied: LogId | None = None
        self._membership: StoredMembership | None = None
        self._snapshot: tuple[SnapshotMeta, bytes] | None = None

    # -- reads --------------------------------------------------------------------

    def get(self, key: Any) -> Any:
        k = encode_key(key)
        with self._lock:
            raw = self._data.get(k)
        return None if raw is None else decode_value(raw)

    def items(self) -> list[tuple[Any, Any]]:
        with self._lock:
            rows = sorted(self._data.items())
        return [(decode_key(k), decode_value(v)) for k, v in rows]

    def applied_state(self) -> tuple[LogId | None, StoredMembership | None]:
        with self._lock:
            return self._last_applied, self._membership

    # -- apply ------------------------------------------------------------------------

    def apply(self, entries: Sequence[Entry]) -> list[Any]:
        if not entries:
            return []
        with self._lock:
            expect = log_index(self._last_applied) + 1
            for e in entries:
                if e.index != expect:
                    raise StorageError(f"state machine: entry {e.log_id} applied out of order "
                                       f"(next expected index {expect})")
                expect += 1
            backend = _MemoryBackend(self._data, self._sessions)
            results: list[Any] = []
            membership = self._membership
            try:
                for e in entries:
                    if e.kind == EntryKind.NORMAL:
                        results.append(apply_command(backend, e.index, e.payload, self._session_ttl))
                    else:
                        if e.kind == EntryKind.MEMBERSHIP:
                            membership = StoredMembership(e.log_id, e.payload)
                        results.append(None)
            except BaseException:
                backend.rollback()
                raise
            self._last_applied = entries[-1].log_id
            self._membership = membership
            return results

    # -- snapshots ------------------------------------------------------------------------

    def build_snapshot(self) -> SnapshotMeta:
        with self._lock:
            data = list(self._data.items())
            sessions = [(c, s.to_bytes()) for c, s in self._sessions.items()]
            last, membership = self._last_applied, self._membership
        meta = SnapshotMeta(last, membership, f"{last or 'empty'}-{uuid.uuid4().hex[:12]}")
        blob = msgpack.packb({"version": _SNAPSHOT_VERSION, "meta": snapshot_meta_to_wire(meta),
                              "data": data, "sessions": sessions}, use_bin_type=True)
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
        try:
            v = msgpack.unpackb(blob, raw=False, use_list=True, strict_map_key=False)
            if type(v) is not dict or v.get("version") != _SNAPSHOT_VERSION:
                raise CodecError("not a pyraft memory snapshot of a known version")
            snapshot_meta_from_wire(v["meta"])  # validates
            new_data = {bytes(k): bytes(val) for k, val in v["data"]}
            rows = [(bytes(c), Session.from_bytes(s)) for c, s in v["sessions"]]
        except CodecError as e:
            raise CodecError(f"state machine: snapshot {meta.snapshot_id} is malformed: {e}") from None
        except Exception as e:  # msgpack and shape errors of a corrupt blob
            raise CodecError(f"state machine: snapshot {meta.snapshot_id} is malformed: "
                             f"{e.__class__.__name__}: {e}") from None
        rows.sort(key=lambda r: r[1].index)
        with self._lock:
            self._data = new_data
            self._sessions = dict(rows)
            self._last_applied = meta.last_log_id
            self._membership = meta.last_membership
            self._snapshot = (meta, blob)

    def close(self) -> None:
        """Nothing to release; the state stays for a simulated restart."""


def _newer(a: SnapshotMeta, b: SnapshotMeta) -> bool:
    return log_index(a.last_log_id) >= log_index(b.last_log_id)
