"""The KV key encoding: it round-trips, it sorts as the documented key order, and prefixes are intervals."""
from __future__ import annotations

import functools
import math
import random

import pytest

from pyraft.kv.encoding import (MAX_KEY_BYTES, KVCommandError, check_key, decode_key, encode_key, range_bounds,
                                successor)

pytestmark = pytest.mark.timeout(60)

_TYPE_RANK = {type(None): 0, bool: 1, int: 2, float: 3, str: 4, bytes: 5, tuple: 6}


def reference_cmp(a, b) -> int:
    """The documented key order, written directly on Python values."""
    ta, tb = _TYPE_RANK[type(a)], _TYPE_RANK[type(b)]
    if ta != tb:
        return -1 if ta < tb else 1
    if a is None:
        return 0
    if type(a) is tuple:
        for x, y in zip(a, b):
            c = reference_cmp(x, y)
            if c:
                return c
        return (len(a) > len(b)) - (len(a) < len(b))
    if type(a) is float:
        # -0.0 before 0.0; no NaNs here
        a, b = (a, math.copysign(1, a)), (b, math.copysign(1, b))
    if type(a) is str:
        a, b = a.encode(), b.encode()
    return (a > b) - (a < b)


def random_key(rng: random.Random, depth: int = 0):
    kind = rng.choice(["none", "bool", "int", "float", "str", "bytes", "tuple"] if depth < 2 else
                      ["int", "str", "bytes"])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, 2**63 - 1, -2**63, 2**64 - 1, rng.randrange(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.0, -0.0, 1.5, -1.5, float("inf"), float("-inf"), rng.uniform(-10, 10)])
    alphabet = ["a", "b", "\x00", "\xff", "\u00e9", "\U0001f600"]
    if kind == "str":
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(4)))
    if kind == "bytes":
        return bytes(rng.choice([0, 1, 0x61, 0xFF]) for _ in range(rng.randrange(4)))
    return tuple(random_key(rng, depth + 1) for _ in range(rng.randrange(3)))


@pytest.mark.parametrize("seed", range(20))
def test_stored_order_is_the_key_order_and_keys_round_trip(seed):
    rng = random.Random(seed)
    keys = [random_key(rng) for _ in range(200)]
    for k in keys:
        assert decode_key(encode_key(k)) == k
    by_bytes = sorted(keys, key=encode_key)
    by_ref = sorted(keys, key=functools.cmp_to_key(reference_cmp))
    assert [encode_key(k) for k in by_bytes] == [encode_key(k) for k in by_ref]


@pytest.mark.parametrize("seed", range(20))
def test_a_prefix_range_holds_exactly_the_keys_with_that_prefix(seed):
    rng = random.Random(100 + seed)
    keys = [random_key(rng) for _ in range(300)]
    for p in [k for k in keys if type(k) in (str, bytes, tuple)][:30]:
        start, stop = range_bounds(p, prefix=True)
        inside = {encode_key(k) for k in keys if start <= encode_key(k) < stop}
        if type(p) is tuple:
            want = {encode_key(k) for k in keys if type(k) is tuple and encode_key(k[:len(p)]) == encode_key(p)}
        else:
            want = {encode_key(k) for k in keys if type(k) is type(p) and k.startswith(p)}
        assert inside == want, p


def test_a_single_key_range_holds_that_key_only():
    for k in ["a", b"a", ("a",), 1, 1.0, None, True]:
        start, stop = range_bounds(k)
        assert start == encode_key(k) < stop
        for other in ["a\x00", "aa", b"a\x00", ("a", None), ("a\x00",), 2, 1.5]:
            e = encode_key(other)
            assert not (start <= e < stop) or other == k


def test_limits_and_refusals():
    assert len(encode_key("\U0001f600" * 127)) <= MAX_KEY_BYTES
    check_key("\U0001f600" * 127)
    check_key(b"x" * 510)
    with pytest.raises(KVCommandError, match="too long"):
        check_key(b"x" * 511)
    for bad in [{"m": 1}, 2**64, -2**63 - 1, object(), "\udc80", ("ok", {"no": 1})]:
        with pytest.raises(KVCommandError):
            encode_key(bad)
    with pytest.raises(KVCommandError, match="nests too deep"):
        k = ()
        for _ in range(40):
            k = (k,)
        encode_key(k)
    with pytest.raises(KVCommandError, match="either end or prefix"):
        range_bounds("a", "b", prefix=True)
    assert successor(b"\x06a\xff\xff") == b"\x06b"
    for junk in [b"", b"\x09", b"\x04\x00", b"\x08\x06a", b"\x06\xff\xfe", b"\x01\x01"]:
        with pytest.raises(ValueError):
            decode_key(junk)


def test_client_ids_encode_the_same_from_the_memo_and_bad_ones_are_refused_each_time():
    import msgpack

    from pyraft.kv import commands

    for c in ("abc", b"abc", "é" * 10, b"\x00" * 16):
        first = commands.encode_client(c)
        assert first == msgpack.packb(c, use_bin_type=True)
        assert commands.encode_client(c) == first  # from the memo now
    assert commands.encode_client("abc") != commands.encode_client(b"abc")
    too_long = "x" * (commands.MAX_CLIENT_BYTES + 1)
    for _ in range(2):  # a refused id is not remembered
        with pytest.raises(KVCommandError, match="too long"):
            commands.encode_client(too_long)
    for bad in (["abc"], 7, None, {"a": 1}):
        with pytest.raises(KVCommandError, match="str or bytes"):
            commands.encode_client(bad)
    for _ in range(2):  # a str msgpack cannot encode: typed, before it is proposed, every time
        with pytest.raises(KVCommandError, match="cannot be encoded"):
            commands.check_command({"op": "put", "key": "k", "value": 1, "client": "\ud800", "seq": 1})
    for i in range(commands._CLIENT_MEMO_MAX + 10):  # bounded
        commands.encode_client(f"client-{i}")
    assert len(commands._client_memo) <= commands._CLIENT_MEMO_MAX
