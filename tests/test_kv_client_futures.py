"""KVClient's futures (put_async & co.): one thread keeps many calls in flight, with the blocking calls'
checks, retries, exactly-once writes and timeouts."""
from __future__ import annotations

import threading
import time

import pytest

from pyraft.checker import HistoryRecorder, check_history
from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import LeaseNotFound, RaftError, Timeout
from pyraft.kv import KVClient, KVCommandError

from fake_kv_node import FakeNode, down_address
from memcluster import pyraft_threads, wait_until
from test_kv_client import _drop_first
from test_kv_pipelining import mcluster  # noqa: F401  (the fixture: a cluster whose threads all stop)

pytestmark = pytest.mark.timeout(120)


def test_each_async_call_answers_what_its_blocking_twin_answers(mcluster):
    with mcluster.client(timeout=10) as kv:
        assert kv.put_async("a", 1).result() is None
        assert kv.get_async("a").result() == 1
        assert kv.get_async("a", stale=True).result() in (None, 1)
        assert kv.cas_async("a", 1, 2).result() is True
        assert kv.cas_async("a", 1, 3).result() is False
        assert kv.put_async("p/1", "x").result() is None
        assert kv.put_async("p/2", "y").result() is None
        r = kv.range_async("p/", prefix=True).result()
        assert [(x.key, x.value) for x in r] == [("p/1", "x"), ("p/2", "y")]
        assert r.revision == kv.range("p/", prefix=True).revision
        assert kv.count_async("p/", prefix=True).result() == 2
        t = kv.txn_async([{"key": "a", "target": "value", "op": "==", "value": 2}],
                         [{"op": "put", "key": "b", "value": 7}, {"op": "get", "key": "a"}]).result()
        assert t.succeeded and t.responses[0] is None and t.responses[1].value == 2
        assert kv.delete_async("a").result() is True
        assert kv.delete_async("a").result() is False
        assert kv.get("b") == 7
        # The futures' thread is the client's: close() stops it.
        assert "pyraft-kvclient-futures" in pyraft_threads()
    assert "pyraft-kvclient-futures" not in pyraft_threads()


def test_bad_arguments_raise_at_the_call_and_refusals_fail_the_future(mcluster):
    with mcluster.client(timeout=10) as kv:
        with pytest.raises(KVCommandError):
            kv.put_async({"a": 1}, 1)  # a key the store cannot hold: nothing is sent
        with pytest.raises(ValueError):
            kv.put_async("k", 1, lease=-1)
        with pytest.raises(ValueError):
            kv.range_async("k", limit=-1)
        # The state machine refuses: the blocking call raises, the future holds the same error.
        with pytest.raises(LeaseNotFound) as blocking:
            kv.put("k", 1, lease=4242)
        fut = kv.put_async("k", 1, lease=4242)
        assert type(fut.exception(10)) is type(blocking.value)
        assert fut.cancel() is False  # on its way: never cancelled


def test_one_thread_keeps_many_calls_in_flight_and_every_write_lands_once(mcluster):
    n = 2000
    with mcluster.client(timeout=20, max_in_flight=256) as kv:
        kv.put("warm", 0)
        peak = 0
        futs = []
        for i in range(n):
            futs.append(kv.put_async(f"k/{i:05d}", i))
            peak = max(peak, sum(not f.done() for f in futs[-300:]))
        assert all(f.result(20) is None for f in futs)
        assert peak > 1  # they were in flight together, not one after the other
        r = kv.range("k/", prefix=True)
        assert [x.value for x in r] == list(range(n))
        assert all(x.version == 1 for x in r)  # each applied once


def test_a_future_whose_reply_is_lost_is_retried_and_applied_once(mcluster):
    lead = mcluster.leader()
    with mcluster.client(attempt_timeout=0.5, timeout=10) as kv:
        kv.put("warm", 1)
        f, st = _drop_first("reply", lambda m: isinstance(m, ClientResponse) and m.ok and m.body is True)
        lead.transport.set_fault_filter(f)
        assert kv.cas_async("counter", None, 1).result() is True  # a second application would say False
        assert st["dropped"] == 1
        lead.transport.set_fault_filter(None)
        futs = [kv.cas_async("counter", n, n + 1) for n in range(1, 6)]
        # In flight together, they may apply in any order: those that found their value moved it.
        assert sum(f.result() for f in futs) >= 1
        assert kv.get("counter") in range(2, 7)


def test_a_lost_request_is_sent_again(mcluster):
    lead = mcluster.leader()
    with mcluster.client(attempt_timeout=0.5, timeout=10) as kv:
        kv.put("warm", 1)
        f, st = _drop_first("request", lambda m: isinstance(m, ClientRequest) and m.op == "kv.write")
        lead.transport.set_fault_filter(f)
        assert kv.cas_async("c", None, 1).result() is True
        assert st["dropped"] == 1


def test_futures_follow_the_leader_hint_and_go_on_through_a_leader_shutdown(mcluster):
    rec = HistoryRecorder(definite_failure=lambda e: isinstance(e, KVCommandError))
    old = mcluster.leader()
    follower = next(i for i in mcluster.rafts if i != old.node_id)
    errors = []
    with mcluster.client(timeout=10) as kv, mcluster.client([follower], timeout=10) as via_follower:
        assert via_follower.put_async("f", 1).result() is None  # ForwardToLeader, followed
        assert via_follower.leader_address == mcluster.addrs[old.node_id]
        acked = {}
        stop = threading.Event()

        def writer():
            i = 0
            try:
                while not stop.is_set():
                    batch = [(f"w{i + j}", i + j, kv.put_async(f"w{i + j}", i + j)) for j in range(50)]
                    for k, v, fut in batch:
                        try:
                            fut.result()
                            acked[k] = v
                        except Timeout:
                            pass
                    i += 50
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        def history(c):
            import random
            rng = random.Random(c)
            while not stop.is_set():
                k = f"r{rng.randrange(2)}"
                kind = rng.choice(["put", "get", "cas"])
                try:
                    if kind == "put":
                        v = rng.randrange(4)
                        rec.record(c, "put", k, (v,), lambda: kv.put_async(k, v).result())
                    elif kind == "get":
                        rec.record(c, "get", k, (), lambda: kv.get_async(k).result())
                    else:
                        e, n = rng.choice([None, 0, 1, 2, 3]), rng.randrange(4)
                        rec.record(c, "cas", k, (e, n), lambda: kv.cas_async(k, e, n).result())
                except Timeout:
                    pass

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=history, args=(c,))
                                                       for c in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(acked) >= 200, 15, "200 writes acknowledged")
        old.shutdown()
        mcluster.leader(among=[i for i in mcluster.rafts if i != old.node_id])
        before = len(acked)
        wait_until(lambda: len(acked) >= before + 200, 20, "200 more writes acknowledged after the leader left")
        stop.set()
        for t in threads:
            t.join()
        assert not errors
        for k, v in acked.items():
            assert kv.get_async(k).result() == v
    h = rec.history()
    assert len(h) > 20
    ok, info = check_history(h, timeout=60)
    assert ok is True, info.get("report")


def test_past_max_in_flight_the_next_call_waits_for_a_slot(mcluster):
    lead = mcluster.leader()
    sent = []  # the values of the writes the leader was sent (each attempt)
    lock = threading.Lock()

    def drop_writes(direction, peer, msg):
        if direction == "request" and isinstance(msg, ClientRequest) and msg.op == "kv.write":
            with lock:
                sent.append(msg.body.get("value"))
            return True
        return False

    with mcluster.client(timeout=30, attempt_timeout=0.2, max_in_flight=2) as kv:
        kv.put("a", 1)
        lead.transport.set_fault_filter(drop_writes)
        first = [kv.put_async("a", 2), kv.put_async("b", 3)]  # lost, and lost again on every retry
        third: list = []
        t = threading.Thread(target=lambda: third.append(kv.put_async("c", 4)))
        t.start()
        wait_until(lambda: sent.count(2) >= 3 and sent.count(3) >= 3, 20, "the first two retried")
        assert 4 not in sent and not third  # no slot: the third call waits, and nothing of it was sent
        lead.transport.set_fault_filter(None)
        t.join()
        assert [f.result() for f in first + third] == [None, None, None]
        assert kv.get("c") == 4
    with pytest.raises(ValueError):
        KVClient(["tcp://127.0.0.1:1"], max_in_flight=0)


def test_close_fails_the_calls_in_flight_and_refuses_new_ones(mcluster):
    kv = mcluster.client(timeout=30)
    kv.put("a", 1)
    for r in mcluster.rafts.values():
        if r is not mcluster.leader():
            r.shutdown()
    futs = [kv.put_async(f"x{i}", i) for i in range(10)]
    done = threading.Event()
    futs[0].add_done_callback(lambda f: done.set())
    kv.close()
    assert done.is_set()
    for f in futs:
        e = f.exception(0)
        assert isinstance(e, RaftError) and "closed" in str(e)
    with pytest.raises(RaftError):
        kv.put_async("a", 2)
    assert "pyraft-kvclient-futures" not in pyraft_threads()


# ------------------------------------------------------------------ careless callers (a fake node)

def _futures_threads():
    return [t for t in threading.enumerate() if t.name == "pyraft-kvclient-futures"]


@pytest.fixture
def node():
    def handler(op, body):
        if body.get("key") == "hold":
            return ("delay", 0.3, "held")
        if body.get("key") == "drop":
            return ("drop", None)
        return ("reply", body.get("key"))
    n = FakeNode(handler)
    yield n
    n.close()


class Boom(BaseException):
    """Like KeyboardInterrupt or SystemExit: not an Exception, so Future does not catch it from a callback."""


def test_a_call_made_in_a_callback_never_waits_for_a_slot(node):
    # Only the futures' thread frees slots: a callback that waited for one would stall every call.
    with KVClient([node.addr], timeout=3, attempt_timeout=1, max_in_flight=2) as kv:
        kv.get("warm")
        made = []
        a = kv.get_async("a")
        b = kv.get_async("hold")  # answered after 0.3 s
        a.add_done_callback(lambda _: made.extend([kv.get_async("c"), kv.get_async("d")]))
        t0 = time.monotonic()
        assert b.result(10) == "held"
        assert time.monotonic() - t0 < 1.5
        assert [f.result(10) for f in made] == ["c", "d"]


def test_a_callback_that_raises_past_exception_is_logged_and_the_thread_goes_on(node):
    with KVClient([node.addr], timeout=0.5, attempt_timeout=0.2) as kv:
        kv.get("warm")
        doomed = kv.get_async("drop")  # no reply: Timeout, delivered from a timer
        doomed.add_done_callback(lambda _: (_ for _ in ()).throw(Boom("from a callback")))
        ok = kv.get_async("a")
        assert isinstance(doomed.exception(5), Timeout)
        assert ok.result(5) == "a"
        assert kv.get_async("b").result(5) == "b"  # the same thread serves new calls
        assert len(_futures_threads()) == 1


def test_close_completes_every_future_even_when_callbacks_raise():
    kv = KVClient([down_address()], timeout=30, attempt_timeout=0.2)
    futs = [kv.get_async(f"k{i}") for i in range(5)]
    for f in futs:
        f.add_done_callback(lambda f: (_ for _ in ()).throw(Boom("callback")))
    kv.close()
    assert all(isinstance(f.exception(0), RaftError) for f in futs)
    assert not _futures_threads()


def test_every_close_returns_only_once_the_calls_are_failed():
    kv = KVClient([down_address()], timeout=30, attempt_timeout=0.2)
    futs = [kv.get_async(f"k{i}") for i in range(5)]
    slow_callback_ran = threading.Event()

    def slow(_):
        time.sleep(0.5)  # a slow (but legal) callback keeps the first close() busy
        slow_callback_ran.set()

    futs[0].add_done_callback(slow)
    t = threading.Thread(target=kv.close)
    t.start()
    wait_until(lambda: kv._closed, 5, "the first close() to start")
    kv.close()
    assert slow_callback_ran.is_set() and all(f.done() for f in futs)
    t.join()
    assert not _futures_threads()


def test_a_client_dropped_without_close_is_collected_and_its_thread_ends(node):
    import gc
    import weakref
    kv = KVClient([node.addr], timeout=2)
    assert kv.get_async("a").result(2) == "a"
    ref = weakref.ref(kv)
    del kv
    wait_until(lambda: gc.collect() is not None and ref() is None and not _futures_threads(), 10,
               "the client collected and its futures' thread ended")


def test_a_reply_of_the_wrong_shape_is_a_codec_error_not_a_crash_in_the_caller():
    # A node running other code, or one that lies: every call raises CodecError, blocking or not.
    from pyraft.errors import CodecError

    def handler(op, body):
        if op == "kv.write" and body.get("op") == "put":
            return ("reply", None)  # a put's reply is not read: it succeeds
        return ("reply", {"kvs": "garbage", "revision": "x", "next": 1, "events": 7, "count": None})

    n = FakeNode(handler)
    try:
        with KVClient([n.addr], timeout=2) as kv:
            kv.put("k", 1)
            calls = [
                lambda: kv.range("k", prefix=True),
                lambda: kv.range_async("k").result(5),
                lambda: kv.txn([], [{"op": "get", "key": "k"}]),
                lambda: kv.txn_async([], []).result(5),
                lambda: kv.lease_grant(10),
                lambda: kv.lease_keepalive(1),
                lambda: kv.watch("k"),
                lambda: kv.watch("k", start_revision=1),
                lambda: kv.count("k"),
                lambda: kv.count_async("k").result(5),
            ]
            for call in calls:
                with pytest.raises(CodecError, match="cannot read"):
                    call()
    finally:
        n.close()
