"""A hostile peer must not abort the process through libzmq, and a silent peer is reconnected.

libzmq 4.3.5 aborts the whole process (``Assertion failed: !_io_error
(src/stream_engine_base.cpp:310)``) when a socket with ZMTP heartbeats has
stopped reading a connection because its receive queue is full (RCVHWM) and
the peer then goes away (RST/HUP): the engine marks ``_io_error`` and the next
heartbeat-interval timer calls ``out_event()``, which asserts.  Every DEALER
pyraft makes (``ZmqConnection``, ``ZmqClient``, ``ZmqChannel``) once had those
heartbeats, so a peer or server that answered one request with more frames
than the receive queue holds, while the owner was not reading, and then
disconnected, killed the node or the client.  Found in a 5-node fault soak
(two node processes died with SIGABRT).

The abort kills the process, so each case runs in a child interpreter.

Without ZMTP heartbeats a DEALER no longer notices a peer that stopped
answering; ``ZmqConnection`` reconnects a peer that stayed silent for
3 x ``heartbeat`` seconds while a request waited for its reply (counted as
``reconnects_silent``), and leaves a peer alone that answers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import zmq
import zmq.utils.monitor

from pyraft.codec import decode_message, encode_message
from pyraft.messages import VoteRequest, VoteResponse
from pyraft.transports.zmq import ZmqTransport
from pyraft.types import Node

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------
# 1. The abort: a peer answers with more than the receive queue holds, then goes away.

_HOSTILE = r"""
import sys, threading, time
import zmq
import pyraft
from pyraft.codec import ClientRequest, ClientResponse, decode_message, encode_message
from pyraft.errors import RaftError
from pyraft.messages import AppendEntriesResponse, VoteRequest
from pyraft.transports.zmq import ZmqChannel, ZmqClient, ZmqTransport
from pyraft.types import LogId, Node

kind = sys.argv[1]
CLUSTER = "abort"
print("pyraft", pyraft.__file__, flush=True)

ctx = zmq.Context.instance()
router = ctx.socket(zmq.ROUTER)
router.setsockopt(zmq.LINGER, 0)
router.setsockopt(zmq.SNDHWM, 1_000_000)
port = router.bind_to_random_port("tcp://127.0.0.1")
addr = f"tcp://127.0.0.1:{port}"
flooded = threading.Event()


def hostile(n_flood, reply_of):
    # Owns the ROUTER from here on (the thread's start is the memory barrier ZeroMQ asks for).
    if not router.poll(10_000):
        print("the fake server never got a request", flush=True)
        return
    ident, data = router.recv_multipart()
    rid = decode_message(data, CLUSTER).request_id
    frame = encode_message(reply_of, CLUSTER, 2, rid)
    sent = 0
    for _ in range(n_flood):  # the real reply, then many more copies: the owner reads one at most
        try:
            router.send_multipart([ident, frame], zmq.NOBLOCK)
        except zmq.Again:
            break
        sent += 1
    print("flooded", sent, flush=True)
    # Go away at once (within the heartbeat interval: libzmq's heartbeat timeout, armed by the
    # first PING the stalled DEALER sends, would otherwise close the connection cleanly first).
    time.sleep(0.05)
    router.close(0)  # the peer goes away while the DEALER has stopped reading it
    flooded.set()


def serve(n_flood, reply_of):
    th = threading.Thread(target=hostile, args=(n_flood, reply_of), daemon=True)
    th.start()
    return th


if kind == "connection":
    HB = 0.2  # heartbeat intervals of 0.2 s: the timer that asserted fires every 0.2 s
    t = ZmqTransport(1, None, cluster_name=CLUSTER, max_frame_size=1024, recv_queue_bytes=1024, heartbeat=HB)
    assert t.recv_hwm == 1, t.recv_hwm
    conn = t.connect(2, Node(addr))
    th = serve(64, AppendEntriesResponse(1, True, LogId(1, 1)))
    conn.send(VoteRequest(1, 1, None))
    deadline = time.monotonic() + 10
    got = None
    while got is None and time.monotonic() < deadline:
        got = conn.recv(0.1)
    assert got is not None and got[0] == 1, got
    print("first reply", type(got[1]).__name__, flush=True)
    # The owner stops reading: the DEALER's queue fills, libzmq stops reading the connection.
    assert flooded.wait(10)
    time.sleep(6 * HB)  # several heartbeat intervals after the peer went away
    conn.send(VoteRequest(1, 1, None))
    print("again", conn.recv(0.3), flush=True)
    conn.close()
    t.close()
elif kind in ("client", "channel"):
    # ZmqClient and ZmqChannel take no heartbeat parameter (they used 1.0 s): wait past
    # more than three intervals after the peer went away.  RCVHWM is their hwm; a small one
    # keeps the flood quick (the defaults, 1000 and 10,000 frames, abort the same way).
    if kind == "client":
        c = ZmqClient(addr, CLUSTER, hwm=100)
        call = lambda timeout: c.call(ClientRequest("ping"), timeout)
    else:
        c = ZmqChannel(CLUSTER, hwm=100)
        call = lambda timeout: c.call(addr, ClientRequest("ping"), timeout)
    th = serve(300, ClientResponse(True, "pong"))
    reply = call(10.0)
    assert reply == ClientResponse(True, "pong"), reply
    print("first reply", reply, flush=True)
    assert flooded.wait(10)
    time.sleep(3.5)
    try:
        print("again", call(0.5), flush=True)
    except RaftError as e:  # Timeout (the server is gone) or TransportError: typed, not a crash
        print("again", type(e).__name__, e, flush=True)
    c.close()
else:
    raise SystemExit(f"unknown kind {kind!r}")
th.join(5)
print("survived", flush=True)
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["connection", "client", "channel"])
def test_a_peer_that_floods_replies_then_disconnects_does_not_abort_the_process(kind):
    p = subprocess.run([sys.executable, "-c", _HOSTILE, kind], capture_output=True, text=True, timeout=60,
                       cwd=REPO, env=_child_env())
    out = p.stdout + "\n--- stderr ---\n" + p.stderr[-3000:]
    assert f"pyraft {os.path.join(REPO, 'pyraft', '__init__.py')}" in p.stdout, out  # this checkout's pyraft
    assert "flooded" in p.stdout, out  # the hostile server did its part
    assert p.returncode == 0, f"child died with rc {p.returncode}:\n{out}"
    assert "survived" in p.stdout, out


# ---------------------------------------------------------------------------
# 2. Without ZMTP heartbeats: a peer silent while a request waits is reconnected; one that answers is not.

CLUSTER = "silent"
HB = 0.2


@pytest.fixture
def fake_server():
    """A raw ROUTER on a loopback port, and a monitor counting the TCP connections it accepted."""
    ctx = zmq.Context.instance()
    made = []

    def make():
        r = ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        port = r.bind_to_random_port("tcp://127.0.0.1")
        mon = r.get_monitor_socket(zmq.EVENT_ACCEPTED)
        made.append((r, mon))
        return r, mon, f"tcp://127.0.0.1:{port}"

    yield make
    for r, mon in made:
        r.disable_monitor()
        mon.close(0)
        r.close(0)


def _accepted(mon, counter: list[int]) -> int:
    while mon.poll(0):
        if zmq.utils.monitor.recv_monitor_message(mon)["event"] == zmq.EVENT_ACCEPTED:
            counter[0] += 1
    return counter[0]


@pytest.fixture
def transport():
    made = []

    def make(**kw):
        t = ZmqTransport(1, None, cluster_name=CLUSTER, heartbeat=HB, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.mark.timeout(30)
def test_a_connection_reconnects_a_peer_silent_while_a_request_waits(fake_server, transport):
    router, mon, addr = fake_server()
    t = transport()
    conn = t.connect(2, Node(addr))
    try:
        accepted = [0]
        idents = []
        conn.send(VoteRequest(1, 1, None))
        # The fake server takes the request and never answers; the connection keeps waiting.
        deadline = time.monotonic() + 10
        while not (_accepted(mon, accepted) >= 2 and t.stats.get("reconnects_silent", 0) >= 1):
            assert time.monotonic() < deadline, (
                f"no reconnect of a silent peer within 10 s (heartbeat {HB} s): accepted {accepted[0]} "
                f"connection(s), stats {t.stats}")
            assert conn.recv(0.1) is None
            while router.poll(0):
                ident, _ = router.recv_multipart()
                idents.append(ident)
        assert idents, "the fake server never saw the first request"
        # A request sent now goes over the new connection: the server sees a new routing id.
        conn.send(VoteRequest(2, 1, None))
        deadline = time.monotonic() + 5
        while True:
            assert conn.recv(0.1) is None
            while router.poll(0):
                ident, _ = router.recv_multipart()
                idents.append(ident)
            if any(i != idents[0] for i in idents):
                break
            assert time.monotonic() < deadline, f"no request over a new connection: {idents}"
        assert t.stats["reconnects_silent"] >= 1, t.stats
    finally:
        conn.close()


@pytest.mark.timeout(30)
def test_a_connection_keeps_a_peer_that_answers(fake_server, transport):
    router, mon, addr = fake_server()
    t = transport()
    conn = t.connect(2, Node(addr))
    idents = []

    def round_trip(term: int) -> None:
        rid = conn.send(VoteRequest(term, 1, None))
        deadline = time.monotonic() + 5
        got = None
        while got is None:
            assert time.monotonic() < deadline, f"round trip {term} did not complete"
            if router.poll(0):  # the fake server answers every request at once
                ident, data = router.recv_multipart()
                idents.append(ident)
                req = decode_message(data, CLUSTER)
                router.send_multipart([ident, encode_message(VoteResponse(term, True), CLUSTER, 2,
                                                             req.request_id)])
            got = conn.recv(0.01)
        assert got == (rid, VoteResponse(term, True)), got

    try:
        start = time.monotonic()
        n = 0
        # At least 20 round trips, spread over more than 3 heartbeat intervals.
        while n < 20 or time.monotonic() - start < 4 * HB:
            n += 1
            round_trip(n)
            assert conn.recv(0.04) is None  # a pause between requests (and no stray frame)
        # Idle with no request waiting, longer than 3 intervals: not a reason to reconnect either.
        idle_end = time.monotonic() + 4 * HB
        while time.monotonic() < idle_end:
            assert conn.recv(0.1) is None
        round_trip(n + 1)
        assert len(set(idents)) == 1, f"the connection was replaced: {len(set(idents))} routing ids"
        assert _accepted(mon, [0]) == 1
        assert t.stats.get("reconnects_silent", 0) == 0, t.stats
    finally:
        conn.close()
