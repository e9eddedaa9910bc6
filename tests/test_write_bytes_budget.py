"""Config.max_pending_write_bytes: large client writes in flight are bounded in bytes, not only in count.

Before it, only the count of writes in flight was bounded (50,000), and a
client could pipeline hundreds of writes just under the 1.5 MiB frame limit:
the leader took them all into one turn and one append of hundreds of MiB,
stopped heartbeating, and its followers elected another leader, round after
round, with nothing committed.
"""
from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from pyraft import Config
from pyraft.errors import Overloaded, ShutDown
from pyraft.raft import LARGE_COMMAND_BYTES
from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
from memcluster import FAST, MemCluster

pytestmark = pytest.mark.timeout(120)

BUDGET = 1024 * 1024


class HeldStateMachine(MemoryStateMachine):
    """Applies only while ``gate`` is set: the writes before it stay in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def apply(self, entries):
        self.gate.wait(60)
        return super().apply(entries)


@pytest.fixture
def node():
    sm = HeldStateMachine()
    with MemCluster(1, dataclasses.replace(FAST, max_pending_write_bytes=BUDGET), init=False) as c:
        c.stop(1)
        r = c.start(1, MemoryLogStore(), sm)
        r.initialize({1: c.node(1)})
        c.leader()
        yield r, sm
        sm.gate.set()


def big(n: int, tag: int = 0) -> dict:
    return {"op": "put", "key": f"k{tag}", "value": os.urandom(n)}


def test_large_writes_past_the_byte_budget_are_refused_until_the_ones_in_flight_complete(node):
    r, sm = node
    sm.gate.clear()
    held = [r.client_write_async(big(300_000, i)) for i in range(3)]  # about 900 KB of a 1 MiB budget
    with pytest.raises(Overloaded, match="max_pending_write_bytes"):
        r.client_write_async(big(300_000, 3))
    r.wait(10).metrics(lambda m: m.counters.get("writes_refused_overloaded") == 1, "the refusal counted")
    small = [r.client_write_async(big(LARGE_COMMAND_BYTES // 2, 10 + i)) for i in range(50)]  # not counted in bytes
    sm.gate.set()
    for f in held + small:
        f.result(timeout=20)
    r.client_write(big(300_000, 3), timeout=20)  # the budget is free again


def test_one_write_larger_than_the_whole_budget_is_taken_alone(node):
    r, sm = node
    sm.gate.clear()
    alone = r.client_write_async(big(BUDGET + 100_000))
    with pytest.raises(Overloaded):
        r.client_write_async(big(LARGE_COMMAND_BYTES))
    sm.gate.set()
    alone.result(timeout=20)
    r.client_write(big(BUDGET + 100_000), timeout=20)


def test_bytes_are_released_before_the_callers_done_callbacks_run(node):
    r, sm = node
    again: list = []
    called = threading.Event()

    def write_again(_f):  # the budget fits one such write: this one finds the first released
        try:
            again.append(r.client_write_async(big(BUDGET - 1000, 2)))
        except Overloaded as e:
            again.append(e)
        called.set()

    sm.gate.clear()
    first = r.client_write_async(big(BUDGET - 1000, 1))
    first.add_done_callback(write_again)
    sm.gate.set()
    assert called.wait(20)
    assert len(again) == 1 and not isinstance(again[0], Exception), again
    again[0].result(timeout=20)


def test_a_write_that_fails_releases_its_bytes():
    """A leader cut off from its followers cannot commit; shut down, it fails the write, and its bytes go."""
    with MemCluster(3, dataclasses.replace(FAST, max_pending_write_bytes=BUDGET)) as c:
        lead = c.leader()
        c.net.isolate(lead.node_id)
        f = lead.client_write_async(big(BUDGET - 1000))
        assert lead._core.write_bytes > BUDGET - 1000  # its encoding: the value and the map around it
        lead.shutdown()
        with pytest.raises(ShutDown):
            f.result(timeout=20)
        assert lead._core.write_bytes == 0


def test_the_budget_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, "64M", None):
        with pytest.raises(ValueError, match="max_pending_write_bytes"):
            Config(max_pending_write_bytes=bad)


def test_a_large_write_cannot_be_cancelled_out_of_the_budget(node):
    r, sm = node
    sm.gate.clear()
    f = r.client_write_async(big(BUDGET - 1000))
    assert not f.cancel()  # it runs: its bytes stay counted
    with pytest.raises(Overloaded):
        r.client_write_async(big(LARGE_COMMAND_BYTES))
    sm.gate.set()
    f.result(timeout=20)
    assert r._core.write_bytes == 0
