"""The KV command format and its semantics, once, for every KV state machine.

``KVStateMachine`` (LMDB) and the test-only ``MemoryStateMachine`` both run
:func:`apply_command` against a :class:`KVBackend` of their own, so they
agree on every result by construction.

Commands (what ``Raft.client_write`` carries) are msgpack maps:

=========================================================  ==============================
``{"op": "put", "key": k, "value": v}``                    ``None``
``{"op": "delete", "key": k}``                             ``True`` if ``k`` existed
``{"op": "cas", "key": k, "expected": e, "value": v}``     ``True`` if it swapped
``{"op": "get", "key": k}``                                the value, ``None`` if absent
=========================================================  ==============================

``cas`` with ``expected=None`` means "only if absent" (so a stored ``None``
cannot be CASed against; use ``delete``).  Values are compared by their
msgpack encoding.

Keys are compared by their msgpack encoding too: ``1``, ``1.0`` and ``True``
are three keys, ``"a"`` and ``b"a"`` two.  A key is a scalar (str, bytes,
int, float, bool, None) or an array of keys; arrays come back as tuples.
Maps are refused as keys (their encoding depends on insertion order).
A key's encoding is at most :data:`MAX_KEY_BYTES` (511) bytes, LMDB's
limit: a ``str`` key of up to 127 characters always fits, a ``bytes`` key
of up to 500 bytes too.

Exactly-once: a command may carry ``"client": <str or bytes>`` (encoded in
at most :data:`MAX_CLIENT_BYTES`, 503, bytes) and ``"seq": <int >= 0>``.  Per client the state machine remembers the last seq
applied and its result.  ``seq`` greater than it: apply and remember;
``seq`` equal: return the remembered result without applying again; ``seq``
smaller: a :class:`KVCommandError` (the client already moved on).  A session
whose last applied command is more than ``session_ttl`` log indexes behind
the entry being applied is forgotten — a rule on log indexes only, so every
replica drops the same sessions at the same entry.

A malformed command (not a map, unknown op, missing field, bad key or
session fields, a value msgpack cannot encode) never stops the node: its
result is a :class:`KVCommandError` instance, which the runtime delivers to
the waiting client as raised.  With valid session fields the error is
remembered like any other result.  A key or a client id the store cannot
hold is refused before it is proposed (:func:`check_command`), and the same
as a result if such an entry is in a log all the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from ..errors import RaftError

DEFAULT_SESSION_TTL = 100_000

#: the operations a KV command may name
OPS = ("put", "delete", "cas", "get")
#: the operations that may add data: refused past a store's size quota (NoSpace)
ADDING_OPS = ("put", "cas")

#: The longest stored key: LMDB's key size limit (511 bytes in its default build).
MAX_KEY_BYTES = 511
#: The longest stored client id: the session index keys it after an 8-byte log index.
MAX_CLIENT_BYTES = MAX_KEY_BYTES - 8


class KVCommandError(RaftError):
    """A KV command was malformed or refused; returned as the entry's result, never raised by apply."""

    def __eq__(self, other: object) -> bool:  # results compare by value (tests, dedup)
        return type(other) is type(self) and other.args == self.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


# ---------------------------------------------------------------------------
# Encodings

def encode_key(key: Any) -> bytes:
    """The stored form of a key; KVCommandError for a key that is not allowed."""
    _check_key(key, 0)
    try:
        b = msgpack.packb(key, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise KVCommandError(f"key cannot be encoded: {e}") from None
    if len(b) > MAX_KEY_BYTES:
        raise KVCommandError(f"key is too long: {len(b)} bytes encoded, at most {MAX_KEY_BYTES}")
    return b


def _check_key(key: Any, depth: int) -> None:
    if key is None or type(key) in (str, bytes, int, float, bool):
        return
    if type(key) in (list, tuple):
        if depth > 32:
            raise KVCommandError("key nests too deep")
        for k in key:
            _check_key(k, depth + 1)
        return
    raise KVCommandError(f"a key must be a scalar or an array of keys, not {type(key).__name__}")


def decode_key(data: bytes) -> Any:
    """A stored key back to a Python value (arrays as tuples, so keys stay hashable)."""
    return msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=False)


def encode_value(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise KVCommandError(f"value cannot be encoded: {e}") from None


def decode_value(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)


def encode_client(client: Any) -> bytes:
    if type(client) not in (str, bytes):
        raise KVCommandError(f"session 'client' must be str or bytes, not {type(client).__name__}")
    b = msgpack.packb(client, use_bin_type=True)
    if len(b) > MAX_CLIENT_BYTES:
        raise KVCommandError(f"session 'client' is too long: {len(b)} bytes encoded, at most {MAX_CLIENT_BYTES}")
    return b


def check_key(key: Any) -> None:
    """KVCommandError unless ``key`` is a key the store can hold; cheap for short str and bytes keys."""
    t = type(key)
    # At most 4 bytes per character and a 3-byte header: 127 characters fit in 511 bytes.
    if (t is str and len(key) <= 127) or (t is bytes and len(key) <= 500) or t in (int, bool, float) or key is None:
        return
    encode_key(key)


def check_command(command: Any) -> None:
    """Refuse, before it is proposed, a command whose key or client id the store could not hold.

    Raises KVCommandError.  Everything else about a command is decided when
    it is applied, the same way on every node (see :func:`apply_command`).
    """
    if type(command) is not dict:
        return
    if "key" in command:
        check_key(command["key"])
    client = command.get("client")
    if client is not None and not (type(client) in (str, bytes) and len(client) <= 125):
        encode_client(client)


# ---------------------------------------------------------------------------
# Sessions

@dataclass(frozen=True, slots=True)
class Session:
    """A client's exactly-once record: its last applied ``seq``, that command's result, and its log index."""

    seq: int
    result: Any  # the result as stored: see result_to_wire
    index: int

    def to_bytes(self) -> bytes:
        return msgpack.packb([self.seq, self.index, self.result], use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Session":
        v = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
        if (type(v) is not list or len(v) != 3 or type(v[0]) is not int or type(v[1]) is not int
                or type(v[2]) is not list or len(v[2]) != 2):
            raise ValueError("malformed session record")
        seq, index, result = v
        return cls(seq, result, index)


def result_to_wire(result: Any) -> list:
    if isinstance(result, KVCommandError):
        return [1, str(result)]
    return [0, result]


def result_from_wire(w: list) -> Any:
    kind, v = w
    return KVCommandError(v) if kind == 1 else v


class KVBackend(Protocol):
    """The storage :func:`apply_command` runs against: keys, values and client ids are bytes.

    All calls for one batch of entries happen inside one atomic unit of the
    backend (one LMDB write transaction, or one locked, undoable step).
    """

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> bool: ...

    def get_session(self, client: bytes) -> Session | None: ...

    def put_session(self, client: bytes, session: Session, old: Session | None) -> None:
        """Store ``session`` for ``client``, replacing ``old`` (its previous record, or None)."""

    def expire_sessions(self, before_index: int) -> None:
        """Drop every session whose ``index`` is < ``before_index``."""


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
        return _execute(backend, command)
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
    result = _execute(backend, command)
    backend.put_session(client, Session(seq, result_to_wire(result), index), old)
    return result


def _execute(backend: KVBackend, cmd: dict) -> Any:
    op = cmd.get("op")
    if op not in OPS:
        return KVCommandError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if "key" not in cmd:
        return KVCommandError(f"{op}: missing 'key'")
    try:
        key = encode_key(cmd["key"])
        if op == "get":
            raw = backend.get(key)
            return None if raw is None else decode_value(raw)
        if op == "delete":
            return backend.delete(key)
        if "value" not in cmd:
            return KVCommandError(f"{op}: missing 'value'")
        value = encode_value(cmd["value"])
        if op == "put":
            backend.put(key, value)
            return None
        # cas
        if "expected" not in cmd:
            return KVCommandError("cas: missing 'expected'")
        expected = cmd["expected"]
        current = backend.get(key)
        if expected is None:
            ok = current is None
        else:
            ok = current is not None and current == encode_value(expected)
        if ok:
            backend.put(key, value)
        return ok
    except KVCommandError as e:
        return e
