"""The pipelined client and the server's batching: many calls in flight on one connection per node,
client writes proposed a burst at a time, replies sent a batch at a time."""
from __future__ import annotations

import random
import threading
import time

import pytest

from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import Timeout
from pyraft.transports.zmq import ZmqChannel, ZmqClient, ZmqTransport

from memcluster import pyraft_threads, wait_until
from test_kv_client import ZmqCluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def mcluster():
    c = ZmqCluster()
    yield c
    c.close()
    assert pyraft_threads() == []


def _run_threads(n, fn):
    errors = []

    def body(t):
        try:
            fn(t)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# ------------------------------------------------------------------ one connection, many calls

def test_many_threads_share_one_connection_per_node_and_each_call_gets_its_own_answer(mcluster):
    lead = mcluster.leader()
    before = set(threading.enumerate())
    with mcluster.client(timeout=20) as kv:
        def work(t):
            for i in range(20):
                kv.put(f"k{t}-{i}", [t, i])
                # Reads of other threads' keys are in flight at the same time on the same socket.
                assert kv.get(f"k{t}-{i}") == [t, i]
                assert kv.get(f"k{t}-{i}", stale=True) in (None, [t, i])

        assert _run_threads(32, work) == []
        # One DEALER per node the calls went to, whatever the number of threads.
        assert set(kv._chan._socks) <= set(mcluster.addrs.values())
        assert mcluster.addrs[lead.node_id] in kv._chan._socks
        # No thread of the client's own: the callers drove the sockets themselves.
        assert set(threading.enumerate()) == before


def test_the_channel_pipelines_requests_and_matches_replies_by_id(mcluster):
    """Raw channel against one node: 64 threads, 64 different keys read at once, each answer its own."""
    lead = mcluster.leader()
    addr = mcluster.addrs[lead.node_id]
    with mcluster.client() as kv:
        for t in range(64):
            kv.put(f"r{t}", t)
    with ZmqChannel() as ch:
        in_flight = [0]
        most = [0]
        lock = threading.Lock()

        def work(t):
            for _ in range(10):
                with lock:
                    in_flight[0] += 1
                    most[0] = max(most[0], in_flight[0])
                resp = ch.call(addr, ClientRequest("kv.get_stale", {"key": f"r{t}"}), 10)
                with lock:
                    in_flight[0] -= 1
                assert resp == ClientResponse(True, t)

        assert _run_threads(64, work) == []
        assert len(ch._socks) == 1
        assert most[0] > 1  # calls really overlapped on the one socket


def test_a_lone_caller_drives_the_socket_on_its_own_thread():
    """Without other callers no other thread is involved: the caller sends, polls and receives."""
    t = ZmqTransport(1, "tcp://127.0.0.1:*")
    served_by = []

    def handler(_from, msg, reply):
        served_by.append(threading.current_thread().name)
        reply.reply(ClientResponse(True, msg.body))

    t.start(handler)
    try:
        with ZmqChannel() as ch:
            before = set(threading.enumerate())
            for i in range(20):
                assert ch.call(t.endpoint, ClientRequest("echo", i), 5) == ClientResponse(True, i)
            assert set(threading.enumerate()) == before
    finally:
        t.close()


def test_a_call_times_out_alone_and_its_late_reply_is_dropped():
    t = ZmqTransport(1, "tcp://127.0.0.1:*")
    slow = threading.Event()

    def handler(_from, msg, reply):
        if msg.body == "slow":  # answered only later, from another thread
            threading.Timer(0.6, lambda: (reply.reply(ClientResponse(True, "late")), slow.set())).start()
        else:
            reply.reply(ClientResponse(True, msg.body))

    t.start(handler)
    try:
        with ZmqChannel() as ch:
            t0 = time.monotonic()
            with pytest.raises(Timeout):
                ch.call(t.endpoint, ClientRequest("x", "slow"), 0.3)
            assert time.monotonic() - t0 < 0.6
            slow.wait(5)
            # The late reply is not taken for the next call's.
            assert ch.call(t.endpoint, ClientRequest("x", "next"), 5) == ClientResponse(True, "next")
            assert ch._calls == {}
    finally:
        t.close()


def test_close_fails_the_calls_in_flight_at_once():
    t = ZmqTransport(1, "tcp://127.0.0.1:*")
    t.start(lambda _f, _m, _r: None)  # never answers
    try:
        ch = ZmqChannel()
        errors = []

        def call():
            try:
                ch.call(t.endpoint, ClientRequest("x", 1), 30)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=call) for _ in range(5)]
        for th in threads:
            th.start()
        wait_until(lambda: len(ch._calls) == 5, 5, "5 calls in flight")
        t0 = time.monotonic()
        ch.close()
        for th in threads:
            th.join(5)
        assert time.monotonic() - t0 < 3
        assert len(errors) == 5 and all("closed" in str(e) for e in errors)
        assert ch._socks == {}
    finally:
        t.close()


# ------------------------------------------------------------------ exactly-once with calls in flight

def test_lost_replies_of_concurrent_writes_are_retried_and_each_applied_once(mcluster):
    """Every thread steps its own counter with cas while the leader drops some write replies."""
    lead = mcluster.leader()
    n_threads, steps = 16, 15
    rng = random.Random(7)
    lock = threading.Lock()
    dropped = [0]

    def drop_some(direction, _peer, msg):
        if direction != "reply" or not (isinstance(msg, ClientResponse) and msg.body is True):
            return False
        with lock:
            if rng.random() < 0.15:
                dropped[0] += 1
                return True
        return False

    with mcluster.client(timeout=20, attempt_timeout=0.5) as kv:
        lead.transport.set_fault_filter(drop_some)

        def work(t):
            for n in range(steps):
                # A second application of a step would answer False: the session dedups it.
                assert kv.cas(f"c{t}", None if n == 0 else n, n + 1) is True

        errors = _run_threads(n_threads, work)
        lead.transport.set_fault_filter(None)
        assert errors == []
        assert dropped[0] > 0
        for t in range(n_threads):
            assert kv.get(f"c{t}") == steps
    last = lead.metrics().last_log_index
    for r in mcluster.rafts.values():
        r.wait(10).applied_index_at_least(last)
        assert all(r.state_machine.get(f"c{t}") == steps for t in range(n_threads))


def test_a_session_serves_one_write_at_a_time(mcluster):
    """Concurrent writes hold distinct sessions; a session's seq only grows."""
    with mcluster.client(timeout=20) as kv:
        seen = []
        lock = threading.Lock()
        real_attempts = kv._attempts

        def spy(a):
            if a.is_write:
                with lock:
                    seen.append((a.req.body["client"], a.req.body["seq"]))
            return real_attempts(a)

        kv._attempts = spy
        assert _run_threads(16, lambda t: [kv.put(f"s{t}-{i}", i) for i in range(10)]) == []
        by_client = {}
        for client, seq in seen:
            by_client.setdefault(client, []).append(seq)
        assert len(seen) == 160 and len(set(seen)) == 160  # no (client, seq) used twice
        assert 1 < len(by_client) <= 16  # as many sessions as writes ran at once, at most
        # (the order in `seen` is the order calls started: per session, strictly increasing)
        assert all(seqs == sorted(seqs) for seqs in by_client.values())


def test_calls_in_flight_go_on_through_a_leader_change(mcluster):
    old = mcluster.leader()
    acked = {}
    lock = threading.Lock()
    stop = threading.Event()
    with mcluster.client(timeout=15) as kv:
        kv.put("warm", 1)

        def work(t):
            n = 0
            while not stop.is_set() or n < 5:
                assert kv.cas(f"lc{t}", None if n == 0 else n, n + 1) is True
                n += 1
                with lock:
                    acked[f"lc{t}"] = n

        threads_done = []
        runner = threading.Thread(target=lambda: threads_done.extend(_run_threads(16, work)))
        runner.start()
        wait_until(lambda: len(acked) == 16, 20, "every thread to have written")
        old.shutdown()  # calls are in flight to it right now
        others = [i for i in mcluster.rafts if i != old.node_id]
        new = mcluster.leader(among=others)
        with lock:
            at_change = dict(acked)
        wait_until(lambda: all(acked[k] >= at_change[k] + 3 for k in at_change), 30,
                   "every thread to write through the new leader")
        stop.set()
        runner.join(60)
        assert threads_done == []
        assert new.node_id != old.node_id
        for k, n in acked.items():
            assert kv.get(k) == n  # each step applied exactly once: the counter is the count of acks


# ------------------------------------------------------------------ server batching

def _spy_inbox(core, kinds):
    real_call = core.call

    def spy(item):
        kinds.append((item[0], [sub[0] for sub in item[1]] if item[0] == "burst" else None))
        return real_call(item)

    core.call = spy
    return real_call


def _hold_first_request(transport):
    """Hold the server thread on the first client request until the others wait in its socket:
    they then reach the handler as bursts."""
    first = threading.Event()

    def hold_first(direction, _peer, msg):
        if direction == "request" and isinstance(msg, ClientRequest) and not first.is_set():
            first.set()
            time.sleep(0.5)
        return False

    transport.set_fault_filter(hold_first)


def test_a_burst_of_client_writes_is_proposed_as_one_inbox_item(mcluster):
    lead = mcluster.leader()
    core = lead._core
    kinds = []

    n = 200
    with ZmqClient(mcluster.addrs[lead.node_id]) as warm:
        assert warm.call(ClientRequest("kv.write", {"op": "put", "key": "w", "value": 0}), 5).ok
    real_call = _spy_inbox(core, kinds)
    _hold_first_request(lead.transport)
    try:
        with ZmqChannel() as ch:
            res = []
            errors = _run_threads(n, lambda t: res.append(ch.call(
                mcluster.addrs[lead.node_id], ClientRequest("kv.write", {"op": "put", "key": f"b{t}", "value": t}),
                20)))
    finally:
        core.call = real_call
        lead.transport.set_fault_filter(None)
    assert errors == [] and len(res) == n and all(r.ok for r in res)
    assert not [k for k in kinds if k[0] == "write"]  # every write came in a burst item
    bursts = [len(subs) for kind, subs in kinds if kind == "burst"]
    assert sum(bursts) == n
    # The requests that had piled up went a burst at a time (how many pile up in the
    # half second depends on the machine's load: bounds, not exact counts).
    assert max(bursts) >= 5 and len(bursts) <= n // 2, bursts
    for t in range(n):
        assert lead.state_machine.get(f"b{t}") == t


def test_reads_and_writes_that_arrive_together_reach_raftcore_together(mcluster):
    lead = mcluster.leader()
    addr = mcluster.addrs[lead.node_id]
    with mcluster.client() as kv:
        for t in range(100):
            kv.put(f"g{t}", t)
    kinds = []
    real_call = _spy_inbox(lead._core, kinds)
    _hold_first_request(lead.transport)
    try:
        with ZmqChannel() as ch:
            res = {}

            def work(t):
                if t % 4:
                    res[t] = ch.call(addr, ClientRequest("kv.get", {"key": f"g{t}"}), 20)
                else:
                    res[t] = ch.call(addr, ClientRequest("kv.write", {"op": "put", "key": f"g{t}", "value": -t}), 20)

            assert _run_threads(100, work) == []
    finally:
        lead._core.call = real_call
        lead.transport.set_fault_filter(None)
    for t in range(100):
        assert res[t].ok
        if t % 4:
            assert res[t].body == t  # a linearizable read of a key nobody writes now: its own value
    assert not [k for k in kinds if k[0] in ("read", "write")]  # all of them came in bursts
    subs = [sub for kind, subs in kinds if kind == "burst" for sub in subs]
    assert sorted(subs) == sorted(["read"] * 75 + ["write"] * 25)
    sizes = [len(subs) for kind, subs in kinds if kind == "burst"]
    assert max(sizes) >= 5 and len(sizes) <= 50, sizes


def test_a_handler_that_waits_for_its_write_or_read_inside_a_burst_does_not_deadlock(mcluster):
    lead = mcluster.leader()

    def blocking(_from, req, reply):  # handlers should not block; one that does still gets its answer
        r = lead.client_write({"op": "put", "key": req.body, "value": 1}, timeout=5)
        lead.ensure_linearizable(timeout=5)
        reply.reply(ClientResponse(True, r.log_id.index))

    lead.set_client_handler("test.blocking", blocking)
    with ZmqClient(mcluster.addrs[lead.node_id]) as raw:
        resp = raw.call(ClientRequest("test.blocking", "bk"), 10)
    assert resp.ok and lead.state_machine.get("bk") == 1


def test_replies_made_together_wake_the_server_thread_once():
    t = ZmqTransport(1, "tcp://127.0.0.1:*")
    replies = []
    got_all = threading.Event()

    def handler(_from, msg, reply):
        replies.append(reply)
        if len(replies) == 50:
            got_all.set()

    t.start(handler)
    wakes = [0]
    real_wake = t._wake

    def counting_wake():
        wakes[0] += 1
        real_wake()

    try:
        with ZmqChannel() as ch:
            out = []
            callers = [threading.Thread(target=lambda i=i: out.append(ch.call(t.endpoint, ClientRequest("x", i), 10)))
                       for i in range(50)]
            for c in callers:
                c.start()
            assert got_all.wait(10)
            t._wake = counting_wake
            with t.replies_held():
                for r in replies:
                    r.reply(ClientResponse(True, "ok"))
                assert wakes[0] == 0  # nothing sent yet: the server thread was not woken
            assert wakes[0] == 1
            for c in callers:
                c.join(10)
            assert len(out) == 50 and all(r == ClientResponse(True, "ok") for r in out)
    finally:
        t.close()


def test_kvclient_lone_writer_uses_no_extra_thread(mcluster):
    with mcluster.client() as kv:
        kv.put("a", 1)
        names = {t.name for t in threading.enumerate()}
        for i in range(10):
            kv.put("a", i)
        assert {t.name for t in threading.enumerate()} == names
