"""The engine refuses messages no correct peer sends, before they change anything (issue 15).

A refusal is a :class:`~pyraft.errors.RemoteProtocolError` (a ``ValueError``)
naming its reason; RaftCore counts it as ``refused_<reason>`` and goes on
serving.  Each case here once made a node Fatal, bricked a cluster or was
accepted.
"""
from __future__ import annotations

import random
import threading

import pytest

from pyraft import Config, Node, ServerState
from pyraft.engine.commands import SaveVote, SendVote
from pyraft.engine.core import Engine
from pyraft.engine.refusals import MAX_TERM, MAX_TERM_STEP
from pyraft.errors import RemoteProtocolError
from pyraft.messages import (AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
                             TimeoutNowRequest, VoteRequest)
from pyraft.types import Entry, EntryKind, LogId, SnapshotMeta, Vote

from memcluster import MemCluster
from test_raft_paper import cluster, engine

pytestmark = pytest.mark.timeout(30)


def _follower() -> Engine:
    e = Engine(2, Config(), random.Random(1), 0.0)
    e.initialize({1: Node("a"), 2: Node("b"), 3: Node("c")})
    e.take_output()
    return e


def _state(e: Engine) -> tuple:
    return (e.vote, e.log.last, e.committed, e.leader_id, e.state, getattr(e, "led_term", None))


def refused(e: Engine, from_id: int, msg, reason: str) -> None:
    before = _state(e)
    with pytest.raises(RemoteProtocolError) as exc:
        e.step(from_id, msg, token="t")
    assert exc.value.reason == reason, exc.value
    assert isinstance(exc.value, ValueError)
    assert _state(e) == before
    assert e.take_output() == []


@pytest.mark.parametrize("msg, reason", [
    # entry terms going backwards, from a "leader" of a higher term
    (AppendEntriesRequest(5, 1, LogId(0, 1), (Entry(LogId(5, 2), EntryKind.BLANK),
                                               Entry(LogId(4, 3), EntryKind.NORMAL, "x")), 3),
     "entries_out_of_order"),
    # indexes that do not follow prev
    (AppendEntriesRequest(5, 1, LogId(0, 1), (Entry(LogId(5, 3), EntryKind.NORMAL, "x"),), 2),
     "entries_out_of_order"),
    # an entry newer than the sender's term
    (AppendEntriesRequest(5, 1, LogId(0, 1), (Entry(LogId(6, 2), EntryKind.NORMAL, "x"),), 2), "term_from_future"),
    # prev newer than the sender's term
    (AppendEntriesRequest(5, 1, LogId(7, 1), (), 1), "term_from_future"),
    # claims to come from the receiver itself, or from another node than the sender
    (AppendEntriesRequest(5, 2, None, (), 0), "forged_sender"),
    (AppendEntriesRequest(5, 3, None, (), 0), "forged_sender"),
], ids=["terms-backwards", "index-gap", "entry-above-term", "prev-above-term", "claims-receiver", "claims-other"])
def test_an_invalid_append_entries_is_refused_and_changes_nothing(msg, reason):
    refused(_follower(), 1, msg, reason)


def test_a_second_leader_in_one_term_is_refused_and_the_leader_keeps_leading():
    """Election Safety: one leader per term.  A forged 19-byte AppendEntries at the leader's term
    raised AssertionError("two leaders") in the engine and made the leader Fatal."""
    sim = cluster(3)
    e1 = sim.engine(1)
    term = e1.current_term
    refused(e1, 2, AppendEntriesRequest(term, 2, None, (), 0), "two_leaders")
    refused(e1, 3, InstallSnapshotRequest(term, 3, SnapshotMeta(LogId(term, 1), None, "s"), 0, b"", True),
            "two_leaders")
    refused(e1, 2, TimeoutNowRequest(term, 2), "two_leaders")
    # A follower that knows the term's leader refuses another one too.
    refused(sim.engine(2), 3, AppendEntriesRequest(term, 3, None, (), 0), "two_leaders")
    # A leader that stepped down still knows it led the term.
    sim.isolate(1)
    sim.advance(0.6, only={1})
    assert e1.state is not ServerState.LEADER and e1.current_term == term
    refused(e1, 2, AppendEntriesRequest(term, 2, None, (), 0), "two_leaders")


@pytest.mark.parametrize("term, reason", [(2**63 - 1, "term_overflow"), (MAX_TERM, "term_jump"),
                                          (2**62, "term_jump")])
def test_a_term_the_node_could_not_increment_and_encode_is_refused(term, reason):
    """One forged VoteRequest per node with term 2**63-1 and ``transfer`` set passed the leader lease;
    every node stored that term and none could ever campaign again (the wire format cannot carry
    2**63), restarts included."""
    sim = cluster(3)
    for i in (1, 2, 3):
        refused(sim.engine(i), 9, VoteRequest(term, 9, LogId(term, 99), transfer=True), reason)
    # An honest jump of many terms (a node that was away while the others held elections) is fine.
    e = sim.engine(2)
    e.step(3, VoteRequest(e.current_term + MAX_TERM_STEP, 3, None, transfer=True), token="ok")
    assert e.current_term == 1 + MAX_TERM_STEP


def test_a_node_whose_stored_term_has_no_successor_does_not_campaign_and_says_why():
    """A cluster bricked before terms were bounded: the node keeps following (and serving what it
    applied) but never asks for votes in a term the wire format cannot carry."""
    e = engine(1, [1], vote=Vote(MAX_TERM, None))
    e.tick(10.0)
    out = e.take_output()
    assert not any(isinstance(c, (SendVote, SaveVote)) for c in out) and e.current_term == MAX_TERM
    assert e.last_campaign.refused and "no successor" in e.last_campaign.reason
    first = e.last_campaign
    e.tick(20.0)
    assert e.last_campaign is first   # recorded once, not at every timeout


def test_entries_that_contradict_committed_ones_are_refused():
    """An AppendEntries whose prev (or entries) sit at or below the commit point with other terms than
    the committed entries there: no correct leader sends it.  Appended, an entry of an older term than
    the log's last made LogIdList assert ("terms never decrease") and the node Fatal."""
    e = engine(2, [1, 1], vote=Vote(1, None))             # entries 2..3 of term 1
    e.step(1, AppendEntriesRequest(1, 1, LogId(1, 3), (), 3), token="hb")
    e.take_output()
    assert e.committed == LogId(1, 3)
    refused(e, 1, AppendEntriesRequest(2, 1, LogId(0, 3), (Entry(LogId(0, 4), EntryKind.NORMAL, "x"),), 3),
            "conflicts_with_committed")
    refused(e, 1, AppendEntriesRequest(2, 1, LogId(0, 1), (Entry(LogId(2, 2), EntryKind.NORMAL, "x"),), 3),
            "conflicts_with_committed")


def test_a_reply_that_acknowledges_entries_the_leader_never_had_is_refused():
    sim = cluster(3)
    e1 = sim.engine(1)
    last = e1.log.last
    refused(e1, 2, AppendEntriesResponse(e1.current_term, True, matched=LogId(last.term, last.index + 5)),
            "ack_beyond_log")
    refused(e1, 2, AppendEntriesResponse(e1.current_term, True, matched=LogId(last.term - 1, last.index)),
            "ack_beyond_log")
    assert e1.progress[2].matched == last


def test_requests_speaking_for_another_node_and_unknown_messages_are_refused():
    e = _follower()
    refused(e, 3, VoteRequest(2, 1, None), "forged_sender")
    refused(e, 3, VoteRequest(2, 3, LogId(3, 1)), "term_from_future")
    refused(e, 1, TimeoutNowRequest(2, 3), "forged_sender")
    refused(e, 1, "not a message", "unknown_message")


def test_raftcore_counts_and_logs_a_refusal_and_the_node_keeps_serving(caplog):
    """The runtime side: a refused message is counted in the metrics counters as refused_<reason>,
    logged at most once per interval per reason, and the node is not Fatal."""
    class Reply:
        def __init__(self):
            self.got = threading.Event()

        def reply(self, m):
            self.got.set()

    with MemCluster(3) as c:
        leader = c.leader()
        term = leader.metrics().current_term
        other = next(i for i in c.rafts if i != leader.node_id)
        for _ in range(3):
            leader._core.post(("rpc", other, AppendEntriesRequest(term, other, None, (), 0), Reply()))
        leader.client_write({"op": "put", "key": "k", "value": 1}, timeout=5)
        m = leader.metrics()
        assert m.state == ServerState.LEADER and m.current_term == term
        assert m.counters.get("refused_two_leaders") == 3
        lines = [r for r in caplog.records if "refused" in r.getMessage() and "two_leaders" in r.getMessage()]
        assert len(lines) == 1
