"""pyraft-bench runs end to end and prints its JSON (a smoke run: no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

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
