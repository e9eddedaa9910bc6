"""A watch position out of range is refused by ``kv.watch``, and one poll that cannot be read never fails others.

The history stores a revision in 8 bytes (a log index, at most 2**63 - 1) and
an event's sequence number within its revision (``sub``) in 4: a position
beyond those cannot be read.  The handler refuses it with a KVCommandError;
and whatever one poll's read raises, the hub answers that poll alone with the
error, the other polls waiting on the node are served as usual.
"""
from __future__ import annotations

import threading

import pytest

from pyraft import Config, Raft
from pyraft.codec import ClientRequest, ClientResponse
from pyraft.kv import KVClient, KVCommandError, KVStateMachine
from pyraft.kv.server import serve_kv
from pyraft.kv.watch import MAX_WATCH_REVISION, MAX_WATCH_SUB
from pyraft.stores.memory import MemoryLogStore
from pyraft.transports.memory import MemoryNetwork
from pyraft.transports.zmq import ZmqClient

from memcluster import wait_until
from test_kv_watch_hub import _poll, _put, _Reply, hub  # noqa: F401 - hub: fixture

pytestmark = pytest.mark.timeout(60)

CFG = Config(heartbeat_interval=0.05, election_timeout=(0.3, 0.6), rpc_timeout=0.5)


@pytest.fixture
def service(tmp_path):
    """The KV service of one (uninitialized) node over a KVStateMachine: its handlers, called directly."""
    sm = KVStateMachine(str(tmp_path / "kv"))
    net = MemoryNetwork()
    raft = Raft(1, CFG, net.transport(1), MemoryLogStore(), sm)
    svc = serve_kv(raft)
    yield sm, svc
    raft.shutdown()
    net.close()
    sm.close()


def _watch(svc, **body) -> _Reply:
    r = _Reply()
    svc.on_watch(0, ClientRequest("kv.watch", {"key": "w/", "prefix": True, **body}), r)
    return r


# ---------------------------------------------------------------------------------- the handler

@pytest.mark.timeout(60)
def test_out_of_range_watch_positions_are_refused_by_the_handler(service):
    _sm, svc = service
    bad_revisions = [2**63, 2**64, -1, 0, True, 1.0, "1"]
    bad_subs = [2**32, 2**64, -1, True, 1.0, "0"]
    for rev in bad_revisions:
        with pytest.raises(KVCommandError, match=rf"start_revision must be an integer in \[1, {MAX_WATCH_REVISION}\]"):
            _watch(svc, start_revision=rev, wait=0)
    for sub in bad_subs:
        with pytest.raises(KVCommandError, match=rf"sub must be an integer in \[0, {MAX_WATCH_SUB}\]"):
            _watch(svc, start_revision=1, sub=sub, wait=0)
    assert svc.watches.waiting == 0  # nothing reached the hub


@pytest.mark.timeout(60)
def test_the_largest_watch_positions_are_served_and_one_more_is_refused(service):
    sm, svc = service
    sm.apply([_put(1, "w/a", b"1")])
    for body in ({"start_revision": MAX_WATCH_REVISION},
                 {"start_revision": 1, "sub": MAX_WATCH_SUB},
                 {"start_revision": MAX_WATCH_REVISION, "sub": MAX_WATCH_SUB}):
        resp = _watch(svc, wait=0, **body).q.get(timeout=20)
        assert isinstance(resp, ClientResponse) and resp.ok, (body, resp)
        assert resp.body["events"] == []
        # Nothing there: the next poll goes on at that position, or at the head (revision 2) when it is behind.
        assert resp.body["next"] == list(max((body["start_revision"], body.get("sub", 0)), (2, 0)))
    with pytest.raises(KVCommandError, match="start_revision"):
        _watch(svc, start_revision=MAX_WATCH_REVISION + 1, wait=0)
    with pytest.raises(KVCommandError, match="sub"):
        _watch(svc, start_revision=1, sub=MAX_WATCH_SUB + 1, wait=0)


@pytest.mark.timeout(30)
def test_the_client_refuses_a_start_revision_the_server_refuses():
    kv = KVClient(["tcp://127.0.0.1:9"], timeout=1)  # nobody there: the check is before any call
    try:
        with pytest.raises(ValueError, match="start_revision"):
            kv.watch("a", start_revision=MAX_WATCH_REVISION + 1)
        # A revision the client takes is asked for at once (watch() raises Compacted for a compacted one).
        from pyraft.errors import Timeout
        with pytest.raises(Timeout, match="no member answered"):
            kv.watch("a", start_revision=MAX_WATCH_REVISION)
    finally:
        kv.close()


# ---------------------------------------------------------------------------------- the hub

@pytest.mark.timeout(60)
@pytest.mark.parametrize("revision, sub", [(1, 2**32), (2**64, 0)])
def test_a_poll_whose_read_fails_does_not_fail_a_waiting_poll(hub, revision, sub):
    sm, h = hub
    sm.apply([_put(1, "x/other", b"1")])
    honest, hr = _poll(2)
    h.submit(honest)
    wait_until(lambda: h.waiting == 1, 20, "the hub to hold the honest poll")
    bad, br = _poll(revision, sub, wait=0)  # bypasses the handler: the hub cannot read it; read at once
    h.submit(bad)
    resp = br.q.get(timeout=20)
    assert hr.q.empty(), hr.q.get()  # the honest poll was not answered with the other's error...
    assert h.waiting == 1  # ...it still waits
    assert not resp.ok and resp.error[0] == "RaftError" and "kv.watch" in resp.error[1], resp
    sm.apply([_put(2, "w/b", b"2")])
    resp = hr.q.get(timeout=20)
    assert resp.ok and [e[0] for e in resp.body["events"]] == [2], resp
    assert h.waiting == 0


@pytest.mark.timeout(60)
def test_a_failing_poll_read_with_others_in_one_pass_answers_each_on_its_own(hub):
    sm, h = hub
    sm.apply([_put(1, "w/a", b"1")])
    bad, _ = _poll(1, 2**32)
    before, _ = _poll(1)
    after, _ = _poll(1)
    done = dict((id(p), resp) for p, resp in h._serve([before, bad, after]))
    assert set(done) == {id(before), id(bad), id(after)}
    assert not done[id(bad)].ok and done[id(bad)].error[0] == "RaftError"
    for p in (before, after):
        assert done[id(p)].ok and [e[0] for e in done[id(p)].body["events"]] == [1]


# ---------------------------------------------------------------------------------- end to end

@pytest.mark.timeout(120)
def test_over_the_wire_a_bad_watch_is_refused_and_an_honest_watcher_is_served(tmp_path):
    from test_kv_client import ZmqCluster
    c = ZmqCluster(sm_factory=lambda i: KVStateMachine(tmp_path / f"n{i}"))
    try:
        lead = c.leader()
        addr = c.addrs[lead.node_id]
        got = {}

        def watcher():
            with ZmqClient(addr) as v:  # new events of "a", waiting up to 30 s
                got["r"] = v.call(ClientRequest("kv.watch", {"key": "a", "wait": 30.0}), 40)

        t = threading.Thread(target=watcher)
        t.start()
        with ZmqClient(addr) as s:
            wait_until(lambda: s.call(ClientRequest("kv.status", {}), 10).body["watchers"] == 1, 20,
                       "the honest poll to wait in the hub")
        with ZmqClient(addr) as a:
            # (2**64 and beyond are not even sent: msgpack carries integers up to 2**64 - 1)
            for body in ({"start_revision": 1, "sub": 2**32}, {"start_revision": 2**64 - 1},
                         {"start_revision": 2**63}, {"start_revision": 1, "sub": 2**64 - 1}):
                bad = a.call(ClientRequest("kv.watch", {"key": "a", **body}), 10)
                assert not bad.ok and bad.error[0] == "KVCommandError", (body, bad)
        with ZmqClient(addr) as w:
            assert w.call(ClientRequest("kv.write", {"op": "put", "key": "a", "value": 1}), 10).ok
        t.join(60)
        r = got["r"]
        assert isinstance(r, ClientResponse) and r.ok, r
        assert len(r.body["events"]) == 1
    finally:
        c.close()
