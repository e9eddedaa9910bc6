"""The null-replication floor: what LMDB + ZeroMQ allow before any Raft logic.

A leader (this process) appends batches of entries to its LMDB log (``sync``
on, one write transaction per batch) and ships each batch over a DEALER to two
follower processes.  Each follower drains whatever has arrived, appends it to
its own LMDB log in one transaction (fsync: group commit, as RaftCore does)
and acknowledges every batch on its ROUTER.  An entry is *committed* once the
leader has it on disk and one follower acknowledged it (a majority of three).

It reports committed entries/s for each payload size with many batches in
flight, and the p50/p99 latency of single-entry batches sent one at a time.
``--codec pyraft`` ships real ``AppendEntriesRequest`` frames through
:mod:`pyraft.codec` (and stores entries with ``encode_entry``) to show the
wire format's cost; ``--codec raw`` (default) sends bare msgpack lists.

    python tools/bench_floor.py                 # a table
    python tools/bench_floor.py --json          # one JSON object
    python tools/bench_floor.py --seconds 10 --batch 512 --inflight 32 --dir /var/tmp
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time

import lmdb
import msgpack
import zmq

MAP_SIZE = 16 * 1024**3  # sparse: the file grows only as it is used


def _key(index: int) -> bytes:
    return index.to_bytes(8, "big")


def _open_env(path: str) -> lmdb.Environment:
    return lmdb.open(path, map_size=MAP_SIZE, sync=True, metasync=True, max_dbs=0)


# ---------------------------------------------------------------------------
# Follower process

def follower_main(path: str, codec: str, port_out) -> None:
    if codec == "pyraft":
        from pyraft.codec import decode_message, encode_entry, encode_message
        from pyraft.messages import AppendEntriesResponse
    env = _open_env(path)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 0)
    router.setsockopt(zmq.SNDHWM, 0)
    port_out.send(router.bind_to_random_port("tcp://127.0.0.1"))
    port_out.close()
    try:
        while True:
            parts = [router.recv_multipart()]
            while True:  # group commit: everything that has arrived goes into one transaction
                try:
                    parts.append(router.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            if any(p[1] == b"STOP" for p in parts):
                return
            acks = []
            with env.begin(write=True) as txn:
                for ident, frame in parts:
                    if codec == "pyraft":
                        f = decode_message(frame, "bench")
                        req = f.message
                        for e in req.entries:
                            txn.put(_key(e.log_id.index), encode_entry(e), append=True)
                        last = req.entries[-1].log_id
                        acks.append((ident, encode_message(
                            AppendEntriesResponse(req.term, True, last, seq=req.seq), "bench", 2, f.request_id)))
                    else:
                        seq, first, payloads = msgpack.unpackb(frame)
                        for i, p in enumerate(payloads):
                            txn.put(_key(first + i), p, append=True)
                        acks.append((ident, msgpack.packb(seq)))
            for ident, ack in acks:  # only after the fsync
                router.send_multipart([ident, ack])
    finally:
        router.close(0)
        ctx.term()
        env.close()


# ---------------------------------------------------------------------------
# Leader

class Leader:
    def __init__(self, root: str, codec: str):
        self.root = root
        self.codec = codec
        self.env = _open_env(os.path.join(root, "leader"))
        self.ctx = zmq.Context()
        spawn = mp.get_context("spawn")
        self.procs = []
        self.dealers = []
        for n in (1, 2):
            rd, wr = spawn.Pipe(duplex=False)
            p = spawn.Process(target=follower_main, args=(os.path.join(root, f"follower{n}"), codec, wr),
                              name=f"bench-follower-{n}", daemon=True)
            p.start()
            wr.close()
            if not rd.poll(30):
                raise SystemExit(f"follower {n} did not start")
            port = rd.recv()
            d = self.ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.SNDHWM, 0)
            d.setsockopt(zmq.RCVHWM, 0)
            d.connect(f"tcp://127.0.0.1:{port}")
            self.procs.append(p)
            self.dealers.append(d)
        self.poller = zmq.Poller()
        for d in self.dealers:
            self.poller.register(d, zmq.POLLIN)
        self.next_index = 1
        self.seq = 0
        if codec == "pyraft":
            from pyraft import codec as pc
            from pyraft import messages, types
            self._pc, self._msgs, self._types = pc, messages, types

    def close(self) -> None:
        for d in self.dealers:
            d.send(b"STOP")
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
        for d in self.dealers:
            d.close(0)
        self.ctx.term()
        self.env.close()

    # one batch: frame for the followers, and the local append
    def _frame(self, payloads: list[bytes]) -> bytes:
        first = self.next_index
        if self.codec == "pyraft":
            T, M = self._types, self._msgs
            entries = tuple(T.Entry(T.LogId(1, first + i), T.EntryKind.NORMAL, p) for i, p in enumerate(payloads))
            prev = T.LogId(1, first - 1) if first > 1 else None
            req = M.AppendEntriesRequest(1, 1, prev, entries, first - 1, self.seq)
            return self._pc.encode_message(req, "bench", 1, self.seq)
        return msgpack.packb([self.seq, first, payloads])

    def _append_local(self, payloads: list[bytes]) -> None:
        first = self.next_index
        with self.env.begin(write=True) as txn:
            if self.codec == "pyraft":
                T = self._types
                for i, p in enumerate(payloads):
                    e = T.Entry(T.LogId(1, first + i), T.EntryKind.NORMAL, p)
                    txn.put(_key(first + i), self._pc.encode_entry(e), append=True)
            else:
                for i, p in enumerate(payloads):
                    txn.put(_key(first + i), p, append=True)

    def _ack_seq(self, data: bytes) -> int:
        if self.codec == "pyraft":
            return self._pc.decode_message(data, "bench").request_id
        return msgpack.unpackb(data)

    def run(self, payload_size: int, batch: int, inflight: int, seconds: float | None,
            samples: int | None = None) -> dict:
        """Pipelined replication for ``seconds`` (or ``samples`` batches); returns figures."""
        payloads = [os.urandom(payload_size) for _ in range(batch)]
        sent_at: dict[int, float] = {}
        sizes: dict[int, int] = {}
        base = self.seq  # batch seqs continue across runs on one Leader
        acked = [base - 1, base - 1]  # highest batch seq acknowledged by each follower (acks come in order)
        committed_seq = base - 1
        committed_entries = 0
        latencies: list[float] = []
        bytes_sent = 0
        start = time.perf_counter()
        end = start + seconds if seconds is not None else None
        issued = 0
        while True:
            now = time.perf_counter()
            can_issue = (end is None or now < end) and (samples is None or issued < samples)
            if can_issue and self.seq - (committed_seq + 1) < inflight:
                seq = self.seq
                frame = self._frame(payloads)
                sent_at[seq] = time.perf_counter()
                for d in self.dealers:
                    d.send(frame)
                bytes_sent += len(frame)
                self._append_local(payloads)  # the leader's own fsync, while followers write theirs
                sizes[seq] = batch
                self.seq += 1
                self.next_index += batch
                issued += 1
                timeout = 0
            elif not sent_at:
                break
            else:
                timeout = 100
            for sock, _ in self.poller.poll(timeout):
                i = self.dealers.index(sock)
                while True:
                    try:
                        data = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    acked[i] = max(acked[i], self._ack_seq(data))
            # the leader's appends are synchronous, so every issued batch is on its disk
            new_commit = max(acked)
            if new_commit > committed_seq:
                t = time.perf_counter()
                for s in range(committed_seq + 1, new_commit + 1):
                    latencies.append(t - sent_at.pop(s))
                    committed_entries += sizes.pop(s)
                committed_seq = new_commit
        elapsed = time.perf_counter() - start
        latencies.sort()
        return {
            "payload_bytes": payload_size,
            "batch": batch,
            "inflight": inflight,
            "seconds": round(elapsed, 3),
            "committed_entries": committed_entries,
            "entries_per_s": round(committed_entries / elapsed, 1),
            "mib_per_s": round(committed_entries * payload_size / elapsed / 2**20, 2),
            "wire_bytes_per_entry": round(bytes_sent / max(1, committed_entries), 1),
            "batch_commit_ms_p50": round(_pct(latencies, 50) * 1e3, 3),
            "batch_commit_ms_p99": round(_pct(latencies, 99) * 1e3, 3),
        }


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def local_fsync_floor(root: str, samples: int) -> dict:
    """One-entry LMDB write transactions with sync on: the disk alone."""
    env = _open_env(os.path.join(root, "fsync-probe"))
    lat = []
    try:
        for i in range(1, samples + 1):
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(_key(i), b"x" * 10, append=True)
            lat.append(time.perf_counter() - t)
    finally:
        env.close()
    lat.sort()
    return {"samples": samples, "commit_ms_p50": round(_pct(lat, 50) * 1e3, 3),
            "commit_ms_p99": round(_pct(lat, 99) * 1e3, 3),
            "commits_per_s": round(samples / sum(lat), 1)}


def _fs_type(path: str) -> str:
    best, fstype = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, typ = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, typ
    except OSError:
        pass
    return fstype


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyraft.tools.bench_floor", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run (default 5)")
    ap.add_argument("--payloads", default="10,1024", help="payload sizes in bytes, comma-separated")
    ap.add_argument("--batch", type=int, default=256, help="entries per batch (default 256)")
    ap.add_argument("--inflight", type=int, default=16, help="batches in flight, at most (default 16)")
    ap.add_argument("--latency-samples", type=int, default=1000,
                    help="single-entry batches, one in flight, for p50/p99 (default 1000)")
    ap.add_argument("--codec", choices=("raw", "pyraft"), default="raw",
                    help="raw msgpack lists, or pyraft's AppendEntries wire format")
    ap.add_argument("--dir", default=None, help="where to put the LMDB files (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the LMDB files")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    root = tempfile.mkdtemp(prefix="pyraft-floor-", dir=args.dir)
    result: dict = {
        "benchmark": "null-replication floor (leader + 2 followers, LMDB sync, ZeroMQ DEALER/ROUTER, loopback)",
        "codec": args.codec,
        "dir": root,
        "filesystem": _fs_type(root),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "lmdb": lmdb.__version__,
        "throughput": [],
    }
    try:
        result["local_fsync"] = local_fsync_floor(root, 200)
        for size in (int(s) for s in args.payloads.split(",") if s.strip()):
            run_dir = os.path.join(root, f"tput-{size}")
            os.makedirs(run_dir)
            leader = Leader(run_dir, args.codec)
            try:
                result["throughput"].append(leader.run(size, args.batch, args.inflight, args.seconds))
            finally:
                leader.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        run_dir = os.path.join(root, "latency")
        os.makedirs(run_dir)
        leader = Leader(run_dir, args.codec)
        try:
            leader.run(10, 1, 1, None, samples=20)  # warm-up: connections, page cache
            lat = leader.run(10, 1, 1, None, samples=args.latency_samples)
        finally:
            leader.close()
        result["latency_single_entry"] = {
            "payload_bytes": 10, "samples": args.latency_samples,
            "p50_ms": lat["batch_commit_ms_p50"], "p99_ms": lat["batch_commit_ms_p99"],
            "entries_per_s": lat["entries_per_s"],
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(result["benchmark"])
    print(f"codec={result['codec']}  fs={result['filesystem']}  cpus={result['cpus']}  "
          f"libzmq={result['libzmq']}  lmdb={result['lmdb']}")
    lf = result["local_fsync"]
    print(f"local LMDB sync commit: p50 {lf['commit_ms_p50']} ms, p99 {lf['commit_ms_p99']} ms "
          f"({lf['commits_per_s']} commits/s)")
    print(f"{'payload':>8} {'batch':>6} {'inflight':>8} {'entries/s':>12} {'MiB/s':>8} "
          f"{'batch p50 ms':>13} {'batch p99 ms':>13}")
    for r in result["throughput"]:
        print(f"{r['payload_bytes']:>8} {r['batch']:>6} {r['inflight']:>8} {r['entries_per_s']:>12,.0f} "
              f"{r['mib_per_s']:>8} {r['batch_commit_ms_p50']:>13} {r['batch_commit_ms_p99']:>13}")
    ls = result["latency_single_entry"]
    print(f"single entry, one in flight: p50 {ls['p50_ms']} ms, p99 {ls['p99_ms']} ms "
          f"({ls['entries_per_s']} entries/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
