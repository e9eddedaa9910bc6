"""pyraft-bench: throughput and latency of a local pyraft cluster, and the same workload on PySyncObj.

Usage (see ``docs/benchmarks.md`` for the results and how they were made)::

    pyraft-bench                                  # 3 nodes, 10-byte writes, 10,000 in flight, fsync on
    pyraft-bench --payload 10,1024 --baseline pysyncobj --floor --sync-writer
    pyraft-bench --follower-down kill --duration 60   # leader memory with one follower down
    pyraft-bench --json --out result.json

Each node is its own process (``python -m pyraft.tools.bench node ...``): a
:class:`~pyraft.Raft` with :class:`~pyraft.transports.zmq.ZmqTransport` on a
free 127.0.0.1 port, :class:`~pyraft.stores.lmdb.LmdbLogStore` (fsync on unless
``--no-fsync``) and a state machine (``--sm kv``, the default:
:class:`~pyraft.kv.KVStateMachine`, what users embed; ``--sm floor``: the
state-machine floor, an in-memory counter that costs next to nothing to apply,
the like of PySyncObj's ``@replicated`` setter), all in a temporary directory.  The
controller (this process) talks to each node over its stdin/stdout, one JSON
object per line.  The load runs inside the leader's process
(``client_write_async`` with ``--inflight`` writes kept in flight), or with
``--mode client`` in separate client processes through ``KVClient``.

Figures: committed (applied on the leader) writes per second over the
measurement window (after ``--warmup``), latency percentiles of the writes
completed in it, CPU per node over it (from ``/proc/<pid>/stat``, in % of one
core), resident memory, and the bytes the node directories hold on disk.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import io
import json
import logging
import math
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from pyraft import Config, __version__
from pyraft.tools.kv import free_port, free_ports  # noqa: F401 - re-exported for the other benchmarks

if TYPE_CHECKING:  # the PySyncObj side imports this module too: nothing of pyraft it does not use
    from pyraft.types import LogId, StoredMembership

__all__ = ["main", "CountingStateMachine", "InflightLoad", "NodeProc", "percentiles", "free_port", "free_ports"]

log = logging.getLogger("pyraft.bench")

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# =====================================================================================
# Shared helpers (also used by tools/bench_pysyncobj.py)

def percentiles(samples: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max (and the count) of latencies in seconds, reported in milliseconds."""
    if not samples:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    s = sorted(samples)
    n = len(s)

    def q(p: float) -> float:
        return round(s[min(n - 1, int(p * n))] * 1e3, 3)

    return {"n": n, "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "max_ms": round(s[-1] * 1e3, 3),
            "mean_ms": round(sum(s) / n * 1e3, 3)}


class LatencyHistogram:
    """Latencies in constant memory: log-spaced buckets 1% wide (a long run does not grow the process).

    ``record(seconds)`` from any one thread at a time; ``summary()`` gives the
    same keys as :func:`percentiles` (each percentile within 1% of the truth;
    ``max_ms`` and ``mean_ms`` exact).
    """

    _PER_E = 100  # buckets per factor of e: 1% wide

    def __init__(self) -> None:
        self.counts = [0] * 2600  # up to e**26 us (about 2e11 us): anything
        self.n = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        us = seconds * 1e6
        self.counts[int(math.log(us + 1.0) * self._PER_E)] += 1
        self.n += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: dict) -> None:
        """Add a histogram sent as :meth:`to_dict`."""
        for b, c in other["counts"].items():
            self.counts[int(b)] += c
        self.n += other["n"]
        self.total += other["total"]
        self.max = max(self.max, other["max"])

    def to_dict(self) -> dict:
        return {"counts": {str(b): c for b, c in enumerate(self.counts) if c}, "n": self.n,
                "total": self.total, "max": self.max}

    def summary(self) -> dict[str, float | None]:
        if not self.n:
            return percentiles(())
        out: dict[str, float | None] = {"n": self.n}
        wanted = [("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99)]
        acc, k = 0, 0
        for b, c in enumerate(self.counts):
            if not c:
                continue
            acc += c
            while k < len(wanted) and acc > wanted[k][1] * self.n:
                us = math.exp((b + 0.5) / self._PER_E) - 1.0
                out[wanted[k][0]] = round(min(us / 1e3, self.max * 1e3), 3)
                k += 1
            if k == len(wanted):
                break
        out["max_ms"] = round(self.max * 1e3, 3)
        out["mean_ms"] = round(self.total / self.n * 1e3, 3)
        return out


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def memory_info(pid: int) -> dict[str, int]:
    """RSS and its anonymous / file-backed parts, in bytes, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def thread_names() -> dict[str, str]:
    """This process's threads: ``{native id: Python name}`` (what :func:`thread_stats` is given)."""
    return {str(t.native_id): t.name for t in threading.enumerate()}


def thread_kind(name: str) -> str:
    """A thread's name without the node and target ids, so the same thread of each node shares a row:
    ``pyraft-core-1`` -> ``pyraft-core``, ``pyraft-repl-1->2`` -> ``pyraft-repl``, libzmq's ``ZMQbg/IO/0``
    -> ``ZMQbg/IO``."""
    return re.sub(r"(-\d+(->\d+)?|/\d+)$", "", name)


def thread_stats(pid: int, names: dict[str, str] | None = None) -> dict[str, list[int]]:
    """``{thread kind: [nanoseconds on a CPU, voluntary context switches]}`` of every thread of ``pid``.

    From ``/proc/<pid>/task/<tid>/schedstat`` (the scheduler's own count, exact
    where the clock-tick figures of ``stat`` are samples) and ``status`` (a
    voluntary switch is a thread going to sleep: each is one wake-up later).
    ``names`` maps native thread ids to Python thread names (a node's
    ``status`` lists them); a thread it does not name goes by its kernel name
    (``comm``: libzmq's I/O threads name themselves).  Threads of one kind are
    summed (:func:`thread_kind`).
    """
    out: dict[str, list[int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}/"
        try:
            name = (names or {}).get(tid)
            if name is None:
                with open(base + "comm") as f:
                    name = f.read().strip()
            with open(base + "schedstat") as f:
                ns = int(f.read().split()[0])
            switches = 0
            with open(base + "status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        switches = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile (or no schedstat here)
        row = out.setdefault(thread_kind(name), [0, 0])
        row[0] += ns
        row[1] += switches
    return out


def thread_costs(before: dict[str, list[int]], after: dict[str, list[int]], ops: float) -> dict[str, dict]:
    """CPU microseconds and wake-ups per operation, by thread kind, between two :func:`thread_stats`
    readings over a window in which ``ops`` operations completed; kinds that cost next to nothing
    are left out, ``total`` sums them all."""
    if not ops:
        return {}
    out: dict[str, dict] = {}
    total_cpu = total_wakeups = 0.0
    for k, (ns, sw) in after.items():
        ns0, sw0 = before.get(k, (0, 0))
        cpu, wakeups = (ns - ns0) / 1e3 / ops, (sw - sw0) / ops
        total_cpu += cpu
        total_wakeups += wakeups
        if cpu >= 0.5 or wakeups >= 0.005:
            out[k] = {"cpu_us": round(cpu, 1), "wakeups": round(wakeups, 3)}
    out["total"] = {"cpu_us": round(total_cpu, 1), "wakeups": round(total_wakeups, 3)}
    return out


def disk_usage(path: str) -> dict[str, int]:
    """Bytes allocated on disk (st_blocks) and apparent bytes of every file under ``path``."""
    alloc = apparent = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return {"allocated": alloc, "apparent": apparent}


class GcTimer:
    """CPU time spent in the cyclic garbage collector, per generation (installed in node processes).

    CPU time of the collecting thread (it holds the GIL throughout): wall-clock
    time would add whatever else ran on the machine meanwhile.
    """

    def __init__(self) -> None:
        import gc
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.thread_time()
        else:
            g = info.get("generation", 2)
            self.seconds[g] += time.thread_time() - self._t0
            self.count[g] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"seconds": [round(x, 3) for x in self.seconds], "collections": list(self.count)}


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": [round(x, 2) for x in load]}


class Emitter:
    """One JSON object per line on stdout, from any thread of a node process."""

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, **obj: Any) -> None:
        line = json.dumps(obj, separators=(",", ":"), default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class InflightLoad:
    """Keeps ``inflight`` operations outstanding for ``warmup + duration`` seconds.

    ``issue(done)`` starts one operation; the system under test calls
    ``done(t0, ok)`` when it completes (``t0`` is what ``issue`` was given,
    passed back so that no per-operation state is kept here).  Completions may
    come on any thread.  Used unchanged for pyraft and PySyncObj, so that the
    load generator costs both the same.
    """

    def __init__(self, inflight: int, duration: float, warmup: float, emit: Callable[..., None],
                 progress_every: float = 1.0) -> None:
        self.inflight = inflight
        self.duration = duration
        self.warmup = warmup
        self.emit = emit
        self.progress_every = progress_every
        self.submitted = 0
        self.completed = 0      # written by completion callbacks
        self.failed = 0
        self.first_error: str | None = None
        self.measuring = False
        self.ok_measured = 0    # successful completions while measuring
        self.latencies = LatencyHistogram()
        self._waiting = False
        self._wake = threading.Event()
        self._refill = max(1, inflight // 8)

    def done(self, t0: float, ok: bool, error: Any = None) -> None:
        t = time.perf_counter()
        self.completed += 1
        if not ok:
            self.failed += 1
            if self.first_error is None:
                self.first_error = repr(error)
        elif self.measuring:
            self.ok_measured += 1
            self.latencies.record(t - t0)
        if self._waiting and self.submitted - self.completed <= self.inflight - self._refill:
            self._waiting = False
            self._wake.set()

    def run(self, issue: Callable[[float], None]) -> dict[str, Any]:
        pc = time.perf_counter
        start = pc()
        measure_at = start + self.warmup
        end = measure_at + self.duration
        next_progress = start + self.progress_every
        t_measure = None
        last_c, last_t = 0, start
        inflight = self.inflight
        while True:
            now = pc()
            if t_measure is None and now >= measure_at:
                t_measure = now
                self.failed_at_start = self.failed
                self.measuring = True
                self.emit(ev="measuring", completed=self.completed, threads=thread_names())
            if now >= end:
                break
            if now >= next_progress:
                c = self.completed
                self.emit(ev="progress", phase="measure" if self.measuring else "warmup",
                          elapsed=round(now - start, 2), completed=c,
                          rate=round((c - last_c) / (now - last_t)), failed=self.failed)
                last_c, last_t = c, now
                next_progress = now + self.progress_every
            room = inflight - (self.submitted - self.completed)
            if room < self._refill:
                self._wake.clear()
                self._waiting = True
                if inflight - (self.submitted - self.completed) < self._refill:
                    self._wake.wait(0.01)
                self._waiting = False
                continue
            for _ in range(min(room, 4096)):
                self.submitted += 1
                issue(pc())
            if self.failed and self.failed - getattr(self, "failed_at_start", 0) > 1000 and \
                    self.failed * 2 > self.completed:
                break  # mostly failing: stop early, the result says why
        t_end = pc()
        self.measuring = False
        ops = self.ok_measured
        elapsed = t_end - (t_measure or start)
        return {
            "ops": ops,
            "elapsed_s": round(elapsed, 3),
            "ops_per_s": round(ops / elapsed, 1) if elapsed > 0 else 0.0,
            "latency": self.latencies.summary(),
            "failed": self.failed,
            "first_error": self.first_error,
            "submitted": self.submitted,
            "inflight": inflight,
        }


def run_sync_writer(write: Callable[[], Any], duration: float, warmup: float,
                    emit: Callable[..., None]) -> dict[str, Any]:
    """One writer, one synchronous write at a time: the latency of a lone write."""
    pc = time.perf_counter
    start = pc()
    measure_at = start + warmup
    end = measure_at + duration
    lat = LatencyHistogram()
    n = failed = 0
    first_error = None
    measuring = False
    next_progress = start + 1.0
    t_measure = None
    while True:
        t0 = pc()
        if t0 >= end:
            break
        if not measuring and t0 >= measure_at:
            measuring = True
            t_measure = t0
            emit(ev="measuring", completed=n, threads=thread_names())
        if t0 >= next_progress:
            emit(ev="progress", phase="measure" if measuring else "warmup", elapsed=round(t0 - start, 2),
                 completed=n, rate=round(n / (t0 - start)), failed=failed)
            next_progress = t0 + 1.0
        try:
            write()
        except Exception as e:  # noqa: BLE001 - counted and reported
            failed += 1
            first_error = first_error or repr(e)
            time.sleep(0.01)
            continue
        if measuring:
            lat.record(pc() - t0)
        n += 1
    elapsed = pc() - (t_measure or start)
    return {"ops": lat.n, "elapsed_s": round(elapsed, 3), "ops_per_s": round(lat.n / elapsed, 1),
            "latency": lat.summary(), "failed": failed, "first_error": first_error, "inflight": 1}


class NodeProc:
    """A node process driven over stdin/stdout JSON lines (pyraft or PySyncObj side)."""

    def __init__(self, name: str, argv: list[str], log_path: str, env: dict | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     env=env, text=True, bufsize=1)
        self.pid = self.proc.pid
        self.events: queue.Queue = queue.Queue()
        self.info: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read, name=f"bench-read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"ev": "noise", "line": line})
        self.events.put({"ev": "exit", "code": self.proc.wait()})

    def send(self, **cmd: Any) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; see {self.log_path}")
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, ev: str, timeout: float, on_other: Callable[[dict], None] | None = None) -> dict:
        """The next event named ``ev``; others go to ``on_other``.  RuntimeError on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no {ev!r} within {timeout} s; see {self.log_path}")
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if e.get("ev") == ev:
                return e
            if e.get("ev") == "exit":
                raise RuntimeError(f"{self.name} exited (code {e.get('code')}) while waiting for {ev!r}; "
                                   f"last log lines:\n{tail(self.log_path)}")
            if e.get("ev") == "error":
                raise RuntimeError(f"{self.name}: {e.get('message')}")
            if on_other is not None:
                on_other(e)

    def call(self, timeout: float = 10.0, **cmd: Any) -> dict:
        """Send a command and return its reply event (``ev == cmd``)."""
        self.send(**cmd)
        return self.expect(cmd["cmd"], timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="stop")
                self.proc.wait(timeout)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.kill()
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)  # in case it was paused
            except OSError:
                pass
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


def stop_nodes(nodes: Iterable[NodeProc]) -> None:
    """Stop node processes in parallel (each gets the stop command, then a kill past its timeout)."""
    threads = [threading.Thread(target=n.stop) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return "(no log)"


class Progress:
    """The one-line progress display on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._tty = sys.stderr.isatty()
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled or not self._tty:
            return
        pad = max(0, self._width - len(text))
        sys.stderr.write("\r" + text + " " * pad)
        sys.stderr.flush()
        self._width = len(text)

    def done(self, text: str | None = None) -> None:
        if not self.enabled:
            return
        if text is not None:
            if not self._tty:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
                return
            self.show(text)
        if self._width:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self._width = 0


# =====================================================================================
# The state-machine floor (--sm floor): counts what it applies (the PySyncObj "@replicated setter")

#: --sm: the built-in KVStateMachine (default), or the floor (CountingStateMachine)
SM_CHOICES = ("kv", "floor")

class CountingStateMachine:
    """An in-memory :class:`~pyraft.storage.StateMachine` that counts entries and keeps the last command.

    For benchmarks: it costs next to nothing, so the figures show the cost of
    replication itself.  Its snapshot is ``[count, last command]``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _snapshot
        self.count = 0
        self.last: Any = None
        self._applied: LogId | None = None
        self._membership: StoredMembership | None = None
        self._snapshot: tuple[Any, bytes] | None = None

    def applied_state(self):
        return self._applied, self._membership

    def apply(self, entries):
        from pyraft.types import EntryKind, StoredMembership
        n = 0
        for e in entries:
            if e.kind == EntryKind.MEMBERSHIP:
                self._membership = StoredMembership(e.log_id, e.payload)
            elif e.kind == EntryKind.NORMAL:
                n += 1
        if n:
            self.last = entries[-1].payload
        self.count += n
        self._applied = entries[-1].log_id
        return [None] * len(entries)

    def build_snapshot(self):
        import msgpack

        from pyraft.types import SnapshotMeta
        meta = SnapshotMeta(self._applied, self._membership, f"count-{self._applied}")
        data = msgpack.packb([self.count], use_bin_type=True)
        with self._lock:
            self._snapshot = (meta, data)
        return meta

    def current_snapshot(self):
        with self._lock:
            return None if self._snapshot is None else self._snapshot[0]

    def open_snapshot(self):
        with self._lock:
            if self._snapshot is None:
                return None
            meta, data = self._snapshot
        return meta, io.BytesIO(data)

    def begin_receiving_snapshot(self):
        return io.BytesIO()

    def install_snapshot(self, meta, data):
        import msgpack
        raw = data.read()
        data.close()
        (self.count,) = msgpack.unpackb(raw)
        self._applied = meta.last_log_id
        self._membership = meta.last_membership
        with self._lock:
            self._snapshot = (meta, raw)

    def close(self) -> None:
        pass


# =====================================================================================
# The node process: python -m pyraft.tools.bench node ...

def _make_command(sm: str, payload: int, i: int) -> Any:
    value = os.urandom(payload)
    if sm == "kv":
        return {"op": "put", "key": f"k{i}", "value": value}
    return value


def node_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="pyraft.tools.bench node")
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--sm", choices=SM_CHOICES, default="kv")
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--cluster", default="bench")
    p.add_argument("--config", default="{}", help="JSON of pyraft.Config fields")
    p.add_argument("--serve-kv", action="store_true", help="serve KVClient requests (pyraft.kv.server)")
    p.add_argument("--stages", metavar="FILE", help="probe the runtime (tools/stages.py); records to FILE at stop")
    p.add_argument("--tune-gc", action="store_true", help="call pyraft.tune_gc() once started, as pyraft-kv serve does")
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("PYRAFT_BENCH_LOG", "WARNING").upper(), stream=sys.stderr,
                        format=f"%(asctime)s node{a.id} %(name)s %(levelname)s %(message)s")
    emit = Emitter()
    gct = GcTimer()

    from pyraft import Config, Node, Raft
    from pyraft.stores.lmdb import LmdbLogStore
    from pyraft.transports.zmq import ZmqTransport

    if a.stages:
        from . import stages
        stages.install()
    cfg = Config.from_dict({"cluster_name": a.cluster, **json.loads(a.config)})
    transport = ZmqTransport(a.id, "tcp://127.0.0.1:*", cluster_name=a.cluster)
    store = LmdbLogStore(a.data_dir, node_id=a.id, cluster_name=a.cluster, sync=not a.no_fsync)
    if a.sm == "kv":
        from pyraft.kv import KVStateMachine
        sm: Any = KVStateMachine(a.data_dir)
    else:
        sm = CountingStateMachine()
    raft = Raft(a.id, cfg, transport, store, sm)
    if a.serve_kv:
        _serve_kv(raft)
    if a.tune_gc:
        from pyraft import tune_gc
        tune_gc()
    emit(ev="ready", id=a.id, addr=transport.endpoint, pid=os.getpid())

    load_thread: threading.Thread | None = None
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            cmd = json.loads(line)
            c = cmd.get("cmd")
            try:
                if c == "init":
                    raft.initialize({int(k): Node(v) for k, v in cmd["peers"].items()})
                    emit(ev="init")
                elif c == "status":
                    m = raft.metrics()
                    emit(ev="status", state=str(m.state), leader=m.current_leader, term=m.current_term,
                         last_log_index=m.last_log_index, committed=m.committed.index if m.committed else 0,
                         applied=m.last_applied.index if m.last_applied else 0,
                         voters=sorted(m.membership.voter_ids) if m.membership else [],
                         membership_committed=m.membership_committed,
                         memory=memory_info(os.getpid()), gc=gct.snapshot(),
                         threads=thread_names())
                elif c == "load":
                    load_thread = threading.Thread(target=_node_load, args=(raft, cmd, emit, a.sm, gct),
                                                   name="bench-load", daemon=True)
                    load_thread.start()
                elif c == "stop":
                    break
                else:
                    emit(ev="error", message=f"unknown command {c!r}")
            except Exception as e:  # noqa: BLE001 - reported to the controller
                emit(ev="error", message=f"{c}: {type(e).__name__}: {e}")
    finally:
        raft.shutdown(10)
        store.close()
        sm.close()
        if a.stages:
            stages.dump(a.stages)
    emit(ev="stopped")
    return 0


def _serve_kv(raft: Any) -> None:
    """Serve KVClient requests on this node (pyraft.kv.server)."""
    from pyraft.kv.server import serve_kv
    serve_kv(raft)


def _node_load(raft: Any, cmd: dict, emit: Emitter, sm: str, gct: GcTimer | None = None) -> None:
    try:
        payload = int(cmd["payload"])
        commands = [_make_command(sm, payload, i) for i in range(1024)]
        if cmd.get("sync"):
            it = iter(range(1 << 62))

            def write() -> None:
                raft.client_write(commands[next(it) & 1023], timeout=10)

            res = run_sync_writer(write, cmd["duration"], cmd["warmup"], emit)
        else:
            load = InflightLoad(int(cmd["inflight"]), cmd["duration"], cmd["warmup"], emit)
            done = load.done
            write_async = raft.client_write_async
            seq = [0]

            def completed(f: Any) -> None:
                e = f.exception()
                done(f.bench_t0, e is None, e)

            def issue(t0: float) -> None:
                i = seq[0] = seq[0] + 1
                try:
                    f = write_async(commands[i & 1023])
                except Exception as e:  # noqa: BLE001 - not leader any more, shut down, ...
                    done(t0, False, e)
                    return
                f.bench_t0 = t0
                f.add_done_callback(completed)

            res = load.run(issue)
            # let the writes still in flight finish, so the node stops cleanly
            deadline = time.monotonic() + 10
            while load.completed < load.submitted and time.monotonic() < deadline:
                time.sleep(0.01)
        res["memory"] = memory_info(os.getpid())
        if gct is not None:
            res["gc"] = gct.snapshot()
        emit(ev="result", **res)
    except Exception as e:  # noqa: BLE001
        log.exception("load failed")
        emit(ev="error", message=f"load: {type(e).__name__}: {e}")


# =====================================================================================
# A KVClient load process (--mode client): python -m pyraft.tools.bench client ...

def client_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="pyraft.tools.bench client")
    p.add_argument("--system", choices=("pyraft", "etcd"), default="pyraft")
    p.add_argument("--cluster", required=True, help="pyraft: ID=ADDR,... of the nodes; etcd: HOST:PORT,...")
    p.add_argument("--cluster-name", default="bench")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--payload", type=int, default=10)
    p.add_argument("--op", choices=("put", "get"), default="put",
                   help="put: each thread writes its own keys; get: linearizable reads of one key")
    p.add_argument("--name", default="c")
    p.add_argument("--futures", action="store_true",
                   help="put: one thread keeps --threads puts in flight (KVClient.put_async; etcd: a gRPC future)")
    a = p.parse_args(argv)
    if a.futures and a.op != "put":
        p.error("--futures: puts only")
    emit = Emitter()
    if a.system == "etcd":
        from .bench_etcd import etcd_client
        put, get, close, put_async = etcd_client(a.cluster.split(","), timeout=10.0)
    else:
        from pyraft.kv import KVClient
        client = KVClient(a.cluster, timeout=10.0, cluster_name=a.cluster_name)
        put, get, close, put_async = client.put, client.get, client.close, client.put_async
    value = os.urandom(a.payload)
    if a.op == "get":
        put(f"{a.name}read", value)  # the key the readers read, written before the clock starts
    emit(ev="ready", pid=os.getpid())
    cmd = json.loads(sys.stdin.readline())
    if a.futures:
        res = futures_loop(put_async, a.threads, value, a.name, cmd["duration"], cmd["warmup"])
    else:
        res = closed_loop(put, get, a.op, a.threads, value, a.name, cmd["duration"], cmd["warmup"])
    emit(ev="result", **res)
    close()
    return 0


def closed_loop(put: Callable[[str, bytes], Any], get: Callable[[str], Any], op: str, threads: int,
                value: bytes, name: str, duration: float, warmup: float) -> dict[str, Any]:
    """``threads`` threads, each one synchronous call at a time for ``warmup + duration`` s.

    The same loop drives every system: ``op`` "put" writes ``value`` under
    1,024 keys per thread in turn, "get" reads the key ``<name>read``.  The
    calls that start and end inside the measured window count.
    """
    start = time.perf_counter()
    measure_at, end = start + warmup, start + warmup + duration
    lat = [LatencyHistogram() for _ in range(threads)]
    errors: list[str] = []
    read_key = f"{name}read"

    def worker(t: int) -> None:
        pc = time.perf_counter
        mine = lat[t]
        i = 0
        prefix = f"{name}{t}-"
        while True:
            t0 = pc()
            if t0 >= end:
                return
            try:
                if op == "put":
                    put(f"{prefix}{i & 1023}", value)
                else:
                    get(read_key)
            except Exception as e:  # noqa: BLE001 - counted
                errors.append(repr(e))
                continue
            t1 = pc()
            if measure_at <= t0 and t1 <= end:
                mine.record(t1 - t0)
            i += 1

    ths = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    total = LatencyHistogram()
    for h in lat:
        total.merge(h.to_dict())
    return _load_result(total, duration, errors, threads)


def _load_result(hist: LatencyHistogram, duration: float, errors: list[str], threads: int) -> dict[str, Any]:
    """What a client process reports of its load (the ``result`` event)."""
    return {"ops": hist.n, "elapsed_s": duration, "errors": len(errors), "threads": threads,
            "first_error": errors[0] if errors else None, "histogram": hist.to_dict()}


def futures_loop(put_async: Callable[[str, bytes], Any], inflight: int, value: bytes, name: str,
                 duration: float, warmup: float) -> dict[str, Any]:
    """One thread keeps ``inflight`` puts in flight (``KVClient.put_async``) for ``warmup + duration`` s.

    It waits for the oldest future, records its latency and starts the next
    put in its place: the closed loop of :func:`closed_loop` with futures
    for threads.  The calls that start and end inside the measured window count.
    """
    pc = time.perf_counter
    start = pc()
    measure_at, end = start + warmup, start + warmup + duration
    lat = LatencyHistogram()
    errors: list[str] = []
    window: collections.deque = collections.deque()
    i = 0
    while True:
        now = pc()
        while len(window) < inflight and now < end:
            window.append((now, put_async(f"{name}{i & 65535}", value)))
            i += 1
        if not window:
            break
        t0, fut = window.popleft()
        e = fut.exception()
        if e is not None:
            errors.append(repr(e))
        elif measure_at <= t0 and (t1 := pc()) <= end:
            lat.record(t1 - t0)
    return _load_result(lat, duration, errors, 1)


def start_clients(system: str, spec: str, *, procs: int, threads: int, payload: int, op: str, root: str,
                  tag: str, cluster_name: str = "bench", futures: bool = False) -> list[NodeProc]:
    """``procs`` client processes (``python -m pyraft.tools.bench client``), ready to run."""
    clients = []
    try:
        for n in range(procs):
            clients.append(NodeProc(f"{tag}-client{n}", [
                sys.executable, "-m", "pyraft.tools.bench", "client", "--system", system, "--cluster", spec,
                "--cluster-name", cluster_name, "--threads", str(threads), "--payload", str(payload),
                "--op", op, "--name", f"{tag}{n}-"] + (["--futures"] if futures else []),
                os.path.join(root, f"{tag}-client{n}.log")))
        for c in clients:
            c.expect("ready", 60)
    except BaseException:
        for c in clients:
            c.kill()
            c._log.close()
        raise
    return clients


def drive_clients(clients: list[NodeProc], servers: dict[Any, int], a: argparse.Namespace, label: str,
                  progress: Progress, thread_names: dict[Any, dict[str, str]] | None = None) -> dict[str, Any]:
    """Run the clients' load; the servers' (``key -> pid``) CPU, wake-ups and memory over the measured window.

    The client processes are killed afterwards.  ``cpu_us_per_op`` is per
    server and ``total`` (the servers' CPU microseconds per operation);
    ``by_thread`` is per server, by thread (:func:`thread_costs`), its threads
    named by ``thread_names`` (``key -> {native id: name}``).
    """
    try:
        for c in clients:
            c.send(duration=a.duration, warmup=a.warmup)
        t0 = time.monotonic()
        time.sleep(a.warmup)
        cpu0 = {k: cpu_seconds(pid) for k, pid in servers.items()}
        ccpu0 = [cpu_seconds(c.pid) for c in clients]
        th0 = {k: thread_stats(pid, (thread_names or {}).get(k)) for k, pid in servers.items()}
        t1 = time.monotonic()
        while time.monotonic() < t1 + a.duration:
            progress.show(f"  {label}: {time.monotonic() - t0:5.1f}/{a.warmup + a.duration:.0f}s")
            time.sleep(0.25)
        cpu1 = {k: cpu_seconds(pid) for k, pid in servers.items()}
        ccpu1 = [cpu_seconds(c.pid) for c in clients]
        th1 = {k: thread_stats(pid, (thread_names or {}).get(k)) for k, pid in servers.items()}
        t2 = time.monotonic()
        results = [c.expect("result", 60 + a.duration) for c in clients]
    finally:
        for c in clients:
            c.kill()
            c._log.close()
    lat = LatencyHistogram()
    for r in results:
        lat.merge(r["histogram"])
    ops = sum(r["ops"] for r in results)
    res: dict[str, Any] = {
        "ops": ops, "elapsed_s": a.duration, "ops_per_s": round(ops / a.duration, 1),
        "latency": lat.summary(), "failed": sum(r["errors"] for r in results),
        "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
        "client_threads_used": sum(r["threads"] for r in results),
        "cpu_percent": {str(k): round((c1 - c0) / (t2 - t1) * 100, 1)
                        for k, c0 in cpu0.items() if c0 is not None and (c1 := cpu1[k]) is not None},
        "memory": {str(k): memory_info(pid) for k, pid in servers.items()},
    }
    if res["ops_per_s"]:
        per = {k: round(v * 1e4 / res["ops_per_s"], 2) for k, v in res["cpu_percent"].items()}
        per["total"] = round(sum(per.values()), 1)
        res["cpu_us_per_op"] = per
        # the client processes' own CPU (they share the machine with the servers)
        spent = sum(b - a for a, b in zip(ccpu0, ccpu1) if a is not None and b is not None)
        res["client_cpu_us_per_op"] = round(spent / (t2 - t1) * 1e6 / res["ops_per_s"], 1)
        res["client_cpu_percent"] = round(spent / (t2 - t1) * 100, 1)
        # per operation at the rate the clients measured, over the window the threads were read
        res["by_thread"] = {str(k): thread_costs(th0[k], th1[k], res["ops_per_s"] * (t2 - t1)) for k in th0}
    return res


def run_client_mode(a: argparse.Namespace, payload: int, threads: int, progress: Progress) -> dict[str, Any]:
    """KVClient processes drive a KV cluster (each thread: one synchronous put at a time)."""
    root = tempfile.mkdtemp(prefix="pyraft-bench-client-", dir=a.tmpdir)
    cluster = PyraftCluster(a.nodes, root, sm="kv", fsync=not a.no_fsync, config=a.config_dict, serve_kv=True,
                            tune_gc=a.gc == "tuned")
    spies: list = []
    try:
        lid = cluster.start()
        label = (f"pyraft KVClient {payload}B x {a.clients * threads} "
                 + (f"futures ({a.clients} thread(s))" if a.client_futures else "threads"))
        clients = start_clients("pyraft", cluster.spec(), procs=a.clients, threads=threads, payload=payload,
                                op="put", root=root, tag="c", futures=a.client_futures)
        names = {k: n.call(cmd="status")["threads"] for k, n in cluster.nodes.items()}
        if a.py_spy:
            follower = next(i for i in cluster.nodes if i != lid)
            spies = _start_py_spy(a, root, {f"leader{lid}": cluster.nodes[lid].pid,
                                            f"follower{follower}": cluster.nodes[follower].pid},
                                  Scenario("pyraft-kvclient", payload, 0, False, label))
        res = drive_clients(clients, {k: n.pid for k, n in cluster.nodes.items()}, a, label, progress, names)
        for sp in spies:
            sp.wait(a.warmup + a.duration + 30)
        res.update({"inflight": a.clients * threads, "clients": a.clients, "client_threads": threads,
                    "leader": lid,
                    "disk_bytes": {str(i): disk_usage(d)["allocated"] for i, d in cluster.data_dirs.items()}})
        progress.done(f"  {label}: {res['ops_per_s']:,.0f} ops/s, p50 {res['latency']['p50_ms']} ms")
        return res
    except Exception as e:  # noqa: BLE001
        progress.done()
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        for sp in spies:
            if sp.poll() is None:
                sp.kill()
        cluster.stop()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


# =====================================================================================
# The controller

class Scenario:
    """One measurement: what to run and how."""

    def __init__(self, system: str, payload: int, inflight: int, sync: bool, label: str) -> None:
        self.system = system      # "pyraft", "pysyncobj-memory", "pysyncobj-journal", ...
        self.payload = payload
        self.inflight = inflight
        self.sync = sync
        self.label = label


class PyraftCluster:
    """N pyraft node processes in a temporary directory."""

    def __init__(self, n: int, root: str, *, sm: str, fsync: bool, config: dict, serve_kv: bool = False,
                 stages: bool = False, tune_gc: bool) -> None:
        self.root = root
        self.nodes: dict[int, NodeProc] = {}
        self.addrs: dict[int, str] = {}
        self.data_dirs: dict[int, str] = {}
        #: the probe record file of each node (--stages)
        self.stage_files: dict[int, str] = {}
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        for i in range(1, n + 1):
            d = os.path.join(root, f"node{i}")
            self.data_dirs[i] = d
            argv = [sys.executable, "-m", "pyraft.tools.bench", "node", "--id", str(i), "--data-dir", d,
                    "--sm", sm, "--config", json.dumps(config)]
            if not fsync:
                argv.append("--no-fsync")
            if serve_kv:
                argv.append("--serve-kv")
            if tune_gc:
                argv.append("--tune-gc")
            if stages:
                self.stage_files[i] = os.path.join(root, f"node{i}.stages")
                argv += ["--stages", self.stage_files[i]]
            self.nodes[i] = NodeProc(f"node{i}", argv, os.path.join(root, f"node{i}.log"), env)

    def start(self, timeout: float = 30.0) -> int:
        """Wait for every node, initialize the cluster on node 1, return the leader's id."""
        for i, n in self.nodes.items():
            e = n.expect("ready", timeout)
            self.addrs[i] = e["addr"]
        self.nodes[1].call(cmd="init", peers={str(i): a for i, a in self.addrs.items()}, timeout=timeout)
        deadline = time.monotonic() + timeout
        want = sorted(self.nodes)
        while time.monotonic() < deadline:
            st = {i: n.call(cmd="status") for i, n in self.nodes.items() if n.alive()}
            leaders = [i for i, s in st.items() if s["state"] == "Leader"]
            if len(leaders) == 1:
                lid = leaders[0]
                if all(s["leader"] == lid and s["voters"] == want for s in st.values()) and \
                        st[lid]["membership_committed"] and \
                        all(s["applied"] >= st[lid]["committed"] for s in st.values()):
                    return lid
            time.sleep(0.05)
        raise RuntimeError(f"no stable leader within {timeout} s")

    def spec(self) -> str:
        """``ID=ADDR,...``: what a KVClient (``--cluster``) is given."""
        return ",".join(f"{i}={addr}" for i, addr in self.addrs.items())

    def stop(self) -> None:
        stop_nodes(self.nodes.values())


def _drive(leader: NodeProc, all_nodes: dict[Any, NodeProc], cmd: dict, label: str, progress: Progress,
           timeout: float, rss_samples: list | None = None,
           thread_names: dict[Any, dict[str, str]] | None = None) -> dict[str, Any]:
    """Send the load command to ``leader`` and follow it to its result, sampling CPU and memory
    (and, given ``thread_names``, each node's CPU and wake-ups by thread: ``by_thread``)."""
    cpu0: dict[Any, float | None] = {}
    # The threads are read when measuring starts and at each progress report while it lasts (the
    # load's own thread ends with it, before its result is read), with the writes completed by then.
    th: dict[str, Any] = {}
    leader_key = next(k for k, n in all_nodes.items() if n is leader)

    def read_threads() -> dict[Any, dict[str, list[int]]]:
        return {k: thread_stats(n.pid, (thread_names or {}).get(k)) for k, n in all_nodes.items()}

    t_cpu0 = [0.0]
    total = cmd["warmup"] + cmd["duration"]
    t_start = time.monotonic()

    def on_event(e: dict) -> None:
        if e.get("ev") == "measuring":
            t_cpu0[0] = time.monotonic()
            for k, n in all_nodes.items():
                cpu0[k] = cpu_seconds(n.pid)
            if thread_names is not None and "completed" in e:
                # the leader's threads now: its load runs in one of them
                thread_names[leader_key] = {**thread_names.get(leader_key, {}), **e.get("threads", {})}
                th["first"] = (e["completed"], read_threads())
        elif e.get("ev") == "progress":
            if "first" in th and e.get("phase") == "measure":
                th["last"] = (e["completed"], read_threads())
            progress.show(f"  {label}: {e['phase']} {e['elapsed']:5.1f}/{total:.0f}s  "
                          f"{e['rate']:>9,} ops/s  failed {e['failed']}")
            if rss_samples is not None:
                rss_samples.append((round(time.monotonic() - t_start, 1), memory_info(leader.pid)))

    leader.send(**cmd)
    res = leader.expect("result", timeout, on_event)
    t_cpu1 = time.monotonic()
    cpu: dict[str, Any] = {}
    for k, n in all_nodes.items():
        c1 = cpu_seconds(n.pid)
        c0 = cpu0.get(k)
        if c0 is not None and c1 is not None and t_cpu1 > t_cpu0[0]:
            cpu[str(k)] = round((c1 - c0) / (t_cpu1 - t_cpu0[0]) * 100, 1)
    res["cpu_percent"] = cpu
    if res.get("ops_per_s"):
        # CPU microseconds per committed write, per node: steadier than ops/s on a shared machine
        per = {k: round(v * 1e4 / res["ops_per_s"], 2) for k, v in cpu.items()}
        per["total"] = round(sum(per.values()), 1)
        res["cpu_us_per_op"] = per
    if "last" in th:
        (c0, th0), (c1, th1) = th["first"], th["last"]
        res["by_thread"] = {str(k): thread_costs(th0[k], th1[k], c1 - c0) for k in th1 if k in th0}
    progress.done(f"  {label}: {res['ops_per_s']:,.0f} ops/s, p50 {res['latency']['p50_ms']} ms, "
                  f"p99 {res['latency']['p99_ms']} ms")
    return res


def run_pyraft(sc: Scenario, a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="pyraft-bench-", dir=a.tmpdir)
    stages = bool(a.stages and sc.sync)
    cluster = PyraftCluster(a.nodes, root, sm=a.sm, fsync=not a.no_fsync, config=a.config_dict, stages=stages,
                            tune_gc=a.gc == "tuned")
    spies: list[subprocess.Popen] = []
    try:
        lid = cluster.start()
        leader = cluster.nodes[lid]
        follower_id = next(i for i in cluster.nodes if i != lid)
        cmd = {"cmd": "load", "payload": sc.payload, "inflight": sc.inflight, "duration": a.duration,
               "warmup": a.warmup, "sync": sc.sync}
        if a.py_spy:
            spies = _start_py_spy(a, root, {f"leader{lid}": leader.pid,
                                            f"follower{follower_id}": cluster.nodes[follower_id].pid}, sc)
        names = {k: n.call(cmd="status")["threads"] for k, n in cluster.nodes.items()}
        res = _drive(leader, cluster.nodes, cmd, sc.label, progress, a.warmup + a.duration + 60,
                     thread_names=names)
        res["leader"] = lid
        res["gc_per_node"] = {}
        res["gc_share_of_cpu"] = {}
        for i, n in cluster.nodes.items():  # CPU seconds in the garbage collector, whole run
            try:
                gc_now = res["gc_per_node"][str(i)] = n.call(cmd="status", timeout=10)["gc"]
            except RuntimeError:
                continue
            cpu = cpu_seconds(n.pid)
            if cpu:
                res["gc_share_of_cpu"][str(i)] = round(sum(gc_now["seconds"]) / cpu, 3)
        for s in spies:
            s.wait(a.warmup + a.duration + 30)
        res["disk_bytes"] = {str(i): disk_usage(d)["allocated"] for i, d in cluster.data_dirs.items()}
        if a.py_spy:
            res["profiles"] = a.py_spy
        if stages:
            cluster.stop()  # the nodes write their probe records as they stop
            from . import stages as stages_mod
            res["stages"] = stages_mod.analyze(cluster.stage_files, lid)
        return res
    finally:
        for s in spies:
            if s.poll() is None:
                s.kill()
        cluster.stop()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


def _start_py_spy(a: argparse.Namespace, root: str, pids: dict[str, int], sc: Scenario) -> list:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    os.makedirs(a.py_spy, exist_ok=True)
    out = []
    for name, pid in pids.items():
        path = os.path.join(a.py_spy, f"{sc.system}-{sc.payload}B-{name}.txt")
        out.append(subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--duration", str(int(a.warmup + a.duration)), "--rate", "250",
             "--format", "raw", "--threads", "--gil", "--nonblocking", "--output", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return out


_DOWN_VERB = {"kill": "killed", "pause": "paused (SIGSTOP)"}


def run_follower_down(a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Full load on the leader with one follower down (killed or paused): does the leader's memory stay bounded?"""
    root = tempfile.mkdtemp(prefix="pyraft-bench-down-", dir=a.tmpdir)
    cluster = PyraftCluster(a.nodes, root, sm=a.sm, fsync=not a.no_fsync, config=a.config_dict,
                            tune_gc=a.gc == "tuned")
    payload = a.payloads[0]
    try:
        lid = cluster.start()
        leader = cluster.nodes[lid]
        victim_id = max(i for i in cluster.nodes if i != lid)
        victim = cluster.nodes[victim_id]
        before = memory_info(leader.pid)
        if a.follower_down == "kill":
            victim.kill()
        else:
            os.kill(victim.pid, signal.SIGSTOP)
        samples: list = []
        cmd = {"cmd": "load", "payload": payload, "inflight": a.inflight, "duration": a.duration,
               "warmup": 0.0, "sync": False}
        res = _drive(leader, {k: v for k, v in cluster.nodes.items() if k != victim_id}, cmd,
                     f"follower {victim_id} {_DOWN_VERB[a.follower_down]}", progress, a.duration + 60, samples)
        if a.follower_down == "pause":
            os.kill(victim.pid, signal.SIGCONT)
        rss = [s[1].get("VmRSS", 0) for s in samples]
        anon = [s[1].get("RssAnon", 0) for s in samples]
        half = len(samples) // 2
        res.update({
            "victim": victim_id, "mode": a.follower_down, "leader": lid, "payload": payload,
            "rss_before_load": before,
            "rss_series": [[t, m.get("VmRSS", 0), m.get("RssAnon", 0), m.get("RssFile", 0)] for t, m in samples],
            "rss_max": max(rss) if rss else None,
            "rss_anon_first_half_max": max(anon[:half]) if half else None,
            "rss_anon_second_half_max": max(anon[half:]) if half else None,
            "disk_bytes": {str(i): disk_usage(d)["allocated"] for i, d in cluster.data_dirs.items()},
        })
        return res
    finally:
        cluster.stop()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


def run_floor(a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """tools/bench_floor.py's null-replication floor (LMDB + ZeroMQ, no Raft), run now, in this run.

    Returns ``{payload: result}`` plus ``"latency_single_entry"``, or ``{"error": ...}``.
    """
    argv = [sys.executable, "-m", "pyraft.tools.bench_floor", "--json", "--seconds", str(a.duration),
            "--payloads", ",".join(str(p) for p in a.payloads)]
    if a.tmpdir:
        argv += ["--dir", a.tmpdir]
    progress.show(f"  null-replication floor: running ({' '.join(argv[2:])})")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120 + 3 * a.duration * len(a.payloads))
    except subprocess.TimeoutExpired:
        progress.done()
        return {"error": "bench_floor timed out"}
    if out.returncode != 0:
        progress.done()
        return {"error": f"bench_floor exited {out.returncode}: {out.stderr.strip()[-500:]}"}
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        progress.done()
        return {"error": "bench_floor printed no JSON"}
    res: dict[str, Any] = {"raw": doc}
    for t in doc.get("throughput", []):
        res[str(t["payload_bytes"])] = {"ops_per_s": t["entries_per_s"], "batch": t.get("batch"),
                                        "inflight_batches": t.get("inflight"),
                                        "latency": {"p50_ms": t.get("batch_commit_ms_p50"),
                                                    "p99_ms": t.get("batch_commit_ms_p99")}}
    progress.done("  null-replication floor: " + ", ".join(
        f"{p}B {res[str(p)]['ops_per_s']:,.0f}/s" for p in a.payloads if str(p) in res))
    return res


def _fmt_rate(r: Any) -> str:
    return "-" if r is None else f"{r:,.0f}"


def _fmt_ms(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_table(doc: dict[str, Any]) -> str:
    lines = []
    stage_tables: list[dict] = []
    thread_tables: list[str] = []
    m = doc["machine"]
    lines.append(f"pyraft-bench  {doc['date']}  {m['cpus']} cpus ({m['cpu_model']}), Python {m['python']}, "
                 f"load avg at start {m['loadavg_at_start'][0]}")
    lines.append(f"command: {doc['command']}")
    lines.append(f"{doc['nodes']} nodes on 127.0.0.1, one process each; pyraft: LMDB fsync "
                 f"{'off' if doc['no_fsync'] else 'on'}, state machine {doc['sm']}; "
                 + (f"{doc['inflight']:,} writes in flight from the leader" if doc.get("mode") != "client" else
                    ("KVClient processes, each one thread keeping its calls in flight with put_async"
                     if doc.get("client_futures") else "KVClient processes, one synchronous call per thread"))
                 + f"; warmup {doc['warmup']} s, measured {doc['duration']} s")
    lines.append("garbage collector: " + ("pyraft.tune_gc() in every node process (--gc tuned)"
                                          if doc.get("gc", "tuned") == "tuned" else
                                          "Python's defaults in every node process (--gc default)"))
    lines.append("")
    hdr = (f"{'system':<30}{'payload':>8}{'ops/s':>11}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
           f"  {'cpu % per node':<16}{'cpu us/op':>10}  disk")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in doc["runs"]:
        res = r.get("result") or {}
        if "error" in res:
            lines.append(f"{r['system']:<30}{r['payload']:>7}B  error: {res['error']}")
            continue
        lat = res.get("latency", {})
        cpu = " ".join(f"{v:.0f}" for _k, v in sorted(res.get("cpu_percent", {}).items()))
        per_op = res.get("cpu_us_per_op") or {}
        per_op_s = f"{per_op['total']:.1f}" if "total" in per_op else "-"
        disk = sum(res.get("disk_bytes", {}).values()) if res.get("disk_bytes") else None
        disk_s = "-" if not disk else f"{disk / 1e6:.1f} MB"
        lines.append(f"{r['system']:<30}{r['payload']:>7}B{_fmt_rate(res.get('ops_per_s')):>11}"
                     f"{_fmt_ms(lat.get('p50_ms')):>9}{_fmt_ms(lat.get('p90_ms')):>9}{_fmt_ms(lat.get('p99_ms')):>9}"
                     f"{_fmt_ms(lat.get('max_ms')):>9}  {cpu:<16}{per_op_s:>10}  {disk_s}")
        if res.get("gc_share_of_cpu"):
            lines.append(f"{'':<30}{'':>8}  garbage collector, share of each node's CPU: " + " ".join(
                f"{v:.0%}" for _k, v in sorted(res["gc_share_of_cpu"].items())))
        if res.get("rounds"):
            lines.append(f"{'':<30}{'':>8}  rounds: " + ", ".join(_fmt_rate(x) for x in res["rounds"])
                         + " (the median is shown)")
        if res.get("stages"):
            stage_tables.append(res["stages"])
        if doc.get("by_thread") and res.get("by_thread"):
            thread_tables.append(render_by_thread(f"{r['system']} {r['payload']}B", res))
    if any(r["system"] == "null-replication floor" for r in doc["runs"]):
        lines.append("(null-replication floor: tools/bench_floor.py; its latency columns are per batch of "
                     "entries, not per write)")
    lines.append("cpu us/op: CPU microseconds per committed write, all nodes together")
    for t in thread_tables:
        lines.append("")
        lines.append(t)
    if stage_tables:
        from . import stages
        for st in stage_tables:
            lines.append("")
            lines.append(stages.render(st, doc.get("stage_floors")))
    summary = render_race(doc)
    if summary:
        lines.append("")
        lines.append(summary)
    if doc.get("ratios"):
        lines.append("")
        lines.append("ratios (pyraft / other, same run):")
        for k, v in doc["ratios"].items():
            lines.append(f"  {k:<40} {v:.2f}x")
    if doc.get("follower_down"):
        fd = doc["follower_down"]
        lines.append("")
        if "error" in fd:
            lines.append(f"follower down: error: {fd['error']}")
        else:
            mb = lambda b: f"{(b or 0) / 1e6:.0f} MB"  # noqa: E731
            lines.append(f"follower {fd['victim']} {_DOWN_VERB.get(fd['mode'], fd['mode'])} for {fd['elapsed_s']:.0f} s under full load "
                         f"({fd['ops_per_s']:,.0f} ops/s): leader RSS before {mb(fd['rss_before_load'].get('VmRSS'))}, "
                         f"max {mb(fd['rss_max'])}; anonymous RSS max first half "
                         f"{mb(fd['rss_anon_first_half_max'])}, second half {mb(fd['rss_anon_second_half_max'])}")
    return "\n".join(lines)


def render_by_thread(label: str, res: dict[str, Any]) -> str:
    """One run's ``by_thread`` as a table: a row per kind of thread, a column per node (the leader's first),
    each cell CPU microseconds / wake-ups per write."""
    by = res["by_thread"]
    lead = str(res.get("leader"))
    nodes = sorted(by, key=lambda k: (k != lead, k))
    kinds = sorted({k for n in nodes for k in by[n] if k != "total"},
                   key=lambda k: -sum(by[n].get(k, {}).get("cpu_us", 0) for n in nodes))
    heads = [f"node {n}" + (" (leader)" if n == lead else "") for n in nodes]
    w = max(22, *(len(k) + 2 for k in kinds))
    lines = [f"where each node's CPU went, {label}: CPU microseconds / wake-ups per write, by thread",
             f"  {'thread':<{w}}" + "".join(f"{h:>20}" for h in heads)]

    def cell(c: dict | None) -> str:
        if not c:
            return "-"
        cpu, wakeups = c["cpu_us"], c["wakeups"]
        return (f"{cpu:,.0f}" if cpu >= 10 else f"{cpu:.1f}") + " / " + (f"{wakeups:.1f}" if wakeups >= 1
                                                                         else f"{wakeups:.2f}")

    for k in kinds + ["total"]:
        lines.append(f"  {k:<{w}}" + "".join(f"{cell(by[n].get(k)):>20}" for n in nodes))
    return "\n".join(lines)


#: the race's targets: pyraft / PySyncObj throughput, and the lone writer's p50 and p99 in ms
RACE_TARGETS = {"pysyncobj-journal": 2.0, "pysyncobj-memory": 1.0}
LONE_WRITER_TARGET_MS = (0.8, 3.0)


def render_race(doc: dict[str, Any]) -> str:
    """The race against PySyncObj as one table (with --baseline pysyncobj): writes/s per payload and
    the ratios of this run (the median of the rounds' ratios with --rounds), then the lone writer."""
    rate = {(r["system"], r["payload"]): (r.get("result") or {}).get("ops_per_s") for r in doc["runs"]}
    payloads = [p for (system, p) in rate if system == "pyraft"]
    if not payloads or not any(("pysyncobj-journal", p) in rate for p in payloads):
        return ""
    ratios = doc.get("ratios") or {}
    out = [f"the race: pyraft ({doc['sm']} state machine, fsync {'off' if doc['no_fsync'] else 'on'}) "
           f"against PySyncObj, same run"]
    out.append(f"  {'':<26}{'pyraft':>10}{'journal':>10}{'':13}{'memory':>10}   "
               f"(PySyncObj's, each with pyraft's ratio to it)")
    for p in payloads:
        cells = [f"{_fmt_rate(rate.get(('pyraft', p))):>10}"]
        for other, target in RACE_TARGETS.items():
            key = _ratio_key("pyraft", other, p)
            ratio = ratios.get(key + " (median of rounds)", ratios.get(key))
            verdict = "" if ratio is None else ("ok" if ratio >= target else "BELOW")
            r_s = "-" if ratio is None else f"{ratio:.2f}x"
            cells.append(f"{_fmt_rate(rate.get((other, p))):>10} {r_s:>6} {verdict:<5}")
        out.append(f"  {f'writes/s, {p} B':<26}" + "".join(cells))
    lone = next((r for r in doc["runs"] if r["system"] == "pyraft sync-writer"), None)
    if lone is not None and "error" not in (lone.get("result") or {}):
        lat = lone["result"]["latency"]
        p50, p99 = lat.get("p50_ms"), lat.get("p99_ms")
        ok = p50 is not None and p99 is not None and p50 <= LONE_WRITER_TARGET_MS[0] and p99 <= LONE_WRITER_TARGET_MS[1]
        out.append(f"  {'lone writer p50 / p99 ms':<26}{_fmt_ms(p50):>10} / {_fmt_ms(p99)}  "
                   f"(target <= {LONE_WRITER_TARGET_MS[0]} / {LONE_WRITER_TARGET_MS[1]}: {'ok' if ok else 'BELOW'})")
    out.append(f"  targets: pyraft >= {RACE_TARGETS['pysyncobj-journal']}x PySyncObj with its journal, "
               f">= {RACE_TARGETS['pysyncobj-memory']}x in memory")
    return "\n".join(out)


def _ratio_key(a: str, b: str, payload: int) -> str:
    return f"{a} / {b} @ {payload}B"


def compute_ratios(runs: list[dict]) -> dict[str, float]:
    by: dict[tuple[str, int, bool], float] = {}
    for r in runs:
        res = r.get("result") or {}
        if res.get("ops_per_s"):
            by[(r["system"], r["payload"], r["sync"])] = res["ops_per_s"]
    out = {}
    for (system, payload, sync), rate in by.items():
        if system == "pyraft" or sync or system == "null-replication floor":
            continue
        mine = by.get(("pyraft", payload, False))
        if mine:
            out[_ratio_key("pyraft", system, payload)] = round(mine / rate, 3)
    return out


def median_value(values: Iterable[float | None]) -> float | None:
    """The (lower) median of the values that are not None; None when there is none."""
    ok = sorted(v for v in values if v is not None)
    return ok[(len(ok) - 1) // 2] if ok else None


def median_result(results: list[dict],
                  figure: Callable[[dict], float | None] = lambda r: r.get("ops_per_s") or None) -> dict:
    """The round whose ``figure`` (default: throughput) is the median, with every round's figure.

    Rounds without a figure (failed) are left out; if none has one, the first round as it is.
    """
    ok = [r for r in results if figure(r) is not None]
    if not ok:
        return results[0]
    ok.sort(key=lambda r: figure(r) or 0.0)  # (no None is left: "or" only satisfies the types)
    med = dict(ok[(len(ok) - 1) // 2])
    med["rounds"] = [figure(r) for r in results]
    return med


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "node":
        return node_main(argv[1:])
    if argv and argv[0] == "client":
        return client_main(argv[1:])
    p = argparse.ArgumentParser(prog="pyraft-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--nodes", type=int, choices=(3, 5), default=3, help="cluster size (default 3)")
    p.add_argument("--inflight", type=int, default=10_000, help="writes kept in flight (default 10000)")
    p.add_argument("--payload", default="10", help="command size in bytes; a comma list runs each (e.g. 10,1024)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)")
    p.add_argument("--sync-writer", action="store_true",
                   help="also measure one synchronous writer (latency of a lone write)")
    p.add_argument("--only-sync-writer", action="store_true", help="measure only the synchronous writer")
    p.add_argument("--no-fsync", action="store_true", help="LmdbLogStore(sync=False): NOT durable")
    p.add_argument("--sm", choices=SM_CHOICES, default="kv",
                   help="state machine: kv (KVStateMachine, LMDB: the default) or floor (an in-memory counter "
                        "that costs next to nothing to apply, like PySyncObj's setter: the state-machine floor)")
    p.add_argument("--mode", choices=("leader", "client"), default="leader",
                   help="leader: load generated in the leader's process; client: KVClient processes")
    p.add_argument("--clients", type=int, default=None,
                   help="client processes for --mode client (default 4; 1 per system with --baseline etcd)")
    p.add_argument("--client-threads", default="16",
                   help="threads per client process, each one synchronous KVClient.put at a time; a comma "
                        "list runs each (default 16)")
    p.add_argument("--client-futures", action="store_true",
                   help="--mode client: each client process runs one thread that keeps --client-threads "
                        "KVClient.put_async calls in flight, instead of that many threads")
    p.add_argument("--config", default="{}", help="JSON of pyraft.Config fields for the nodes")
    p.add_argument("--baseline", choices=("pysyncobj", "etcd"),
                   help="run the same workload on PySyncObj too; etcd: a 3-member etcd cluster against "
                        "pyraft-kv through clients in separate processes (implies --mode client; "
                        "tools/bench_etcd.py)")
    p.add_argument("--floor", action="store_true", help="run tools/bench_floor.py's null-replication floor too")
    p.add_argument("--follower-down", choices=("kill", "pause"),
                   help="instead: full load with one follower killed (or SIGSTOPped); track the leader's RSS")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every measurement, interleaved; report the median (with --baseline etcd: each "
                        "row's systems in turn, the median of the rounds' ratios)")
    p.add_argument("--stages", action="store_true",
                   help="with the synchronous writer: probe every node and show where a lone write's time goes, "
                        "next to this machine's floors (tools/stages.py); implies --sync-writer")
    p.add_argument("--by-thread", action="store_true",
                   help="after each pyraft run, where each node's CPU went: CPU microseconds and wake-ups per "
                        "write of each of its threads (RaftCore, SM worker, replication workers, transport, "
                        "libzmq's I/O threads, ...), from /proc/<pid>/task")
    p.add_argument("--gc", choices=("tuned", "default"), default="tuned",
                   help="tuned (the default): every node process, pyraft's and PySyncObj's alike, calls "
                        "pyraft.tune_gc() once started, as pyraft-kv serve does; default: Python's own "
                        "collector settings everywhere")
    p.add_argument("--py-spy", metavar="DIR", help="record py-spy raw profiles of the leader and a follower into DIR")
    p.add_argument("--tmpdir", default=None, help="where the node directories go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the node directories and logs")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document instead of a table")
    p.add_argument("--out", help="also write the JSON document to this file")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    try:
        a.payloads = [int(x) for x in str(a.payload).split(",") if x.strip()]
        a.thread_counts = [int(x) for x in str(a.client_threads).split(",") if x.strip()]
    except ValueError as e:
        p.error(f"--payload and --client-threads take integers, or comma lists of them: {e}")
    if not a.payloads:
        p.error(f"--payload must give at least one size, got {a.payload!r}")
    if not a.thread_counts or min(a.thread_counts) < 1:
        p.error("--client-threads must be positive")
    # NaN passes every comparison and inf never ends a run: both refused here.
    if not (math.isfinite(a.duration) and a.duration > 0):
        p.error(f"--duration must be a finite number of seconds > 0, got {a.duration!r}")
    if not (math.isfinite(a.warmup) and a.warmup >= 0):
        p.error(f"--warmup must be a finite number of seconds >= 0, got {a.warmup!r}")
    try:
        a.config_dict = json.loads(a.config)
        if not isinstance(a.config_dict, dict):
            raise ValueError("must be a JSON object")
        Config.from_dict(a.config_dict)  # what every node would refuse at start-up, refused here
    except (ValueError, TypeError) as e:
        p.error(f"--config: {e}")
    except RecursionError:
        p.error("--config: nests arrays or objects too deep to read")
    if a.out and (os.path.isdir(a.out) or not os.path.isdir(os.path.dirname(os.path.abspath(a.out)))):
        p.error(f"--out {a.out}: not a file in an existing directory")
    if a.tmpdir is not None and not os.path.isdir(a.tmpdir):
        p.error(f"--tmpdir {a.tmpdir}: not an existing directory")
    if a.baseline == "etcd":
        a.mode = "client"
    if a.clients is None:
        a.clients = 1 if a.baseline == "etcd" else 4
    if a.client_futures and (a.mode != "client" or a.follower_down):
        p.error("--client-futures changes the client processes of --mode client (or --baseline etcd)")
    if a.stages and (a.mode == "client" or a.follower_down):
        p.error("--stages profiles the lone writer on the leader: not with --mode client or --follower-down")
    if a.stages and not a.only_sync_writer:
        a.sync_writer = True
    if a.by_thread and (a.baseline == "etcd" or a.follower_down):
        p.error("--by-thread shows pyraft-bench's own runs (leader or client mode): not with --baseline etcd "
                "or --follower-down")
    if a.inflight < 1 or a.duration <= 0 or a.warmup < 0 or any(x < 0 for x in a.payloads):
        p.error("--inflight, --duration and --payload must be positive")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if a.rounds > 1 and (a.follower_down or (a.mode == "client" and a.baseline != "etcd")):
        p.error("--rounds repeats the leader-mode runs and the etcd comparison (not --mode client alone, "
                "not --follower-down)")
    progress = Progress(not a.quiet)
    doc: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["pyraft-bench", *argv]),
        "machine": machine_info(),
        "nodes": a.nodes, "inflight": a.inflight, "duration": a.duration, "warmup": a.warmup,
        "no_fsync": a.no_fsync, "sm": a.sm, "mode": a.mode, "config": a.config_dict, "gc": a.gc, "runs": [],
        "client_futures": a.client_futures,
        "by_thread": a.by_thread,
    }
    try:
        if a.follower_down:
            doc["follower_down"] = run_follower_down(a, progress)
        elif a.baseline == "etcd":
            from . import bench_etcd
            doc["etcd_comparison"] = bench_etcd.run(a, progress)
        elif a.mode == "client":
            for payload in a.payloads:
                for threads in a.thread_counts:
                    doc["runs"].append({"system": "pyraft-kvclient", "payload": payload, "sync": False,
                                        "client_threads": threads,
                                        "result": run_client_mode(a, payload, threads, progress)})
        else:
            _run_matrix(a, doc, progress)
    except KeyboardInterrupt:
        progress.done()
        print("interrupted", file=sys.stderr)
        return 130
    doc["ratios"] = compute_ratios(doc["runs"])
    for k, v in (doc.get("ratios_by_round") or {}).items():
        med = median_value(v)
        if med is not None:
            doc["ratios"][k + " (median of rounds)"] = med
    for r in doc["runs"]:
        if r["system"] == "null-replication floor" and (r.get("result") or {}).get("ops_per_s"):
            mine = next((x["result"].get("ops_per_s") for x in doc["runs"]
                         if x["system"] == "pyraft" and x["payload"] == r["payload"] and not x["sync"]), None)
            if mine:
                doc["ratios"][f"pyraft share of the null-replication floor @ {r['payload']}B"] = \
                    round(mine / r["result"]["ops_per_s"], 3)
    text = json.dumps(doc, indent=2, default=str)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.json:
        print(text)
    elif "etcd_comparison" in doc:
        from . import bench_etcd
        print(bench_etcd.render(doc))
    else:
        print(render_table(doc))
    for n, first in failed_writes(doc):
        print(f"pyraft-bench: warning: {n:,} write(s) or read(s) of a run failed and are not in its figures; "
              f"the first: {first}", file=sys.stderr)
    failed = run_errors(doc)
    if failed:
        print(f"pyraft-bench: {len(failed)} run(s) failed: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def failed_writes(doc: Any) -> list[tuple[int, str]]:
    """``(failed, first_error)`` of each run that measured its figures with some operations failing."""
    return [(d["failed"], str(d.get("first_error"))) for d in _result_maps(doc)
            if type(d.get("failed")) is int and d["failed"] > 0]


def run_errors(doc: Any) -> list[str]:
    """The errors of the runs that failed, anywhere in the results (a failed run has a non-empty "error")."""
    return [str(d["error"]) for d in _result_maps(doc) if d.get("error")]


def _result_maps(doc: Any) -> list[dict]:
    """Every map anywhere in the results of ``doc`` (runs, follower_down, etcd_comparison), outermost first."""
    found: list[dict] = []
    stack: list[Any] = [doc.get(k) for k in ("etcd_comparison", "follower_down", "runs")]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            found.append(x)
            stack.extend(reversed(list(x.values())))
        elif isinstance(x, list):
            stack.extend(reversed(x))
    return found


def _run_matrix(a: argparse.Namespace, doc: dict, progress: Progress) -> None:
    scenarios: list[Scenario] = []
    systems = ["pyraft"]
    if a.baseline == "pysyncobj":
        systems += ["pysyncobj-memory", "pysyncobj-journal"]
    if not a.only_sync_writer:
        for payload in a.payloads:
            for s in systems:
                scenarios.append(Scenario(s, payload, a.inflight, False, f"{s} {payload}B"))
    if a.sync_writer or a.only_sync_writer:
        payload = a.payloads[0]
        scenarios.append(Scenario("pyraft", payload, 1, True, f"pyraft {payload}B sync writer"))
        if a.baseline == "pysyncobj":
            scenarios.append(Scenario("pysyncobj-memory", payload, 1, True, f"pysyncobj {payload}B sync writer"))
            scenarios.append(Scenario("pysyncobj-nobatch", payload, 1, True,
                                      f"pysyncobj (batching off) {payload}B sync writer"))
    results: dict[int, list[dict]] = {i: [] for i in range(len(scenarios))}
    floors: list[dict] = []
    for rnd in range(a.rounds):
        if a.rounds > 1:
            progress.done(f"round {rnd + 1}/{a.rounds}")
        for i, sc in enumerate(scenarios):
            try:
                if sc.system == "pyraft":
                    res = run_pyraft(sc, a, progress)
                else:
                    from . import bench_pysyncobj
                    res = bench_pysyncobj.run(sc, a, progress)
            except Exception as e:  # noqa: BLE001 - one failed scenario does not lose the others
                progress.done()
                print(f"  {sc.label}: failed: {e}", file=sys.stderr)
                res = {"error": f"{type(e).__name__}: {e}"}
            results[i].append(res)
        if a.floor and not a.only_sync_writer:
            floors.append(run_floor(a, progress))
    if a.stages:
        from . import stages
        progress.show("measuring this machine's floors (thread hand-off, ZeroMQ trip, LMDB commit)")
        doc["stage_floors"] = stages.floors(a.tmpdir)
        progress.done()
    if a.rounds > 1:
        # The ratio within each round (the systems ran back to back), and its median:
        # steadier than the ratio of medians on a machine shared with other work.
        by_round: dict[str, list[float | None]] = {}
        idx = {(sc.system, sc.payload, sc.sync): i for i, sc in enumerate(scenarios)}
        for (system, payload, sync), i in idx.items():
            mine = idx.get(("pyraft", payload, False))
            if system == "pyraft" or sync or mine is None:
                continue
            key = _ratio_key("pyraft", system, payload)
            by_round[key] = [round(x["ops_per_s"] / y["ops_per_s"], 3) if x.get("ops_per_s") and y.get("ops_per_s")
                             else None for x, y in zip(results[mine], results[i])]
        doc["ratios_by_round"] = by_round
    for i, sc in enumerate(scenarios):
        rs = results[i]
        res = rs[0] if len(rs) == 1 or any("error" in r for r in rs) else median_result(rs)
        doc["runs"].append({"system": sc.system + (" sync-writer" if sc.sync else ""), "payload": sc.payload,
                            "sync": sc.sync, "result": res})
    if floors:
        doc["floor_raw"] = [f.get("raw") for f in floors]
        for payload in a.payloads:
            fs = [f.get(str(payload)) or {"error": f.get("error", "no figure for this payload")} for f in floors]
            res = fs[0] if len(fs) == 1 or any("error" in r for r in fs) else median_result(fs)
            doc["runs"].append({"system": "null-replication floor", "payload": payload, "sync": False,
                                "result": res})


if __name__ == "__main__":
    sys.exit(main())
