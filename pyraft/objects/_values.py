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

Nesting is bounded: tuples and sets nest at most :data:`MAX_EXT_DEPTH` deep
(a ``TypeError`` at the caller, a ``CodecError`` when decoding), and plain
lists and maps as deep as msgpack itself allows (about 1,000 levels).  Each
level of ext values is decoded by a nested call of the unpacker, which
takes tens of KiB of the thread's C stack: a couple of hundred levels made
a node's thread overflow it and the process crash.
"""
from __future__ import annotations

import itertools
from typing import Any

import msgpack

from ..errors import CodecError

_TUPLE, _SET, _FROZENSET = 1, 2, 3

#: How deep tuples and sets may nest in one value (see the module docstring).
MAX_EXT_DEPTH = 32


class _Default:
    """msgpack's ``default`` for values ``depth`` tuples or sets deep."""

    __slots__ = ("depth",)

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __call__(self, o: Any) -> Any:
        if isinstance(o, (tuple, set, frozenset)):
            if self.depth >= MAX_EXT_DEPTH:
                raise TypeError(f"tuples and sets nest more than {MAX_EXT_DEPTH} deep")
            code = _TUPLE if isinstance(o, tuple) else _FROZENSET if isinstance(o, frozenset) else _SET
            return msgpack.ExtType(code, _pack_array(o, self.depth + 1))
        return _plain(o)


def _plain(o: Any) -> Any:
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


_DEFAULTS = [_Default(d) for d in range(MAX_EXT_DEPTH + 1)]


def _pack_array(items: Any, depth: int) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True, strict_types=True, default=_DEFAULTS[depth])


class _ExtHook:
    """msgpack's ``ext_hook`` for ext values found ``depth`` levels deep."""

    __slots__ = ("depth",)

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __call__(self, code: int, data: bytes) -> Any:
        if self.depth >= MAX_EXT_DEPTH:
            # Checked before decoding the payload: the unpacker must not nest any deeper.
            raise CodecError(f"tuples and sets nest more than {MAX_EXT_DEPTH} deep")
        if code == _TUPLE:
            return tuple(_unpack(data, self.depth + 1))
        if code == _SET:
            return set(_unpack(data, self.depth + 1))
        if code == _FROZENSET:
            return frozenset(_unpack(data, self.depth + 1))
        raise CodecError(f"unknown value ext type {code}")


_EXT_HOOKS = [_ExtHook(d) for d in range(MAX_EXT_DEPTH + 1)]


def _unpack(data: bytes, depth: int = 0) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False, ext_hook=_EXT_HOOKS[depth])


#: Call arguments nest lists, maps, tuples and sets at most this deep (``[args, kwargs]`` included).
#: An object keeps what it is given a few levels inside its own state, and a state nested past
#: what msgpack encodes (about 1,000 levels) could not be written by any node: well below that.
MAX_ARGS_DEPTH = 256

_CONTAINERS = frozenset((list, tuple, dict, set, frozenset))


def check_args_depth(encoded: bytes, decoded: Any = None) -> None:
    """``TypeError`` when call arguments nest more than :data:`MAX_ARGS_DEPTH` deep.

    ``encoded``: the arguments as :func:`dumps` made them; ``decoded``: what
    :func:`loads` makes of them, when the caller has it (None: decoded here).
    Every level takes a byte of the encoding at least, so short arguments are
    not walked; long ones are walked over their containers only, the scalars
    skipped in C (a list of 100,000 numbers: about as long as its decode, a
    sixth of a Python loop over it).
    """
    if len(encoded) <= MAX_ARGS_DEPTH:
        return
    is_container = _CONTAINERS.__contains__
    stack = [(loads(encoded, "call arguments") if decoded is None else decoded, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        o, d = pop()
        if d > MAX_ARGS_DEPTH:
            raise TypeError(f"call arguments nest more than {MAX_ARGS_DEPTH} deep")
        items = o.values() if type(o) is dict else o
        for v in itertools.compress(items, map(is_container, map(type, items))):
            push((v, d + 1))


def dumps(value: Any) -> bytes:
    """Encode ``value``; ``TypeError`` when it holds something that is not a plain value, or nests too deep."""
    try:
        return msgpack.packb(value, use_bin_type=True, strict_types=True, default=_DEFAULTS[0])
    except (ValueError, OverflowError, RecursionError) as e:
        raise TypeError(f"value cannot be replicated: {e}") from None


def loads(data: bytes, what: str = "value") -> Any:
    """Decode bytes made by :func:`dumps`; ``CodecError`` for anything else."""
    try:
        return _unpack(data)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises several unrelated types; an unhashable key TypeError
        raise CodecError(f"{what}: not a replicated value ({e.__class__.__name__}: {e})") from None
