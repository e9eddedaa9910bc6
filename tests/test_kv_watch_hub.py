"""The watch hub against a real KV state machine, without a cluster.

Applying wakes the hub's thread only when a poll waits (a wake-up per applied
batch on every member costs a thread switch each); a poll that arrives just
after an apply still sees that apply's events, and a waiting poll is answered
as soon as its events are applied.
"""
from __future__ import annotations

import queue
import time

import pytest

from pyraft.kv import KVStateMachine
from pyraft.kv.encoding import range_bounds
from pyraft.kv.watch import WatchHub, WatchPoll
from pyraft.types import Entry, EntryKind, LogId

from memcluster import wait_until

pytestmark = pytest.mark.timeout(60)


class _Reply:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def reply(self, resp) -> None:
        self.q.put(resp)


def _put(index: int, key: str, value: bytes) -> Entry:
    return Entry(LogId(1, index), EntryKind.NORMAL, {"op": "put", "key": key, "value": value})


def _poll(revision, sub: int = 0, wait: float = 30.0) -> tuple[WatchPoll, _Reply]:
    start, stop = range_bounds("w/", None, True)
    r = _Reply()
    return WatchPoll(start, stop, revision, sub, 100, time.monotonic() + wait, r), r


@pytest.fixture
def hub(tmp_path):
    sm = KVStateMachine(str(tmp_path / "kv"))
    h = WatchHub(sm, 1)
    yield sm, h
    h.stop()
    sm.close()


def test_an_apply_with_no_poll_waiting_does_not_wake_the_hub(hub):
    sm, h = hub
    assert h.waiting == 0
    h._wake.clear()
    sm.apply([_put(1, "w/a", b"1")])
    assert not h._wake.is_set()


def test_a_poll_submitted_after_an_unwatched_apply_gets_its_event_at_once(hub):
    sm, h = hub
    sm.apply([_put(1, "w/a", b"1")])  # no poll waits: the hub is not woken
    p, r = _poll(1)
    t0 = time.monotonic()
    h.submit(p)
    resp = r.q.get(timeout=20)
    assert resp.ok and [e[0] for e in resp.body["events"]] == [1]
    assert time.monotonic() - t0 < 15  # answered at once, not at the end of its 30 s wait


def test_a_waiting_poll_is_answered_when_its_event_is_applied(hub):
    sm, h = hub
    sm.apply([_put(1, "x/other", b"1")])
    p, r = _poll(2)
    h.submit(p)
    wait_until(lambda: h.waiting == 1, 20, "the hub to hold the poll")
    assert r.q.empty()
    t0 = time.monotonic()
    sm.apply([_put(2, "w/b", b"2")])
    resp = r.q.get(timeout=20)
    assert resp.ok and [e[0] for e in resp.body["events"]] == [2]
    assert time.monotonic() - t0 < 15
