"""Roles bound to CURVE keys: the allow list's layout, who may do what, forged Raft traffic.

Three Raft nodes on ZmqTransport over 127.0.0.1 with CURVE, keys in the role
layout (peers/N.key, admins/, clients/, readers/), serving the KV and admin ops.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import time

import pytest
import zmq

from pyraft import Config, Node, Raft
from pyraft.admin_ops import serve_admin
from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import PermissionDenied, Timeout
from pyraft.kv import KVClient
from pyraft.kv.server import serve_kv
from pyraft.messages import AppendEntriesRequest, TimeoutNowRequest, VoteRequest
from pyraft.network import Principal
from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
from pyraft.transports.zmq import CurveConfig, TransportError, ZmqClient, ZmqTransport, generate_keys
from pyraft.types import LogId

from memcluster import pyraft_threads, wait_until

pytestmark = pytest.mark.timeout(90)

CFG = Config(heartbeat_interval=0.05, election_timeout=(0.3, 0.6), rpc_timeout=0.5)


class Keys:
    """keys/ (the allow list, by role) and private/NAME.key_secret."""

    def __init__(self, root):
        self.allowed = root / "keys"
        self.private = root / "private"
        for name in ("1", "2", "3"):
            self.add(name, "peers")
        self.add("ops", "admins")
        self.add("app", "clients")
        self.add("dash", "readers")

    def add(self, name, sub):
        pub, sec = generate_keys(self.private, name)
        (self.allowed / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(pub, self.allowed / sub / f"{name}.key")
        return sec

    def config(self, name):
        return CurveConfig(self.private / f"{name}.key_secret", allowed_keys_dir=self.allowed)

    def public(self, name):
        return zmq.auth.load_certificate(str(self.private / f"{name}.key"))[0].decode()


class CurveCluster:
    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.transports = {i: ZmqTransport(i, "tcp://127.0.0.1:*", curve=keys.config(str(i))) for i in (1, 2, 3)}
        self.addrs = {i: t.endpoint for i, t in self.transports.items()}
        self.rafts = {}
        for i, t in self.transports.items():
            r = Raft(i, CFG, t, MemoryLogStore(), MemoryStateMachine())
            serve_kv(r)
            serve_admin(r)
            self.rafts[i] = r
        self.rafts[1].initialize({i: Node(a) for i, a in self.addrs.items()})

    def leader(self) -> Raft:
        return wait_until(lambda: next((r for r in self.rafts.values() if r.is_leader()), None), 10, "a leader")

    def call(self, key_name, node_id, op, body=None, timeout=5.0):
        with ZmqClient(self.addrs[node_id], curve=self.keys.config(key_name),
                       server_key=self.keys.allowed / "peers" / f"{node_id}.key") as c:
            return c.call(ClientRequest(op, body), timeout)

    def close(self) -> None:
        for r in self.rafts.values():
            r.shutdown()


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path)


@pytest.fixture
def cluster(keys):
    c = CurveCluster(keys)
    yield c
    c.close()
    assert pyraft_threads() == []


def test_the_allow_list_gives_each_key_its_role(keys):
    p = keys.config("1").principals()
    assert p[keys.public("1")] == Principal("peer", 1, keys.public("1"))
    assert p[keys.public("3")].node_id == 3
    assert p[keys.public("ops")].role == "admin"
    assert p[keys.public("app")].role == "client"
    assert p[keys.public("dash")].role == "reader"
    assert len(p) == 6
    # Clients find node N's server key in peers/N.key.
    assert keys.config("app").server_key_for(2) == keys.public("2").encode()


def test_each_role_is_allowed_its_ops_and_denied_the_rest(cluster):
    lead = cluster.leader().node_id
    ops = {  # op -> (body, the role it needs)
        "metrics": (None, "reader"),
        "kv.status": (None, "reader"),
        "kv.get": ({"key": "k"}, "reader"),
        "kv.write": ({"op": "put", "key": "k", "value": "v"}, "client"),
        "admin.transfer_leader": ({"id": lead}, "admin"),
    }
    who = {"dash": "reader", "app": "client", "2": "peer", "ops": "admin"}
    for key_name, role in who.items():
        principal = Principal(role, 2 if role == "peer" else None, "x" * 40)
        for op, (body, need) in ops.items():
            resp = cluster.call(key_name, lead, op, body)
            assert isinstance(resp, ClientResponse)
            if principal.allows(need):
                assert resp.ok, (key_name, op, resp.error)
            else:
                assert not resp.ok and resp.error[0] == "PermissionDenied", (key_name, op, resp)


def test_kv_client_raises_permission_denied_at_once_not_timeout(cluster, keys):
    cluster.leader()
    addrs = {i: a for i, a in cluster.addrs.items()}
    with KVClient(addrs, timeout=20, curve=keys.config("app")) as kv:
        kv.put("k", "v")
    with KVClient(addrs, timeout=20, curve=keys.config("dash")) as reader:
        assert reader.get("k") == "v"
        t0 = time.monotonic()
        with pytest.raises(PermissionDenied, match="client"):
            reader.put("k", "reader's")
        assert time.monotonic() - t0 < 5  # no retry until the timeout
        # The futures' own connections use the same keys (each node's, by its id) and roles.
        assert reader.get_async("k").result(10) == "v"
        assert isinstance(reader.put_async("k", "reader's").exception(5), PermissionDenied)
    with KVClient(addrs, timeout=10, curve=keys.config("app")) as kv:
        assert kv.get("k") == "v"


def test_forged_raft_rpcs_are_dropped_counted_and_the_cluster_keeps_working(cluster, keys):
    leader = cluster.leader()
    lead = leader.node_id
    term = leader.metrics().current_term
    victim = next(i for i in (1, 2, 3) if i != lead)
    other = next(i for i in (1, 2, 3) if i not in (lead, victim))
    forged = [
        AppendEntriesRequest(term, other, LogId(term, 1), (), 0),  # a second leader in this term
        AppendEntriesRequest(term + 1, other, None, (), 0),  # a newer leader
        VoteRequest(2**63 - 1, other, LogId(2**62, 2**62), pre_vote=False, transfer=True),
        TimeoutNowRequest(term, lead),
    ]

    def send_all(sender_id, key_name):
        t = ZmqTransport(sender_id, None, curve=keys.config(key_name))
        try:
            conn = t.connect(victim, Node(cluster.addrs[victim]))
            for m in forged:
                conn.send(m)
            conn.recv(0.5)  # flushes what waited for the connection; no reply ever comes
            conn.close()
        finally:
            t.close()

    def counter(name):
        return cluster.rafts[victim].metrics().counters.get(name, 0)

    send_all(99, "app")  # a client's key
    send_all(lead, "app")  # a client's key, claiming to be the leader
    wait_until(lambda: counter("dropped_rpc_not_peer") >= 2 * len(forged), 10, "client-key RPCs dropped")
    send_all(other, "ops")  # an admin's key: no Raft RPCs either
    wait_until(lambda: counter("dropped_rpc_not_peer") >= 3 * len(forged), 10, "admin-key RPCs dropped")
    # Node `other`'s own key claiming to be the leader.
    send_all(lead, str(other))
    wait_until(lambda: counter("dropped_rpc_wrong_id") >= len(forged), 10, "a peer claiming another id dropped")
    assert counter("frames_dropped") >= 4 * len(forged)
    # The cluster did not notice: same leader, same term, and it still commits.
    assert {r.metrics().current_term for r in cluster.rafts.values()} == {term}
    assert leader.is_leader()
    lid = leader.client_write({"op": "put", "key": "after", "value": 1}, timeout=10).log_id
    for r in cluster.rafts.values():
        r.wait(10).applied_index_at_least(lid.index)
    assert leader.metrics().current_term == term


def test_the_flat_layout_still_loads_with_a_warning(tmp_path, caplog):
    keys, private = tmp_path / "keys", tmp_path / "private"
    keys.mkdir()
    for name in ("1", "2", "ops"):
        generate_keys(private, name)
        shutil.copy(private / f"{name}.key", keys / f"{name}.key")
    cfg = CurveConfig(private / "1.key_secret", allowed_keys_dir=keys)
    with caplog.at_level(logging.WARNING, logger="pyraft.transport"):
        p = cfg.principals()
    pub = {n: zmq.auth.load_certificate(str(keys / f"{n}.key"))[0].decode() for n in ("1", "2", "ops")}
    assert p[pub["2"]] == Principal("peer", 2, pub["2"])
    assert p[pub["ops"]].role == "client"  # an admin key in the flat layout has a client's rights
    assert "old flat layout" in caplog.text
    assert cfg.server_key_for(2) == pub["2"].encode()
    # A transport serves over it.
    t = ZmqTransport(1, "tcp://127.0.0.1:*", curve=cfg)
    try:
        seen = []
        t.start(lambda f, m, r: (seen.append(r.principal), r.reply(ClientResponse(True, None))))
        with ZmqClient(t.endpoint, curve=CurveConfig(private / "ops.key_secret"), server_key=keys / "1.key") as c:
            assert c.call(ClientRequest("x"), 5).ok
        assert seen[0].role == "client" and seen[0].key == pub["ops"]
    finally:
        t.close()


def test_a_bad_allow_list_is_a_clear_error(tmp_path):
    keys, private = tmp_path / "keys", tmp_path / "private"
    (keys / "peers").mkdir(parents=True)
    generate_keys(private, "n")
    shutil.copy(private / "n.key", keys / "peers" / "node-one.key")
    cfg = CurveConfig(private / "n.key_secret", allowed_keys_dir=keys)
    with pytest.raises(TransportError, match="named by its node id"):
        cfg.principals()
    with pytest.raises(TransportError, match="named by its node id"):
        ZmqTransport(1, "tcp://127.0.0.1:*", curve=cfg)
    os.unlink(keys / "peers" / "node-one.key")
    for sub in ("clients", "admins"):
        (keys / sub).mkdir()
        shutil.copy(private / "n.key", keys / sub / "n.key")
    with pytest.raises(TransportError, match="one key, one role"):
        cfg.principals()
    assert pyraft_threads() == []


def test_keys_added_or_removed_take_effect_without_restart(cluster, keys):
    lead = cluster.leader().node_id
    time.sleep(0.01)  # let the directories' mtimes tick over on coarse filesystems
    keys.add("late", "readers")
    resp = cluster.call("late", lead, "kv.status")
    assert resp.ok
    assert cluster.call("late", lead, "kv.write", {"op": "put", "key": "k", "value": 1}).error[0] == "PermissionDenied"
    # Removed: its open connection is refused within about a second.
    with ZmqClient(cluster.addrs[lead], curve=keys.config("app"),
                   server_key=keys.allowed / "peers" / f"{lead}.key") as c:
        assert c.call(ClientRequest("kv.status"), 5).ok
        os.unlink(keys.allowed / "clients" / "app.key")
        t = cluster.transports[lead]
        wait_until(lambda: _refused(c), 10, "the removed key to be refused")
        assert t.stats.get("dropped_unknown_key", 0) >= 1


def _refused(c: ZmqClient) -> bool:
    try:
        c.call(ClientRequest("kv.status"), 0.3)
        return False
    except Timeout:
        return True


def test_generate_keys_makes_the_secret_owner_only_from_the_start(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        # Were the secret written with the default mode and narrowed later, it would stay
        # readable here, where nothing can narrow it.
        monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
        pub, sec = generate_keys(tmp_path / "k", "n")
        assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644
        old_public = zmq.auth.load_certificate(pub)[0]
        pub2, sec2 = generate_keys(tmp_path / "k", "n", overwrite=True)
        assert stat.S_IMODE(os.stat(sec2).st_mode) == 0o600
        assert CurveConfig(sec2, public_key_file=pub2).keypair()[0] != old_public
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path / "k")) == ["n.key", "n.key_secret"]


def test_a_secret_readable_by_others_is_used_with_a_warning(tmp_path, caplog):
    _pub, sec = generate_keys(tmp_path, "n")
    with caplog.at_level(logging.WARNING, logger="pyraft.transport"):
        CurveConfig(sec).keypair()
    assert "can be read by other users" not in caplog.text
    os.chmod(sec, 0o640)
    with caplog.at_level(logging.WARNING, logger="pyraft.transport"):
        CurveConfig(sec).keypair()
    assert "can be read by other users" in caplog.text and "0640" in caplog.text
