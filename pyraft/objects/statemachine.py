"""``ObjectStateMachine``: a :class:`~pyraft.storage.StateMachine` that applies calls to named objects.

Log entries
-----------

Every NORMAL entry it writes is a msgpack map (``c``/``s``/``f``/``t`` in all)::

    {"k": "call",  "o": object name, "m": method name, "v": version,
     "a": value-codec bytes of [args, kwargs], "c": client id, "s": seq, "f": floor, "t": leader time}
    {"k": "hello", "n": node id, "vers": {"object.method": [versions]}, "c", "s", "f", "t"}

``t`` is stamped by the leader when it accepts the command (never by a
replica at apply time); the *log time* is the largest ``t`` applied so far,
so it never goes back, and it is what replicated methods see as "now"
(``self.log_time()``), what lock expiry and session expiry use.

Exactly-once across retries: ``c`` is a random id per attached node, ``s``
numbers its calls, ``f`` (floor) is the smallest seq that node still waits
for.  A session per client keeps the outcome of each seq >= floor; a command
whose seq is below the floor or already has an outcome is a duplicate and
runs nothing.  Sessions unused for ``session_ttl`` seconds of log time are
dropped.

Versions: each node announces (``hello``) the versions of every method it
can run.  A call of version v runs only if every member of the configuration
(voters and learners, as applied at that entry) has announced that it runs v
for that method; a member that has not announced yet runs nothing.  Otherwise
the call is a :class:`VersionMismatch` on every node alike (the decision
depends only on the log).  A node asked to apply a call that the log ran but
whose version its code lacks (it dropped a version it had announced, or it
replays calls made before it joined) raises from ``apply``: the node stops
rather than go on different from the others.

Persistence (``path`` given)::

    path/objects.lock          flock()ed while open
    path/objects.boot          the machine's boot id while commits may be unsynced (see "Durability")
    path/objects.lmdb/         LMDB environment, named databases:
        meta      b"format" -> 1, b"last_applied", b"membership", b"sys" (log time, versions),
                  b"snapshot" -> [snapshot-meta wire, file name]
        objects   name (utf-8) -> value-codec bytes of get_state()
        sessions  client id -> [last time, floor, [[seq, outcome], ...]]
    path/objects-snapshots/    snap-*.objsnap; *.tmp while built or received

One write transaction per applied batch holds the states of the objects
the batch touched, the sessions, ``sys``, ``last_applied`` and the
membership, so a restart restores the objects from LMDB and replays only
the log after ``last_applied``.  Without ``path`` the state lives in memory
only (the log replays after a restart).

Durability: that transaction is committed without fsync.  The Raft log,
fsynced on a majority before an entry commits, already makes every applied
entry recoverable, so the objects may lag their durable state behind the
log (``docs/objects.md``, "What a node keeps after a crash"):

- a process crash (kill -9) loses nothing: the commits are in the page cache;
- the log is purged only up to a snapshot, and :meth:`build_snapshot` and
  :meth:`install_snapshot` fsync the environment before they return, so the
  durable ``last_applied`` is never behind a purged entry (and
  ``pyraft.runtime.core.restore_state`` refuses to start a node where it is);
- a power loss or kernel crash may tear unsynced LMDB pages, so while commits
  may be unsynced ``objects.boot`` names the machine's boot
  (:class:`~pyraft.snapshot_files.UnsyncedMark`); opened in another boot, the
  environment is discarded and rebuilt from the newest snapshot file, and the
  log replays the rest;
- :meth:`close` fsyncs and removes ``objects.boot``: nothing to replay.

Snapshot stream (file or BytesIO): ``b"PYRAFTOB"``, then msgpack records: a
header ``{"version": 1, "meta": <snapshot-meta wire>}``, ``[0, name, state]``
per object, ``[1, client, session]`` per session, ``[2, sys]``, and
``[3, n_objects, n_sessions]``; then the CRC-32 of everything before it (4
bytes big-endian).
"""
from __future__ import annotations

import io
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence

import lmdb

from ..codec import (log_id_from_wire, log_id_to_wire, pack, stored_membership_from_wire, stored_membership_to_wire,
                     unpack)
from ..errors import CodecError, RaftError, ResultNotKept, StorageError, Timeout
from ..runtime.futures import fail, succeed
from ..snapshot_files import (SnapshotDir, SnapshotWriter, UnsyncedMark, durable, get_pointer, read_header,
                              read_records, set_pointer, unlink_quietly)
from ..stores.lmdb import DEFAULT_MAP_SIZE, DEFAULT_MAX_MAP_SIZE, LmdbEnv
from ..types import Entry, EntryKind, LogId, SnapshotMeta, StoredMembership, log_index
from . import _values
from .base import (NotAttached, ReplicatedMethod, ReplicatedObject, VersionMismatch, iter_versions, outcome_from_wire,
                   outcome_to_wire)
from .caller import Caller

__all__ = ["ObjectStateMachine", "OBJECTS_ENV_NAME", "OBJECTS_LOCK_NAME", "OBJECTS_BOOT_NAME", "OBJECTS_SNAPSHOT_DIR"]

log = logging.getLogger("pyraft.objects")

FORMAT_VERSION = 1
SNAPSHOT_VERSION = 1
SNAPSHOT_MAGIC = b"PYRAFTOB"
OBJECTS_ENV_NAME = "objects.lmdb"
OBJECTS_LOCK_NAME = "objects.lock"
OBJECTS_BOOT_NAME = "objects.boot"
OBJECTS_SNAPSHOT_DIR = "objects-snapshots"
DEFAULT_SESSION_TTL = 24 * 3600.0

#: The longest client id a call may carry: sessions are keyed by it in LMDB (511 bytes at most).
MAX_CLIENT_ID_BYTES = 255
#: The longest object name (utf-8): objects are keyed by it in LMDB.
MAX_NAME_BYTES = 511
#: A session keeps a call's outcome for a retry only up to this many bytes encoded (a retry of a
#: call with a larger one gets ResultNotKept): every replica keeps it for ``session_ttl``.
MAX_KEPT_OUTCOME = 1024
#: A session keeps at most this many outcomes (above its floor): past it the oldest go and the
#: floor moves past them.  Twice what a Caller sends above its floor (caller.MAX_SENT), so only
#: a client that is not a Caller ever meets it.
MAX_SESSION_OUTCOMES = 1024
#: The fields an objects command may carry ("t" is the leader's stamp).
_CALL_FIELDS = frozenset(("k", "c", "s", "f", "t", "o", "m", "v", "a"))
_HELLO_FIELDS = frozenset(("k", "c", "s", "f", "t", "n", "vers"))

_SNAP_SUFFIX = ".objsnap"
_REC_OBJECT, _REC_SESSION, _REC_SYS, _REC_END = 0, 1, 2, 3
_META, _OBJECTS, _SESSIONS = b"meta", b"objects", b"sessions"
_K_FORMAT, _K_APPLIED, _K_MEMBERSHIP, _K_SYS, _K_SNAPSHOT = (b"format", b"last_applied", b"membership", b"sys",
                                                             b"snapshot")


class _Session:
    """One client's dedup record: the outcomes of its calls with seq >= floor."""

    __slots__ = ("last", "floor", "done")

    def __init__(self, last: float = 0.0, floor: int = 0, done: dict[int, list] | None = None) -> None:
        self.last = last
        self.floor = floor
        self.done: dict[int, list] = done if done is not None else {}

    def to_wire(self) -> list:
        return [self.last, self.floor, [[s, o] for s, o in self.done.items()]]

    @classmethod
    def from_wire(cls, w: Any) -> "_Session":
        if not (isinstance(w, list) and len(w) == 3 and isinstance(w[0], (int, float))
                and type(w[1]) is int and isinstance(w[2], list)):
            raise CodecError("malformed session record")
        done = {}
        for item in w[2]:
            if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int):
                raise CodecError("malformed session record")
            done[item[0]] = item[1]
        return cls(float(w[0]), w[1], done)


def _kept(wire: list, log_id: LogId) -> list:
    """What a session keeps of a call's outcome: all of it, or past :data:`MAX_KEPT_OUTCOME` a note."""
    n = len(pack(wire))
    if n <= MAX_KEPT_OUTCOME:
        return wire
    return outcome_to_wire(False, ResultNotKept(
        f"this call ran once, at log index {log_id.index}; its outcome, {n} bytes encoded, is larger than "
        f"a session keeps ({MAX_KEPT_OUTCOME}), and this answer comes from the session (a re-sent copy of "
        f"the call, or a snapshot this node installed): read the object's state instead"))


def check_objects_command(command: Any) -> None:
    """``CodecError`` for a command that is not a call or version announcement a Caller makes.

    Checked before proposing (the leader's ``objects.call`` handler: a
    malformed request never reaches the log).  Apply checks what it relies
    on again, for an entry in a log all the same (one an older node wrote).
    """
    if type(command) is not dict:
        raise CodecError(f"an objects command is a map, not {type(command).__name__}")
    k = command.get("k")
    if k not in ("call", "hello"):
        raise CodecError("objects command: 'k' must be 'call' or 'hello'")
    extra = set(command) - (_CALL_FIELDS if k == "call" else _HELLO_FIELDS)
    if extra:
        raise CodecError(f"objects {k}: unknown fields {sorted(repr(x)[:40] for x in extra)[:5]}")
    c, s, f = command.get("c"), command.get("s"), command.get("f")
    if type(c) is not bytes or not 1 <= len(c) <= MAX_CLIENT_ID_BYTES:
        raise CodecError(f"objects command: 'c' (the client id) must be 1 to {MAX_CLIENT_ID_BYTES} bytes")
    if type(s) is not int or type(f) is not int or not 0 <= f <= s + 1 or s >= 2**63:
        raise CodecError("objects command: 's' and 'f' must be integers, 0 <= f <= s + 1 < 2**63")
    if k == "call":
        o, m, v, a = command.get("o"), command.get("m"), command.get("v"), command.get("a")
        if not (type(o) is str and type(m) is str and type(v) is int and type(a) is bytes):
            raise CodecError("objects call: 'o' and 'm' must be str, 'v' an int and 'a' bytes")
        if len(o.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise CodecError(f"objects call: an object name is at most {MAX_NAME_BYTES} bytes")
    elif type(command.get("n")) is not int or type(command.get("vers")) is not dict:
        raise CodecError("objects hello: 'n' must be a node id and 'vers' a map")


def _versions_from_wire(v: Any) -> dict[int, dict[str, list[int]]]:
    if not isinstance(v, dict):
        raise CodecError("malformed version table")
    out: dict[int, dict[str, list[int]]] = {}
    for n, table in v.items():
        if type(n) is not int or not isinstance(table, dict):
            raise CodecError("malformed version table")
        out[n] = {q: [x for x in vs if type(x) is int] for q, vs in table.items()
                  if isinstance(q, str) and isinstance(vs, list)}
    return out


class ObjectStateMachine:
    """Applies replicated calls to named :class:`ReplicatedObject` instances; a pyraft StateMachine.

    ``ObjectStateMachine(*objects, path=None)``: each node builds its own
    instances of the same objects (same names) and its own state machine;
    pass it to ``Raft(...)`` as the state machine, then call
    :meth:`attach` with that Raft so that calls know where to go.

    - ``path``: a node data directory (may be the one of ``LmdbLogStore``)
      to keep the objects in LMDB; None keeps them in memory.
    - ``session_ttl``: seconds of log time after which a silent client's
      dedup record is dropped; a call retried later than that could apply twice.
    - ``clock``: the wall clock this node stamps commands with while it
      leads (tests give nodes skewed clocks).
    """

    #: Test hook called with a label where a crash matters ("apply:persisted"); does nothing by default.
    _crash_point: Callable[[str], None] = staticmethod(lambda where: None)

    def __init__(self, *objects: ReplicatedObject, path: str | os.PathLike | None = None,
                 session_ttl: float = DEFAULT_SESSION_TTL, clock: Callable[[], float] = time.time,
                 map_size: int = DEFAULT_MAP_SIZE, max_map_size: int = DEFAULT_MAX_MAP_SIZE) -> None:
        if not (isinstance(session_ttl, (int, float)) and session_ttl > 0):
            raise ValueError("session_ttl must be a positive number of seconds")
        self._session_ttl = float(session_ttl)
        self._clock = clock
        self._objects: dict[str, ReplicatedObject] = {}
        for obj in objects:
            self._register(obj)
        # Everything the log decides, guarded by _lock (an RLock: replicated
        # methods and local reads under obj.locked() may re-enter): the
        # objects' replicated state, _sessions, _versions, _log_time,
        # _current_log_id, _orphans and (in memory mode) _applied.
        # invariant: the objects reflect exactly the entries up to _applied[0].
        self._lock = threading.RLock()
        self._applied_cond = threading.Condition(self._lock)
        self._applied: tuple[LogId | None, StoredMembership | None] = (None, None)
        self._log_time = 0.0
        self._current_log_id: LogId | None = None
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()  # ordered by last use
        self._versions: dict[int, dict[str, list[int]]] = {}
        self._orphans: dict[str, bytes] = {}  # states of names not registered here (kept, snapshotted)
        # (member ids or None, {node: {"object.method": [versions]}}): a copy for lock-free readers,
        # replaced whole whenever the versions or the membership change.
        self._version_view: tuple[set[int] | None, dict[int, dict[str, list[int]]]] = (None, {})
        self._initial = {name: self._dump_state(obj) for name, obj in self._objects.items()}
        # Calls of this node waiting for their entry to be applied here: seq -> future.
        self._wait_lock = threading.Lock()  # guards _waiters and _client_id
        self._waiters: dict[int, Future] = {}
        self._client_id = b""
        self._caller: Caller | None = None
        self._raft: Any = None
        self._apply_thread: int | None = None  # the thread inside apply(), while it runs methods
        self._closed = False
        # Snapshots: _snap_lock guards _snapshot (memory: (meta, bytes); LMDB: (meta, file path)).
        self._snap_lock = threading.Lock()
        self._snapshot: tuple[SnapshotMeta, Any] | None = None
        self._env: LmdbEnv | None = None
        self._snaps: SnapshotDir | None = None
        self._mark: UnsyncedMark | None = None
        if path is not None:
            self._open_lmdb(path, map_size, max_map_size)

    # ------------------------------------------------------------------ objects

    def _register(self, obj: ReplicatedObject) -> None:
        if not isinstance(obj, ReplicatedObject):
            raise TypeError(f"ObjectStateMachine takes ReplicatedObject instances, got {type(obj).__name__}")
        name = obj.object_name
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"an object name is at most {MAX_NAME_BYTES} bytes of utf-8, got {name[:40]!r}...")
        if name in self._objects:
            raise ValueError(f"two objects are named {name!r}; give one a name= at construction")
        if getattr(obj, "_repl_sm", None) is not None:
            raise ValueError(f"{obj!r} already belongs to another ObjectStateMachine")
        cls = type(obj)
        if cls.__replicated_state__ is None and (cls.get_state is ReplicatedObject.get_state
                                                 or cls.set_state is ReplicatedObject.set_state):
            raise TypeError(f"{cls.__name__} must declare __replicated_state__ or override get_state and set_state")
        obj._repl_sm = self
        self._objects[name] = obj

    @property
    def objects(self) -> Mapping[str, ReplicatedObject]:
        """The objects by name (read-only view)."""
        return dict(self._objects)

    def __getitem__(self, name: str) -> ReplicatedObject:
        return self._objects[name]

    @staticmethod
    def _dump_state(obj: ReplicatedObject) -> bytes:
        try:
            return _values.dumps(obj.get_state())
        except TypeError as e:
            raise TypeError(f"the state of {obj!r} cannot be replicated: {e}") from None

    def local_versions(self) -> dict[str, list[int]]:
        """``{"object.method": [versions]}`` this node can apply (what it announces)."""
        out: dict[str, list[int]] = {}
        for name, obj in self._objects.items():
            for mname, vers in iter_versions(type(obj)):
                out[f"{name}.{mname}"] = vers
        return out

    def cluster_versions(self) -> dict[int, dict[str, list[int]]]:
        """The versions each node announced, as applied here: ``{node id: {"object.method": [versions]}}``."""
        return {n: {q: list(v) for q, v in t.items()} for n, t in self._version_view[1].items()}

    def log_time(self) -> float:
        """The log time after the last applied entry (0.0 before any call)."""
        return self._log_time

    @property
    def path(self) -> str | None:
        return None if self._env is None else self._env.root

    # ------------------------------------------------------------------ binding to a Raft node

    def attach(self, raft: Any) -> None:
        """Bind to the Raft node whose state machine this is; calls go through it from now on.

        Registers the ``objects.call`` and ``objects.read_index`` request
        handlers on it, starts this node's call dispatcher thread
        (``pyraft-objects-<id>``) and announces this node's method versions
        in the log.  Attaching again (a restarted node) replaces the old binding.
        """
        if getattr(raft, "state_machine", self) is not self:
            raise ValueError("attach the Raft node that was given this ObjectStateMachine")
        if self._closed:
            raise RaftError("this ObjectStateMachine is closed")
        self._stop_caller()
        client = uuid.uuid4().bytes
        with self._wait_lock:
            self._client_id = client
        self._raft = raft
        caller = Caller(self, raft, client)
        self._caller = caller
        # Peers forward calls to the leader, so a peer key has client rights.
        raft.set_client_handler("objects.call", caller.on_call_request, role="client")
        raft.set_client_handler("objects.read_index", caller.on_read_index_request, role="reader")
        caller.announce({"k": "hello", "n": raft.node_id, "vers": self.local_versions()})
        caller.start()
        raft.add_shutdown_hook(caller.stop)  # pending and later calls raise ShutDown; the thread is joined

    def _stop_caller(self) -> None:
        caller, self._caller = self._caller, None
        if caller is not None:
            caller.stop()
        with self._wait_lock:
            waiters, self._waiters = self._waiters, {}
            self._client_id = b""
        for fut in waiters.values():
            fail(fut, RaftError("the ObjectStateMachine was detached from its Raft node"))

    def _submit_call(self, obj: ReplicatedObject, method: ReplicatedMethod, args: tuple, kwargs: dict,
                     timeout: float | None) -> Future:
        caller = self._caller
        if caller is None:
            raise NotAttached(f"the ObjectStateMachine of {obj.object_name!r} is not attached to a Raft node")
        try:
            a = _values.dumps([list(args), kwargs])
            _values.check_args_depth(a)
        except TypeError as e:
            raise TypeError(f"arguments of {obj.object_name}.{method.method_name}: {e}") from None
        body = {"k": "call", "o": obj.object_name, "m": method.method_name, "v": None, "a": a}
        # The version is chosen by the dispatcher just before the first send, once this node's
        # own announcement is applied here (so its view of the others' versions is not older).
        return caller.submit_call(body, timeout, lambda: self._choose_version(obj, method))

    def _choose_version(self, obj: ReplicatedObject, method: ReplicatedMethod) -> int:
        """The highest version of the method this node runs that every other member announced it runs.

        With no such version (a member has not announced, or runs none in
        common): the method's current version (the call then fails with
        VersionMismatch when applied, on every node).
        """
        mine = sorted(type(obj)._repl_methods.get(method.method_name, {}), reverse=True)
        q = f"{obj.object_name}.{method.method_name}"
        me = getattr(self._raft, "node_id", None)
        members, versions = self._version_view  # no lock: the dispatcher must never wait for apply
        ids = versions if members is None else members
        others = [versions.get(n, {}).get(q, []) for n in ids if n != me]
        for v in mine:
            if all(v in vs for vs in others):
                return v
        return type(obj)._repl_current.get(method.method_name, method.ver)

    def _register_waiter(self, seq: int, fut: Future) -> None:
        with self._wait_lock:
            self._waiters[seq] = fut

    def _drop_waiter(self, seq: int) -> None:
        with self._wait_lock:
            self._waiters.pop(seq, None)

    # ------------------------------------------------------------------ linearizable reads

    def sync(self, timeout: float | None = None) -> LogId:
        """ReadIndex: once this returns, local reads see every call completed before it was called."""
        caller = self._caller
        if caller is None:
            raise NotAttached("this ObjectStateMachine is not attached to a Raft node")
        deadline = None if timeout is None else time.monotonic() + timeout
        lid = caller.read_index(timeout)
        with self._applied_cond:
            while log_index(self._applied[0]) < lid.index:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"this node did not apply index {lid.index} within {timeout} s")
                caller.check_running()
                self._applied_cond.wait(0.05 if left is None else min(left, 0.05))
        return lid

    # ------------------------------------------------------------------ StateMachine: apply

    def applied_state(self) -> tuple[LogId | None, StoredMembership | None]:
        return self._applied

    def _member_ids(self) -> set[int] | None:
        sm = self._applied_membership
        return None if sm is None else set(sm.membership.nodes)

    @property
    def _applied_membership(self) -> StoredMembership | None:
        return self._batch_membership if self._batch_membership is not None else self._applied[1]

    _batch_membership: StoredMembership | None = None

    def check_command(self, command: Any) -> None:
        """Refuse before proposing (``CodecError``) a command that is not a well-formed call or announcement."""
        check_objects_command(command)

    def apply(self, entries: Sequence[Entry]) -> list[Any]:
        """Apply ``entries`` in order; one result per entry.

        A call's result is what its method returned; an exception instance
        for what it raised, a :class:`VersionMismatch`, a duplicate or a
        malformed command (never raised: the node keeps running).  With
        ``path``, the batch's effects and the new applied state are written
        in one LMDB transaction before this returns.
        """
        if not entries:
            return []
        done: list[tuple[int, bool, Any]] = []
        with self._lock:
            expect = log_index(self._applied[0]) + 1
            for e in entries:
                if e.index != expect:
                    raise StorageError(f"object state machine: entry {e.log_id} applied out of order "
                                       f"(next expected index {expect})")
                expect += 1
            with self._wait_lock:
                client = self._client_id
            dirty: set[str] = set()
            touched: set[bytes] = set()
            expired: set[bytes] = set()
            results: list[Any] = []
            versions_before = dict(self._versions)
            self._batch_membership = None
            self._apply_thread = threading.get_ident()
            try:
                for e in entries:
                    self._current_log_id = e.log_id
                    if e.kind == EntryKind.MEMBERSHIP:
                        self._batch_membership = StoredMembership(e.log_id, e.payload)
                        results.append(None)
                    elif e.kind == EntryKind.NORMAL:
                        results.append(self._apply_command(e, client, dirty, touched, expired, done))
                    else:
                        results.append(None)
                membership = self._batch_membership or self._applied[1]
            finally:
                self._batch_membership = None
                self._apply_thread = None
            last = entries[-1].log_id
            if versions_before != self._versions or membership is not self._applied[1]:
                self._batch_membership = membership
                try:
                    self._publish_versions()
                finally:
                    self._batch_membership = None
            rows = None
            if self._env is not None:
                rows = ([(n, self._dump_state(self._objects[n])) for n in sorted(dirty)],
                        [(c, pack(self._sessions[c].to_wire())) for c in sorted(touched) if c in self._sessions],
                        sorted(expired - set(self._sessions)), pack(self._sys_wire()))
            else:
                self._applied = (last, membership)
        if rows is not None:
            self._persist(last, membership, membership is not self._applied[1], *rows)
            self._crash_point("apply:persisted")
            self._applied = (last, membership)
        with self._applied_cond:
            self._applied_cond.notify_all()
        self._complete_waiters(done)
        return results

    def _apply_command(self, e: Entry, client: bytes, dirty: set[str], touched: set[bytes],
                       expired: set[bytes], done: list) -> Any:
        cmd = e.payload
        kind = cmd.get("k") if isinstance(cmd, dict) else None
        if kind not in ("call", "hello"):
            return RaftError(f"entry {e.log_id} is not a replicated-object command")
        c, s, f, t = cmd.get("c"), cmd.get("s"), cmd.get("f"), cmd.get("t")
        if type(c) is not bytes or not 1 <= len(c) <= MAX_CLIENT_ID_BYTES or type(s) is not int or \
                type(f) is not int or \
                not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            return RaftError(f"entry {e.log_id}: malformed replicated-object command")
        # The log's clock: the leader's stamp, never going back.
        if t > self._log_time:
            self._log_time = float(t)
        now = self._log_time
        self._expire_sessions(now, expired)
        sess = self._sessions.get(c)
        if sess is not None and (s < sess.floor or s in sess.done):
            wire = sess.done.get(s)
            if wire is None:
                ok, value = False, RaftError(
                    f"entry {e.log_id}: call {s} of this client is below its session's floor: it already completed"
                    f", or more than {MAX_SESSION_OUTCOMES} later calls of the client completed first")
            else:
                ok, value = outcome_from_wire(wire)
        else:
            ok, value = self._execute(kind, cmd, e, dirty)
            if sess is None:
                sess = self._sessions[c] = _Session()
            sess.done[s] = _kept(outcome_to_wire(ok, value), e.log_id)
            if len(sess.done) > MAX_SESSION_OUTCOMES:  # a floor held back: the oldest outcome goes
                oldest = min(sess.done)
                del sess.done[oldest]
                if oldest >= sess.floor:
                    sess.floor = oldest + 1
        if f > sess.floor:
            sess.floor = f
            for old in [x for x in sess.done if x < f]:
                del sess.done[old]
        sess.last = now
        self._sessions.move_to_end(c)
        touched.add(c)
        if c == client:
            done.append((s, ok, value))
        if ok:
            return value
        try:
            # marks an applied outcome (see Caller.on_call_request), on whatever exception it is
            setattr(value, "pyraft_log_id", e.log_id)
        except (AttributeError, TypeError):
            pass
        return value

    def _expire_sessions(self, now: float, expired: set[bytes]) -> None:
        horizon = now - self._session_ttl
        while self._sessions:
            c, sess = next(iter(self._sessions.items()))
            if sess.last >= horizon:
                return
            del self._sessions[c]
            expired.add(c)

    def _execute(self, kind: str, cmd: dict, e: Entry, dirty: set[str]) -> tuple[bool, Any]:
        if kind == "hello":
            n, vers = cmd.get("n"), cmd.get("vers")
            try:
                if type(n) is not int:
                    raise CodecError("node id")
                self._versions[n] = _versions_from_wire({n: vers})[n]
            except CodecError:
                return False, RaftError(f"entry {e.log_id}: malformed version announcement")
            return True, None
        oname, mname, ver, a = cmd.get("o"), cmd.get("m"), cmd.get("v"), cmd.get("a")
        if not (isinstance(oname, str) and isinstance(mname, str) and type(ver) is int and type(a) is bytes):
            return False, RaftError(f"entry {e.log_id}: malformed call")
        q = f"{oname}.{mname}"
        members = self._member_ids()
        # Every member must have announced the version (only before the first configuration is
        # applied, which no real log has, are the announced nodes all there is to go by).
        ids = sorted(self._versions if members is None else members)
        lacking = {n: list(self._versions.get(n, {}).get(q, [])) for n in ids
                   if ver not in self._versions.get(n, {}).get(q, [])}
        if lacking:
            silent = [n for n in lacking if n not in self._versions]
            why = f"; node(s) {silent} have not announced their versions yet" if silent else ""
            return False, VersionMismatch(
                f"{q} version {ver} is not run by node(s) {sorted(lacking)} (they run {lacking}{why}); "
                f"nothing was changed", object_name=oname, method=mname, version=ver, supported=lacking)
        obj = self._objects.get(oname)
        impl = type(obj)._repl_methods.get(mname, {}).get(ver) if obj is not None else None
        if impl is None:
            # Every member announced the version, this node included or (a node replaying calls
            # made before it joined) not yet a member: the others ran the call.  Going on without
            # it would leave this node's object different for good; stop instead, loudly.
            have = sorted(type(obj)._repl_methods.get(mname, {})) if obj is not None else []
            raise VersionMismatch(
                f"entry {e.log_id} calls {q} version {ver}, which the other nodes ran but this node's code "
                f"does not have (it runs {have}); this node stops rather than let its {oname!r} differ from "
                f"theirs: restart it with code that keeps that version (@replicated(ver=N))",
                object_name=oname, method=mname, version=ver)
        try:
            args = _values.loads(a, "call arguments")
            if not (isinstance(args, list) and len(args) == 2 and isinstance(args[0], list)
                    and isinstance(args[1], dict) and all(isinstance(k, str) for k in args[1])):
                raise CodecError("call arguments: expected [args, kwargs]")
            _values.check_args_depth(a, args)
        except (CodecError, TypeError) as ex:
            return False, RaftError(f"entry {e.log_id}: {ex}")
        dirty.add(oname)
        try:
            return True, impl.fn(obj, *args[0], **args[1])
        except Exception as ex:  # noqa: BLE001 - the method's own error is the call's outcome
            return False, ex

    def _publish_versions(self) -> None:
        """Refresh ``_version_view`` (under ``_lock``, after the applied state changed)."""
        members = self._member_ids()
        self._version_view = (members, {n: {q: list(v) for q, v in t.items()} for n, t in self._versions.items()})

    def _sys_wire(self) -> dict:
        return {"log_time": self._log_time, "versions": self._versions}

    def _load_sys(self, v: Any) -> None:
        if not isinstance(v, dict) or not isinstance(v.get("log_time"), (int, float)):
            raise CodecError("malformed sys record")
        self._log_time = float(v["log_time"])
        self._versions = _versions_from_wire(v.get("versions", {}))

    def _complete_waiters(self, done: list[tuple[int, bool, Any]]) -> None:
        if not done:
            return
        with self._wait_lock:
            futs = [(self._waiters.pop(s, None), ok, v) for s, ok, v in done]
        for fut, ok, value in futs:
            if fut is not None:
                # A timeout or a cancel may have won the race: succeed and fail leave the future then.
                succeed(fut, value) if ok else fail(fut, value)

    # ------------------------------------------------------------------ LMDB

    def _open_lmdb(self, path: str | os.PathLike, map_size: int, max_map_size: int) -> None:
        mark = self._mark = UnsyncedMark(os.path.abspath(os.fspath(path)), OBJECTS_BOOT_NAME,
                                         "object state machine")
        env = LmdbEnv(path, OBJECTS_ENV_NAME, OBJECTS_LOCK_NAME, what="object state machine", sync=False,
                      map_size=map_size, max_map_size=max_map_size, prepare=mark.discard_if_rebooted)
        self._env = env
        try:
            self._snaps = SnapshotDir(os.path.join(env.root, OBJECTS_SNAPSHOT_DIR), _SNAP_SUFFIX)
            names = (_META, _OBJECTS, _SESSIONS)
            if env.is_pristine():
                def init(txn: lmdb.Transaction) -> tuple:
                    dbs = tuple(env._live().open_db(n, txn=txn) for n in names)
                    txn.put(_K_FORMAT, pack(FORMAT_VERSION), db=dbs[0])
                    return dbs
                self._dbs = env.write(init)
            else:
                self._dbs = env.open_existing_dbs(names)
            if mark.discarded:
                self._restore_newest_snapshot()
            meta_db, obj_db, sess_db = self._dbs
            with env.read() as txn:
                version = self._meta(txn, _K_FORMAT)
                if version != FORMAT_VERSION:
                    raise StorageError(f"object state machine in {env.root} has format version {version!r}; "
                                       f"this pyraft reads version {FORMAT_VERSION}")
                applied = log_id_from_wire(self._meta(txn, _K_APPLIED), "last_applied")
                membership = stored_membership_from_wire(self._meta(txn, _K_MEMBERSHIP))
                sys_v = self._meta(txn, _K_SYS)
                pointer = get_pointer(txn, meta_db, _K_SNAPSHOT)
                states = {bytes(k).decode(): bytes(v) for k, v in txn.cursor(db=obj_db)}
                sessions = [(bytes(k), _Session.from_wire(unpack(bytes(v), "session")))
                            for k, v in txn.cursor(db=sess_db)]
            if sys_v is not None:
                self._load_sys(sys_v)
            sessions.sort(key=lambda kv: kv[1].last)
            self._sessions = OrderedDict(sessions)
            self._load_states(states)
            self._applied = (applied, membership)
            self._publish_versions()
            self._snapshot = self._snaps.existing(pointer)
            self._cleanup(at_open=True)
            if mark.discarded:  # only now: until the rebuild is complete, the old mark asks for it again
                mark.set()
        except (CodecError, ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            env.close()
            raise StorageError(f"object state machine in {env.root} is unreadable: {e}") from None
        except OSError as e:
            env.close()
            raise StorageError(f"object state machine in {env.root}: {e}") from None
        except BaseException:
            env.close()
            raise

    def _restore_newest_snapshot(self) -> None:
        """Load the newest snapshot file that reads whole into the (new, empty) environment, and fsync it."""
        assert self._env is not None and self._snaps is not None
        for path in self._snaps.newest_first():
            try:
                with open(path, "rb") as f:
                    meta = read_header(f, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, "object snapshot file")
                    f.seek(0)
                    blob = f.read()
                objects, sessions, sys_v, _sess = _check_snapshot(blob, meta)
                self._env.write(lambda txn: self._load_txn(txn, meta, objects, sessions, sys_v, path))
            except (StorageError, CodecError, OSError) as e:
                log.warning("object state machine in %s: snapshot file %s is unusable (%s); trying an older one",
                            self._env.root, os.path.basename(path), e)
                continue
            self._env.sync()
            log.warning("object state machine in %s: rebuilt from snapshot %s (up to %s)", self._env.root,
                        os.path.basename(path), meta.last_log_id)
            return
        log.warning("object state machine in %s: no snapshot file to rebuild from: starting empty "
                    "(the log replays everything it holds)", self._env.root)

    def _load_txn(self, txn: lmdb.Transaction, meta: SnapshotMeta, objects: Mapping[str, bytes],
                  sessions: Mapping[bytes, bytes], sys_v: Any, path: str) -> None:
        """Replace everything in ``txn`` with a checked snapshot's content; point at its file ``path``."""
        meta_db, obj_db, sess_db = self._dbs
        txn.drop(obj_db, delete=False)
        txn.drop(sess_db, delete=False)
        for n, b in objects.items():
            txn.put(n.encode(), b, db=obj_db)
        for c, b in sessions.items():
            txn.put(c, b, db=sess_db)
        txn.put(_K_SYS, pack(sys_v), db=meta_db)
        txn.put(_K_APPLIED, pack(log_id_to_wire(meta.last_log_id)), db=meta_db)
        txn.put(_K_MEMBERSHIP, pack(stored_membership_to_wire(meta.last_membership)), db=meta_db)
        set_pointer(txn, meta_db, _K_SNAPSHOT, meta, path)

    def _meta(self, txn: lmdb.Transaction, key: bytes) -> Any:
        raw = txn.get(key, db=self._dbs[0])
        return None if raw is None else unpack(bytes(raw), f"meta {key.decode()}")

    def _load_states(self, states: Mapping[str, bytes]) -> None:
        """Set every registered object from ``states`` (its initial state when absent); keep the rest."""
        decoded = {n: _values.loads(b, f"state of {n!r}") for n, b in states.items() if n in self._objects}
        for name, obj in self._objects.items():
            obj.set_state(decoded[name] if name in decoded else _values.loads(self._initial[name]))
        self._orphans = {n: b for n, b in states.items() if n not in self._objects}

    def _persist(self, last: LogId, membership: StoredMembership | None, membership_changed: bool,
                 objects: list[tuple[str, bytes]], sessions: list[tuple[bytes, bytes]],
                 expired: list[bytes], sys_b: bytes) -> None:
        meta_db, obj_db, sess_db = self._dbs

        def run(txn: lmdb.Transaction) -> None:
            for name, b in objects:
                txn.put(name.encode(), b, db=obj_db)
            for c, b in sessions:
                txn.put(c, b, db=sess_db)
            for c in expired:
                txn.delete(c, db=sess_db)
            txn.put(_K_SYS, sys_b, db=meta_db)
            txn.put(_K_APPLIED, pack(log_id_to_wire(last)), db=meta_db)
            if membership_changed:
                txn.put(_K_MEMBERSHIP, pack(stored_membership_to_wire(membership)), db=meta_db)

        assert self._env is not None
        self._env.write(run)

    # ------------------------------------------------------------------ StateMachine: snapshots

    def build_snapshot(self) -> SnapshotMeta:
        """Write a snapshot of one consistent view while apply goes on; make it current; return its meta.

        Memory: the states are encoded under the lock (that is the copy),
        then streamed to a BytesIO.  LMDB: one read transaction is streamed
        to a file (no lock held).
        """
        if self._env is None:
            with self._lock:
                last, membership = self._applied
                objects = [(n, self._dump_state(o)) for n, o in self._objects.items()]
                objects += list(self._orphans.items())
                sessions = [(c, pack(s.to_wire())) for c, s in self._sessions.items()]
                sys_b = pack(self._sys_wire())
            meta = SnapshotMeta(last, membership, f"{last or 'empty'}-{uuid.uuid4().hex[:12]}")
            buf = io.BytesIO()
            _write_snapshot(buf, meta, objects, sessions, sys_b)
            with self._snap_lock:
                if self._snapshot is None or log_index(meta.last_log_id) >= log_index(self._snapshot[0].last_log_id):
                    self._snapshot = (meta, buf.getvalue())
                return self._snapshot[0]
        assert self._snaps is not None
        meta_db, obj_db, sess_db = self._dbs
        with self._snaps.building() as tmp:
            with self._env.read(buffers=True) as txn:
                last = log_id_from_wire(self._meta(txn, _K_APPLIED), "last_applied")
                membership = stored_membership_from_wire(self._meta(txn, _K_MEMBERSHIP))
                sys_raw = txn.get(_K_SYS, db=meta_db)
                meta = SnapshotMeta(last, membership, f"{last or 'empty'}-{uuid.uuid4().hex[:12]}")
                with durable(tmp) as f:
                    _write_snapshot(f, meta, ((bytes(k).decode(), bytes(v)) for k, v in txn.cursor(db=obj_db)),
                                    ((bytes(k), bytes(v)) for k, v in txn.cursor(db=sess_db)),
                                    bytes(sys_raw) if sys_raw is not None else pack(self._empty_sys()))
            with self._snap_lock:
                final = self._snaps.publish(tmp, meta)
                # Not over a newer snapshot installed meanwhile.
                if self._env.write(lambda txn: set_pointer(txn, meta_db, _K_SNAPSHOT, meta, final,
                                                           unless_newer=True)):
                    self._snapshot = (meta, final)
                # The engine purges the log up to this snapshot once we return: what the
                # objects hold (applied at least this far) must be on disk first.
                self._env.sync()
                self._cleanup()
                assert self._snapshot is not None
                return self._snapshot[0]

    @staticmethod
    def _empty_sys() -> dict:
        return {"log_time": 0.0, "versions": {}}

    def current_snapshot(self) -> SnapshotMeta | None:
        with self._snap_lock:
            return None if self._snapshot is None else self._snapshot[0]

    def open_snapshot(self) -> tuple[SnapshotMeta, BinaryIO] | None:
        with self._snap_lock:
            if self._snapshot is None:
                return None
            meta, where = self._snapshot
            if self._env is None:
                return meta, io.BytesIO(where)
            return meta, open(where, "rb")

    def begin_receiving_snapshot(self) -> BinaryIO:
        if self._snaps is None:
            return io.BytesIO()
        return self._snaps.begin_receiving()

    def install_snapshot(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        """Replace every object's state, the sessions and the applied state with the snapshot.

        The stream is read and checked completely (CRC, counts, every state
        decoded) before anything changes: content that does not decode or
        validate raises CodecError, with nothing changed (storage.py: the
        snapshot is refused, the node goes on).  With ``path`` the new state
        is one write transaction.  ``data`` is closed here.
        """
        try:
            data.seek(0)
            blob = data.read()
            name = getattr(data, "name", None)
        finally:
            data.close()
        objects, sessions, sys_v, sess = _check_snapshot(blob, meta)
        try:
            decoded = {n: _values.loads(b, f"state of {n!r}") for n, b in objects.items() if n in self._objects}
        except CodecError as e:
            raise CodecError(f"object state machine: snapshot {meta.snapshot_id} is malformed: {e}") from None
        if self._env is not None:
            assert self._snaps is not None
            final = self._snaps.new_file_path(meta)
            with durable(final) as f:
                f.write(blob)
            self._snaps.sync()
            if isinstance(name, str) and self._snaps.forget_received(name):
                unlink_quietly(name)
            try:
                self._env.write(lambda txn: self._load_txn(txn, meta, objects, sessions, sys_v, final))
            except BaseException:
                unlink_quietly(final)
                raise
            # The engine purges the log up to the snapshot once we return.
            self._env.sync()
            snapshot: tuple[SnapshotMeta, Any] = (meta, final)
        else:
            snapshot = (meta, blob)
        with self._lock:
            self._load_sys(sys_v)
            for n, obj in self._objects.items():
                obj.set_state(decoded[n] if n in decoded else _values.loads(self._initial[n]))
            self._orphans = {n: b for n, b in objects.items() if n not in self._objects}
            self._sessions = OrderedDict(sess)
            self._applied = (meta.last_log_id, meta.last_membership)
            self._current_log_id = meta.last_log_id
            self._publish_versions()
            self._applied_cond.notify_all()
            with self._wait_lock:
                mine = self._sessions.get(self._client_id)
                ready = [] if mine is None else [
                    (s, mine.done.get(s) or outcome_to_wire(False, RaftError(
                        f"call {s} of this node is below its session's floor in the snapshot installed: it ran "
                        f"before it, or never will, and its outcome was not kept")))
                    for s in list(self._waiters) if s in mine.done or s < mine.floor]
        with self._snap_lock:
            self._snapshot = snapshot
            if self._env is not None:
                self._cleanup()
        # Calls of this node that the snapshot covers: their outcome comes from the session record.
        self._complete_waiters([(s, *outcome_from_wire(w)) for s, w in ready])

    def _cleanup(self, at_open: bool = False) -> None:
        assert self._snaps is not None
        self._snaps.cleanup(None if self._snapshot is None else self._snapshot[1], at_open)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Stop the call dispatcher and close the LMDB environment.  Idempotent.

        Shut the Raft node down first: it applies entries until then.
        """
        self._closed = True
        self._stop_caller()
        if self._env is not None:
            if not self._env.closed:
                try:
                    self._env.sync()
                    assert self._mark is not None
                    self._mark.clear()
                except (StorageError, OSError) as e:  # the next start replays (or rebuilds): nothing is lost
                    log.warning("object state machine in %s: could not sync at close: %s", self._env.root, e)
            self._env.close()

    def __enter__(self) -> "ObjectStateMachine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "memory" if self._env is None else self._env.root
        return f"ObjectStateMachine({', '.join(self._objects)}; {where})"


# ---------------------------------------------------------------------------
# Snapshot streams

def _write_snapshot(f: BinaryIO, meta: SnapshotMeta, objects: Iterable[tuple[str, bytes]],
                    sessions: Iterable[tuple[bytes, bytes]], sys_b: bytes) -> None:
    w = SnapshotWriter(f, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, meta)
    for name, b in objects:
        w.record(_REC_OBJECT, name, b)
    for c, b in sessions:
        w.record(_REC_SESSION, c, b)
    w.record(_REC_SYS, sys_b)
    w.finish(_REC_END)


def _check_snapshot(blob: bytes, meta: SnapshotMeta) -> tuple[dict[str, bytes], dict[bytes, bytes], Any, list]:
    """Parse and check a snapshot stream: objects, sessions, sys, and the sessions decoded (oldest use first).

    CodecError for anything that does not decode or validate.
    """
    try:
        objects, sessions, sys_v = _read_snapshot(blob, meta)
        sess = [(c, _Session.from_wire(unpack(b, "session"))) for c, b in sessions.items()]
        if not isinstance(sys_v, dict) or not isinstance(sys_v.get("log_time"), (int, float)):
            raise CodecError("malformed sys record")
        _versions_from_wire(sys_v.get("versions", {}))  # what _load_sys reads, once the state is replaced
        if any(not 1 <= len(c) <= MAX_CLIENT_ID_BYTES for c in sessions) or \
                any(len(n.encode()) > MAX_NAME_BYTES for n in objects):
            raise CodecError("a session or object key is longer than the store holds")
    except (CodecError, StorageError) as e:  # read_records raises StorageError for what it refuses
        raise CodecError(f"object state machine: snapshot {meta.snapshot_id} is malformed: {e}") from None
    sess.sort(key=lambda kv: kv[1].last)
    return objects, sessions, sys_v, sess


def _read_snapshot(blob: bytes, meta: SnapshotMeta) -> tuple[dict[str, bytes], dict[bytes, bytes], Any]:
    """Parse and check a whole snapshot stream; StorageError for anything wrong."""
    objects: dict[str, bytes] = {}
    sessions: dict[bytes, bytes] = {}
    sys_v: Any = None
    for rec in read_records(io.BytesIO(blob), SNAPSHOT_MAGIC, SNAPSHOT_VERSION, meta, _REC_END, "object snapshot"):
        kind = rec[0]
        if kind == _REC_OBJECT and len(rec) == 3 and type(rec[1]) is str and type(rec[2]) is bytes:
            objects[rec[1]] = rec[2]
        elif kind == _REC_SESSION and len(rec) == 3 and type(rec[1]) is bytes and type(rec[2]) is bytes:
            sessions[rec[1]] = rec[2]
        elif kind == _REC_SYS and len(rec) == 2 and type(rec[1]) is bytes:
            sys_v = unpack(rec[1], "sys record")
        else:
            raise StorageError("malformed snapshot record")
    if sys_v is None:
        raise StorageError("snapshot stream is truncated")
    return objects, sessions, sys_v
