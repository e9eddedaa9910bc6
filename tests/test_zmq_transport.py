"""ZmqTransport, ZmqConnection and ZmqClient on 127.0.0.0/8."""
from __future__ import annotations

import inspect
import queue
import socket
import threading
import time

import pytest
import zmq

from conftest import free_port
from pyraft.codec import ClientRequest, ClientResponse, encode_message
from pyraft.errors import CodecError, RaftError, Timeout
from pyraft.messages import AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse
from pyraft.network import Connection, Transport
import pyraft.transports.zmq as zmq_transport
from pyraft.transports.zmq import (CONNECT_BUFFER, DEFAULT_LISTEN, TransportError, ZmqClient, ZmqTransport, _ZmqReply,
                                   is_loopback)
from pyraft.types import Entry, LogId, Node

pytestmark = pytest.mark.timeout(60)

ANY = "tcp://127.0.0.1:*"


def wait_until(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def echo(from_id, msg, reply):
    reply.reply(ClientResponse(True, [from_id, msg.body]))


def pyraft_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("pyraft-")]


@pytest.fixture
def server():
    made = []

    def make(node_id=1, handler=echo, listen=ANY, **kw):
        t = ZmqTransport(node_id, listen, **kw)
        made.append(t)
        if handler is not None:
            t.start(handler)
        return t

    yield make
    for t in made:
        t.close()
    assert pyraft_threads() == []


@pytest.fixture
def client():
    made = []

    def make(node_id=2, **kw):
        t = ZmqTransport(node_id, None, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def call(conn, message, timeout=5.0):
    """Send once and wait for the reply with the same id.

    No resend is needed on a fresh connection: a frame sent before it is up
    is held and flushed by ``recv``.
    """
    rid = conn.send(message)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = conn.recv(deadline - time.monotonic())
        if r is not None and r[0] == rid:
            return r[1]
    raise AssertionError("no reply")


def test_request_reply(server, client):
    srv = server(1)
    assert isinstance(srv, Transport)
    c = client(2).connect(1, Node(srv.endpoint))
    assert isinstance(c, Connection)
    # the very first request on a fresh connection is held until the connection is up
    rid = c.send(ClientRequest("echo", 1))
    assert c.recv(5.0) == (rid, ClientResponse(True, [2, 1]))
    assert call(c, ClientRequest("echo", {"k": b"v"})) == ClientResponse(True, [2, {"k": b"v"}])
    c.close()
    c.close()


def test_raft_messages_round_trip(server, client):
    got = queue.Queue()

    def handler(from_id, msg, reply):
        got.put((from_id, msg))
        reply.reply(AppendEntriesResponse(msg.term, True, LogId(msg.term, 2)))

    srv = server(1, handler)
    c = client(7).connect(1, Node(srv.endpoint))
    req = AppendEntriesRequest(3, 7, LogId(2, 1), (Entry(LogId(3, 2), payload={"op": "put"}),), 1, seq=9)
    assert call(c, req) == AppendEntriesResponse(3, True, LogId(3, 2))
    assert got.get(timeout=1) == (7, req)


def test_pipelining_1000_requests_on_one_dealer(server, client):
    # hwm bounds the frames queued per connection; libzmq's pipes may refuse
    # a write somewhat before hwm (credit comes back in batches), so leave room.
    srv = server(1, hwm=4000)
    c = client(2, hwm=4000).connect(1, Node(srv.endpoint))
    call(c, ClientRequest("warm-up"))
    ids = [c.send(ClientRequest("echo", i)) for i in range(1000)]
    assert len(set(ids)) == 1000
    got = {}
    while len(got) < 1000:
        r = c.recv(5.0)
        assert r is not None, f"only {len(got)} replies"
        got[r[0]] = r[1].body[1]
    assert [got[i] for i in ids] == list(range(1000))


def test_reply_from_another_thread(server, client):
    handled_on = queue.Queue()
    work = queue.Queue()

    def handler(from_id, msg, reply):
        handled_on.put(threading.current_thread().name)
        work.put((msg, reply))

    def worker():
        while True:
            item = work.get()
            if item is None:
                return
            msg, reply = item
            reply.reply(VoteResponse(msg.term, True))

    th = threading.Thread(target=worker, name="test-worker")
    th.start()
    try:
        srv = server(1, handler)
        c = client(2).connect(1, Node(srv.endpoint))
        assert call(c, VoteRequest(4, 2, None)) == VoteResponse(4, True)
        assert handled_on.get(timeout=1) == "pyraft-zmq-server-1"
        wait_until(lambda: srv.stats.get("replies_out", 0) >= 1, what="the reply to be counted")
    finally:
        work.put(None)
        th.join()


def test_a_second_reply_is_ignored(server, client):
    def handler(from_id, msg, reply):
        reply.reply(ClientResponse(True, 1))
        reply.reply(ClientResponse(True, 2))

    srv = server(1, handler)
    c = client(2).connect(1, Node(srv.endpoint))
    assert call(c, ClientRequest("x")) == ClientResponse(True, 1)
    assert c.recv(0.1) is None


def test_recv_times_out_and_wake_interrupts_it(server, client):
    srv = server(1, lambda f, m, r: None)  # never replies
    c = client(2).connect(1, Node(srv.endpoint))
    c.send(ClientRequest("x"))
    t0 = time.monotonic()
    assert c.recv(0.2) is None
    assert 0.19 <= time.monotonic() - t0 < 1.5
    threading.Timer(0.05, c.wake).start()
    t0 = time.monotonic()
    assert c.recv(10.0) is None
    assert time.monotonic() - t0 < 5.0
    c.wake()
    c.wake()
    t0 = time.monotonic()
    assert c.recv(10.0) is None
    assert time.monotonic() - t0 < 1.0


def test_client_call_and_its_timeouts(server):
    srv = server(1)
    with ZmqClient(srv.endpoint, timeout=5.0) as zc:
        assert zc.call(ClientRequest("echo", 1)) == ClientResponse(True, [0, 1])
    quiet = server(3, lambda f, m, r: None)
    with ZmqClient(quiet.endpoint) as zc:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            zc.call(ClientRequest("echo"), timeout=0.2)
        assert time.monotonic() - t0 < 2.0
    with ZmqClient(f"tcp://127.0.0.1:{free_port()}") as zc:  # nobody there
        with pytest.raises(Timeout):
            zc.call(ClientRequest("echo"), timeout=0.2)


def test_client_discards_a_stale_reply(server):
    slow = threading.Event()

    def handler(from_id, msg, reply):
        if msg.body == "slow":
            threading.Timer(0.3, lambda: (reply.reply(ClientResponse(True, "late")), slow.set())).start()
        else:
            echo(from_id, msg, reply)

    srv = server(1, handler)
    with ZmqClient(srv.endpoint) as zc:
        with pytest.raises(Timeout):
            zc.call(ClientRequest("echo", "slow"), timeout=0.1)
        assert slow.wait(5)
        assert zc.call(ClientRequest("echo", "next"), timeout=5) == ClientResponse(True, [0, "next"])


def test_a_dead_peer_costs_no_memory_and_sends_do_not_block(client):
    tr = client(2)
    c = tr.connect(1, Node(f"tcp://127.0.0.1:{free_port()}"))
    payload = ClientRequest("x", b"\0" * 1024)
    t0 = time.monotonic()
    for _ in range(20000):
        c.send(payload)
    assert time.monotonic() - t0 < 10.0
    assert len(c._pending) <= CONNECT_BUFFER  # held until the first connection, bounded
    assert tr.stats["sends_dropped"] >= 20000 - CONNECT_BUFFER
    assert c.recv(0.05) is None
    c.close()


def test_a_peer_that_never_reads_fills_its_hwm_then_sends_drop(client):
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)  # accepts connections, never reads
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 10)
    router.setsockopt(zmq.RCVBUF, 4096)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        tr = client(2, hwm=10)
        c = tr.connect(1, Node(f"tcp://127.0.0.1:{port}"))
        payload = ClientRequest("x", b"\0" * 64 * 1024)
        deadline = time.monotonic() + 10
        n = 0
        while tr.stats.get("sends_dropped", 0) < 100:  # the queue is full: further sends are dropped
            assert time.monotonic() < deadline, tr.stats
            c.send(payload)
            n += 1
            if n % 50 == 0:
                c.recv(0.01)  # lets the held first frames out once connected
        assert n < 2000  # bounded: a few queues' worth, not everything
        c.close()
    finally:
        router.close(0)


def test_busy_port_is_a_clear_error_at_once(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(TransportError) as ei:
            ZmqTransport(1, f"tcp://127.0.0.1:{port}")
        assert time.monotonic() - t0 < 1.0
        assert f"127.0.0.1:{port}" in str(ei.value)
        assert isinstance(ei.value, RaftError)
    first = server(1)
    with pytest.raises(TransportError):
        ZmqTransport(2, first.endpoint)
    with pytest.raises(TransportError):
        ZmqTransport(3, "bogus://nowhere")


def test_cluster_name_mismatch_is_dropped_and_counted(server, client):
    hits = []
    srv = server(1, lambda f, m, r: (hits.append(m), echo(f, m, r)), cluster_name="alpha")
    other = client(2, cluster_name="beta").connect(1, Node(srv.endpoint))
    for _ in range(5):
        other.send(ClientRequest("x"))
        other.recv(0.05)
    wait_until(lambda: srv.stats.get("dropped_decode", 0) >= 1, what="the drop to be counted")
    good = client(3, cluster_name="alpha").connect(1, Node(srv.endpoint))
    assert call(good, ClientRequest("y")) == ClientResponse(True, [3, None])
    assert hits == [ClientRequest("y")]
    assert srv.stats["frames_dropped"] == srv.stats["dropped_decode"] >= 1


def test_a_response_sent_as_a_request_is_dropped(server, client):
    hits = []
    srv = server(1, lambda f, m, r: hits.append(m))
    c = client(2).connect(1, Node(srv.endpoint))
    for _ in range(5):
        c.send(VoteResponse(1, True))
        c.recv(0.05)
    wait_until(lambda: srv.stats.get("dropped_not_request", 0) >= 1, what="the drop")
    assert hits == []


def test_a_raising_handler_does_not_stop_the_server(server, client):
    def handler(from_id, msg, reply):
        if msg.op == "boom":
            raise RuntimeError("boom")
        echo(from_id, msg, reply)

    srv = server(1, handler)
    c = client(2).connect(1, Node(srv.endpoint))
    c.send(ClientRequest("boom"))
    # (a frame sent before the first connection is up goes out with the owner's next send/recv)
    wait_until(lambda: c.recv(0.01) or srv.stats.get("handler_errors", 0) >= 1, what="the handler error")
    assert call(c, ClientRequest("ok")) == ClientResponse(True, [2, None])


def test_reply_to_a_vanished_peer_is_dropped(server, client):
    replies = queue.Queue()
    srv = server(1, lambda f, m, r: replies.put(r))
    c = client(2).connect(1, Node(srv.endpoint))
    for _ in range(100):
        c.send(ClientRequest("x"))
        if not replies.empty():
            break
        c.recv(0.05)
    first = replies.get(timeout=5)
    c.close()
    # ROUTER_MANDATORY reports the peer as unroutable once its disconnect is seen:
    # reply to it (as a late RaftCore would) until the drop is counted.
    deadline = time.monotonic() + 10
    n = 1
    while srv.stats.get("replies_dropped", 0) == 0:
        assert time.monotonic() < deadline, srv.stats
        _ZmqReply(srv, first._routing_id, 2, n).reply(ClientResponse(True))
        n += 1
        wait_until(lambda: srv.stats.get("replies_dropped", 0) + srv.stats.get("replies_out", 0) >= n - 1)
        time.sleep(0.005)
    assert not srv._outbox
    assert pyraft_threads() == ["pyraft-zmq-server-1"]


def test_send_of_a_value_the_wire_cannot_carry_raises(server, client):
    srv = server(1)
    c = client(2).connect(1, Node(srv.endpoint))
    with pytest.raises(CodecError):
        c.send(ClientRequest("x", object()))


def test_oversize_frames_are_not_delivered(server, client):
    hits = []
    srv = server(1, lambda f, m, r: (hits.append(m), echo(f, m, r)), max_frame_size=4096)
    big = encode_message(ClientRequest("x", b"\0" * 10000), "pyraft", 5, 1)
    raw = zmq.Context.instance().socket(zmq.DEALER)  # libzmq's MAXMSGSIZE disconnects it
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(srv.endpoint)
    raw.send(big)
    small = client(3, max_frame_size=4096).connect(1, Node(srv.endpoint))
    small.send(ClientRequest("x", b"\0" * 10000))  # refused by the sender itself
    assert small._t.stats["sends_dropped"] == 1
    assert call(small, ClientRequest("ok")) == ClientResponse(True, [3, None])
    raw.close(0)
    assert hits == [ClientRequest("ok")]


def test_fault_filter_drops_by_direction_and_peer(server, client):
    srv = server(1)
    cli = client(2)
    c = cli.connect(1, Node(srv.endpoint))
    call(c, ClientRequest("warm-up"))
    seen = []

    def drop_requests_from_2(direction, peer, msg):
        seen.append(direction)
        return direction == "request" and peer == 2

    srv.set_fault_filter(drop_requests_from_2)
    c.send(ClientRequest("x"))
    assert c.recv(0.2) is None
    wait_until(lambda: srv.stats.get("dropped_fault_filter") == 1, what="the filtered request")
    srv.set_fault_filter(None)
    cli.set_fault_filter(lambda d, p, m: d == "recv")
    c.send(ClientRequest("y"))
    assert c.recv(0.3) is None
    wait_until(lambda: cli.stats.get("dropped_fault_filter", 0) == 1, what="the filtered reply")
    cli.set_fault_filter(lambda d, p, m: d == "send" and p == 1)
    c.send(ClientRequest("z"))
    assert c.recv(0.1) is None
    cli.set_fault_filter(None)
    assert call(c, ClientRequest("ok")) == ClientResponse(True, [2, None])
    assert seen == ["request"]


def test_close_joins_threads_and_is_idempotent(client):
    srv = ZmqTransport(1, ANY)
    srv.start(echo)
    assert "pyraft-zmq-server-1" in pyraft_threads()
    cli = client(2)
    c = cli.connect(1, Node(srv.endpoint))
    call(c, ClientRequest("x"))
    srv.close()
    srv.close()
    assert pyraft_threads() == []
    with pytest.raises(TransportError):
        srv.start(echo)
    # the port is free again at once
    again = ZmqTransport(1, srv.endpoint)
    again.close()
    # a connection of a closed transport drops quietly and closes its socket on next use
    cli.close()
    assert c.send(ClientRequest("y")) > 0
    assert c.recv(0.01) is None
    assert c._sock is None
    # a transport never started closes too
    ZmqTransport(3, ANY).close()
    assert pyraft_threads() == []


def test_handler_may_close_the_transport(client):
    srv = ZmqTransport(1, ANY)
    done = threading.Event()

    def handler(from_id, msg, reply):
        srv.close()
        done.set()

    srv.start(handler)
    c = client(2).connect(1, Node(srv.endpoint))
    for _ in range(100):
        c.send(ClientRequest("x"))
        if done.wait(0.05):
            break
    assert done.is_set()
    wait_until(lambda: pyraft_threads() == [], what="the server thread to end")


def test_many_transports_talk_to_each_other(server):
    ts = {i: server(i, listen=f"tcp://127.0.0.{i}:*") for i in (1, 2, 3)}
    for a in ts:
        for b in ts:
            if a != b:
                conn = ts[a].connect(b, Node(ts[b].endpoint))
                assert call(conn, ClientRequest("hi", a)) == ClientResponse(True, [a, a])
                conn.close()


# ---------------------------------------------------------------------------
# Safe defaults, limits, and a server thread that cannot die unnoticed

def test_the_default_listen_address_is_loopback():
    assert inspect.signature(ZmqTransport).parameters["listen"].default == DEFAULT_LISTEN == "tcp://127.0.0.1:7001"
    for addr in ("tcp://127.0.0.1:7001", "tcp://127.3.4.5:1", "tcp://localhost:7001", "tcp://[::1]:7001",
                 "ipc:///tmp/pyraft.sock"):
        assert is_loopback(addr), addr
    for addr in ("tcp://*:7001", "tcp://0.0.0.0:7001", "tcp://[::]:7001", "tcp://10.0.0.5:7001",
                 "tcp://eth0:7001", "tcp://example.com:7001", "7001", ""):
        assert not is_loopback(addr), addr


def test_a_client_request_over_the_client_limit_is_answered_without_being_decoded(server, client):
    hits = []
    srv = server(1, lambda f, m, r: (hits.append(type(m).__name__), r.reply(ClientResponse(True))),
                 max_client_frame_size=10_000)
    c = client(2).connect(1, Node(srv.endpoint))
    resp = call(c, ClientRequest("x", b"\0" * 20_000))
    assert not resp.ok and resp.error[0] == "RequestTooLarge" and "10000" in resp.error[1]
    assert srv.stats["client_requests_too_large"] == 1 and hits == []
    # Raft RPCs may use the whole max_frame_size (log entries come from peers, in batches).
    entries = (Entry(LogId(1, 1), payload=b"\0" * 20_000),)
    call(c, AppendEntriesRequest(1, 2, None, entries, 0))
    assert hits == ["AppendEntriesRequest"]


def test_the_receive_queue_is_bounded_in_bytes(server):
    """libzmq counts messages: the ROUTER's RCVHWM comes from recv_queue_bytes // max_frame_size."""
    release = threading.Event()
    srv = server(1, lambda f, m, r: release.wait(30), max_frame_size=1 << 20, recv_queue_bytes=2 << 20)
    assert srv.recv_hwm == 2 and srv._router.getsockopt(zmq.RCVHWM) == 2
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SNDHWM, 1)
    raw.connect(srv.endpoint)
    frame = encode_message(ClientRequest("x", b"\0" * 900_000), "pyraft", 2, 1)
    try:
        # The handler blocks on the first frame: everything after it waits in queues.
        accepted, deadline = 0, time.monotonic() + 3
        while accepted < 60 and time.monotonic() < deadline:
            try:
                raw.send(frame, zmq.NOBLOCK)
                accepted += 1
            except zmq.Again:
                time.sleep(0.01)
        # RCVHWM frames in the ROUTER's queue, one being read, one in the sender's, and what
        # the kernel's socket buffers hold (a few MB on loopback); RCVHWM 1000 took all 60.
        assert accepted < 30, accepted
    finally:
        release.set()
        raw.close(0)


def test_a_server_thread_that_fails_reports_it_and_a_bad_frame_does_not_kill_it(server, client, monkeypatch):
    failures = []
    srv = ZmqTransport(1, ANY)
    srv.start(echo, on_failure=failures.append)
    try:
        c = client(2).connect(1, Node(srv.endpoint))
        assert call(c, ClientRequest("x", 1)) == ClientResponse(True, [2, 1])
        # A bug on one frame costs that frame.
        real = zmq_transport.decode_body
        calls = []

        def fail_once(data, env):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            return real(data, env)

        monkeypatch.setattr(zmq_transport, "decode_body", fail_once)
        c.send(ClientRequest("lost"))
        assert call(c, ClientRequest("x", 2)) == ClientResponse(True, [2, 2])
        assert srv.stats["frame_errors"] == 1 and failures == []
        # libzmq failing under the thread: it stops and says so.
        monkeypatch.setattr(srv, "_flush_replies", lambda router: (_ for _ in ()).throw(zmq.ZMQError(zmq.EMFILE)))
        c.send(ClientRequest("x", 3))
        wait_until(lambda: failures, what="the failure report")
        assert "transport server thread failed" in failures[0]
        wait_until(lambda: "pyraft-zmq-server-1" not in pyraft_threads(), what="the thread to end")
    finally:
        srv.close()


def test_a_node_whose_transport_fails_goes_fatal(monkeypatch):
    from pyraft import Config, Raft, ServerState
    from pyraft.errors import Fatal
    from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
    t = ZmqTransport(1, ANY)
    raft = Raft(1, Config(), t, MemoryLogStore(), MemoryStateMachine())
    try:
        assert raft.metrics().state != ServerState.FATAL
        monkeypatch.setattr(t, "_flush_replies", lambda router: (_ for _ in ()).throw(zmq.ZMQError(zmq.ENOMEM)))
        t._wake()
        raft.wait(10).state(ServerState.FATAL)
        assert "transport server thread failed" in raft.metrics().error
        with pytest.raises(Fatal):
            raft.client_write({"op": "put"}, timeout=5)
    finally:
        raft.shutdown()
    assert pyraft_threads() == []
