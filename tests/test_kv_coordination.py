"""Ranges, watches, leases, txns and the recipes through KVClient, on in-process three-node clusters.

Nodes are ``Raft`` objects on ZmqTransport over 127.0.0.1 (tests/test_kv_client.py's
ZmqCluster); a "leader change" shuts a node down.  The SIGKILL versions run
``pyraft-kv serve`` processes: tests/test_kv_coordination_procs.py.
"""
from __future__ import annotations

import threading
import time

import pytest

from pyraft.checker import HistoryRecorder, check_history
from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import Compacted, LeaseNotFound
from pyraft.kv import KVClient, KVCommandError, KVStateMachine
from pyraft.kv.recipes import Election, Lock, discover, register_service, watch_services
from pyraft.kv.server import serve_kv
from pyraft.stores.memory import MemoryStateMachine
from pyraft.transports.zmq import ZmqClient

from kvhistory import transfer_client
from memcluster import pyraft_threads, wait_until
from test_kv_client import ZmqCluster

pytestmark = pytest.mark.timeout(120)

#: The smallest lease the test clusters grant (three of CFG's longest election timeouts).
TTL = 1.8


@pytest.fixture
def mcluster():
    c = ZmqCluster()
    yield c
    c.close()
    assert pyraft_threads() == []


@pytest.fixture
def lcluster(tmp_path):
    c = ZmqCluster(sm_factory=lambda i: KVStateMachine(tmp_path / f"n{i}"))
    yield c
    c.close()
    assert pyraft_threads() == []


def node_of(c: ZmqCluster, addr: str) -> int:
    return next(i for i, a in c.addrs.items() if a == addr)


# ---------------------------------------------------------------------------------- ranges

def test_range_and_count_through_the_client(lcluster):
    with lcluster.client(timeout=10) as kv:
        for i in range(20):
            kv.put(f"user/{i:02}", {"n": i})
        kv.put("users", "not under user/")
        kv.put(("t", 1), 1)
        r = kv.range("user/", prefix=True)
        assert [x.key for x in r] == [f"user/{i:02}" for i in range(20)]
        assert r.count == 20 and not r.more and r.revision >= r[-1].mod_revision
        r = kv.range("user/", prefix=True, limit=5, keys_only=True)
        assert len(r) == 5 and r.count == 20 and r.more and all(x.value is None for x in r)
        assert [x.key for x in kv.range("user/05", "user/08")] == ["user/05", "user/06", "user/07"]
        assert kv.count("user/", prefix=True) == 20 and kv.count("", prefix=True) == 21
        assert kv.range(("t",), prefix=True)[0].key == ("t", 1)
        # linearizable: a range right after a write sees it, on any node asked
        kv.put("user/99", "last")
        assert kv.range("user/99")[0].value == "last"
        for i, addr in lcluster.addrs.items():
            with KVClient([addr], timeout=5) as one:
                wait_until(lambda: one.count("user/", prefix=True, stale=True) == 21, 5, f"node {i}")
        with pytest.raises(KVCommandError):
            kv.range(1, prefix=True)
        with pytest.raises(ValueError):
            kv.range("a", limit=-1)


# ---------------------------------------------------------------------------------- watches

def test_watch_streams_in_order_and_moves_to_another_node_without_loss_or_repeat(mcluster):
    n = 300
    with mcluster.client(timeout=15) as kv, mcluster.client(timeout=15) as wkv:
        kv.put("other", 0)
        start = kv.range("other").revision + 1
        w = wkv.watch("w/", prefix=True, start_revision=start)
        done = threading.Event()
        errors = []

        def writer():
            try:
                for i in range(n):
                    kv.put(f"w/{i % 7}", i)
                    if i % 50 == 0:
                        kv.put("elsewhere", i)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        got = []
        killed = None
        for ev in w:
            got.append(ev)
            if len(got) == n // 3 and killed is None:
                killed = node_of(mcluster, w._addr)  # the node serving the watch now
                mcluster.rafts[killed].shutdown()
            if len(got) == n:
                break
        w.close()
        t.join()
    assert not errors
    assert [e.value for e in got] == list(range(n))
    assert [e.key for e in got] == [f"w/{i % 7}" for i in range(n)]
    revs = [e.revision for e in got]
    assert revs == sorted(revs) and len(set(revs)) == n
    assert node_of(mcluster, w._addr) != killed


def test_watch_from_now_a_filtered_range_and_close_from_another_thread(mcluster):
    with mcluster.client(timeout=10) as kv:
        kv.put("a/1", "before")
        w = kv.watch("a/", end="a/5")
        kv.put("a/1", 1)
        kv.put("a/7", "outside")
        kv.delete("a/1")
        kv.put("a/4", 4)
        got = [next(w) for _ in range(3)]
        assert [(e.type, e.key, e.value) for e in got] == [("put", "a/1", 1), ("delete", "a/1", None),
                                                            ("put", "a/4", 4)]
        assert w.revision == got[-1].revision + 1
        closer = threading.Timer(0.3, w.close)
        closer.start()
        t0 = time.monotonic()
        assert list(w) == []  # blocks until closed from the other thread
        assert time.monotonic() - t0 < 3
        closer.join()


def test_a_compacted_start_revision_raises_compacted(tmp_path):
    c = ZmqCluster(sm_factory=lambda i: MemoryStateMachine(watch_history=10))
    try:
        with c.client(timeout=10) as kv:
            for i in range(30):
                kv.put("k", i)
            rev = kv.range("k").revision
            for i in c.addrs:  # every node has applied it all
                with KVClient([c.addrs[i]], timeout=5) as one:
                    wait_until(lambda: one.range("k", stale=True).revision >= rev, 5, f"node {i}")
            with pytest.raises(Compacted, match="compacted"):  # from watch() itself (DESIGN.md)
                kv.watch("k", start_revision=1)
            w = kv.watch("k", start_revision=rev)  # still in the window
            assert next(w).value == 29
            w.close()
    finally:
        c.close()


def test_compact_through_the_client_drops_every_members_history_before_it(mcluster):
    with mcluster.client(timeout=10) as kv:
        for i in range(5):
            kv.put("c", i)
        rev = kv.range("c")[0].mod_revision  # the last put's
        with pytest.raises(KVCommandError, match="in the future"):
            kv.compact(rev + 1000)
        for bad in (0, -1, True, 2**63, "3", None, 2.0):
            with pytest.raises(ValueError, match="revision"):
                kv.compact(bad)
        assert kv.compact(rev) is None
        assert kv.compact(rev - 2) is None  # already compacted further: nothing to do
        kv.put("c", "after")
        for addr in mcluster.addrs.values():
            with KVClient([addr], timeout=5) as one:
                wait_until(lambda: one.range("c", stale=True)[0].value == "after", 5, addr)
                with pytest.raises(Compacted):
                    one.watch("c", start_revision=rev - 1)
                w = one.watch("c", start_revision=rev)
                assert [next(w).value, next(w).value] == [4, "after"]
                w.close()
        assert kv.get("c") == "after"


def test_waiting_watch_polls_are_bounded_per_node(mcluster):
    lead = mcluster.leader()
    serve_kv(lead, max_watchers=2)
    addr = mcluster.addrs[lead.node_id]
    results = []

    def poll():
        with ZmqClient(addr) as raw:
            results.append(raw.call(ClientRequest("kv.watch", {"key": "quiet", "wait": 2.0}), 10))

    threads = [threading.Thread(target=poll) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert all(isinstance(r, ClientResponse) for r in results)
    refused = [r for r in results if not r.ok]
    assert [r.error[0] for r in refused] == ["Overloaded"]
    assert sum(1 for r in results if r.ok and r.body["events"] == []) == 2
    with ZmqClient(addr) as raw:
        r = raw.call(ClientRequest("kv.watch", {"key": "x", "limit": 0}), 5)
        assert not r.ok and r.error[0] == "KVCommandError"


# ---------------------------------------------------------------------------------- leases

def test_lease_expiry_deletes_exactly_the_attached_keys(lcluster):
    with lcluster.client(timeout=10) as kv:
        doomed = kv.lease_grant(TTL)
        kept = kv.lease(TTL)
        for i in range(3):
            kv.put(f"doomed/{i}", i, lease=doomed)
        kv.put("kept/0", 0, lease=kept.id)
        kv.put("plain", 1)
        kv.put("was-leased", 1, lease=doomed)
        kv.put("was-leased", 2)  # detached
        w = kv.watch("", prefix=True)
        t0 = time.monotonic()
        deletes = [next(w) for _ in range(3)]
        waited = time.monotonic() - t0
        w.close()
        assert {e.key for e in deletes} == {"doomed/0", "doomed/1", "doomed/2"}
        assert {e.type for e in deletes} == {"delete"} and len({e.revision for e in deletes}) == 1
        assert TTL * 0.8 < waited < TTL + 5
        assert {x.key for x in kv.range("", prefix=True)} == {"kept/0", "plain", "was-leased"}
        with pytest.raises(LeaseNotFound):
            kv.lease_keepalive(doomed)
        with pytest.raises(LeaseNotFound):
            kv.put("late", 1, lease=doomed)
        assert kept.alive
        kept.revoke()
        assert kv.get("kept/0") is None


def test_a_lease_kept_alive_survives_a_leader_change_and_expires_once_keepalives_stop(mcluster):
    with mcluster.client(timeout=10) as kv:
        with pytest.raises(KVCommandError, match="too short"):
            kv.lease_grant(0.5)
        lease = kv.lease(TTL)
        kv.put("eph", "alive", lease=lease.id)
        time.sleep(TTL)
        old = mcluster.leader()
        old.shutdown()
        mcluster.leader(among=[i for i in mcluster.rafts if i != old.node_id])
        # The new leader starts the lease's deadline when it takes over; the keepalives find it.
        time.sleep(2 * TTL)
        assert kv.get("eph") == "alive", "the lease expired while its keepalives succeeded"
        assert not lease.lost.is_set()
        lease.keepalive.stop()
        t0 = time.monotonic()
        wait_until(lambda: kv.get("eph") is None, TTL + 6, "the lease to expire after its keepalives stopped")
        assert time.monotonic() - t0 > TTL * 0.5
        with pytest.raises(LeaseNotFound):
            kv.lease_keepalive(lease.id)
        assert kv.lease_revoke(lease.id) is False


def test_lease_calls_and_the_keep_alive_helper(mcluster):
    with mcluster.client(timeout=10) as kv:
        lid = kv.lease_grant(TTL)
        assert kv.lease_keepalive(lid) == TTL
        ka = kv.keep_alive(lid, interval=0.3)
        time.sleep(TTL * 1.5)
        assert ka.alive and not ka.lost.is_set()
        assert kv.lease_revoke(lid) is True
        assert ka.lost.wait(5)  # it notices that the lease is gone
        assert not ka.alive
        ka.stop()
        with pytest.raises(LeaseNotFound):
            kv.keep_alive(lid)
        with pytest.raises(ValueError):
            kv.lease_grant(-1)


# ---------------------------------------------------------------------------------- txns

def test_concurrent_txn_transfers_are_atomic_and_linearizable_across_a_leader_shutdown(mcluster):
    accounts = [f"acct/{c}" for c in "abcd"]
    rec = HistoryRecorder(definite_failure=lambda e: isinstance(e, KVCommandError))
    stop = threading.Event()
    errors = []
    with mcluster.client(timeout=8) as kv:
        for a in accounts:
            rec.record("init", "put", a, (100,), lambda a=a: kv.put(a, 100))

        threads = [threading.Thread(target=transfer_client, args=(kv, rec, c, accounts, stop, errors))
                   for c in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        mcluster.leader().shutdown()
        time.sleep(2.5)
        stop.set()
        for t in threads:
            t.join()
        final = kv.range("acct/", prefix=True)
    assert not errors
    assert sum(x.value for x in final) == 400
    h = rec.history()
    txns = [o for o in h if o.op == "txn" and not o.indeterminate]
    assert len(txns) > 20 and any(o.result[0] for o in txns)
    ok, info = check_history(h, timeout=90)
    assert ok is True, info.get("report")


def test_txn_through_the_client(mcluster):
    with mcluster.client(timeout=10) as kv:
        r = kv.txn([{"key": "cfg", "target": "version", "op": "==", "value": 0}],
                   [{"op": "put", "key": "cfg", "value": {"v": 1}}, {"op": "get", "key": "cfg"},
                    {"op": "range", "key": "", "prefix": True}],
                   [{"op": "get", "key": "cfg"}])
        assert r.succeeded and r.responses[0] is None
        assert r.responses[1].value == {"v": 1} and r.responses[1].create_revision == r.revision
        assert [x.key for x in r.responses[2]] == ["cfg"]
        r2 = kv.txn([{"key": "cfg", "target": "version", "op": "==", "value": 0}], [],
                    [{"op": "get", "key": "cfg"}])
        assert not r2.succeeded and r2.responses[0].version == 1
        with pytest.raises(KVCommandError):
            kv.txn([{"key": {"map": 1}, "target": "version", "op": "==", "value": 0}], [])
        with pytest.raises(LeaseNotFound):
            kv.txn([], [{"op": "put", "key": "x", "value": 1, "lease": 12345}])
        assert kv.get("x") is None


# ---------------------------------------------------------------------------------- recipes

def test_the_lock_never_has_two_holders_and_its_tokens_grow(mcluster):
    holders = []
    inside = threading.Lock()  # taken without blocking by a holder: failing means two hold the lock
    tokens = []
    errors = []
    rounds = 4

    def contender(c):
        try:
            with KVClient(list(mcluster.addrs.values()), timeout=10) as kv:
                for _ in range(rounds):
                    lock = Lock(kv, "locks/job", ttl=TTL)
                    token = lock.acquire(timeout=60)
                    assert inside.acquire(blocking=False), "two holders at once"
                    holders.append(c)
                    tokens.append(token)
                    # A fenced write: only while the lock is still ours.
                    cur = kv.get("job/counter") or 0
                    assert kv.txn(lock.guard(), [{"op": "put", "key": "job/counter", "value": cur + 1}]).succeeded
                    time.sleep(0.02)
                    inside.release()
                    lock.release()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=contender, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(holders) == 4 * rounds
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    with mcluster.client() as kv:
        assert kv.get("job/counter") == 4 * rounds
        assert kv.range("locks/job/", prefix=True) == []


def test_a_dead_lock_holder_is_replaced_after_its_ttl_and_its_fenced_writes_fail(mcluster):
    with mcluster.client(timeout=10) as kv:
        dead = Lock(kv, "locks/x", ttl=TTL)
        old_token = dead.acquire()
        dead.lease.keepalive.stop()  # the holder "dies": its lease is no longer kept alive
        t0 = time.monotonic()
        with Lock(kv, "locks/x", ttl=TTL) as new_token:
            assert time.monotonic() - t0 > TTL * 0.8
            assert new_token > old_token
            assert not kv.txn(dead.guard(), [{"op": "put", "key": "fenced", "value": "stale"}]).succeeded
        assert kv.get("fenced") is None


def test_leader_election_with_a_lease(mcluster):
    with mcluster.client(timeout=10) as kv:
        a, b = Election(kv, "elect/db", ttl=TTL), Election(kv, "elect/db", ttl=TTL)
        rev_a = a.campaign("node-a")
        assert a.is_leader and a.leader().value == "node-a"
        won = []
        t = threading.Thread(target=lambda: won.append(b.campaign("node-b", timeout=30)))
        t.start()
        time.sleep(0.5)
        assert not won  # b waits while a leads
        assert a.proclaim("node-a v2") and a.leader().value == "node-a v2"
        a.resign()
        t.join()
        assert won and won[0] > rev_a and b.is_leader and b.leader().value == "node-b"
        assert not a.proclaim("too late")
        # b dies without resigning: its key goes with its lease, and a takes over.
        b.lease.keepalive.stop()
        assert a.campaign("node-a again", timeout=30) > won[0]
        assert a.leader().value == "node-a again"
        a.resign()


def test_service_registration_with_a_ttl(mcluster):
    with mcluster.client(timeout=10) as kv:
        r1 = register_service(kv, "api", "n1", {"addr": "10.0.0.1:80"}, ttl=TTL)
        r2 = register_service(kv, "api", "n2", {"addr": "10.0.0.2:80"}, ttl=TTL)
        register_service(kv, "db", "n9", "x", ttl=TTL)
        instances, rev = discover(kv, "api")
        assert instances == {"n1": {"addr": "10.0.0.1:80"}, "n2": {"addr": "10.0.0.2:80"}}
        w = watch_services(kv, "api", rev + 1)
        r1.stop()                      # a clean stop removes it at once
        r2.lease.keepalive.stop()      # a dead instance vanishes after its ttl
        got = [next(w), next(w)]
        w.close()
        assert [(e.type, e.key) for e in got] == [("delete", "services/api/n1"), ("delete", "services/api/n2")]
        assert discover(kv, "api")[0] == {}
        with pytest.raises(ValueError):
            register_service(kv, "a/b", "n", 1)


def test_the_election_and_lock_txns_keep_a_retry_answerable_whatever_the_value(tmp_path):
    """Their txn's result is what a retry gets back from the session, which keeps at most
    MAX_REMEMBERED_RESULT: reading the key's header, not its value, keeps a 5 KB campaign
    value from turning a retried campaign into ResultNotKept."""
    from pyraft.errors import ResultNotKept
    from pyraft.kv import KVStateMachine
    from pyraft.kv.recipes import Election, Lock
    from pyraft.types import Entry, EntryKind, LogId

    class Sent(Exception):
        pass

    sent: list = []

    class StubLease:
        id, alive = 1, True

        def revoke(self) -> None:
            pass

    class StubKV:
        def lease(self, ttl):
            return StubLease()

        def txn(self, compare, success, failure=()):
            sent.append({"op": "txn", "compare": list(compare), "success": list(success), "failure": list(failure)})
            raise Sent

    with pytest.raises(Sent):
        Election(StubKV(), "e", ttl=10).campaign(b"v" * 5000)
    with pytest.raises(Sent):
        Lock(StubKV(), "l", ttl=10).acquire()
    assert len(sent) == 2
    sm = KVStateMachine(tmp_path / "kv")
    try:
        index = 1
        assert sm.apply([Entry(LogId(1, index), EntryKind.NORMAL, {"op": "lease_grant", "ttl": 60})]) == [1]
        for seq, txn in enumerate(sent, 1):
            cmd = dict(txn, client="c", seq=seq)
            first, again = (sm.apply([Entry(LogId(1, index + k), EntryKind.NORMAL, cmd)])[0] for k in (1, 2))
            index += 2
            assert first[0] is True, first
            assert not isinstance(again, ResultNotKept) and again == first, again
    finally:
        sm.close()
