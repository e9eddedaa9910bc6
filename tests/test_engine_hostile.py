"""The engine refuses messages no correct peer sends, before they change anything."""
from __future__ import annotations

import random

import pytest

from pyraft import Config, Node
from pyraft.engine.core import Engine
from pyraft.messages import AppendEntriesRequest
from pyraft.types import Entry, EntryKind, LogId

pytestmark = pytest.mark.timeout(30)


def _follower() -> Engine:
    e = Engine(2, Config(), random.Random(1), 0.0)
    e.initialize({1: Node("a"), 2: Node("b"), 3: Node("c")})
    e.take_output()
    return e


@pytest.mark.parametrize("msg", [
    # entry terms going backwards, from a "leader" of a higher term
    AppendEntriesRequest(5, 1, LogId(0, 1), (Entry(LogId(5, 2), EntryKind.BLANK),
                                              Entry(LogId(4, 3), EntryKind.NORMAL, "x")), 3),
    # an entry newer than the sender's term
    AppendEntriesRequest(5, 1, LogId(0, 1), (Entry(LogId(6, 2), EntryKind.NORMAL, "x"),), 2),
    # prev newer than the sender's term
    AppendEntriesRequest(5, 1, LogId(7, 1), (), 1),
    # claims to come from the receiver itself
    AppendEntriesRequest(5, 2, None, (), 0),
], ids=["terms-backwards", "entry-above-term", "prev-above-term", "forged-sender"])
def test_an_invalid_append_entries_is_refused_and_changes_nothing(msg):
    e = _follower()
    before = (e.vote, e.log.last, e.committed, e.leader_id, e.state)
    with pytest.raises(ValueError):
        e.step(1, msg, token="t")
    assert (e.vote, e.log.last, e.committed, e.leader_id, e.state) == before
    assert e.take_output() == []
