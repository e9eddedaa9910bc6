"""pyraft-admin against live clusters: in-process nodes on ZeroMQ serving the admin ops, and,
when ``pyraft-kv serve`` is installed, a cluster of node processes."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import free_port  # noqa: E402
from memcluster import MemCluster  # noqa: E402
from test_inspect import CFG, LmdbCluster, put, wait_until  # noqa: E402

from pyraft import Config, ServerState, admin_ops  # noqa: E402
from pyraft.codec import ClientRequest  # noqa: E402
from pyraft.errors import ForwardToLeader, RaftError  # noqa: E402
from pyraft.raft import raise_error_response  # noqa: E402
from pyraft.kv import KVStateMachine  # noqa: E402
from pyraft.stores.memory import MemoryLogStore  # noqa: E402
from pyraft.tools import admin as padmin  # noqa: E402
from pyraft.transports.zmq import CurveConfig, ZmqClient, generate_keys  # noqa: E402

pytestmark = pytest.mark.timeout(120)

NAME = CFG.cluster_name


def admin(*argv, node=None, extra=()) -> tuple[int, str, str]:
    """pyraft-admin in this process: (exit code, stdout, stderr)."""
    args = ([] if node is None else ["--node", node, "--cluster-name", NAME]) + list(extra) + [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = padmin.main(args)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def status(node: str, extra=()) -> dict:
    rc, out, err = admin("status", "--json", node=node, extra=extra)
    assert rc == 0, err
    return json.loads(out)


@pytest.fixture
def cluster(tmp_path):
    """Nodes 1-3 initialized as voters, node 4 running but not a member yet; all serve the admin ops."""
    c = LmdbCluster(tmp_path, ids=(1, 2, 3, 4), admin=True)
    try:
        c.initialize([1, 2, 3])
        yield c
    finally:
        c.close()
    # Every node thread, admin worker and status helper is gone.
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("pyraft-")], 10,
               "no pyraft- threads left")


def follower_of(c: LmdbCluster) -> int:
    leader = c.leader().node_id
    return next(i for i in (1, 2, 3) if i != leader and i in c.rafts)


# ---------------------------------------------------------------------------
# status

def test_status_json_has_the_contract_fields_and_every_member(cluster):
    cluster.write([put("a", 1)])
    cluster.wait_applied_everywhere()
    f = follower_of(cluster)
    st = status(cluster.addrs[f])
    for k in ("id", "state", "current_term", "current_leader", "last_log_index", "committed", "last_applied"):
        assert k in st
    assert st["id"] == f and st["state"] == "Follower"
    leader = cluster.leader().node_id
    assert st["current_leader"] == leader and st["leader"]["id"] == leader
    members = {m["id"]: m for m in st["members"]}
    assert set(members) == {1, 2, 3}
    assert all(m["reachable"] and m["voter"] for m in members.values())
    assert [m["state"] for m in members.values()].count("Leader") == 1
    assert members[leader]["lag"] == 0
    wait_until(lambda: all(m["lag"] == 0 for m in status(cluster.addrs[f])["members"]), 10, "no lag")
    assert {m["address"] for m in members.values()} == {cluster.addrs[i] for i in (1, 2, 3)}


def test_status_table_and_an_unreachable_member(cluster):
    f = follower_of(cluster)
    cluster.stop(f)
    other = next(i for i in (1, 2, 3) if i != f and i in cluster.rafts)
    rc, out, err = admin("status", node=cluster.addrs[other], extra=["--connect-timeout", "0.5"])
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:3] == ["ID", "ADDRESS", "ROLE"]
    row = next(l for l in lines[2:] if l.split()[0] == str(f))
    assert row.split()[-1] == "NO"
    assert sum(1 for l in lines[2:5] if l.split()[-1] == "yes") == 2
    st = status(cluster.addrs[other], extra=["--connect-timeout", "0.5"])
    down = next(m for m in st["members"] if m["id"] == f)
    assert not down["reachable"] and "error" in down


def test_an_unreachable_node_exits_2_quickly(tmp_path):
    t0 = time.monotonic()
    rc, _, err = admin("status", node=f"tcp://127.0.0.1:{free_port()}", extra=["--connect-timeout", "0.5"])
    assert rc == 2 and "unreachable" in err
    rc, _, err = admin("transfer-leader", "2", node=f"tcp://127.0.0.1:{free_port()}",
                       extra=["--connect-timeout", "0.5"])
    assert rc == 2
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------------------
# membership changes, through a follower (the tool follows the leader hint)

def test_add_learner_change_membership_and_remove(cluster):
    f = follower_of(cluster)
    via = cluster.addrs[f]
    rc, out, err = admin("add-learner", 4, cluster.addrs[4], node=via)
    assert rc == 0, err
    assert "node 4" in out and "learner" in out
    st = status(via)
    m4 = next(m for m in st["members"] if m["id"] == 4)
    assert m4["learner"] and not m4["voter"] and m4["reachable"] and m4["state"] == "Learner"

    rc, out, err = admin("change-membership", "1,2,4", "--json", node=via)
    assert rc == 0, err
    assert json.loads(out)["membership"]["voters"] == [1, 2, 4]
    wait_until(lambda: status(cluster.addrs[4])["membership"]["voters"] == [1, 2, 4], 10, "node 4 sees the change")
    st = status(cluster.addrs[4])
    assert {m["id"] for m in st["members"]} == {1, 2, 4}  # 3 left (not retained)
    assert all(m["voter"] for m in st["members"])

    victim = next(i for i in (1, 2) if i != cluster.leader().node_id)
    rc, out, err = admin("remove", victim, node=cluster.addrs[4])
    assert rc == 0, err
    st = status(cluster.addrs[4])
    assert st["membership"]["voters"] == sorted({1, 2, 4} - {victim})
    assert victim not in {m["id"] for m in st["members"]}


def test_a_stale_leader_hint_is_followed_to_the_new_leader(cluster):
    old = cluster.leader().node_id
    via = follower_of(cluster)
    cluster.stop(old)  # the follower still names it as leader for an election timeout
    rc, out, err = admin("add-learner", 4, cluster.addrs[4], node=cluster.addrs[via],
                         extra=["--connect-timeout", "0.5", "--timeout", "20"])
    assert rc == 0, err
    st = status(cluster.addrs[via], extra=["--connect-timeout", "0.5"])
    assert st["leader"]["id"] != old and 4 in st["membership"]["learners"]


def test_refused_changes_exit_1_with_the_reason(cluster):
    via = cluster.addrs[follower_of(cluster)]
    rc, _, err = admin("change-membership", "1,2,9", node=via)
    assert rc == 1 and "ChangeMembershipError" in err and "learners" in err
    rc, _, err = admin("remove", 9, node=via)
    assert rc == 1 and "not a member" in err
    assert admin("add-learner", 4, cluster.addrs[4], node=via)[0] == 0
    rc, _, err = admin("transfer-leader", 4, node=via)
    assert rc == 1 and "not a voter" in err
    rc, _, err = admin("remove-learner", 1, node=via)
    assert rc == 1 and "is a voter" in err
    # `remove` takes a learner as well as a voter (docs/operations.md)
    rc, _, err = admin("remove", 4, node=via)
    assert rc == 0, err


def test_usage_errors_exit_2():
    assert admin("status")[0] == 2  # no --node
    assert admin("change-membership", "1,x", node="tcp://127.0.0.1:1")[0] == 2
    assert admin("frobnicate", node="tcp://127.0.0.1:1")[0] == 2
    assert admin("status", node="tcp://127.0.0.1:1", extra=["--curve-server-key", "x"])[0] == 2


# ---------------------------------------------------------------------------
# leadership, snapshots, purging

def test_transfer_leader(cluster):
    old = cluster.leader().node_id
    target = follower_of(cluster)
    rc, out, err = admin("transfer-leader", target, "--json", node=cluster.addrs[old])
    assert rc == 0, err
    r = json.loads(out)
    assert r["leader"] == target
    st = status(cluster.addrs[old])
    assert st["leader"]["id"] == target and st["current_leader"] == target
    assert next(m for m in st["members"] if m["id"] == target)["state"] == "Leader"


def test_snapshot_then_purge_log(cluster):
    cluster.write([put(f"k{i}", i) for i in range(50)])
    last = cluster.wait_applied_everywhere()
    f = follower_of(cluster)
    via = cluster.addrs[f]
    rc, _, err = admin("purge-log", 10, node=via)  # no snapshot yet: nothing can go
    assert rc == 1 and "nothing purged" in (_ + err)
    rc, out, err = admin("snapshot", "--json", node=via)
    assert rc == 0, err
    r = json.loads(out)
    assert r["id"] == f and r["snapshot"][1] >= last
    rc, out, err = admin("purge-log", 10, node=via)
    assert rc == 0, err
    assert "purged up to" in out
    st = status(via)
    assert st["purged"][1] >= 10 and st["snapshot"][1] >= last
    assert cluster.rafts[f].metrics().purged.index >= 10


# ---------------------------------------------------------------------------
# The server side directly

def test_admin_ops_answer_forward_to_leader_and_reject_bad_bodies(cluster):
    f = follower_of(cluster)
    leader = cluster.leader().node_id
    with ZmqClient(cluster.addrs[f], NAME, timeout=5) as c:
        resp = c.call(ClientRequest("admin.transfer_leader", {"id": leader}))
        assert not resp.ok
        with pytest.raises(ForwardToLeader) as ei:
            raise_error_response(resp)
        assert ei.value.leader_id == leader and ei.value.leader_node.addr == cluster.addrs[leader]
        for op, body in [("admin.purge_log", {"index": -1}), ("admin.snapshot", [1]),
                         ("admin.purge_log", {"index": 1, "timeout": "soon"})]:
            resp = c.call(ClientRequest(op, body))
            assert not resp.ok and resp.error[0] == "RaftError", resp  # not the server's private class
            with pytest.raises(RaftError):
                raise_error_response(resp)
    assert cluster.rafts[f].metrics().state == ServerState.FOLLOWER  # nothing broke


# ---------------------------------------------------------------------------
# CURVE

def test_keygen_and_status_over_curve(tmp_path):
    keys, private = tmp_path / "keys", tmp_path / "private"
    for d in ("peers", "admins", "clients"):
        (keys / d).mkdir(parents=True)
    for i in (1, 2, 3):
        generate_keys(private, str(i))
        shutil.copy(private / f"{i}.key", keys / "peers" / f"{i}.key")
    rc, out, err = admin("keygen", private, "--name", "ops")
    assert rc == 0 and "ops.key_secret" in out, err
    assert admin("keygen", private, "--name", "ops")[0] == 1  # exists
    assert admin("keygen", private, "--name", "ops", "--force")[0] == 0
    shutil.copy(private / "ops.key", keys / "admins" / "ops.key")  # allow the tool in, as an admin
    generate_keys(private, "app")
    shutil.copy(private / "app.key", keys / "clients" / "app.key")

    # One CurveConfig per node: its own secret, everyone in keys/ allowed.
    class CurveCluster(LmdbCluster):
        def start(self, i):
            self.transport_kw = {"curve": CurveConfig(secret_key_file=private / f"{i}.key_secret",
                                                      allowed_keys_dir=keys)}
            return super().start(i)

    c = CurveCluster(tmp_path / "data", admin=True)
    try:
        c.initialize()
        curve = ["--curve-secret", str(private / "ops.key_secret"), "--curve-public", str(private / "ops.key"),
                 "--curve-keys-dir", str(keys)]
        server_key = ["--curve-server-key", str(keys / "peers" / "1.key")]
        st = status(c.addrs[1], extra=curve + server_key)
        assert {m["id"] for m in st["members"] if m["reachable"]} == {1, 2, 3}
        leader = c.leader().node_id
        target = next(i for i in (1, 2, 3) if i != leader)
        # A client key sees the status but may not change the cluster.
        app = ["--curve-secret", str(private / "app.key_secret"), "--curve-keys-dir", str(keys)]
        assert status(c.addrs[1], extra=app + server_key)["id"] == 1
        rc, _, err = admin("transfer-leader", target, node=c.addrs[1], extra=app + server_key)
        assert rc == 1 and "PermissionDenied" in err and "admin" in err, err
        rc, _, err = admin("transfer-leader", target, node=c.addrs[1], extra=curve + server_key)
        assert rc == 0, err
        # Without keys the node does not talk to us: unreachable.
        rc, _, err = admin("status", node=c.addrs[1], extra=["--connect-timeout", "0.5"])
        assert rc == 2 and "unreachable" in err
        # A key the cluster does not allow: unreachable too.
        generate_keys(tmp_path / "stranger", "x")
        rc, _, _ = admin("status", node=c.addrs[1],
                         extra=["--connect-timeout", "0.5", "--curve-secret", str(tmp_path / "stranger" / "x.key_secret"),
                                "--curve-server-key", str(keys / "peers" / "1.key")])
        assert rc == 2
    finally:
        c.close()


# ---------------------------------------------------------------------------
# The console script against node processes (pyraft-kv serve), when it exists

def _kv_serve_available() -> bool:
    return shutil.which("pyraft-kv") is not None or os.path.exists(
        os.path.join(os.path.dirname(sys.executable), "pyraft-kv"))


def _script(name: str) -> str:
    return shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)


@pytest.mark.slow
@pytest.mark.skipif(not _kv_serve_available(), reason="pyraft-kv is not installed yet")
def test_admin_against_a_three_process_cluster(tmp_path):
    ports = {i: free_port() for i in (1, 2, 3, 4)}
    addr = {i: f"tcp://127.0.0.1:{p}" for i, p in ports.items()}
    peers = ",".join(f"{i}={addr[i]}" for i in (1, 2, 3))
    procs: dict[int, subprocess.Popen] = {}

    def serve(i: int, init: bool = False, peer_list: str = peers) -> None:
        cmd = [_script("pyraft-kv"), "serve", "--id", str(i), "--listen", addr[i], "--peers", peer_list,
               "--data-dir", str(tmp_path / f"n{i}")] + (["--init"] if init else [])
        log = open(tmp_path / f"n{i}.log", "ab")  # a file, not a pipe nobody reads
        try:
            procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([_script("pyraft-admin"), *argv], capture_output=True, text=True, timeout=timeout)

    def status_of(i: int) -> dict | None:
        p = cli("--node", addr[i], "--connect-timeout", "1", "status", "--json")
        return json.loads(p.stdout) if p.returncode == 0 else None

    try:
        serve(1, init=True)
        serve(2)
        serve(3)
        st = wait_until(lambda: (s := status_of(2)) and s.get("leader") and s, 30, "a leader, seen by node 2")
        assert {m["id"] for m in st["members"]} == {1, 2, 3}
        serve(4, peer_list=peers + f",4={addr[4]}")
        p = cli("--node", addr[2], "add-learner", "4", addr[4])
        if "does not serve 'admin." in p.stderr:
            pytest.fail("pyraft-kv serve does not register the admin ops: it must call "
                        "pyraft.admin_ops.serve_admin(raft)")
        assert p.returncode == 0, p.stderr
        p = cli("--node", addr[3], "change-membership", "1,2,4")
        assert p.returncode == 0, p.stderr
        st = wait_until(lambda: (s := status_of(4)) and s["membership"]["voters"] == [1, 2, 4] and s, 20,
                        "node 4 a voter")
        target = next(i for i in (1, 2, 4) if i != st["leader"]["id"])
        p = cli("--node", addr[target], "transfer-leader", str(target))
        assert p.returncode == 0, p.stderr
        st = wait_until(lambda: (s := status_of(1)) and s["leader"] and s["leader"]["id"] == target and s, 20,
                        f"node {target} leads")
        # Writes through the KV service, then look at a running node's files.
        from pyraft.kv import KVClient
        with KVClient([addr[i] for i in (1, 2, 4)], timeout=20) as kv:
            for k in range(30):
                kv.put(f"k{k}", k)
        p = cli("--node", addr[target], "snapshot", "--json")
        assert p.returncode == 0, p.stderr
        snap = json.loads(p.stdout)["snapshot"][1]
        p = cli("--node", addr[target], "purge-log", str(snap))
        assert p.returncode == 0, p.stderr
        ip = subprocess.run([_script("pyraft-inspect"), str(tmp_path / f"n{target}"), "summary", "--json"],
                            capture_output=True, text=True, timeout=30)
        assert ip.returncode == 0, ip.stderr
        s = json.loads(ip.stdout)
        assert s["node_id"] == target and s["purged"][1] == snap and s["state_machine"]["keys"] == 30
        assert s["membership"]["voters"] == [1, 2, 4]
        ip = subprocess.run([_script("pyraft-inspect"), str(tmp_path / f"n{target}"), "verify"],
                            capture_output=True, text=True, timeout=30)
        assert ip.returncode == 0, ip.stdout + ip.stderr
        # Drop a voter that does not lead; status no longer lists it.
        victim = next(i for i in (1, 2, 4) if i != target)
        p = cli("--node", addr[victim], "remove", str(victim))
        assert p.returncode == 0, p.stderr
        st = wait_until(lambda: (s := status_of(target)) and victim not in {m["id"] for m in s["members"]} and s,
                        20, f"node {victim} gone")
        assert st["membership"]["voters"] == sorted({1, 2, 4} - {victim})
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# ---------------------------------------------------------------------------
# A snapshot asked for while another build runs

class _GatedSM(KVStateMachine):
    """Its first snapshot build takes its view, then waits for ``gate`` before it reports back."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.started = threading.Event()
        self.gate = threading.Event()
        self.builds = 0

    def build_snapshot(self):
        meta = super().build_snapshot()
        self.builds += 1
        if self.builds == 1:
            self.started.set()
            assert self.gate.wait(30)
        return meta


@pytest.mark.parametrize("op", ["snapshot", "backup_begin"])
def test_a_snapshot_asked_for_during_an_older_build_covers_what_was_applied(op, tmp_path):
    """``admin.snapshot`` and ``admin.backup_begin`` while a build that took its view earlier runs.

    Asking for a snapshot while one is built does nothing; the running build covers less than
    what is applied now, so the op must ask again once it ends, not wait for its timeout.
    """
    sm = _GatedSM(str(tmp_path))
    with MemCluster(0, config=Config(heartbeat_interval=0.02, election_timeout=(0.1, 0.2), rpc_timeout=0.5,
                                     snapshot_every=None), init=False) as c:
        r = c.start(1, MemoryLogStore(), sm)
        r.initialize({1: c.node(1)})
        c.leader()
        for i in range(5):
            r.client_write(put(f"a{i}", i), timeout=10)
        r.trigger.snapshot()
        assert sm.started.wait(10)
        for i in range(5):
            r.client_write(put(f"b{i}", i), timeout=10)
        want = r.metrics().last_applied.index
        out: list = []
        if op == "snapshot":
            worker = threading.Thread(target=lambda: out.append(admin_ops._snapshot(r, {}, 20.0)))
        else:
            backups = admin_ops._Backups(r)
            worker = threading.Thread(target=lambda: out.append(backups.begin(r, {}, 20.0)))
        asked = threading.Event()
        ask = r.trigger.snapshot

        def counted() -> None:
            ask()
            asked.set()

        r.trigger.snapshot = counted  # type: ignore[method-assign]
        worker.start()
        # The op asks while the gated build runs (so its ask does nothing); only then the build ends.
        assert asked.wait(10)
        assert r.metrics().snapshot is None and sm.builds == 1
        sm.gate.set()
        worker.join(15)
        assert not worker.is_alive(), "the op waited for its timeout instead of asking again"
        assert sm.builds >= 2
        got = out[0]["snapshot"][1] if op == "snapshot" else out[0]["fence_index"]
        assert got >= want
        assert r.metrics().snapshot.index >= want
        if op == "backup_begin":
            backups.close_all()
