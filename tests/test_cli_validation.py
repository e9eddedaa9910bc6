"""Careless input to ``pyraft.Config``, ``pyraft-kv`` and ``pyraft-bench`` is refused up front.

A value that would leave a cluster without a leader (NaN or infinite timings,
a string where an on/off switch goes), a node id the wire cannot carry, a
directory that is part of another node, a watch that can never see an event:
each is a ``ValueError`` (the API) or one line and exit 2 (the tools), before
anything is created or started.  And ``--json`` prints valid JSON (RFC 8259)
whatever the store holds, NaN and the infinities included.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from procs import make_cluster  # noqa: F401  (a fixture)
from pyraft import Config

pytestmark = pytest.mark.timeout(180)

NAN, INF = float("nan"), float("inf")


def kv_cmd() -> list[str]:
    exe = shutil.which("pyraft-kv") or os.path.join(os.path.dirname(sys.executable), "pyraft-kv")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "pyraft.tools.kv"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The command's result; on the timeout (a command that should have refused at once but hangs or
    serves) the child is killed and the test fails."""
    try:
        return subprocess.run(kv_cmd() + list(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pyraft-kv {' '.join(args)} did not finish within {timeout} s (it should refuse at once)")


def assert_usage_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def strict_json(text: str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity, as RFC 8259 (and JavaScript) do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------- Config (F11)

@pytest.mark.parametrize("kw", [
    {"heartbeat_interval": NAN},
    {"heartbeat_interval": INF},
    {"heartbeat_interval": True, "election_timeout": (3, 4)},
    {"heartbeat_interval": "0.1"},
    {"election_timeout": (1.0, INF)},
    {"election_timeout": (1, 1e308)},
    {"election_timeout": (1, 3601)},
    {"election_timeout": (NAN, 2)},
    {"election_timeout": (True, 2)},
    {"election_timeout": ("1", "2")},
    {"election_timeout": "12"},
    {"election_timeout": 5},
    {"rpc_timeout": INF},
    {"rpc_timeout": NAN},
    {"rpc_timeout": True},
    {"rpc_timeout": 1e9},
    {"max_in_snapshot_log_to_keep": True},
    {"snapshot_every": True},
    {"max_inflight": 2.0},
    {"pre_vote": "no"},
    {"pre_vote": 2},
    {"check_quorum": None},
])
def test_config_refuses_values_that_leave_a_cluster_without_a_leader(kw):
    # Before: all accepted; heartbeat NaN flapped leadership, (1, inf) never elected anyone,
    # pre_vote="no" left pre-vote on; election_timeout=5 was a TypeError.
    with pytest.raises(ValueError):
        Config(**kw)


@pytest.mark.parametrize("d", [
    {"election_timeout": 5},
    {"election_timeout": "ab"},
    {"election_timeout": [1]},
    {"election_timeout": None},
    {"heartbeat_interval": None},
    {"heartbeat_interval": [0.1]},
    {"pre_vote": "no"},
    {"check_quorum": "1"},
    {"max_payload_bytes": "1024"},
    {"snapshot_every": 1.5},
    {"cluster_name": 5},
    {"rpc_timeout": {"s": 1}},
])
def test_config_from_dict_raises_value_error_for_every_bad_value(d):
    # Before: {"election_timeout": 5} raised TypeError ('int' object is not iterable).
    with pytest.raises(ValueError):
        Config.from_dict(d)


def test_config_still_takes_what_it_took():
    c = Config(heartbeat_interval=1, election_timeout=[3, 3600], rpc_timeout=2, pre_vote=False,
               check_quorum=False, snapshot_every=None, max_in_snapshot_log_to_keep=0)
    assert c.election_timeout == (3.0, 3600.0) and c.heartbeat_interval == 1
    assert Config.from_dict({"election_timeout": [0.3, 0.6], "heartbeat_interval": 0.05}).election_timeout == (0.3, 0.6)
    assert Config.low_latency().election_timeout == (0.15, 0.3)
    assert Config() == Config.from_dict({})


# ------------------------------------------------------------------------------------- serve

def serve_args(tmp_path, data: str = "d", node_id: str = "1", peers: str | None = None) -> list[str]:
    listen = "tcp://127.0.0.1:1"  # never bound: every case here is refused before the transport
    return ["serve", "--id", node_id, "--listen", listen, "--peers", peers or f"{node_id}={listen}",
            "--data-dir", str(tmp_path / data), "--init"]


@pytest.mark.parametrize("text, word", [
    ('{"heartbeat_interval": NaN}', "NaN"),
    ('{"election_timeout": [1, Infinity]}', "Infinity"),
    ('{"election_timeout": [-Infinity, 1]}', "-Infinity"),
    ('{"election_timeout": [1, 1e400]}', "election_timeout"),
    ('{"rpc_timeout": 1e400}', "rpc_timeout"),
    ('{"pre_vote": "no"}', "pre_vote"),
    ('{"election_timeout": 5}', "election_timeout"),
])
def test_serve_refuses_a_config_file_with_non_finite_or_mistyped_values(tmp_path, text, word):
    # Before: NaN / Infinity (which Python's json reads) were taken, and the node never led.
    cfg = tmp_path / "cfg.json"
    cfg.write_text(text)
    p = run(*serve_args(tmp_path), "--config", str(cfg))
    assert_usage_error(p, "--config", word)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("node_id, peers", [
    ("99999999999999999999", None),
    (str(2**63), None),
    ("-1", None),
    ("1", "1=tcp://127.0.0.1:1,99999999999999999999=tcp://127.0.0.1:2"),
    ("1", f"1=tcp://127.0.0.1:1,{2**63}=tcp://127.0.0.1:2"),
])
def test_serve_refuses_node_ids_the_wire_cannot_carry_before_creating_anything(tmp_path, node_id, peers):
    # Before: an msgpack OverflowError traceback, and a half-made log.lmdb left behind.
    p = run(*serve_args(tmp_path, node_id=node_id, peers=peers))
    assert_usage_error(p, "node id")
    assert not (tmp_path / "d").exists()


def test_serve_takes_the_largest_node_id(tmp_path):
    # The bound is 2**63 - 1 itself: refused only past it (here: refused later, for its address).
    big = str(2**63 - 1)
    p = run(*serve_args(tmp_path, node_id=big, peers=f"{big}=tcp://127.0.0.1:1,{big}=x"))
    assert_usage_error(p, "--peers")
    assert "node id" not in p.stderr


def test_restore_refuses_a_node_id_out_of_range(tmp_path):
    p = run("restore", str(tmp_path / "nothing.bk"), "--data-dir", str(tmp_path / "r"),
            "--id", str(2**64), "--peers", "1=tcp://127.0.0.1:1")
    assert_usage_error(p, "node id")


def _fake_node_dir(path) -> None:
    """What ``serve`` leaves in a data directory, as far as the check looks."""
    (path / "log.lmdb").mkdir(parents=True)
    (path / "kv.lmdb").mkdir()
    (path / "kv.lmdb" / "data.mdb").write_bytes(b"")
    (path / "kv.lmdb" / "lock.mdb").write_bytes(b"")
    (path / "snapshots").mkdir()


@pytest.mark.parametrize("sub, word", [
    ("n3/kv.lmdb", "data.mdb"),      # an LMDB environment of node 3
    ("n3/snapshots", "stores"),      # a part of node 3's data directory
    ("env", "lock.mdb"),             # any LMDB environment
])
def test_serve_refuses_a_data_dir_that_is_part_of_another_node(tmp_path, sub, word):
    # Before: serve initialized a second node inside node 3's stores (and here would run until killed).
    _fake_node_dir(tmp_path / "n3")
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "lock.mdb").write_bytes(b"")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    p = run(*serve_args(tmp_path, data=sub), timeout=20)
    assert_usage_error(p, "--data-dir", word)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------- demo (F19)

def test_demo_refuses_a_dir_that_cannot_be_a_directory(tmp_path):
    # Before: a FileExistsError / FileNotFoundError traceback from os.makedirs.
    afile = tmp_path / "afile"
    afile.write_text("x")
    p = run("demo", "--dir", str(afile))
    assert_usage_error(p, "--dir")
    assert "a three-node cluster" not in p.stdout and afile.read_text() == "x"
    p = run("demo", "--dir", str(afile / "x"))
    assert_usage_error(p, "--dir")
    p = run("--json", "demo", "--dir", str(afile))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert strict_json(p.stdout)["exit_code"] == 2


# ------------------------------------------------------------------------------------- watch (F3, F15)

DEAD = "tcp://127.0.0.1:1"  # nothing listens: the usage errors come before any request


@pytest.mark.parametrize("rev", ["99999999999999999999999", str(2**63)])
def test_watch_refuses_a_revision_past_the_wire_format(rev):
    # Before: a ValueError traceback from KVClient.watch (exit 1), and no JSON object with --json.
    p = run("watch", "--cluster", DEAD, "k", "--rev", rev, "--count", "1")
    assert_usage_error(p, "--rev")
    p = run("--json", "watch", "--cluster", DEAD, "k", "--rev", rev, "--count", "1")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert strict_json(p.stdout)["exit_code"] == 2


@pytest.mark.parametrize("key, end", [("k", "a"), ("k", "k"), ("b", "")])
def test_watch_refuses_an_empty_range_instead_of_waiting_for_ever(key, end):
    # Before: it waited silently until killed.
    p = run("watch", "--cluster", DEAD, key, "--end", end, "--rev", "1", "--count", "1", timeout=20)
    assert_usage_error(p, "--end")


# ------------------------------------------------------------------------------------- bench (F16)

@pytest.mark.parametrize("args, message", [
    (["--payload", ","], "--payload must give at least one size"),
    (["--payload", ",", "--sync-writer"], "--payload must give at least one size"),
    (["--payload", "", "--only-sync-writer"], "--payload must give at least one size"),
    (["--duration", "nan"], "--duration"),
    (["--duration", "inf"], "--duration"),
    (["--warmup", "nan"], "--warmup"),
    (["--warmup", "inf"], "--warmup"),
])
def test_bench_refuses_no_payload_and_non_finite_durations_before_starting_anything(args, message):
    # Before: an IndexError traceback (--sync-writer), a run of nothing (exit 0), or NaN/inf durations taken.
    try:
        p = subprocess.run([sys.executable, "-m", "pyraft.tools.bench", *args, "--quiet"], capture_output=True,
                           text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pyraft-bench {args} started a run instead of refusing")
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr


# ------------------------------------------------------------------------------------- --json (F2)

def test_json_output_is_valid_json_for_non_finite_and_odd_values(make_cluster):  # noqa: F811
    c = make_cluster(1)
    c.start_all()
    c.wait_leader(20)
    cl = ["--cluster", ",".join(c.addrs.values())]
    for key, text, kind in (("f/nan", "nan", "float"), ("f/inf", "inf", "float"), ("f/minf", "-1e400", "float"),
                            ("f/json", '[NaN, {"x": Infinity}]', "json")):
        p = run("put", *cl, "--type", kind, "--", key, text)
        assert p.returncode == 0, p.stderr
    kv = c.client()
    try:
        kv.put("f/odd", {b"\x01": 1.5, 2: "two", "s": (1, 2)})  # map keys JSON has no form for, mixed
    finally:
        kv.close()
    want = {"f/nan": "NaN", "f/inf": "Infinity", "f/minf": "-Infinity", "f/json": ["NaN", {"x": "Infinity"}],
            "f/odd": {"01": 1.5, "2": "two", "s": [1, 2]}}
    for key, value in want.items():
        p = run("--json", "get", *cl, key)
        assert p.returncode == 0, p.stderr
        assert strict_json(p.stdout)["value"] == value, p.stdout
    p = run("--json", "get", *cl, "f/", "--prefix")
    assert p.returncode == 0, p.stderr
    assert {x["key"]: x["value"] for x in strict_json(p.stdout)["kvs"]} == want
    p = run("--json", "watch", *cl, "f/", "--prefix", "--rev", "1", "--count", str(len(want)))
    assert p.returncode == 0, p.stderr
    events = [strict_json(line) for line in p.stdout.splitlines()]
    assert {e["key"]: e["value"] for e in events} == want
    # Plain text is as before for floats (NaN prints as NaN), and a map with such keys prints too.
    p = run("get", *cl, "f/nan")
    assert (p.returncode, p.stdout) == (0, "NaN\n")
    p = run("get", *cl, "f/odd")
    assert p.returncode == 0 and json.loads(p.stdout) == want["f/odd"], p.stdout + p.stderr


def test_json_output_keeps_every_entry_of_a_map_whose_keys_print_alike():
    from pyraft.tools.kv import json_line
    for value in ({1: "a", "1": "b"}, {b"ab": 1, "6162": 2}):
        out = json.loads(json_line({"value": value}))["value"]
        assert isinstance(out, list) and len(out) == 2, out  # [key, value] pairs, nothing dropped
    assert json.loads(json_line({"value": {1: "a", 2: "b"}}))["value"] == {"1": "a", "2": "b"}
