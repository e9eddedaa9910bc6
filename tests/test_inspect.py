"""pyraft-inspect against data directories written by real clusters (ZeroMQ + LMDB + KV),
against a node that is running, and against directories damaged on purpose."""
from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Iterable

import lmdb
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import free_port  # noqa: E402

from pyraft import Config, Node, Raft, ServerState  # noqa: E402
from pyraft.codec import decode_entry, encode_entry, index_key, pack  # noqa: E402
from pyraft.engine.commands import AppendToLog, SaveCommitted, SaveVote  # noqa: E402
from pyraft.errors import ForwardToLeader, RaftError  # noqa: E402
from pyraft.kv import KVStateMachine  # noqa: E402
from pyraft.stores.lmdb import LmdbLogStore, node_dir_layout  # noqa: E402
from pyraft.tools import inspect as pinspect  # noqa: E402
from pyraft.transports.zmq import ZmqTransport  # noqa: E402
from pyraft.types import Entry, EntryKind, LogId, Vote  # noqa: E402

pytestmark = pytest.mark.timeout(120)

CFG = Config(cluster_name="inspect-test", heartbeat_interval=0.03, election_timeout=(0.3, 0.6),
             rpc_timeout=0.5, snapshot_every=None)


# ---------------------------------------------------------------------------
# A cluster of in-process nodes on ZeroMQ with LMDB stores (shared with test_admin.py)

def wait_until(predicate, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class LmdbCluster:
    """Nodes on ZmqTransport (127.0.0.1) with LmdbLogStore + KVStateMachine in ``root/n<id>``."""

    def __init__(self, root, ids: Iterable[int] = (1, 2, 3), config: Config = CFG, admin: bool = False,
                 transport_kw: dict | None = None) -> None:
        self.root = str(root)
        self.config = config
        self.admin = admin
        self.transport_kw = transport_kw or {}
        self.addrs: dict[int, str] = {}
        self.rafts: dict[int, Raft] = {}
        for i in ids:
            self.start(i)

    def dir(self, i: int) -> str:
        return os.path.join(self.root, f"n{i}")

    def node(self, i: int) -> Node:
        return Node(self.addrs[i])

    def start(self, i: int) -> Raft:
        if i not in self.addrs:
            self.addrs[i] = f"tcp://127.0.0.1:{free_port()}"
        d = self.dir(i)
        log_store = LmdbLogStore(d, node_id=i, cluster_name=self.config.cluster_name)
        sm = KVStateMachine(d)
        t = ZmqTransport(i, self.addrs[i], cluster_name=self.config.cluster_name, **self.transport_kw)
        r = Raft(i, self.config, t, log_store, sm)
        if self.admin:
            from pyraft.admin_ops import serve_admin
            serve_admin(r)
        self.rafts[i] = r
        return r

    def initialize(self, ids: Iterable[int] | None = None) -> None:
        ids = sorted(ids if ids is not None else self.rafts)
        self.rafts[ids[0]].initialize({i: self.node(i) for i in ids})
        for i in ids:
            self.rafts[i].wait(10).voter_ids(ids)
        self.leader()

    def leader(self, timeout: float = 10.0) -> Raft:
        def one():
            found = [r for r in self.rafts.values() if r.metrics().state == ServerState.LEADER]
            return found[0] if len(found) == 1 else None
        return wait_until(one, timeout, "exactly one leader")

    def write(self, commands: list, timeout: float = 20.0) -> list:
        """Commit ``commands`` through whoever leads, retrying ForwardToLeader; returns their results."""
        deadline = time.monotonic() + timeout
        results: list = [None] * len(commands)
        todo = list(range(len(commands)))
        while todo:
            assert time.monotonic() < deadline, "writes did not commit in time"
            r = self.leader()
            futs: list[tuple[int, Future]] = [(k, r.client_write_async(commands[k])) for k in todo]
            todo = []
            for k, f in futs:
                try:
                    results[k] = f.result(max(0.1, deadline - time.monotonic())).result
                except ForwardToLeader:
                    todo.append(k)
                except RaftError as e:  # a command the KV state machine refuses: its result
                    results[k] = e
        return results

    def wait_applied_everywhere(self, timeout: float = 10.0) -> int:
        """Wait until every running member has applied the leader's last entry; return its index."""
        m = self.leader().metrics()
        for i, r in self.rafts.items():
            if i in m.membership.nodes:
                r.wait(timeout).applied_index_at_least(m.last_log_index)
        return m.last_log_index

    def stop(self, i: int) -> None:
        r = self.rafts.pop(i)
        r.shutdown(10)
        r.log_store.close()
        r.state_machine.close()

    def close(self) -> None:
        for i in list(self.rafts):
            self.stop(i)


def put(k, v) -> dict:
    return {"op": "put", "key": k, "value": v}


# ---------------------------------------------------------------------------
# Running the tool

def inspect(*argv: str) -> tuple[int, str, str]:
    """pyraft-inspect in this process (the stores must be closed): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = pinspect.main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def inspect_proc(*argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """The installed console script, in its own process."""
    exe = shutil.which("pyraft-inspect") or os.path.join(os.path.dirname(sys.executable), "pyraft-inspect")
    return subprocess.run([exe, *[str(a) for a in argv]], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------
# One history, written once: writes over two leaders, a learner, a joint change,
# an opaque command, a session command, a snapshot and a purge on node 1.

@pytest.fixture(scope="module")
def history(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    c = LmdbCluster(root, ids=(1, 2, 3, 4))
    try:
        c.initialize([1, 2, 3])
        c.write([put(f"k{i}", i) for i in range(60)])
        first = c.leader()
        other = next(i for i in (1, 2, 3) if i != first.node_id)
        first.trigger.transfer_leader(other)
        c.rafts[other].wait(10).state(ServerState.LEADER)
        results = c.write([put(f"k{i}", i) for i in range(60, 120)]
                          + [["not", "a", "kv", "command", b"\x00\xff"],
                             {"op": "put", "key": "s", "value": 1, "client": "c1", "seq": 7},
                             {"op": "delete", "key": "k0"}])
        c.leader().add_learner(4, c.node(4), timeout=10)
        c.leader().change_membership({1, 2, 4}, retain=True, timeout=10)
        c.write([put(f"k{i}", i) for i in range(120, 150)])
        last = c.wait_applied_everywhere()
        n1 = c.rafts[1]
        n1.trigger.snapshot()
        n1.wait(10).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= last)
        purged = n1.trigger.purge_log(40)
        n1.wait(10).metrics(lambda m: m.purged is not None and m.purged.index >= 40)
        final = {i: r.metrics() for i, r in c.rafts.items()}
    finally:
        c.close()
    return {"root": str(root), "dirs": {i: c.dir(i) for i in (1, 2, 3, 4)}, "metrics": final,
            "last": last, "purged": purged, "results": results, "transfer_to": other}


def copy_dir(history, tmp_path, i: int = 2) -> str:
    dst = tmp_path / f"copy{i}"
    shutil.copytree(history["dirs"][i], dst)
    return str(dst)


# ---------------------------------------------------------------------------
# summary

def test_summary_json_matches_what_the_node_reported(history):
    for i, d in history["dirs"].items():
        rc, out, err = inspect(d, "summary", "--json")
        assert rc == 0, err
        s = json.loads(out)
        m = history["metrics"][i]
        assert s["node_id"] == i
        assert s["cluster_name"] == "inspect-test"
        assert s["format_version"] == 1
        assert s["vote"] == {"term": m.vote.term, "node_id": m.vote.node_id}
        assert s["current_term"] == m.current_term
        assert s["last_log_index"] == m.last_log_index == history["last"]
        assert s["committed"] == [m.committed.term, m.committed.index]
        assert s["state_machine"]["last_applied"] == [m.last_applied.term, m.last_applied.index]
        assert s["state_machine"]["keys"] == 150 - 1 + 1  # k0 deleted, "s" added
        ms = s["membership"]
        assert ms["voters"] == [1, 2, 4] and ms["learners"] == [3] and ms["committed"]
        assert set(ms["nodes"]) == {"1", "2", "3", "4"}
        assert s["sizes"]["log_data_bytes"] > 0 and s["sizes"]["total_bytes"] >= s["sizes"]["log_data_bytes"]
    s1 = json.loads(inspect(history["dirs"][1], "summary", "--json")[1])
    assert s1["purged"] == [history["purged"].term, history["purged"].index]
    assert s1["first_log_id"][1] == history["purged"].index + 1
    assert s1["state_machine"]["snapshot"]["last_log_id"][1] >= history["last"]
    assert s1["sizes"]["snapshots_bytes"] > 0


def test_summary_text_names_the_essentials(history):
    rc, out, _ = inspect(history["dirs"][2], "summary")
    assert rc == 0
    m = history["metrics"][2]
    assert "node           2 in cluster 'inspect-test'" in out
    assert f"term {m.vote.term}, voted for {m.vote.node_id}" in out
    assert f"committed      {m.committed.term}-{m.committed.index}" in out
    assert "voters       [1, 2, 4]" in out and "learners     [3]" in out
    assert "log.lmdb" in out and "kv.lmdb" in out


# ---------------------------------------------------------------------------
# log

def test_log_prints_one_line_per_entry_and_decodes_what_it_can(history):
    d = history["dirs"][2]
    rc, out, _ = inspect(d, "log")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == history["last"]
    assert [int(l.split()[0]) for l in lines] == list(range(1, history["last"] + 1))
    assert lines[0].split()[1:3] == ["0", "membership"] and "voters [1, 2, 3]" in lines[0]
    assert any("put 'k5' = 5" in l for l in lines)
    assert any(l.split()[2] == "blank" for l in lines)
    assert any("delete 'k0'" in l for l in lines)
    assert any("put 's' = 1  (client 'c1' seq 7)" in l for l in lines)
    opaque = [l for l in lines if "<" in l and "bytes>" in l]
    assert len(opaque) == 1 and "normal" in opaque[0]
    joint = [l for l in lines if "joint" in l]
    assert joint and "[1, 2, 3] -> [1, 2, 4]" in joint[0]


def test_log_ranges(history):
    d = history["dirs"][3]
    last = history["last"]
    rc, out, _ = inspect(d, "log", "--from", "10", "--to", "14")
    assert rc == 0 and [int(l.split()[0]) for l in out.splitlines()] == [10, 11, 12, 13, 14]
    rc, out, _ = inspect(d, "log", "--tail", "3")
    assert [int(l.split()[0]) for l in out.splitlines()] == [last - 2, last - 1, last]
    rc, out, _ = inspect(d, "log", "--to", "20", "--tail", "2")
    assert [int(l.split()[0]) for l in out.splitlines()] == [19, 20]
    # On node 1 the log starts after the purge.
    rc, out, _ = inspect(history["dirs"][1], "log", "--to", "45")
    p = history["purged"].index
    assert [int(l.split()[0]) for l in out.splitlines()] == list(range(p + 1, 46))


def test_log_json_parses(history):
    rc, out, _ = inspect(history["dirs"][2], "log", "--json")
    assert rc == 0
    entries = json.loads(out)
    assert [e["index"] for e in entries] == list(range(1, history["last"] + 1))
    kinds = {e["kind"] for e in entries}
    assert kinds == {"membership", "blank", "normal"}
    assert entries[0]["membership"]["voters"] == [1, 2, 3]
    cmds = [e["command"] for e in entries if "command" in e]
    assert {"op": "put", "key": "k3", "value": 3} in cmds
    opaque = [e for e in entries if "payload_hex" in e]
    assert len(opaque) == 1 and opaque[0]["payload_size"] > 0
    assert json.loads(inspect(history["dirs"][2], "log", "--from", "5", "--to", "4", "--json")[1]) == []


# ---------------------------------------------------------------------------
# verify, membership, vote, snapshot

def test_verify_passes_on_every_node(history):
    for d in history["dirs"].values():
        rc, out, err = inspect(d, "verify")
        assert rc == 0, out + err
        assert out.startswith("OK:")
        rc, out, _ = inspect(d, "verify", "--json")
        v = json.loads(out)
        assert rc == 0 and v["ok"] and v["faults"] == []


def test_membership_shows_the_history(history):
    rc, out, _ = inspect(history["dirs"][3], "membership", "--json")
    assert rc == 0
    m = json.loads(out)
    assert m["effective"]["voters"] == [1, 2, 4] and m["effective"]["learners"] == [3]
    configs = [e["configs"] for e in m["log"]]
    assert configs[0] == [[1, 2, 3]]
    assert [[1, 2, 3], [1, 2, 4]] in configs  # the joint configuration
    assert configs[-1] == [[1, 2, 4]]
    rc, out, _ = inspect(history["dirs"][3], "membership")
    assert rc == 0 and "effective: voters [1, 2, 4]" in out and "membership entries in the log:" in out


def test_vote(history):
    m = history["metrics"][2]
    rc, out, _ = inspect(history["dirs"][2], "vote")
    assert rc == 0 and out.strip() == f"term {m.vote.term}, voted for node {m.vote.node_id}"
    v = json.loads(inspect(history["dirs"][2], "vote", "--json")[1])
    assert v["term"] == m.vote.term and v["node_id"] == m.vote.node_id


def test_snapshot_metadata_and_export(history, tmp_path):
    d1 = history["dirs"][1]
    rc, out, _ = inspect(d1, "snapshot", "--json")
    assert rc == 0
    s = json.loads(out)
    assert s["last_log_id"][1] >= history["last"] and s["file_bytes"] > 0
    assert s["membership"]["voters"] == [1, 2, 4]
    dest = tmp_path / "exported.kvsnap"
    rc, out, err = inspect(d1, "snapshot", "--export", dest)
    assert rc == 0, err
    assert "checksum OK" in out and "150 keys" in out
    assert stat.S_IMODE(os.stat(dest).st_mode) & 0o077 == 0  # all the data: private
    # The export is a snapshot file the state machine installs as is.
    with KVStateMachine.open_readonly(d1) as r:
        meta = r.status().snapshot
    with KVStateMachine(tmp_path / "restored") as sm, open(dest, "rb") as f:
        sm.install_snapshot(meta, f)
        assert sm.get("k149") == 149 and sm.get("k0") is None and sm.get("s") == 1
    assert inspect(d1, "snapshot", "--export", dest)[0] == 2  # exists, no --force
    assert inspect(d1, "snapshot", "--export", dest, "--force")[0] == 0
    # Node 2 never snapshotted.
    rc, out, _ = inspect(history["dirs"][2], "snapshot")
    assert rc == 0 and out.strip() == "no snapshot"
    assert inspect(history["dirs"][2], "snapshot", "--export", tmp_path / "none")[0] == 1


def test_console_script_runs(history):
    p = inspect_proc(history["dirs"][2], "summary", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["node_id"] == 2
    p = inspect_proc(history["dirs"][2], "bogus-command")
    assert p.returncode == 2


# ---------------------------------------------------------------------------
# verify catches damage

def _log_env(d: str) -> lmdb.Environment:
    # The layout documented in pyraft.stores.lmdb: named databases "meta" and "log".
    return lmdb.open(node_dir_layout(d).log_env, max_dbs=8, subdir=True)


def test_verify_catches_a_deleted_middle_entry(history, tmp_path):
    d = copy_dir(history, tmp_path)
    env = _log_env(d)
    with env.begin(write=True) as txn:
        assert txn.delete(index_key(50), db=env.open_db(b"log", txn=txn))
    env.close()
    rc, out, _ = inspect(d, "verify")
    assert rc == 1
    assert out.startswith("FAULT at index 50:") and "missing" in out
    v = json.loads(inspect(d, "verify", "--json")[1])
    assert not v["ok"] and v["faults"][0]["index"] == 50


def test_verify_catches_an_entry_with_a_wrong_term(history, tmp_path):
    d = copy_dir(history, tmp_path)
    env = _log_env(d)
    with env.begin(write=True) as txn:
        db = env.open_db(b"log", txn=txn)
        entries = [decode_entry(int.from_bytes(k, "big"), bytes(v)) for k, v in txn.cursor(db=db)]
        # The entry after the first one of a newer term, rewritten with the older term.
        bad = next(e for e, nxt in zip(entries, entries[1:]) if nxt.term > e.term and e.term >= 1)
        victim = entries[bad.index]  # the first entry of the newer term (the list is 0-based)
        assert victim.index == bad.index + 1 and victim.term > bad.term
        wrong = Entry(LogId(bad.term, victim.index + 1), EntryKind.NORMAL, put("x", 1))
        txn.put(index_key(victim.index + 1), encode_entry(wrong), db=db)
    env.close()
    rc, out, _ = inspect(d, "verify")
    assert rc == 1
    first = out.splitlines()[0]
    assert first.startswith(f"FAULT at index {victim.index + 1}:") and "never decrease" in first


def test_verify_catches_an_entry_that_does_not_decode(history, tmp_path):
    d = copy_dir(history, tmp_path)
    env = _log_env(d)
    with env.begin(write=True) as txn:
        txn.put(index_key(30), b"\xc1 not msgpack", db=env.open_db(b"log", txn=txn))
    env.close()
    rc, out, _ = inspect(d, "verify")
    assert rc == 1 and out.startswith("FAULT at index 30:") and "does not decode" in out
    rc, out, err = inspect(d, "log", "--from", "29", "--to", "31")
    assert rc == 1 and "UNDECODABLE" in out.splitlines()[1]


def test_verify_catches_committed_past_the_log(history, tmp_path):
    d = copy_dir(history, tmp_path)
    env = _log_env(d)
    last = history["last"]
    with env.begin(write=True) as txn:
        txn.put(b"committed", pack([99, last + 5]), db=env.open_db(b"meta", txn=txn))
    env.close()
    rc, out, _ = inspect(d, "verify")
    assert rc == 1 and f"FAULT at index {last + 5}:" in out and "past the last log index" in out


def test_verify_exits_2_on_a_truncated_data_file(history, tmp_path):
    d = copy_dir(history, tmp_path)
    data = os.path.join(node_dir_layout(d).log_env, "data.mdb")
    size = os.path.getsize(data)
    for cut in (size - 1, size // 2, 5000, 100, 0):
        with open(data, "r+b") as f:
            f.truncate(cut)
        p = inspect_proc(d, "verify")  # a process of its own: a bad mmap read would kill it
        assert p.returncode == 2, (cut, p.stdout, p.stderr)
        assert "pyraft-inspect:" in p.stderr


@pytest.mark.parametrize("env", ["log", "kv"])
def test_a_node_over_a_truncated_data_file_refuses_to_start_instead_of_dying_of_sigbus(history, tmp_path, env):
    d = copy_dir(history, tmp_path)
    layout = node_dir_layout(d)
    data = os.path.join(layout.log_env if env == "log" else os.path.join(d, "kv.lmdb"), "data.mdb")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    code = ("import sys\n"
            "from pyraft.errors import StorageError\n"
            "from pyraft.kv import KVStateMachine\n"
            "from pyraft.stores.lmdb import LmdbLogStore\n"
            "try:\n"
            f"    (LmdbLogStore(sys.argv[1], node_id=2, cluster_name={CFG.cluster_name!r}) if {env == 'log'} "
            "else KVStateMachine(sys.argv[1]))\n"
            "except StorageError as e:\n"
            "    print(e); sys.exit(3)\n")
    p = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "is truncated" in p.stdout, (p.returncode, p.stdout, p.stderr[-500:])


def test_verify_exits_2_on_a_garbage_data_file(history, tmp_path):
    d = copy_dir(history, tmp_path)
    data = os.path.join(node_dir_layout(d).log_env, "data.mdb")
    size = os.path.getsize(data)
    with open(data, "wb") as f:
        f.write(os.urandom(size))
    p = inspect_proc(d, "verify")
    assert p.returncode == 2 and "not an LMDB environment (or is corrupt)" in p.stderr, p.stderr
    for cmd in ("summary", "log"):
        assert inspect_proc(d, cmd).returncode == 2


def test_not_a_data_dir_is_a_clear_error(history, tmp_path):
    rc, _, err = inspect(tmp_path / "nowhere", "summary")
    assert rc == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = inspect(tmp_path / "empty", "verify")
    assert rc == 2 and "is not a pyraft data directory" in err
    (tmp_path / "file").write_text("x")
    rc, _, err = inspect(tmp_path / "file", "summary")
    assert rc == 2 and "is not a directory" in err
    rc, _, err = inspect(node_dir_layout(history["dirs"][2]).log_env, "summary")
    assert rc == 2 and "give the node data directory" in err
    rc, _, _ = inspect(history["dirs"][2], "log", "--from", "-3")
    assert rc == 2


# ---------------------------------------------------------------------------
# A directory without the KV state machine, and a long log (progress)

def test_a_large_log_without_a_kv_state_machine(tmp_path):
    n = 120_000
    with LmdbLogStore(tmp_path, node_id=7, cluster_name="big") as s:
        s.write([SaveVote(Vote(3, 7)),
                 AppendToLog([Entry(LogId(0, 1), EntryKind.BLANK)]
                             + [Entry(LogId(3, i), EntryKind.NORMAL, i) for i in range(2, n + 1)]),
                 SaveCommitted(LogId(3, n))])
    rc, out, err = inspect(tmp_path, "verify")
    assert rc == 0, out
    assert f"verify: {n}/{n} entries (100%)" in err
    rc, _, err = inspect(tmp_path, "verify", "--quiet")
    assert rc == 0 and err == ""
    s = json.loads(inspect(tmp_path, "summary", "--json")[1])
    assert s["state_machine"] is None and s["membership"] is None and s["last_log_index"] == n
    rc, out, _ = inspect(tmp_path, "log", "--from", "4000", "--to", "8200")  # read in chunks of 4096
    assert rc == 0 and [int(l.split()[0]) for l in out.splitlines()] == list(range(4000, 8201))
    rc, out, _ = inspect(tmp_path, "log", "--tail", "1")
    assert out.split()[:3] == [str(n), "3", "normal"] and "<5 bytes> ce0001d4c0" in out


# ---------------------------------------------------------------------------
# A running node

def test_inspect_a_running_cluster_while_it_writes(tmp_path):
    c = LmdbCluster(tmp_path)
    stop = threading.Event()
    errors: list = []

    def writer():
        k = 0
        while not stop.is_set():
            try:
                c.write([put(f"w{k + j}", j) for j in range(20)], timeout=10)
                k += 20
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    try:
        c.initialize()
        c.write([put("seed", 1)])
        t = threading.Thread(target=writer, name="test-writer")
        t.start()
        try:
            leader = c.leader().node_id
            follower = next(i for i in c.rafts if i != leader)
            seen = []
            for _ in range(3):
                for i in (leader, follower):
                    before = c.rafts[i].metrics().last_log_index
                    p = inspect_proc(c.dir(i), "summary", "--json")
                    assert p.returncode == 0, p.stderr
                    s = json.loads(p.stdout)
                    assert s["node_id"] == i and s["last_log_index"] >= before
                    assert s["membership"]["voters"] == [1, 2, 3]
                    if i == leader:
                        seen.append(s["last_log_index"])
                    p = inspect_proc(c.dir(i), "verify")
                    assert p.returncode == 0, p.stdout + p.stderr
                p = inspect_proc(c.dir(follower), "log", "--tail", "5", "--json")
                assert p.returncode == 0 and len(json.loads(p.stdout)) == 5
            assert seen == sorted(seen) and seen[-1] > seen[0], seen
        finally:
            stop.set()
            t.join(20)
        assert not errors, errors
    finally:
        c.close()


def test_verify_checks_the_state_machine_against_the_log(history, tmp_path):
    d = copy_dir(history, tmp_path)
    last = history["last"]
    # The KV layout documented in pyraft.kv.statemachine: named database "meta", key "last_applied".
    env = lmdb.open(node_dir_layout(d).kv_env, max_dbs=8, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"last_applied", pack([history["metrics"][2].current_term, last + 3]),
                db=env.open_db(b"meta", txn=txn))
    env.close()
    rc, out, _ = inspect(d, "verify")
    assert rc == 1 and f"FAULT at index {last + 3}: applied" in out and "past the last log index" in out
