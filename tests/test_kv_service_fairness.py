"""One client connection cannot starve the others of a node's watch slots or of its reads thread.

A node holds at most ``max_watchers`` waiting watch polls: when they are all
taken, a new poll takes the place of the oldest poll of the connection
holding the most, and that one is answered early (no events, its ``next``
position: its client polls again from there).  Ranges queue per connection
and the reads thread takes the connections in turn, so a range waits for at
most about one read per other connection.  And the count of one range walks
at most ``MAX_COUNT`` keys: past it, the reply says "at least"
(``count_exact`` False).

Clients here are raw connections of a MemoryNetwork transport (each
``connect`` is one connection, as a ZeroMQ DEALER is), which pipeline
requests without waiting for their replies; the count goes through
``KVClient`` on a ZeroMQ cluster.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import Overloaded
from pyraft.kv import KVStateMachine
from pyraft.kv.encoding import range_bounds
from pyraft.kv.server import serve_kv
from pyraft.kv.watch import WatchHub, WatchPoll
from pyraft.stores.memory import MemoryStateMachine

from memcluster import MemCluster, wait_until
from test_kv_coordination import lcluster  # noqa: F401 - the fixture (ZmqCluster on KVStateMachine)
from test_kv_watch_hub import _put

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def kvc():
    """A three-node MemCluster whose leader serves the KV ops; a client transport (node 90) to reach it."""
    c = MemCluster(3)
    lead = c.leader()
    client = c.net.transport(90)
    yield c, lead, client
    client.close()
    c.close()


def _send(conn, op: str, body: dict) -> None:
    conn.send(ClientRequest(op, body))


def _recv(conn, timeout: float = 10.0) -> ClientResponse:
    got = conn.recv(timeout)
    assert got is not None, "no reply in time"
    resp = got[1]
    assert isinstance(resp, ClientResponse)
    return resp


# ---------------------------------------------------------------------------------- watch slots

def test_one_connection_holding_every_watch_slot_does_not_lock_out_another(kvc):
    c, lead, client = kvc
    svc = serve_kv(lead, max_watchers=8)
    hog, victim = client.connect(lead.node_id), client.connect(lead.node_id)
    for _ in range(8):
        _send(hog, "kv.watch", {"key": "quiet", "wait": 30})
    wait_until(lambda: svc.watches.waiting == 8, 10, "the hog's polls to take every slot")
    _send(victim, "kv.watch", {"key": "v", "wait": 30})
    # The victim's poll is admitted: the hog's oldest poll ends at once, empty, with where to go on.
    early = _recv(hog)
    assert early.ok and early.body["events"] == [] and early.body["next"][0] >= 1
    assert hog.recv(0.2) is None  # one poll ended, the other seven still wait
    lid = lead.client_write({"op": "put", "key": "v", "value": 1}, timeout=10).log_id
    resp = _recv(victim)
    assert resp.ok, resp.error
    assert [rev for rev, _ev in resp.body["events"]] == [lid.index]


def test_a_full_hub_ends_the_oldest_poll_of_the_connection_holding_the_most(tmp_path):
    sm = KVStateMachine(str(tmp_path / "kv"))
    hub = WatchHub(sm, 1, max_waiting=4)
    start, stop = range_bounds("w/", None, True)
    answered: list[tuple[str, int, object]] = []
    lock = threading.Lock()

    class Reply:
        def __init__(self, connection: str, n: int) -> None:
            self.connection, self.n = connection, n

        def reply(self, resp) -> None:
            with lock:
                answered.append((self.connection, self.n, resp))

    def poll(connection: str, n: int) -> WatchPoll:
        return WatchPoll(start, stop, 1, 0, 100, time.monotonic() + 30, Reply(connection, n))

    try:
        for n in range(3):
            hub.submit(poll("a", n))
        hub.submit(poll("b", 0))
        hub.submit(poll("c", 0))  # full: a holds the most (3, c none), its oldest (0) ends
        wait_until(lambda: len(answered) == 1, 10, "a's oldest poll to end")
        assert answered[0][:2] == ("a", 0) and answered[0][2].ok and answered[0][2].body["events"] == []
        # a 2, b 1, c 1.  Nobody holds two more than b, and a poll never ends another of its
        # own connection: b's second poll, and a's re-poll, are refused; the hub is settled.
        with pytest.raises(Overloaded):
            hub.submit(poll("b", 1))
        with pytest.raises(Overloaded):
            hub.submit(poll("a", 3))
        # A new connection (none held) still takes a's oldest: a holds two more than it.
        hub.submit(poll("d", 0))
        wait_until(lambda: len(answered) == 2, 10, "a's next poll to end")
        assert answered[1][:2] == ("a", 1)
        # Now every connection holds one poll: a fifth connection is refused.
        with pytest.raises(Overloaded):
            hub.submit(poll("e", 0))
        assert hub.waiting == 4
        sm.apply([_put(1, "w/x", b"1")])  # the four waiting polls get the event
        wait_until(lambda: len(answered) == 6, 10, "the waiting polls to get the event")
        assert sorted((conn, n) for conn, n, _ in answered[2:]) == [("a", 2), ("b", 0), ("c", 0), ("d", 0)]
        assert all([rev for rev, _e in r.body["events"]] == [1] for _c, _n, r in answered[2:])
    finally:
        hub.stop()
        sm.close()


# ---------------------------------------------------------------------------------- reads

class _GatedSM:
    """The service's state machine, with views that wait for ``gate`` and record what they read."""

    def __init__(self, sm) -> None:
        self._sm = sm
        self.gate = threading.Event()
        self.reads: list[bytes] = []  # the start key of each scan or count, in the order read

    def __getattr__(self, name):
        return getattr(self._sm, name)

    @contextmanager
    def view(self):
        self.gate.wait(20)
        with self._sm.view() as v:
            yield _RecordingView(v, self.reads)


class _RecordingView:
    def __init__(self, v, reads: list[bytes]) -> None:
        self._v, self._reads = v, reads
        self.revision, self.history_start = v.revision, v.history_start

    def scan(self, start, stop):
        self._reads.append(start)
        return self._v.scan(start, stop)

    def count(self, start, stop):
        self._reads.append(start)
        return self._v.count(start, stop)


def test_a_connection_flooding_ranges_delays_another_by_about_one_read(kvc):
    c, lead, client = kvc
    svc = serve_kv(lead)
    svc.sm = gated = _GatedSM(svc.sm)
    flood, victim = client.connect(lead.node_id), client.connect(lead.node_id)
    n = 30
    for _ in range(n):  # the first is taken by the reads thread and waits at the gate
        _send(flood, "kv.range", {"key": "f/", "prefix": True, "count_only": True, "stale": True})
    wait_until(lambda: svc.reads._queued == n - 1, 10, "the flood to queue behind the read at the gate")
    _send(victim, "kv.range", {"key": "v", "stale": True})
    wait_until(lambda: svc.reads._queued == n, 10, "the victim's range to queue")
    gated.gate.set()
    assert _recv(victim).ok
    for _ in range(n):
        assert _recv(flood).ok
    mine = range_bounds("v")[0]
    assert gated.reads.count(mine) == 1 and len(gated.reads) == n + 1
    # The read at the gate, then at most one more of the flood (the connections take turns).
    assert gated.reads.index(mine) <= 2, gated.reads.index(mine)


# ---------------------------------------------------------------------------------- counts

def test_a_count_past_the_cap_says_at_least(lcluster):
    for r in lcluster.rafts.values():
        serve_kv(r).max_count = 50
    with lcluster.client(timeout=10) as kv:
        kv.txn([], [{"op": "put", "key": f"c/{i:03}", "value": i} for i in range(80)])
        kv.put("d/0", 0)
        assert kv.count("c/", prefix=True) == 50  # at least 50
        assert kv.count("c/000", "c/040") == 40  # within the cap: exact
        assert kv.count("", prefix=True) == 50  # every str key: LMDB's own count, cut at the cap
        r = kv.range("c/", prefix=True, limit=5)
        assert [x.key for x in r] == [f"c/{i:03}" for i in range(5)] and r.more
        assert r.count == 55 and not r.count_exact  # the 5 rows and at least 50 more
        r = kv.range("c/", prefix=True, limit=40)
        assert r.count == 80 and r.count_exact  # 40 past the rows: exact
        # The reply says so: count_exact False, and with count_only more True.
        raw = kv._call("kv.range", {"key": "c/", "prefix": True, "count_only": True}, write=False)
        assert (raw["count"], raw["more"], raw["count_exact"]) == (50, True, False)
        raw = kv._call("kv.range", {"key": "c/", "prefix": True, "limit": 40}, write=False)
        assert (raw["count"], raw["more"], raw["count_exact"]) == (80, True, True)
        raw = kv._call("kv.range", {"key": "d/", "prefix": True, "count_only": True}, write=False)
        assert (raw["count"], raw["more"], raw["count_exact"]) == (1, False, True)


@pytest.mark.parametrize("backend", ["lmdb", "memory"])
def test_count_keys_stops_at_the_cap_on_either_backend(tmp_path, backend):
    from pyraft.kv.reads import count_keys

    sm = KVStateMachine(str(tmp_path / "kv")) if backend == "lmdb" else MemoryStateMachine()
    try:
        sm.apply([_put(i + 1, f"k/{i:03}", b"x") for i in range(100)] + [_put(101, "l", b"y")])
        with sm.view() as v:
            everything = (b"", b"\xff")
            assert count_keys(v, *everything) == (101, True)
            assert count_keys(v, *everything, 101) == (101, True)
            assert count_keys(v, *everything, 100) == (100, False)
            assert count_keys(v, *range_bounds("k/", None, True), 30) == (30, False)
            assert count_keys(v, *range_bounds("k/", None, True), 100) == (100, True)
            assert count_keys(v, *range_bounds("k/010", "k/020"), 30) == (10, True)
            assert count_keys(v, *range_bounds("m", None, True), 30) == (0, True)
    finally:
        close = getattr(sm, "close", None)
        if close:
            close()
