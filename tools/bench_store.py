"""Benchmark LmdbLogStore.write against raw py-lmdb writes of the same batches.

    python -m pyraft.tools.bench_store [--dir DIR] [--quick] [--no-sync] [--rounds N]

For each batch size (1, 10, 100, 1000 entries) and payload size (10 B,
1 KiB) it appends the same entries into fresh environments three ways:
through ``LmdbLogStore.write([AppendToLog(batch)])``; as a bare py-lmdb
write transaction with one ``put(index_key, msgpack [term, kind, payload],
append=True)`` per entry ("raw"); and as one with a single
``Cursor.putmulti(..., append=True)`` for the batch ("multi").  Both encode inside the timed region and
fsync at commit (unless ``--no-sync``), so the ratio is the store's own
overhead.  Each configuration runs ``--rounds`` times alternately and the
fastest round of each side is reported.  Disk bytes per entry is the size of
``data.mdb`` divided by the entries written.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import lmdb
import msgpack

from pyraft.codec import index_key
from pyraft.engine.commands import AppendToLog
from pyraft.stores.lmdb import DEFAULT_MAP_SIZE, LOG_ENV_NAME, LmdbLogStore
from pyraft.types import Entry, EntryKind, LogId

BATCH_SIZES = (1, 10, 100, 1000)
PAYLOAD_SIZES = (10, 1024)


@dataclass
class Result:
    seconds: float
    latencies: list[float]
    entries: int
    disk_bytes: int

    @property
    def rate(self) -> float:
        return self.entries / self.seconds

    def pct(self, p: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000


def make_batches(batch: int, payload: int, n_batches: int) -> list[list[Entry]]:
    out, i = [], 1
    for _ in range(n_batches):
        out.append([Entry(LogId(1, j), EntryKind.NORMAL, {"op": "put", "key": j, "value": "v" * payload})
                    for j in range(i, i + batch)])
        i += batch
    return out


def run_store(path: str, batches: list[list[Entry]], sync: bool) -> Result:
    lat = []
    store = LmdbLogStore(path, sync=sync)
    try:
        t0 = time.perf_counter()
        for b in batches:
            s = time.perf_counter()
            store.write([AppendToLog(b)])
            lat.append(time.perf_counter() - s)
        total = time.perf_counter() - t0
    finally:
        store.close()
    n = sum(len(b) for b in batches)
    return Result(total, lat, n, os.path.getsize(os.path.join(path, LOG_ENV_NAME, "data.mdb")))


def run_raw(path: str, batches: list[list[Entry]], sync: bool) -> Result:
    lat = []
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(os.path.join(path, "raw.lmdb"), map_size=DEFAULT_MAP_SIZE, max_dbs=2, sync=sync,
                    metasync=sync)
    db = env.open_db(b"log")
    packb = msgpack.packb
    try:
        t0 = time.perf_counter()
        for b in batches:
            s = time.perf_counter()
            with env.begin(write=True) as txn:
                for e in b:
                    txn.put(index_key(e.log_id.index),
                            packb([e.log_id.term, int(e.kind), e.payload], use_bin_type=True),
                            append=True, db=db)
            lat.append(time.perf_counter() - s)
        total = time.perf_counter() - t0
    finally:
        env.close()
    n = sum(len(b) for b in batches)
    return Result(total, lat, n, os.path.getsize(os.path.join(path, "raw.lmdb", "data.mdb")))


def run_raw_multi(path: str, batches: list[list[Entry]], sync: bool) -> Result:
    """Like run_raw, but the batch goes in with one Cursor.putmulti call (py-lmdb's fastest path)."""
    lat = []
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(os.path.join(path, "raw.lmdb"), map_size=DEFAULT_MAP_SIZE, max_dbs=2, sync=sync,
                    metasync=sync)
    db = env.open_db(b"log")
    packb = msgpack.packb
    try:
        t0 = time.perf_counter()
        for b in batches:
            s = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.cursor(db=db).putmulti(
                    [(index_key(e.log_id.index), packb([e.log_id.term, int(e.kind), e.payload], use_bin_type=True))
                     for e in b], append=True)
            lat.append(time.perf_counter() - s)
        total = time.perf_counter() - t0
    finally:
        env.close()
    n = sum(len(b) for b in batches)
    return Result(total, lat, n, os.path.getsize(os.path.join(path, "raw.lmdb", "data.mdb")))


def n_batches_for(batch: int, payload: int, quick: bool) -> int:
    budget_entries = 20_000 if payload <= 64 else 10_000
    n = max(5, min(1000, budget_entries // batch))
    return max(3, n // 5) if quick else n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyraft.tools.bench_store", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="where to create the environments (default: a temp dir); "
                                  "put it on the disk you care about")
    ap.add_argument("--quick", action="store_true", help="fewer batches (a smoke run)")
    ap.add_argument("--no-sync", action="store_true", help="sync=False on both sides (no fsync at commit)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs per side; the best is kept")
    args = ap.parse_args(argv)
    sync = not args.no_sync
    base = tempfile.mkdtemp(prefix="pyraft-bench-", dir=args.dir)
    print(f"pyraft LmdbLogStore vs raw py-lmdb {lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))}); "
          f"sync={sync}; dir={base}")
    print(f"{'batch':>5} {'payload':>7} {'batches':>7} | {'store ent/s':>11} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'B/entry':>7} | {'raw ent/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'B/entry':>7} | "
          f"{'ratio':>6} {'p50 r.':>6} | {'multi ent/s':>11} {'ratio':>6}")
    runners = {"store": run_store, "raw": run_raw, "multi": run_raw_multi}
    ratios: dict[str, list[float]] = {"raw": [], "raw p50": [], "multi": []}
    try:
        for payload in PAYLOAD_SIZES:
            for batch in BATCH_SIZES:
                n = n_batches_for(batch, payload, args.quick)
                batches = make_batches(batch, payload, n)
                best: dict[str, Result] = {}
                sides = list(runners)
                for r in range(args.rounds):
                    for side in sides if r % 2 == 0 else sides[::-1]:
                        d = os.path.join(base, f"{side}-{batch}-{payload}-{r}")
                        res = runners[side](d, batches, sync)
                        shutil.rmtree(d, ignore_errors=True)
                        if side not in best or res.seconds < best[side].seconds:
                            best[side] = res
                st, raw, multi = best["store"], best["raw"], best["multi"]
                ratio, p50_ratio, m_ratio = (st.seconds / raw.seconds, st.pct(.5) / raw.pct(.5),
                                             st.seconds / multi.seconds)
                ratios["raw"].append(ratio)
                ratios["raw p50"].append(p50_ratio)
                ratios["multi"].append(m_ratio)
                print(f"{batch:>5} {payload:>6}B {n:>7} | {st.rate:>11,.0f} {st.pct(.5):>7.3f} "
                      f"{st.pct(.99):>7.3f} {st.disk_bytes / st.entries:>7.0f} | "
                      f"{raw.rate:>10,.0f} {raw.pct(.5):>7.3f} {raw.pct(.99):>7.3f} "
                      f"{raw.disk_bytes / raw.entries:>7.0f} | {ratio:>5.2f}x {p50_ratio:>5.2f}x | "
                      f"{multi.rate:>11,.0f} {m_ratio:>5.2f}x", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("ratio = store time / raw time (1.00x: no overhead; below 1: the store is faster).  "
          "raw: one txn.put per entry; multi: one Cursor.putmulti per batch.")
    for k, v in ratios.items():
        print(f"  store vs {k:<8} median {statistics.median(v):.2f}x  max {max(v):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
