"""Throughput and latency of a 3-node cluster inside one process.

    python -m pyraft.tools.bench_inprocess [--writes 50000] [--inflight 5000] [--lmdb] [--json]

Three ``Raft`` nodes on :class:`~pyraft.transports.memory.MemoryNetwork` (every
message still goes through the wire codec), with memory stores, or with
``--lmdb`` ``LmdbLogStore`` + ``KVStateMachine`` in a temporary directory
(fsync on).  It measures ``client_write_async`` throughput with many writes
in flight on the leader, then the latency of a single synchronous writer.
The process-level benchmark against PySyncObj is ``pyraft-bench``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import Future

from pyraft import Config, Node, Raft
from pyraft.storage import LogStore, StateMachine
from pyraft.transports.memory import MemoryNetwork


def _percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def run(writes: int, inflight: int, sync_writes: int, lmdb: bool, payload: int) -> dict:
    tmp = tempfile.TemporaryDirectory(prefix="pyraft-bench-inproc-") if lmdb else None
    net = MemoryNetwork()
    nodes = {i: Node(f"mem://{i}") for i in (1, 2, 3)}
    rafts: dict[int, Raft] = {}
    try:
        for i in nodes:
            ls: LogStore
            sm: StateMachine
            if tmp is not None:  # lmdb
                from pyraft.kv import KVStateMachine
                from pyraft.stores.lmdb import LmdbLogStore
                d = f"{tmp.name}/n{i}"
                ls, sm = LmdbLogStore(d), KVStateMachine(d)
            else:
                from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
                ls, sm = MemoryLogStore(), MemoryStateMachine()
            rafts[i] = Raft(i, Config(), net.transport(i), ls, sm)
        rafts[1].initialize(nodes)
        deadline = time.monotonic() + 10
        while not any(r.is_leader() for r in rafts.values()):
            if time.monotonic() > deadline:
                raise SystemExit("no leader elected within 10 s")
            time.sleep(0.01)
        leader = next(r for r in rafts.values() if r.is_leader())
        value = "x" * payload

        # Throughput: keep `inflight` writes outstanding.
        t0 = time.perf_counter()
        window: list[Future] = []
        for n in range(writes):
            window.append(leader.client_write_async({"op": "put", "key": f"k{n % 1000}", "value": value}))
            if len(window) >= inflight:
                for f in window:
                    f.result(60)
                window = []
        for f in window:
            f.result(60)
        elapsed = time.perf_counter() - t0

        # Latency: one synchronous writer.
        lat = []
        for n in range(sync_writes):
            t = time.perf_counter()
            leader.client_write({"op": "put", "key": "sync", "value": value}, timeout=10)
            lat.append(time.perf_counter() - t)
        lat.sort()
        return {
            "stores": "lmdb (fsync on)" if lmdb else "memory",
            "writes": writes, "inflight": inflight, "payload_bytes": payload,
            "throughput_ops_s": round(writes / elapsed),
            "sync_writer": {"n": sync_writes,
                            "p50_ms": round(_percentile(lat, 0.50) * 1e3, 3),
                            "p99_ms": round(_percentile(lat, 0.99) * 1e3, 3),
                            "mean_ms": round(statistics.mean(lat) * 1e3, 3)},
        }
    finally:
        for r in rafts.values():
            r.shutdown()
            r.log_store.close()
            r.state_machine.close()
        net.close()
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyraft.tools.bench_inprocess", description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=50_000)
    ap.add_argument("--inflight", type=int, default=5_000)
    ap.add_argument("--sync-writes", type=int, default=2_000)
    ap.add_argument("--payload", type=int, default=10, help="value size in bytes")
    ap.add_argument("--lmdb", action="store_true", help="LmdbLogStore + KVStateMachine, fsync on")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = run(a.writes, a.inflight, a.sync_writes, a.lmdb, a.payload)
    if a.json:
        print(json.dumps(res))
    else:
        s = res["sync_writer"]
        print(f"3 nodes in one process, {res['stores']} stores, {res['payload_bytes']}-byte values")
        print(f"  throughput  {res['throughput_ops_s']:>8} writes/s  ({res['writes']} writes, {res['inflight']} in flight)")
        print(f"  sync writer p50 {s['p50_ms']} ms   p99 {s['p99_ms']} ms   ({s['n']} writes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
