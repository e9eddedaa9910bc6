"""Where a lone synchronous write spends its time: ``pyraft-bench --stages``.

Each node process of the benchmark installs probes (:func:`install`): thin
wrappers around the runtime's hand-off points that record a timestamp from
the monotonic clock, which all processes of one host share.  When the nodes
stop, :func:`analyze` lines the records up along one write's path, from the
client's call on the leader, through a follower's disk, back to the client,
and reports the median and p90 of every stage.

:func:`floors` measures, on the same machine, what the slowest parts cost
when nothing else runs: handing work from one Python thread to another, one
ZeroMQ DEALER/ROUTER trip over loopback, one durable LMDB commit, and one
LMDB commit without fsync (what a state machine's apply commits).  The
stage table next to the floors shows what bounds the latency.

The probes cost about a microsecond each and exist only in benchmark node
processes that were started with ``--stages``.
"""
from __future__ import annotations

import bisect
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

__all__ = ["install", "dump", "analyze", "floors", "STAGES"]

_records: list[tuple[int, str]] = []
_ns = time.perf_counter_ns  # CLOCK_MONOTONIC on Linux: comparable between processes


def _probe(cls: Any, name: str, event: str, *, enter: bool = True, leave: bool = False,
           when: Callable[[tuple], bool] | None = None) -> None:
    fn = getattr(cls, name)
    rec = _records.append

    def probed(*args: Any, **kwargs: Any) -> Any:
        hit = when is None or when(args)
        if hit and enter:
            rec((_ns(), event))
        result = fn(*args, **kwargs)
        if hit and leave:
            rec((_ns(), event + ".done"))
        return result

    setattr(cls, name, probed)


def install() -> None:
    """Probe this process's runtime classes (call before the node starts)."""
    from pyraft import raft
    from pyraft.runtime import core, workers
    from pyraft.stores import lmdb as lmdb_store
    from pyraft.transports import zmq as zmq_transport

    _probe(raft.Raft, "client_write", "write", leave=True)
    _probe(core.RaftCore, "_propose", "propose")
    _probe(workers.ReplicationWorker, "submit", "submit")
    _probe(workers.ReplicationWorker, "_replicate", "replicate")
    _probe(zmq_transport.ZmqConnection, "send", "send", enter=False, leave=True)
    _probe(zmq_transport.ZmqTransport, "_on_frame", "frame_in")
    _probe(core.RaftCore, "_handle", "rpc", when=lambda a: a[1][0] == "rpc")
    _probe(lmdb_store.LmdbLogStore, "write", "disk", leave=True)
    _probe(zmq_transport.ZmqTransport, "_flush_replies", "reply_out", when=lambda a: bool(a[0]._outbox))
    _probe(core.RaftCore, "post_reply", "resp_in", when=lambda a: a[1][0] == "resp")
    _probe(core.RaftCore, "_handle", "resp", when=lambda a: a[1][0] == "resp")
    _probe(core.RaftCore, "_submit_apply", "commit")
    _probe(workers.SMWorker, "_apply", "apply")
    _probe_sm_commit(lmdb_store.LmdbEnv)
    _probe(workers, "complete_all", "result")  # the SM worker completes the batch's futures


def _probe_sm_commit(env_cls: Any) -> None:
    """Mark where a state machine's LMDB write transaction (KVStateMachine's) ends its work and commits."""
    write = env_cls.write
    rec = _records.append

    def probed(self: Any, fn: Callable[[Any], Any]) -> Any:
        if self.what != "KV state machine":
            return write(self, fn)

        def work(txn: Any) -> Any:
            out = fn(txn)
            rec((_ns(), "sm_commit"))
            return out

        out = write(self, work)
        rec((_ns(), "sm_commit.done"))
        return out

    env_cls.write = probed


def dump(path: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        for t, ev in _records:
            f.write(f"{t} {ev}\n")


def _load(path: str) -> list[tuple[int, str]]:
    out = []
    with open(path, encoding="ascii") as f:
        for line in f:
            t, ev = line.split()
            out.append((int(t), ev))
    return out


#: (name, process, event that starts it, process, event that ends it); L = leader, F = the follower that acked first
STAGES: list[tuple[str, str, str, str, str]] = [
    ("client -> RaftCore (thread hand-off)", "L", "write", "L", "propose"),
    ("engine: propose, hand to workers", "L", "propose", "L", "submit"),
    ("RaftCore -> replication worker (hand-off)", "L", "submit", "L", "replicate"),
    ("encode AppendEntries, ZeroMQ send", "L", "replicate", "L", "send.done"),
    ("network to the follower (ZeroMQ, 2 I/O threads)", "L", "send.done", "F", "frame_in"),
    ("follower: decode, -> RaftCore (hand-off)", "F", "frame_in", "F", "rpc"),
    ("follower engine: AppendEntries", "F", "rpc", "F", "disk"),
    ("follower LMDB commit (fsync)", "F", "disk", "F", "disk.done"),
    ("follower: encode ack, -> transport thread (hand-off)", "F", "disk.done", "F", "reply_out"),
    ("network back, worker decodes", "F", "reply_out", "L", "resp_in"),
    ("worker -> RaftCore (hand-off)", "L", "resp_in", "L", "resp"),
    ("engine: count the ack, commit", "L", "resp", "L", "commit"),
    ("RaftCore -> SM worker (hand-off)", "L", "commit", "L", "apply"),
    ("state machine: apply the entry (KV: its commands)", "L", "apply", "L", "sm_commit"),
    ("state machine: LMDB commit", "L", "sm_commit", "L", "sm_commit.done"),
    ("complete the client's future", "L", "sm_commit.done", "L", "result"),
    ("SM worker -> client (hand-off)", "L", "result", "L", "write.done"),
]
#: events only some state machines have (KVStateMachine's LMDB transaction): without them the
#: stage that ends at the first one runs on to the next event there is, and the others have no samples
OPTIONAL = {("L", "sm_commit"), ("L", "sm_commit.done")}


def analyze(paths: dict[int, str], leader: int, skip: float = 0.2) -> dict[str, Any]:
    """Line up the probe records of the nodes along each write; medians per stage (microseconds).

    ``skip`` drops that share of the writes at the start (warm-up).  For each
    write the follower taken is the one whose acknowledgement left first: the
    one that made the write commit.
    """
    procs = {i: _load(p) for i, p in paths.items()}
    lead = procs[leader]
    writes: list[tuple[int, int]] = []
    start = None
    for t, ev in lead:
        if ev == "write":
            start = t
        elif ev == "write.done" and start is not None:
            writes.append((start, t))
            start = None
    writes = writes[int(len(writes) * skip):]
    index = {i: ([t for t, _ in evs], evs) for i, evs in procs.items()}

    def first(node: int, ev: str, after: int, before: int) -> int | None:
        ts, evs = index[node]
        k = bisect.bisect_left(ts, after)
        while k < len(evs) and evs[k][0] <= before:
            if evs[k][1] == ev:
                return evs[k][0]
            k += 1
        return None

    followers = [i for i in procs if i != leader]
    samples: dict[str, list[float]] = {name: [] for name, *_ in STAGES}
    own_disk: list[float] = []
    totals: list[float] = []
    for a, b in writes:
        outs = [(first(f, "reply_out", a, b), f) for f in followers]
        outs = [(t, f) for t, f in outs if t is not None]
        if not outs:
            continue
        f = min(outs)[1]
        # Walk the path: each stage ends at the first matching record after it began.
        marks: dict[tuple[str, str], int] = {("L", "write"): a}
        absent: set[str] = set()
        complete = True

        def end(p1: str, e1: str, t0: int) -> int | None:
            return b if (p1, e1) == ("L", "write.done") else first(leader if p1 == "L" else f, e1, t0, b)

        for k, (name, p0, e0, p1, e1) in enumerate(STAGES):
            t0 = marks[(p0, e0)]
            if (p0, e0) in OPTIONAL and t0 == marks.get(("absent", e0)):
                absent.add(name)  # an earlier stage ran on past this one
            t1 = end(p1, e1, t0)
            if t1 is None and (p1, e1) in OPTIONAL:
                later = next(s for s in STAGES[k + 1:] if (s[3], s[4]) not in OPTIONAL)
                t1 = end(later[3], later[4], t0)
                if t1 is not None:
                    marks[("absent", e1)] = t1
            if t1 is None:
                complete = False
                break
            marks[(p1, e1)] = t1
        if not complete:
            continue
        for name, p0, e0, p1, e1 in STAGES:
            if name not in absent:
                samples[name].append((marks[(p1, e1)] - marks[(p0, e0)]) / 1e3)
        d0 = first(leader, "disk", a, b)
        d1 = first(leader, "disk.done", d0, b) if d0 is not None else None
        if d0 is not None and d1 is not None:
            own_disk.append((d1 - d0) / 1e3)
        totals.append((b - a) / 1e3)

    def stat(v: list[float]) -> dict[str, float | None]:
        if not v:
            return {"p50_us": None, "p90_us": None}
        s = sorted(v)
        return {"p50_us": round(statistics.median(s), 1), "p90_us": round(s[int(0.9 * (len(s) - 1))], 1)}

    return {
        "writes": len(totals),
        "stages": [{"stage": name, **stat(samples[name])} for name, *_ in STAGES],
        "total": stat(totals),
        "leader_disk": stat(own_disk),
    }


# ---------------------------------------------------------------------------- floors

_ECHO = r"""
import sys, zmq
ctx = zmq.Context(); r = ctx.socket(zmq.ROUTER); port = r.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    m = r.recv_multipart()
    if m[1] == b"stop":
        break
    r.send_multipart(m)
"""


def _thread_hop(n: int) -> float:
    ping, pong = threading.Event(), threading.Event()

    def other() -> None:
        for _ in range(n):
            ping.wait()
            ping.clear()
            pong.set()

    t = threading.Thread(target=other, name="bench-floor-hop")
    t.start()
    rtt = []
    for _ in range(n):
        t0 = _ns()
        ping.set()
        pong.wait()
        pong.clear()
        rtt.append(_ns() - t0)
    t.join()
    return statistics.median(rtt) / 2e3


def _zmq_one_way(n: int) -> float:
    import zmq
    p = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    try:
        assert p.stdout is not None
        d.connect(f"tcp://127.0.0.1:{int(p.stdout.readline())}")
        d.send(b"x")
        d.recv()
        rtt = []
        for _ in range(n):
            t0 = _ns()
            d.send(b"x" * 64)
            d.recv()
            rtt.append(_ns() - t0)
        d.send(b"stop")
        p.wait(10)
        return statistics.median(rtt) / 2e3
    finally:
        d.close(0)
        ctx.term()
        if p.poll() is None:
            p.kill()


def _lmdb_commit(n: int, tmpdir: str | None) -> float:
    from pyraft.engine.commands import AppendToLog
    from pyraft.stores.lmdb import LmdbLogStore
    from pyraft.types import Entry, LogId

    d = tempfile.mkdtemp(prefix="pyraft-floor-", dir=tmpdir)
    store = LmdbLogStore(d, node_id=1, cluster_name="floor")
    try:
        took = []
        for i in range(1, n + 1):
            t0 = _ns()
            store.write([AppendToLog([Entry(LogId(1, i), payload=b"x" * 10)])])
            took.append(_ns() - t0)
        return statistics.median(took) / 1e3
    finally:
        store.close()
        shutil.rmtree(d, ignore_errors=True)


def _lmdb_commit_nosync(n: int, tmpdir: str | None) -> float:
    """One small write transaction committed without fsync: what a state machine's apply commits."""
    from pyraft.stores.lmdb import LmdbEnv

    d = tempfile.mkdtemp(prefix="pyraft-floor-", dir=tmpdir)
    env = LmdbEnv(d, "sm.lmdb", "sm.lock", what="floor", sync=False)
    try:
        took = []
        for i in range(n):
            t0 = _ns()
            env.write(lambda txn: txn.put(i.to_bytes(8, "big"), b"x" * 40))
            took.append(_ns() - t0)
        return statistics.median(took) / 1e3
    finally:
        env.close()
        shutil.rmtree(d, ignore_errors=True)


def floors(tmpdir: str | None = None, n: int = 2000) -> dict[str, float]:
    """What the slow parts cost alone on this machine (microseconds, medians)."""
    return {
        "thread_hand_off_us": round(_thread_hop(n), 1),
        "zmq_one_way_us": round(_zmq_one_way(n), 1),
        "lmdb_commit_us": round(_lmdb_commit(min(n, 1000), tmpdir), 1),
        "lmdb_commit_nosync_us": round(_lmdb_commit_nosync(min(n, 1000), tmpdir), 1),
    }


def render(result: dict[str, Any], fl: dict[str, float] | None) -> str:
    rows = [f"where a lone write's time goes ({result['writes']} writes; microseconds; "
            f"L = leader, F = the follower whose ack came first)",
            f"  {'stage':50} {'p50':>8} {'p90':>8}"]
    for r in result["stages"]:
        rows.append(f"  {r['stage']:50} {_us(r['p50_us'])} {_us(r['p90_us'])}")
    rows.append(f"  {'whole write':50} {_us(result['total']['p50_us'])} {_us(result['total']['p90_us'])}")
    rows.append(f"  {'(the leader LMDB commit, in parallel)':50} {_us(result['leader_disk']['p50_us'])} "
                f"{_us(result['leader_disk']['p90_us'])}")
    if fl:
        hops = sum(1 for name, *_ in STAGES if "hand-off" in name)
        floor = hops * fl["thread_hand_off_us"] + 2 * fl["zmq_one_way_us"] + fl["lmdb_commit_us"]
        sm = next((r for r in result["stages"] if r["stage"] == "state machine: LMDB commit"), None)
        sm_commit = sm is not None and sm["p50_us"] is not None and "lmdb_commit_nosync_us" in fl
        if sm_commit:
            floor += fl["lmdb_commit_nosync_us"]
        rows.append(f"floors on this machine, alone: thread hand-off {fl['thread_hand_off_us']} us, ZeroMQ one way "
                    f"{fl['zmq_one_way_us']} us, LMDB commit {fl['lmdb_commit_us']} us"
                    + (f", without fsync {fl['lmdb_commit_nosync_us']} us" if "lmdb_commit_nosync_us" in fl else "")
                    + f"; the path has {hops} hand-offs, 2 network trips and 1 commit"
                    + (" (+ the state machine's, without fsync)" if sm_commit else "")
                    + f": {floor:.0f} us before any Raft work")
    return "\n".join(rows)


def _us(v: float | None) -> str:
    return f"{v:8.1f}" if v is not None else f"{'-':>8}"


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json
    argparse.ArgumentParser(prog="python -m pyraft.tools.stages",
                            description="Measure this machine's floors (a thread hand-off, a ZeroMQ one-way "
                                        "trip, an LMDB commit) and print them as one JSON object.").parse_args(argv)
    print(json.dumps(floors()))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
