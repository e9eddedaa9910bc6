"""Snapshots and log compaction in the threaded runtime, and snapshot transfer.

In-process clusters (MemoryNetwork, memory stores).  Every wait is on a
condition.  ``PYRAFT_SNAPSHOT_ENTRIES`` overrides the size of the big
catch-up test (default 100,000 entries).
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from pyraft import Config, ServerState
from pyraft.errors import ForwardToLeader, Timeout
from pyraft.messages import InstallSnapshotRequest
from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
from pyraft.types import LogId, log_index

from memcluster import LOADED, LeaderMonitor, MemCluster, put, pyraft_threads, repl_thread, wait_until

pytestmark = pytest.mark.timeout(90)


def cfg(base: Config = LOADED, **kw) -> Config:
    d = {f: getattr(base, f) for f in base.__dataclass_fields__}
    d.update(kw)
    return Config(**d)


def write_many(raft, n: int, prefix: str = "k", batch: int = 2000, start: int = 0) -> int:
    """Write keys ``prefix{start}..prefix{start+n-1}`` in async batches; return the last log index."""
    last = 0
    for s in range(start, start + n, batch):
        futs = [raft.client_write_async(put(f"{prefix}{i}", i)) for i in range(s, min(start + n, s + batch))]
        for f in futs:
            last = max(last, f.result(30).log_id.index)
    return last


def write_many_to_cluster(c: MemCluster, n: int, prefix: str = "k", batch: int = 5000) -> int:
    """Like write_many, to whichever node leads: a batch cut short by a leader change goes again.

    (Puts are idempotent, so writing a key twice is harmless.)  For the big
    test, where a busy host may well cost the leader its lease once.
    """
    last, s = 0, 0
    while s < n:
        leader = c.leader(timeout=20)
        try:
            last = max(last, write_many(leader, min(batch, n - s), prefix, batch, start=s))
        except (ForwardToLeader, Timeout):
            continue
        s += batch
    return last


def log_store_indexes(raft) -> tuple[int, int]:
    st = raft.log_store.log_state()
    return log_index(st.last_purged), log_index(st.last_log_id)


class GatedStateMachine(MemoryStateMachine):
    """Builds snapshots only when the test opens the gate; records the builder's thread."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()
        self.builder_threads: list[str] = []

    def build_snapshot(self):
        self.builder_threads.append(threading.current_thread().name)
        meta = super().build_snapshot()  # reads the state as of now
        self.started.set()
        assert self.gate.wait(20), "the test never opened the gate"
        return meta


# --------------------------------------------------------------------- building and purging

def test_snapshot_is_built_by_a_builder_thread_while_applying_continues():
    with MemCluster(1, cfg(snapshot_every=None, max_in_snapshot_log_to_keep=0), init=False) as c:
        sm = GatedStateMachine()
        c.stop(1)
        c.start(1, MemoryLogStore(), sm).initialize({1: c.node(1)})
        r = c.leader()
        at = write_many(r, 100)
        r.trigger.snapshot()
        assert sm.started.wait(10)
        assert "pyraft-snapshot-1" in pyraft_threads()
        # The state machine keeps applying while the builder is busy.
        after = write_many(r, 100, start=100)
        r.wait(5).applied_index_at_least(after)
        assert r.metrics().snapshot is None
        sm.gate.set()
        m = r.wait(5).metrics(lambda m: m.snapshot is not None, "the snapshot")
        assert at <= m.snapshot.index < after
        assert m.purged == m.snapshot  # keep 0 entries
        assert sm.builder_threads == ["pyraft-snapshot-1"]
        wait_until(lambda: "pyraft-snapshot-1" not in pyraft_threads(), 5, "the builder thread to end")
        assert r.state_machine.get("k199") == 199


def test_entries_applied_during_a_build_call_for_the_next_policy_snapshot():
    with MemCluster(1, cfg(snapshot_every=100, max_in_snapshot_log_to_keep=0), init=False) as c:
        sm = GatedStateMachine()
        c.stop(1)
        c.start(1, MemoryLogStore(), sm).initialize({1: c.node(1)})
        r = c.leader()
        write_many(r, 100)
        assert sm.started.wait(10)  # the policy started a build; it hangs at the gate
        last = write_many(r, 300, start=100)
        r.wait(5).applied_index_at_least(last)
        sm.gate.set()
        # No more writes: the 300 entries applied meanwhile are enough to call for another one.
        m = r.wait(5).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= last, "a second snapshot")
        assert m.purged == m.snapshot and len(sm.builder_threads) == 2


def test_snapshot_every_policy_and_purge_keep_entries_on_every_node():
    every, keep = 300, 50
    with MemCluster(3, cfg(snapshot_every=every, max_in_snapshot_log_to_keep=keep)) as c:
        leader = c.leader()
        last = write_many(leader, 1000, batch=100)
        c.wait_applied(last)
        for r in c.rafts.values():
            m = r.wait(5).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= last - every
                                  and m.purged is not None and m.purged.index == m.snapshot.index - keep,
                                  "a policy snapshot and the purge behind it")
            assert m.snapshot.index > every
            purged, last_in_store = log_store_indexes(r)
            assert purged == m.purged.index and last_in_store == m.last_log_index
            assert r.log_store.read(purged, purged + 1) == []
            assert [e.index for e in r.log_store.read(purged + 1, purged + 3)] == [purged + 1, purged + 2]
            d = m.to_dict()
            assert d["snapshot"] == [m.snapshot.term, m.snapshot.index] and d["purged"][1] == m.purged.index
            assert r.state_machine.current_snapshot().last_log_id == m.snapshot


def test_trigger_snapshot_and_purge_log_are_clamped_to_the_snapshot():
    with MemCluster(3, cfg(snapshot_every=None)) as c:
        leader = c.leader()
        assert leader.trigger.purge_log(10) is None  # no snapshot yet: nothing may go
        last = write_many(leader, 300, batch=100)
        leader.trigger.snapshot()
        m = leader.wait(5).metrics(lambda m: m.snapshot is not None, "the snapshot")
        assert m.snapshot.index >= last
        snap = m.snapshot
        # trigger.snapshot purges nothing beyond the default keep (1000 entries).
        assert m.purged is None
        # (Followers still being streamed entries would hold a purge back: let them catch up.)
        leader.wait(5).metrics(lambda m: all(log_index(v) == m.last_log_index for v in m.replication.values()),
                               "followers to match the whole log")
        p = leader.trigger.purge_log(100)
        assert p == LogId(snap.term, 100) and leader.metrics().purged == p
        assert leader.trigger.purge_log(50) is None  # already gone
        p = leader.trigger.purge_log(10**9)
        assert p == snap  # never beyond the snapshot
        assert log_store_indexes(leader)[0] == snap.index
        # The cluster keeps working and a follower purges on its own too.
        last = write_many(leader, 100, start=300)
        f = c.rafts[[i for i in c.rafts if i != leader.node_id][0]]
        f.wait(5).applied_index_at_least(last)
        f.trigger.snapshot()
        fm = f.wait(5).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= last, "follower snapshot")
        assert f.trigger.purge_log(fm.snapshot.index) == fm.snapshot
        with pytest.raises(ValueError):
            f.trigger.purge_log(-1)


def test_a_dead_follower_does_not_stop_compaction_and_catches_up_by_snapshot_later():
    with MemCluster(3, cfg(snapshot_every=200, max_in_snapshot_log_to_keep=0)) as c:
        leader = c.leader()
        write_many(leader, 50, batch=50)
        f = [i for i in c.rafts if i != leader.node_id][0]
        c.net.isolate(f)
        last = write_many(leader, 600, start=50, batch=100)
        # The leader purged up to its snapshot although f is unreachable (and probed every heartbeat).
        m = leader.wait(5).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= 400
                                   and m.purged == m.snapshot, "the leader to purge up to its snapshot")
        assert c.rafts[f].metrics().last_log_index < m.purged.index
        c.net.heal()
        c.rafts[f].wait(10).applied_index_at_least(last)
        fm = c.rafts[f].metrics()
        assert fm.snapshot is not None and fm.snapshot.index >= m.purged.index  # it got one
        assert c.rafts[f].state_machine.items() == leader.state_machine.items()


def test_purge_waits_for_entries_a_follower_is_being_sent():
    # Long rpc timeout: the leader keeps the follower's messages in flight while its acks are lost.
    with MemCluster(3, cfg(snapshot_every=None, max_in_snapshot_log_to_keep=0, rpc_timeout=1.5)) as c:
        leader = c.leader()
        base = write_many(leader, 50)
        f = [i for i in c.rafts if i != leader.node_id][0]
        c.rafts[f].wait(5).applied_index_at_least(base)
        leader.wait(5).metrics(lambda m: log_index(m.replication.get(f)) >= base, "f to match")
        c.net.set_one_way(f, leader.node_id)  # f gets the entries, the leader never hears back
        last = write_many(leader, 300, start=50, batch=100)
        leader.trigger.snapshot()
        m = leader.wait(5).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= last, "snapshot")
        matched = log_index(m.replication[f])
        assert matched < last
        assert log_index(m.purged) <= matched  # what f is still being sent stays in the log
        c.net.heal()
        # Once f acknowledged (or its stream timed out and was probed again), the purge completes.
        leader.wait(10).metrics(lambda m: m.purged == m.snapshot, "the held-back purge to finish")
        c.rafts[f].wait(10).applied_index_at_least(last)
        assert c.rafts[f].metrics().snapshot is None  # it never needed one


# --------------------------------------------------------------------- transfer

SNAPSHOT_ENTRIES = int(os.environ.get("PYRAFT_SNAPSHOT_ENTRIES", "100000"))


def count_chunks(c: MemCluster, node_id: int) -> list[tuple[int, int, bool]]:
    """Record (offset, length, done) of every snapshot chunk that reaches ``node_id``."""
    seen: list[tuple[int, int, bool]] = []

    def f(direction, peer, msg):
        if direction == "request" and isinstance(msg, InstallSnapshotRequest):
            seen.append((msg.offset, len(msg.data), msg.done))
        return False

    c.net._transports[node_id].set_fault_filter(f)
    return seen


def test_learner_added_after_many_entries_catches_up_through_a_chunked_snapshot():
    n = SNAPSHOT_ENTRIES
    chunk = 64 * 1024 if n >= 20_000 else 4096
    config = cfg(snapshot_every=None, snapshot_chunk_size=chunk, max_in_snapshot_log_to_keep=100)
    with MemCluster(3, config) as c:
        t0 = time.monotonic()
        last = write_many_to_cluster(c, n)
        written = time.monotonic() - t0
        leader = c.leader()
        leader.trigger.snapshot()
        m = leader.wait(10).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= last
                                    and log_index(m.purged) == m.snapshot.index - 100,
                                    "the snapshot, and the purge behind it keeping 100 entries")
        c.start(4)
        chunks = count_chunks(c, 4)
        t1 = time.monotonic()
        leader.add_learner(4, c.node(4), blocking=True, timeout=30)
        caught_up = time.monotonic() - t1
        learner = c.rafts[4]
        learner.wait(10).applied_index_at_least(last)
        lm = learner.metrics()
        assert lm.state == ServerState.LEARNER
        assert lm.snapshot == m.snapshot and lm.purged == m.snapshot
        assert learner.state_machine.items() == leader.state_machine.items()
        assert learner.state_machine.get(f"k{n - 1}") == n - 1
        # Several chunks, back to back, one "done".
        assert len(chunks) >= 3, chunks
        assert [o for o, _, _ in chunks] == [sum(ln for _, ln, _ in chunks[:i]) for i in range(len(chunks))]
        assert [d for _, _, d in chunks] == [False] * (len(chunks) - 1) + [True]
        assert all(ln == chunk for _, ln, _ in chunks[:-1])
        print(f"\n{n} entries written in {written:.1f} s; learner caught up in {caught_up:.2f} s "
              f"through {len(chunks)} chunks of {chunk} bytes")


def test_a_node_restarted_after_installing_a_snapshot_has_the_right_state():
    config = cfg(snapshot_every=None, snapshot_chunk_size=4096, max_in_snapshot_log_to_keep=10)
    with MemCluster(3, config) as c:
        leader = c.leader()
        last = write_many(leader, 2000, batch=500)
        leader.trigger.snapshot()
        snap = leader.wait(5).metrics(lambda m: m.purged is not None, "purge").snapshot
        c.start(4)
        leader.add_learner(4, c.node(4), timeout=15)
        c.rafts[4].wait(5).applied_index_at_least(last)
        assert c.rafts[4].metrics().purged == snap
        c.stop(4)
        c.net.isolate(4)  # restart with no leader around: whatever it has is from its own stores
        r = c.start(4)
        m = r.metrics()
        assert m.snapshot == snap and m.purged == snap
        assert log_index(m.last_applied) >= snap.index
        r.wait(5).applied_index_at_least(last)
        assert r.state_machine.get("k1999") == 1999 and r.state_machine.get("k0") == 0
        assert m.membership.learner_ids == {4} or m.membership.voter_ids == {1, 2, 3}
        more = write_many(leader, 100, start=2000)
        c.net.heal()
        r.wait(10).applied_index_at_least(more)
        assert r.state_machine.items() == leader.state_machine.items()


@pytest.mark.parametrize("stale", ["longer", "shorter"])
def test_conflicting_uncommitted_entries_are_discarded_when_a_snapshot_covers_them(stale):
    """The paper, section 7: if the follower's entry at the snapshot's last index
    conflicts (or is missing), the follower discards its whole log."""
    config = cfg(snapshot_every=None, max_in_snapshot_log_to_keep=0)
    with MemCluster(3, config) as c, LeaderMonitor(c) as mon:
        old = c.leader()
        base = write_many(old, 20)
        old_term = old.metrics().current_term
        c.net.isolate(old.node_id)
        # Entries only the cut-off leader has: uncommitted, and later in conflict.
        k = 400 if stale == "longer" else 5
        lost = [old.client_write_async(put(f"lost{i}", i)) for i in range(k)]
        old.wait(5).log_index_at_least(base + k)
        rest = [i for i in c.rafts if i != old.node_id]
        new = c.leader(among=rest, timeout=10)
        last = write_many(new, 200, prefix="n")
        new.trigger.snapshot()
        snap = new.wait(5).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= last
                                   and m.purged == m.snapshot, "snapshot and purge (keep 0)").snapshot
        if stale == "longer":
            assert old.metrics().last_log_index > snap.index  # conflicting entries beyond the snapshot
        c.net.heal()
        old.wait(10).applied_index_at_least(last)
        for f in lost:
            with pytest.raises(ForwardToLeader):
                f.result(10)
        m = old.metrics()
        assert m.snapshot == snap and m.purged.index >= snap.index
        assert not [e for e in old.log_store.read(m.purged.index + 1, m.last_log_index + 1) if e.term == old_term]
        assert old.state_machine.items() == new.state_machine.items()
        assert old.state_machine.get("lost0") is None and old.state_machine.get("n199") == 199
    mon.check()


def test_a_lost_chunk_or_ack_is_sent_again_without_starting_over():
    chunk = 2048
    config = cfg(snapshot_every=None, snapshot_chunk_size=chunk, max_in_snapshot_log_to_keep=0, rpc_timeout=0.3)
    with MemCluster(3, config) as c:
        leader = c.leader()
        last = write_many(leader, 1500, batch=500)
        leader.trigger.snapshot()
        leader.wait(5).metrics(lambda m: m.purged is not None and m.purged.index >= last, "snapshot and purge")
        c.start(4)
        arrived: list[int] = []
        dropped: set[tuple[str, int]] = set()

        def lossy(direction, peer, msg):
            if direction == "request" and isinstance(msg, InstallSnapshotRequest):
                if msg.offset in (3 * chunk, 5 * chunk) and ("req", msg.offset) not in dropped:
                    dropped.add(("req", msg.offset))
                    return True  # this chunk is lost once
                arrived.append(msg.offset)
            return False

        acks: list[int] = []

        def lossy_reply(direction, peer, msg):
            # Replies leave the learner in order: drop the ack of the 8th chunk that arrived, once.
            if direction == "reply" and type(msg).__name__ == "InstallSnapshotResponse":
                acks.append(1)
                if len(acks) == 8:
                    return True
            return lossy(direction, peer, msg)

        c.net._transports[4].set_fault_filter(lossy_reply)
        leader.add_learner(4, c.node(4), timeout=20)
        c.rafts[4].wait(10).applied_index_at_least(last)
        assert c.rafts[4].state_machine.items() == leader.state_machine.items()
        assert len(dropped) == 2 and len(acks) >= 8
        assert arrived.count(0) == 1  # one transfer: resent chunks, never a restart
        assert len(arrived) > len(set(arrived))  # the chunk whose ack was lost arrived twice
