"""pyraft-bench --baseline etcd runs both systems end to end (a smoke run: no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyraft.tools.bench_etcd import find_etcd

pytestmark = pytest.mark.timeout(240)


@pytest.mark.skipif(find_etcd() is None, reason="etcd is not installed (Debian: apt-get install etcd-server)")
def test_the_etcd_comparison_measures_both_systems_and_prints_the_table(tmp_path):
    out = tmp_path / "etcd.json"
    argv = [sys.executable, "-m", "pyraft.tools.bench", "--baseline", "etcd", "--client-threads", "4",
            "--payload", "10", "--duration", "1", "--warmup", "0.3", "--quiet", "--tmpdir", str(tmp_path),
            "--out", str(out)]
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
    for system in ("pyraft-kv", "etcd"):
        assert all(m["RssAnon"] > 0 for m in c["memory"][system].values())
    assert set(c["ratios"]) >= {"writes 10B x 4", "sequential write 10B x 1", "linearizable read 10B x 1",
                                "servers' anonymous memory"}
    # the table the docs show, with a ratio per row
    assert "| writes/s, 4 threads, 10 B |" in proc.stdout and "| linearizable read p50 ms |" in proc.stdout
    # every member is stopped and the directories are removed (no --keep)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("pyraft-bench-etcd-")]
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).returncode == 1
