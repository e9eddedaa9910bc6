"""MemoryNetwork: the in-process switchboard and its faults."""
from __future__ import annotations

import queue
import threading
import time

import pytest

from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import CodecError, RaftError
from pyraft.messages import VoteRequest, VoteResponse
from pyraft.network import Connection, Transport
from pyraft.transports.memory import MemoryNetwork
from pyraft.types import Node

pytestmark = pytest.mark.timeout(30)


def wait_until(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def echo(from_id, msg, reply):
    reply.reply(ClientResponse(True, [from_id, msg.body]))


@pytest.fixture
def net():
    n = MemoryNetwork(seed=7)
    yield n
    n.close()


def cluster(net, ids=(1, 2, 3), handler=echo):
    ts = {i: net.transport(i) for i in ids}
    for t in ts.values():
        t.start(handler)
    return ts


def roundtrip(conn, body, timeout=1.0):
    rid = conn.send(ClientRequest("echo", body))
    got = conn.recv(timeout)
    if got is None:
        return None
    assert got[0] == rid
    return got[1]


def test_request_reaches_handler_on_delivery_thread_and_reply_returns():
    with MemoryNetwork() as net:
        seen = queue.Queue()

        def handler(from_id, msg, reply):
            seen.put(threading.current_thread().name)
            echo(from_id, msg, reply)

        ts = cluster(net, handler=handler)
        assert isinstance(ts[1], Transport)
        c = ts[1].connect(2, Node("anything at all"))
        assert isinstance(c, Connection)
        assert roundtrip(c, "hi") == ClientResponse(True, [1, "hi"])
        assert seen.get(timeout=1) == "pyraft-memnet"


def test_pipelined_requests_keep_their_ids(net):
    ts = cluster(net)
    c = ts[1].connect(2, Node("x"))
    ids = [c.send(ClientRequest("echo", i)) for i in range(500)]
    got = {}
    while len(got) < 500:
        r = c.recv(2.0)
        assert r is not None
        got[r[0]] = r[1].body[1]
    assert [got[i] for i in ids] == list(range(500))


def test_reply_from_another_thread(net):
    pending = queue.Queue()
    ts = cluster(net, handler=lambda f, m, r: pending.put((m, r)))
    c = ts[1].connect(2, Node("x"))
    rid = c.send(VoteRequest(3, 1, None))

    def worker():
        m, r = pending.get(timeout=2)
        r.reply(VoteResponse(m.term, True))

    th = threading.Thread(target=worker)
    th.start()
    assert c.recv(2.0) == (rid, VoteResponse(3, True))
    th.join()


def test_send_of_a_value_the_wire_cannot_carry_raises(net):
    ts = cluster(net)
    c = ts[1].connect(2, Node("x"))
    with pytest.raises(CodecError):
        c.send(ClientRequest("echo", object()))


def test_recv_times_out(net):
    ts = cluster(net, handler=lambda f, m, r: None)  # never replies
    c = ts[1].connect(2, Node("x"))
    c.send(ClientRequest("echo", 1))
    t0 = time.monotonic()
    assert c.recv(0.1) is None
    assert 0.09 <= time.monotonic() - t0 < 1.0


def test_partition_cuts_between_groups_and_unlisted_nodes_form_a_group(net):
    ts = cluster(net, ids=(1, 2, 3, 4, 5))
    net.partition({1, 2}, {3})
    c12, c13, c45, c14 = (ts[a].connect(b, Node("x")) for a, b in ((1, 2), (1, 3), (4, 5), (1, 4)))
    assert roundtrip(c12, 1) is not None
    assert roundtrip(c45, 1) is not None  # 4 and 5 were named nowhere: one group
    assert roundtrip(c13, 1, timeout=0.05) is None
    assert roundtrip(c14, 1, timeout=0.05) is None
    assert net.stats["dropped_partition"] == 2
    assert ts[1].stats["dropped_partition"] == 2  # counted on the sender
    wait_until(lambda: ts[2].stats["delivered_requests"] == 1 and ts[1].stats.get("delivered_replies") == 1)
    assert not net.can_talk(3, 1) and net.can_talk(5, 4)
    net.heal()
    assert roundtrip(c13, 2) is not None
    # the earlier, dropped request never shows up late
    assert c13.recv(0.05) is None


def test_partition_rejects_a_node_in_two_groups(net):
    with pytest.raises(ValueError):
        net.partition({1, 2}, {2, 3})


def test_isolate_and_heal(net):
    ts = cluster(net)
    net.isolate(2)
    c12, c21, c13 = ts[1].connect(2, Node("x")), ts[2].connect(1, Node("x")), ts[1].connect(3, Node("x"))
    assert roundtrip(c12, 1, timeout=0.05) is None
    assert roundtrip(c21, 1, timeout=0.05) is None
    assert roundtrip(c13, 1) is not None
    net.heal()
    assert roundtrip(c12, 2) is not None
    assert roundtrip(c21, 2) is not None


def test_one_way_block_drops_only_that_direction(net):
    requests = []

    def handler(from_id, msg, reply):
        requests.append((from_id, msg.body))
        echo(from_id, msg, reply)

    ts = cluster(net, handler=handler)
    net.set_one_way(1, 2)
    c12, c21 = ts[1].connect(2, Node("x")), ts[2].connect(1, Node("x"))
    assert roundtrip(c12, "a", timeout=0.05) is None  # request 1->2 cut
    assert roundtrip(c21, "b", timeout=0.1) is None  # request 2->1 arrives, reply 1->2 is cut
    wait_until(lambda: requests == [(2, "b")], what="the request 2->1")
    net.set_one_way(1, 2, blocked=False)
    assert roundtrip(c12, "c") is not None


def test_a_message_in_flight_is_dropped_when_the_link_is_cut(net):
    ts = cluster(net)
    net.set_delay(0.2, 0.2)
    c = ts[1].connect(2, Node("x"))
    c.send(ClientRequest("echo", 1))
    net.partition({1}, {2})
    assert c.recv(0.4) is None
    wait_until(lambda: net.stats.get("dropped_partition", 0) == 1, what="the in-flight drop")
    assert net.stats.get("delivered_requests", 0) == 0


def test_loss(net):
    hits = []
    ts = cluster(net, handler=lambda f, m, r: hits.append(m.body))
    c = ts[1].connect(2, Node("x"))
    net.set_loss(1.0)
    for i in range(50):
        c.send(ClientRequest("echo", i))
    assert net.stats["dropped_loss"] == 50
    net.set_loss(0.5)
    for i in range(1000):
        c.send(ClientRequest("echo", i))
    wait_until(lambda: net.stats.get("delivered_requests", 0) + net.stats["dropped_loss"] == 1050)
    assert 350 <= len(hits) <= 650
    with pytest.raises(ValueError):
        net.set_loss(1.5)


def test_delay_postpones_both_legs_and_may_reorder(net):
    ts = cluster(net)
    c = ts[1].connect(2, Node("x"))
    net.set_delay(0.03, 0.03)
    t0 = time.monotonic()
    assert roundtrip(c, 1) is not None
    assert time.monotonic() - t0 >= 0.06
    net.set_delay(0.0, 0.05)
    ids = [c.send(ClientRequest("echo", i)) for i in range(200)]
    order = []
    while len(order) < 200:
        r = c.recv(2.0)
        assert r is not None
        order.append(r[0])
    assert sorted(order) == ids
    assert order != ids  # uniform random delays reorder (seeded)
    net.set_delay(0, 0)
    with pytest.raises(ValueError):
        net.set_delay(0.2, 0.1)


def test_unstarted_or_closed_target_drops_silently(net):
    a, b = net.transport(1), net.transport(2)
    a.start(echo)
    c = a.connect(2, Node("x"))
    assert roundtrip(c, 1, timeout=0.05) is None  # 2 is not started
    b.start(echo)
    assert roundtrip(c, 2) is not None
    b.close()
    assert roundtrip(c, 3, timeout=0.05) is None
    wait_until(lambda: net.stats.get("dropped_no_target") == 2, what="two drops")
    assert roundtrip(a.connect(9, Node("x")), 4, timeout=0.05) is None  # no such node at all
    wait_until(lambda: net.stats.get("dropped_no_target") == 3, what="the third drop")


def test_restart_a_node_by_making_a_new_transport(net):
    ts = cluster(net, ids=(1, 2))
    with pytest.raises(ValueError):
        net.transport(2)
    ts[2].close()
    b2 = net.transport(2)
    b2.start(lambda f, m, r: r.reply(ClientResponse(True, "new")))
    c = ts[1].connect(2, Node("x"))
    assert roundtrip(c, 1) == ClientResponse(True, "new")
    with pytest.raises(RaftError):
        b2.start(echo)


def test_cluster_name_mismatch_is_dropped(net):
    a = net.transport(1)
    b = net.transport(2, cluster_name="other")
    a.start(echo)
    b.start(echo)
    c = a.connect(2, Node("x"))
    assert roundtrip(c, 1, timeout=0.05) is None
    wait_until(lambda: net.stats.get("dropped_invalid") == 1, what="the drop")
    assert b.stats == {"dropped_invalid": 1}  # counted on the receiver
    assert a.stats == {"sends": 1}


def test_fault_filter(net):
    ts = cluster(net)
    dropped = []

    def f(direction, peer, msg):
        if direction == "reply" and msg.body[1] == "lose":
            dropped.append(peer)
            return True
        return False

    ts[2].set_fault_filter(f)
    c = ts[1].connect(2, Node("x"))
    assert roundtrip(c, "lose", timeout=0.05) is None
    assert roundtrip(c, "keep") is not None
    assert dropped == [1]
    ts[2].set_fault_filter(None)
    assert roundtrip(c, "lose") is not None


def test_a_raising_handler_does_not_stop_the_network(net):
    def handler(from_id, msg, reply):
        if msg.body == "boom":
            raise RuntimeError("boom")
        echo(from_id, msg, reply)

    ts = cluster(net, handler=handler)
    c = ts[1].connect(2, Node("x"))
    assert roundtrip(c, "boom", timeout=0.05) is None
    assert roundtrip(c, "ok") is not None


def pyraft_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("pyraft-")]


def test_close_leaves_no_thread_and_is_idempotent():
    net = MemoryNetwork()
    ts = cluster(net)
    c = ts[1].connect(2, Node("x"))
    assert roundtrip(c, 1) is not None
    assert "pyraft-memnet" in pyraft_threads()
    net.close()
    net.close()
    assert pyraft_threads() == []
    assert c.send(ClientRequest("echo", 2)) == 2  # dropped, no error
    assert c.recv(0.01) is None
    with pytest.raises(RaftError):
        net.transport(5)


def test_closing_every_transport_stops_the_thread_and_it_restarts_on_demand():
    net = MemoryNetwork()
    ts = cluster(net)
    assert roundtrip(ts[1].connect(2, Node("x")), 1) is not None
    for t in ts.values():
        t.close()
    assert pyraft_threads() == []
    ts = cluster(net, ids=(1, 2))
    assert roundtrip(ts[1].connect(2, Node("x")), 2) is not None
    net.close()
    assert pyraft_threads() == []


def test_wake_interrupts_recv_from_another_thread(net):
    ts = cluster(net, handler=lambda f, m, r: None)
    c = ts[1].connect(2, Node("x"))
    c.wake()  # before recv: the next recv returns at once
    t0 = time.monotonic()
    assert c.recv(5.0) is None
    assert time.monotonic() - t0 < 1.0
    threading.Timer(0.05, c.wake).start()
    t0 = time.monotonic()
    assert c.recv(5.0) is None
    assert time.monotonic() - t0 < 2.0


def test_requests_carry_the_senders_principal_and_authenticated_raft_rpcs_pass_only_as_their_own_id(net):
    from pyraft.network import TRUSTED, Principal
    seen = []
    server = net.transport(1)
    server.start(lambda f, m, r: (seen.append((f, type(m).__name__, r.principal)), r.reply(ClientResponse(True))))
    plain = net.transport(2)
    client = net.transport(3, principal=Principal("client", key="c" * 40))
    peer = net.transport(4, principal=Principal("peer", 4, "p" * 40))
    liar = net.transport(5, principal=Principal("peer", 6, "q" * 40))
    vote = VoteRequest(1, 9, None)
    for t in (plain, client, peer, liar):
        c = t.connect(1)
        c.send(ClientRequest("x"))
        c.send(vote)
    wait_until(lambda: len(seen) == 6, what="the requests that pass")
    assert sorted((f, kind, p.role) for f, kind, p in seen) == [
        (2, "ClientRequest", "admin"), (2, "VoteRequest", "admin"), (3, "ClientRequest", "client"),
        (4, "ClientRequest", "peer"), (4, "VoteRequest", "peer"), (5, "ClientRequest", "peer")]
    assert next(p for f, _k, p in seen if f == 2) is TRUSTED
    wait_until(lambda: server.stats.get("dropped_rpc_wrong_id") == 1, what="the lying peer's vote dropped")
    assert server.stats["dropped_rpc_not_peer"] == 1


def test_a_dying_delivery_thread_reports_to_every_open_transport(net, monkeypatch):
    failures = []
    ts = {i: net.transport(i) for i in (1, 2)}
    for i, t in ts.items():
        t.start(echo, on_failure=lambda reason, i=i: failures.append((i, reason)))
    monkeypatch.setattr(net, "_deliver_loop", lambda: (_ for _ in ()).throw(RuntimeError("a bug")))
    ts[2].connect(1).send(ClientRequest("x"))
    wait_until(lambda: len(failures) == 2, what="both owners told")
    assert sorted(i for i, _ in failures) == [1, 2] and "a bug" in failures[0][1]


def test_a_node_whose_memory_transport_fails_goes_fatal(monkeypatch):
    from pyraft import Config, Raft, ServerState
    from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
    net = MemoryNetwork()
    raft = Raft(1, Config(), net.transport(1), MemoryLogStore(), MemoryStateMachine())
    try:
        monkeypatch.setattr(net, "_deliver_loop", lambda: (_ for _ in ()).throw(RuntimeError("a bug")))
        net.transport(2).connect(1).send(ClientRequest("x"))
        raft.wait(10).state(ServerState.FATAL)
        assert "delivery thread failed" in raft.metrics().error
    finally:
        raft.shutdown()
        net.close()
