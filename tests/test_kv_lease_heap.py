"""The leader's LeaseKeeper holds about one heap entry per lease, however often leases are renewed.

A keepalive only moves its lease's deadline; the heap entry moves to it when
it comes up (pyraft/kv/leases.py, Memory).  Before, every keepalive pushed an
entry that stayed until its deadline, up to MAX_LEASE_TTL (1e9 s) later: one
client renewing one lease grew the leader's memory without bound.

The keeper runs against a fake leader (always leading in term 1, every
ReadIndex round done at once) and a clock the test moves; nothing here sleeps
for a duration or depends on timing.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest

from pyraft.kv.commands import MAX_LEASE_TTL
from pyraft.kv.leases import _HEAP_SLACK, LeaseKeeper
from pyraft.types import ServerState

from memcluster import pyraft_threads, wait_until

pytestmark = pytest.mark.timeout(120)

LEASE = 7  # the id of the lease the state machine holds when the keeper takes over
LOADED_AT = 5  # the revision it is read at


class Clock:
    """The keeper's clock: moved by the test; counts the keeper's reads so the test can wait for a round."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class Leader:
    """The Raft handle a LeaseKeeper uses, of a node that leads in term 1 for good."""

    node_id = 1

    def __init__(self) -> None:
        self.proposed: list[Any] = []

    def metrics(self) -> Any:
        return SimpleNamespace(state=ServerState.LEADER, current_term=1, current_leader=1, membership=None)

    def ensure_linearizable_async(self) -> Future:
        f: Future = Future()
        f.set_result(None)
        return f

    def client_write_async(self, command: Any) -> Future:
        self.proposed.append(command)
        return Future()


class StateMachine:
    """The state machine side: the leases it holds, and the keeper's apply listener."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.listener: Any = None

    def add_apply_listener(self, fn: Any) -> None:
        self.listener = fn

    def remove_apply_listener(self, fn: Any) -> None:
        self.listener = None

    def leases(self) -> tuple[int, dict[int, float]]:
        return LOADED_AT, {LEASE: self.ttl}


class Reply:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: Any = None

    def reply(self, response: Any) -> None:
        self.response = response
        self.done.set()


def keepalive(keeper: LeaseKeeper, lease: int = LEASE) -> Any:
    """One keepalive, answered (so the keeper has handled everything queued before it)."""
    r = Reply()
    keeper.keepalive(lease, r)
    assert r.done.wait(10), "no answer to a keepalive"
    return r.response


def next_rounds(keeper: LeaseKeeper, clock: Clock) -> None:
    """Return once the keeper has checked its deadlines at least once against the clock as it is now.

    With nothing queued the keeper reads its clock once a round, for that check: the second read
    after this call starts is in a round that began after the first one's check was done.
    """
    seen = clock.reads
    wait_until(lambda: clock.reads >= seen + 2, 10, "the keeper's next round")


@pytest.fixture
def keeper_of():
    made: list[LeaseKeeper] = []

    def make(ttl: float) -> tuple[LeaseKeeper, Leader, Clock]:
        raft, clock = Leader(), Clock()
        keeper = LeaseKeeper(raft, StateMachine(ttl), tick=0.001, clock=clock)
        made.append(keeper)
        return keeper, raft, clock

    yield make
    for k in made:
        k.stop()
    assert pyraft_threads() == []


def test_renewing_a_long_lease_ten_thousand_times_keeps_one_heap_entry(keeper_of):
    keeper, raft, clock = keeper_of(MAX_LEASE_TTL)
    for i in range(10_000):
        clock.now += 1.0  # every keepalive moves the deadline later
        resp = keepalive(keeper)
        assert resp.ok and resp.body == MAX_LEASE_TTL
        if i % 1000 == 0:
            assert len(keeper._heap) <= 1 + 2, i
    next_rounds(keeper, clock)
    assert len(keeper._heap) <= 1 + 2
    assert raft.proposed == []


def test_a_renewed_lease_is_revoked_at_its_last_deadline_and_not_before(keeper_of):
    ttl = 10.0
    keeper, raft, clock = keeper_of(ttl)
    for _ in range(100):  # the first deadlines come up while the lease is renewed: its entry moves
        clock.now += 1.0
        assert keepalive(keeper).ok
        next_rounds(keeper, clock)
        assert len(keeper._heap) <= 1 + 2
    assert raft.proposed == []
    last = clock.now + ttl
    clock.now = last - 0.001
    next_rounds(keeper, clock)
    assert raft.proposed == []  # never earlier than the last keepalive + ttl
    clock.now = last
    next_rounds(keeper, clock)
    assert raft.proposed == [{"op": "lease_revoke", "id": LEASE}]
    resp = keepalive(keeper)
    assert not resp.ok and resp.error[0] == "LeaseNotFound"
    clock.now += 1.0  # the revoke is not applied yet: proposed again after _REVOKE_RETRY
    next_rounds(keeper, clock)
    assert raft.proposed == [{"op": "lease_revoke", "id": LEASE}] * 2
    assert len(keeper._heap) <= 1 + 2


def test_granting_and_revoking_long_leases_does_not_grow_the_heap(keeper_of):
    keeper, raft, clock = keeper_of(MAX_LEASE_TTL)
    assert keepalive(keeper).ok  # the keeper leads with its leases loaded
    sm_listener = keeper._sm.listener
    revision = LOADED_AT
    for _ in range(3 * _HEAP_SLACK):
        revision += 1
        sm_listener(revision, [(revision, MAX_LEASE_TTL)])  # lease_grant: the id is its revision
        sm_listener(revision + 1, [(revision, None)])  # lease_revoke
        revision += 1
    assert keepalive(keeper).ok  # everything queued before it is handled
    assert len(keeper._heap) <= 2 * 1 + _HEAP_SLACK + 1
    # the live lease is still kept: revoked once its deadline passes
    assert raft.proposed == []
    clock.now = 1.0 + MAX_LEASE_TTL
    next_rounds(keeper, clock)
    assert raft.proposed == [{"op": "lease_revoke", "id": LEASE}]
