"""The KV command format and its semantics, once, for every KV state machine.

``KVStateMachine`` (LMDB) and the test-only ``MemoryStateMachine`` both run
:func:`apply_command` against a :class:`KVBackend` of their own, so they
agree on every result by construction.

Every change has a **revision**: the log index of the entry that made it.
Each key keeps ``create_revision`` (the revision that created it since it
last did not exist), ``mod_revision`` (its last change), ``version`` (1 when
created, one more per put; a missing key has version 0) and ``lease`` (0:
none).  Every change also leaves a watch event (put or delete, key, value,
revision) in the state machine's history, in the same transaction.

Commands (what ``Raft.client_write`` carries) are msgpack maps:

==============================================================  ==================================
``{"op": "put", "key": k, "value": v}`` (``"lease": id``)        ``None``
``{"op": "delete", "key": k}``                                   ``True`` if ``k`` existed
``{"op": "cas", "key": k, "expected": e, "value": v}``           ``True`` if it swapped
``{"op": "get", "key": k}``                                      the value, ``None`` if absent
``{"op": "txn", "compare": [...], "success": [...],``            ``[succeeded, responses,
``"failure": [...]}``                                            revision]``
``{"op": "lease_grant", "ttl": seconds}``                        the lease id
``{"op": "lease_revoke", "id": lease_id}``                       ``True`` if the lease existed
``{"op": "compact", "revision": r}``                             ``None``
==============================================================  ==================================

``put`` (and ``cas``) without ``lease`` detaches the key from the lease it had
(as etcd's put); with a lease that does not exist the result is
:class:`~pyraft.errors.LeaseNotFound`.  ``cas`` with ``expected=None`` means "only if absent"
(so a stored ``None`` cannot be CASed against; use ``delete``).  Values are
compared by their msgpack encoding.

Leases: the id of a lease is the revision of its ``lease_grant`` (so every
replica gives the same id), ``ttl`` is a number of seconds in
[:data:`MIN_LEASE_TTL`, :data:`MAX_LEASE_TTL`].  ``lease_revoke`` deletes
every key attached to the lease (a delete event each, at the revoke's
revision, in key order) and the lease.  Expiry is not decided here: the
leader's :class:`~pyraft.kv.leases.LeaseKeeper` proposes a ``lease_revoke``
when a lease's deadline passes.

``compact`` drops the watch history of the revisions before ``revision`` on
every replica (etcd's compaction): a watch from an older revision gets
:class:`~pyraft.errors.Compacted`.  ``revision`` is at most the compaction's
own; one at or below where a replica's history already starts changes
nothing there.  The data is untouched; the history's share of the store's
size quota is freed at once, so ``compact`` is not refused past the quota.

Transactions, applied atomically in one entry: ``compare`` is a list of
``{"key": k, "target": t, "op": o, "value": x}`` with ``t`` one of ``value``,
``version``, ``create_revision``, ``mod_revision``, ``lease`` and ``o`` one of
``==``, ``!=``, ``<``, ``>``; when every compare holds the ``success`` ops
run, else the ``failure`` ops.  A missing key has version, revisions and
lease 0 and fails every compare on its value.  Values compare with ``==`` and
``!=`` by their msgpack encoding, with ``<`` and ``>`` as Python values (an
error result for values that do not order, a str against an int).  The ops
are ``put``, ``delete`` (maps as above) and ``{"op": "get", "key": k}``,
``{"op": "range", "key": k, "end": e, "prefix": bool, "limit": n,
"keys_only": bool}``; they run in order, so a ``get`` after a ``put`` of the
same txn sees the put.  Responses, one per op run: put ``None``, delete a
bool, get ``[value, create_revision, mod_revision, version, lease]`` or
``None``, range ``[[[key, value, create_revision, mod_revision, version,
lease], ...], more]`` (``value`` None with ``keys_only``, which does not
decode values).  The revision in the result is the txn's own.  At most
:data:`MAX_TXN_OPS` compares and ops per list.  The ranges of one txn
return at most :data:`MAX_TXN_RANGE` keys together: the range that reaches
that count stops early, with ``more``, and the ranges after it return no
keys (each range reads at most one key past those it returns, to tell
whether there are more).  So the work a txn costs every replica's apply is
bounded by a count of keys, the same on every replica.  What the gets and
ranges of one txn return is also bounded by
:data:`MAX_TXN_READ_BYTES` (stored keys and records): ranges stop early,
with ``more``, once it is reached, and a txn whose gets alone would return
more is refused (the error is its result).  A malformed txn, or one whose chosen ops would fail (a put to a
lease that does not exist), changes nothing: its result is the error.

Keys: see :mod:`pyraft.kv.encoding` (any scalar or array of scalars, stored
in an order-preserving form of at most :data:`MAX_KEY_BYTES`, 511, bytes: a
``str`` key of up to 127 characters always fits, a ``bytes`` key of up to
510 bytes too).  A key attached to a lease is at most
:data:`MAX_LEASED_KEY_BYTES`, 503, bytes (the lease's key index stores it
after the 8-byte lease id).  Maps are refused as keys.

Exactly-once: a command may carry ``"client": <str or bytes>`` (encoded in
at most :data:`MAX_CLIENT_BYTES`, 503, bytes) and ``"seq": <int >= 0>``.  Per client the state machine remembers the last seq
applied and its result.  ``seq`` greater than it: apply and remember;
``seq`` equal: return the remembered result without applying again; ``seq``
smaller: a :class:`KVCommandError` (the client already moved on).  A result
larger than :data:`MAX_REMEMBERED_RESULT` encoded is not kept: a retry of
that request gets :class:`~pyraft.errors.ResultNotKept` naming the revision
it was applied at (and for a txn whether its compares held).  A session
whose last applied command is more than ``session_ttl`` log indexes behind
the entry being applied is forgotten — a rule on log indexes only, so every
replica drops the same sessions at the same entry.

A malformed command (not a map, unknown op, missing field, bad key or
session fields, a value msgpack cannot encode, arrays and maps nested deeper
than :data:`MAX_DEPTH`) never stops the node: its
result is a :class:`KVCommandError` instance, which the runtime delivers to
the waiting client as raised.  With valid session fields the error is
remembered like any other result.  A key or a client id the store cannot
hold, or a value or txn nested deeper than :data:`MAX_DEPTH`, is refused
before it is proposed (:func:`check_command`), and the same as a result if
such an entry is in a log all the same.  Error messages quote at most a few
dozen characters of the command (:func:`~pyraft.kv.encoding.shown`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import msgpack

from ..codec import KEEP_PACKER_BELOW, SCALAR_TYPES, pack_fast, thread_packer
from ..errors import LeaseNotFound, ResultNotKept
from ..types import Entry, EntryKind, new_object, slot_setter
from .encoding import (EVENT_DELETE, EVENT_PUT, MAX_KEY_BYTES, RECORD_HEADER, KVCommandError, check_key,
                       decode_key, decode_value, encode_key, encode_value, pack_event, range_bounds,
                       record_header, record_value, shown)
from .reads import MAX_REPLY_BYTES

__all__ = ["KVCommandError", "LeaseNotFound", "KVBackend", "Session", "apply_command", "apply_entries", "check_command",
           "check_key", "encode_key", "decode_key", "encode_value", "decode_value", "OPS", "ADDING_OPS",
           "MAX_KEY_BYTES", "MAX_CLIENT_BYTES", "MAX_LEASED_KEY_BYTES", "MIN_LEASE_TTL", "MAX_LEASE_TTL", "MAX_TXN_OPS", "MAX_TXN_RANGE",
           "MAX_TXN_READ_BYTES", "MAX_DEPTH", "MAX_REMEMBERED_RESULT", "DEFAULT_SESSION_TTL",
           "DEFAULT_WATCH_HISTORY"]

DEFAULT_SESSION_TTL = 100_000
#: The watch history keeps the events of this many revisions (log indexes) by default.
DEFAULT_WATCH_HISTORY = 100_000

#: the operations a KV command may name
OPS = ("put", "delete", "cas", "get", "txn", "lease_grant", "lease_revoke", "compact")
#: the operations that may add data: refused past a store's size quota (NoSpace)
ADDING_OPS = ("put", "cas", "txn", "lease_grant")

#: The longest stored client id: the session index keys it after an 8-byte log index.
MAX_CLIENT_BYTES = MAX_KEY_BYTES - 8
#: The longest stored key a lease may hold: the lease's key index stores it after an 8-byte lease id.
MAX_LEASED_KEY_BYTES = MAX_KEY_BYTES - 8
#: The shortest lease a state machine accepts, in seconds.  The KV service asks for
#: more (a few election timeouts: see pyraft.kv.server), so that a lease outlives
#: the election that follows a leader's death.
MIN_LEASE_TTL = 1.0
MAX_LEASE_TTL = 1e9
#: At most this many compares, and ops per branch, in one txn (etcd's --max-txn-ops default).
MAX_TXN_OPS = 128
#: The ranges of one txn return at most this many keys together (each reads at most one more, to
#: tell whether there are more): 128 ranges of 1,000 keys each would take every replica's apply
#: most of a second, for one small command.
MAX_TXN_RANGE = 1000
#: What a txn's gets and ranges return together, in stored bytes (keys and records), at most:
#: as much as a ``kv.range`` reply.  Ranges stop early, with ``more``, past it; gets that would
#: return more refuse the txn before it changes anything.
MAX_TXN_READ_BYTES = MAX_REPLY_BYTES
#: A command nests arrays and maps at most this deep, its own map included (values are
#: encoded, compared and remembered in sessions by recursive code: deeper is refused).
MAX_DEPTH = 64
#: A session keeps a result of at most this many bytes (encoded) for a retry; a retry of a
#: request whose result was larger (a get of a large value, a txn that read much) gets
#: ResultNotKept, saying at which revision it was applied.  Small, because every replica
#: keeps it for ``session_ttl`` entries whoever sent it: a client with a fresh id per
#: request, each a small txn reading a large value, would otherwise fill the store's quota
#: with results that no delete frees (now at most about 1.4 KiB of pages per session with 16-byte
#: client ids, 5.5 KiB with 503-byte ones: 140-560 MB at the default session_ttl).
MAX_REMEMBERED_RESULT = 1024

_MAX_U64 = 2**64 - 1
_TARGETS = ("value", "version", "create_revision", "mod_revision", "lease")
_CMP_OPS = ("==", "!=", "<", ">")
_TXN_OPS = ("put", "delete", "get", "range")


#: client id -> its stored form, for the ids seen lately: a client's every write encodes its id
#: three times (checked when proposed, read ahead and applied).  Emptied when it grows past
#: _CLIENT_MEMO_MAX; dict operations are atomic, so any thread may use it.
_client_memo: dict[str | bytes, bytes] = {}
_CLIENT_MEMO_MAX = 4096


def encode_client(client: Any) -> bytes:
    """The stored form of a session's client id (KVCommandError when it is not one)."""
    if type(client) is not str and type(client) is not bytes:
        raise KVCommandError(f"session 'client' must be str or bytes, not {type(client).__name__}")
    b = _client_memo.get(client)
    if b is not None:
        return b
    try:
        b = pack_fast(client)
    except UnicodeEncodeError as e:  # a str with a lone surrogate
        raise KVCommandError(f"session 'client' cannot be encoded: {e}") from None
    if len(b) > MAX_CLIENT_BYTES:
        raise KVCommandError(f"session 'client' is too long: {len(b)} bytes encoded, at most {MAX_CLIENT_BYTES}")
    if len(_client_memo) >= _CLIENT_MEMO_MAX:
        _client_memo.clear()
    _client_memo[client] = b
    return b


def check_depth(value: Any, level: int = 1) -> None:
    """KVCommandError when ``value``, at nesting ``level`` of a command, nests deeper than :data:`MAX_DEPTH`."""
    stack = [(value, level)]
    pop, push = stack.pop, stack.append
    while stack:
        o, d = pop()
        if d > MAX_DEPTH:
            raise KVCommandError(f"a command nests arrays and maps at most {MAX_DEPTH} deep")
        for v in (o.values() if type(o) is dict else o):
            t = type(v)
            if t is list or t is dict or t is tuple:
                push((v, d + 1))


def check_command(command: Any) -> None:
    """Refuse, before it is proposed, a command whose keys or client id the store could not hold.

    Raises KVCommandError, also for a value (or a txn) nested deeper than
    :data:`MAX_DEPTH`.  Everything else about a command is decided when it
    is applied, the same way on every node (see :func:`apply_command`).
    """
    if type(command) is not dict:
        return
    if command.get("op") == "txn":
        check_depth(command)
    else:
        for field in ("value", "expected"):
            v = command.get(field)
            if type(v) is list or type(v) is dict or type(v) is tuple:
                check_depth(v, 2)
    if "key" in command:
        _check_key_for(command)
    if command.get("op") == "txn":
        for part in ("compare", "success", "failure"):
            items = command.get(part)
            if type(items) is list:
                if len(items) > MAX_TXN_OPS:
                    raise KVCommandError(f"txn: at most {MAX_TXN_OPS} entries in '{part}', got {len(items)}")
                for it in items:
                    if type(it) is dict:
                        if "key" in it:
                            _check_key_for(it)
                        if it.get("end") is not None:
                            check_key(it["end"])
    client = command.get("client")
    if client is not None:
        encode_client(client)  # remembered: a client's next writes check its id for free


def _check_key_for(cmd: dict) -> None:
    """check_key of ``cmd["key"]``, and the shorter limit when the command attaches it to a lease."""
    key = cmd["key"]
    if cmd.get("lease") and cmd.get("op") in ("put", "cas"):
        check_leased_key(encode_key(key), str(cmd["op"]))
    else:
        check_key(key)


# ---------------------------------------------------------------------------
# Sessions

@dataclass(frozen=True, slots=True)
class Session:
    """A client's exactly-once record: its last applied ``seq``, that command's result, and its log index."""

    seq: int
    result: Any  # the result as stored: see result_to_wire
    index: int

    def to_bytes(self) -> bytes:
        return pack_fast([self.seq, self.index, self.result])

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "Session":
        v = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
        if (type(v) is not list or len(v) != 3 or type(v[0]) is not int or type(v[1]) is not int
                or type(v[2]) is not list or len(v[2]) != 2):
            raise ValueError("malformed session record")
        seq, index, result = v
        return new_session(seq, result, index)


# A client's every write decodes one Session and builds another: without the frozen dataclass's
# __init__, which sets each field through object.__setattr__ and costs about half as much again
# as the rest of building it (types.FAST_BUILD has the reasoning); the same fields, the same values.
_FAST_SESSION = not hasattr(Session, "__post_init__")
_set_seq, _set_result, _set_index = (slot_setter(Session, f) for f in ("seq", "result", "index"))


def new_session(seq: int, result: Any, index: int) -> Session:
    """``Session(seq, result, index)``, built faster."""
    if not _FAST_SESSION:
        return Session(seq, result, index)
    s = new_object(Session)
    _set_seq(s, seq)
    _set_result(s, result)
    _set_index(s, index)
    return s


def result_to_wire(result: Any) -> list:
    if isinstance(result, LeaseNotFound):
        return [2, str(result)]
    if isinstance(result, ResultNotKept):
        return [3, str(result)]
    if isinstance(result, KVCommandError):
        return [1, str(result)]
    return [0, result]


def result_from_wire(w: list) -> Any:
    kind, v = w
    if kind == 2:
        return LeaseNotFound(v)
    if kind == 3:
        return ResultNotKept(v)
    return KVCommandError(v) if kind == 1 else v


class KVBackend(Protocol):
    """The storage :func:`apply_command` runs against: keys, records and client ids are bytes.

    All calls for one batch of entries happen inside one atomic unit of the
    backend (one LMDB write transaction, or one locked, undoable step).
    Keys are stored forms (:mod:`pyraft.kv.encoding`), records key records.
    """

    def get(self, key: bytes) -> bytes | None:
        """The key's record, None when absent."""

    def put(self, key: bytes, record: bytes) -> None: ...

    def delete(self, key: bytes) -> None:
        """Remove ``key`` (it exists)."""

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        """``(key, record)`` for the keys in ``[start, stop)``, in order; not used across changes."""

    def add_event(self, revision: int, event: bytes) -> None:
        """Append a watch event of ``revision`` (events of one revision keep their order)."""

    def get_lease(self, lease_id: int) -> float | None:
        """The lease's ttl, None when it does not exist."""

    def put_lease(self, lease_id: int, ttl: float) -> None: ...

    def delete_lease(self, lease_id: int) -> None: ...

    def attach(self, lease_id: int, key: bytes) -> None: ...

    def detach(self, lease_id: int, key: bytes) -> None: ...

    def lease_keys(self, lease_id: int) -> list[bytes]:
        """The keys attached to the lease, in key order."""

    def get_session(self, client: bytes) -> Session | None: ...

    def put_session(self, client: bytes, session: Session, old: Session | None) -> None:
        """Store ``session`` for ``client``, replacing ``old`` (its previous record, or None)."""

    def expire_sessions(self, before_index: int) -> None:
        """Drop every session whose ``index`` is < ``before_index``."""

    def compact_history(self, before: int) -> None:
        """Drop the watch events of revisions < ``before`` for good (the history starts there at the earliest)."""


# ---------------------------------------------------------------------------
# Applying one command

def apply_command(backend: KVBackend, index: int, command: Any,
                  session_ttl: int = DEFAULT_SESSION_TTL) -> Any:
    """Apply the command of the normal entry at log ``index``; return its result.

    Never raises for a bad command (the result is a KVCommandError); an
    exception out of here is a backend failure.
    """
    backend.expire_sessions(index - session_ttl)
    if type(command) is not dict:
        return KVCommandError(f"a KV command is a map, not {type(command).__name__}")
    has_client, has_seq = "client" in command, "seq" in command
    if not has_client and not has_seq:
        return _execute(backend, index, command)
    if not (has_client and has_seq):
        return KVCommandError("session fields 'client' and 'seq' go together")
    seq = command["seq"]
    if type(seq) is not int or seq < 0:
        return KVCommandError("session 'seq' must be an integer >= 0")
    try:
        client = encode_client(command["client"])
    except KVCommandError as e:
        return e
    old = backend.get_session(client)
    if old is not None and seq <= old.seq:
        if seq == old.seq:
            return result_from_wire(old.result)
        return KVCommandError(f"stale request: seq {seq} is older than this client's last one ({old.seq})")
    result = _execute(backend, index, command)
    backend.put_session(client, new_session(seq, _remembered(result, index), index), old)
    return result


def _remembered(result: Any, index: int) -> list:
    """What a session keeps of ``result``: all of it, or past :data:`MAX_REMEMBERED_RESULT` a note.

    Only a get's value and a txn's responses can be large; a small command
    must not make every replica keep megabytes until its session expires.
    """
    t = type(result)
    if result is None or t is bool or t is int or t is float:
        return [0, result]  # what result_to_wire makes of it: the most common results, kept whole
    wire = result_to_wire(result)
    n = len(pack_fast(wire))
    if n > MAX_REMEMBERED_RESULT:
        held = ""
        if t is list and len(result) == 3 and type(result[0]) is bool and result[2] == index:  # a txn's
            held = f", its compares {'held' if result[0] else 'did not hold'}"
        return result_to_wire(ResultNotKept(
            f"this request was applied at revision {index}{held}; its result, {n} bytes encoded, "
            f"is larger than a session keeps for a retry ({MAX_REMEMBERED_RESULT}): read the keys again"))
    return wire


def apply_entries(backend: KVBackend, entries: Sequence[Entry], session_ttl: int = DEFAULT_SESSION_TTL) -> list[Any]:
    """:func:`apply_command` for each normal entry of ``entries``, in order; None for the others.

    The same results and the same state as that, with less work per command:
    only a command with session fields reads the sessions, so the sessions
    older than ``session_ttl`` are expired before each such command (by
    apply_command) and once after the batch's last normal entry, not before
    every command; and the common put goes the short way (:func:`_plain_put`).
    """
    results: list[Any] = []
    append = results.append
    normal = EntryKind.NORMAL
    pack = thread_packer()
    last = 0
    for e in entries:
        if e.kind != normal:
            append(None)
            continue
        cmd = e.payload
        last = e.log_id.index
        if type(cmd) is not dict:
            append(apply_command(backend, last, cmd, session_ttl))
        elif cmd.get("op") == "put" and _plain_put(backend, pack, last, cmd, session_ttl):
            append(None)
        elif "client" not in cmd and "seq" not in cmd:
            append(_execute(backend, last, cmd))
        else:
            append(apply_command(backend, last, cmd, session_ttl))
    if last:
        backend.expire_sessions(last - session_ttl)
    return results


#: _plain_put packs a str or bytes value that could encode to this many bytes or more with
#: pack_fast: with its header (5 bytes at most) it could pass what thread_packer's Packer may pack
_LONG_VALUE = KEEP_PACKER_BELOW - 8


def _plain_put(backend: KVBackend, pack: Callable[[Any], bytes], rev: int, cmd: dict, session_ttl: int) -> bool:
    """Apply ``cmd``, a put, if it is the common case; True when done (its result is None).

    The common case: a scalar value, no lease, and valid session fields (a
    new ``seq``) or none: what apply_command does for it, in fewer calls (a
    write's apply is CPU on every replica).  Anything else (a retry, a bad
    field) returns False having changed nothing, for apply_command or
    _execute to apply, and to find any error, as always.  The session is
    looked at before the value is encoded: a retry of a large put costs no
    encoding.
    """
    if "lease" in cmd or "key" not in cmd or "value" not in cmd or type(cmd["value"]) not in SCALAR_TYPES:
        return False  # (a container's depth is checked first: the long way)
    has_client = "client" in cmd
    if has_client != ("seq" in cmd):
        return False
    old = None
    if has_client:
        seq = cmd["seq"]
        if type(seq) is not int or seq < 0:
            return False
        try:
            client = encode_client(cmd["client"])
        except KVCommandError:
            return False
        backend.expire_sessions(rev - session_ttl)  # first, as apply_command (which does it again: a no-op)
        old = backend.get_session(client)
        if old is not None and seq <= old.seq:
            return False
    value = cmd["value"]
    try:
        key = encode_key(cmd["key"])
        t = type(value)  # a str's UTF-8 takes up to 4 bytes a character
        value = pack_fast(value) if (t is bytes and len(value) >= _LONG_VALUE
                                     or t is str and 4 * len(value) >= _LONG_VALUE) else pack(value)
    except (KVCommandError, TypeError, ValueError, OverflowError):  # what encode_value turns into errors
        return False
    _put(backend, rev, key, value, 0)
    if has_client:
        backend.put_session(client, new_session(seq, [0, None], rev), old)
    return True


def _execute(backend: KVBackend, rev: int, cmd: dict) -> Any:
    op = cmd.get("op")
    try:
        if op == "put" and "lease" not in cmd and "key" in cmd and "value" in cmd:
            # The common case, without building an _Op (apply's CPU per write is the
            # throughput of a leader whose followers share its process or its cores).
            value = cmd["value"]
            if type(value) is list or type(value) is dict:
                check_depth(value, 2)
            _put(backend, rev, encode_key(cmd["key"]), encode_value(value), 0)
            return None
        # As check_command refused it before proposing; the same here for an entry in a log all the same.
        check_depth(cmd)
        if op == "txn":
            return _txn(backend, rev, cmd)
        if op == "lease_grant":
            ttl = cmd.get("ttl")
            if not ((type(ttl) is int or type(ttl) is float) and math.isfinite(ttl)
                    and MIN_LEASE_TTL <= ttl <= MAX_LEASE_TTL):
                raise KVCommandError(f"lease_grant: 'ttl' must be a number of seconds in "
                                     f"[{MIN_LEASE_TTL}, {MAX_LEASE_TTL:g}], got {shown(ttl)}")
            backend.put_lease(rev, float(ttl))
            return rev
        if op == "lease_revoke":
            return _revoke(backend, rev, _lease_id(cmd.get("id"), "lease_revoke: 'id'"))
        if op == "compact":
            return _compact(backend, rev, cmd.get("revision"))
        if op not in OPS:
            raise KVCommandError(f"unknown op {shown(op)}; expected one of {', '.join(OPS)}")
        p = _parse(cmd, op)
        if p.lease and backend.get_lease(p.lease) is None:
            raise LeaseNotFound(f"{op}: lease {p.lease} not found")
        if op == "get":
            rec = backend.get(p.key)
            return None if rec is None else decode_value(record_value(rec))
        return _run(backend, rev, p)
    except (KVCommandError, LeaseNotFound) as e:
        return e


@dataclass(frozen=True, slots=True)
class _Op:
    """A validated put/delete/cas/get/range: stored forms ready to run."""

    op: str
    key: bytes
    value: bytes = b""
    lease: int = 0
    expected: bytes | None = None  # cas; None: "only if absent"
    stop: bytes = b""  # range
    limit: int = 0  # range
    keys_only: bool = False  # range


def _lease_id(v: Any, what: str) -> int:
    if v is None:
        return 0
    if type(v) is not int or not 0 <= v <= _MAX_U64:
        raise KVCommandError(f"{what} must be a lease id (an integer >= 0), got {shown(v)}")
    return v


def check_leased_key(key: bytes, op: str) -> None:
    """Refuse a stored key too long to attach to a lease (:data:`MAX_LEASED_KEY_BYTES`)."""
    if len(key) > MAX_LEASED_KEY_BYTES:
        raise KVCommandError(f"{op}: a key attached to a lease is at most {MAX_LEASED_KEY_BYTES} bytes encoded "
                             f"(8 fewer than a key without one), got {len(key)}")


def _parse(cmd: Any, op: Any) -> _Op:
    if type(cmd) is not dict:
        raise KVCommandError(f"txn: an op is a map, not {type(cmd).__name__}")
    if "key" not in cmd:
        raise KVCommandError(f"{op}: missing 'key'")
    if op == "range":
        start, stop = range_bounds(cmd["key"], cmd.get("end"), _flag(cmd, "prefix"))
        limit = cmd.get("limit")
        if limit is not None and (type(limit) is not int or limit < 0):
            raise KVCommandError(f"range: 'limit' must be an integer >= 0, got {shown(limit)}")
        limit = MAX_TXN_RANGE if not limit else min(limit, MAX_TXN_RANGE)
        return _Op(op, start, stop=stop, limit=limit, keys_only=_flag(cmd, "keys_only"))
    key = encode_key(cmd["key"])
    if op in ("get", "delete"):
        return _Op(op, key)
    if "value" not in cmd:
        raise KVCommandError(f"{op}: missing 'value'")
    value = encode_value(cmd["value"])
    lease = _lease_id(cmd.get("lease"), f"{op}: 'lease'")
    if lease:
        check_leased_key(key, op)
    if op == "put":
        return _Op(op, key, value, lease)
    if "expected" not in cmd:
        raise KVCommandError("cas: missing 'expected'")
    expected = None if cmd["expected"] is None else encode_value(cmd["expected"])
    return _Op(op, key, value, lease, expected)


def _flag(cmd: dict, name: str) -> bool:
    v = cmd.get(name, False)
    if type(v) is not bool:
        raise KVCommandError(f"'{name}' must be true or false, got {shown(v)}")
    return v


def _run(backend: KVBackend, rev: int, p: _Op) -> Any:
    """Run a validated op (its lease exists); its result as a plain command."""
    op = p.op
    if op == "put":
        _put(backend, rev, p.key, p.value, p.lease)
        return None
    if op == "delete":
        return _delete(backend, rev, p.key)
    # cas
    rec = backend.get(p.key)
    if p.expected is None:
        ok = rec is None
    else:
        ok = rec is not None and record_value(rec) == p.expected
    if ok:
        _put(backend, rev, p.key, p.value, p.lease, rec)
    return ok


_UNREAD = b"?"  # _put's ``old`` when the caller has not read the key's record
_HEADER = RECORD_HEADER


def _put(backend: KVBackend, rev: int, key: bytes, value: bytes, lease: int, old: bytes | None = _UNREAD) -> None:
    # Every write runs this on every replica: it packs the record and the event itself.
    if old is _UNREAD:
        old = backend.get(key)
    if old is None:
        record = _HEADER.pack(rev, rev, 1, lease) + value
        old_lease = 0
    else:
        create, _mod, version, old_lease = _HEADER.unpack_from(old)
        record = _HEADER.pack(create, rev, version + 1, lease) + value
    if old_lease != lease:
        if old_lease:
            backend.detach(old_lease, key)
        if lease:
            backend.attach(lease, key)
    backend.put(key, record)
    backend.add_event(rev, pack_event(EVENT_PUT, key, value))


def _delete(backend: KVBackend, rev: int, key: bytes) -> bool:
    old = backend.get(key)
    if old is None:
        return False
    lease = record_header(old)[3]
    if lease:
        backend.detach(lease, key)
    backend.delete(key)
    backend.add_event(rev, pack_event(EVENT_DELETE, key, None))
    return True


def _revoke(backend: KVBackend, rev: int, lease_id: int) -> bool:
    if backend.get_lease(lease_id) is None:
        return False
    for key in backend.lease_keys(lease_id):
        _delete(backend, rev, key)
    backend.delete_lease(lease_id)
    return True


# ---------------------------------------------------------------------------
# Transactions

def _compact(backend: KVBackend, rev: int, revision: Any) -> None:
    """Drop the watch history before ``revision``, which is at most this command's own revision ``rev``."""
    if type(revision) is not int or revision < 1:
        raise KVCommandError(f"compact: 'revision' must be an integer >= 1, got {shown(revision)}")
    if revision > rev:
        raise KVCommandError(f"compact: revision {revision} is in the future (this compaction is revision {rev})")
    backend.compact_history(revision)


def _txn(backend: KVBackend, rev: int, cmd: dict) -> list:
    compare = cmd.get("compare", [])
    branches = {}
    for part in ("success", "failure"):
        ops = cmd.get(part, [])
        if type(ops) is not list or len(ops) > MAX_TXN_OPS:
            raise KVCommandError(f"txn: '{part}' must be a list of at most {MAX_TXN_OPS} ops")
        parsed = []
        for o in ops:
            op = o.get("op") if type(o) is dict else None
            if op not in _TXN_OPS:
                raise KVCommandError(f"txn: an op must be a map with op one of {', '.join(_TXN_OPS)}, "
                                     f"got {shown(o)}")
            parsed.append(_parse(o, op))
        branches[part] = parsed
    if type(compare) is not list or len(compare) > MAX_TXN_OPS:
        raise KVCommandError(f"txn: 'compare' must be a list of at most {MAX_TXN_OPS} compares")
    compares = [_parse_compare(c) for c in compare]
    succeeded = all(_compare(backend, *c) for c in compares)
    ops = branches["success" if succeeded else "failure"]
    for p in ops:  # before changing anything: the txn is all or nothing
        if p.lease and backend.get_lease(p.lease) is None:
            raise LeaseNotFound(f"txn {p.op}: lease {p.lease} not found")
    left = MAX_TXN_READ_BYTES - _get_bytes(backend, ops)  # (also before changing anything)
    keys_left = MAX_TXN_RANGE  # for all the ranges of the txn: bounds apply's work, not only the reply
    responses = []
    for p in ops:
        if p.op == "get":
            rec = backend.get(p.key)
            responses.append(None if rec is None else [decode_value(record_value(rec)), *record_header(rec)])
        elif p.op == "range":
            rows: list[Any] = []
            more = False
            limit = min(p.limit, keys_left)
            for k, rec in backend.scan(p.key, p.stop):
                if len(rows) == limit or left <= 0:
                    more = True
                    break
                left -= len(k) + len(rec)
                rows.append([decode_key(k), None if p.keys_only else decode_value(record_value(rec)),
                             *record_header(rec)])
            keys_left -= len(rows)
            responses.append([rows, more])
        else:
            responses.append(_run(backend, rev, p))
    return [succeeded, responses, rev]


def _get_bytes(backend: KVBackend, ops: list[_Op]) -> int:
    """The stored bytes the gets among ``ops`` will return, counted before any op runs.

    KVCommandError past :data:`MAX_TXN_READ_BYTES`.  A get sees the puts and
    deletes before it in the txn; after a cas it counts the larger of the
    two values the key may hold.
    """
    if not any(p.op == "get" for p in ops):
        return 0
    size: dict[bytes, int] = {}  # key -> its record's size after the ops so far
    total = 0
    for p in ops:
        if p.op == "range":
            continue
        n = size.get(p.key)
        if n is None:
            rec = backend.get(p.key)
            n = 0 if rec is None else len(rec)
        if p.op == "get":
            total += n
            if total > MAX_TXN_READ_BYTES:
                raise KVCommandError(f"txn: its gets would return more than {MAX_TXN_READ_BYTES} bytes; "
                                     f"read large values with get or range outside a txn")
        elif p.op == "delete":
            size[p.key] = 0
        else:
            new = _HEADER.size + len(p.value)
            size[p.key] = new if p.op == "put" else max(n, new)
    return total


def _parse_compare(c: Any) -> tuple[bytes, str, str, Any]:
    if type(c) is not dict or "key" not in c:
        raise KVCommandError(f"txn: a compare is a map with 'key', 'target', 'op', 'value', got {shown(c)}")
    target, op = c.get("target"), c.get("op")
    if target not in _TARGETS:
        raise KVCommandError(f"txn: compare target must be one of {', '.join(_TARGETS)}, got {shown(target)}")
    if op not in _CMP_OPS:
        raise KVCommandError(f"txn: compare op must be one of {', '.join(_CMP_OPS)}, got {shown(op)}")
    if "value" not in c:
        raise KVCommandError("txn: a compare needs a 'value'")
    v = c["value"]
    if target == "value":
        if op in ("==", "!="):
            v = encode_value(v)
        else:
            encode_value(v)  # refuse what could never be stored
    elif type(v) is not int:
        raise KVCommandError(f"txn: a compare on {target} takes an integer value, got {shown(v)}")
    return encode_key(c["key"]), target, op, v


def _compare(backend: KVBackend, key: bytes, target: str, op: str, v: Any) -> bool:
    rec = backend.get(key)
    if target == "value":
        if rec is None:
            return False  # as etcd: a missing key fails every compare on its value
        if op == "==":
            return record_value(rec) == v
        if op == "!=":
            return record_value(rec) != v
        cur = decode_value(record_value(rec))
        try:
            return cur < v if op == "<" else cur > v
        except TypeError:
            raise KVCommandError(f"txn: cannot order the value of the key ({type(cur).__name__}) "
                                 f"against {type(v).__name__}") from None
    if rec is None:
        cur = 0
    else:
        create, mod, version, lease = record_header(rec)
        cur = {"version": version, "create_revision": create, "mod_revision": mod, "lease": lease}[target]
    if op == "==":
        return cur == v
    if op == "!=":
        return cur != v
    return cur < v if op == "<" else cur > v
