"""KVClient and serve_kv against in-process clusters: three Raft nodes on ZmqTransport over 127.0.0.1."""
from __future__ import annotations

import threading
import time

import pytest

from pyraft import Config, Node, Raft, ServerState
from pyraft.checker import HistoryRecorder, check_history
from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import RaftError, Timeout
from pyraft.kv import KVClient, KVCommandError, KVStateMachine
from pyraft.kv.server import serve_kv
from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
from pyraft.transports.zmq import ZmqClient, ZmqTransport

from memcluster import pyraft_threads, wait_until

pytestmark = pytest.mark.timeout(90)

CFG = Config(heartbeat_interval=0.05, election_timeout=(0.3, 0.6), rpc_timeout=0.5)


class ZmqCluster:
    """Nodes 1..n, each a Raft with a ZmqTransport on 127.0.0.1 (free port) serving the KV ops."""

    def __init__(self, n: int = 3, sm_factory=None) -> None:
        self.sm_factory = sm_factory or (lambda i: MemoryStateMachine())
        self.transports = {i: ZmqTransport(i, "tcp://127.0.0.1:*") for i in range(1, n + 1)}
        self.addrs = {i: t.endpoint for i, t in self.transports.items()}
        self.rafts: dict[int, Raft] = {}
        self.sms = {}
        for i, t in self.transports.items():
            sm = self.sm_factory(i)
            self.sms[i] = sm
            self.rafts[i] = Raft(i, CFG, t, MemoryLogStore(), sm)
            serve_kv(self.rafts[i])
        self.rafts[1].initialize({i: Node(a) for i, a in self.addrs.items()})

    def leader(self, timeout: float = 10.0, among=None) -> Raft:
        ids = list(among) if among is not None else list(self.rafts)

        def one():
            found = [i for i in ids if self.rafts[i].metrics().state == ServerState.LEADER]
            return self.rafts[found[0]] if len(found) == 1 else None

        return wait_until(one, timeout, f"one leader among {ids}")

    def follower(self) -> Raft:
        lead = self.leader()
        for r in self.rafts.values():
            # A follower hears of the leader (a heartbeat) before it has the membership entry.
            r.wait(10).metrics(lambda m: m.current_leader == lead.node_id and m.membership is not None
                               and lead.node_id in m.membership.nodes, "the leader and the membership")
        return next(r for r in self.rafts.values() if r.node_id != lead.node_id)

    def client(self, ids=None, **kw) -> KVClient:
        ids = ids or sorted(self.addrs)
        return KVClient([self.addrs[i] for i in ids], **kw)

    def close(self) -> None:
        for r in self.rafts.values():
            r.shutdown()
        for sm in self.sms.values():
            close = getattr(sm, "close", None)
            if close:
                close()


@pytest.fixture(params=["memory", "lmdb"])
def cluster(request, tmp_path):
    if request.param == "memory":
        c = ZmqCluster()
    else:
        c = ZmqCluster(sm_factory=lambda i: KVStateMachine(tmp_path / f"n{i}"))
    yield c
    c.close()
    assert pyraft_threads() == []


@pytest.fixture
def mcluster():
    c = ZmqCluster()
    yield c
    c.close()


def test_put_get_delete_cas(cluster):
    with cluster.client() as kv:
        assert kv.get("x") is None
        assert kv.put("x", 1) is None
        assert kv.get("x") == 1
        assert kv.cas("x", 1, 2) is True
        assert kv.cas("x", 1, 3) is False
        assert kv.get("x") == 2
        assert kv.delete("x") is True
        assert kv.delete("x") is False
        assert kv.get("x") is None
        assert kv.cas("x", None, "new") is True      # expected None: only if absent
        assert kv.cas("x", None, "newer") is False
        kv.put(("tuple", 1), {"a": [1, 2, b"\x00"]})
        assert kv.get(("tuple", 1)) == {"a": [1, 2, b"\x00"]}
        # a stale read from every node converges on the value
        for i in cluster.addrs:
            with KVClient([cluster.addrs[i]], timeout=5) as one:
                wait_until(lambda: one.get("x", stale=True) == "new", 5, f"node {i} to apply")


def test_a_refused_command_raises_kvcommanderror_at_once(mcluster):
    with mcluster.client(timeout=5) as kv:
        t0 = time.monotonic()
        with pytest.raises(KVCommandError):
            kv.put({"a": 1}, 1)  # maps are refused as keys
        with pytest.raises(KVCommandError):
            kv.get({"a": 1})
        assert time.monotonic() - t0 < 2
        kv.put("ok", 1)  # the session goes on after a refused write
        assert kv.get("ok") == 1


def test_a_follower_answers_forward_to_leader_with_the_leader_address(mcluster):
    f = mcluster.follower()
    lead = mcluster.leader()
    with ZmqClient(mcluster.addrs[f.node_id]) as raw:
        for req in (ClientRequest("kv.get", {"key": "x"}),
                    ClientRequest("kv.write", {"op": "put", "key": "x", "value": 1})):
            resp = raw.call(req, 5)
            assert isinstance(resp, ClientResponse) and not resp.ok
            name, _msg, leader_id, leader_addr = resp.error
            assert (name, leader_id, leader_addr) == ("ForwardToLeader", lead.node_id, mcluster.addrs[lead.node_id])
        # stale reads are served locally
        assert raw.call(ClientRequest("kv.get_stale", {"key": "x"}), 5) == ClientResponse(True, None)
        st = raw.call(ClientRequest("kv.status"), 5).body
        assert st["id"] == f.node_id and st["leader"] == lead.node_id and st["is_leader"] is False


def test_client_given_only_a_follower_follows_the_hint(mcluster):
    f = mcluster.follower()
    lead = mcluster.leader()
    with mcluster.client(ids=[f.node_id]) as kv:
        kv.put("k", "v")
        assert kv.get("k") == "v"
        assert kv.leader_address == mcluster.addrs[lead.node_id]


def _drop_first(kind: str, op_filter):
    """A fault filter that drops the first message of ``kind`` ("reply" or "request") matching ``op_filter``."""
    state = {"dropped": 0}
    lock = threading.Lock()

    def f(direction, peer, msg):
        if direction != kind or not op_filter(msg):
            return False
        with lock:
            if state["dropped"]:
                return False
            state["dropped"] += 1
            return True

    return f, state


def test_a_write_whose_reply_is_lost_is_retried_and_applied_once(mcluster):
    lead = mcluster.leader()
    with mcluster.client(attempt_timeout=0.5, timeout=10) as kv:
        kv.put("warm", 1)
        f, st = _drop_first("reply", lambda m: isinstance(m, ClientResponse) and m.ok and m.body is True)
        lead.transport.set_fault_filter(f)
        # A counter made of cas steps: a second application would answer False.
        assert kv.cas("counter", None, 1) is True
        assert st["dropped"] == 1
        for n in range(1, 6):
            assert kv.cas("counter", n, n + 1) is True
        lead.transport.set_fault_filter(None)
        assert kv.get("counter") == 6
    # The duplicate reached the log (the retry) but the state machine applied it once:
    # same state everywhere, and the counter moved exactly six times.
    last = lead.metrics().last_log_index
    for r in mcluster.rafts.values():
        r.wait(10).applied_index_at_least(last)
        assert r.state_machine.get("counter") == 6


def test_a_lost_request_is_retried(mcluster):
    lead = mcluster.leader()
    with mcluster.client(attempt_timeout=0.5, timeout=10) as kv:
        kv.put("warm", 1)
        f, st = _drop_first("request", lambda m: isinstance(m, ClientRequest) and m.op == "kv.write")
        lead.transport.set_fault_filter(f)
        assert kv.cas("c", None, 1) is True
        assert st["dropped"] == 1
        lead.transport.set_fault_filter(None)
        assert kv.get("c") == 1


def test_a_duplicate_session_write_returns_the_remembered_result(mcluster):
    lead = mcluster.leader()
    with ZmqClient(mcluster.addrs[lead.node_id]) as raw:
        cmd = {"op": "cas", "key": "d", "expected": None, "value": 1, "client": b"c" * 16, "seq": 1}
        first = raw.call(ClientRequest("kv.write", cmd), 5)
        again = raw.call(ClientRequest("kv.write", cmd), 5)
        assert first == again == ClientResponse(True, True)
        stale = raw.call(ClientRequest("kv.write", {**cmd, "seq": 0}), 5)
        assert not stale.ok and stale.error[0] == "KVCommandError"


def test_writes_go_on_across_a_leader_shutdown(mcluster):
    acked = {}
    with mcluster.client(timeout=10) as kv:
        for i in range(50):
            kv.put(f"k{i}", i)
            acked[f"k{i}"] = i
        old = mcluster.leader()
        old.shutdown()
        others = [i for i in mcluster.rafts if i != old.node_id]
        t0 = time.monotonic()
        for i in range(50, 100):
            kv.put(f"k{i}", i)
            acked[f"k{i}"] = i
        new = mcluster.leader(among=others)
        assert new.node_id != old.node_id
        assert time.monotonic() - t0 < 10
        for k, v in acked.items():
            assert kv.get(k) == v


def test_no_quorum_raises_timeout_within_the_timeout(mcluster):
    with mcluster.client(timeout=1.5) as kv:
        kv.put("a", 1)
        lead = mcluster.leader()
        for r in mcluster.rafts.values():
            if r is not lead:
                r.shutdown()
        for call in (lambda: kv.put("a", 2), lambda: kv.get("a"), lambda: kv.cas("a", 1, 3),
                     lambda: kv.put_async("a", 2).result(), lambda: kv.get_async("a").result(),
                     lambda: kv.cas_async("a", 1, 3).result()):
            t0 = time.monotonic()
            with pytest.raises(Timeout):
                call()
            assert time.monotonic() - t0 < 1.5 + 0.5


def test_an_unreachable_cluster_raises_timeout():
    from conftest import free_port
    with KVClient([f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.2:{free_port('127.0.0.2')}"],
                  timeout=0.8) as kv:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            kv.put("x", 1)
        assert time.monotonic() - t0 < 0.8 + 0.4


def test_many_threads_share_one_client(mcluster):
    n_threads, per = 8, 30
    errors = []
    with mcluster.client(timeout=20) as kv:
        kv.put("counter", 0)

        def worker(t):
            try:
                for i in range(per):
                    kv.put(f"t{t}-{i}", i)
                    while True:  # a cas increment loop: each thread adds exactly one per round
                        cur = kv.get("counter")
                        if kv.cas("counter", cur, cur + 1):
                            break
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert kv.get("counter") == n_threads * per
        assert all(kv.get(f"t{t}-{per - 1}") == per - 1 for t in range(n_threads))


def test_concurrent_history_through_a_leader_shutdown_is_linearizable(mcluster):
    rec = HistoryRecorder(definite_failure=lambda e: isinstance(e, KVCommandError))
    stop = threading.Event()
    errors = []
    with mcluster.client(timeout=5) as kv:
        def worker(c):
            import random
            rng = random.Random(c)
            try:
                while not stop.is_set():
                    k = f"r{rng.randrange(3)}"
                    kind = rng.choice(["put", "get", "cas"])
                    try:
                        if kind == "put":
                            v = rng.randrange(5)
                            rec.record(c, "put", k, (v,), lambda: kv.put(k, v))
                        elif kind == "get":
                            rec.record(c, "get", k, (), lambda: kv.get(k))
                        else:
                            e, n = rng.choice([None, 0, 1, 2, 3, 4]), rng.randrange(5)
                            rec.record(c, "cas", k, (e, n), lambda: kv.cas(k, e, n))
                    except Timeout:
                        pass
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(c,)) for c in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        mcluster.leader().shutdown()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    h = rec.history()
    assert len(h) > 50
    ok, info = check_history(h, timeout=60)
    assert ok is True, info.get("report")


def test_closed_client_refuses_calls(mcluster):
    kv = mcluster.client()
    kv.put("a", 1)
    kv.close()
    kv.close()
    with pytest.raises(RaftError):
        kv.get("a")
