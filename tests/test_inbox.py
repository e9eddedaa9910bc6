"""RaftCore's inbox: puts wake a sleeping consumer; lazy puts wake it only when urgent.

The consumer's sleep is observable without timing: ``_sleeping`` is set by the
consumer under the lock before it waits and cleared only by the producer that
wakes it (or by the consumer once its wait ends).
"""
from __future__ import annotations

import threading

import pytest

from pyraft.runtime.inbox import Inbox

from memcluster import MemCluster, wait_until

pytestmark = pytest.mark.timeout(60)


class Consumer:
    """A thread in ``inbox.drain(timeout)``; ``got`` is what that one drain returned."""

    def __init__(self, inbox: Inbox, timeout: float = 60.0) -> None:
        self.inbox = inbox
        self.got: list | None = None
        self.thread = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self.thread.start()
        wait_until(lambda: inbox._sleeping, 10, "the consumer to sleep")

    def _run(self, timeout: float) -> None:
        self.got = self.inbox.drain(timeout, 100)

    def woken(self) -> list:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the consumer was not woken"
        assert self.got is not None
        return self.got


def test_a_put_wakes_the_sleeping_consumer():
    inbox = Inbox()
    c = Consumer(inbox)
    inbox.put("a")
    assert c.woken() == ["a"]


def test_a_lazy_put_leaves_the_consumer_asleep_until_it_is_urgent_or_woken():
    inbox = Inbox()
    c = Consumer(inbox)
    asked = []
    inbox.put_lazy("a", lambda: asked.append(1) or False)
    assert asked == [1]  # asked while the consumer slept ...
    assert inbox._sleeping and c.thread.is_alive()  # ... and not woken: only the consumer clears the flag
    inbox.put_lazy("b", lambda: False)
    assert inbox._sleeping and c.thread.is_alive()
    inbox.wake()  # a waiter appeared: the items that wait are urgent now
    assert c.woken() == ["a", "b"]


def test_an_urgent_lazy_put_wakes_the_consumer():
    inbox = Inbox()
    c = Consumer(inbox)
    inbox.put_lazy("a", lambda: True)
    assert c.woken() == ["a"]


def test_a_lazy_put_to_an_awake_consumer_asks_nothing_and_is_drained_next():
    inbox = Inbox()

    def never() -> bool:
        raise AssertionError("urgent() asked while the consumer was awake")

    inbox.put_lazy("a", never)
    assert inbox.drain(0.0, 10) == ["a"]


def test_wake_leaves_an_empty_inbox_asleep():
    inbox = Inbox()
    c = Consumer(inbox)
    inbox.wake()
    assert inbox._sleeping and c.thread.is_alive()
    inbox.put("x")
    assert c.woken() == ["x"]


def test_raft_wait_counts_itself_so_that_applied_batches_wake_raftcore():
    with MemCluster(3) as c:
        leader = c.leader()
        follower = next(r for r in c.rafts.values() if r is not leader)
        core = follower._core
        assert core.metrics_waiters == 0 and not core._applied_is_urgent()
        go = threading.Event()
        t = threading.Thread(target=lambda: follower.wait(30).metrics(lambda m: go.is_set(), "the test"))
        t.start()
        wait_until(lambda: core.metrics_waiters == 1, 10, "the waiter to count itself")
        assert core._applied_is_urgent()
        # The waiter is released by an applied batch on the follower (RaftCore republishes metrics).
        go.set()
        resp = leader.client_write({"op": "put", "key": "k", "value": 1}, timeout=10)
        follower.wait(10).applied_index_at_least(resp.log_id.index)
        t.join(10)
        assert not t.is_alive()
        assert core.metrics_waiters == 0 and not core._applied_is_urgent()


def test_a_leader_like_a_follower_takes_an_applied_batch_at_once_only_when_someone_waits():
    # Before, a leader's RaftCore was woken for every applied batch, so that whoever got a
    # write's answer would see it applied in the metrics; the metrics now read the SM
    # worker's applied point themselves (test_runtime: ..._as_soon_as_its_answer_came).
    with MemCluster(3) as c:
        leader = c.leader()
        for r in c.rafts.values():
            assert r._core.metrics_waiters == 0 and not r._core._applied_is_urgent(), r.node_id
