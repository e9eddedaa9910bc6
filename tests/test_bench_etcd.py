"""pyraft-bench --baseline etcd runs both systems end to end (a smoke run: no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyraft.tools.bench_etcd import find_etcd

pytestmark = pytest.mark.timeout(240)


@pytest.mark.skipif(find_etcd() is None, reason="etcd is not installed (Debian: apt-get install etcd-server)")
@pytest.mark.parametrize("futures", [False, True], ids=["threads", "futures"])
def test_the_etcd_comparison_measures_both_systems_and_prints_the_table(tmp_path, futures):
    out = tmp_path / "etcd.json"
    argv = [sys.executable, "-m", "pyraft.tools.bench", "--baseline", "etcd", "--client-threads", "4",
            "--payload", "10", "--duration", "1", "--warmup", "0.3", "--quiet", "--tmpdir", str(tmp_path),
            "--out", str(out)] + (["--client-futures"] if futures else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    c = doc["etcd_comparison"]
    assert c["versions"]["etcd"].startswith("3.")
    kinds = [(r["kind"], r["threads"]) for r in c["rows"]]
    assert kinds == [("writes", 4), ("sequential write", 1), ("linearizable read", 1)]
    for r in c["rows"]:
        for system in ("pyraft-kv", "etcd"):
            res = r[system]
            assert "error" not in res, (r["kind"], system, res)
            assert res["ops"] > 0 and res["failed"] == 0, (r["kind"], system, res.get("first_error"))
            assert set(res["cpu_percent"]) == ({"node1", "node2", "node3"} if system == "pyraft-kv"
                                               else {"etcd1", "etcd2", "etcd3"})
            assert res["cpu_us_per_op"]["total"] > 0
            # the client process ran 4 threads, or one with 4 futures in flight
            assert res["client_threads_used"] == (1 if futures and r["kind"] == "writes" else r["threads"])
    for system in ("pyraft-kv", "etcd"):
        assert all(m["RssAnon"] > 0 for m in c["memory"][system].values())
    assert set(c["ratios"]) >= {"writes 10B x 4", "sequential write 10B x 1", "linearizable read 10B x 1",
                                "servers' anonymous memory"}
    # the table the docs show, with a ratio per row
    writes = "| writes/s, 4 futures from one thread, 10 B |" if futures else "| writes/s, 4 threads, 10 B |"
    assert writes in proc.stdout and "| linearizable read p50 ms |" in proc.stdout
    # every member is stopped and the directories are removed (no --keep)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("pyraft-bench-etcd-")]
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).returncode == 1


def _res(ops: float, p50: float) -> dict:
    return {"ops_per_s": ops, "latency": {"p50_ms": p50, "p99_ms": p50 * 2}}


def test_rounds_report_each_systems_median_round_and_the_median_of_the_rounds_ratios():
    from pyraft.tools.bench_etcd import median_round, ratios, render, round_ratio

    # writes: the ratio of each round, then their median (not the ratio of the medians)
    p = [_res(3000, 20), _res(1000, 60), _res(2000, 30)]
    e = [_res(1000, 60), _res(1000, 60), _res(2000, 30)]
    by_round = [round_ratio("writes", x, y) for x, y in zip(p, e)]
    assert by_round == [3.0, 1.0, 1.0]
    assert median_round("writes", p)["ops_per_s"] == 2000 and median_round("writes", p)["rounds"] == [3000, 1000, 2000]
    # latency rows compare the p50: the median round is the one with the median p50
    assert median_round("sequential write", p)["latency"]["p50_ms"] == 30
    assert round_ratio("sequential write", _res(1, 3.0), _res(1, 1.5)) == 2.0
    # a failed round has no ratio; it is left out of the median, and a row whose rounds all failed has none
    failed = {"error": "RuntimeError: boom"}
    assert round_ratio("writes", failed, e[0]) is None
    assert median_round("writes", [failed, p[0]])["ops_per_s"] == 3000
    doc = {"rows": [
        {"kind": "writes", "payload": 10, "threads": 64, "pyraft-kv": median_round("writes", p),
         "etcd": median_round("writes", e), "ratios_by_round": by_round},
        {"kind": "linearizable read", "payload": 10, "threads": 1, "pyraft-kv": _res(500, 2.0),
         "etcd": _res(900, 1.0), "ratios_by_round": [None, 2.0, 1.8]},
        {"kind": "sequential write", "payload": 10, "threads": 1, "pyraft-kv": failed, "etcd": failed,
         "ratios_by_round": [None, None]},
    ]}
    r = ratios(doc)
    assert r["writes 10B x 64"] == {"writes/s ratio": 1.0, "target": ">= 2", "met": False, "rounds": [3.0, 1.0, 1.0]}
    assert r["linearizable read 10B x 1"]["p50 ratio"] == 1.8 and r["linearizable read 10B x 1"]["met"] is False
    assert "sequential write 10B x 1" not in r
    table = render({"date": "d", "command": "pyraft-bench --baseline etcd --rounds 3", "nodes": 3, "warmup": 1,
                    "duration": 1, "machine": {"cpus": 2, "cpu_model": "x", "python": "3", "loadavg_at_start": [0]},
                    "etcd_comparison": {**doc, "versions": {}, "rounds": 3, "ratios": r}})
    assert "3 rounds" in table and "1.0× ✗ (rounds 3.0, 1.0, 1.0)" in table
    assert "1.8× ✗ (rounds -, 2.0, 1.8)" in table


@pytest.mark.parametrize("argv, message", [(["--rounds", "0"], "--rounds must be at least 1"),
                                           (["--mode", "client", "--rounds", "2"], "not --mode client alone"),
                                           (["--follower-down", "kill", "--rounds", "2"], "not --follower-down")])
def test_rounds_are_refused_where_nothing_would_repeat(argv, message):
    proc = subprocess.run([sys.executable, "-m", "pyraft.tools.bench", *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
