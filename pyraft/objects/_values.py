"""The value codec of replicated objects: msgpack plus tuples and sets, and nothing else.

Arguments, results and object states cross the log, the wire and the disk
as bytes made here.  Plain msgpack turns a tuple into a list and cannot
carry a set; both would change the meaning of a replicated call (a tuple
key of a dict, a set member), so three ext types carry them::

    ext 1: tuple      ext 2: set      ext 3: frozenset     (payload: a msgpack array)

Exact types only: a subclass of a msgpack type (an IntEnum, a namedtuple, an
OrderedDict) is stored as its base type; anything else is a ``TypeError``
at the caller.  Decoding builds only these plain values: no pickle, no code,
no import.
"""
from __future__ import annotations

from typing import Any

import msgpack

from ..errors import CodecError

_TUPLE, _SET, _FROZENSET = 1, 2, 3


def _default(o: Any) -> Any:
    if isinstance(o, tuple):
        return msgpack.ExtType(_TUPLE, _pack_array(o))
    if isinstance(o, frozenset):
        return msgpack.ExtType(_FROZENSET, _pack_array(o))
    if isinstance(o, set):
        return msgpack.ExtType(_SET, _pack_array(o))
    # strict_types sends subclasses here: store them as their msgpack base type
    if isinstance(o, bool):
        return bool(o)
    if isinstance(o, int):
        return int(o)
    if isinstance(o, float):
        return float(o)
    if isinstance(o, str):
        return str(o)
    if isinstance(o, (bytes, bytearray, memoryview)):
        return bytes(o)
    if isinstance(o, dict):
        return dict(o)
    if isinstance(o, list):
        return list(o)
    raise TypeError(f"a {type(o).__name__} cannot be replicated (use msgpack values, tuples and sets)")


def _pack_array(items: Any) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True, strict_types=True, default=_default)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(_unpack(data))
    if code == _SET:
        return set(_unpack(data))
    if code == _FROZENSET:
        return frozenset(_unpack(data))
    raise CodecError(f"unknown value ext type {code}")


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False, ext_hook=_ext_hook)


def dumps(value: Any) -> bytes:
    """Encode ``value``; ``TypeError`` when it holds something that is not a plain value."""
    try:
        return msgpack.packb(value, use_bin_type=True, strict_types=True, default=_default)
    except (ValueError, OverflowError) as e:
        raise TypeError(f"value cannot be replicated: {e}") from None


def loads(data: bytes, what: str = "value") -> Any:
    """Decode bytes made by :func:`dumps`; ``CodecError`` for anything else."""
    try:
        return _unpack(data)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises several unrelated types; an unhashable key TypeError
        raise CodecError(f"{what}: not a replicated value ({e.__class__.__name__}: {e})") from None
