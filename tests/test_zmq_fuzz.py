"""Fuzz a live ZmqTransport with junk frames from raw DEALER sockets.

The transport must keep serving, never hand the handler anything but a valid
request, and count every drop.  Whether a frame is valid is decided by the
codec itself (the oracle): a bit flip in a term still makes a valid frame.

Reproduce a failure with ``PYRAFT_FUZZ_SEED=<seed> python -m pytest tests/test_zmq_fuzz.py``.
"""
from __future__ import annotations

import os
import random
import threading
import time

import msgpack
import pytest
import zmq

from pyraft.codec import FORMAT_VERSION, ClientRequest, ClientResponse, decode_message, encode_message
from pyraft.errors import CodecError
from pyraft.messages import (AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, TimeoutNowRequest,
                             VoteRequest, VoteResponse)
from pyraft.transports.zmq import ZmqClient, ZmqTransport
from pyraft.types import Entry, EntryKind, LogId, Membership, Node, SnapshotMeta, StoredMembership

pytestmark = pytest.mark.timeout(120)

CLUSTER = "fuzz"
REQUESTS = (AppendEntriesRequest, VoteRequest, InstallSnapshotRequest, TimeoutNowRequest, ClientRequest)
SEEDS = [int(os.environ["PYRAFT_FUZZ_SEED"])] if "PYRAFT_FUZZ_SEED" in os.environ else [1, 2, 3]


def wait_until(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def valid_messages():
    m = Membership.of({1: Node("tcp://127.0.0.1:1"), 2: Node("tcp://127.0.0.1:2", {"zone": "a"})})
    return [
        AppendEntriesRequest(3, 1, LogId(2, 4), (Entry(LogId(3, 5), EntryKind.NORMAL, {"op": "put", "key": "k"}),
                                                 Entry(LogId(3, 6), EntryKind.MEMBERSHIP, m),
                                                 Entry(LogId(3, 7), EntryKind.BLANK)), 4, seq=7),
        AppendEntriesRequest(1, 2, None, (), 0),
        VoteRequest(5, 3, LogId(4, 10), pre_vote=True),
        InstallSnapshotRequest(6, 1, SnapshotMeta(LogId(5, 100), StoredMembership(LogId(1, 1), m), "snap-1"),
                               0, b"\x00\x01" * 50, False),
        TimeoutNowRequest(2, 1),
        ClientRequest("put", {"key": "a", "value": [1, 2.5, None, True, b"x"]}),
        # responses are valid frames but not requests: the server must drop them too
        AppendEntriesResponse(3, False, None, 4, 2, 1, 7),
        VoteResponse(5, True),
        ClientResponse(False, None, ["NotLeader", "go away", 2, "tcp://x"]),
    ]


def random_value(rng, depth=0):
    k = rng.randrange(10 if depth < 3 else 7)
    return [
        lambda: None, lambda: rng.choice([True, False]), lambda: rng.randint(-2**63, 2**64 - 1),
        lambda: rng.random(), lambda: "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(8))),
        lambda: rng.randbytes(rng.randrange(8)), lambda: msgpack.ExtType(rng.randrange(128), b"zz"),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {random_value(rng, 3): random_value(rng, depth + 1) for _ in range(rng.randrange(3))},
        lambda: [random_value(rng, depth + 1)],
    ][k]()


def mutate_structure(rng, frame: bytes) -> bytes:
    """Decode a valid frame to plain msgpack and damage one field: wrong types, versions, clusters."""
    v = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    kind = rng.randrange(6)
    if kind == 0:
        v[0] = rng.choice([0, FORMAT_VERSION + 1, -1, "1", None, 2**64 - 1])
    elif kind == 1:
        v[1] = rng.choice(["other", "", b"fuzz", None, 7, "fuzz\0"])
    elif kind == 2:
        v[rng.randrange(6)] = random_value(rng)
    elif kind == 3:
        body = v[5]
        if body:
            body[rng.randrange(len(body))] = random_value(rng)
    elif kind == 4:
        v = v[: rng.randrange(6)] if rng.random() < 0.5 else v + [random_value(rng)]
    else:
        v[4] = rng.choice([0, 9, 19, 22, 255, -3, "1", 1.0])
    try:
        return msgpack.packb(v, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return frame[::-1]


def junk_frames(rng, valid: list[bytes], n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        kind = rng.randrange(8)
        base = rng.choice(valid)
        if kind == 0:  # random bytes
            out.append(rng.randbytes(rng.randrange(0, 300)))
        elif kind == 1:  # bit flips
            b = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            out.append(bytes(b))
        elif kind == 2:  # truncation
            out.append(base[: rng.randrange(len(base))])
        elif kind == 3:  # trailing garbage
            out.append(base + rng.randbytes(rng.randint(1, 20)))
        elif kind == 4:  # structural damage: version, cluster, types, tags, arity
            out.append(mutate_structure(rng, base))
        elif kind == 5:  # huge length headers with little behind them
            hdr = rng.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9"])
            out.append(hdr + b"\xff\xff\xff" + bytes([rng.randrange(256)]) + rng.randbytes(rng.randrange(16)))
        elif kind == 6:  # deep nesting, in a bare value or inside a valid-looking frame
            depth = rng.choice([100, 1000, 5000, 100000])
            nest = b"\x91" * depth + b"\xc0"
            if rng.random() < 0.5:
                out.append(nest)
            else:
                head = b"".join(msgpack.packb(x) for x in [FORMAT_VERSION, CLUSTER, 1, 1, 20])
                out.append(b"\x96" + head + b"\x92\xa1x" + nest)  # ClientRequest("x", <nested>)
        else:  # a valid frame, unchanged (it must get through)
            out.append(base)
    return out


def oracle(frame: bytes) -> bool:
    try:
        return isinstance(decode_message(frame, CLUSTER).message, REQUESTS)
    except CodecError:
        return False


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_router_keeps_serving_and_counts_drops(seed):
    rng = random.Random(seed)
    got = []
    lock = threading.Lock()

    def handler(from_id, msg, reply):
        with lock:
            got.append(msg)
        reply.reply(ClientResponse(True, None))

    srv = ZmqTransport(1, "tcp://127.0.0.1:*", cluster_name=CLUSTER, max_frame_size=1 << 20)
    srv.start(handler)
    ctx = zmq.Context.instance()
    dealers = []
    try:
        valid = [encode_message(m, CLUSTER, rng.randrange(1, 10), rng.randrange(1, 1000)) for m in valid_messages()]
        frames = junk_frames(rng, valid, 4000)
        expected_ok = [f for f in frames if oracle(f)]
        assert 0 < len(expected_ok) < len(frames) // 2, f"seed {seed}: a poor corpus"
        multipart = [[b"a", b"b"], [valid[0], valid[0]], [b"", b"", b""]]
        for _ in range(4):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.SNDTIMEO, 10000)
            d.connect(srv.endpoint)
            dealers.append(d)
        for i, f in enumerate(frames):
            dealers[i % len(dealers)].send(f)
        for parts in multipart:
            dealers[0].send_multipart(parts)
        total = len(frames) + len(multipart)
        wait_until(lambda: srv.stats.get("frames_in", 0) == total,
                   what=f"seed {seed}: all {total} frames to arrive (stats {srv.stats})")
        st = srv.stats
        with lock:
            handled = list(got)
        assert len(handled) == len(expected_ok), f"seed {seed}"
        assert all(isinstance(m, REQUESTS) for m in handled), f"seed {seed}"
        assert st["requests_in"] == len(expected_ok)
        assert st["frames_dropped"] == total - len(expected_ok), f"seed {seed}: {st}"
        assert st["dropped_envelope"] == len(multipart)
        assert st["dropped_decode"] > 0 and st["dropped_not_request"] > 0
        assert sum(v for k, v in st.items() if k.startswith("dropped_")) == st["frames_dropped"]
        # still serving, on the same thread
        assert any(t.name == "pyraft-zmq-server-1" for t in threading.enumerate())
        with ZmqClient(srv.endpoint, CLUSTER) as zc:
            assert zc.call(ClientRequest("still", "alive"), timeout=5) == ClientResponse(True, None)
    finally:
        for d in dealers:
            d.close(0)
        srv.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("pyraft-")]


def test_connection_drops_junk_replies_and_returns_the_valid_one():
    """A hostile or broken server: replies of junk before the real one."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    rng = random.Random(5)
    tr = ZmqTransport(2, None, cluster_name=CLUSTER)
    try:
        conn = tr.connect(1, Node(f"tcp://127.0.0.1:{port}"))
        rid = conn.send(VoteRequest(1, 2, None))
        deadline = time.monotonic() + 5
        while not router.poll(10):  # the owner's recv flushes a frame held for the first connection
            assert time.monotonic() < deadline
            assert conn.recv(0.01) is None
        ident, data = router.recv_multipart()
        assert decode_message(data, CLUSTER).request_id == rid
        valid = [encode_message(m, CLUSTER, 1, rid) for m in valid_messages()]
        junk = [f for f in junk_frames(rng, valid, 300) if not _is_reply(f)]
        for f in junk:
            router.send_multipart([ident, f])
        router.send_multipart([ident, b"two", b"parts"])
        router.send_multipart([ident, encode_message(VoteResponse(1, True), CLUSTER, 1, rid)])
        assert conn.recv(5.0) == (rid, VoteResponse(1, True))
        assert tr.stats["frames_dropped"] == len(junk) + 1
        conn.close()
    finally:
        tr.close()
        router.close(0)


def _is_reply(frame: bytes) -> bool:
    try:
        return not isinstance(decode_message(frame, CLUSTER).message, REQUESTS)
    except CodecError:
        return False
