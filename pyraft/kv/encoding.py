"""How the KV service stores keys, values, key records and watch events (format version 2).

Keys: an order-preserving encoding
----------------------------------

A key is a scalar (str, bytes, int, float, bool, None) or an array of keys.
Its stored form sorts, byte by byte, in the key order ``range`` promises, so a
key range and a prefix are contiguous scans of LMDB's b-tree:

- types first: ``None < False < True < int < float < str < bytes < array``
  (so ``1``, ``1.0`` and ``True`` are three keys, ``"a"`` and ``b"a"`` two);
- ints by value (``-2**63 .. 2**64 - 1``, what msgpack carries), floats by
  value (``-0.0`` sorts just before ``0.0``; NaNs at the ends, by sign), str by code
  point (UTF-8 bytes sort so), bytes bytewise, arrays element by element
  (a shorter array first when it is a prefix of a longer one).

The bytes: a tag (``0x01`` None, ``0x02`` False, ``0x03`` True, ``0x04`` int
as 9 bytes big-endian of ``value + 2**63``, ``0x05`` float as the 8 bytes of
its IEEE 754 form with the sign bit flipped (all bits for a negative),
``0x06`` str as UTF-8, ``0x07`` bytes as they are, ``0x08`` array: its
elements, then ``0x00``).  Inside an array a str or bytes element escapes
``0x00`` as ``0x00 0xFF`` and ends with ``0x00`` (the FoundationDB tuple
layer's rule), so a shorter string still sorts first.

A prefix is the stored form of a str, bytes or array key without its end:
``prefix="user/"`` covers every str key starting with ``user/``, and the
array ``("user", 42)`` every array key starting with those two elements.

Records
-------

``data`` values are key records: ``create_revision, mod_revision, version,
lease`` as four big-endian unsigned 64-bit integers (lease 0: none), then the
value's msgpack encoding.  A watch event is one byte of type (0 put,
1 delete), the key's stored length (2 bytes big-endian), the stored key, and
for a put the value's msgpack encoding.
"""
from __future__ import annotations

import reprlib
import struct
from typing import Any

import msgpack

from ..codec import pack_fast
from ..errors import RaftError

#: The longest stored key: LMDB's key size limit (511 bytes in its default build).
MAX_KEY_BYTES = 511

_NONE, _FALSE, _TRUE, _INT, _FLOAT, _STR, _BYTES, _ARRAY = range(1, 9)
_END = b"\x00"
_INT_MIN, _INT_MAX = -2**63, 2**64 - 1
_INT_OFFSET = 2**63
_F64 = struct.Struct(">d")
_U64 = struct.Struct(">Q")
_SIGN = 1 << 63
_ALL = (1 << 64) - 1
_MAX_DEPTH = 32

RECORD_HEADER = struct.Struct(">QQQQ")  # create_revision, mod_revision, version, lease
EVENT_PUT, EVENT_DELETE = 0, 1
EVENT_TYPES = ("put", "delete")
_EV_HEAD = struct.Struct(">BH")


class KVCommandError(RaftError):
    """A KV command was malformed or refused; returned as the entry's result, never raised by apply."""

    def __eq__(self, other: object) -> bool:  # results compare by value (tests, dedup)
        return type(other) is type(self) and other.args == self.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 3, 40, 40, 4, 4


def shown(value: Any) -> str:
    """A short repr of a value from a command, for an error message: bounded in size and depth.

    Error results are remembered in sessions on every replica; a message
    never carries more than a few dozen characters of what the caller sent.
    """
    if type(value) is int and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return _SHOW.repr(value)


# ---------------------------------------------------------------------------
# Keys

_STR_TAG, _BYTES_TAG = bytes([_STR]), bytes([_BYTES])


def encode_key(key: Any) -> bytes:
    """The stored form of a key; KVCommandError for a key that is not allowed or too long."""
    t = type(key)
    if t is str and len(key) <= 127:  # the common case; at most 4 bytes a character: it fits
        try:
            return _STR_TAG + key.encode("utf-8")
        except UnicodeEncodeError as e:
            raise KVCommandError(f"key cannot be encoded: {e}") from None
    if t is bytes and len(key) <= MAX_KEY_BYTES - 1:
        return _BYTES_TAG + key
    out = bytearray()
    _enc(key, out, 0, False)
    if len(out) > MAX_KEY_BYTES:
        raise KVCommandError(f"key is too long: {len(out)} bytes encoded, at most {MAX_KEY_BYTES}")
    return bytes(out)


def encode_prefix(key: Any) -> bytes:
    """The stored-form prefix shared by every key that starts with ``key`` (a str, bytes or array)."""
    t = type(key)
    if t not in (str, bytes, list, tuple):
        raise KVCommandError(f"a prefix is a str, bytes or array key, not {t.__name__}")
    out = bytearray()
    _enc(key, out, 0, False)
    if t in (list, tuple):
        del out[-1]  # the array's end: longer arrays continue where it stood
    return bytes(out)


def _enc(key: Any, out: bytearray, depth: int, nested: bool) -> None:
    t = type(key)
    if t is str:
        try:
            b = key.encode("utf-8")
        except UnicodeEncodeError as e:
            raise KVCommandError(f"key cannot be encoded: {e}") from None
        out.append(_STR)
        _bytes(b, out, nested)
    elif t is bytes:
        out.append(_BYTES)
        _bytes(key, out, nested)
    elif t is int:
        if not _INT_MIN <= key <= _INT_MAX:
            raise KVCommandError(f"key cannot be encoded: {shown(key)} is out of msgpack's range")
        out.append(_INT)
        out += (key + _INT_OFFSET).to_bytes(9, "big")
    elif key is None:
        out.append(_NONE)
    elif t is bool:
        out.append(_TRUE if key else _FALSE)
    elif t is float:
        u = _U64.unpack(_F64.pack(key))[0]
        out.append(_FLOAT)
        out += _U64.pack(u ^ _ALL if u & _SIGN else u | _SIGN)
    elif t in (list, tuple):
        if depth >= _MAX_DEPTH:
            raise KVCommandError("key nests too deep")
        out.append(_ARRAY)
        for k in key:
            _enc(k, out, depth + 1, True)
        out += _END
    else:
        raise KVCommandError(f"a key must be a scalar or an array of keys, not {t.__name__}")


def _bytes(b: bytes, out: bytearray, nested: bool) -> None:
    if not nested:
        out += b
        return
    out += b.replace(b"\x00", b"\x00\xff")
    out += _END


def decode_key(data: bytes) -> Any:
    """A stored key back to a Python value (arrays as tuples, so keys stay hashable); ValueError if malformed."""
    v, i = _dec(bytes(data), 0, False, 0)
    if i != len(data):
        raise ValueError("stored key has trailing bytes")
    return v


def _dec(b: bytes, i: int, nested: bool, depth: int) -> tuple[Any, int]:
    if i >= len(b):
        raise ValueError("stored key is truncated")
    tag = b[i]
    i += 1
    if tag == _STR or tag == _BYTES:
        if nested:
            raw, i = _unescape(b, i)
        else:
            raw, i = b[i:], len(b)
        if tag == _BYTES:
            return raw, i
        return raw.decode("utf-8"), i  # UnicodeDecodeError is a ValueError
    if tag == _INT:
        if i + 9 > len(b):
            raise ValueError("stored key is truncated")
        v = int.from_bytes(b[i:i + 9], "big") - _INT_OFFSET
        if not _INT_MIN <= v <= _INT_MAX:
            raise ValueError("stored integer key out of range")
        return v, i + 9
    if tag == _FLOAT:
        if i + 8 > len(b):
            raise ValueError("stored key is truncated")
        u = _U64.unpack_from(b, i)[0]
        u = u ^ _SIGN if u & _SIGN else u ^ _ALL
        return _F64.unpack(_U64.pack(u))[0], i + 8
    if tag == _NONE:
        return None, i
    if tag == _FALSE:
        return False, i
    if tag == _TRUE:
        return True, i
    if tag == _ARRAY:
        if depth >= _MAX_DEPTH:
            raise ValueError("stored key nests too deep")
        items: list[Any] = []
        while True:
            if i >= len(b):
                raise ValueError("stored array key is truncated")
            if b[i] == 0:
                return tuple(items), i + 1
            v, i = _dec(b, i, True, depth + 1)
            items.append(v)
    raise ValueError(f"stored key has an unknown tag {tag}")


def _unescape(b: bytes, i: int) -> tuple[bytes, int]:
    out = bytearray()
    while True:
        j = b.find(b"\x00", i)
        if j < 0:
            raise ValueError("stored key string is not terminated")
        out += b[i:j]
        if j + 1 < len(b) and b[j + 1] == 0xFF:
            out.append(0)
            i = j + 2
        else:
            return bytes(out), j + 1


def check_key(key: Any) -> None:
    """KVCommandError unless ``key`` is a key the store can hold; cheap for short str and bytes keys."""
    t = type(key)
    # At most 4 bytes per character and a 1-byte tag: 127 characters fit in 511 bytes.
    if (t is str and len(key) <= 127) or (t is bytes and len(key) <= 510) or t in (int, bool, float) \
            or key is None:
        if t is int and not _INT_MIN <= key <= _INT_MAX:
            encode_key(key)
        return
    encode_key(key)


def successor(prefix: bytes) -> bytes:
    """The smallest byte string greater than every string that starts with ``prefix``."""
    p = prefix.rstrip(b"\xff")
    if not p:
        raise ValueError("no successor of an all-0xFF prefix")  # never: a stored form starts with a tag
    return p[:-1] + bytes([p[-1] + 1])


def range_bounds(key: Any, end: Any = None, prefix: bool = False) -> tuple[bytes, bytes]:
    """The stored-form interval ``[start, stop)`` of a range: one key, a prefix, or ``[key, end)``."""
    if prefix:
        if end is not None:
            raise KVCommandError("give either end or prefix, not both")
        p = encode_prefix(key)
        if type(key) in (list, tuple):
            # After a complete element comes a tag, or 0x00 (the array's end); 0xFF would
            # continue its last str or bytes element (an escaped 0x00): not a tuple prefix.
            return p, p + b"\xff"
        return p, successor(p)
    start = encode_key(key)
    if end is None:
        return start, start + b"\x00"  # the next stored form after this key's
    return start, encode_key(end)


# ---------------------------------------------------------------------------
# Values and records

def encode_value(value: Any) -> bytes:
    try:
        return pack_fast(value)  # msgpack.packb with a Packer kept per thread
    except (TypeError, ValueError, OverflowError) as e:
        raise KVCommandError(f"value cannot be encoded: {e}") from None


def decode_value(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)


def pack_record(create: int, mod: int, version: int, lease: int, value: bytes) -> bytes:
    return RECORD_HEADER.pack(create, mod, version, lease) + value


def record_header(rec: bytes) -> tuple[int, int, int, int]:
    """``(create_revision, mod_revision, version, lease)`` of a key record."""
    return RECORD_HEADER.unpack_from(rec)


def record_value(rec: bytes) -> bytes:
    return rec[RECORD_HEADER.size:]


def pack_event(kind: int, key: bytes, value: bytes | None) -> bytes:
    head = _EV_HEAD.pack(kind, len(key)) + key
    return head if value is None else head + value


def event_key(ev: bytes | memoryview) -> bytes:
    """The stored key of an event record (``ev`` may be a memoryview: the key is copied)."""
    n = (ev[1] << 8) | ev[2]
    return bytes(ev[3:3 + n])


def unpack_event(ev: bytes) -> tuple[int, bytes, bytes | None]:
    """``(kind, stored key, value bytes or None)`` of an event record; ValueError if malformed."""
    if len(ev) < 3:
        raise ValueError("event record is truncated")
    kind, n = _EV_HEAD.unpack_from(ev)
    if kind not in (EVENT_PUT, EVENT_DELETE) or len(ev) < 3 + n:
        raise ValueError("malformed event record")
    key = bytes(ev[3:3 + n])
    return kind, key, (bytes(ev[3 + n:]) if kind == EVENT_PUT else None)
