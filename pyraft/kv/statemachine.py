"""KVStateMachine: the built-in key-value state machine, kept in LMDB.

Layout in the node data directory ``path`` (see :mod:`pyraft.stores.lmdb`)::

    path/kv.lock      flock()ed while open: one live owner
    path/kv.lmdb/     LMDB environment, named databases:
        data           pack(key) -> pack(value)
        meta           b"format" -> 1
                       b"last_applied" -> [term, index]
                       b"membership" -> codec stored-membership wire
                       b"snapshot" -> [codec snapshot-meta wire, file name]  (the current snapshot)
        sessions       pack(client id) -> Session.to_bytes()  ([seq, index, result])
        session_index  index_key(session.index) + pack(client id) -> b""  (expiry order)
    path/snapshots/   snap-*.kvsnap: snapshot files; *.tmp: being built or received

Size quota (etcd's ``--quota-backend-bytes``): the store's size is the bytes
of the LMDB pages that hold its data (keys, values, sessions, b-tree
pages), measured after each applied batch.  Deletes lower it at once (LMDB
reuses freed pages; the file itself never shrinks).  Past ``quota_bytes``,
:meth:`KVStateMachine.check_command` refuses the commands that may add data
(``put``, ``cas``) with :class:`~pyraft.errors.NoSpace` before they are
proposed, on the node they are submitted to; reads, deletes, snapshots and
log purges go on, and writes resume by themselves once deletes bring the
size back under the quota (no alarm to disarm).  The decision is never made
in ``apply``: page usage differs from replica to replica, and every replica
must apply every entry alike.

The one rule that makes restarts exact: every effect of a batch of entries,
``last_applied``, the last membership and the sessions are written in ONE
LMDB write transaction (:meth:`KVStateMachine.apply`), so after a crash the
state and ``applied_state()`` always agree.  Installing a snapshot is one
write transaction too (drop everything, load the file, set the meta and the
current-snapshot pointer), so a crash leaves the old state or the new one.

Snapshot file: ``b"PYRAFTKV"``, then a msgpack stream: a header map
``{"version": 1, "meta": <snapshot-meta wire>}``, records ``[0, key, value]``
(in key order) and ``[1, client, session]``, an end record
``[2, n_data, n_sessions]``; then the CRC-32 of everything before it, 4 bytes
big-endian.  It is written under a ``.tmp`` name, fsynced and renamed, and
becomes current in a write transaction; superseded files are deleted.
"""
from __future__ import annotations

import os
import shutil
import threading
import uuid
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple, Sequence

import lmdb
import msgpack

from ..codec import (index_key, key_index, log_id_from_wire, log_id_to_wire, pack, stored_membership_from_wire,
                     stored_membership_to_wire, unpack)
from ..errors import CodecError, NoSpace, StorageError
from ..snapshot_files import (CHUNK, SnapshotDir, SnapshotWriter, durable, get_pointer, read_records, set_pointer,
                              unlink_quietly)
from ..stores.lmdb import (DEFAULT_MAP_SIZE, DEFAULT_MAX_MAP_SIZE, KV_ENV_NAME, KV_LOCK_NAME,
                           SNAPSHOT_DIR_NAME, LmdbEnv)
from ..types import Entry, EntryKind, LogId, SnapshotMeta, StoredMembership, log_index
from .commands import (ADDING_OPS, DEFAULT_SESSION_TTL, MAX_CLIENT_BYTES, MAX_KEY_BYTES, Session, apply_command,
                       check_command, decode_key, decode_value, encode_key)

__all__ = ["KVStateMachine", "KVReader", "KVStatus", "FORMAT_VERSION", "SNAPSHOT_MAGIC", "DEFAULT_QUOTA_BYTES"]

#: The default size quota: etcd's default (2 GiB), 1/32 of the LMDB map's default ceiling.
DEFAULT_QUOTA_BYTES = 2 * 1024 ** 3

FORMAT_VERSION = 1
SNAPSHOT_VERSION = 1
SNAPSHOT_MAGIC = b"PYRAFTKV"
_SNAP_SUFFIX = ".kvsnap"

_DATA, _META, _SESSIONS, _SINDEX = b"data", b"meta", b"sessions", b"session_index"
_K_FORMAT = b"format"
_K_APPLIED = b"last_applied"
_K_MEMBERSHIP = b"membership"
_K_SNAPSHOT = b"snapshot"

_REC_DATA, _REC_SESSION, _REC_END = 0, 1, 2


class _Dbs:
    __slots__ = ("data", "meta", "sessions", "sindex")

    def __init__(self, data: Any, meta: Any, sessions: Any, sindex: Any) -> None:
        self.data, self.meta, self.sessions, self.sindex = data, meta, sessions, sindex


class _LmdbBackend:
    """The KVBackend of one write transaction."""

    _UNKNOWN = -1

    def __init__(self, txn: lmdb.Transaction, dbs: _Dbs) -> None:
        self.txn = txn
        self.dbs = dbs
        # The smallest session index in session_index, None when empty, or _UNKNOWN.
        self._min: int | None = self._UNKNOWN

    def get(self, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self.dbs.data)

    def put(self, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.dbs.data)

    def delete(self, key: bytes) -> bool:
        return self.txn.delete(key, db=self.dbs.data)

    def get_session(self, client: bytes) -> Session | None:
        raw = self.txn.get(client, db=self.dbs.sessions)
        return None if raw is None else Session.from_bytes(raw)

    def put_session(self, client: bytes, session: Session, old: Session | None) -> None:
        if old is not None:
            self.txn.delete(index_key(old.index) + client, db=self.dbs.sindex)
            if self._min == old.index:
                self._min = self._UNKNOWN
        self.txn.put(client, session.to_bytes(), db=self.dbs.sessions)
        self.txn.put(index_key(session.index) + client, b"", db=self.dbs.sindex)
        if self._min is None:
            self._min = session.index

    def expire_sessions(self, before_index: int) -> None:
        if self._min is None or (self._min != self._UNKNOWN and self._min >= before_index):
            return
        cur = self.txn.cursor(db=self.dbs.sindex)
        while cur.first():
            k = cur.key()
            index = key_index(k[:8])
            if index >= before_index:
                self._min = index
                return
            self.txn.delete(k[8:], db=self.dbs.sessions)
            cur.delete()
        self._min = None


def _used_bytes(txn: lmdb.Transaction, dbs: "_Dbs") -> int:
    """The bytes of the pages that hold the store's databases (what the quota measures)."""
    total = 0
    for db in (dbs.data, dbs.meta, dbs.sessions, dbs.sindex):
        st = txn.stat(db)
        total += (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]
    return total


class KVStateMachine:
    """The built-in KV state machine (commands: :mod:`pyraft.kv.commands`) in LMDB.

    ``path`` is the node data directory (created if absent; may be shared with
    :class:`~pyraft.stores.lmdb.LmdbLogStore`).  Locked to this object while
    open.  ``session_ttl``: sessions idle for more than that many log indexes
    are forgotten.  ``quota_bytes``: the size quota (module docstring); at most
    half of ``max_map_size``, so that it trips while the map still has room
    for the writes already in flight and for the pages that long read
    transactions (a snapshot being built) keep alive.  Local reads from any
    thread: :meth:`get`, :meth:`items`.
    """

    #: Test hook: called with a label at the points where a crash matters
    #: ("install:renamed", "install:loading", "install:committed",
    #: "build:written", "build:committed").  Does nothing by default.
    _crash_point: Callable[[str], None] = staticmethod(lambda where: None)

    def __init__(self, path: str | os.PathLike, *, session_ttl: int = DEFAULT_SESSION_TTL,
                 map_size: int = DEFAULT_MAP_SIZE, max_map_size: int = DEFAULT_MAX_MAP_SIZE,
                 quota_bytes: int = DEFAULT_QUOTA_BYTES) -> None:
        if session_ttl < 1:
            raise ValueError("session_ttl must be >= 1")
        if type(quota_bytes) is not int or quota_bytes <= 0:
            raise ValueError(f"quota_bytes must be a positive integer, got {quota_bytes!r}")
        if type(max_map_size) is int and quota_bytes > max_map_size // 2:
            raise ValueError(f"quota_bytes ({quota_bytes}) must be at most half of max_map_size ({max_map_size}): "
                             f"the quota must trip well before the map is full")
        self._session_ttl = session_ttl
        self._quota = quota_bytes
        #: the store's size as of the last applied batch (see _used_bytes); replaced whole, read lock-free
        self._used = 0
        self._env = LmdbEnv(path, KV_ENV_NAME, KV_LOCK_NAME, what="KV state machine",
                            map_size=map_size, max_map_size=max_map_size)
        # _snap_lock guards _snapshot and the set of snap-*.kvsnap files:
        # whoever makes a file current or deletes one holds it.
        self._snap_lock = threading.Lock()
        try:
            self._snaps = SnapshotDir(os.path.join(self._env.root, SNAPSHOT_DIR_NAME), _SNAP_SUFFIX)
            self._dbs = self._open_dbs()
            with self._env.read() as txn:
                applied = log_id_from_wire(self._meta(txn, _K_APPLIED), "last_applied")
                membership = stored_membership_from_wire(self._meta(txn, _K_MEMBERSHIP))
                pointer = get_pointer(txn, self._dbs.meta, _K_SNAPSHOT)
                self._used = _used_bytes(txn, self._dbs)
            self._snapshot: tuple[SnapshotMeta, str] | None = self._snaps.existing(pointer)
            self._cleanup(at_open=True)
        except (CodecError, ValueError, TypeError) as e:
            self._env.close()
            raise StorageError(f"KV state machine in {self._env.root} is unreadable: {e}") from None
        except OSError as e:
            self._env.close()
            raise StorageError(f"KV state machine in {self._env.root}: {e}") from None
        except BaseException:
            self._env.close()
            raise
        # Replaced whole by apply/install after their transaction committed.
        self._applied: tuple[LogId | None, StoredMembership | None] = (applied, membership)

    def _open_dbs(self) -> _Dbs:
        env = self._env
        names = (_DATA, _META, _SESSIONS, _SINDEX)
        if env.is_pristine():
            def init(txn: lmdb.Transaction) -> _Dbs:
                dbs = _Dbs(*(env._live().open_db(n, txn=txn) for n in names))
                txn.put(_K_FORMAT, pack(FORMAT_VERSION), db=dbs.meta)
                return dbs
            return env.write(init)
        dbs = _Dbs(*env.open_existing_dbs(names))
        with env.read() as txn:
            version = self._meta(txn, _K_FORMAT, dbs)
        if version != FORMAT_VERSION:
            raise StorageError(f"KV state machine in {env.root} has format version {version!r}; "
                               f"this pyraft reads version {FORMAT_VERSION}")
        return dbs

    def _meta(self, txn: lmdb.Transaction, key: bytes, dbs: _Dbs | None = None) -> Any:
        return _meta_of(txn, dbs or self._dbs, key)

    # -- reads --------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The node data directory."""
        return self._env.root

    def get(self, key: Any) -> Any:
        """The value of ``key``, None when absent.  From any thread."""
        k = encode_key(key)
        with self._env.read(buffers=True) as txn:
            raw = txn.get(k, db=self._dbs.data)
            raw = None if raw is None else bytes(raw)
        return None if raw is None else decode_value(raw)

    def items(self) -> list[tuple[Any, Any]]:
        """Every ``(key, value)``, in key-encoding order (one consistent read)."""
        with self._env.read(buffers=True) as txn:
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._dbs.data)]
        return [(decode_key(k), decode_value(v)) for k, v in rows]

    def __len__(self) -> int:
        with self._env.read() as txn:
            return txn.stat(self._dbs.data)["entries"]

    def applied_state(self) -> tuple[LogId | None, StoredMembership | None]:
        return self._applied

    @property
    def quota_bytes(self) -> int:
        return self._quota

    @property
    def used_bytes(self) -> int:
        """The store's size as the quota measures it, as of the last applied batch."""
        return self._used

    # -- before proposing -----------------------------------------------------------------

    def check_command(self, command: Any) -> None:
        """Refuse a command before it is proposed (the Raft handle calls this; storage.py).

        NoSpace for a ``put`` or ``cas`` while the store is past its quota;
        KVCommandError for a key or client id the store cannot hold.  Any thread.
        """
        if self._used > self._quota and type(command) is dict and command.get("op") in ADDING_OPS:
            raise NoSpace(f"KV store in {self._env.root} is past its quota: {self._used} bytes in use, "
                          f"quota_bytes={self._quota}; delete keys (reads, deletes, snapshots and purges "
                          f"still work) or raise the quota")
        check_command(command)

    # -- apply ---------------------------------------------------------------------------

    def apply(self, entries: Sequence[Entry]) -> list[Any]:
        """Apply ``entries`` (continuing ``last_applied``) in ONE write transaction with the new applied state."""
        if not entries:
            return []
        last_applied, membership0 = self._applied
        expect = log_index(last_applied) + 1
        for e in entries:
            if e.index != expect:
                raise StorageError(f"KV state machine: entry {e.log_id} applied out of order "
                                   f"(next expected index {expect})")
            expect += 1
        dbs, ttl = self._dbs, self._session_ttl

        def run(txn: lmdb.Transaction) -> tuple[list[Any], StoredMembership | None]:
            backend = _LmdbBackend(txn, dbs)
            results: list[Any] = []
            membership = membership0
            for e in entries:
                if e.kind == EntryKind.NORMAL:
                    results.append(apply_command(backend, e.index, e.payload, ttl))
                else:
                    if e.kind == EntryKind.MEMBERSHIP:
                        membership = StoredMembership(e.log_id, e.payload)
                    results.append(None)
            txn.put(_K_APPLIED, pack(log_id_to_wire(entries[-1].log_id)), db=dbs.meta)
            if membership is not membership0:
                txn.put(_K_MEMBERSHIP, pack(stored_membership_to_wire(membership)), db=dbs.meta)
            return results, membership, _used_bytes(txn, dbs)

        results, membership, self._used = self._env.write(run)
        self._applied = (entries[-1].log_id, membership)
        return results

    # -- snapshots ---------------------------------------------------------------------------

    def current_snapshot(self) -> SnapshotMeta | None:
        with self._snap_lock:
            return None if self._snapshot is None else self._snapshot[0]

    def open_snapshot(self) -> tuple[SnapshotMeta, BinaryIO] | None:
        with self._snap_lock:
            if self._snapshot is None:
                return None
            meta, file = self._snapshot
            return meta, open(file, "rb")

    def build_snapshot(self) -> SnapshotMeta:
        """Stream one read transaction's view to a new snapshot file and make it current.

        Constant memory; ``apply`` may go on in another thread meanwhile.
        Returns the meta of the current snapshot afterwards (this one, unless
        a newer one was installed meanwhile).
        """
        with self._snaps.building() as tmp:
            with self._env.read(buffers=True) as txn:
                last = log_id_from_wire(self._meta(txn, _K_APPLIED), "last_applied")
                membership = stored_membership_from_wire(self._meta(txn, _K_MEMBERSHIP))
                meta = SnapshotMeta(last, membership, f"{last or 'empty'}-{uuid.uuid4().hex[:12]}")
                with durable(tmp) as f:
                    _write_snapshot(f, meta, txn, self._dbs)
            self._crash_point("build:written")
            with self._snap_lock:
                final = self._snaps.publish(tmp, meta)
                meta_db = self._dbs.meta
                # Not over a newer snapshot installed meanwhile.
                if self._env.write(lambda txn: set_pointer(txn, meta_db, _K_SNAPSHOT, meta, final,
                                                           unless_newer=True)):
                    self._snapshot = (meta, final)
                self._crash_point("build:committed")
                self._cleanup()
                assert self._snapshot is not None
                return self._snapshot[0]

    def begin_receiving_snapshot(self) -> BinaryIO:
        """A new empty file in the snapshot directory; an earlier partial one is dropped."""
        return self._snaps.begin_receiving()

    def install_snapshot(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        """Replace the whole state with the snapshot in ``data``, in ONE write transaction.

        The file is checked (magic, version, CRC, record shapes, key sizes,
        sessions, counts) while it loads; content that does not decode or
        validate aborts the transaction and raises CodecError with the old
        state untouched (storage.py: the snapshot is refused, the node goes
        on).  A failing disk raises StorageError or OSError.  ``data`` is
        closed here.
        """
        received = self._adopt(data)
        dbs = self._dbs
        crash = self._crash_point
        with self._snap_lock:
            final = self._snaps.publish(received, meta)
            crash("install:renamed")

            def load(txn: lmdb.Transaction) -> None:
                txn.drop(dbs.data, delete=False)
                txn.drop(dbs.sessions, delete=False)
                txn.drop(dbs.sindex, delete=False)
                with open(final, "rb") as f:
                    for n, rec in enumerate(_read_snapshot(f, meta)):
                        if n == 1000:
                            crash("install:loading")
                        kind, a, b = rec
                        if kind == _REC_DATA:
                            if not txn.put(a, b, db=dbs.data, append=True):
                                raise CodecError("data records are not in key order")
                        else:
                            try:
                                s = Session.from_bytes(b)
                            except (ValueError, TypeError, msgpack.UnpackException) as e:
                                raise CodecError(f"session record: {e}") from None
                            if not 0 <= s.index < 2**64:
                                raise CodecError(f"session record: log index {s.index} out of range")
                            txn.put(a, b, db=dbs.sessions)
                            txn.put(index_key(s.index) + a, b"", db=dbs.sindex)
                txn.put(_K_APPLIED, pack(log_id_to_wire(meta.last_log_id)), db=dbs.meta)
                txn.put(_K_MEMBERSHIP, pack(stored_membership_to_wire(meta.last_membership)), db=dbs.meta)
                set_pointer(txn, dbs.meta, _K_SNAPSHOT, meta, final)
                return _used_bytes(txn, dbs)

            try:
                used = self._env.write(load)
            except CodecError as e:
                unlink_quietly(final)
                raise CodecError(f"KV state machine in {self._env.root}: refused snapshot "
                                 f"{meta.snapshot_id}: {e}") from None
            except BaseException:
                unlink_quietly(final)
                raise
            self._used = used
            crash("install:committed")
            self._applied = (meta.last_log_id, meta.last_membership)
            self._snapshot = (meta, final)
            self._cleanup()

    def _adopt(self, data: BinaryIO) -> str:
        """Make ``data`` a durable file in the snapshot directory; close it; return its path."""
        name = getattr(data, "name", None)
        if isinstance(name, str) and os.path.dirname(os.path.abspath(name)) == self._snaps.path:
            if not data.closed:
                data.flush()
                os.fsync(data.fileno())
                data.close()
            else:
                with open(name, "rb+") as f:
                    os.fsync(f.fileno())
            self._snaps.forget_received(name)
            return name
        path = self._snaps.tmp_path("recv")
        try:
            data.seek(0)
            with durable(path) as f:
                shutil.copyfileobj(data, f, CHUNK)
        finally:
            data.close()
        return path

    def _cleanup(self, at_open: bool = False) -> None:
        self._snaps.cleanup(None if self._snapshot is None else self._snapshot[1], at_open)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> "KVStateMachine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVStateMachine({self._env.root!r})"

    @classmethod
    def open_readonly(cls, path: str | os.PathLike) -> "KVReader":
        """A read-only view of the KV state in node data directory ``path`` (for tools; works while the node runs)."""
        return KVReader(path)


class KVStatus(NamedTuple):
    """What :meth:`KVReader.status` reads in one transaction."""

    last_applied: LogId | None
    membership: StoredMembership | None
    snapshot: SnapshotMeta | None
    snapshot_file: str | None  # absolute path; may be gone if a newer snapshot replaced it
    keys: int


class KVReader:
    """Read-only access to a KVStateMachine's directory: no lock file taken, nothing written.

    Every method is one read transaction, so each answer is consistent even
    while the node applies entries in another process.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._env = LmdbEnv(path, KV_ENV_NAME, None, what="KV state machine", readonly=True)
        self._snap_dir = os.path.join(self._env.root, SNAPSHOT_DIR_NAME)
        try:
            self._dbs = _Dbs(*self._env.open_existing_dbs((_DATA, _META, _SESSIONS, _SINDEX)))
            with self._env.read() as txn:
                version = _meta_of(txn, self._dbs, _K_FORMAT)
        except BaseException:
            self._env.close()
            raise
        if version != FORMAT_VERSION:
            self._env.close()
            raise StorageError(f"KV state machine in {self._env.root} has format version {version!r}; "
                               f"this pyraft reads version {FORMAT_VERSION}")

    def status(self) -> KVStatus:
        """The applied state, the current snapshot and its file, the key count; CodecError if they do not decode."""
        with self._env.read() as txn:
            applied = log_id_from_wire(_meta_of(txn, self._dbs, _K_APPLIED), "last_applied")
            membership = stored_membership_from_wire(_meta_of(txn, self._dbs, _K_MEMBERSHIP))
            pointer = get_pointer(txn, self._dbs.meta, _K_SNAPSHOT)
            n = txn.stat(self._dbs.data)["entries"]
        snap, file = (None, None) if pointer is None else (pointer[0], os.path.join(self._snap_dir, pointer[1]))
        return KVStatus(applied, membership, snap, file, n)

    def state(self) -> tuple[LogId | None, StoredMembership | None, SnapshotMeta | None, int]:
        """``(last_applied, last membership, current snapshot meta, number of keys)``, read together."""
        try:
            s = self.status()
        except (CodecError, TypeError, IndexError) as e:
            raise StorageError(f"KV state machine in {self._env.root} is unreadable: {e}") from None
        return s.last_applied, s.membership, s.snapshot, s.keys

    @staticmethod
    def check_snapshot_file(path: str, meta: SnapshotMeta) -> tuple[int, int]:
        """Read the snapshot file ``path`` of ``meta`` whole, checking it; return ``(keys, sessions)``.

        Checks what install checks while it reads (magic, header, record
        shapes, counts, CRC); StorageError when the file is damaged, OSError
        when it cannot be read.
        """
        counts = [0, 0]
        with open(path, "rb") as f:
            try:
                for kind, _k, _v in _read_snapshot(f, meta):
                    counts[kind] += 1
            except CodecError as e:
                raise StorageError(str(e)) from None
        return counts[0], counts[1]

    def data_file_size(self) -> int:
        return self._env.data_file_size()

    def map_size(self) -> int:
        return self._env.map_size()

    def applied_state(self) -> tuple[LogId | None, StoredMembership | None]:
        applied, membership, _snap, _n = self.state()
        return applied, membership

    def get(self, key: Any) -> Any:
        k = encode_key(key)
        with self._env.read(buffers=True) as txn:
            raw = txn.get(k, db=self._dbs.data)
            raw = None if raw is None else bytes(raw)
        return None if raw is None else decode_value(raw)

    def items(self) -> list[tuple[Any, Any]]:
        with self._env.read(buffers=True) as txn:
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._dbs.data)]
        return [(decode_key(k), decode_value(v)) for k, v in rows]

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> "KVReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _meta_of(txn: lmdb.Transaction, dbs: _Dbs, key: bytes) -> Any:
    raw = txn.get(key, db=dbs.meta)
    return None if raw is None else unpack(bytes(raw), f"meta {key.decode()}")


# ---------------------------------------------------------------------------
# Snapshot files

def _write_snapshot(f: BinaryIO, meta: SnapshotMeta, txn: lmdb.Transaction, dbs: _Dbs) -> None:
    w = SnapshotWriter(f, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, meta)
    for k, v in txn.cursor(db=dbs.data):
        w.record(_REC_DATA, bytes(k), bytes(v))
    for k, v in txn.cursor(db=dbs.sessions):
        w.record(_REC_SESSION, bytes(k), bytes(v))
    w.finish(_REC_END)


def _read_snapshot(f: BinaryIO, meta: SnapshotMeta) -> Iterator[tuple[int, bytes, bytes]]:
    """Yield the data and session records of a snapshot file, checking it as it goes.

    Raises CodecError for any fault of the content, including (after the last
    record) a count or CRC mismatch: the caller's transaction must then abort.
    OSError when the file cannot be read.
    """
    records = read_records(f, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, meta, _REC_END, "KV snapshot file")
    while True:
        try:
            rec = next(records)
        except StopIteration:
            return
        except StorageError as e:  # read_records says the content is wrong
            raise CodecError(str(e)) from None
        if (len(rec) != 3 or rec[0] not in (_REC_DATA, _REC_SESSION)
                or type(rec[1]) is not bytes or type(rec[2]) is not bytes):
            raise CodecError("malformed snapshot record")
        # LMDB's key limit: a longer key would make the load fail as if the disk had.
        if len(rec[1]) > (MAX_KEY_BYTES if rec[0] == _REC_DATA else MAX_CLIENT_BYTES):
            raise CodecError(f"a snapshot record's key is {len(rec[1])} bytes, more than the store holds")
        yield rec[0], rec[1], rec[2]
