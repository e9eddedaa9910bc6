"""KVStateMachine: the built-in key-value state machine, kept in LMDB.

Layout in the node data directory ``path`` (see :mod:`pyraft.stores.lmdb`)::

    path/kv.lock      flock()ed while open: one live owner
    path/kv.boot      the boot id of the machine while writes may be unsynced (see "Durability")
    path/kv.lmdb/     LMDB environment (format version 2), named databases:
        data           key (stored form, pyraft.kv.encoding) -> key record
                       (create_revision, mod_revision, version, lease, value)
        meta           b"format" -> 2
                       b"last_applied" -> [term, index]
                       b"membership" -> codec stored-membership wire
                       b"snapshot" -> [codec snapshot-meta wire, file name]  (the current snapshot)
                       b"history_floor" -> the first revision the watch history may hold
                                           (raised by a snapshot install and by ``compact``)
        events         index_key(revision) + 4-byte sequence -> event record (the watch history)
        leases         index_key(lease id) -> ttl (8-byte float)
        lease_keys     index_key(lease id) + key -> b""
        sessions       pack(client id) -> Session.to_bytes()  ([seq, index, result])
        session_index  index_key(session.index) + pack(client id) -> b""  (expiry order)
    path/snapshots/   snap-*.kvsnap: snapshot files; *.tmp: being built or received

The one rule that makes restarts exact: every effect of a batch of entries
(data, watch events, leases, sessions), ``last_applied`` and the last
membership are written in ONE LMDB write transaction
(:meth:`KVStateMachine.apply`), so the state and ``applied_state()`` always
agree.  Installing a snapshot is one write transaction too (drop everything,
load the file, set the meta and the current-snapshot pointer).

Watch history: each change's event is written with it; after each batch the
events older than the last ``watch_history`` revisions are deleted, so every
replica holds the same window at the same applied index.  A snapshot holds no
events: after installing one (or rebuilding from one) the history starts at
the revision after it.

Durability (issue 20): apply does not fsync.  The Raft log, fsynced before an
entry is committed, already makes every applied entry recoverable, so the
state machine may lag its durable state behind the log and the node replays
the log from ``applied_state()`` at start-up.  The environment is opened with
LMDB's NOSYNC; what that costs and how it is made safe:

- A process crash (kill -9) loses nothing: committed transactions are in the
  operating system's page cache.
- The log is purged only up to a snapshot (the engine's rule), and
  :meth:`build_snapshot` and :meth:`install_snapshot` fsync the environment
  before they return, so the durable ``applied_state()`` is never behind a
  purged log entry.  (The runtime also refuses to start a node whose state
  machine is: see ``pyraft.runtime.core.restore_state``.)
- An operating-system crash or power loss may tear unsynced LMDB pages (LMDB
  keeps its integrity without sync only where the filesystem keeps write
  order, which ext4 and xfs do not promise).  So while writes may be unsynced
  ``kv.boot`` holds the machine's boot id (fsynced); :meth:`close` syncs and
  removes it.  Opening with a ``kv.boot`` of another boot discards
  ``kv.lmdb`` and rebuilds it from the newest snapshot file (fsynced when it
  was made), and the log replays the rest.  Opening after a process crash of
  the same boot keeps everything.
- :meth:`close` syncs: a clean stop leaves nothing to replay.

Size quota (etcd's ``--quota-backend-bytes``): the store's size is the bytes
of the LMDB pages that hold its databases (keys, values, the watch history,
leases, sessions, b-tree pages), measured after each applied batch.  Deletes
lower it at once (LMDB reuses freed pages; the file itself never shrinks).
Past ``quota_bytes``, :meth:`KVStateMachine.check_command` refuses the
commands that may add data (``put``, ``cas``, ``txn``, ``lease_grant``) with
:class:`~pyraft.errors.NoSpace` before they are proposed, on the node they
are submitted to; reads, deletes, lease revokes, snapshots and log purges go
on, and writes resume by themselves once deletes (and the history window
moving on, or a ``compact`` command) bring the size back under the quota.  The decision is never made
in ``apply``: page usage differs from replica to replica, and every replica
must apply every entry alike.

Snapshot file: ``b"PYRAFTKV"``, then a msgpack stream: a header map
``{"version": 2, "meta": <snapshot-meta wire>}``, lease records ``[3, id,
ttl]``, data records ``[0, key, record]`` (in key order) and session records
``[1, client, session]``, an end record ``[2, n_data, n_sessions]``; then the
CRC-32 of everything before it, 4 bytes big-endian.  It is written under a
``.tmp`` name, fsynced and renamed, and becomes current in a write
transaction; superseded files are deleted.
"""
from __future__ import annotations

import collections
import enum
import itertools
import logging
import os
import shutil
import struct
import threading
import uuid
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Final, Iterator, NamedTuple, Sequence, cast

import lmdb
import msgpack

from ..codec import (SCALAR_TYPES, index_key, key_index, log_id_from_wire, log_id_to_wire, pack,
                     stored_membership_from_wire, stored_membership_to_wire, unpack)
from ..errors import CodecError, NoSpace, StorageError
from ..snapshot_files import (CHUNK, SnapshotDir, SnapshotWriter, UnsyncedMark, durable, get_pointer, read_header,
                              read_records, set_pointer, unlink_quietly)
from ..stores.lmdb import (DEFAULT_MAP_SIZE, DEFAULT_MAX_MAP_SIZE, KV_ENV_NAME, KV_LOCK_NAME,
                           SNAPSHOT_DIR_NAME, LmdbEnv)
from ..types import Entry, EntryKind, LogId, SnapshotMeta, StoredMembership, log_index
from .commands import (ADDING_OPS, DEFAULT_SESSION_TTL, DEFAULT_WATCH_HISTORY, MAX_CLIENT_BYTES, MAX_KEY_BYTES,
                       MAX_LEASED_KEY_BYTES, Session, apply_entries, check_command, encode_client)
from .encoding import (RECORD_HEADER, KVCommandError, decode_key, decode_value, encode_key, record_header,
                       record_value)
from .reads import ApplyListeners, KVReads

__all__ = ["KVStateMachine", "KVReader", "KVStatus", "FORMAT_VERSION", "SNAPSHOT_MAGIC", "DEFAULT_QUOTA_BYTES",
           "DEFAULT_MAX_LEASES", "DEFAULT_WATCH_HISTORY"]

log = logging.getLogger("pyraft.kv")

#: The default size quota: etcd's default (2 GiB), 1/32 of the LMDB map's default ceiling.
DEFAULT_QUOTA_BYTES = 2 * 1024 ** 3
#: The default bound on live leases: the leader keeps a deadline for each in memory (about 150
#: bytes), which a lease's few bytes on disk would let the quota grow to gigabytes.
DEFAULT_MAX_LEASES = 100_000
FORMAT_VERSION = 2
SNAPSHOT_VERSION = 2
SNAPSHOT_MAGIC = b"PYRAFTKV"
_SNAP_SUFFIX = ".kvsnap"
#: In the node data directory: the boot id while the KV environment may hold unsynced writes.
KV_BOOT_NAME = "kv.boot"

_DATA, _META, _SESSIONS, _SINDEX = b"data", b"meta", b"sessions", b"session_index"
_EVENTS, _LEASES, _LEASE_KEYS = b"events", b"leases", b"lease_keys"
_DB_NAMES = (_DATA, _META, _SESSIONS, _SINDEX, _EVENTS, _LEASES, _LEASE_KEYS)
_K_FORMAT = b"format"
_K_APPLIED = b"last_applied"
_K_MEMBERSHIP = b"membership"
_K_SNAPSHOT = b"snapshot"
_K_FLOOR = b"history_floor"

_REC_DATA, _REC_SESSION, _REC_END, _REC_LEASE = 0, 1, 2, 3
_TTL = struct.Struct(">d")
_SUB = struct.Struct(">I")
_EVENT_KEY = struct.Struct(">QI")  # events: revision, sequence number within it
_PLAIN_OPS = ("put", "delete", "cas", "get")
#: _LmdbBackend.session_low before anyone looked at session_index
SESSIONS_UNKNOWN: Final = -1
#: _LmdbBackend.session_memo keeps at most this many clients (emptied when it grows past)
_SESSION_MEMO_MAX = 4096


class _Dbs:
    __slots__ = ("data", "meta", "sessions", "sindex", "events", "leases", "lease_keys")

    def __init__(self, data: Any, meta: Any, sessions: Any, sindex: Any, events: Any, leases: Any,
                 lease_keys: Any) -> None:
        self.data, self.meta, self.sessions, self.sindex = data, meta, sessions, sindex
        self.events, self.leases, self.lease_keys = events, leases, lease_keys


class _Overlay:
    """One database's writes in a batch, kept here and written at its end in one call.

    Every call into LMDB gives the GIL away and must win it back, which costs
    up to a switch interval while other threads run Python (RaftCore, the
    replication workers): a batch that reads its keys with one ``getmulti``
    and writes them with one ``putmulti`` pays that a few times, not a few
    times per entry.  Reads see the batch's own writes first.
    """

    __slots__ = ("txn", "db", "changes", "known")

    def __init__(self, txn: lmdb.Transaction[bytes], db: Any) -> None:
        self.txn = txn
        self.db = db
        self.changes: dict[bytes, bytes | None] = {}  # written in this batch (None: deleted)
        self.known: dict[bytes, bytes | None] = {}  # read ahead (None: absent)

    def prefetch(self, keys: list[bytes]) -> None:
        unique = dict.fromkeys(keys)  # a key written often is in a batch many times: read it once
        known = self.known
        known.update(unique)  # None: absent, unless found
        known.update(self.txn.cursor(db=self.db).getmulti(list(unique)))

    def get(self, key: bytes) -> bytes | None:
        v = self.changes.get(key, _MISSING)
        if v is not _MISSING:
            return v
        v = self.known.get(key, _MISSING)
        return self.txn.get(key, db=self.db) if v is _MISSING else v

    def flush(self) -> None:
        """Write the batch's changes to the transaction and forget what was read ahead.

        Called before anything reads or writes the database directly, which
        would leave the read-ahead stale.
        """
        changes = self.changes
        self.known = {}
        if not changes:
            return
        self.changes = {}
        deleted = [k for k, v in changes.items() if v is None] if None in changes.values() else []
        for k in deleted:
            del changes[k]
        puts = cast("dict[bytes, bytes]", changes)  # the deletes taken out
        if puts:  # (sorted by key alone: the keys differ)
            self.txn.cursor(db=self.db).putmulti(sorted(puts.items()))
        for k in deleted:
            self.txn.delete(k, db=self.db)


class _Missing(enum.Enum):
    MISSING = 0


#: not in the batch's changes or read-ahead (a type checker tells it from None as an enum member)
_MISSING: Final = _Missing.MISSING


class _LmdbBackend:
    """The KVBackend of one write transaction (data writes through an _Overlay)."""

    def __init__(self, txn: lmdb.Transaction[bytes], dbs: _Dbs, session_low: int | None = SESSIONS_UNKNOWN,
                 session_memo: dict[bytes, tuple[bytes, Session]] | None = None) -> None:
        """``session_low``: what :attr:`session_low` was after the last committed batch.

        ``session_memo``: the :attr:`session_memo` of the batches before (an empty one if None).
        """
        self.txn = txn
        self.dbs = dbs
        self.data = _Overlay(txn, dbs.data)
        # Sessions are read ahead and written like data: a client's write reads and
        # replaces its session record and its expiry-order key, which would otherwise
        # be four calls into LMDB (four hand-offs of the GIL) per write.
        self.sessions = _Overlay(txn, dbs.sessions)
        self.sindex = _Overlay(txn, dbs.sindex)
        #: No session's index is below this (None: there are no sessions; SESSIONS_UNKNOWN:
        #: not known).  A lower bound, not the minimum: replacing the oldest session leaves
        #: it valid, and expire_sessions looks at session_index only once the bound says
        #: something may have expired.
        self.session_low = session_low
        #: client id -> (a session record, its Session), for the clients seen lately (their
        #: scalar results): a client's write decodes the record its last write stored.  Used only
        #: when the record read is the one kept, so it may outlive the transaction (aborted or not).
        self.session_memo: dict[bytes, tuple[bytes, Session]] = {} if session_memo is None else session_memo
        self._ev_rev = 0  # the revision of the last event added, and its sequence number
        self._ev_sub = 0
        # Events are appended at the end of the batch, in one call (flush_events): fewer calls into
        # LMDB, each of which gives the GIL away and must win it back.
        self._events: list[tuple[bytes, bytes]] = []
        self.lease_changes: list[tuple[int, float | None]] = []

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, record: bytes) -> None:
        self.data.changes[key] = record

    def delete(self, key: bytes) -> None:
        self.data.changes[key] = None

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        self.data.flush()
        return _scan(self.txn.cursor(db=self.dbs.data), start, stop)

    def prefetch(self, entries: Sequence[Entry]) -> None:
        """Read ahead, in one call, the records of the keys the batch's plain commands name."""
        keys = []
        clients = []
        for e in entries:
            cmd = e.payload
            if type(cmd) is not dict:
                continue
            if cmd.get("op") in _PLAIN_OPS:
                k = cmd.get("key")
                if type(k) is str or type(k) is bytes:
                    try:
                        keys.append(encode_key(k))
                    except KVCommandError:
                        pass  # refused when applied
            c = cmd.get("client")
            if c is not None:
                try:
                    clients.append(encode_client(c))
                except KVCommandError:
                    pass  # refused when applied
        if keys:
            self.data.prefetch(keys)
        if clients:
            self.sessions.prefetch(clients)

    def finish(self) -> None:
        """Write what the batch kept for its end: data and session changes, then watch events."""
        self.data.flush()
        self.sessions.flush()
        self.sindex.flush()
        self.flush_events()

    def add_event(self, revision: int, event: bytes) -> None:
        if revision != self._ev_rev:
            self._ev_rev, self._ev_sub = revision, 0
        else:
            self._ev_sub += 1
        self._events.append((_EVENT_KEY.pack(revision, self._ev_sub), event))

    def flush_events(self) -> None:
        """Append the batch's events to the history (their keys follow every key already there)."""
        if self._events:
            consumed, added = self.txn.cursor(db=self.dbs.events).putmulti(self._events, append=True)
            if added != len(self._events):
                raise StorageError(f"KV state machine: {len(self._events) - added} watch event(s) of revisions "
                                   f"up to {self._ev_rev} are out of order")
            self._events = []

    def get_lease(self, lease_id: int) -> float | None:
        raw = self.txn.get(index_key(lease_id), db=self.dbs.leases)
        return None if raw is None else _TTL.unpack(raw)[0]

    def put_lease(self, lease_id: int, ttl: float) -> None:
        self.txn.put(index_key(lease_id), _TTL.pack(ttl), db=self.dbs.leases)
        self.lease_changes.append((lease_id, ttl))

    def delete_lease(self, lease_id: int) -> None:
        self.txn.delete(index_key(lease_id), db=self.dbs.leases)
        self.lease_changes.append((lease_id, None))

    def attach(self, lease_id: int, key: bytes) -> None:
        self.txn.put(index_key(lease_id) + key, b"", db=self.dbs.lease_keys)

    def detach(self, lease_id: int, key: bytes) -> None:
        self.txn.delete(index_key(lease_id) + key, db=self.dbs.lease_keys)

    def lease_keys(self, lease_id: int) -> list[bytes]:
        p = index_key(lease_id)
        return [k[8:] for k, _ in _scan(self.txn.cursor(db=self.dbs.lease_keys), p, _next8(p))]

    def get_session(self, client: bytes) -> Session | None:
        raw = self.sessions.get(client)
        if raw is None:
            return None
        memo = self.session_memo.get(client)
        if memo is not None and memo[0] == raw:
            return memo[1]
        session = Session.from_bytes(raw)
        self._memo_session(client, raw, session)
        return session

    def _memo_session(self, client: bytes, raw: bytes, session: Session) -> None:
        if type(session.result[1]) not in SCALAR_TYPES:  # immutable, decoded as themselves
            return  # a retry returns the result: one the caller may have changed must be decoded anew
        memo = self.session_memo
        if len(memo) >= _SESSION_MEMO_MAX and client not in memo:
            memo.clear()
        memo[client] = (raw, session)

    def put_session(self, client: bytes, session: Session, old: Session | None) -> None:
        sindex = self.sindex.changes
        if old is not None:
            sindex[index_key(old.index) + client] = None
        raw = session.to_bytes()
        self.sessions.changes[client] = raw
        self._memo_session(client, raw, session)
        sindex[index_key(session.index) + client] = b""
        if self.session_low is None:  # the first session (indexes only grow: the others' are lower)
            self.session_low = session.index

    def expire_sessions(self, before_index: int) -> None:
        low = self.session_low
        if low is None or (low != SESSIONS_UNKNOWN and low >= before_index):
            return
        self.sessions.flush()  # the scan below reads the databases themselves
        self.sindex.flush()
        cur = self.txn.cursor(db=self.dbs.sindex)
        while cur.first():
            k = cur.key()
            index = key_index(k[:8])
            if index >= before_index:
                self.session_low = index
                return
            self.txn.delete(k[8:], db=self.dbs.sessions)
            cur.delete()
        self.session_low = None

    def compact_history(self, before: int) -> None:
        self.flush_events()  # this batch's events before ``before`` go too
        self.compact_events(before)
        if before > (_meta_of(self.txn, self.dbs, _K_FLOOR) or 1):
            self.txn.put(_K_FLOOR, pack(before), db=self.dbs.meta)

    def compact_events(self, before: int) -> None:
        """Delete the events of revisions < ``before``."""
        if before <= 1:
            return
        cur = self.txn.cursor(db=self.dbs.events)
        stop = index_key(before)
        if not cur.first():
            return
        while cur.key() < stop:
            if not cur.delete():
                return


def _next8(p: bytes) -> bytes:
    """The first 8-byte index key after ``p`` (p is index_key(n), n < 2**64 - 1)."""
    return index_key(key_index(p) + 1)


def _scan(cur: lmdb.Cursor, start: bytes, stop: bytes) -> Iterator[tuple[bytes, Any]]:
    """``(key, value)`` of the cursor's database in ``[start, stop)``; keys as bytes, values as they come."""
    if not cur.set_range(start):
        return
    for k, v in cur:
        k = bytes(k)
        if k >= stop:
            return
        yield k, v


class _LmdbView:
    """A KVView over one LMDB read transaction (buffers: copy what you keep)."""

    __slots__ = ("txn", "dbs", "revision", "history_start")

    def __init__(self, txn: lmdb.Transaction, dbs: _Dbs, history: int | None) -> None:
        """``history``: the state machine's watch_history; None (a reader that does not know it): find out."""
        self.txn = txn
        self.dbs = dbs
        self.revision = log_index(log_id_from_wire(_meta_of(txn, dbs, _K_APPLIED), "last_applied"))
        floor = _meta_of(txn, dbs, _K_FLOOR) or 1
        if history is None:
            cur = txn.cursor(db=dbs.events)
            history = self.revision + 1 - (key_index(cur.key()[:8]) if cur.first() else self.revision + 1)
        self.history_start = max(floor, self.revision + 1 - history)

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        return _scan(self.txn.cursor(db=self.dbs.data), start, stop)

    def count(self, start: bytes, stop: bytes) -> int:
        return self.count_at_most(start, stop, None)

    def count_at_most(self, start: bytes, stop: bytes, most: int | None) -> int:
        """How many keys are in ``[start, stop)``, but no more than ``most`` (None: all).

        A range that holds every key is counted from the database's own
        statistics, without walking; another walks its keys alone (no value
        is read), in C: LMDB keeps no count of a key range.
        """
        cur = self.txn.cursor(db=self.dbs.data)
        if not cur.set_range(start):
            return 0  # no key at or after start
        if cur.first() and bytes(cur.key()) >= start and cur.last() and bytes(cur.key()) < stop:
            n = self.txn.stat(self.dbs.data)["entries"]
            return n if most is None else min(n, most)
        cur.set_range(start)
        keys = itertools.takewhile(stop.__gt__, map(bytes, cur.iternext(keys=True, values=False)))
        # Counted by C iterators (islice, zip, deque) end to end: about half the time of a loop.
        last = collections.deque(zip(itertools.count(1), itertools.islice(keys, most)), maxlen=1)
        return last[0][0] if last else 0

    def events(self, revision: int, sub: int) -> Iterator[tuple[int, int, bytes | memoryview]]:
        cur = self.txn.cursor(db=self.dbs.events)
        if not cur.set_range(index_key(revision) + _SUB.pack(sub)):
            return
        for k, v in cur:
            yield key_index(k[:8]), _SUB.unpack(k[8:12])[0], v

    def leases(self) -> Iterator[tuple[int, float]]:
        for k, v in self.txn.cursor(db=self.dbs.leases):
            yield key_index(k), _TTL.unpack(v)[0]


def _usage(txn: lmdb.Transaction, dbs: "_Dbs") -> tuple[int, int]:
    """The bytes of the pages that hold the store's databases (what the quota measures), and the leases."""
    total = leases = 0
    for db in (dbs.data, dbs.meta, dbs.sessions, dbs.sindex, dbs.events, dbs.leases, dbs.lease_keys):
        st = txn.stat(db)
        total += (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]
        if db is dbs.leases:
            leases = st["entries"]
    return total, leases


def _check_format(version: Any, root: str) -> None:
    if version == FORMAT_VERSION:
        return
    if version == 1:
        raise StorageError(f"KV state machine in {root} has format version 1 (keys in msgpack order, no "
                           f"revisions); this pyraft reads version {FORMAT_VERSION} and does not convert it: "
                           f"move {os.path.join(root, KV_ENV_NAME)} and the snapshots away and let the node "
                           f"catch up from the cluster")
    raise StorageError(f"KV state machine in {root} has format version {version!r}; "
                       f"this pyraft reads version {FORMAT_VERSION}")


class KVStateMachine(KVReads, ApplyListeners):
    """The built-in KV state machine (commands: :mod:`pyraft.kv.commands`) in LMDB.

    ``path`` is the node data directory (created if absent; may be shared with
    :class:`~pyraft.stores.lmdb.LmdbLogStore`).  Locked to this object while
    open.  ``session_ttl``: sessions idle for more than that many log indexes
    are forgotten.  ``watch_history``: the watch history keeps the events of
    that many revisions (a watcher further behind gets
    :class:`~pyraft.errors.Compacted`).  ``quota_bytes``: the size quota
    (module docstring); at most half of ``max_map_size``, so that it trips
    while the map still has room for the writes already in flight and for the
    pages that long read transactions (a snapshot being built) keep alive.
    ``max_leases``: past that many live leases, ``lease_grant`` is refused
    with NoSpace before it is proposed, like a write past the quota.
    Local reads from any thread: :meth:`get`, :meth:`items`, :meth:`range`,
    :meth:`count`, :meth:`events`, :meth:`leases`.
    """

    #: Test hook: called with a label at the points where a crash matters
    #: ("install:renamed", "install:loading", "install:committed",
    #: "build:written", "build:committed").  Does nothing by default.
    _crash_point: Callable[[str], None] = staticmethod(lambda where: None)

    def __init__(self, path: str | os.PathLike, *, session_ttl: int = DEFAULT_SESSION_TTL,
                 watch_history: int = DEFAULT_WATCH_HISTORY, map_size: int = DEFAULT_MAP_SIZE,
                 max_map_size: int = DEFAULT_MAX_MAP_SIZE, quota_bytes: int = DEFAULT_QUOTA_BYTES,
                 max_leases: int = DEFAULT_MAX_LEASES) -> None:
        if type(session_ttl) is not int or session_ttl < 1:
            raise ValueError(f"session_ttl must be an integer >= 1 (log entries), got {session_ttl!r}")
        if type(watch_history) is not int or watch_history < 1:
            raise ValueError(f"watch_history must be an integer >= 1 (revisions), got {watch_history!r}")
        if type(quota_bytes) is not int or quota_bytes <= 0:
            raise ValueError(f"quota_bytes must be a positive integer, got {quota_bytes!r}")
        if type(max_leases) is not int or max_leases < 1:
            raise ValueError(f"max_leases must be an integer >= 1, got {max_leases!r}")
        if type(max_map_size) is int and quota_bytes > max_map_size // 2:
            raise ValueError(f"quota_bytes ({quota_bytes}) must be at most half of max_map_size ({max_map_size}): "
                             f"the quota must trip well before the map is full")
        self._session_ttl = session_ttl
        self._history = watch_history
        self._quota = quota_bytes
        self._max_leases = max_leases
        #: the store's size and its number of leases as of the last applied batch (see _usage);
        #: each replaced whole, read lock-free
        self._used = self._leases = 0
        #: kv.boot (module doc): kv.lmdb is discarded (mark.discarded) if written unsynced before a reboot
        self._mark = UnsyncedMark(os.path.abspath(os.fspath(path)), KV_BOOT_NAME, "KV state machine")
        self._env = LmdbEnv(path, KV_ENV_NAME, KV_LOCK_NAME, what="KV state machine", sync=False,
                            map_size=map_size, max_map_size=max_map_size, prepare=self._mark.discard_if_rebooted)
        # _snap_lock guards _snapshot and the set of snap-*.kvsnap files:
        # whoever makes a file current or deletes one holds it.
        self._snap_lock = threading.Lock()
        try:
            self._snaps = SnapshotDir(os.path.join(self._env.root, SNAPSHOT_DIR_NAME), _SNAP_SUFFIX)
            self._dbs = self._open_dbs()
            if self._mark.discarded:
                self._restore_newest_snapshot()
            with self._env.read() as txn:
                applied = log_id_from_wire(self._meta(txn, _K_APPLIED), "last_applied")
                membership = stored_membership_from_wire(self._meta(txn, _K_MEMBERSHIP))
                pointer = get_pointer(txn, self._dbs.meta, _K_SNAPSHOT)
                self._used, self._leases = _usage(txn, self._dbs)
            self._snapshot: tuple[SnapshotMeta, str] | None = self._snaps.existing(pointer)
            self._cleanup(at_open=True)
            if self._mark.discarded:  # only now: until the rebuild is complete, the old kv.boot asks for it again
                self._mark.set()
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
        #: _LmdbBackend.session_low after the last committed batch (the apply thread's)
        self._session_low: int | None = SESSIONS_UNKNOWN
        #: _LmdbBackend.session_memo, kept from batch to batch (the apply thread's)
        self._session_memo: dict[bytes, tuple[bytes, Session]] = {}

    # -- durability ---------------------------------------------------------------------

    def _restore_newest_snapshot(self) -> None:
        """Load the newest snapshot file that reads whole into the (new, empty) environment."""
        for path in self._snaps.newest_first():
            name = os.path.basename(path)
            try:
                with open(path, "rb") as f:
                    meta = read_header(f, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, "KV snapshot file")
                self._used, self._leases = self._env.write(lambda txn: self._load(txn, meta, path))
            except (StorageError, CodecError, OSError) as e:
                log.warning("KV state machine in %s: snapshot file %s is unusable (%s); trying an older one",
                            self._env.root, name, e)
                continue
            self._env.sync()
            log.warning("KV state machine in %s: rebuilt from snapshot %s (up to %s)", self._env.root, name,
                        meta.last_log_id)
            return
        log.warning("KV state machine in %s: no snapshot file to rebuild from: starting empty "
                    "(the log replays everything it holds)", self._env.root)

    def sync(self) -> None:
        """Make everything applied so far durable (fsync).  Any thread."""
        self._env.sync()

    # -- databases ------------------------------------------------------------------------

    def _open_dbs(self) -> _Dbs:
        env = self._env
        if env.is_pristine():
            def init(txn: lmdb.Transaction[bytes]) -> _Dbs:
                dbs = _Dbs(*(env._live().open_db(n, txn=txn) for n in _DB_NAMES))
                txn.put(_K_FORMAT, pack(FORMAT_VERSION), db=dbs.meta)
                txn.put(_K_FLOOR, pack(1), db=dbs.meta)
                return dbs
            return env.write(init)
        (meta,) = env.open_existing_dbs((_META,))
        with env.read() as txn:
            raw = txn.get(_K_FORMAT, db=meta)
            version = None if raw is None else unpack(bytes(raw), "meta format")
        _check_format(version, env.root)
        return _Dbs(*env.open_existing_dbs(_DB_NAMES))

    def _meta(self, txn: lmdb.Transaction, key: bytes, dbs: _Dbs | None = None) -> Any:
        return _meta_of(txn, dbs or self._dbs, key)

    # -- reads --------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The node data directory."""
        return self._env.root

    @property
    def watch_history(self) -> int:
        return self._history

    @contextmanager
    def view(self) -> Iterator[_LmdbView]:
        """One consistent read (a KVView, pyraft.kv.reads), valid inside the ``with``."""
        with self._env.read(buffers=True) as txn:
            yield _LmdbView(txn, self._dbs, self._history)

    def get(self, key: Any) -> Any:
        """The value of ``key``, None when absent.  From any thread."""
        k = encode_key(key)
        with self._env.read(buffers=True) as txn:
            raw = txn.get(k, db=self._dbs.data)
            raw = None if raw is None else bytes(raw[RECORD_HEADER.size:])
        return None if raw is None else decode_value(raw)

    def items(self) -> list[tuple[Any, Any]]:
        """Every ``(key, value)``, in key order (one consistent read)."""
        with self._env.read(buffers=True) as txn:
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._dbs.data)]
        return [(decode_key(k), decode_value(record_value(v))) for k, v in rows]

    def __len__(self) -> int:
        with self._env.read() as txn:
            return txn.stat(self._dbs.data)["entries"]

    def applied_state(self) -> tuple[LogId | None, StoredMembership | None]:
        return self._applied

    @property
    def revision(self) -> int:
        """The revision of the state: the last applied log index (0 before any)."""
        return log_index(self._applied[0])

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

        NoSpace for a command that may add data while the store is past its
        quota; KVCommandError for a key or client id the store cannot hold.
        Any thread.
        """
        if type(command) is dict and command.get("op") in ADDING_OPS:
            if self._used > self._quota:
                raise NoSpace(f"KV store in {self._env.root} is past its quota: {self._used} bytes in use, "
                              f"quota_bytes={self._quota}; delete keys (reads, deletes, snapshots and purges "
                              f"still work) or raise the quota")
            if command["op"] == "lease_grant" and self._leases >= self._max_leases:
                raise NoSpace(f"KV store in {self._env.root} holds {self._leases} leases, max_leases="
                              f"{self._max_leases}; revoke leases (or let them expire) or raise max_leases")
        check_command(command)

    # -- apply ---------------------------------------------------------------------------

    def apply(self, entries: Sequence[Entry]) -> list[Any]:
        """Apply ``entries`` (continuing ``last_applied``) in ONE write transaction with the new applied state.

        Committed without fsync (module docstring, "Durability").
        """
        if not entries:
            return []
        last_applied, membership0 = self._applied
        expect = log_index(last_applied) + 1
        for e in entries:
            if e.log_id.index != expect:
                raise StorageError(f"KV state machine: entry {e.log_id} applied out of order "
                                   f"(next expected index {expect})")
            expect += 1
        dbs, ttl = self._dbs, self._session_ttl
        last = entries[-1].log_id

        def run(txn: lmdb.Transaction[bytes]) -> tuple[list[Any], StoredMembership | None, tuple[int, int], tuple,
                                                        int | None]:
            backend = _LmdbBackend(txn, dbs, self._session_low, self._session_memo)
            backend.prefetch(entries)
            results = apply_entries(backend, entries, ttl)
            membership = membership0
            for e in entries:
                if e.kind == EntryKind.MEMBERSHIP:
                    membership = StoredMembership(e.log_id, e.payload)
            backend.finish()
            backend.compact_events(last.index + 1 - self._history)
            txn.put(_K_APPLIED, pack(log_id_to_wire(last)), db=dbs.meta)
            if membership is not membership0:
                txn.put(_K_MEMBERSHIP, pack(stored_membership_to_wire(membership)), db=dbs.meta)
            return (results, membership, _usage(txn, dbs), tuple(backend.lease_changes),
                    backend.session_low)

        # The session bound is kept only from a committed batch: an aborted one's may be
        # above sessions its transaction deleted and LMDB put back.
        results, membership, (self._used, self._leases), lease_changes, self._session_low = self._env.write(run)
        self._applied = (last, membership)
        if self._listeners:
            self._notify(last.index, lease_changes)
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
        a newer one was installed meanwhile), once the state machine's own
        state up to it is durable too: the log may be purged up to it then.
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
                # The engine purges the log up to this snapshot once we return: what this
                # state machine holds (applied at least this far) must be on disk first.
                self._env.sync()
                self._crash_point("build:committed")
                self._cleanup()
                assert self._snapshot is not None
                return self._snapshot[0]

    def begin_receiving_snapshot(self) -> BinaryIO:
        """A new empty file in the snapshot directory; an earlier partial one is dropped."""
        return self._snaps.begin_receiving()

    def install_snapshot(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        """Replace the whole state with the snapshot in ``data``, in ONE write transaction, then fsync.

        The file is checked (magic, version, CRC, record shapes, key encodings
        and sizes, lease references, sessions, counts) while it loads;
        content that does not decode or validate aborts the transaction and
        raises CodecError with the old state untouched (storage.py: the
        snapshot is refused, the node goes on).  A failing disk raises
        StorageError or OSError.  ``data`` is closed here.  The watch history
        starts after the snapshot.
        """
        received = self._adopt(data)
        with self._snap_lock:
            final = self._snaps.publish(received, meta)
            self._crash_point("install:renamed")
            try:
                used = self._env.write(lambda txn: self._load(txn, meta, final))
            except CodecError as e:
                unlink_quietly(final)
                raise CodecError(f"KV state machine in {self._env.root}: refused snapshot "
                                 f"{meta.snapshot_id}: {e}") from None
            except BaseException:
                unlink_quietly(final)
                raise
            self._used, self._leases = used
            # The engine purges the log up to the snapshot once we return.
            self._env.sync()
            self._crash_point("install:committed")
            self._applied = (meta.last_log_id, meta.last_membership)
            self._session_low = SESSIONS_UNKNOWN  # the sessions are the snapshot's now
            self._snapshot = (meta, final)
            self._cleanup()
        self._notify(log_index(meta.last_log_id), None)

    def _load(self, txn: lmdb.Transaction[bytes], meta: SnapshotMeta, path: str) -> tuple[int, int]:
        """Replace the state in ``txn`` with the snapshot file ``path``; CodecError for bad content."""
        dbs = self._dbs
        for db in (dbs.data, dbs.sessions, dbs.sindex, dbs.events, dbs.leases, dbs.lease_keys):
            txn.drop(db, delete=False)
        with open(path, "rb") as f:
            for n, rec in enumerate(_read_snapshot(f, meta)):
                if n == 1000:
                    self._crash_point("install:loading")
                kind, a, b = rec
                if kind == _REC_DATA:
                    if len(b) < RECORD_HEADER.size:
                        raise CodecError("a data record is shorter than its header")
                    try:
                        decode_key(a)
                    except ValueError as e:
                        raise CodecError(f"a data record's key does not decode: {e}") from None
                    create, mod, version, lease = record_header(b)
                    # Revisions are log indexes up to the snapshot's, and a key's version counts
                    # its puts (a txn may put a key several times at one revision): anything else
                    # would make apply fail later (a version of 2**64 - 1 cannot be incremented).
                    if not (1 <= create <= mod <= log_index(meta.last_log_id) and 1 <= version < 2**63):
                        raise CodecError(f"a data record's revisions ({create}, {mod}) or version ({version}) "
                                         f"are impossible at snapshot index {log_index(meta.last_log_id)}")
                    if lease:
                        if txn.get(index_key(lease), db=dbs.leases) is None:
                            raise CodecError(f"a key is attached to lease {lease}, which the snapshot lacks")
                        if len(a) > MAX_LEASED_KEY_BYTES:  # LMDB's key limit, in the lease's key index
                            raise CodecError(f"a snapshot key of {len(a)} bytes is attached to a lease: "
                                             f"more than the store holds")
                        txn.put(index_key(lease) + a, b"", db=dbs.lease_keys)
                    if not txn.put(a, b, db=dbs.data, append=True):
                        raise CodecError("data records are not in key order")
                elif kind == _REC_LEASE:
                    txn.put(index_key(a), _TTL.pack(b), db=dbs.leases)
                else:
                    try:
                        s = Session.from_bytes(b)
                    except (ValueError, TypeError, msgpack.UnpackException) as e:
                        raise CodecError(f"session record: {e}") from None
                    # A session is written by an applied entry: one past the snapshot's index would
                    # be a lie that later batches could not expire right.
                    if not 0 <= s.index <= log_index(meta.last_log_id):
                        raise CodecError(f"session record: log index {s.index} is past the snapshot's "
                                         f"({log_index(meta.last_log_id)})")
                    txn.put(a, b, db=dbs.sessions)
                    txn.put(index_key(s.index) + a, b"", db=dbs.sindex)
        txn.put(_K_APPLIED, pack(log_id_to_wire(meta.last_log_id)), db=dbs.meta)
        txn.put(_K_MEMBERSHIP, pack(stored_membership_to_wire(meta.last_membership)), db=dbs.meta)
        txn.put(_K_FLOOR, pack(log_index(meta.last_log_id) + 1), db=dbs.meta)
        set_pointer(txn, dbs.meta, _K_SNAPSHOT, meta, path)
        return _usage(txn, dbs)

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
        """Sync, mark the environment clean (no kv.boot) and close it.  Idempotent."""
        if not self._env.closed:
            try:
                self._env.sync()
                self._mark.clear()
            except (StorageError, OSError) as e:  # the next start replays (or rebuilds): nothing is lost
                log.warning("KV state machine in %s: could not sync at close: %s", self._env.root, e)
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


class KVReader(KVReads):
    """Read-only access to a KVStateMachine's directory: no lock file taken, nothing written.

    Every method is one read transaction, so each answer is consistent even
    while the node applies entries in another process.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._env = LmdbEnv(path, KV_ENV_NAME, None, what="KV state machine", readonly=True)
        self._snap_dir = os.path.join(self._env.root, SNAPSHOT_DIR_NAME)
        try:
            (meta,) = self._env.open_existing_dbs((_META,))
            with self._env.read() as txn:
                raw = txn.get(_K_FORMAT, db=meta)
                version = None if raw is None else unpack(bytes(raw), "meta format")
            _check_format(version, self._env.root)
            self._dbs = _Dbs(*self._env.open_existing_dbs(_DB_NAMES))
        except BaseException:
            self._env.close()
            raise

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
                    if kind in (_REC_DATA, _REC_SESSION):
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

    @contextmanager
    def view(self) -> Iterator[_LmdbView]:
        with self._env.read(buffers=True) as txn:
            yield _LmdbView(txn, self._dbs, None)

    def get(self, key: Any) -> Any:
        k = encode_key(key)
        with self._env.read(buffers=True) as txn:
            raw = txn.get(k, db=self._dbs.data)
            raw = None if raw is None else bytes(raw[RECORD_HEADER.size:])
        return None if raw is None else decode_value(raw)

    def items(self) -> list[tuple[Any, Any]]:
        with self._env.read(buffers=True) as txn:
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._dbs.data)]
        return [(decode_key(k), decode_value(record_value(v))) for k, v in rows]

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
    # Leases first: loading a data record checks that its lease exists.
    for k, v in txn.cursor(db=dbs.leases):
        w.record(_REC_LEASE, key_index(bytes(k)), _TTL.unpack(v)[0])
    for k, v in txn.cursor(db=dbs.data):
        w.record(_REC_DATA, bytes(k), bytes(v))
    for k, v in txn.cursor(db=dbs.sessions):
        w.record(_REC_SESSION, bytes(k), bytes(v))
    w.finish(_REC_END)


def _read_snapshot(f: BinaryIO, meta: SnapshotMeta) -> Iterator[tuple[int, Any, Any]]:
    """Yield the lease, data and session records of a snapshot file, checking it as it goes.

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
        if len(rec) != 3:
            raise CodecError("malformed snapshot record")
        kind, a, b = rec
        if kind == _REC_LEASE:
            if type(a) is not int or not 0 < a < 2**64 or type(b) is not float:
                raise CodecError("malformed lease record")
            yield kind, a, b
            continue
        if kind not in (_REC_DATA, _REC_SESSION) or type(a) is not bytes or type(b) is not bytes:
            raise CodecError("malformed snapshot record")
        # LMDB's key limit: a longer key would make the load fail as if the disk had.
        if len(a) > (MAX_KEY_BYTES if kind == _REC_DATA else MAX_CLIENT_BYTES):
            raise CodecError(f"a snapshot record's key is {len(a)} bytes, more than the store holds")
        yield kind, a, b
