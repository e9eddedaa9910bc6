"""Operating a cluster (issue 17): health, learner removal, backup and restore into a new cluster,
recovery from a lost quorum, the metrics export.

In-process clusters (ZeroMQ + LMDB, the admin ops served) where a test must reach into a node
(hold its state machine, make it fail); node processes (``pyraft-kv serve``) for the commands an
operator runs: backup, restore, ``--force-new-cluster``, ``--metrics-listen``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from procs import free_port, make_cluster  # noqa: E402,F401 - the fixture
from test_admin import cluster  # noqa: E402,F401 - the fixture: in-process voters 1-3, node 4 not a member
from test_inspect import put, wait_until  # noqa: E402

from pyraft import Config, Membership, Node, Raft, ServerState, Vote  # noqa: E402
from pyraft.backup import BackupError, read_backup_header  # noqa: E402
from pyraft.kv import KVStateMachine  # noqa: E402
from pyraft.prometheus import MetricsServer  # noqa: E402
from pyraft.stores.lmdb import LmdbLogStore  # noqa: E402
from pyraft.tools import admin as padmin  # noqa: E402
from pyraft.tools import inspect as pinspect  # noqa: E402
from pyraft.tools import kv as pkv  # noqa: E402
from pyraft.engine.commands import AppendToLog, SaveCommitted, SaveVote  # noqa: E402
from pyraft.recovery import force_new_cluster  # noqa: E402
from pyraft.transports.memory import MemoryNetwork  # noqa: E402
from pyraft.types import Entry, EntryKind, LogId  # noqa: E402

pytestmark = pytest.mark.timeout(180)

def run(main, *argv) -> tuple[int, str, str]:
    """A tool's main() in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def adm(node: str, *argv, name: str = "pyraft") -> tuple[int, str, str]:
    return run(padmin.main, "--node", node, "--cluster-name", name, "--connect-timeout", "2", *argv)


def _hold_apply(sm: KVStateMachine, gate: threading.Event, fail: threading.Event) -> None:
    """Make ``sm`` wait at each batch until ``gate`` is set, and raise (a failing disk) once ``fail`` is."""
    real = sm.apply

    def apply(entries):
        gate.wait(60)
        if fail.is_set() and any(e.kind == EntryKind.NORMAL for e in entries):
            raise OSError(5, "Input/output error (injected)")
        return real(entries)

    sm.apply = apply  # the SM worker looks the method up at each batch


# ---------------------------------------------------------------------------
# health

def test_health_exit_codes_healthy_lagging_fatal_no_leader_unreachable(cluster):
    name = cluster.config.cluster_name
    leader = cluster.leader().node_id
    f, g = [i for i in (1, 2, 3) if i != leader]
    for i in (leader, f):
        rc, out, err = adm(cluster.addrs[i], "health", name=name)
        assert rc == 0 and "healthy" in out, err
    rc, out, _ = adm(cluster.addrs[f], "health", "--json", name=name)
    rep = json.loads(out)
    assert rc == 0 and rep["healthy"] is True and rep["current_leader"] == leader and rep["exit_code"] == 0

    # Lagging: node f's state machine is held while the others commit 30 entries.
    gate, fail = threading.Event(), threading.Event()
    _hold_apply(cluster.rafts[f].state_machine, gate, fail)
    cluster.write([put(f"k{i}", i) for i in range(30)])
    rc, out, err = adm(cluster.addrs[f], "health", "--max-lag", "5", name=name)
    assert rc == 1 and "lags" in err and err.count("\n") == 1, (out, err)
    assert adm(cluster.addrs[f], "health", name=name)[0] == 0  # within the default --max-lag
    gate.set()
    wait_until(lambda: adm(cluster.addrs[f], "health", "--max-lag", "0", name=name)[0] == 0, 20, "f caught up")

    # Fatal: node f's disk fails while it applies; it answers with its state and the reason.
    fail.set()
    cluster.write([put("boom", 1)])
    wait_until(lambda: cluster.rafts[f].metrics().state == ServerState.FATAL, 20, "node f Fatal")
    rc, out, err = adm(cluster.addrs[f], "health", "--json", name=name)
    rep = json.loads(out)
    assert rc == 1 and rep["state"] == "Fatal" and "Input/output error" in rep["reason"], rep

    # No leader: the leader and f stop; g alone cannot elect one.
    cluster.stop(leader)
    cluster.stop(f)
    wait_until(lambda: cluster.rafts[g].metrics().current_leader is None, 20, "g to lose its leader")
    rc, out, err = adm(cluster.addrs[g], "health", name=name)
    assert rc == 1 and "knows no leader" in err, (out, err)

    # Unreachable.
    cluster.stop(g)
    t0 = time.monotonic()
    rc, out, err = adm(cluster.addrs[g], "health", "--connect-timeout", "0.5", name=name)
    assert rc == 2 and "unreachable" in err and time.monotonic() - t0 < 10


def test_health_over_a_cluster_list_reports_every_member(cluster, monkeypatch):
    name = cluster.config.cluster_name
    dead = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("PYRAFT_CLUSTER", ",".join(cluster.addrs[i] for i in (1, 2, 3)))
    rc, out, err = run(padmin.main, "health", "--json", "--cluster-name", name)
    rep = json.loads(out)
    assert rc == 0 and rep["healthy"] and len(rep["members"]) == 3, err
    rc, out, err = run(padmin.main, "health", "--cluster", f"{cluster.addrs[1]},{dead}", "--connect-timeout", "0.5",
                       "--cluster-name", name)
    assert rc == 2 and "healthy" in out and "unreachable" in err


# ---------------------------------------------------------------------------
# removing members

def test_remove_learner_and_its_refusals(cluster):
    name = cluster.config.cluster_name
    home = cluster.addrs[1]
    assert adm(home, "add-learner", 4, cluster.addrs[4], name=name)[0] == 0
    rc, out, err = adm(home, "remove-learner", 4, "--json", name=name)
    assert rc == 0, err
    assert "4" not in json.loads(out)["membership"]["nodes"]
    for r in cluster.rafts.values():
        r.wait(10).metrics(lambda m: m.membership is not None and 4 not in m.membership.nodes, "4 gone")
    rc, out, err = adm(home, "remove-learner", 2, name=name)
    assert rc == 1 and "voter" in err
    rc, out, err = adm(home, "remove-learner", 9, "--json", name=name)
    assert rc == 1 and "not a member" in json.loads(out)["message"]
    # `remove` takes a learner too
    assert adm(home, "add-learner", 4, cluster.addrs[4], name=name)[0] == 0
    rc, out, err = adm(home, "remove", 4, name=name)
    assert rc == 0, err
    rc, out, _ = adm(home, "status", "--json", name=name)
    assert 4 not in [m["id"] for m in json.loads(out)["members"]]


def test_a_removed_voter_goes_quiet(cluster):
    """The operator's view: after `remove`, the old voter stops campaigning; the cluster's term stays put."""
    name = cluster.config.cluster_name
    victim = next(i for i in (1, 2, 3) if i != cluster.leader().node_id)
    rc, _, err = adm(cluster.addrs[1], "remove", victim, name=name)
    assert rc == 0, err
    rest = [i for i in (1, 2, 3) if i != victim]
    for i in rest:
        cluster.rafts[i].wait(10).voter_ids(rest)
    cluster.rafts[victim].wait(10).metrics(lambda m: m.membership is not None and victim not in m.membership.voter_ids,
                                      "the victim to learn of its removal")
    term = max(cluster.rafts[i].metrics().current_term for i in rest)
    victim_term = cluster.rafts[victim].metrics().current_term
    time.sleep(5 * cluster.config.election_timeout[1])  # five election timeouts: a campaigner would show it
    assert max(cluster.rafts[i].metrics().current_term for i in rest) == term
    assert cluster.rafts[victim].metrics().current_term == victim_term


# ---------------------------------------------------------------------------
# backup and restore

def _three_nodes_holding(make_cluster, keys: dict):
    """A new three-process cluster with ``keys`` written; (cluster, leader id, an open client)."""
    c = make_cluster(3)
    c.start_all()
    lead = c.wait_leader()
    kv = c.client(timeout=20)
    for k, v in keys.items():
        kv.put(k, v)
    return c, lead, kv


def test_backup_of_a_follower_restores_into_a_new_three_node_cluster(make_cluster, tmp_path):
    acked = {f"k{i:04d}": i for i in range(300)}
    c, lead, kv = _three_nodes_holding(make_cluster, acked)
    # Online: a writer goes on while the backup streams.
    stop = threading.Event()
    during: list[str] = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            kv.put(f"during{n}", n)
            during.append(f"during{n}")
            n += 1

    t = threading.Thread(target=writer, name="test-writer", daemon=True)
    t.start()
    follower = next(i for i in c.ids if i != lead)
    path = tmp_path / "cluster.backup"
    try:
        rc, out, err = run(padmin.main, "backup", path, "--node", c.addrs[follower], "--json")
    finally:
        stop.set()
        t.join(30)
    assert rc == 0, err
    info = json.loads(out)
    assert info["node_id"] == follower and info["fence_index"] >= 301 and info["voters"] == [1, 2, 3]
    with open(path, "rb") as f:
        header, _ = read_backup_header(f)
    assert header.meta.last_log_id.index >= info["fence_index"]
    rc, _, err = run(padmin.main, "backup", path, "--node", c.addrs[follower])
    assert rc == 2 and "exists" in err
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0  # all the data: private

    # A new cluster: other ports, other directories, same data.
    c2 = make_cluster(3, name="restored")
    peers = ",".join(f"{i}={a}" for i, a in c2.addrs.items())
    for i in c2.ids:
        rc, out, err = run(pkv.main, "restore", path, "--data-dir", c2.data_dir(i), "--id", i, "--peers", peers,
                           "--json")
        assert rc == 0, err
        assert json.loads(out)["keys"] >= len(acked)
        assert stat.S_IMODE(os.stat(c2.data_dir(i)).st_mode) == 0o700  # as the stores make data dirs
    rc, _, err = run(pkv.main, "restore", path, "--data-dir", c2.data_dir(1), "--id", 1, "--peers", peers)
    assert rc == 2 and "not empty" in err
    for i in c2.ids:
        c2.start(i, wait=False)  # no --init: the data directory says who the members are
    for i in c2.ids:
        c2.wait_ready(i)
    c2.wait_leader(30)
    kv2 = c2.client(timeout=20)
    try:
        for k, v in acked.items():
            assert kv2.get(k) == v, k
        kv2.put("after-restore", 1)
        assert kv2.get("after-restore") == 1
        # Every restored member holds the data and agrees on the log: new entries continue above the snapshot.
        lead2 = c2.wait_leader()
        applied = c2.status(lead2, 5.0)["applied"]
        assert applied > header.meta.last_log_id.index
        for i in c2.ids:
            wait_until(lambda i=i: (c2.status(i) or {}).get("applied", 0) >= applied, 20, f"node {i} applied")
            one = c2.client(ids=[i], timeout=10)
            try:
                assert all(one.get(k, stale=True) == v for k, v in list(acked.items())[::37])
            finally:
                one.close()
    finally:
        kv2.close()
        kv.close()


def test_restore_refuses_a_damaged_backup(make_cluster, tmp_path):
    c = make_cluster(1)
    c.start(1, init=True)
    c.wait_leader()
    kv = c.client()
    kv.put("a", 1)
    kv.close()
    path = tmp_path / "b"
    assert run(padmin.main, "--node", c.addrs[1], "backup", path)[0] == 0
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "damaged"
    bad.write_bytes(bytes(data))
    dest = tmp_path / "new"
    rc, out, err = run(pkv.main, "restore", bad, "--data-dir", dest, "--id", 1, "--peers", "1=tcp://127.0.0.1:1",
                       "--json")
    assert rc == 1 and json.loads(out)["error"] == "BackupError" and "SHA-256" in json.loads(out)["message"]
    assert not dest.exists()
    with open(bad, "rb") as f, pytest.raises(BackupError):
        read_backup_header(f)


# ---------------------------------------------------------------------------
# lost quorum

def test_lost_quorum_survivor_is_forced_into_a_new_cluster_and_grown_again(make_cluster):
    keys = {f"k{i}": i for i in range(100)}
    c, lead, kv = _three_nodes_holding(make_cluster, keys)
    kv.close()
    survivor = next(i for i in c.ids if i != lead)
    for i in c.ids:
        if i != survivor:
            c.kill(i)  # gone for good: never started again
    assert c.stop(survivor) == 0
    c.start(survivor, extra=["--force-new-cluster"])
    assert c.wait_leader(30, among=[survivor]) == survivor
    assert "now the only member" in c.log_tail(survivor, 200)
    kv = c.client(ids=[survivor], timeout=20)
    try:
        assert all(kv.get(k) == v for k, v in keys.items())
        kv.put("after-recovery", 1)
    finally:
        kv.close()
    # Restarting with the flag again changes nothing (the membership already is the survivor alone).
    assert c.stop(survivor) == 0
    c.start(survivor, extra=["--force-new-cluster"])
    assert c.wait_leader(30, among=[survivor]) == survivor
    assert "already is a one-member cluster" in c.log_tail(survivor, 50)

    # Grow it again: two fresh nodes join as learners, then become voters.
    for i in (4, 5):
        c.add_node(i)
        c.start(i)
        rc, _, err = run(padmin.main, "--node", c.addrs[survivor], "add-learner", i, c.addrs[i])
        assert rc == 0, err
    rc, _, err = run(padmin.main, "--node", c.addrs[survivor], "change-membership", f"{survivor},4,5")
    assert rc == 0, err
    kv = c.client(ids=[survivor, 4, 5], timeout=20)
    try:
        kv.put("after-growth", 2)
        applied = c.status(c.wait_leader(among=[survivor, 4, 5]), 5.0)["applied"]
        for i in (4, 5):
            wait_until(lambda i=i: (c.status(i) or {}).get("applied", 0) >= applied, 20, f"node {i} applied")
            one = c.client(ids=[i], timeout=10)
            try:
                assert all(one.get(k, stale=True) == v for k, v in keys.items())
                assert one.get("after-recovery", stale=True) == 1 and one.get("after-growth", stale=True) == 2
            finally:
                one.close()
    finally:
        kv.close()


def test_force_new_cluster_commits_the_survivors_tail_in_a_fresh_term(tmp_path):
    """The log ids of recovery: the survivor's uncommitted tail becomes committed; the new membership entry
    sits in a term above every term it has seen, and the node then leads alone in a later one."""
    d = tmp_path / "n3"
    ls, sm = LmdbLogStore(d, node_id=3), KVStateMachine(d)
    three = Membership.of({i: Node(f"tcp://127.0.0.{i}:7000") for i in (1, 2, 3)})
    ls.write([SaveVote(Vote(4, 1)),
              AppendToLog([Entry(LogId(0, 1), EntryKind.MEMBERSHIP, three), Entry(LogId(2, 2), EntryKind.BLANK),
                           Entry(LogId(2, 3), EntryKind.NORMAL, put("a", 1)),
                           Entry(LogId(4, 4), EntryKind.NORMAL, put("b", 2))]),  # never known committed
              SaveCommitted(LogId(2, 3))])
    forced = force_new_cluster(ls, sm, 3, Node("tcp://127.0.0.3:7000"))
    assert forced.entry == LogId(5, 5) and forced.newly_committed == 1
    assert ls.read_vote() == Vote(5, 3) and ls.read_committed() == LogId(5, 5)
    assert force_new_cluster(ls, sm, 3, Node("tcp://127.0.0.3:7000")) is None  # idempotent
    net = MemoryNetwork()
    r = Raft(3, Config(heartbeat_interval=0.05, election_timeout=(0.2, 0.4)), net.transport(3), ls, sm)
    try:
        m = r.wait(10).state(ServerState.LEADER)
        assert m.current_term > 5 and m.membership.voter_ids == {3} and set(m.membership.nodes) == {3}
        r.wait(10).applied_index_at_least(5)
        assert sm.get("a") == 1 and sm.get("b") == 2
        assert r.client_write(put("c", 3), timeout=10).log_id.term == m.current_term
    finally:
        r.shutdown(10)
        net.close()
        ls.close()
        sm.close()


def test_force_new_cluster_refuses_a_node_without_data(tmp_path):
    rc, out, err = run(pkv.main, "serve", "--id", 1, "--listen", f"tcp://127.0.0.1:{free_port()}", "--peers",
                       "1=tcp://127.0.0.1:1", "--data-dir", tmp_path / "empty", "--force-new-cluster", "--json")
    assert rc == 2 and "nothing to recover" in json.loads(out)["message"]
    rc, out, err = run(pkv.main, "serve", "--id", 1, "--listen", "tcp://127.0.0.1:1", "--peers", "1=tcp://a:1",
                       "--data-dir", tmp_path / "x", "--force-new-cluster", "--init")
    assert rc == 2 and "--init" in err


# ---------------------------------------------------------------------------
# metrics

def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for f in fams.values():
        assert f.documentation, f"{f.name} has no HELP"
    return fams


def _value(fams: dict, name: str, **labels) -> float:
    for s in fams[name].samples:
        if all(s.labels.get(k) == str(v) for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


def test_metrics_exposition_of_a_leader_parses_with_its_followers(cluster):
    r = cluster.leader()
    cluster.write([put("a", 1), put("b", 2)])
    cluster.wait_applied_everywhere()
    with MetricsServer(r.node_id, r.metrics, "127.0.0.1", 0, cluster_name="inspect-test") as srv:
        assert f"pyraft-metrics-{r.node_id}" in [t.name for t in threading.enumerate()]
        fams = _scrape(srv.url)
        m = r.metrics()
        assert fams["pyraft_current_term"].type == "gauge"
        assert _value(fams, "pyraft_state", state="Leader") == 1 and _value(fams, "pyraft_state", state="Follower") == 0
        assert _value(fams, "pyraft_is_leader") == 1 and _value(fams, "pyraft_leader_id") == r.node_id
        assert _value(fams, "pyraft_committed_index") >= m.committed.index - 0
        assert _value(fams, "pyraft_voters") == 3
        for t in (1, 2, 3):
            if t != r.node_id:
                assert _value(fams, "pyraft_replication_matched_index", target=t) >= 3
        assert fams["pyraft_events"].type == "counter"  # the parser strips _total
        assert {s.labels["event"] for s in fams["pyraft_events"].samples} >= set(m.counters)
        assert _value(fams, "pyraft_info", cluster="inspect-test", id=r.node_id) == 1
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url.replace("/metrics", "/other"), timeout=10)
        assert e.value.code == 404
    assert f"pyraft-metrics-{r.node_id}" not in [t.name for t in threading.enumerate()]


def test_serve_metrics_listen_and_typed_values(make_cluster):
    c = make_cluster(1)
    port = free_port()
    c.start(1, init=True, extra=["--metrics-listen", f"127.0.0.1:{port}"])
    c.wait_leader()
    cl = ["--cluster", c.addrs[1]]
    assert run(pkv.main, "put", *cl, "n", "42", "--type", "int")[0] == 0
    assert run(pkv.main, "--json", *cl, "put", "--type", "bytes-hex", "b", "00ff")[0] == 0
    assert run(pkv.main, "put", *cl, "j", '{"a": [1, 2]}', "--type", "json")[0] == 0
    assert run(pkv.main, "put", *cl, "x", "4.5", "--type", "float")[0] == 0
    rc, out, err = run(pkv.main, "put", *cl, "n", "forty", "--type", "int", "--json")
    assert rc == 2 and json.loads(out)["error"] == "UsageError"
    for key, value, kind in (("n", 42, "int"), ("b", "00ff", "bytes-hex"), ("j", {"a": [1, 2]}, "json"),
                             ("x", 4.5, "float")):
        rc, out, err = run(pkv.main, "get", key, *cl, "--json")
        assert rc == 0 and json.loads(out) == {"key": key, "value": value, "type": kind}, err
    assert run(pkv.main, "get", "n", *cl) == (0, "42\n", "")
    assert run(pkv.main, "cas", *cl, "n", "43", "42", "--type", "int")[0] == 0
    rc, out, _ = run(pkv.main, "get", "missing", *cl, "--json")
    assert rc == 1 and json.loads(out)["error"] == "NotFound"
    fams = _scrape(f"http://127.0.0.1:{port}/metrics")
    assert _value(fams, "pyraft_is_leader") == 1
    assert _value(fams, "pyraft_kv_keys") == 4
    assert _value(fams, "pyraft_kv_quota_bytes") > _value(fams, "pyraft_kv_used_bytes") > 0
    assert _value(fams, "pyraft_applied_index") >= 5


def test_restore_and_inspect_agree_on_the_restored_log_ids(make_cluster, tmp_path):
    """The restored node's stores: log purged at the snapshot's log id, vote term = its term, committed there."""
    c = make_cluster(1)
    c.start(1, init=True)
    c.wait_leader()
    kv = c.client()
    for i in range(10):
        kv.put(f"k{i}", i)
    kv.close()
    path = tmp_path / "b"
    assert run(padmin.main, "--node", c.addrs[1], "backup", path)[0] == 0
    with open(path, "rb") as f:
        header, _ = read_backup_header(f)
    lid = header.meta.last_log_id
    d = tmp_path / "r1"
    rc, out, err = run(pkv.main, "restore", path, "--data-dir", d, "--id", 7, "--peers",
                       "7=tcp://127.0.0.1:1,8=tcp://x:2", "--cluster-name", "second")
    assert rc == 0, err
    # Its hint to start the node names the new cluster: without it, serve refuses the data directory.
    assert f"pyraft-kv serve --id 7 --data-dir {d} --cluster-name second ..." in out, out
    with LmdbLogStore(d, node_id=7, cluster_name="second") as ls:
        assert ls.read_vote().term == lid.term and ls.read_vote().node_id is None
        assert ls.log_state().last_purged == lid and ls.log_state().last_log_id == lid
        assert ls.read_committed() == lid
    with KVStateMachine(d) as sm:
        applied, ms = sm.applied_state()
        assert applied == lid and ms.log_id == lid and ms.membership.voter_ids == {7, 8}
        assert sm.get("k9") == 9
    rc, out, err = run(pinspect.main, d, "verify", "--json")
    assert rc == 0, out + err


@pytest.mark.parametrize("change, why", [
    ({"lid": (2**63 - 1, 22)}, "beyond what a cluster reaches"),     # no election after it: bricked
    ({"lid": (1, 2**63 - 1)}, "beyond what a cluster reaches"),      # indexes past what the wire carries
    ({"created": float("nan")}, "finite"),                            # `restore --json` printed NaN
    ({"cluster_name": "a\nb"}, "cluster_name"),
    ({"cluster_name": "x" * 500}, "cluster_name"),
])
def test_a_backup_header_a_restored_cluster_could_not_live_with_is_refused(change, why):
    """Files an operator is handed are input: a header that checks out (SHA-256 and all) but names a
    term or index at the wire's limit, a NaN time or a cluster name no node takes is refused."""
    from pyraft.backup import BackupHeader
    from pyraft.types import LogId, SnapshotMeta, StoredMembership
    ms = StoredMembership(LogId(1, 1), Membership.of({1: Node("tcp://127.0.0.1:1")}))
    lid = change.get("lid", (3, 22))
    good = BackupHeader("c", 1, 1.0, "0", SnapshotMeta(LogId(3, 22), ms, "s"), "PYRAFTKV", 10, 22)
    assert BackupHeader.from_wire(good.to_wire()) == good
    w = good.to_wire()
    w["snapshot_meta"] = BackupHeader("c", 1, 1.0, "0", SnapshotMeta(LogId(*lid), ms, "s"), "PYRAFTKV", 10,
                                      22).to_wire()["snapshot_meta"]
    w.update({k: v for k, v in change.items() if k != "lid"})
    with pytest.raises(BackupError, match=why):
        BackupHeader.from_wire(w)
