"""pyraft-kv against etcd: ``pyraft-bench --baseline etcd`` (the race of the coordination issue).

One run measures both systems on this machine, row by row (each row runs
pyraft-kv, then etcd, back to back), so that the ratios compare like with
like on a machine whose load drifts:

- **servers**: 3 ``pyraft.tools.bench node --sm kv --serve-kv`` processes
  (``KVStateMachine``, LMDB log, fsync on) and 3 ``etcd`` members (Debian's
  ``etcd-server``, found on ``PATH`` or as ``/usr/bin/etcd``; default
  settings, so fsync on), each with its own data directory in one temporary
  directory, all on 127.0.0.1.  Both clusters stay up for the whole run;
  only the measured one has load.
- **clients**: for each row and system a separate process
  (``python -m pyraft.tools.bench client --system pyraft|etcd``) with the same
  number of threads, each making one synchronous call at a time, with the
  same loop (:func:`pyraft.tools.bench.closed_loop`).  pyraft-kv through
  :class:`~pyraft.kv.KVClient`; etcd through the ``etcd3`` gRPC client
  (``pip install -e '.[bench]'``) connected to the leader member.
  With ``--client-futures`` the writes rows run one thread per client
  process instead, keeping ``--client-threads`` puts in flight
  (:func:`pyraft.tools.bench.futures_loop`): ``KVClient.put_async`` for
  pyraft-kv, the gRPC future of etcd3's put for etcd.
- **rows**: writes/s for every ``--client-threads`` count and ``--payload``;
  a sequential writer (one thread: p50/p99 of a put); a linearizable read
  (one thread: p50 of a get, etcd's default consistency).  For each, the
  servers' CPU microseconds per operation (all three members, from
  ``/proc/<pid>/stat`` over the measured window), the client process's
  own, and at the end the servers' anonymous resident memory (``RssAnon``,
  all three).
- **rounds** (``--rounds N``): every row is measured N times, the two
  systems in turn (etcd first in every second round, so that a load that
  drifts weighs on both); a cell shows the system's median round and a
  ratio the median of the rounds' ratios, the steadiest figure on a shared
  machine.

Nothing is installed here: without etcd or the ``etcd3`` package the
comparison stops at once and says what is missing (:func:`missing`).

``etcd3`` 0.12 ships protobuf modules made for protobuf 3; with a newer
protobuf they load only on its pure-Python implementation, so its client
processes run with ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` (that
costs etcd's client process CPU, not its servers').
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable

from .bench import (Progress, PyraftCluster, drive_clients, free_ports, median_result, median_value, memory_info,
                    start_clients, tail)

__all__ = ["EtcdCluster", "etcd_client", "find_etcd", "missing", "run", "render", "ratios", "round_ratio",
           "median_round"]

#: etcd3 0.12's generated modules need protobuf's pure-Python implementation (see the module docstring).
_PB_ENV = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


def find_etcd() -> str | None:
    """The etcd server binary: ``etcd`` on PATH, else Debian's ``/usr/bin/etcd``."""
    exe = shutil.which("etcd")
    if exe is None and os.access("/usr/bin/etcd", os.X_OK):
        exe = "/usr/bin/etcd"
    return exe


def missing() -> str | None:
    """Why the comparison cannot run here (None when it can)."""
    if find_etcd() is None:
        return "etcd is not installed (Debian: apt-get install etcd-server)"
    probe = subprocess.run([sys.executable, "-c", "import etcd3"], env={**os.environ, _PB_ENV: "python"},
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return "the etcd3 Python package is missing (pip install -e '.[bench]')"
    return None


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    exe = find_etcd()
    if exe:
        try:
            out["etcd"] = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                         timeout=10).stdout.splitlines()[0].split(":", 1)[1].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            out["etcd"] = "?"
    probe = subprocess.run([sys.executable, "-c", "import etcd3, grpc, google.protobuf as p; "
                            "print(etcd3.__version__, grpc.__version__, p.__version__)"],
                           env={**os.environ, _PB_ENV: "python"}, capture_output=True, text=True)
    if probe.returncode == 0:
        out["etcd3"], out["grpcio"], out["protobuf"] = probe.stdout.split()
    from pyraft import __version__
    out["pyraft"] = __version__
    return out


class EtcdCluster:
    """``n`` etcd members on 127.0.0.1, each with a data directory under ``root`` (etcd's defaults: fsync on)."""

    def __init__(self, n: int, root: str, exe: str | None = None) -> None:
        found = exe or find_etcd()
        if found is None:
            raise RuntimeError("etcd is not installed")
        self.exe = found
        self.root = root
        ports = free_ports(["127.0.0.1"] * (2 * n))  # distinct: all are bound before etcd starts
        self.client_ports = {i: ports[i - 1] for i in range(1, n + 1)}
        self.peer_ports = {i: ports[n + i - 1] for i in range(1, n + 1)}
        self.data_dirs = {i: os.path.join(root, f"etcd{i}") for i in range(1, n + 1)}
        self.procs: dict[int, subprocess.Popen] = {}
        self._logs: list[Any] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports.values()]

    @property
    def pids(self) -> dict[str, int]:
        return {f"etcd{i}": p.pid for i, p in self.procs.items()}

    def start(self, timeout: float = 30.0) -> None:
        initial = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, p in self.peer_ports.items())
        # Only our flags: an ETCD_* variable in the environment would change the cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        for i in self.client_ports:
            log = open(os.path.join(self.root, f"etcd{i}.log"), "ab")
            self._logs.append(log)
            client = f"http://127.0.0.1:{self.client_ports[i]}"
            peer = f"http://127.0.0.1:{self.peer_ports[i]}"
            self.procs[i] = subprocess.Popen(
                [self.exe, "--name", f"e{i}", "--data-dir", self.data_dirs[i],
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", initial, "--initial-cluster-token", f"bench-{os.getpid()}",
                 "--initial-cluster-state", "new", "--log-level", "warn", "--logger", "zap"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        for i, port in self.client_ports.items():
            while not self._healthy(port):
                if self.procs[i].poll() is not None:
                    raise RuntimeError(f"etcd member {i} exited; last log lines:\n"
                                       f"{tail(os.path.join(self.root, f'etcd{i}.log'))}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {i} not healthy within {timeout} s")
                time.sleep(0.1)

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for log in self._logs:
            log.close()


def etcd_client(endpoints: list[str], timeout: float) -> tuple[Callable, Callable, Callable, Callable]:
    """``(put(key, value), get(key), close(), put_async(key, value))`` on the leader member, through etcd3.

    Runs in a client process (``bench client --system etcd``).  One client
    (one gRPC channel, HTTP/2 streams multiplexed) shared by every thread, as
    ``KVClient`` shares its connections.  ``put_async`` is the same put as a
    gRPC future (etcd3 has no call of its own for it: its request, then the
    stub's ``future``), for ``--client-futures``.
    """
    os.environ.setdefault(_PB_ENV, "python")
    import etcd3

    deadline = time.monotonic() + timeout
    leader = None
    while leader is None:
        for ep in endpoints:
            host, _, port = ep.rpartition(":")
            c = etcd3.client(host=host, port=int(port), timeout=timeout)
            try:
                urls = c.status().leader.client_urls
            except Exception:  # noqa: BLE001 - not up yet, or electing: try the next one
                continue
            finally:
                c.close()
            if urls:
                leader = urls[0].split("://", 1)[-1]
                break
        if leader is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no etcd leader among {endpoints} within {timeout} s")
            time.sleep(0.1)
    host, _, port = leader.rpartition(":")
    client = etcd3.client(host=host, port=int(port), timeout=timeout)

    def put_async(key: str, value: bytes) -> Any:
        return client.kvstub.Put.future(client._build_put_request(key, value), client.timeout,
                                        credentials=client.call_credentials, metadata=client.metadata)

    return client.put, client.get, client.close, put_async


def _row(kind: str, payload: int, threads: int, results: dict[str, dict]) -> dict[str, Any]:
    return {"kind": kind, "payload": payload, "threads": threads, **results}


def run(a: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """The whole comparison (see the module docstring); a JSON-able document."""
    why = missing()
    if why is not None:
        raise SystemExit(f"pyraft-bench --baseline etcd: {why}")
    root = tempfile.mkdtemp(prefix="pyraft-bench-etcd-", dir=a.tmpdir)
    doc: dict[str, Any] = {"versions": versions(), "rows": [], "rounds": a.rounds,
                           "client_futures": a.client_futures}
    pyraft = PyraftCluster(a.nodes, root, sm="kv", fsync=not a.no_fsync, config=a.config_dict, serve_kv=True,
                           tune_gc=a.gc == "tuned")
    etcd = EtcdCluster(a.nodes, root)
    try:
        progress.show("starting pyraft-kv and etcd")
        pyraft.start()
        etcd.start()
        progress.done(f"pyraft-kv and etcd running ({a.nodes} members each) in {root}")
        systems = {
            "pyraft-kv": (pyraft.spec(), {f"node{k}": n.pid for k, n in pyraft.nodes.items()}, "pyraft"),
            "etcd": (",".join(etcd.endpoints), etcd.pids, "etcd"),
        }

        def measure(kind: str, op: str, payload: int, threads: int, futures: bool = False) -> None:
            per_round: dict[str, list[dict]] = {name: [] for name in systems}
            ratios_by_round: list[float | None] = []
            order = list(systems.items())
            for rnd in range(a.rounds):
                got: dict[str, dict] = {}
                # Every second round runs etcd first: a load that drifts during a row weighs on both.
                for name, (spec, pids, system) in (order if rnd % 2 == 0 else order[::-1]):
                    label = f"{name} {kind} {payload}B x {threads}" + (f" round {rnd + 1}" if a.rounds > 1 else "")
                    try:
                        clients = start_clients(system, spec, procs=a.clients, threads=threads, payload=payload,
                                                op=op, root=root, tag=f"{system}{len(doc['rows'])}r{rnd}",
                                                futures=futures)
                        res = drive_clients(clients, pids, a, label, progress)
                        progress.done(f"  {label}: {res['ops_per_s']:,.0f} ops/s, "
                                      f"p50 {res['latency']['p50_ms']} ms"
                                      + (f", {res['failed']} failed: {res['first_error']}" if res["failed"] else ""))
                    except Exception as e:  # noqa: BLE001 - one failed row does not lose the others
                        progress.done(f"  {label}: failed: {e}")
                        res = {"error": f"{type(e).__name__}: {e}"}
                    got[name] = res
                    per_round[name].append(res)
                ratios_by_round.append(round_ratio(kind, got["pyraft-kv"], got["etcd"]))
            row = _row(kind, payload, threads * a.clients,
                       {name: median_round(kind, results) for name, results in per_round.items()})
            if a.rounds > 1:
                row["ratios_by_round"] = ratios_by_round
            doc["rows"].append(row)

        for payload in a.payloads:
            for threads in a.thread_counts:
                measure("writes", "put", payload, threads, a.client_futures)
        measure("sequential write", "put", a.payloads[0], 1)
        measure("linearizable read", "get", a.payloads[0], 1)
        doc["memory"] = {name: {k: memory_info(pid) for k, pid in pids.items()}
                         for name, (_spec, pids, _system) in systems.items()}
        doc["disk_bytes"] = {"pyraft-kv": sum(_du(d) for d in pyraft.data_dirs.values()),
                             "etcd": sum(_du(d) for d in etcd.data_dirs.values())}
        doc["ratios"] = ratios(doc)
        return doc
    finally:
        pyraft.stop()
        etcd.stop()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


def _du(path: str) -> int:
    from .bench import disk_usage
    return disk_usage(path)["allocated"]


def _anon(mem: dict[str, dict[str, int]]) -> int:
    return sum(m.get("RssAnon", 0) for m in mem.values())


def _figure(kind: str, res: dict) -> float | None:
    """What a row compares: writes/s for the write rows, the p50 (ms) for the others; None if it failed."""
    if "error" in res:
        return None
    if kind == "writes":
        return res.get("ops_per_s") or None
    return (res.get("latency") or {}).get("p50_ms") or None


def round_ratio(kind: str, pyraft: dict, etcd: dict) -> float | None:
    """pyraft-kv / etcd of one round of a row (writes/s, or p50 latency)."""
    p, e = _figure(kind, pyraft), _figure(kind, etcd)
    return None if p is None or e is None else round(p / e, 2)


def median_round(kind: str, results: list[dict]) -> dict:
    """One system's result of a row: the round with the median figure, and every round's figure.

    With one round, that round's result as it is.
    """
    if len(results) == 1:
        return results[0]
    return median_result(results, lambda r: _figure(kind, r))


def ratios(doc: dict[str, Any]) -> dict[str, Any]:
    """pyraft-kv / etcd per row, and whether each target of the issue is met.

    With rounds, a row's ratio is the median of its rounds' ratios (each round
    ran both systems back to back), as ``--baseline pysyncobj`` reports it.
    """
    out: dict[str, Any] = {}
    for r in doc["rows"]:
        key = f"{r['kind']} {r['payload']}B x {r['threads']}"
        by_round = r.get("ratios_by_round")
        if by_round is not None:
            x = median_value(by_round)
        else:
            x = round_ratio(r["kind"], r.get("pyraft-kv", {}), r.get("etcd", {}))
        if x is None:
            continue  # failed (every round)
        if r["kind"] == "writes":
            out[key] = {"writes/s ratio": x, "target": ">= 2", "met": x >= 2}
        else:
            out[key] = {"p50 ratio": x, "target": "<= 1", "met": x <= 1}
        if by_round is not None:
            out[key]["rounds"] = by_round
    mem = doc.get("memory")
    if mem:
        x = round(_anon(mem["pyraft-kv"]) / max(1, _anon(mem["etcd"])), 3)
        out["servers' anonymous memory"] = {"ratio": x, "target": "< 1", "met": x < 1}
    return out


def _cell(res: dict, what: str) -> str:
    if "error" in res:
        return "failed"
    if what == "rate":
        return f"{res['ops_per_s']:,.0f}"
    lat = res.get("latency") or {}
    if what == "p50/p99":
        return f"{lat.get('p50_ms') or 0:.2f} / {lat.get('p99_ms') or 0:.2f}"
    return f"{lat.get('p50_ms') or 0:.2f}"


def render(doc: dict[str, Any]) -> str:
    """The comparison as a Markdown table (what docs/benchmarks.md shows), with the run's context."""
    c = doc["etcd_comparison"]
    m = doc["machine"]
    v = c["versions"]
    lines = [f"pyraft-bench --baseline etcd  {doc['date']}  {m['cpus']} cpus ({m['cpu_model']}), "
             f"Python {m['python']}, load avg at start {m['loadavg_at_start'][0]}",
             f"command: {doc['command']}",
             f"versions: pyraft {v.get('pyraft')}, etcd {v.get('etcd')}, etcd3 {v.get('etcd3')} "
             f"(grpcio {v.get('grpcio')}, protobuf {v.get('protobuf')}, pure-Python)",
             f"{doc['nodes']} members each on 127.0.0.1, fsync on for both; one client process per system "
             f"and row; warmup {doc['warmup']} s, measured {doc['duration']} s per row"
             + (f"; {c['rounds']} rounds, the systems in turn (etcd first in even rounds): each cell is a "
                f"system's median round, each ratio the median of the rounds' ratios" if c.get("rounds", 1) > 1
                else ""), "",
             "| row | pyraft-kv | etcd | ratio | servers' CPU µs/op (pyraft-kv / etcd) "
             "| client's CPU µs/op (pyraft-kv / etcd) |",
             "|---|---|---|---|---|---|"]
    rat = c.get("ratios", {})
    for r in c["rows"]:
        p, e = r.get("pyraft-kv", {}), r.get("etcd", {})
        key = f"{r['kind']} {r['payload']}B x {r['threads']}"
        if r["kind"] == "writes":
            name = (f"writes/s, {r['threads']} futures from one thread, {r['payload']} B"
                    if c.get("client_futures") else f"writes/s, {r['threads']} threads, {r['payload']} B")
            pc, ec, ratio = _cell(p, "rate"), _cell(e, "rate"), rat.get(key, {}).get("writes/s ratio")
        elif r["kind"] == "sequential write":
            name = f"sequential write p50 / p99 ms, {r['payload']} B"
            pc, ec, ratio = _cell(p, "p50/p99"), _cell(e, "p50/p99"), rat.get(key, {}).get("p50 ratio")
        else:
            name = "linearizable read p50 ms" + (" (pyraft-kv: lease_reads; etcd: ReadIndex)"
                                                 if (doc.get("config") or {}).get("lease_reads") else "")
            pc, ec, ratio = _cell(p, "p50"), _cell(e, "p50"), rat.get(key, {}).get("p50 ratio")
        met = rat.get(key, {}).get("met")
        ratio_s = "-" if ratio is None else f"{ratio}×" + ("" if met is None else (" ✓" if met else " ✗"))
        if rat.get(key, {}).get("rounds"):
            ratio_s += " (rounds " + ", ".join("-" if x is None else f"{x}" for x in rat[key]["rounds"]) + ")"
        cpu = " / ".join("-" if "cpu_us_per_op" not in x else f"{x['cpu_us_per_op']['total']:,.0f}"
                         for x in (p, e))
        ccpu = " / ".join("-" if "client_cpu_us_per_op" not in x else f"{x['client_cpu_us_per_op']:,.0f}"
                          for x in (p, e))
        lines.append(f"| {name} | {pc} | {ec} | {ratio_s} | {cpu} | {ccpu} |")
    mem = c.get("memory")
    if mem:
        mr = rat.get("servers' anonymous memory", {})
        lines.append(f"| servers' anonymous memory (3 members) | {_anon(mem['pyraft-kv']) / 2**20:,.0f} MiB | "
                     f"{_anon(mem['etcd']) / 2**20:,.0f} MiB | {mr.get('ratio')}×"
                     f"{' ✓' if mr.get('met') else ' ✗'} | | |")
    failed = [f"{r['kind']} {r['payload']}B x {r['threads']} {name}: {res.get('error') or res.get('first_error')}"
              for r in c["rows"] for name in ("pyraft-kv", "etcd") for res in [r.get(name, {})]
              if "error" in res or res.get("failed")]
    if failed:
        lines += ["", "errors:"] + [f"  {f}" for f in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m pyraft.tools.bench_etcd``: says how to run the comparison and whether it can run here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    asked = bool(argv) and argv[0] in ("-h", "--help")
    why = missing()
    print("usage: pyraft-bench --baseline etcd [--payload 10,1024] [--client-threads 64,256] [--duration S]\n"
          f"(this module holds the etcd side of it; here: {why or 'etcd and etcd3 are installed'})",
          file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


if __name__ == "__main__":
    sys.exit(main())
