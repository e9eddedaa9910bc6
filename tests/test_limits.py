"""Limits that keep a node alive under load and careless input (issue 15, runtime half).

Client writes beyond ``Config.max_pending_writes``; what peers can queue in
RaftCore's inbox; the KV store's size quota; KV keys and client ids LMDB
cannot hold; how deep replicated-object values may nest.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

import pytest

from pyraft import Config, Node, Raft, ServerState
from pyraft.errors import Compacted, ForwardToLeader, NoSpace, Overloaded
from pyraft.kv import KVClient, KVCommandError, KVStateMachine
from pyraft.kv.server import serve_kv
from pyraft.messages import AppendEntriesRequest
from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
from pyraft.transports.memory import MemoryNetwork
from pyraft.transports.zmq import ZmqTransport
from pyraft.types import Entry, EntryKind, LogId

from memcluster import FAST, MemCluster, pyraft_threads, put, wait_until

pytestmark = pytest.mark.timeout(120)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB, MIB = 1024, 1024 * 1024


def cfg(**kw) -> Config:
    return dataclasses.replace(FAST, **kw)


class GatedApply(MemoryStateMachine):
    """Applies only while ``gate`` is open: writes stay in flight until the test opens it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def apply(self, entries):
        if any(e.kind == EntryKind.NORMAL for e in entries):
            assert self.gate.wait(30), "the test never opened the gate"
        return super().apply(entries)


class GatedLog(MemoryLogStore):
    """A log store whose writes wait while ``hold`` is set: RaftCore stalls inside a turn."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, ops):
        if self.hold.is_set():
            self.entered.set()
            assert self.release.wait(30), "the test never released the log"
        return super().write(ops)


def single_node(config: Config, log_store=None, sm=None) -> tuple[MemoryNetwork, Raft]:
    net = MemoryNetwork()
    r = Raft(1, config, net.transport(1), log_store or MemoryLogStore(), sm or MemoryStateMachine())
    r.initialize({1: Node("mem://1")})
    r.wait(10).state(ServerState.LEADER)
    return net, r


# --------------------------------------------------------------------- Config.max_pending_writes

def test_config_validates_the_new_limits():
    assert Config().max_pending_writes == 50_000
    assert Config().max_queued_rpcs == 1024
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_pending_writes"):
            Config(max_pending_writes=bad)
        with pytest.raises(ValueError, match="max_queued_rpcs"):
            Config(max_queued_rpcs=bad)
    assert Config.from_dict({"max_pending_writes": 7, "max_queued_rpcs": 9}).max_pending_writes == 7


def test_writes_beyond_max_pending_writes_fail_at_once_and_nothing_is_proposed():
    sm = GatedApply()
    net, r = single_node(cfg(max_pending_writes=50), sm=sm)
    try:
        base = r.metrics().last_log_index
        futs = [r.client_write_async(put(f"k{i}", i)) for i in range(50)]
        r.wait(10).log_index_at_least(base + 50)
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="max_pending_writes"):
            r.client_write_async(put("one too many", 0))
        with pytest.raises(Overloaded):
            r.client_write(put("one too many", 0), timeout=5)
        assert time.monotonic() - t0 < 1.0  # at once, not after a timeout
        time.sleep(0.2)
        assert r.metrics().last_log_index == base + 50  # the refused writes were never proposed
        assert r.metrics().counters["writes_refused_overloaded"] == 2
        sm.gate.set()
        for f in futs:
            f.result(10)
        # Completed writes no longer count: the node takes writes again.
        assert r.client_write(put("after", 1), timeout=10).log_id.index == base + 51
    finally:
        sm.gate.set()
        r.shutdown()
        net.close()


def test_failed_writes_release_their_place():
    """Writes that fail (a follower refuses them, a new leader overwrites them) do not count for ever."""
    with MemCluster(3, cfg(max_pending_writes=10)) as c:
        leader = c.leader()
        follower = next(r for r in c.rafts.values() if r is not leader)
        for _ in range(5):  # 50 writes through a limit of 10: each failure gave its place back
            futs = [follower.client_write_async(put("x", 1)) for _ in range(10)]
            for f in futs:
                with pytest.raises(ForwardToLeader):
                    f.result(10)
        wait_until(lambda: follower._core.pending_writes() == 0, 10, "the follower's count back at 0")
        for i in range(30):
            leader.client_write(put("y", i), timeout=10)
        assert leader._core.pending_writes() == 0


# --------------------------------------------------------------------- RaftCore's inbox

class _NoReply:
    def reply(self, message) -> None:
        pass


def test_peer_requests_beyond_the_inbox_bound_are_dropped_and_counted_api_calls_are_not():
    log_store = GatedLog()
    net, r = single_node(cfg(max_queued_rpcs=16), log_store=log_store)
    try:
        log_store.hold.set()
        stuck = r.client_write_async(put("stall", 1))  # RaftCore waits inside this turn's log write
        assert log_store.entered.wait(10)
        term = r.metrics().current_term
        for _ in range(100):  # a peer floods the node with (stale) heartbeats
            r._on_request(2, AppendEntriesRequest(term - 1, 2, None, (), 0, 0), _NoReply())
        writes = [r.client_write_async(put(f"w{i}", i)) for i in range(100)]
        reads = [r.ensure_linearizable_async() for _ in range(10)]
        log_store.hold.clear()
        log_store.release.set()
        stuck.result(10)
        for f in writes:  # every API call got through
            f.result(10)
        for f in reads:
            f.result(10)
        m = r.metrics()
        assert m.counters["inbox_dropped_rpcs"] == 100 - 16
        assert m.counters["inbox_dropped_replies"] == 0
        assert m.state == ServerState.LEADER
        assert r._core.rpc_lane.taken == 16  # the 16 admitted ones were handled
    finally:
        log_store.release.set()
        r.shutdown()
        net.close()


# --------------------------------------------------------------------- the KV store's size quota

SMALL = dict(map_size=1 * MIB, max_map_size=8 * MIB, quota_bytes=256 * KIB)


def test_quota_bytes_is_validated(tmp_path):
    with pytest.raises(ValueError, match="quota_bytes"):
        KVStateMachine(tmp_path / "a", quota_bytes=0)
    with pytest.raises(ValueError, match="half of max_map_size"):
        KVStateMachine(tmp_path / "b", max_map_size=8 * MIB, quota_bytes=5 * MIB)
    sm = KVStateMachine(tmp_path / "c")
    assert sm.quota_bytes == 2 * 1024 ** 3
    sm.close()


def start_kv(c: MemCluster, i: int, log_store: MemoryLogStore, sm: KVStateMachine) -> Raft:
    return c.start(i, log_store, sm)


def kv_cluster(tmp_path, n: int = 3, **sm_kw) -> MemCluster:
    c = MemCluster(0, cfg(snapshot_every=None, max_in_snapshot_log_to_keep=0), init=False)
    for i in range(1, n + 1):
        start_kv(c, i, MemoryLogStore(), KVStateMachine(tmp_path / f"n{i}", **sm_kw))
    c.rafts[1].initialize({i: c.node(i) for i in range(1, n + 1)})
    return c


def close_kv_cluster(c: MemCluster) -> None:
    sms = [sm for _ls, sm in c.stores.values()]
    c.close()
    for sm in sms:
        sm.close()


def test_past_max_leases_a_lease_grant_fails_with_nospace_before_proposing_and_revokes_make_room(tmp_path):
    """The leader keeps each lease's deadline in memory: their number is bounded, not only their bytes."""
    with pytest.raises(ValueError, match="max_leases"):
        KVStateMachine(tmp_path / "bad", max_leases=0)
    c = kv_cluster(tmp_path, max_leases=3)
    try:
        leader = c.leader()
        grant = {"op": "lease_grant", "ttl": 60}
        ids = [leader.client_write(grant, timeout=10).result for _ in range(3)]
        last = leader.metrics().last_log_index
        with pytest.raises(NoSpace, match="max_leases"):
            leader.client_write(grant, timeout=10)
        assert leader.metrics().last_log_index == last  # decided before proposing
        leader.client_write(put("k", 1), timeout=10)  # other writes go on
        assert leader.client_write({"op": "lease_revoke", "id": ids[0]}, timeout=10).result is True
        leader.client_write(grant, timeout=10)
        with pytest.raises(NoSpace, match="max_leases"):
            leader.client_write(grant, timeout=10)
    finally:
        close_kv_cluster(c)
    sm = KVStateMachine(tmp_path / "n1", max_leases=3)  # counted again when it opens
    try:
        with pytest.raises(NoSpace, match="holds 3 leases"):
            sm.check_command(grant)
    finally:
        sm.close()


def test_past_the_quota_writes_fail_with_nospace_reads_deletes_and_compaction_work(tmp_path):
    c = kv_cluster(tmp_path, **SMALL)
    try:
        leader = c.leader()
        sm = leader.state_machine
        written = 0
        with pytest.raises(NoSpace, match="quota"):
            while written < 1000:
                leader.client_write(put(f"key{written:04}", "v" * 1000), timeout=10)
                written += 1
        assert sm.used_bytes > 256 * KIB
        last = leader.metrics().last_log_index
        for cmd in (put("more", 1), {"op": "cas", "key": "key0000", "expected": None, "value": 1}):
            with pytest.raises(NoSpace):
                leader.client_write(cmd, timeout=10)
        assert leader.metrics().last_log_index == last  # decided before proposing
        # Reads, deletes, snapshots and purges go on; every node applied everything.
        assert sm.get("key0000") == "v" * 1000
        c.wait_applied(last)
        assert all(r.metrics().state in (ServerState.LEADER, ServerState.FOLLOWER) for r in c.rafts.values())
        for i in range(written // 2):
            assert leader.client_write({"op": "delete", "key": f"key{i:04}"}, timeout=10).result is True
        leader.trigger.snapshot()
        m = leader.wait(10).metrics(lambda m: m.snapshot is not None, "a snapshot")
        leader.trigger.purge_log(m.snapshot.index)
        leader.wait(10).metrics(lambda m: m.purged is not None, "a purge")
        # Deleting brought the store under its quota: writes are taken again, with no alarm to disarm.
        assert sm.used_bytes <= 256 * KIB
        leader.client_write(put("back", 1), timeout=10)
        assert sm.get("back") == 1
    finally:
        close_kv_cluster(c)


def test_past_the_quota_held_by_the_watch_history_a_compact_frees_it_and_stays_after_a_restart(tmp_path):
    """A key written over and over fills the quota with its history: deleting it frees one value.

    Only ``compact`` brings writes back (else only 100,000 more revisions would).
    """
    c = kv_cluster(tmp_path, **SMALL)
    try:
        leader = c.leader()
        sm = leader.state_machine
        with pytest.raises(NoSpace, match="quota"):
            for i in range(1000):
                leader.client_write(put("hot", f"{i:04}" + "v" * 1000), timeout=10)
        assert sm.used_bytes > 256 * KIB
        sm.check_command({"op": "compact", "revision": 1})  # taken past the quota (deletes are too)
        leader.client_write({"op": "delete", "key": "hot"}, timeout=10)
        assert sm.items() == [] and sm.used_bytes > 240 * KIB  # the puts' values are still in the history
        last = leader.metrics().last_log_index
        assert leader.client_write({"op": "compact", "revision": last}, timeout=10).result is None
        assert sm.used_bytes < 64 * KIB
        leader.client_write(put("back", 1), timeout=10)
        c.wait_applied(last + 2)
        for r in c.rafts.values():  # every replica compacted, at the same revision
            with pytest.raises(Compacted, match=f"revision {last - 1} is compacted"):
                r.state_machine.events("", prefix=True, start_revision=last - 1)
            ev, _ = r.state_machine.events("", prefix=True, start_revision=last)
            assert [(e.type, e.key) for e in ev] == [("delete", "hot"), ("put", "back")]
    finally:
        close_kv_cluster(c)
    sm = KVStateMachine(tmp_path / "n2", **SMALL)  # the history's start is kept on disk
    try:
        with pytest.raises(Compacted):
            sm.events("", prefix=True, start_revision=last - 1)
        assert sm.used_bytes < 64 * KIB
    finally:
        sm.close()


def test_kvclient_raises_nospace_at_once(tmp_path):
    transports = {i: ZmqTransport(i, "tcp://127.0.0.1:*") for i in (1, 2, 3)}
    sms = {i: KVStateMachine(tmp_path / f"n{i}", **SMALL) for i in transports}
    rafts = {i: Raft(i, FAST, t, MemoryLogStore(), sms[i]) for i, t in transports.items()}
    try:
        for r in rafts.values():
            serve_kv(r)
        rafts[1].initialize({i: Node(t.endpoint) for i, t in transports.items()})
        with KVClient([t.endpoint for t in transports.values()], timeout=10) as kv:
            kv.put("warm-up", 1)
            with pytest.raises(NoSpace):
                for i in range(1000):
                    kv.put(f"key{i:04}", "v" * 1000)
            t0 = time.monotonic()
            with pytest.raises(NoSpace):
                kv.put("more", 1)
            assert time.monotonic() - t0 < 2.0  # not retried until the timeout
            assert kv.get("warm-up") == 1
            assert kv.delete("key0000") is True
    finally:
        for r in rafts.values():
            r.shutdown()
        for sm in sms.values():
            sm.close()
    assert pyraft_threads() == []


# --------------------------------------------------------------------- keys LMDB cannot hold

LONG_KEY = "k" * 600


def test_a_key_or_client_id_lmdb_cannot_hold_is_refused_before_proposing_and_survives_apply(tmp_path):
    """A put with a 600-byte key used to make every node that applied it Fatal, again after a restart."""
    c = kv_cluster(tmp_path)
    try:
        leader = c.leader()
        before = leader.metrics().last_log_index
        for cmd in (put(LONG_KEY, 1), {"op": "delete", "key": LONG_KEY},
                    {"op": "put", "key": "k", "value": 1, "client": b"c" * 600, "seq": 1}):
            with pytest.raises(KVCommandError, match="too long"):
                leader.client_write(cmd, timeout=10)
        assert leader.metrics().last_log_index == before  # refused before proposing
        # Such an entry in the log all the same (written by an older version, or forged):
        # applying it is a KVCommandError result on every node, never a dead node.
        leader._check_command = None
        for cmd in (put(LONG_KEY, 1), {"op": "put", "key": "k", "value": 1, "client": b"c" * 600, "seq": 1}):
            with pytest.raises(KVCommandError, match="too long"):
                leader.client_write(cmd, timeout=10)
        last = leader.client_write(put("after", 1), timeout=10).log_id.index
        c.wait_applied(last)
        for i, r in c.rafts.items():
            assert r.metrics().state != ServerState.FATAL, r.metrics().error
            assert r.state_machine.get("after") == 1
        # A node restarted over its stores applies on.
        sm_dir = c.stores[2][1].path
        c.stop(2)
        c.stores[2][1].close()
        r2 = start_kv(c, 2, c.stores[2][0], KVStateMachine(sm_dir))
        last = c.leader().client_write(put("after restart", 2), timeout=10).log_id.index
        r2.wait(10).applied_index_at_least(last)
        assert r2.state_machine.get("after restart") == 2
    finally:
        close_kv_cluster(c)


def test_kvclient_refuses_a_key_lmdb_cannot_hold_without_sending_it():
    with KVClient(["tcp://127.0.0.1:1"], timeout=5) as kv:  # nothing listens there
        t0 = time.monotonic()
        for call in (lambda: kv.put(LONG_KEY, 1), lambda: kv.get(LONG_KEY), lambda: kv.delete(LONG_KEY),
                     lambda: kv.cas(LONG_KEY, None, 1), lambda: kv.put(("x" * 300, "y" * 300), 1)):
            with pytest.raises(KVCommandError, match="too long"):
                call()
        assert time.monotonic() - t0 < 1.0
        kv.close()


# --------------------------------------------------------------------- replicated-object values

_DEEP_APPLY = r"""
import threading, msgpack
from pyraft.objects import ObjectStateMachine, ReplList
from pyraft.types import Entry, EntryKind, LogId

arg = msgpack.packb([[]])
for _ in range(200):  # 200 nested tuples in about 1 KiB
    arg = msgpack.packb([[msgpack.ExtType(1, arg)], {}])
osm = ObjectStateMachine(ReplList(name="l"))
entry = Entry(LogId(1, 1), EntryKind.NORMAL, {"k": "call", "o": "l", "m": "append", "v": 0, "a": arg,
                                              "c": b"c", "s": 1, "f": 1, "t": 1.0})
out = []
t = threading.Thread(target=lambda: out.extend(osm.apply([entry])))  # a node's thread, as the SM worker's
t.start()
t.join()
print("RESULT", type(out[0]).__name__, out[0])
"""


def test_applying_a_call_whose_argument_nests_too_deep_is_a_failed_call_not_a_crash():
    p = subprocess.run([sys.executable, "-c", _DEEP_APPLY], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, f"the process died (rc {p.returncode}): {p.stderr[-2000:]}"
    assert "RESULT RaftError" in p.stdout and "nest" in p.stdout, p.stdout


def test_a_call_whose_argument_nests_too_deep_is_refused_at_the_caller():
    from pyraft.objects import ObjectStateMachine, ReplList

    deep: object = 1
    for _ in range(40):
        deep = (deep,)
    lst = ReplList(name="l")
    osm = ObjectStateMachine(lst)
    net = MemoryNetwork()
    r = Raft(1, FAST, net.transport(1), MemoryLogStore(), osm)
    try:
        osm.attach(r)
        r.initialize({1: Node("mem://1")})
        r.wait(10).state(ServerState.LEADER)
        with pytest.raises(TypeError, match="nest"):
            lst.append(deep, timeout=10)
        shallow: object = 1
        for _ in range(30):
            shallow = (shallow,)
        lst.append(shallow, timeout=10)
        assert lst.to_list() == [shallow]  # the refused call was never proposed
    finally:
        r.shutdown()
        osm.close()
        net.close()


def test_a_call_with_a_client_id_lmdb_cannot_hold_is_a_failed_call(tmp_path):
    from pyraft.errors import RaftError
    from pyraft.objects import ObjectStateMachine, ReplCounter
    from pyraft.objects import _values

    osm = ObjectStateMachine(ReplCounter(name="n"), path=tmp_path)
    try:
        cmd = {"k": "call", "o": "n", "m": "inc", "v": 0, "a": _values.dumps([[], {}]),
               "c": b"c" * 600, "s": 1, "f": 1, "t": 1.0}
        res = osm.apply([Entry(LogId(1, 1), EntryKind.NORMAL, cmd)])
        assert isinstance(res[0], RaftError) and "malformed" in str(res[0])
        assert osm.applied_state()[0] == LogId(1, 1)
    finally:
        osm.close()
