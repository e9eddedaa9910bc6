"""The PySyncObj side of ``pyraft-bench --baseline pysyncobj``: the same workload on PySyncObj.

Three (or five) PySyncObj processes on 127.0.0.1, each ``python -m
pyraft.tools.bench_pysyncobj node ...``, driven over stdin/stdout JSON lines
like the pyraft nodes.  The replicated object is a trivial setter
(``@replicated def set(self, value)``: counts and keeps the last value, the
PySyncObj twin of pyraft-bench's counting state machine).  Writes are issued
on the leader with PySyncObj's callback API, keeping the same number in flight
with the same load generator (:class:`pyraft.tools.bench.InflightLoad`).

Variants (``Scenario.system``):

- ``pysyncobj-memory``: nothing on disk (PySyncObj's default).
- ``pysyncobj-journal``: ``journalFile`` per node (PySyncObj writes it but
  never fsyncs it).
- ``pysyncobj-nobatch``: ``appendEntriesUseBatch=False`` (sync-writer latency
  without PySyncObj's batching delay).

Needs ``pip install pysyncobj`` (the ``bench`` extra: ``pip install -e '.[bench]'``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

from pyraft.tools.bench import (Emitter, InflightLoad, NodeProc, Progress, _drive, disk_usage, free_ports,
                                memory_info, run_sync_writer, stop_nodes)

__all__ = ["run", "node_main"]


def node_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="pyraft.tools.bench_pysyncobj node")
    p.add_argument("--self", required=True, help="host:port of this node")
    p.add_argument("--partners", required=True, help="comma-separated host:port of the others")
    p.add_argument("--journal", default=None, help="journal file (PySyncObj never fsyncs it)")
    p.add_argument("--no-batch", action="store_true", help="appendEntriesUseBatch=False")
    p.add_argument("--tune-gc", action="store_true", help="call pyraft.tune_gc() once started, as pyraft's nodes do")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    emit = Emitter()
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

    class Setter(SyncObj):
        def __init__(self, me: str, others: list[str], conf: Any) -> None:
            super().__init__(me, others, conf)
            self.count = 0
            self.value = None

        @replicated
        def set(self, value: Any) -> int:
            self.count += 1
            self.value = value
            return self.count

    kw: dict[str, Any] = {}
    if a.journal:
        kw["journalFile"] = a.journal
    if a.no_batch:
        kw["appendEntriesUseBatch"] = False
    obj = Setter(a.self, [x for x in a.partners.split(",") if x], SyncObjConf(**kw))
    if a.tune_gc:
        from pyraft import tune_gc
        tune_gc()
    emit(ev="ready", addr=a.self, pid=os.getpid())
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            cmd = json.loads(line)
            c = cmd.get("cmd")
            if c == "status":
                st = obj.getStatus()
                leader = st.get("leader")
                emit(ev="status", leader=str(leader) if leader is not None else None,
                     is_leader=obj._isLeader(), ready=obj.isReady(),
                     partners_connected=st.get("partner_nodes_count", 0), commit=st.get("commit_idx"),
                     applied=st.get("last_applied"), memory=memory_info(os.getpid()))
            elif c == "load":
                threading.Thread(target=_node_load, args=(obj, cmd, emit, FAIL_REASON.SUCCESS),
                                 name="bench-load", daemon=True).start()
            elif c == "stop":
                break
            else:
                emit(ev="error", message=f"unknown command {c!r}")
    finally:
        obj.destroy()
    emit(ev="stopped")
    return 0


def _node_load(obj: Any, cmd: dict, emit: Emitter, success: int) -> None:
    try:
        payload = int(cmd["payload"])
        values = [os.urandom(payload) for _ in range(1024)]
        if cmd.get("sync"):
            it = iter(range(1 << 62))

            def write() -> None:
                obj.set(values[next(it) & 1023], sync=True, timeout=10)

            res = run_sync_writer(write, cmd["duration"], cmd["warmup"], emit)
        else:
            load = InflightLoad(int(cmd["inflight"]), cmd["duration"], cmd["warmup"], emit)
            done = load.done
            setter = obj.set
            seq = [0]

            def issue(t0: float) -> None:
                i = seq[0] = seq[0] + 1

                def completed(result: Any, err: int) -> None:
                    done(t0, err == success, err)

                setter(values[i & 1023], callback=completed)

            res = load.run(issue)
            deadline = time.monotonic() + 10
            while load.completed < load.submitted and time.monotonic() < deadline:
                time.sleep(0.01)
        res["memory"] = memory_info(os.getpid())
        emit(ev="result", **res)
    except Exception as e:  # noqa: BLE001
        emit(ev="error", message=f"load: {type(e).__name__}: {e}")


class PySyncObjCluster:
    def __init__(self, n: int, root: str, *, journal: bool, no_batch: bool, tune_gc: bool) -> None:
        self.root = root
        ports = free_ports(["127.0.0.1"] * n)
        self.addrs = {i: f"127.0.0.1:{ports[i - 1]}" for i in range(1, n + 1)}
        self.nodes: dict[int, NodeProc] = {}
        self.dirs: dict[int, str] = {}
        for i, addr in self.addrs.items():
            d = os.path.join(root, f"node{i}")
            os.makedirs(d, exist_ok=True)
            self.dirs[i] = d
            argv = [sys.executable, "-m", "pyraft.tools.bench_pysyncobj", "node", "--self", addr,
                    "--partners", ",".join(v for k, v in self.addrs.items() if k != i)]
            if journal:
                argv += ["--journal", os.path.join(d, "journal.bin")]
            if no_batch:
                argv.append("--no-batch")
            if tune_gc:
                argv.append("--tune-gc")
            self.nodes[i] = NodeProc(f"pysyncobj{i}", argv, os.path.join(root, f"node{i}.log"))

    def start(self, timeout: float = 30.0) -> int:
        for n in self.nodes.values():
            n.expect("ready", timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = {i: n.call(cmd="status") for i, n in self.nodes.items()}
            leaders = [i for i, s in st.items() if s["is_leader"]]
            if len(leaders) == 1:
                lid = leaders[0]
                if all(s["ready"] and s["leader"] == self.addrs[lid] for s in st.values()):
                    return lid
            time.sleep(0.05)
        raise RuntimeError(f"PySyncObj: no stable leader within {timeout} s")

    def stop(self) -> None:
        stop_nodes(self.nodes.values())


def run(sc: Any, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Run scenario ``sc`` (system pysyncobj-memory / -journal / -nobatch) and return its result."""
    try:
        import pysyncobj  # noqa: F401
    except ImportError:
        raise RuntimeError("PySyncObj is not installed: pip install pysyncobj (or pip install -e '.[bench]')") \
            from None
    root = tempfile.mkdtemp(prefix="pysyncobj-bench-", dir=a.tmpdir)
    cluster = PySyncObjCluster(a.nodes, root, journal=sc.system == "pysyncobj-journal",
                               no_batch=sc.system == "pysyncobj-nobatch", tune_gc=a.gc == "tuned")
    try:
        lid = cluster.start()
        cmd = {"cmd": "load", "payload": sc.payload, "inflight": sc.inflight, "duration": a.duration,
               "warmup": a.warmup, "sync": sc.sync}
        res = _drive(cluster.nodes[lid], cluster.nodes, cmd, sc.label, progress, a.warmup + a.duration + 60)
        res["leader"] = lid
        res["disk_bytes"] = {str(i): disk_usage(d)["allocated"] for i, d in cluster.dirs.items()}
        return res
    finally:
        cluster.stop()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "node":
        return node_main(argv[1:])
    asked = bool(argv) and argv[0] in ("-h", "--help")
    print("usage: python -m pyraft.tools.bench_pysyncobj node --self HOST:PORT --partners H:P,H:P "
          "[--journal FILE] [--no-batch]\n(run the comparison with: pyraft-bench --baseline pysyncobj)",
          file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


if __name__ == "__main__":
    sys.exit(main())
