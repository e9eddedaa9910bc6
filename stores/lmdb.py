"""LMDB storage: the Raft log (:class:`LmdbLogStore`) and the plumbing it shares
with :class:`pyraft.kv.KVStateMachine`.

Node data directory
-------------------

``DATA_DIR`` is the one directory a node keeps its state in (what
``pyraft-kv serve --data-dir`` is given).  ``LmdbLogStore(DATA_DIR)`` and
``KVStateMachine(DATA_DIR)`` share it, each under its own names::

    DATA_DIR/
        log.lock      flock()ed by the process that has the log store open
        log.lmdb/     the log store's LMDB environment (data.mdb, lock.mdb)
        kv.lock       flock()ed by the process that has the KV state machine open
        kv.lmdb/      the KV state machine's LMDB environment
        snapshots/    the KV state machine's snapshot files

The names are the ``*_NAME`` constants below; :func:`node_dir_layout` turns a
``DATA_DIR`` into the paths, for tools such as ``pyraft-inspect``.

Directories the stores create are 0700 and files 0600: never readable by other
users.  Every name in the layout is made durable (its directory fsynced, see
:func:`sync_dir`) before anything is written under it.

Log environment (``log.lmdb``)
------------------------------

Two named databases, every value msgpack (:func:`pyraft.codec.pack`):

``meta``
    ``b"format"`` -> :data:`FORMAT_VERSION`; ``b"node_id"`` -> int;
    ``b"cluster_name"`` -> str; ``b"vote"`` -> ``[term, node_id]``;
    ``b"committed"`` and ``b"purged"`` -> ``[term, index]``.
``log``
    :func:`pyraft.codec.index_key` (8-byte big-endian index) ->
    :func:`pyraft.codec.encode_entry` bytes, written with ``append=True``.

Invariants (kept by :meth:`LmdbLogStore.write`, checked by ``verify``): the
keys of ``log`` are consecutive; the first one is ``purged.index + 1`` (or 1
when nothing was purged) unless the log is empty; every batch of ops is one
write transaction, so a crash leaves whole batches or nothing.

Durability: with the default ``sync=True`` every :meth:`LmdbLogStore.write`
returns only after LMDB's commit has fsynced.  ``sync=False`` skips that and
may lose *acknowledged* writes on a power loss or OS crash (not on a process
crash); a Raft node that acknowledges entries it then loses can break the
safety of the whole cluster, so use it only for throw-away benchmarks.
"""
from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence, TypeVar, overload

import lmdb

from pyraft.codec import (decode_entries, decode_entry, encode_entries, index_key, key_index, log_id_from_wire,
                          log_id_to_wire, pack, unpack, vote_from_wire, vote_to_wire)
from pyraft.engine.commands import AppendToLog, PurgeLog, SaveCommitted, SaveVote, TruncateLog
from pyraft.errors import CodecError, Fatal, StorageError
from pyraft.storage import LogOp, LogState
from pyraft.types import Entry, LogId, Vote, log_index

__all__ = [
    "LmdbLogStore", "LmdbLogReader", "LogStoreMeta", "LogView", "NodeDirLayout", "node_dir_layout",
    "FORMAT_VERSION", "LOG_ENV_NAME", "LOG_LOCK_NAME", "KV_ENV_NAME", "KV_LOCK_NAME",
    "SNAPSHOT_DIR_NAME", "DEFAULT_MAP_SIZE", "DEFAULT_MAX_MAP_SIZE", "LmdbEnv", "make_dirs", "sync_dir",
]

#: Version of the log environment's layout (above) and entry encoding.
FORMAT_VERSION = 1

LOG_ENV_NAME = "log.lmdb"
LOG_LOCK_NAME = "log.lock"
KV_ENV_NAME = "kv.lmdb"
KV_LOCK_NAME = "kv.lock"
SNAPSHOT_DIR_NAME = "snapshots"

DEFAULT_MAP_SIZE = 64 * 1024 * 1024           # initial map; doubled on demand
DEFAULT_MAX_MAP_SIZE = 64 * 1024 * 1024 * 1024  # the ceiling: past it, write() raises Fatal
DEFAULT_MAX_READERS = 512                      # read transactions open at once, all processes

_META = b"meta"
_LOG = b"log"
_K_FORMAT = b"format"
_K_NODE_ID = b"node_id"
_K_CLUSTER = b"cluster_name"
_K_VOTE = b"vote"
_K_COMMITTED = b"committed"
_K_PURGED = b"purged"

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NodeDirLayout:
    """The paths of a node data directory (see the module docstring)."""

    root: str
    log_env: str
    log_lock: str
    kv_env: str
    kv_lock: str
    snapshots: str


def node_dir_layout(data_dir: str | os.PathLike) -> NodeDirLayout:
    root = os.path.abspath(os.fspath(data_dir))
    j = os.path.join
    return NodeDirLayout(root, j(root, LOG_ENV_NAME), j(root, LOG_LOCK_NAME), j(root, KV_ENV_NAME),
                         j(root, KV_LOCK_NAME), j(root, SNAPSHOT_DIR_NAME))


# ---------------------------------------------------------------------------
# Shared LMDB plumbing (also used by pyraft.kv.statemachine)

class _MapGate:
    """Guards this process's memory map of one environment.

    Every transaction holds it shared; ``set_mapsize`` and ``close`` hold it
    exclusive, because LMDB replaces the map under any transaction still open
    in the process.  Writer-preferring, so a resize is not starved by a stream
    of readers.  Not reentrant: never open a transaction inside another.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0             # transactions open now           (guarded by _cond)
        self._exclusive = False      # a resize or close is running     (guarded by _cond)
        self._exclusive_waiting = 0  # resizes/closes waiting to start  (guarded by _cond)

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive or self._exclusive_waiting:
                self._cond.wait()
            self._shared += 1

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            if self._shared == 0:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def sync_dir(path: str, what: str) -> None:
    """fsync the directory ``path``: the names in it (new, renamed, removed) are then durable.

    POSIX makes a new name durable only once its directory is fsynced.  ext4 and
    xfs also commit it with the next fsync of any file, which hides a missing
    directory fsync there, not on every filesystem: without it a power loss may
    take a fresh node's whole log with it, every acknowledged write included.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise StorageError(f"{what}: cannot fsync directory {path}: {e.strerror or e}") from None


def make_dirs(path: str, what: str) -> None:
    """Create ``path`` and its missing parents, mode 0700, each one durable in its parent.

    Data directories are private: never readable by other users, not even while
    they are being made.
    """
    missing = []
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else, who makes it durable
        except OSError as e:
            raise StorageError(f"{what}: cannot create directory {d}: {e.strerror or e}") from None
        sync_dir(os.path.dirname(d), what)


def _prepare_dir(root: str, what: str) -> None:
    """Create ``root`` if absent (see :func:`make_dirs`) and check that this process can write in it."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise StorageError(f"{what}: {root} exists and is not a directory")
    make_dirs(root, what)
    if not os.path.isdir(root):
        raise StorageError(f"{what}: {root} is not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise StorageError(f"{what}: directory {root} is not writable by this process "
                           f"(open it read-only with the inspect tools, or fix its permissions)")


def _lock_file(lock_path: str, what: str, root: str) -> int:
    """Take the exclusive flock that makes ``root`` this process's and this store's alone.

    A new lock file is created 0600 (its name is made durable with the
    environment's, by :meth:`LmdbEnv._open_writable`).  flock() belongs to
    the open file, so a second open in the same process is refused as well as
    one in another process.  Returns the descriptor, which
    holds the lock until it is closed (also by process death).
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StorageError(f"{what}: cannot open lock file {lock_path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
        except OSError:
            holder = "?"
        os.close(fd)
        mine = " (this process)" if holder == str(os.getpid()) else ""
        raise StorageError(f"{what} in {root} is already open, locked by process {holder}{mine} "
                           f"through {lock_path}; one directory serves one live node") from None
    except OSError as e:
        os.close(fd)
        raise StorageError(f"{what}: cannot lock {lock_path}: {e.strerror or e}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        pass  # the pid is only a diagnostic
    return fd


def _storage_error(what: str, where: str, e: BaseException) -> StorageError:
    if isinstance(e, lmdb.InvalidError):
        return StorageError(f"{what}: {where} is not an LMDB environment (or is corrupt): {e}")
    if isinstance(e, lmdb.VersionMismatchError):
        return StorageError(f"{what}: {where} was written by an incompatible LMDB version: {e}")
    return StorageError(f"{what}: LMDB failed on {where}: {e}")


def check_not_truncated(env_path: str, what: str) -> None:
    """StorageError for a data.mdb shorter than the pages its meta page says are in use.

    LMDB maps the file: touching a page past its end kills the process with
    SIGBUS instead of raising, so a truncated file must be caught before any
    read.  The check opens the environment without its lock file and reads
    only the two meta pages (LMDB validates them itself).

    The meta is read before the file's size: a running writer writes new
    pages (growing the file) before the meta that counts them, so a size
    taken after the meta is never short on a sound file.
    """
    data = os.path.join(env_path, "data.mdb")

    def file_size() -> int:
        try:
            return os.path.getsize(data)
        except OSError as e:
            raise StorageError(f"{what}: cannot read {data}: {e.strerror or e}") from None

    if file_size() == 0:
        raise StorageError(f"{what}: {data} is empty")
    try:
        env = lmdb.open(env_path, readonly=True, lock=False, subdir=True, create=False, max_dbs=8)
    except lmdb.Error as e:
        raise _storage_error(what, env_path, e) from None
    try:
        last_pgno = env.info()["last_pgno"]
        psize = env.stat()["psize"]
    finally:
        env.close()
    size = file_size()
    need = (last_pgno + 1) * psize
    if size < need:
        raise StorageError(f"{what}: {data} is truncated: {size} bytes, but LMDB has {last_pgno + 1} pages "
                           f"of {psize} bytes ({need} bytes) in use")


class LmdbEnv:
    """One LMDB environment in ``root/env_name``, owned by this object.

    Writable mode: ``root`` is created if absent, ``root/lock_name`` is
    flock()ed for the object's lifetime, and :meth:`write` grows the map
    (doubling, up to ``max_map_size``) when LMDB reports it full.  ``prepare``,
    if given, is called with the environment's path once the lock is held and
    before LMDB opens it (a store may discard an environment it cannot trust).
    ``sync=False`` commits without fsync (LMDB's NOSYNC and NOMETASYNC): a
    process crash loses nothing, an operating-system crash may lose or tear the
    writes since the last :meth:`sync`.  Read-only
    mode (``lock_name=None``, ``readonly=True``): no lock file is taken and the
    environment must exist; it works while the owner writes in another
    process.  Thread-safe: transactions from any thread; never nest them.
    """

    def __init__(self, root: str | os.PathLike, env_name: str, lock_name: str | None, *, what: str,
                 readonly: bool = False, sync: bool = True, map_size: int = DEFAULT_MAP_SIZE,
                 max_map_size: int = DEFAULT_MAX_MAP_SIZE, max_readers: int = DEFAULT_MAX_READERS,
                 max_dbs: int = 8, prepare: Callable[[str], None] | None = None) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.env_path = os.path.join(self.root, env_name)
        self.what = what
        self.readonly = readonly
        #: False when the read-only opening had to do without LMDB's lock file:
        #: reads may then be inconsistent while the owner writes.
        self.consistent = True
        if map_size <= 0 or max_map_size <= 0:
            raise ValueError("map_size and max_map_size must be positive")
        self._max_map_size = max_map_size
        self._gate = _MapGate()
        # Serializes write transactions: at most one thread of this process is
        # inside (or waiting for) LMDB's writer lock, and it holds no gate
        # while waiting here.
        self._write_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._env: lmdb.Environment | None = None
        if readonly:
            self._env = self._open_readonly(max_dbs)
            return
        _prepare_dir(self.root, what)
        assert lock_name is not None
        self._lock_fd = _lock_file(os.path.join(self.root, lock_name), what, self.root)
        try:
            if prepare is not None:
                prepare(self.env_path)
            self._env = self._open_writable(sync, map_size, max_readers, max_dbs)
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise

    def _open_writable(self, sync: bool, map_size: int, max_readers: int, max_dbs: int) -> lmdb.Environment:
        p = self.env_path
        if os.path.lexists(p) and not os.path.isdir(p):
            raise StorageError(f"{self.what}: {p} should be an LMDB environment directory but is a file")
        try:
            # An empty data.mdb is a store that never committed (a crash during the first start, or
            # sync=False after a power loss): LMDB sets it up as a new one, as before it existed.
            existed = os.path.getsize(os.path.join(p, "data.mdb")) > 0
        except FileNotFoundError:
            existed = False
        except OSError as e:
            raise StorageError(f"{self.what}: cannot read {p}: {e.strerror or e}") from None
        if existed:
            check_not_truncated(p, self.what)
        # Made here, 0700: py-lmdb would give the directory the files' mode (0600, no x bit).
        make_dirs(p, self.what)
        try:
            # An existing environment first adopts the map size it persisted
            # (it may have grown past map_size); then it gets at least map_size.
            env = lmdb.open(p, map_size=0 if existed else _round_page(map_size), subdir=True,
                            readonly=False, sync=sync, metasync=sync, max_dbs=max_dbs,
                            max_readers=max_readers, lock=True, create=True, mode=0o600)
        except lmdb.Error as e:
            raise _storage_error(self.what, p, e) from None
        except OSError as e:
            raise StorageError(f"{self.what}: cannot open {p}: {e.strerror or e}") from None
        try:
            # The names of data.mdb and lock.mdb, and of the lock file beside the
            # environment, durable before anything is written: LMDB's commits sync
            # the files, never their directories (see sync_dir).  At every opening,
            # not only the first, so that a crash between LMDB creating the files
            # and these syncs is mended before the node acknowledges anything.
            sync_dir(p, self.what)
            sync_dir(self.root, self.what)
            if env.info()["map_size"] < map_size:
                env.set_mapsize(_round_page(map_size))
            # Free the reader slots of dead processes (a reader killed inside a
            # transaction would otherwise pin old pages and grow the file).
            env.reader_check()
        except lmdb.Error as e:
            env.close()
            raise _storage_error(self.what, p, e) from None
        except BaseException:
            env.close()
            raise
        return env

    def _open_readonly(self, max_dbs: int) -> lmdb.Environment:
        p = self.env_path
        if not os.path.isdir(p) or not os.path.isfile(os.path.join(p, "data.mdb")):
            raise StorageError(f"{self.what}: no LMDB environment at {p}")
        try:
            return lmdb.open(p, map_size=0, subdir=True, readonly=True, lock=True, max_dbs=max_dbs,
                             create=False)
        except lmdb.Error as e:
            code = getattr(e, "code", 0)
            if code not in (errno.EACCES, errno.EPERM, errno.EROFS):
                if "already open" in str(e):
                    raise StorageError(f"{self.what}: {p} is already open in this process; "
                                       f"use that store's own read methods") from None
                raise _storage_error(self.what, p, e) from None
        # LMDB's lock file is not writable for us: read without it.  Transactions
        # then cannot pin their pages against a concurrent writer.
        try:
            env = lmdb.open(p, map_size=0, subdir=True, readonly=True, lock=False, max_dbs=max_dbs,
                            create=False)
        except lmdb.Error as e:
            raise _storage_error(self.what, p, e) from None
        self.consistent = False
        return env

    # -- transactions ----------------------------------------------------------

    def _live(self) -> lmdb.Environment:
        env = self._env
        if env is None:
            raise StorageError(f"{self.what} in {self.root} is closed")
        return env

    @overload
    def _begin_shared(self, write: bool, buffers: Literal[False]) -> lmdb.Transaction[bytes]: ...

    @overload
    def _begin_shared(self, write: bool, buffers: bool) -> lmdb.Transaction: ...

    def _begin_shared(self, write: bool, buffers: bool) -> lmdb.Transaction:
        """Take the gate shared and begin a transaction; the caller releases the gate."""
        while True:
            self._gate.acquire_shared()
            try:
                # Two calls: py-lmdb's type hints know the values' type from a literal ``buffers``.
                env = self._live()
                return env.begin(write=write, buffers=True) if buffers else env.begin(write=write)
            except lmdb.MapResizedError:
                # Another process (the writer) grew the map: adopt its size.
                self._gate.release_shared()
                with self._gate.exclusive():
                    self._live().set_mapsize(0)
            except lmdb.Error as e:
                self._gate.release_shared()
                raise _storage_error(self.what, self.env_path, e) from None
            except BaseException:
                self._gate.release_shared()
                raise

    @contextmanager
    def read(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A read transaction: a consistent view of the last committed state.

        With ``buffers=True`` values are memoryviews valid only inside the
        ``with``: copy what you keep.
        """
        txn = self._begin_shared(False, buffers)
        try:
            yield txn
        except lmdb.Error as e:
            raise _storage_error(self.what, self.env_path, e) from None
        finally:
            try:
                txn.abort()
            finally:
                self._gate.release_shared()

    def write(self, fn: Callable[[lmdb.Transaction[bytes]], T]) -> T:
        """Run ``fn(txn)`` in one write transaction and commit it; return its result.

        When LMDB reports the map full, the transaction is aborted, the map
        doubled, and ``fn`` run again from scratch (so ``fn`` must not have
        effects outside ``txn``).  Past ``max_map_size`` this raises
        :class:`Fatal`.  Any other exception aborts the transaction: nothing
        of it is stored.  From any thread; write transactions are serialized.
        """
        if self.readonly:
            raise StorageError(f"{self.what} at {self.root} is opened read-only")
        with self._write_lock:
            while True:
                txn = self._begin_shared(True, False)
                try:
                    result = fn(txn)
                    txn.commit()
                except BaseException as e:
                    # Abort with this process's readers held off: py-lmdb 3.0's
                    # abort of a write transaction can starve indefinitely
                    # behind other threads' busy read transactions.
                    self._gate.release_shared()
                    with self._gate.exclusive():
                        try:
                            txn.abort()
                        except lmdb.Error:
                            pass  # a failed commit has already ended it
                        if isinstance(e, lmdb.MapFullError):
                            self._grow_exclusive()
                            continue
                    if isinstance(e, lmdb.Error):
                        raise _storage_error(self.what, self.env_path, e) from None
                    raise
                self._gate.release_shared()
                return result

    def sync(self) -> None:
        """Flush every committed write transaction to disk (fsync); a no-op cost when nothing is unsynced."""
        self._gate.acquire_shared()
        try:
            self._live().sync(True)
        except lmdb.Error as e:
            raise _storage_error(self.what, self.env_path, e) from None
        finally:
            self._gate.release_shared()

    def _grow_exclusive(self) -> None:
        """Double the map (the gate is held exclusive); Fatal past max_map_size."""
        env = self._live()
        info = env.info()
        size = info["map_size"]
        used = (info["last_pgno"] + 1) * _PAGE
        ceiling = _round_page_down(self._max_map_size)
        if size >= ceiling:
            raise Fatal(
                f"{self.what} in {self.root} is full: its LMDB map reached max_map_size="
                f"{self._max_map_size} bytes ({used} bytes in use). Raise max_map_size, "
                f"or free space (purge the log / snapshot, free disk) and restart the node")
        new = min(size * 2, ceiling)
        try:
            env.set_mapsize(new)
        except lmdb.Error as e:
            raise Fatal(f"{self.what} in {self.root}: cannot grow the LMDB map to {new} bytes "
                        f"({e}); free disk space and restart the node") from None

    # -- databases ---------------------------------------------------------------

    def is_pristine(self) -> bool:
        """True when the environment holds nothing at all (no named database yet)."""
        with self.read() as txn:
            return not txn.cursor().first()

    def open_existing_dbs(self, names: Sequence[bytes]) -> tuple[Any, ...]:
        """Handles of named databases that must already exist (StorageError otherwise)."""
        out = []
        env = self._live()
        for name in names:
            # Without txn=, py-lmdb opens the handle in a transaction of its
            # own that it commits (a handle opened in a read transaction we
            # end ourselves would be discarded with it).
            self._gate.acquire_shared()
            try:
                out.append(env.open_db(name, create=False))
            except lmdb.Error as e:
                raise StorageError(f"{self.what}: {self.env_path} is not a pyraft {self.what} "
                                   f"(database {name.decode()!r}: {e})") from None
            finally:
                self._gate.release_shared()
        return tuple(out)

    def map_size(self) -> int:
        return self._live().info()["map_size"]

    def data_file_size(self) -> int:
        return os.path.getsize(os.path.join(self.env_path, "data.mdb"))

    def close(self) -> None:
        """Close the environment and release the directory lock.  Idempotent."""
        with self._gate.exclusive():
            env, self._env = self._env, None
            if env is not None:
                env.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._env is None


def _round_page(n: int) -> int:
    return max(_PAGE, -(-n // _PAGE) * _PAGE)


def _round_page_down(n: int) -> int:
    return max(_PAGE, n // _PAGE * _PAGE)


# ---------------------------------------------------------------------------
# Reading the log environment (shared by the store and the read-only reader)

@dataclass(frozen=True, slots=True)
class LogStoreMeta:
    """What the ``meta`` database of a log environment records."""

    format_version: int | None
    node_id: int | None
    cluster_name: str | None
    vote: Vote | None
    committed: LogId | None
    purged: LogId | None


def _meta_value(txn: lmdb.Transaction, db: Any, key: bytes) -> Any:
    raw = txn.get(key, db=db)
    return None if raw is None else unpack(bytes(raw), f"meta {key.decode()}")


def _read_meta(txn: lmdb.Transaction, db: Any) -> LogStoreMeta:
    vote = _meta_value(txn, db, _K_VOTE)
    return LogStoreMeta(
        format_version=_meta_value(txn, db, _K_FORMAT),
        node_id=_meta_value(txn, db, _K_NODE_ID),
        cluster_name=_meta_value(txn, db, _K_CLUSTER),
        vote=None if vote is None else vote_from_wire(vote),
        committed=log_id_from_wire(_meta_value(txn, db, _K_COMMITTED), "committed"),
        purged=log_id_from_wire(_meta_value(txn, db, _K_PURGED), "purged"),
    )


def _read_log_state(txn: lmdb.Transaction, meta_db: Any, log_db: Any) -> LogState:
    purged = log_id_from_wire(_meta_value(txn, meta_db, _K_PURGED), "purged")
    cur = txn.cursor(db=log_db)
    if not cur.last():
        return LogState(purged, purged)
    index = key_index(bytes(cur.key()))
    return LogState(purged, LogId(decode_entry(index, bytes(cur.value())).term, index))


def _read_raw(txn: lmdb.Transaction, log_db: Any, start: int, stop: int) -> list[tuple[int, bytes]]:
    """Copies of the stored entries ``start <= index < stop``: a consecutive prefix of the range."""
    out: list[tuple[int, bytes]] = []
    if stop <= start or start < 1:
        return out
    cur = txn.cursor(db=log_db)
    if not cur.set_key(index_key(start)):
        return out
    expect = start
    while expect < stop:
        k = key_index(bytes(cur.key()))
        if k != expect:
            break
        out.append((k, bytes(cur.value())))
        expect += 1
        if not cur.next():
            break
    return out


# ---------------------------------------------------------------------------
# The store

@dataclass(frozen=True, slots=True)
class _Cached:
    """What the writer knows after its last commit (replaced whole, so reads need no lock)."""

    state: LogState
    vote: Vote | None
    committed: LogId | None


class LmdbLogStore:
    """The Raft log, vote and committed log id in LMDB (see the module docstring).

    ``path`` is the node data directory (created if absent); the environment
    is ``path/log.lmdb``.  The directory is locked to this object while it is
    open: a second opening, in this process or another, raises
    :class:`StorageError` at once.  ``node_id`` and ``cluster_name``, when
    given, are recorded on first use and checked on every later opening.

    ``sync=False`` trades durability for speed: LMDB then does not fsync at
    commit, and a power loss or OS crash may lose writes that ``write()``
    already acknowledged (a Raft safety violation).  Leave it ``True`` for any
    data you care about.

    ``map_size`` is the initial LMDB map; it doubles when full, up to
    ``max_map_size``, past which :meth:`write` raises :class:`Fatal`.

    Threads: :meth:`write` from one thread (RaftCore); every read method from
    any thread, and from other processes through :meth:`open_readonly`.
    """

    def __init__(self, path: str | os.PathLike, *, node_id: int | None = None,
                 cluster_name: str | None = None, sync: bool = True, map_size: int = DEFAULT_MAP_SIZE,
                 max_map_size: int = DEFAULT_MAX_MAP_SIZE, max_readers: int = DEFAULT_MAX_READERS,
                 write_delay: float = 0.0) -> None:
        #: Test hook (fault injection: a slow disk): seconds to sleep before each
        #: write transaction commits.  0 (the default) does nothing.  May be changed
        #: at any time from any thread; ``pyraft-kv serve --fault-control`` sets it.
        self.write_delay = float(write_delay)
        self._env = LmdbEnv(path, LOG_ENV_NAME, LOG_LOCK_NAME, what="log store", sync=sync,
                            map_size=map_size, max_map_size=max_map_size, max_readers=max_readers)
        try:
            self._meta_db, self._log_db = self._open_dbs(node_id, cluster_name)
            with self._env.read() as txn:
                meta = _read_meta(txn, self._meta_db)
                state = _read_log_state(txn, self._meta_db, self._log_db)
        except CodecError as e:
            self._env.close()
            raise StorageError(f"log store in {self._env.root} is unreadable: {e}") from None
        except BaseException:
            self._env.close()
            raise
        # _write_mutex guards _cached: write() holds it from reading the old
        # value to publishing the new one (after the commit).  Readers just
        # load the attribute: it is replaced whole, never mutated.
        self._write_mutex = threading.Lock()
        self._cached = _Cached(state, meta.vote, meta.committed)

    @classmethod
    def open_readonly(cls, path: str | os.PathLike) -> "LmdbLogReader":
        """A read-only view of the log store in node data directory ``path`` (for tools).

        Takes no lock and writes nothing; works while the node runs.
        """
        return LmdbLogReader(path)

    def _open_dbs(self, node_id: int | None, cluster_name: str | None) -> tuple[Any, Any]:
        env = self._env
        if env.is_pristine():
            def init(txn: lmdb.Transaction) -> tuple[Any, Any]:
                e = env._live()
                meta = e.open_db(_META, txn=txn)
                log = e.open_db(_LOG, txn=txn)
                txn.put(_K_FORMAT, pack(FORMAT_VERSION), db=meta)
                if node_id is not None:
                    txn.put(_K_NODE_ID, pack(node_id), db=meta)
                if cluster_name is not None:
                    txn.put(_K_CLUSTER, pack(cluster_name), db=meta)
                return meta, log
            return env.write(init)
        meta_db, log_db = env.open_existing_dbs((_META, _LOG))
        with env.read() as txn:
            meta = _read_meta(txn, meta_db)
        where = env.root
        if meta.format_version is None:
            raise StorageError(f"log store: {env.env_path} is not a pyraft log store (no format version)")
        if meta.format_version != FORMAT_VERSION:
            raise StorageError(f"log store in {where} has format version {meta.format_version!r}; "
                               f"this pyraft reads version {FORMAT_VERSION}")
        if node_id is not None and meta.node_id is not None and meta.node_id != node_id:
            raise StorageError(f"log store in {where} belongs to node {meta.node_id}, not node {node_id}")
        if cluster_name is not None and meta.cluster_name is not None and meta.cluster_name != cluster_name:
            raise StorageError(f"log store in {where} belongs to cluster {meta.cluster_name!r}, "
                               f"not {cluster_name!r}")
        fill = {}
        if node_id is not None and meta.node_id is None:
            fill[_K_NODE_ID] = pack(node_id)
        if cluster_name is not None and meta.cluster_name is None:
            fill[_K_CLUSTER] = pack(cluster_name)
        if fill:
            def record(txn: lmdb.Transaction) -> None:
                for k, v in fill.items():
                    txn.put(k, v, db=meta_db)
            env.write(record)
        return meta_db, log_db

    # -- LogStore: reads -----------------------------------------------------------

    def read_vote(self) -> Vote | None:
        self._env._live()
        return self._cached.vote

    def read_committed(self) -> LogId | None:
        self._env._live()
        return self._cached.committed

    def log_state(self) -> LogState:
        self._env._live()
        return self._cached.state

    def read(self, start: int, stop: int) -> list[Entry]:
        with self._env.read(buffers=True) as txn:
            raw = _read_raw(txn, self._log_db, start, stop)
        return decode_entries(start, [data for _i, data in raw])  # raw is consecutive from start

    # -- LogStore: the write path ---------------------------------------------------

    def write(self, ops: Sequence[LogOp]) -> None:
        """Execute ``ops`` as ONE write transaction, fsynced (``sync=True``) before returning.

        This is where the durability rule of :mod:`pyraft.engine.commands` is
        enforced: the vote and the entries are on disk when this returns.
        Entries are encoded before the transaction starts; a failure anywhere
        aborts the transaction and leaves nothing of the batch stored.
        """
        if not ops:
            return
        encoded: list[list[bytes] | None] = []
        for op in ops:
            if isinstance(op, AppendToLog):
                # The runtime may pass the encodings along (it has them from the
                # client or the leader); else encode here, per batch.
                rows = op.encoded if op.encoded is not None else encode_entries(op.entries)
                if len(rows) != len(op.entries):
                    raise StorageError(f"log store: {len(rows)} encodings for {len(op.entries)} entries")
                encoded.append(rows)
            elif isinstance(op, (SaveVote, SaveCommitted, TruncateLog, PurgeLog)):
                encoded.append(None)
            else:
                raise StorageError(f"log store: unknown operation {op!r}")
        with self._write_mutex:
            delay = self.write_delay
            if delay > 0:
                time.sleep(delay)  # test hook: a slow fsync (see write_delay)
            self._cached = self._env.write(self._batch(ops, encoded, self._cached))

    def _batch(self, ops: Sequence[LogOp], encoded: list,
               before: _Cached) -> Callable[[lmdb.Transaction[bytes]], _Cached]:
        """The transaction body of one write(): ops applied over the state ``before``."""
        meta_db, log_db = self._meta_db, self._log_db

        def run(txn: lmdb.Transaction[bytes]) -> _Cached:
            purged, last = before.state.last_purged, before.state.last_log_id
            vote, committed = before.vote, before.committed
            for op, rows in zip(ops, encoded):
                if isinstance(op, AppendToLog) and rows is not None:
                    ents = op.entries
                    if not ents:
                        continue
                    first, n = ents[0].index, len(ents)
                    if first != log_index(last) + 1:
                        raise StorageError(f"log store: entry {ents[0].log_id} does not continue the log "
                                           f"(last entry {last})")
                    if ents[-1].index != first + n - 1:
                        raise StorageError(f"log store: entries {first}..{ents[-1].index} are not consecutive")
                    # One C-level loop for the whole batch (append=True: each key must be past the last).
                    keys = [i.to_bytes(8, "big") for i in range(first, first + n)]
                    _consumed, added = txn.cursor(db=log_db).putmulti(zip(keys, rows), append=True)
                    if added != n:
                        raise StorageError(f"log store: {n - added} of entries {first}..{first + n - 1} "
                                           f"already exist")
                    last = ents[-1].log_id
                elif isinstance(op, SaveVote):
                    txn.put(_K_VOTE, pack(vote_to_wire(op.vote)), db=meta_db)
                    vote = op.vote
                elif isinstance(op, SaveCommitted):
                    txn.put(_K_COMMITTED, pack(log_id_to_wire(op.log_id)), db=meta_db)
                    committed = op.log_id
                elif isinstance(op, TruncateLog):
                    if op.since <= log_index(last):
                        cur = txn.cursor(db=log_db)
                        if cur.set_range(index_key(max(op.since, 1))):
                            while cur.delete():
                                pass
                        if cur.last():
                            i = key_index(cur.key())
                            last = LogId(decode_entry(i, cur.value()).term, i)
                        else:
                            last = purged
                elif isinstance(op, PurgeLog):
                    upto = op.upto
                    if purged is not None and upto.index <= purged.index:
                        continue  # already purged that far
                    cur = txn.cursor(db=log_db)
                    if cur.first():
                        while key_index(cur.key()) <= upto.index:
                            if not cur.delete() or not cur.key():
                                break
                    txn.put(_K_PURGED, pack(log_id_to_wire(upto)), db=meta_db)
                    purged = upto
                    if log_index(last) <= upto.index:
                        last = upto
            return _Cached(LogState(purged, last), vote, committed)

        return run

    # -- extras ------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The node data directory."""
        return self._env.root

    def meta(self) -> LogStoreMeta:
        with self._env.read() as txn:
            return _read_meta(txn, self._meta_db)

    def map_size(self) -> int:
        """The current size of the LMDB map (grows by doubling up to ``max_map_size``)."""
        return self._env.map_size()

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> "LmdbLogStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LmdbLogStore({self._env.root!r})"


# ---------------------------------------------------------------------------
# Read-only access for tools

class LogView:
    """One read transaction over a log environment: everything read from it is one consistent state."""

    def __init__(self, txn: lmdb.Transaction, meta_db: Any, log_db: Any) -> None:
        self._txn = txn
        self._meta_db = meta_db
        self._log_db = log_db

    @property
    def meta(self) -> LogStoreMeta:
        return _read_meta(self._txn, self._meta_db)

    @property
    def log_state(self) -> LogState:
        return _read_log_state(self._txn, self._meta_db, self._log_db)

    def count(self) -> int:
        return self._txn.stat(self._log_db)["entries"]

    def first_index(self) -> int | None:
        cur = self._txn.cursor(db=self._log_db)
        return key_index(bytes(cur.key())) if cur.first() else None

    def iter_raw(self, start: int = 1) -> Iterator[tuple[int, bytes]]:
        """``(index, stored bytes)`` of every entry from ``start``, in key order, holes and all."""
        cur = self._txn.cursor(db=self._log_db)
        if not cur.set_range(index_key(max(start, 0))):
            return
        for k, v in cur:
            yield key_index(bytes(k)), bytes(v)

    def iter_entries(self, start: int = 1) -> Iterator[Entry]:
        """Decoded entries from ``start``; raises :class:`CodecError` at a malformed one."""
        for i, data in self.iter_raw(start):
            yield decode_entry(i, data)


class LmdbLogReader:
    """Read-only access to the log store of node data directory ``path``, for tools.

    Takes no lock file and writes nothing to the environment; it works while
    the node runs in another process (LMDB readers do not block the writer).
    If LMDB's own lock file is not writable for this process the reader
    falls back to lock-free reading and ``consistent`` is False: reads made
    while the node writes may then be torn.

    The log-reading methods of :class:`LmdbLogStore` are here too, each one a
    read transaction; :meth:`view` gives several reads one transaction.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._env = LmdbEnv(path, LOG_ENV_NAME, None, what="log store", readonly=True)
        try:
            self._meta_db, self._log_db = self._env.open_existing_dbs((_META, _LOG))
            meta = self.meta()
        except CodecError as e:
            self._env.close()
            raise StorageError(f"log store in {self._env.root} is unreadable: {e}") from None
        except BaseException:
            self._env.close()
            raise
        if meta.format_version != FORMAT_VERSION:
            self._env.close()
            raise StorageError(f"log store in {self._env.root} has format version "
                               f"{meta.format_version!r}; this pyraft reads version {FORMAT_VERSION}")

    @property
    def path(self) -> str:
        return self._env.root

    @property
    def env_path(self) -> str:
        return self._env.env_path

    @property
    def consistent(self) -> bool:
        return self._env.consistent

    @contextmanager
    def view(self) -> Iterator[LogView]:
        """A consistent view (one read transaction); do not keep it open for long."""
        with self._env.read(buffers=True) as txn:
            yield LogView(txn, self._meta_db, self._log_db)

    def meta(self) -> LogStoreMeta:
        with self._env.read() as txn:
            return _read_meta(txn, self._meta_db)

    def read_vote(self) -> Vote | None:
        return self.meta().vote

    def read_committed(self) -> LogId | None:
        return self.meta().committed

    def log_state(self) -> LogState:
        with self._env.read(buffers=True) as txn:
            return _read_log_state(txn, self._meta_db, self._log_db)

    def read(self, start: int, stop: int) -> list[Entry]:
        with self._env.read(buffers=True) as txn:
            raw = _read_raw(txn, self._log_db, start, stop)
        return [decode_entry(i, data) for i, data in raw]

    def map_size(self) -> int:
        return self._env.map_size()

    def data_file_size(self) -> int:
        return self._env.data_file_size()

    def write(self, ops: Sequence[LogOp]) -> None:
        raise StorageError(f"log store in {self._env.root} is opened read-only")

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> "LmdbLogReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
