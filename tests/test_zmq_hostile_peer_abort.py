"""A peer must not abort the process through libzmq; a dead peer is still found, a slow one kept.

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

Without ZMTP heartbeats a DEALER finds a dead peer through the kernel: every
DEALER sets ``ZMQ_TCP_MAXRT`` (``TCP_USER_TIMEOUT``), so a connection whose
data the peer's host stops acknowledging fails after ``peer_timeout`` and
libzmq makes a new one; a peer whose code is merely slow to answer keeps its
connection (its kernel acknowledges).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq
import zmq.utils.monitor

from pyraft.codec import decode_message, encode_message
from pyraft.messages import AppendEntriesRequest, VoteRequest, VoteResponse
from pyraft.transports.zmq import ZmqChannel, ZmqClient, ZmqTransport
from pyraft.codec import ClientRequest
from pyraft.errors import Timeout
from pyraft.types import Entry, LogId, Node

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
    # ZMTP heartbeats of 1 s were the default: the timer that asserted fired every second.
    t = ZmqTransport(1, None, cluster_name=CLUSTER, max_frame_size=1024, recv_queue_bytes=1024)
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
    time.sleep(2.5)  # past two intervals of the heartbeats the DEALERs once sent
    conn.send(VoteRequest(1, 1, None))
    print("again", conn.recv(0.3), flush=True)
    conn.close()
    t.close()
elif kind in ("client", "channel"):
    # ZmqClient and ZmqChannel sent ZMTP heartbeats every 1.0 s: wait past more than
    # three intervals after the peer went away.  RCVHWM is their hwm; a small one
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
# 2. No ZMTP heartbeats, a TCP user timeout on every DEALER.

CLUSTER = "liveness"


@pytest.mark.timeout(30)
def test_every_dealer_sends_no_zmtp_heartbeats_and_has_a_tcp_user_timeout():
    t = ZmqTransport(1, None, cluster_name=CLUSTER, peer_timeout=2.5)
    conn = t.connect(2, Node("tcp://127.0.0.1:9"))
    client = ZmqClient("tcp://127.0.0.1:9", CLUSTER)
    chan = ZmqChannel(CLUSTER)
    try:
        with pytest.raises(Timeout):
            chan.call("tcp://127.0.0.1:9", ClientRequest("ping"), 0.05)  # opens its DEALER
        socks = [conn._sock, client._sock, *chan._socks.values()]
        assert len(socks) == 3
        for sock in socks:
            assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 0
        assert [s.getsockopt(zmq.TCP_MAXRT) for s in socks] == [2500, 3000, 3000]
        for bad in (-1.0, float("inf"), float("nan"), "3", 10**9):
            with pytest.raises(ValueError, match="peer_timeout"):
                ZmqTransport(1, None, peer_timeout=bad)
    finally:
        conn.close()
        client.close()
        chan.close()
        t.close()


class _FreezingProxy:
    """A TCP proxy in front of a ROUTER that can stop reading its client: the client's data then
    goes unacknowledged, as when the peer's host is gone (the kernel cannot tell the two apart
    once the proxy's small receive buffer is full)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = threading.Event()
        self.stopped = threading.Event()
        self.accepted: list[float] = []
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepted sockets
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(8)
        self.ls.settimeout(0.1)
        self.port = self.ls.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                c, _ = self.ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted.append(time.monotonic())
            u = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._socks += [c, u]
            for a, b, client_side in ((c, u, True), (u, c, False)):
                th = threading.Thread(target=self._pipe, args=(a, b, client_side), daemon=True)
                th.start()
                self._threads.append(th)

    def _pipe(self, a: socket.socket, b: socket.socket, client_side: bool) -> None:
        a.settimeout(0.05)
        while not self.stopped.is_set():
            if client_side and self.frozen.is_set() and len(self.accepted) == 1:
                time.sleep(0.05)  # the first connection stops being read: its window closes
                continue
            try:
                data = a.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                b.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.stopped.set()
        for th in self._threads:
            th.join(5)
        for sk in self._socks + [self.ls]:
            sk.close()


@pytest.fixture
def router():
    ctx = zmq.Context.instance()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    yield r, port
    r.close(0)


def _big_append(i: int) -> AppendEntriesRequest:
    return AppendEntriesRequest(1, 1, None, (Entry(LogId(1, i), payload=b"x" * 60_000),), 0)


@pytest.mark.timeout(60)
def test_a_connection_whose_peer_stops_acknowledging_is_made_anew(router):
    r, port = router
    proxy = _FreezingProxy(port)
    t = ZmqTransport(1, None, cluster_name=CLUSTER, peer_timeout=0.5)
    conn = t.connect(2, Node(f"tcp://127.0.0.1:{proxy.port}"))
    try:
        conn.send(VoteRequest(1, 1, None))
        deadline = time.monotonic() + 10
        while not r.poll(10):
            conn.recv(0.05)  # flushes the frames held until the first connection is up
            assert time.monotonic() < deadline, "the first request never reached the server"
        first_ident = r.recv_multipart()[0]
        proxy.frozen.set()
        frozen_at = time.monotonic()
        i = 0
        while len(proxy.accepted) < 2:  # keep sending, as a leader replicating to that peer does
            i += 1
            conn.send(_big_append(i))
            conn.recv(0.01)
            assert time.monotonic() - frozen_at < 20, (
                f"the connection was not made anew within 20 s of its peer going quiet "
                f"(peer_timeout 0.5 s): {len(proxy.accepted)} connection(s)")
        # The new connection carries requests: the server sees a new routing id.
        deadline = time.monotonic() + 10
        while True:
            conn.send(VoteRequest(2, 1, None))
            conn.recv(0.05)
            if r.poll(10) and r.recv_multipart()[0] != first_ident:
                break
            assert time.monotonic() < deadline, "no request over the new connection"
    finally:
        conn.close()
        t.close()
        proxy.close()


@pytest.mark.timeout(60)
def test_a_peer_slow_to_answer_keeps_its_connection(router):
    """Its code takes longer than three peer timeouts to answer; its kernel acknowledges meanwhile."""
    r, port = router
    mon = r.get_monitor_socket(zmq.EVENT_ACCEPTED)
    t = ZmqTransport(1, None, cluster_name=CLUSTER, peer_timeout=0.3)
    conn = t.connect(2, Node(f"tcp://127.0.0.1:{port}"))
    try:
        idents = set()
        for term in (1, 2, 3):
            rid = conn.send(VoteRequest(term, 1, None))
            deadline = time.monotonic() + 10
            while not r.poll(10):
                conn.recv(0.05)
                assert time.monotonic() < deadline, "the request never reached the server"
            ident, data = r.recv_multipart()
            idents.add(ident)
            answer_at = time.monotonic() + 1.2  # four peer timeouts
            while time.monotonic() < answer_at:
                assert conn.recv(0.05) is None
            req = decode_message(data, CLUSTER)
            r.send_multipart([ident, encode_message(VoteResponse(term, True), CLUSTER, 2, req.request_id)])
            got = None
            deadline = time.monotonic() + 5
            while got is None:
                assert time.monotonic() < deadline, f"the slow answer to request {term} never came"
                got = conn.recv(0.1)
            assert got == (rid, VoteResponse(term, True)), got
        assert len(idents) == 1, f"the connection was replaced: {len(idents)} routing ids"
        accepted = 0
        while mon.poll(0):
            if zmq.utils.monitor.recv_monitor_message(mon)["event"] == zmq.EVENT_ACCEPTED:
                accepted += 1
        assert accepted == 1
    finally:
        r.disable_monitor()
        mon.close(0)
        conn.close()
        t.close()
