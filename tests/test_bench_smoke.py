"""pyraft-bench runs end to end and prints its JSON (a smoke run: no timing is asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.timeout(180)


def test_bench_runs_a_cluster_and_prints_its_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pyraft.tools.bench", "--duration", "1", "--warmup", "0.3", "--inflight", "100",
         "--sync-writer", "--json", "--quiet", "--tmpdir", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == doc
    assert doc["nodes"] == 3 and doc["machine"]["cpus"] >= 1 and doc["command"].startswith("pyraft-bench")
    runs = {r["system"]: r["result"] for r in doc["runs"]}
    assert set(runs) == {"pyraft", "pyraft sync-writer"}
    for name, res in runs.items():
        assert "error" not in res, (name, res)
        assert res["ops"] > 0 and res["ops_per_s"] > 0, (name, res)
        assert res["failed"] == 0, (name, res["first_error"])
        lat = res["latency"]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert set(res["cpu_percent"]) == {"1", "2", "3"}
        assert set(res["disk_bytes"]) == {"1", "2", "3"} and all(b > 0 for b in res["disk_bytes"].values())
    # the node directories are removed afterwards (no --keep)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("pyraft-bench-")]


def test_bench_stages_lines_up_every_stage_of_a_lone_write(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pyraft.tools.bench", "--duration", "1", "--warmup", "0.3", "--only-sync-writer",
         "--stages", "--json", "--quiet", "--tmpdir", str(tmp_path)],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    (run,) = doc["runs"]
    st = run["result"]["stages"]
    assert st["writes"] > 50  # the probes matched (a renamed runtime method would fail the node at start)
    for row in st["stages"]:
        assert row["p50_us"] is not None and row["p50_us"] >= 0, row
    assert st["total"]["p50_us"] >= max(row["p50_us"] for row in st["stages"])
    assert st["leader_disk"]["p50_us"] > 0
    assert all(v > 0 for v in doc["stage_floors"].values()) and len(doc["stage_floors"]) == 4


def test_stage_analysis_follows_the_first_acknowledgement():
    from pyraft.tools import stages

    lead = [(0, "write"), (10, "propose"), (20, "submit"), (30, "replicate"), (40, "send.done"), (45, "disk"),
            (300, "disk.done"), (400, "resp_in"), (410, "resp"), (420, "commit"), (430, "apply"),
            (434, "sm_commit"), (437, "sm_commit.done"), (440, "result"), (450, "write.done")]
    # follower 2 acknowledges first (reply_out at 330); follower 3 later (reply_out at 390)
    f2 = [(100, "frame_in"), (110, "rpc"), (120, "disk"), (320, "disk.done"), (330, "reply_out")]
    f3 = [(105, "frame_in"), (115, "rpc"), (125, "disk"), (380, "disk.done"), (390, "reply_out")]
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for i, recs in ((1, lead), (2, f2), (3, f3)):
            paths[i] = os.path.join(d, f"n{i}")
            with open(paths[i], "w") as f:
                f.writelines(f"{t * 1000} {e}\n" for t, e in recs)  # records are in ns; these in us
        res = stages.analyze(paths, leader=1, skip=0)
    got = {r["stage"]: r["p50_us"] for r in res["stages"]}
    assert res["writes"] == 1 and res["total"]["p50_us"] == 450
    assert got["follower LMDB commit (fsync)"] == 200  # follower 2's: 120..320
    assert got["network back, worker decodes"] == 70  # 330..400
    assert got["state machine: LMDB commit"] == 3
    assert sum(got.values()) == 450
    assert res["leader_disk"]["p50_us"] == 255
    # A state machine without an LMDB transaction (the floor): those stages are empty, the time goes on
    with tempfile.TemporaryDirectory() as d:
        for i, recs in ((1, [r for r in lead if not r[1].startswith("sm_commit")]), (2, f2), (3, f3)):
            with open(paths[i].replace(os.path.dirname(paths[i]), d), "w") as f:
                f.writelines(f"{t * 1000} {e}\n" for t, e in recs)
        res = stages.analyze({i: p.replace(os.path.dirname(p), d) for i, p in paths.items()}, leader=1, skip=0)
    got = {r["stage"]: r["p50_us"] for r in res["stages"]}
    assert got["state machine: LMDB commit"] is None and got["complete the client's future"] is None
    assert got["state machine: apply the entry (KV: its commands)"] == 10  # 430..440
    assert sum(v for v in got.values() if v is not None) == 450


@pytest.mark.parametrize("other", [["--mode", "client"], ["--follower-down", "kill"]])
def test_bench_stages_refuses_workloads_without_the_lone_writer(other):
    proc = subprocess.run([sys.executable, "-m", "pyraft.tools.bench", "--stages", *other],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--stages" in proc.stderr


def test_the_race_table_shows_each_ratio_against_its_target():
    from pyraft.tools import bench

    runs = [{"system": system, "payload": p, "sync": False, "result": {"ops_per_s": rate}}
            for p, rates in ((10, (90_000, 60_000, 40_000)), (1024, (50_000, 60_000, 20_000)))
            for system, rate in zip(("pyraft", "pysyncobj-memory", "pysyncobj-journal"), rates)]
    runs.append({"system": "pyraft sync-writer", "payload": 10, "sync": True,
                 "result": {"latency": {"p50_ms": 0.7, "p99_ms": 2.0}}})
    doc = {"sm": "kv", "no_fsync": False, "runs": runs, "ratios": bench.compute_ratios(runs)}
    rows = bench.render_race(doc).splitlines()
    assert "2.25x ok" in rows[2] and "1.50x ok" in rows[2]
    assert "2.50x ok" in rows[3] and "0.83x BELOW" in rows[3]
    assert "0.70 / 2.00" in rows[4] and rows[4].endswith("ok)")
    assert bench.render_race({**doc, "runs": runs[:1]}) == ""  # no baseline in the run: no race table


@pytest.mark.parametrize("mode", ["leader", "client"])
def test_the_table_shows_the_servers_cpu_per_write_once(mode):
    # The CPU column is the nodes' CPU per write summed once: client mode's figures used to be
    # summed together with their own total, which doubled the column.
    from pyraft.tools import bench

    per = {"1": 100.0, "2": 50.0, "3": 50.0, "total": 200.0}
    res = {"ops_per_s": 1000.0, "latency": {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "max_ms": 4.0},
           "cpu_percent": {"1": 10.0, "2": 5.0, "3": 5.0}, "cpu_us_per_op": per}
    doc = {"machine": {"cpus": 2, "cpu_model": "x", "python": "3", "loadavg_at_start": [0.0]},
           "date": "d", "command": "pyraft-bench", "nodes": 3, "no_fsync": False, "sm": "kv", "inflight": 64,
           "warmup": 1, "duration": 1, "mode": mode, "runs": [{"system": "pyraft", "payload": 10, "result": res}]}
    table = bench.render_table(doc)
    row = next(line for line in table.splitlines() if line.startswith("pyraft "))
    assert row.split()[-2] == "200.0", row
    assert ("writes in flight from the leader" in table) == (mode == "leader")


@pytest.mark.parametrize("args, message", [
    (["--config", '{"bogus": 1}'], "--config: unknown config keys"),
    (["--config", '{"heartbeat_interval": -1}'], "--config: heartbeat_interval"),
    (["--config", "[1]"], "--config: must be a JSON object"),
    (["--config", "[" * 100000], "--config: nests arrays or objects too deep"),
    (["--out", "."], "--out .: not a file in an existing directory"),
    (["--out", "/no/such/dir/out.json"], "not a file in an existing directory"),
    (["--payload", "ten"], "--payload and --client-threads take integers"),
    (["--tmpdir", "/no/such/dir"], "--tmpdir /no/such/dir: not an existing directory"),
    (["--client-futures"], "--client-futures changes the client processes of --mode client"),
])
def test_arguments_no_node_would_take_are_refused_before_anything_starts(args, message):
    # Before: the nodes started and died with a traceback each (--config), or the whole run
    # ended in a traceback when it came to write its JSON (--out).
    p = subprocess.run([sys.executable, "-m", "pyraft.tools.bench", *args], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_thread_stats_count_each_threads_cpu_and_sleeps_by_kind():
    import threading
    import time

    from pyraft.tools import bench

    assert bench.thread_kind("pyraft-core-12") == "pyraft-core"
    assert bench.thread_kind("pyraft-repl-1->3") == "pyraft-repl"
    assert bench.thread_kind("ZMQbg/IO/0") == "ZMQbg/IO"
    assert bench.thread_kind("bench-load") == "bench-load"
    go, finish = threading.Event(), threading.Event()
    done = [threading.Event(), threading.Event()]

    def burn(i: int) -> None:
        go.wait()
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.03:  # 30 ms on a CPU
            pass
        for _ in range(20):  # and 20 sleeps
            time.sleep(0.001)
        done[i].set()
        finish.wait()  # alive until read

    threads = [threading.Thread(target=burn, args=(i,), name=f"burner-{i}", daemon=True) for i in (0, 1)]
    for t in threads:
        t.start()
    names = bench.thread_names()
    before = bench.thread_stats(os.getpid(), names)
    go.set()
    assert all(d.wait(30) for d in done)
    after = bench.thread_stats(os.getpid(), names)
    finish.set()
    for t in threads:
        t.join(10)
    costs = bench.thread_costs(before, after, 2)
    assert costs["burner"]["cpu_us"] >= 30_000  # two threads of one kind summed, per operation (2 ops)
    assert costs["burner"]["wakeups"] >= 20
    assert costs["total"]["cpu_us"] >= costs["burner"]["cpu_us"]


def test_the_by_thread_table_puts_the_leader_first_and_the_costliest_threads_on_top():
    from pyraft.tools import bench

    res = {"leader": 2, "by_thread": {
        "1": {"pyraft-core": {"cpu_us": 40.0, "wakeups": 0.5}, "total": {"cpu_us": 40.0, "wakeups": 0.5}},
        "2": {"pyraft-core": {"cpu_us": 90.0, "wakeups": 1.25}, "pyraft-repl": {"cpu_us": 300.0, "wakeups": 6.0},
              "total": {"cpu_us": 390.0, "wakeups": 7.25}}}}
    lines = bench.render_by_thread("pyraft 10B", res).splitlines()
    assert "node 2 (leader)" in lines[1] and lines[1].index("node 2") < lines[1].index("node 1")
    assert lines[2].split() == ["pyraft-repl", "300", "/", "6.0", "-"]
    assert lines[3].split() == ["pyraft-core", "90", "/", "1.2", "40", "/", "0.50"]
    assert lines[4].split()[0] == "total"


def test_bench_by_thread_shows_where_each_nodes_cpu_went(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pyraft.tools.bench", "--duration", "2.5", "--warmup", "0.3", "--only-sync-writer",
         "--by-thread", "--quiet", "--tmpdir", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    res = run["result"]
    by = res["by_thread"]
    assert set(by) == {"1", "2", "3"}
    lead = str(res["leader"])
    for node, costs in by.items():
        assert costs["pyraft-core"]["cpu_us"] > 0 and costs["pyraft-sm"]["cpu_us"] > 0, (node, costs)
        assert ("pyraft-repl" in costs) == (node == lead), (node, costs)
    assert by[lead]["bench-load"]["cpu_us"] > 0  # the writer's own thread, which ends with the load
    assert f"where each node's CPU went, {run['system']} 10B" in proc.stdout
    assert f"node {lead} (leader)" in proc.stdout


def test_by_thread_is_refused_where_it_would_show_nothing():
    p = subprocess.run([sys.executable, "-m", "pyraft.tools.bench", "--by-thread", "--follower-down", "kill"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--by-thread" in p.stderr, p.stderr


def test_a_run_that_failed_makes_the_exit_code_1():
    """A table of errors is not a benchmark: a script that runs pyraft-bench must see it failed."""
    from pyraft.tools.bench import run_errors
    ok = {"runs": [{"system": "pyraft", "result": {"ops_per_s": 5.0, "error": None}}]}
    assert run_errors(ok) == []
    doc = {"runs": [{"system": "pyraft", "result": {"ops_per_s": 5.0}},
                    {"system": "pysyncobj", "result": {"error": "OSError: boom"}}],
           "etcd_comparison": {"rows": [{"pyraft": {"error": "etcd exited 1"}}]}}
    assert run_errors(doc) == ["OSError: boom", "etcd exited 1"]


def test_failed_operations_inside_a_measured_run_are_named():
    """A run whose figures left out failed writes printed them as if nothing had failed."""
    from pyraft.tools.bench import failed_writes
    doc = {"runs": [{"system": "pyraft", "result": {"ops_per_s": 5.0, "failed": 0, "first_error": None}},
                    {"system": "pyraft", "result": {"ops_per_s": 4.0, "failed": 3, "first_error": "Timeout()"}}],
           "etcd_comparison": {"rows": [{"etcd": {"failed": 1, "first_error": "grpc"}}]}}
    assert failed_writes(doc) == [(3, "Timeout()"), (1, "grpc")]
    assert failed_writes({"runs": []}) == []


def test_the_futures_loop_keeps_its_calls_in_flight_and_counts_each_once():
    from concurrent.futures import Future

    from pyraft.tools.bench import futures_loop

    class Probe(Future):
        def exception(self, timeout=None):
            if not self.done():  # the loop waited on a call before it had 8 in flight
                return RuntimeError("waited too early")
            return super().exception(timeout)

    made: list = []

    def put_async(key, value):
        f = Probe()
        made.append(f)
        if len(made) == 8:  # the first 8 complete only once 8 are in flight
            for g in made:
                g.set_result(None)
        elif len(made) > 8:
            if len(made) % 7 == 0:
                f.set_exception(RuntimeError("refused"))
            else:
                f.set_result(None)
        return f

    res = futures_loop(put_async, 8, b"v", "k", duration=0.3, warmup=0.0)
    assert res["first_error"] == repr(RuntimeError("refused"))
    assert res["ops"] > 8 and res["errors"] >= 1
    assert res["ops"] + res["errors"] <= len(made)
