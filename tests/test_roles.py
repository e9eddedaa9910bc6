"""Roles on the Raft handle: each client op needs a role, forged Raft RPCs are dropped.

In-process, on MemoryNetwork, whose transports can carry a test principal
(what a CURVE key gives on ZeroMQ: see test_zmq_roles.py for the keys).
"""
from __future__ import annotations

import pytest

from pyraft import Config, Node, Raft
from pyraft.admin_ops import serve_admin
from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import PermissionDenied
from pyraft.kv.server import serve_kv
from pyraft.messages import AppendEntriesRequest, VoteRequest
from pyraft.network import TRUSTED, Principal, raft_sender_refusal
from pyraft.objects import ObjectStateMachine, ReplCounter
from pyraft.stores.memory import MemoryLogStore
from pyraft.types import LogId

from memcluster import MemCluster, pyraft_threads, wait_until

pytestmark = pytest.mark.timeout(60)

READER = Principal("reader", key="r" * 40)
CLIENT = Principal("client", key="c" * 40)
ADMIN = Principal("admin", key="a" * 40)


def call(net, principal, target, op, body=None, *, sender=90, timeout=5.0):
    """Send one ClientRequest to node ``target`` from a transport that carries ``principal``."""
    t = net.transport(sender, principal=principal)
    try:
        conn = t.connect(target)
        rid = conn.send(ClientRequest(op, body))
        r = conn.recv(timeout)
        assert r is not None and r[0] == rid, f"no reply to {op}"
        conn.close()
        return r[1]
    finally:
        t.close()


def error_name(resp: ClientResponse) -> str | None:
    return None if resp.ok else resp.error[0]


@pytest.fixture
def kv_cluster():
    c = MemCluster(3)
    for r in c.rafts.values():
        serve_kv(r)
        serve_admin(r)
    yield c
    c.close()
    assert pyraft_threads() == []


def test_principal_rights_grow_reader_client_admin_and_a_peer_has_client_rights():
    order = {"reader": READER, "client": CLIENT, "admin": ADMIN, "peer": Principal("peer", 2, "p" * 40)}
    allowed = {"reader": {"reader"}, "client": {"reader", "client"}, "peer": {"reader", "client"},
               "admin": {"reader", "client", "admin"}}
    for name, p in order.items():
        assert {need for need in ("reader", "client", "admin") if p.allows(need)} == allowed[name]
    assert TRUSTED.allows("admin") and TRUSTED.key is None
    with pytest.raises(ValueError):
        Principal("root")
    with pytest.raises(ValueError):
        Principal("peer")  # a peer is a node: it needs its id
    with pytest.raises(ValueError):
        Principal("client", node_id=3)


def test_only_a_peer_sending_as_itself_may_carry_raft_rpcs():
    assert raft_sender_refusal(Principal("peer", 2, "p" * 40), 2) is None
    assert raft_sender_refusal(Principal("peer", 2, "p" * 40), 3) == "rpc_wrong_id"
    for p in (READER, CLIENT, ADMIN):
        assert raft_sender_refusal(p, 2) == "rpc_not_peer"


def test_set_client_handler_checks_the_role():
    with MemCluster(1) as c:
        r = c.rafts[1]
        with pytest.raises(ValueError, match="role"):
            r.set_client_handler("x", lambda *a: None, role="root")
        with pytest.raises(ValueError, match="built in"):
            r.set_client_handler("metrics", lambda *a: None, role="admin")


def test_each_role_gets_its_ops_and_permission_denied_beyond_them(kv_cluster):
    c = kv_cluster
    lead = c.leader().node_id
    lease = c.rafts[lead].client_write({"op": "lease_grant", "ttl": 60}, timeout=10).result
    ops = {  # op -> (body, the role it needs)
        "metrics": (None, "reader"),
        "kv.status": (None, "reader"),
        "kv.get_stale": ({"key": "k"}, "reader"),
        "kv.get": ({"key": "k"}, "reader"),
        "kv.range": ({"key": "", "prefix": True}, "reader"),
        "kv.watch": ({"key": "k", "start_revision": 1, "wait": 0}, "reader"),
        "kv.write": ({"op": "put", "key": "k", "value": 1}, "client"),
        "kv.lease_keepalive": ({"id": lease}, "client"),
        "admin.transfer_leader": ({"id": lead}, "admin"),  # to itself: answered at once
    }
    for principal in (READER, CLIENT, ADMIN, Principal("peer", 2, "p" * 40)):
        for op, (body, need) in ops.items():
            resp = call(c.net, principal, lead, op, body)
            if principal.allows(need):
                assert resp.ok, (principal.role, op, resp.error)
            else:
                assert error_name(resp) == "PermissionDenied", (principal.role, op, resp)
                assert need in resp.error[1] and principal.role in resp.error[1]
    # Nothing a reader sent was written; what the client and admin wrote was.
    assert c.rafts[lead].state_machine.get("k") == 1


def test_without_authentication_every_sender_is_trusted(kv_cluster):
    c = kv_cluster
    lead = c.leader().node_id
    resp = call(c.net, None, lead, "admin.transfer_leader", {"id": lead})
    assert resp.ok, resp.error


def test_forged_raft_rpcs_from_a_client_and_from_a_peer_claiming_another_id_are_dropped_and_counted(kv_cluster):
    c = kv_cluster
    leader = c.leader()
    lead = leader.node_id
    term = leader.metrics().current_term
    follower = next(i for i in c.rafts if i != lead)
    forged = [
        # a second leader in this term, and a term bump that would depose the leader
        AppendEntriesRequest(term, 3 if lead != 3 else 2, LogId(term, 1), (), 0),
        AppendEntriesRequest(term + 1, 3 if lead != 3 else 2, None, (), 0),
        VoteRequest(2**63 - 1, 3, LogId(2**62, 2**62), pre_vote=False, transfer=True),
    ]
    # From a client's key (its transport is node 90 on the network).
    t = c.net.transport(90, principal=CLIENT)
    conn = t.connect(follower)
    for m in forged:
        conn.send(m)
    wait_until(lambda: c.rafts[follower].metrics().counters.get("dropped_rpc_not_peer", 0) >= len(forged),
               5, "the follower to drop and count the forged RPCs")
    # With node 2's key, claiming to be another node (91: the network has one transport per id).
    t2 = c.net.transport(91, principal=Principal("peer", 2, "p" * 40))
    conn2 = t2.connect(follower)
    for m in forged:
        conn2.send(m)
    wait_until(lambda: c.rafts[follower].metrics().counters.get("dropped_rpc_wrong_id", 0) >= len(forged),
               5, "the follower to drop the RPCs of a peer claiming another id")
    for tr in (t, t2):
        tr.close()
    # Nothing moved: same leader, same term, and the cluster still commits.
    assert all(r.metrics().current_term == term for r in c.rafts.values())
    lid = leader.client_write({"op": "put", "key": "after", "value": 1}, timeout=10).log_id
    c.wait_applied(lid.index)
    assert leader.metrics().current_term == term and leader.is_leader()


def test_peers_forward_object_calls_with_client_rights_and_a_reader_key_fails_at_once():
    cfg = Config(heartbeat_interval=0.02, election_timeout=(0.1, 0.2), rpc_timeout=0.5)
    from pyraft.transports.memory import MemoryNetwork
    net = MemoryNetwork()
    objs = {i: ReplCounter() for i in (1, 2, 3)}
    sms = {i: ObjectStateMachine(objs[i]) for i in (1, 2, 3)}
    # Every node's transport carries its peer key, as under CURVE; node 3 was given a reader's key.
    principals = {1: Principal("peer", 1, "1" * 40), 2: Principal("peer", 2, "2" * 40), 3: READER}
    rafts = {}
    try:
        for i in (1, 2, 3):
            rafts[i] = Raft(i, cfg, net.transport(i, principal=principals[i]), MemoryLogStore(), sms[i])
            sms[i].attach(rafts[i])
        # Node 3 carries no peer key: its votes and heartbeats are dropped, so 1 or 2 leads.
        rafts[1].initialize({i: Node(f"mem://{i}") for i in (1, 2, 3)})
        leader = wait_until(lambda: next((r for r in rafts.values() if r.is_leader()), None), 10, "a leader")
        assert leader.node_id in (1, 2)
        other = 3 - leader.node_id
        rafts[other].wait(10).current_leader(leader.node_id)
        assert objs[other].inc(timeout=10) == 1  # forwarded to the leader with a peer's (client) rights
        rafts[3].wait(10).current_leader(leader.node_id)
        with pytest.raises(PermissionDenied):
            objs[3].inc(timeout=10)
    finally:
        for r in rafts.values():
            r.shutdown()
        for sm in sms.values():
            sm.close()
        net.close()
