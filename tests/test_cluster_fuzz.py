"""Junk at a live cluster's ports: the nodes drop it, keep committing, and agree.

Thousands of frames go to the leader's and a follower's ROUTER from raw
DEALER sockets while a writer keeps committing: random bytes, valid frames
damaged until the codec refuses them (truncated, bit-flipped, wrong types,
wrong version, wrong cluster, oversized), and well-formed AppendEntries that
break Raft's invariants (entry terms out of order, a forged sender), which
the engine must refuse before they change anything.  Well-formed frames with
plausible content are not sent: telling a forged peer from a real one is
CURVE's job (tests/test_zmq_curve.py), not the codec's.

Reproduce with ``PYRAFT_FUZZ_SEED=<seed> python -m pytest tests/test_cluster_fuzz.py``.
"""
from __future__ import annotations

import os
import random
import threading

import msgpack
import pytest
import zmq

from pyraft import Config, Node, Raft, ServerState
from pyraft.codec import FORMAT_VERSION, decode_message, encode_message
from pyraft.errors import CodecError
from pyraft.messages import AppendEntriesRequest, VoteRequest
from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
from pyraft.transports.zmq import ZmqTransport
from pyraft.types import Entry, EntryKind, LogId

from conftest import free_port
from memcluster import pyraft_threads, wait_until

pytestmark = pytest.mark.timeout(180)

SEED = int(os.environ.get("PYRAFT_FUZZ_SEED", "20261127"))
CLUSTER = "fuzzc"
MAX_FRAME = 256 * 1024


def _junk(rng: random.Random, valid: list[bytes]) -> bytes:
    """A frame the codec refuses (checked by the codec itself)."""
    while True:
        k = rng.randrange(6)
        if k == 0:
            data = rng.randbytes(rng.randrange(0, 200))
        elif k == 1:
            v = rng.choice(valid)
            data = v[: rng.randrange(len(v))]
        elif k == 2:
            b = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
        elif k == 3:
            f = msgpack.unpackb(rng.choice(valid), strict_map_key=False)
            f[0] = rng.choice([FORMAT_VERSION + 1, 0, "1", None])
            data = msgpack.packb(f, use_bin_type=True)
        elif k == 4:
            f = msgpack.unpackb(rng.choice(valid), strict_map_key=False)
            f[1] = "another-cluster"
            data = msgpack.packb(f, use_bin_type=True)
        else:
            f = msgpack.unpackb(rng.choice(valid), strict_map_key=False)
            f[5] = [rng.choice([None, "x", -1, 2.5, [], {}]) for _ in f[5]]
            data = msgpack.packb(f, use_bin_type=True)
        try:
            decode_message(data, CLUSTER)
        except CodecError:
            return data


def _hostile(rng: random.Random, target: int, term: int) -> bytes:
    """Well-formed AppendEntries that no correct leader sends."""
    t = term + rng.randint(0, 3)
    if rng.random() < 0.5:  # entry terms going backwards
        entries = (Entry(LogId(t, 1000), EntryKind.NORMAL, {"op": "put", "key": "evil", "value": 1}),
                   Entry(LogId(max(0, t - 1), 1001), EntryKind.NORMAL, {"op": "put", "key": "evil", "value": 2}))
        msg = AppendEntriesRequest(t, 99, LogId(t, 999), entries, 10**6)
    else:  # claims to come from the node it is sent to
        msg = AppendEntriesRequest(t, target, None, (), 10**6)
    return encode_message(msg, CLUSTER, 99, rng.randrange(1 << 30))


def test_a_cluster_under_fuzz_keeps_committing_and_every_node_agrees():
    rng = random.Random(SEED)
    cfg = Config(cluster_name=CLUSTER, heartbeat_interval=0.03, election_timeout=(0.3, 0.6))
    ports = {i: free_port() for i in (1, 2, 3)}
    nodes = {i: Node(f"tcp://127.0.0.1:{ports[i]}") for i in (1, 2, 3)}
    rafts = {i: Raft(i, cfg, ZmqTransport(i, nodes[i].addr, cluster_name=CLUSTER, max_frame_size=MAX_FRAME),
                     MemoryLogStore(), MemoryStateMachine()) for i in nodes}
    ctx = zmq.Context.instance()
    socks = []
    try:
        rafts[1].initialize(nodes)
        for r in rafts.values():
            r.wait(10).voter_ids({1, 2, 3})
        leader = wait_until(lambda: next((r for r in rafts.values() if r.is_leader()), None), 10, "a leader")
        follower = next(r for r in rafts.values() if r is not leader)
        valid = [encode_message(VoteRequest(1, 2, LogId(1, 3), True), CLUSTER, 2, 1),
                 encode_message(AppendEntriesRequest(1, 1, LogId(1, 2), (
                     Entry(LogId(1, 3), EntryKind.NORMAL, {"op": "put", "key": "k", "value": "v"}),), 2), CLUSTER, 1, 2)]

        done = threading.Event()
        written: list[int] = []

        def writer():
            i = 0
            while not done.is_set():
                leader.client_write({"op": "put", "key": f"w{i % 50}", "value": i}, timeout=10)
                written.append(i)
                i += 1

        wt = threading.Thread(target=writer)
        wt.start()
        sent = 0
        for target in (leader, follower):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.connect(nodes[target.node_id].addr)
            socks.append(s)
            term = target.metrics().current_term
            for n in range(2500):
                r = rng.random()
                if r < 0.1:
                    frame = _hostile(rng, target.node_id, term)
                elif r < 0.12:
                    frame = b"\x00" * (MAX_FRAME + 1)  # oversized
                else:
                    frame = _junk(rng, valid)
                parts = [frame] if rng.random() < 0.9 else [frame, b"extra part"]
                s.send_multipart(parts)
                sent += 1
        # The cluster went on committing through all of it ...
        before = len(written)
        wait_until(lambda: len(written) >= before + 50, 30, "50 more committed writes after the fuzzing")
        done.set()
        wt.join(30)
        assert not wt.is_alive()
        # ... nobody went Fatal or lost its leader's term to a forged message ...
        for r in rafts.values():
            m = r.metrics()
            assert m.state != ServerState.FATAL, m.error
        # ... every node dropped junk and counted it ...
        dropped = sum(sum(v for k, v in r.metrics().counters.items() if "drop" in k) for r in (leader, follower))
        assert dropped > 0, [r.metrics().counters for r in (leader, follower)]
        # ... and every node holds the same state, without the forged entries.
        last = leader.metrics().last_log_index
        for r in rafts.values():
            r.wait(20).applied_index_at_least(last)
        states = [r.state_machine.items() for r in rafts.values()]
        assert all(s == states[0] for s in states)
        assert all(r.state_machine.get("evil") is None for r in rafts.values())
        assert sent == 5000
    finally:
        for s in socks:
            s.close(0)
        for r in rafts.values():
            r.shutdown()
    wait_until(lambda: not pyraft_threads(), 10, "every pyraft thread to stop")
