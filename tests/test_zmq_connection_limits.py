"""What one connection may cost a node: client requests in flight, and bytes of replies it does not read.

A real ZmqTransport on 127.0.0.1, raw DEALERs for the hostile side; see
docs/security.md ("Limits") and ZmqTransport's ``send_queue_bytes`` and
``max_client_requests_per_connection``.
"""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from pyraft.codec import ClientRequest, ClientResponse, decode_message, encode_message
from pyraft.messages import AppendEntriesRequest, AppendEntriesResponse
from pyraft.transports.memory import MemoryNetwork
from pyraft.transports.zmq import ZmqChannel, ZmqTransport
from pyraft.types import Node
from memcluster import wait_until

pytestmark = pytest.mark.timeout(60)

ANY = "tcp://127.0.0.1:*"


@pytest.fixture
def server():
    made = []

    def make(handler, **kw):
        t = ZmqTransport(1, ANY, **kw)
        made.append(t)
        t.start(handler)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def dealer():
    made = []

    def make(endpoint, opts=None):
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        for k, v in (opts or {}).items():
            s.setsockopt(k, v)
        s.connect(endpoint)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close(0)


def request(rid, op, body=None, from_id=0):
    return encode_message(ClientRequest(op, body), "pyraft", from_id, rid)


def recv_replies(sock, n, timeout=10.0):
    """n replies from a raw DEALER, as {request id: message}."""
    out, deadline = {}, time.monotonic() + timeout
    while len(out) < n:
        assert sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"only {len(out)} of {n} replies"
        f = decode_message(sock.recv(), "pyraft")
        out[f.request_id] = f.message
    return out


# ---------------------------------------------------------------- reply.connection

def test_reply_connection_names_the_connection_a_request_came_on(server, dealer):
    seen = []

    def handler(_f, msg, reply):
        seen.append((msg.body, reply.connection))
        reply.reply(ClientResponse(True))

    srv = server(handler)
    a, b = dealer(srv.endpoint), dealer(srv.endpoint)
    for i in range(3):
        a.send(request(i + 1, "x", "a"))
        b.send(request(i + 1, "x", "b"))
    recv_replies(a, 3), recv_replies(b, 3)
    by = {who: {c for w, c in seen if w == who} for who in "ab"}
    assert len(by["a"]) == len(by["b"]) == 1 and by["a"] != by["b"]
    assert all(isinstance(c, bytes) for c in by["a"] | by["b"])


def test_memory_transport_reply_connection_is_stable_per_connection():
    seen = []
    with MemoryNetwork() as net:
        srv = net.transport(1)
        srv.start(lambda _f, msg, reply: (seen.append((msg.body, reply.connection)),
                                          reply.reply(ClientResponse(True))))
        cli = net.transport(2)
        a, b = cli.connect(1), cli.connect(1)
        for conn, who in ((a, "a"), (b, "b"), (a, "a"), (b, "b")):
            conn.send(ClientRequest("x", who))
            assert conn.recv(5) is not None
    by = {who: {c for w, c in seen if w == who} for who in "ab"}
    assert len(by["a"]) == len(by["b"]) == 1 and by["a"] != by["b"]
    hash(next(iter(by["a"])))


# ---------------------------------------------------------------- requests in flight

def test_a_connection_past_its_requests_in_flight_is_answered_overloaded_while_another_is_served(server, dealer):
    held = []
    lock = threading.Lock()

    def handler(_f, msg, reply):
        if isinstance(msg, ClientRequest) and msg.op == "echo":
            reply.reply(ClientResponse(True, msg.body))
        elif isinstance(msg, ClientRequest) and msg.op == "forget":
            pass  # the handle is dropped unanswered: its slot must come back
        else:
            with lock:
                held.append((msg, reply))

    with pytest.raises(ValueError):
        ZmqTransport(1, None, max_client_requests_per_connection=0)
    srv = server(handler, max_client_requests_per_connection=8)
    greedy, other = dealer(srv.endpoint), dealer(srv.endpoint)
    for i in range(1, 21):
        greedy.send(request(i, "hold"))
    # The twelve past the cap are refused at once, before their bodies are decoded.
    refused = recv_replies(greedy, 12)
    assert set(refused) == set(range(9, 21))
    assert all(not r.ok and r.error[0] == "Overloaded" for r in refused.values())
    assert srv.stats["client_requests_overloaded"] == 12
    with lock:
        assert len(held) == 8

    # Another connection is served meanwhile, up to its own cap.
    for i in range(1, 11):
        other.send(request(i, "echo", i))
    assert recv_replies(other, 10) == {i: ClientResponse(True, i) for i in range(1, 11)}

    # Raft RPCs are not client requests: not counted, not refused.
    for i in range(21, 41):
        greedy.send(encode_message(AppendEntriesRequest(1, 2, None, (), 0), "pyraft", 2, i))
    wait_until(lambda: len(held) == 28, 10, "every AppendEntries to reach the handler")
    assert srv.stats["client_requests_overloaded"] == 12

    # Replying frees the slots; the entry goes with the last one.
    with lock:
        mine = list(held)
    for msg, reply in mine:
        reply.reply(ClientResponse(True) if isinstance(msg, ClientRequest) else AppendEntriesResponse(1, True, None))
    assert len(recv_replies(greedy, 28)) == 28
    wait_until(lambda: not srv._in_flight, 10, "the in-flight table to empty")

    # A handle dropped unanswered gives its slot back too (on the server thread, after its burst).
    for i in range(41, 49):
        greedy.send(request(i, "forget"))
    wait_until(lambda: srv.stats["requests_in"] == 10 + 8 + 20 + 8 and not srv._in_flight,
               10, "the forgotten requests' slots")
    for i in range(49, 57):
        greedy.send(request(i, "echo", i))
    assert recv_replies(greedy, 8) == {i: ClientResponse(True, i) for i in range(49, 57)}
    assert srv.stats["client_requests_overloaded"] == 12


# ---------------------------------------------------------------- replies not read

def test_a_client_that_never_reads_its_replies_costs_the_node_about_send_queue_bytes(server, dealer):
    big = b"\0" * 900_000
    srv = server(lambda _f, _m, reply: reply.reply(ClientResponse(True, big)),
                 max_frame_size=1 << 20, send_queue_bytes=4 << 20)
    # libzmq counts messages: SNDHWM is send_queue_bytes // max_frame_size, at least 64.
    assert srv.send_hwm == 64 and srv._router.getsockopt(zmq.SNDHWM) == 64
    n = 300
    sink = dealer(srv.endpoint, {zmq.RCVHWM: 1, zmq.RCVBUF: 4096})
    for i in range(1, n + 1):
        sink.send(request(i, "range"))
    # libzmq's queue (64 frames), the backlog (4 MiB: 4 frames), the kernel's buffers and the
    # reader's one frame hold about a hundred replies at most; the rest are dropped.  (SNDHWM
    # 1000 took all 300: 270 MB parked for one connection that sent 18 KB.)
    wait_until(lambda: srv.stats.get("dropped_reply_backlog", 0) >= n - 110, 10, "the excess to be dropped")
    wait_until(lambda: srv.stats.get("requests_in", 0) == n and not srv._outbox, 10, "every request answered")
    st = srv.stats
    assert st["replies_out"] <= 110, st
    assert st["replies_out"] + st["replies_dropped"] + sum(len(b.frames) for b in list(srv._backlog.values())) == n
    assert sum(b.nbytes for b in list(srv._backlog.values())) <= srv.send_queue_bytes
    # The node is not stuck on it: another connection gets its (large) replies.
    reader = dealer(srv.endpoint)
    for i in range(1, 6):
        reader.send(request(i, "range"))
    assert all(r.ok and r.body == big for r in recv_replies(reader, 5).values())


def test_the_backlogs_of_many_connections_that_never_read_are_bounded_together(server, dealer):
    big = b"\0" * 200_000
    srv = server(lambda _f, _m, reply: reply.reply(ClientResponse(True, big)),
                 max_frame_size=1 << 20, send_queue_bytes=1 << 20)
    sinks = [dealer(srv.endpoint, {zmq.RCVHWM: 1, zmq.RCVBUF: 4096}) for _ in range(12)]
    n = 120  # per connection: more than SNDHWM (64) + a 1 MiB backlog (5 replies) + the kernel's buffers
    for sink in sinks:
        for i in range(1, n + 1):
            sink.send(request(i, "range"))
    wait_until(lambda: srv.stats.get("requests_in", 0) == n * len(sinks) and not srv._outbox, 30,
               "every request answered")
    # Each connection's backlog holds at most 1 MiB, and all of them at most 4 MiB
    # (_BACKLOG_NODE_SHARE): twelve connections that never read cost the node 4 MiB, not 12.
    backlogs = list(srv._backlog.values())
    assert all(b.nbytes <= srv.send_queue_bytes for b in backlogs)
    assert srv._backlog_bytes == sum(b.nbytes for b in backlogs) <= 4 * srv.send_queue_bytes
    assert srv.stats.get("dropped_reply_backlog", 0) > 0


def test_bursts_of_replies_past_sndhwm_wait_for_room_and_are_not_lost(server):
    """A leader's pipelined AppendEntries acks, a many-threaded KVClient's answers: delayed, never dropped."""
    held = []
    lock = threading.Lock()
    burst = 500  # over SNDHWM (64), under the cap (1024)

    def handler(_f, msg, reply):
        if isinstance(msg, ClientRequest) and msg.op == "ping":
            reply.reply(ClientResponse(True))
            return
        with lock:
            held.append((msg, reply))
            if len(held) < burst:
                return
            out, held[:] = list(held), []
        with srv.replies_held():  # all leave at once: the largest burst one connection can see
            for m, r in out:
                r.reply(AppendEntriesResponse(m.term, True, None) if isinstance(m, AppendEntriesRequest)
                        else ClientResponse(True, m.body))

    srv = server(handler)
    assert srv._router.getsockopt(zmq.SNDHWM) == srv.send_hwm < burst
    # A client's channel (what KVClient uses), one thread per call, all on one connection.
    results, errors = {}, []
    with ZmqChannel() as ch:
        def call(i):
            try:
                results[i] = ch.call(srv.endpoint, ClientRequest("get", i), 10)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=call, args=(i,)) for i in range(burst)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == [] and results == {i: ClientResponse(True, i) for i in range(burst)}
    # A peer's pipelined Raft RPCs on one connection.
    peer = ZmqTransport(2, None)
    try:
        conn = peer.connect(1, Node(srv.endpoint))
        conn.send(ClientRequest("ping"))  # the connection is up before the burst: none is held back
        assert conn.recv(5) is not None
        sent = {conn.send(AppendEntriesRequest(5, 2, None, (), 0)) for _ in range(burst)}
        got = set()
        deadline = time.monotonic() + 10
        while len(got) < burst and time.monotonic() < deadline:
            r = conn.recv(0.5)
            if r is not None:
                assert r[1] == AppendEntriesResponse(5, True, None)
                got.add(r[0])
        assert got == sent
        conn.close()
    finally:
        peer.close()
    st = srv.stats
    assert st.get("replies_dropped", 0) == 0 and st["replies_deferred"] > 0, st
