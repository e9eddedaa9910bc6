"""The wire and disk formats: roundtrips, and nothing but CodecError from bad bytes."""
from __future__ import annotations

import random
import time
import tracemalloc

import msgpack
import pytest

from pyraft.codec import (CLIENT_REQUEST_TAG, FORMAT_VERSION, ClientRequest, ClientResponse, Envelope,
                          container_budget, decode_body, decode_entries, decode_entry, decode_envelope,
                          decode_message, encode_entries, encode_entry, encode_message)
from pyraft.codec import _Budget
from pyraft.errors import CodecError
from pyraft.messages import (AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
                             InstallSnapshotResponse, TimeoutNowRequest, TimeoutNowResponse, VoteRequest,
                             VoteResponse)
from pyraft.types import Entry, EntryKind, LogId, Membership, Node, SnapshotMeta, StoredMembership

pytestmark = pytest.mark.timeout(60)

M = Membership(configs=(frozenset({1, 2, 3}), frozenset({2, 3, 4})),
               nodes={i: Node(f"tcp://127.0.0.{i}:7000", {"zone": "a"} if i == 1 else None) for i in (1, 2, 3, 4)},
               leaving=frozenset({1}))
META = SnapshotMeta(LogId(3, 100), StoredMembership(LogId(2, 50), M), "snap-1")

SAMPLES = [
    AppendEntriesRequest(5, 1, LogId(4, 9), (
        Entry(LogId(5, 10), EntryKind.BLANK, None),
        Entry(LogId(5, 11), EntryKind.NORMAL, {"op": "put", "key": "k", "value": [1, 2.5, b"x", None]}),
        Entry(LogId(5, 12), EntryKind.MEMBERSHIP, M),
    ), 9, 7),
    AppendEntriesRequest(1, 2, None, (), 0, 0),
    AppendEntriesResponse(5, True, LogId(5, 12), seq=7),
    AppendEntriesResponse(6, False, None, rejected=9, hint_index=4, hint_term=2, seq=3),
    VoteRequest(7, 3, LogId(6, 40), pre_vote=True, transfer=False),
    VoteRequest(7, 3, None),
    VoteResponse(7, True, True),
    VoteResponse(7, False, last_log_id=LogId(6, 41)),
    InstallSnapshotRequest(8, 1, META, 0, b"\x00" * 100, False),
    InstallSnapshotResponse(8, True, LogId(3, 100)),
    TimeoutNowRequest(9, 1),
    TimeoutNowResponse(9),
    ClientRequest("kv.put", {"key": "a", "value": 1}),
    ClientResponse(False, None, ["ForwardToLeader", "go away", 2, "tcp://127.0.0.2:7000"]),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_roundtrips(msg):
    frame = decode_message(encode_message(msg, "c1", 3, 42), "c1")
    assert (frame.from_id, frame.request_id, frame.message) == (3, 42, msg)


def test_entries_roundtrip_on_disk():
    for e in SAMPLES[0].entries:
        assert decode_entry(e.index, encode_entry(e)) == e


def test_wrong_cluster_and_version_are_refused():
    data = encode_message(SAMPLES[2], "c1", 1)
    with pytest.raises(CodecError, match="cluster"):
        decode_message(data, "other")
    v = msgpack.unpackb(data)
    v[0] = FORMAT_VERSION + 1
    with pytest.raises(CodecError, match="version"):
        decode_message(msgpack.packb(v), "c1")


def test_append_entries_carry_stored_encodings_with_implied_indexes():
    # Entries travel as their stored encodings (so they cannot be non-consecutive:
    # their indexes follow prev_log_id); anything else in their place is refused.
    v = msgpack.unpackb(encode_message(SAMPLES[0], "c", 1), strict_map_key=False)
    assert v[5][3] == [encode_entry(e) for e in SAMPLES[0].entries]
    v[5][3][1] = [1, 99, 1, None]  # a version-1 style entry
    with pytest.raises(CodecError):
        decode_message(msgpack.packb(v, use_bin_type=True), "c")


def test_unencodable_values_raise_codec_error():
    with pytest.raises(CodecError):
        encode_message(ClientRequest("x", object()), "c", 1)
    with pytest.raises(CodecError):
        encode_entry(Entry(LogId(1, 1), EntryKind.NORMAL, {1, 2}))


def _mutations(rng: random.Random, data: bytes):
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0 and b:  # flip bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        b = b[: rng.randrange(len(b) + 1)]
    elif kind == 2:  # insert junk
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 8))
    elif kind == 3:  # replace a byte with a msgpack type marker
        if b:
            b[rng.randrange(len(b))] = rng.choice([0xC0, 0xC1, 0xC2, 0xC3, 0xD9, 0xDC, 0xDE, 0xC7, 0xD4, 0x90, 0x80])
    else:  # duplicate a slice
        i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
        b[i:i] = b[i:j]
    return bytes(b)


def _structural(rng: random.Random):
    """Valid msgpack with the frame's shape but wrong types in random places."""
    junk = [None, True, -1, 2**70 if False else 2**63, 1.5, "s", b"b", [], {}, [1, [2]], {"a": 1}, {1: [None]}]
    v = msgpack.unpackb(encode_message(rng.choice(SAMPLES), "c", 1), strict_map_key=False)

    def mutate(x, depth=0):
        if isinstance(x, list) and x and depth < 6:
            i = rng.randrange(len(x))
            if rng.random() < 0.3:
                x[i] = rng.choice(junk)
            else:
                mutate(x[i], depth + 1)
        return x
    return msgpack.packb(mutate(v), use_bin_type=True)


def test_random_and_mutated_bytes_only_ever_raise_codec_error():
    rng = random.Random(20261127)
    valid = [encode_message(m, "c", 1, 5) for m in SAMPLES]
    decoded_ok = 0
    for i in range(20_000):
        r = i % 4
        if r == 0:
            data = rng.randbytes(rng.randint(0, 64))
        elif r == 1:
            data = _structural(rng)
        else:
            data = _mutations(rng, rng.choice(valid))
        try:
            frame = decode_message(data, "c")
        except CodecError:
            continue
        decoded_ok += 1
        # whatever decodes is a well-formed message that encodes again
        encode_message(frame.message, "c", frame.from_id, frame.request_id)
    assert decoded_ok < 20_000


def test_deeply_nested_and_huge_declared_lengths():
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(CodecError):
        decode_message(deep, "c")
    # a 4-GiB array header with no body
    with pytest.raises(CodecError):
        decode_message(b"\xdd\xff\xff\xff\xff", "c")
    with pytest.raises(CodecError):
        decode_message(b"\xc6\xff\xff\xff\xff" + b"x" * 10, "c")


# ---------------------------------------------------------------------------
# Bounded decoding: the envelope first, then a body within the frame's budget

HEAD = b"\x96\x03\xa1c\x01\x07"  # [3, "c", from 1, request 7, ...


def _array(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")


def _client_frame(body: bytes) -> bytes:
    return HEAD + bytes([CLIENT_REQUEST_TAG]) + b"\x92\xa2op" + body


def _ae_frame(entries: list[bytes]) -> bytes:
    bins = b"".join(b"\xc6" + len(e).to_bytes(4, "big") + e for e in entries)
    return HEAD + b"\x01\x96\x05\x01\xc0" + _array(len(entries)) + bins + b"\x00\x00"


def _peak(fn) -> tuple[int, float]:
    """Bytes ``fn`` allocated at its peak (tracemalloc), and the seconds it took."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, dt


def _worst_frames(size: int) -> dict[str, bytes]:
    room = size - 64
    deep = b"\x91" * 500 + b"\x90"
    nested_entry = b"\x93\x05\x01" + _array(2000) + b"\x90" * 2000
    return {
        "empty arrays": _client_frame(_array(room) + b"\x90" * room),
        "empty maps": _client_frame(_array(room) + b"\x80" * room),
        "deep chains": _client_frame(_array(room // len(deep)) + deep * (room // len(deep))),
        "ext values": _client_frame(_array(room // 3) + b"\xd4\x05\x00" * (room // 3)),
        "entries of empty arrays": _ae_frame([nested_entry] * (room // (len(nested_entry) + 5))),
        "one giant entry": _ae_frame([b"\x93\x05\x01" + _array(room - 40) + b"\x90" * (room - 40)]),
    }


def test_a_frame_of_another_cluster_is_refused_before_its_body_is_decoded():
    body = _array(2_000_000) + b"\x90" * 2_000_000  # 2 MB of empty arrays: ~150 MB once decoded
    frame = _client_frame(body)
    for cluster in ("other", "c"):
        data = frame.replace(b"\xa1c", b"\xa5other", 1) if cluster == "other" else frame
        if cluster == "c":
            data = data[:1] + b"\x04" + data[2:]  # an unknown format version
        peak, _dt = _peak(lambda: pytest.raises(CodecError, decode_message, data, "c"))
        assert peak < 64 * 1024, f"{peak} bytes allocated to refuse the frame by its envelope"
    with pytest.raises(CodecError, match="cluster"):
        decode_envelope(frame, "other")
    with pytest.raises(CodecError, match="tag"):
        decode_envelope(HEAD + b"\x63\x90", "c")
    env = decode_envelope(frame, "c")
    assert env == Envelope(from_id=1, request_id=7, tag=CLIENT_REQUEST_TAG, body_offset=len(HEAD) + 1)


def test_envelope_and_body_decode_to_what_decode_message_gives():
    for m in SAMPLES:
        data = encode_message(m, "c", 300, 2**40)
        env = decode_envelope(data, "c")
        assert (env.from_id, env.request_id) == (300, 2**40)
        assert decode_body(data, env) == decode_message(data, "c").message == m
        assert decode_message(memoryview(data), "c").message == m
        assert decode_envelope(data, None).from_id == 300  # any cluster


def _decode_or_refuse(data: bytes) -> None:
    try:
        decode_message(data, "c")
    except CodecError:
        pass


@pytest.mark.parametrize("kind", list(_worst_frames(7000)))
def test_a_frame_never_decodes_to_more_than_a_bounded_multiple_of_its_size(kind):
    data = _worst_frames(1 << 18)[kind]
    peak, _dt = _peak(lambda: _decode_or_refuse(data))
    # 65-75 times the frame without the container budget; 22-27 times with it.
    assert peak < 32 * len(data), f"{kind}: {peak / len(data):.1f} times the frame"


def test_real_traffic_fits_the_container_budget():
    pairs = [[i % 100, (i + 1) % 100] for i in range(200_000)]  # the densest real shape: 3 bytes a list
    m = ClientRequest("x", {"pairs": pairs, "maps": [{"a": 1}] * 50_000})
    assert decode_message(encode_message(m, "c", 1), "c").message == m
    entries = tuple(Entry(LogId(3, 10 + i), EntryKind.NORMAL, {"op": "put", "key": f"k{i}", "value": [i, {"x": i}]})
                    for i in range(2000))
    ae = AppendEntriesRequest(3, 1, LogId(3, 9), entries, 9, 1)
    assert decode_message(encode_message(ae, "c", 1), "c").message == ae
    assert container_budget(3 * 10**6) == 10**6 + 4096


def test_decoded_entries_are_ordinary_values():
    entries = [Entry(LogId(4, 20 + i), kind, payload) for i, (kind, payload) in
               enumerate([(EntryKind.NORMAL, {"a": [1]}), (EntryKind.BLANK, None), (EntryKind.MEMBERSHIP, M)])]
    got = decode_entries(20, encode_entries(entries))
    assert got == entries and hash(got[1]) == hash(entries[1])
    assert got[0].log_id == LogId(4, 20) and got[0].log_id < LogId(4, 21)
    with pytest.raises(AttributeError):
        got[0].log_id.term = 9  # still frozen
    with pytest.raises(CodecError):
        decode_entries(1, [b"\x93\x01\x01\xc0", "not bytes"])


def test_entries_decoded_together_are_each_exactly_one_value():
    """Each stored encoding must be one whole value by itself (a follower stores them as they came
    and reads them back one by one): a decode of several at once must not let one run into the next."""
    entries = [Entry(LogId(2, 5 + i), EntryKind.NORMAL, {"op": "put", "key": f"k{i}", "value": b"v" * i})
               for i in range(50)]
    datas = encode_entries(entries)
    assert decode_entries(5, datas) == entries == [decode_entry(5 + i, d) for i, d in enumerate(datas)]
    budget = _Budget(10**6).options()
    assert decode_entries(5, datas, unpack_options=budget) == entries
    a, b = datas[0], datas[1]
    for bad, which in [([a[:3], a[3:] + b], "entry 5"),   # a value split across two encodings
                       ([a + b, b], "entry 5"),             # two values in one
                       ([a, b"", b], "entry 6"),            # an empty one
                       ([a, b[:-1]], "entry 6"),            # cut short at the end
                       ([a, b + b"\xc1"], "entry 6")]:       # a byte msgpack never uses
        with pytest.raises(CodecError, match=which):
            decode_entries(5, bad)
    with pytest.raises(CodecError, match="more arrays and maps"):
        decode_entries(5, datas, unpack_options=_Budget(10).options())


@pytest.mark.parametrize("ok, error", [
    (False, None), (False, [5, "m", None, None]), (False, ["Timeout", 5, None, None]),
    (False, ["Timeout", "m", "2", None]), (False, ["Timeout", "m", -1, None]), (False, ["Timeout", "m", None, 5]),
    (False, ["Timeout", "m", None]), (True, ["Timeout", "m", None, None]),
])
def test_a_client_response_error_of_the_wrong_shape_is_refused(ok, error):
    # A client unpacks the error list and looks its name up: its shape is checked where it is decoded.
    from fake_kv_node import frame
    with pytest.raises(CodecError):
        decode_message(frame(ok, None, error, 1), "pyraft")
    good = decode_message(frame(False, None, ["ForwardToLeader", "m", 2, "tcp://127.0.0.1:1"], 1), "pyraft")
    assert good.message.error == ["ForwardToLeader", "m", 2, "tcp://127.0.0.1:1"]
