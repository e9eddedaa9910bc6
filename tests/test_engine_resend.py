"""A lost AppendEntries is re-sent within a few heartbeat intervals, not after ``rpc_timeout``.

A leader pipelines AppendEntries to a follower in REPLICATE state.  When one
is lost, two things can reveal it:

* a later pipelined append arrives first: the follower rejects it (its prev
  is past the gap) and the leader goes back to PROBE from the matched index;
* nothing follows (the lost message was the last, or the rejection was lost
  too): the leader's next heartbeat to a target whose oldest unacknowledged
  append is older than a heartbeat interval carries, as its prev, the last
  entry of the newest such append.  A follower that lacks it rejects the
  heartbeat, and the leader re-sends from the matched index at once.

``rpc_timeout`` stays the last resort (a target that answers nothing).  The
tests set it to 10 s, so any recovery they see comes from the heartbeat.
"""
from __future__ import annotations

import pytest

from pyraft.config import Config
from pyraft.engine.commands import Replicate
from pyraft.engine.progress import ProgressState
from pyraft.messages import AppendEntriesRequest, AppendEntriesResponse, TimeoutNowRequest, VoteResponse
from pyraft.types import ServerState, Vote

from test_raft_paper import cluster, engine, propose, settle

HB = 0.05
RPC_TIMEOUT = 10.0


def cfg(**kw) -> Config:
    return Config(heartbeat_interval=HB, election_timeout=(0.15, 0.3), rpc_timeout=RPC_TIMEOUT, **kw)


def drop_once(pred):
    """A ``Sim.on_send`` filter that drops the first message matching ``pred(src, dst, msg)``."""
    dropped = []

    def f(src, dst, msg):
        if not dropped and pred(src, dst, msg):
            dropped.append(msg)
            return False
        return True
    f.dropped = dropped
    return f


def append_to(target):
    return lambda s, d, m: (s, d) == (1, target) and isinstance(m, AppendEntriesRequest) and m.entries


def caught_up(sim, target: int) -> bool:
    last = sim.engine(1).log.last
    return sim.engine(target).log.last == last and sim.engine(1).replication()[target] == last


def time_to_catch_up(sim, target: int, limit: float = 2.0) -> float:
    """Simulated seconds until ``target`` holds (and the leader knows it holds) the leader's whole log."""
    t0 = sim.t
    while not caught_up(sim, target):
        if sim.t - t0 > limit:
            return float("inf")
        sim.advance(0.01)
    return sim.t - t0


# --------------------------------------------------------------------------- whole cluster (manual mode)


@pytest.mark.parametrize("max_inflight", [16, 1])
def test_a_lost_last_append_is_resent_within_a_few_heartbeats(max_inflight):
    """The only AppendEntries carrying an entry to node 3 is lost and nothing follows it: the follower
    never sees a gap and acknowledges every heartbeat.  It catches up within a few heartbeat intervals."""
    sim = cluster(3, config=cfg(max_inflight=max_inflight))
    drop = drop_once(append_to(3))
    sim.on_send = drop
    lid, = propose(sim, 1, "a")
    sim.stabilize()
    assert drop.dropped and drop.dropped[0].entries[-1].log_id == lid
    assert sim.engine(3).log.last != lid and sim.engine(2).log.last == lid
    p = sim.engine(1).progress[3]
    assert p.state is ProgressState.REPLICATE and p.inflight
    dt = time_to_catch_up(sim, 3)
    assert dt <= 3 * HB, f"node 3 caught up only after {dt:.2f}s"
    assert sim.engine(3).committed == lid


def test_a_lost_append_whose_gap_rejection_is_lost_too_is_resent_within_a_few_heartbeats():
    """Two pipelined appends; the first is lost, and so is the follower's rejection of the second (its
    prev is past the gap).  Nothing else tells the leader: its heartbeat must."""
    sim = cluster(3, config=cfg())
    drop_app = drop_once(append_to(3))
    drop_rej = drop_once(lambda s, d, m: (s, d) == (3, 1) and isinstance(m, AppendEntriesResponse)
                         and not m.success)
    sim.on_send = lambda s, d, m: drop_app(s, d, m) and drop_rej(s, d, m)
    propose(sim, 1, "a")
    sim.stabilize()
    propose(sim, 1, "b")
    sim.stabilize()
    assert drop_app.dropped and drop_rej.dropped
    assert len(sim.engine(1).progress[3].inflight) == 2
    dt = time_to_catch_up(sim, 3)
    assert dt <= 3 * HB, f"node 3 caught up only after {dt:.2f}s"


def test_a_gap_rejection_makes_the_leader_resend_from_the_matched_index_at_once():
    """The first of two pipelined appends is lost; the follower rejects the second (a gap) and the
    leader re-sends from the follower's matched index in the same round trip, without waiting for
    a heartbeat."""
    sim = cluster(3, config=cfg())
    drop = drop_once(append_to(3))
    sim.on_send = drop
    propose(sim, 1, "a")
    sim.stabilize()
    lid, = propose(sim, 1, "b")
    sim.stabilize()                               # no time passes: no heartbeat, no tick
    assert drop.dropped
    assert caught_up(sim, 3) and sim.engine(3).log.last == lid


def test_leader_transfer_to_a_follower_whose_last_append_was_lost_completes_in_time():
    """Thesis §3.10: the transfer gives the target an election timeout to catch up.  A lost append to it
    must not make the transfer time out: it is re-sent long before ``rpc_timeout``."""
    sim = cluster(3, config=cfg())
    drop = drop_once(append_to(3))
    sim.on_send = drop
    propose(sim, 1, "a")
    sim.stabilize()
    assert drop.dropped
    term = sim.engine(1).current_term
    timeouts = []
    sim.on_send = lambda s, d, m: (timeouts.append(d) if isinstance(m, TimeoutNowRequest) else None) or True
    sim.call(1, lambda e: e.transfer_leader(3))
    sim.stabilize()
    assert timeouts == []                         # node 3 lacks the last entry
    sim.advance(cfg().election_timeout[0])        # well within the transfer deadline (election_timeout max)
    assert timeouts == [3]
    assert sim.engine(3).state is ServerState.LEADER and sim.engine(3).current_term == term + 1


def test_a_slow_follower_gets_no_duplicate_entries():
    """A follower that received an append but is slow to flush it (so to acknowledge it) answers the
    leader's check with a success once the entries are on disk: the leader sends nothing again."""
    sim = cluster(3, config=cfg())
    to3 = []
    sim.on_send = lambda s, d, m: (to3.append(m) if (s, d) == (1, 3) and isinstance(m, AppendEntriesRequest)
                                   else None) or True
    sim.hold_flush.add(3)
    lid, = propose(sim, 1, "a")
    sim.stabilize()
    sim.advance(4 * HB)
    assert sim.engine(1).progress[3].inflight          # still not acknowledged
    assert any(m.prev_log_id == lid and not m.entries for m in to3)   # the leader did ask
    sim.hold_flush.discard(3)
    sim.flush(3)
    settle(sim)
    assert caught_up(sim, 3)
    assert [m.entries[-1].log_id for m in to3 if m.entries] == [lid]  # sent once


# --------------------------------------------------------------------------- one engine, by hand


def leader() -> tuple:
    """Engine 1 leading a 3-node cluster, node 2 in REPLICATE state and acknowledged up to the last entry."""
    e = engine(1, [1, 1], vote=Vote(1, None), config=cfg())
    e.trigger_elect()
    e.take_output()
    e.step(2, VoteResponse(2, True))
    e.on_log_flushed(e.log.last)
    e.take_output()
    e.step(2, AppendEntriesResponse(2, True, matched=e.log.last))
    e.take_output()
    assert e.state is ServerState.LEADER and e.progress[2].state is ProgressState.REPLICATE
    return e


def replicates(out, target=2) -> list[Replicate]:
    return [c for c in out if isinstance(c, Replicate) and c.target == target]


def test_heartbeat_checks_only_an_append_unacknowledged_for_more_than_a_heartbeat_interval():
    e = leader()
    matched = e.progress[2].matched
    e.tick(0.0)                                   # the first heartbeat round; the next is due at HB
    e.take_output()
    lid, = e.propose(["a"])
    sent, = replicates(e.take_output())
    assert (sent.prev_log_id, sent.end) == (matched, lid.index + 1)
    # a heartbeat while the append is young: prev is the matched entry, as usual
    e.tick(HB)
    hb, = replicates(e.take_output())
    assert (hb.prev_log_id, hb.end) == (matched, matched.index + 1)
    # a heartbeat once it has been out for more than a heartbeat interval: prev is its last entry
    e.tick(2 * HB + 0.001)
    hb, = replicates(e.take_output())
    assert (hb.prev_log_id, hb.end) == (lid, lid.index + 1)
    assert hb.leader_commit <= lid.index


def test_a_rejected_check_resends_from_the_matched_index_and_a_successful_one_clears_the_pipeline():
    e = leader()
    matched = e.progress[2].matched
    e.tick(0.0)
    e.take_output()
    lid, = e.propose(["a"])
    e.take_output()
    e.tick(HB)
    e.take_output()
    e.tick(2 * HB + 0.001)
    hb, = replicates(e.take_output())
    assert hb.prev_log_id == lid
    # the follower lacks it: it rejects, and the leader re-sends the entries after the matched one
    e.step(2, AppendEntriesResponse(2, False, rejected=lid.index, hint_index=matched.index,
                                    hint_term=matched.term))
    resend, = replicates(e.take_output())
    assert (resend.prev_log_id, resend.end) == (matched, lid.index + 1)
    # the follower has it (an acknowledgement of the check): matched moves, nothing is re-sent
    e.step(2, AppendEntriesResponse(2, True, matched=lid))
    assert replicates(e.take_output()) == []
    p = e.progress[2]
    assert p.matched == lid and not p.inflight and p.state is ProgressState.REPLICATE
