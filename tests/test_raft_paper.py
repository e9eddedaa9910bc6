"""Scenario tests named after the rules of the Raft paper (etcd's raft_paper_test.go style).

Each test states the rule it checks, in the paper's words where possible
("In Search of an Understandable Consensus Algorithm", Ongaro & Ousterhout,
and the Raft thesis for PreVote, CheckQuorum, leadership transfer and
ReadIndex).  Two ways of driving the engine:

* one engine alone, fed messages by hand, its commands inspected in order;
* a small cluster in the simulation harness's manual mode (``sim.cluster.Sim``
  with ``manual=True``): zero delays, a FIFO network with filters, instant
  disks unless held, time that moves only when the test says so.  The
  harness checks every Figure 3 invariant after every event here too.
"""
from __future__ import annotations

import pytest

from pyraft.config import Config
from pyraft.engine.commands import AppendToLog, InstallSnapshot, Respond, SaveVote, SendVote, TruncateLog
from pyraft.engine.core import Engine, RestoredState
from pyraft.errors import ChangeMembershipError, ForwardToLeader
from pyraft.messages import (AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, TimeoutNowRequest,
                             VoteRequest, VoteResponse)
from pyraft.types import Entry, EntryKind, LogId, Membership, ServerState, SnapshotMeta, StoredMembership, Vote

from sim.cluster import Sim, addr

CFG = Config(heartbeat_interval=0.05, election_timeout=(0.15, 0.3), rpc_timeout=0.5)
LEADER, FOLLOWER, CANDIDATE, LEARNER = (ServerState.LEADER, ServerState.FOLLOWER, ServerState.CANDIDATE,
                                        ServerState.LEARNER)


class FixedRng:
    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def membership(ids=(1, 2, 3)) -> Membership:
    return Membership.of({i: addr(i) for i in ids})


def log_of(terms: list[int], ids=(1, 2, 3)) -> list[Entry]:
    """The initial membership entry at index 1, then one entry per term in ``terms``."""
    out = [Entry(LogId(0, 1), EntryKind.MEMBERSHIP, membership(ids))]
    for i, t in enumerate(terms, start=2):
        out.append(Entry(LogId(t, i), EntryKind.NORMAL, (t, i)))
    return out


def engine(node_id: int = 1, terms: list[int] = (), vote: Vote | None = None, ids=(1, 2, 3),
           config: Config = CFG) -> Engine:
    """One engine restored with a log of ``terms`` (after the membership entry)."""
    entries = log_of(list(terms), ids)
    by_index = {e.index: e.term for e in entries}
    m = entries[0]
    rs = RestoredState(vote=vote or Vote(max([0, *terms]), None), last_log_id=entries[-1].log_id,
                       memberships=[StoredMembership(m.log_id, m.payload)], term_at=by_index.get)
    e = Engine(node_id, config, FixedRng(), 0.0, rs)
    e.take_output()
    return e


def cluster(voters: int = 3, learners: int = 0, leader: int | None = 1, config: Config = CFG) -> Sim:
    """A manual-mode cluster of ``voters`` (ids 1..voters) and ``learners`` more, with ``leader`` elected."""
    sim = Sim(0, voters=voters, spares=learners, config=config, manual=True)
    if leader is not None:
        elect(sim, leader)
        for i in range(voters + 1, voters + learners + 1):
            r = sim.call(leader, lambda e: e.add_learner(i, addr(i)))
            assert isinstance(r, LogId), r
            settle(sim)
    return sim


def elect(sim: Sim, node_id: int) -> None:
    sim.stabilize()  # pending flushes: no campaign before the configuration is on disk
    sim.skip(1.0)    # let every leader lease expire
    sim.call(node_id, lambda e: e.trigger_elect())
    sim.stabilize()
    assert sim.engine(node_id).state is LEADER
    settle(sim)


def settle(sim: Sim) -> None:
    """Deliver everything, then one heartbeat round so followers learn the commit point."""
    sim.stabilize()
    for n in sim.leaders():
        sim.call(n.id, lambda e: e.trigger_heartbeat())
    sim.stabilize()


def propose(sim: Sim, node_id: int, *payloads) -> list[LogId]:
    r = sim.call(node_id, lambda e: e.propose(list(payloads)))
    assert isinstance(r, list), r
    return r


def positions(out: list, pred) -> list[int]:
    return [i for i, c in enumerate(out) if pred(c)]


# --------------------------------------------------------------------------- 5.2 leader election


def test_candidate_increments_term_votes_for_itself_and_saves_the_vote_before_requesting_votes():
    """§5.2: "To begin an election, a follower increments its current term ... votes for itself and
    issues RequestVote RPCs" — and the vote is on disk before any request leaves."""
    e = engine(1, [1, 1], vote=Vote(1, None))
    e.trigger_elect()
    out = e.take_output()
    save = positions(out, lambda c: c == SaveVote(Vote(2, 1)))
    send = positions(out, lambda c: isinstance(c, SendVote))
    assert save and send and save[0] < send[0]
    assert out[send[0]].request == VoteRequest(2, 1, LogId(1, 3))
    assert e.state is CANDIDATE and e.current_term == 2


def test_vote_is_persisted_before_it_is_granted():
    """Figure 2 ("Persistent state on all servers ... updated on stable storage before responding to
    RPCs"): SaveVote precedes the Respond that grants the vote."""
    e = engine(1, [1, 1])
    e.step(2, VoteRequest(2, 2, LogId(1, 3)), token="tok")
    out = e.take_output()
    save = positions(out, lambda c: c == SaveVote(Vote(2, 2)))
    grant = positions(out, lambda c: isinstance(c, Respond) and c.message == VoteResponse(2, True))
    assert save and grant and save[0] < grant[0]


def test_voter_grants_at_most_one_vote_per_term():
    """§5.2: "Each server will vote for at most one candidate in a given term, on a first-come-first-served basis." """
    e = engine(1, [1])
    e.step(2, VoteRequest(2, 2, LogId(1, 2)), token="a")
    e.step(3, VoteRequest(2, 3, LogId(1, 2)), token="b")
    e.step(2, VoteRequest(2, 2, LogId(1, 2)), token="c")  # a retry from the same candidate
    replies = {c.token: c.message.granted for c in e.take_output() if isinstance(c, Respond)}
    assert replies == {"a": True, "b": False, "c": True}
    assert e.vote == Vote(2, 2)


@pytest.mark.parametrize("candidate_last, granted", [
    (LogId(2, 3), False),   # same last term, shorter log
    (LogId(1, 9), False),   # longer log, older last term
    (LogId(2, 4), True),    # identical
    (LogId(2, 5), True),    # same term, longer
    (LogId(3, 2), True),    # newer last term, shorter
    (None, False),          # empty log
])
def test_election_restriction_votes_only_for_logs_at_least_as_up_to_date(candidate_last, granted):
    """§5.4.1: "the voter denies its vote if its own log is more up-to-date than that of the candidate" —
    later last term wins; with equal last terms the longer log wins."""
    e = engine(1, [1, 1, 2])  # last log id (2, 4)
    e.step(2, VoteRequest(5, 2, candidate_last), token="t")
    (reply,) = [c.message for c in e.take_output() if isinstance(c, Respond)]
    assert reply.granted is granted
    assert e.vote == (Vote(5, 2) if granted else Vote(5, None))


def test_at_most_one_leader_per_term_when_candidates_split_the_vote():
    """§5.2 Election Safety: "at most one leader can be elected in a given term" — two candidates of the
    same term in a five-node cluster; the harness checks Election Safety after every event."""
    sim = cluster(5, leader=None)
    sim.stabilize()
    sim.skip(1.0)
    for i in (1, 2):
        sim.call(i, lambda e: e.trigger_elect())
    sim.stabilize()
    terms = {sim.engine(i).current_term for i in (1, 2)}
    assert terms == {1}
    leaders = [n.id for n in sim.leaders()]
    assert len(leaders) <= 1
    sim.advance(2.0)
    assert len(sim.leaders()) == 1


def test_candidate_becomes_follower_on_append_entries_from_leader_of_its_term():
    """§5.2: "If the AppendEntries RPC is from another server claiming to be leader of the same term,
    the candidate recognizes the leader as legitimate and returns to follower state." """
    e = engine(1, [1])
    e.trigger_elect()
    e.take_output()
    assert e.state is CANDIDATE and e.current_term == 2
    e.step(2, AppendEntriesRequest(2, 2, LogId(1, 2), (), 0), token="t")
    assert e.state is FOLLOWER and e.leader_id == 2


def test_stale_term_requests_are_rejected_with_the_current_term():
    """Figure 2: "Reply false if term < currentTerm" (AppendEntries and RequestVote)."""
    e = engine(1, [1, 3], vote=Vote(3, None))
    e.step(2, AppendEntriesRequest(2, 2, LogId(1, 2), (Entry(LogId(2, 3)),), 0), token="ae")
    e.step(2, VoteRequest(2, 2, LogId(2, 9)), token="v")
    out = e.take_output()
    replies = {c.token: c.message for c in out if isinstance(c, Respond)}
    assert replies["ae"].success is False and replies["ae"].term == 3
    assert replies["v"].granted is False and replies["v"].term == 3
    assert not any(isinstance(c, (AppendToLog, TruncateLog)) for c in out)
    assert e.log.last == LogId(3, 3)


def test_a_follower_of_a_live_leader_does_not_give_its_unused_vote_in_that_term():
    """§5.2 allows one vote per term, first come first served; etcd-raft's rule goes further: a node
    that follows a leader of the term gives no vote of that term (``canVote``).  That leader holds a
    majority already; a candidate of its term (late, or back from a partition) can only disturb it."""
    e = engine(1, [1], vote=Vote(1, None))
    e.step(2, AppendEntriesRequest(2, 2, LogId(1, 2), (), 0), token="ae")    # leader 2 of term 2
    assert e.leader_id == 2 and e.vote == Vote(2, None)
    e.step(3, VoteRequest(2, 3, LogId(1, 2)), token="v")
    replies = [c.message for c in e.take_output() if isinstance(c, Respond) and c.token == "v"]
    assert replies == [VoteResponse(2, False, last_log_id=LogId(1, 2))]
    assert e.vote == Vote(2, None)


# --------------------------------------------------------------------------- 5.3 log replication


def test_follower_truncates_only_on_a_real_conflict():
    """§5.3 / Figure 2: "If an existing entry conflicts with a new one (same index but different terms),
    delete the existing entry and all that follow it" — and only then: a late, shorter AppendEntries
    whose entries all match must not cut the log."""
    e = engine(1, [1, 1, 1, 1], vote=Vote(1, None))  # entries 2..5, term 1
    e.step(2, AppendEntriesRequest(1, 2, LogId(1, 2), (Entry(LogId(1, 3), payload=(1, 3)),), 0), token="a")
    out = e.take_output()
    assert not any(isinstance(c, (TruncateLog, AppendToLog)) for c in out)
    assert e.log.last == LogId(1, 5)
    e.step(2, AppendEntriesRequest(1, 2, LogId(1, 5), (), 0), token="hb")  # a heartbeat
    assert not any(isinstance(c, TruncateLog) for c in e.take_output())
    # A new leader of term 2 with a different entry at index 4:
    e.step(3, AppendEntriesRequest(2, 3, LogId(1, 3), (Entry(LogId(2, 4), payload=(2, 4)),), 0), token="b")
    out = e.take_output()
    trunc = positions(out, lambda c: isinstance(c, TruncateLog))
    app = positions(out, lambda c: isinstance(c, AppendToLog))
    assert [out[i] for i in trunc] == [TruncateLog(4)] and trunc[0] < app[0]
    assert e.log.last == LogId(2, 4)


def test_follower_commit_index_never_passes_the_last_entry_the_message_matched():
    """Figure 2, AppendEntries: "If leaderCommit > commitIndex, set commitIndex = min(leaderCommit, index
    of last new entry)" -- not our last index: entries after the message's may be a stale suffix that
    the leader has not overwritten yet.  (None of the 500 default seeds reaches this: a leader's probes find
    the first conflicting index, so a stale suffix rarely outlives the message that matches up to it.)"""
    e = engine(2, [1, 1, 1, 1], vote=Vote(1, None))         # entries 2..5 of term 1; 4 and 5 are stale
    e.step(1, AppendEntriesRequest(2, 1, LogId(1, 2), (Entry(LogId(1, 3), payload=(1, 3)),), 5), token="ae")
    e.take_output()
    assert e.log.last == LogId(1, 5) and e.committed == LogId(1, 3)


def test_follower_acknowledges_entries_only_after_they_are_on_disk():
    """Figure 2 (persistent state is "updated on stable storage before responding to RPCs"): the
    AppendEntries success for new entries waits for on_log_flushed."""
    sim = cluster(3)
    acks = []
    sim.on_send = lambda s, d, m: (acks.append(m.matched) if s == 2 and isinstance(m, AppendEntriesResponse)
                                   and m.success else None) or True
    sim.hold_flush = {2}
    (lid,) = propose(sim, 1, "x")
    sim.stabilize()
    assert all(a is None or a.index < lid.index for a in acks)
    sim.flush(2)
    sim.stabilize()
    assert any(a is not None and a.index >= lid.index for a in acks)


def test_leader_counts_itself_only_for_entries_on_its_own_disk():
    """The leader is one of the majority only for entries it has flushed (the thesis §10.2.1 allows
    writing in parallel, but never counting an unwritten entry)."""
    sim = cluster(3)
    sim.isolate(3)
    sim.hold_flush = {1}
    (lid,) = propose(sim, 1, "x")
    sim.stabilize()
    assert sim.engine(2).log.last == lid          # node 2 has it (and acknowledged it)
    assert sim.engine(1).committed.index < lid.index
    sim.flush(1)
    sim.stabilize()
    assert sim.engine(1).committed == lid


def test_fast_backtracking_skips_a_whole_term_per_round_trip():
    """§5.3 optimization: "the follower can include the term of the conflicting entry and the first index
    it stores for that term ... one AppendEntries RPC will be required for each term with conflicting
    entries, rather than one RPC per entry." """
    sim = cluster(3, leader=None)
    leader_log = log_of([1, 1, 1] + [3] * 9)            # 2..4 term 1, 5..13 term 3
    stale_log = log_of([1, 1, 1] + [2] * 7)             # 2..4 term 1, 5..11 term 2
    sim.load_disk(1, leader_log, Vote(3, 1))
    sim.load_disk(3, leader_log, Vote(3, 1))
    sim.load_disk(2, stale_log, Vote(3, 1))
    to2 = []
    sim.on_send = lambda s, d, m: (to2.append(m) if (s, d) == (1, 2) and isinstance(m, AppendEntriesRequest)
                                   else None) or True
    elect(sim, 1)
    # the first probe (prev 3-13) is rejected; the hint (2-11) makes the leader retry right after 1-4
    assert to2[0].prev_log_id == LogId(3, 13)
    assert to2[1].prev_log_id == LogId(1, 4)
    assert sim.engine(2).log.last == sim.engine(1).log.last
    assert sim.engine(2).log.term_at(5) == 3


def test_leader_commits_only_entries_of_its_current_term_by_counting_replicas_figure_8():
    """§5.4.2, Figure 8: "Raft never commits log entries from previous terms by counting replicas.
    Only log entries from the leader's current term are committed by counting replicas."

    (a) S1 leads, its entry X at index i reaches S2 only.  (b) S1 crashes; S5 is elected with
    S3, S4 and writes Y at index i, alone.  (c) S5 crashes; S1 comes back, is elected, and
    replicates X to S3 (and S4): X is on a majority, but it is of an old term, so S1 must not
    commit it.  (d) S1 crashes; S5 can still be elected (its last term is newer) and overwrites
    X everywhere — committing X in (c) would have lost a committed entry.
    """
    cfg = Config(heartbeat_interval=0.05, election_timeout=(0.15, 0.3), rpc_timeout=0.5, max_payload_entries=1)
    sim = cluster(5, config=cfg)
    # (a)
    for i in (3, 4, 5):
        sim.blocked |= {(1, i), (i, 1)}
    (x,) = propose(sim, 1, "X")
    sim.stabilize()
    assert sim.engine(2).log.last == x
    # (b)
    sim.crash(1)
    sim.heal()
    sim.on_send = lambda s, d, m: not (s == 5 and isinstance(m, AppendEntriesRequest))
    elect(sim, 5)
    (y,) = propose(sim, 5, "Y")
    assert y.index == x.index + 1 and sim.engine(5).log.term_at(x.index) > x.term
    sim.crash(5)
    # (c): the new leader's own (blank) entry never gets out; the probes that the followers
    # without X reject (and so the backtracking that brings them X) do

    def keep(s, d, m):
        if isinstance(m, AppendEntriesRequest) and any(e.term > y.term for e in m.entries):
            prev = m.prev_log_id
            e = sim.engine(d)
            return e is not None and e.log.term_at(prev.index) != prev.term
        return True
    sim.on_send = keep
    sim.restart(1)
    sim.skip(1.0)
    for _ in range(3):   # S2 and S1 have X; one of S3/S4 may have voted for S5 in this term already
        sim.call(1, lambda e: e.trigger_elect())
        sim.stabilize()
        if sim.engine(1).state is LEADER:
            break
    s1 = sim.engine(1)
    assert s1.state is LEADER and s1.current_term > y.term
    for _ in range(3):
        sim.call(1, lambda e: e.trigger_heartbeat())
        sim.stabilize()
    holders = [i for i in (1, 2, 3, 4) if sim.engine(i).log.term_at(x.index) == x.term]
    assert len(holders) >= 3                       # X is on a majority of the five ...
    assert s1.committed.index < x.index            # ... and still not committed
    # (d)
    sim.crash(1)
    sim.on_send = None
    sim.restart(5)
    sim.skip(1.0)
    for _ in range(3):
        sim.call(5, lambda e: e.trigger_elect())
        sim.stabilize()
        if sim.engine(5).state is LEADER:
            break
    assert sim.engine(5).state is LEADER
    settle(sim)
    for i in (2, 3, 4, 5):
        assert sim.engine(i).log.term_at(x.index) == sim.engine(5).log.term_at(x.index) != x.term
        assert sim.engine(i).committed.index >= y.index


def test_committed_entries_survive_a_crash_of_every_node():
    """§5.4 Leader Completeness plus durability: what was committed is on the disks of a majority and is
    applied again, in the same order, after every node crashed and restarted."""
    sim = cluster(3)
    ids = propose(sim, 1, "a", "b", "c")
    settle(sim)
    for i in (1, 2, 3):
        sim.crash(i)
    for i in (1, 2, 3):
        sim.restart(i)
    sim.stabilize()
    elect(sim, 2)
    settle(sim)
    for i in (1, 2, 3):
        e = sim.engine(i)
        assert e.committed.index > ids[-1].index and e.applied == e.committed
        assert [e.log.term_at(l.index) for l in ids] == [l.term for l in ids]
    assert len({sim.nodes[i].sm_h for i in (1, 2, 3)}) == 1


@pytest.mark.parametrize("stale", [1, 3])
def test_restart_trusts_a_saved_commit_point_only_where_the_durable_log_holds_it(stale):
    """Figure 2's commitIndex is volatile; pyraft saves it as a hint.  A follower that truncated stale
    entries, appended the leader's and saved the new commit point, then lost power before the log
    writes reached the disk, restarts with stale entries under a saved commit point: it must not apply
    them (regression: the engine applied the stale entry at the commit index, or its last entry)."""
    sim = cluster(3)
    sim.isolate(1)
    propose(sim, 1, *[f"stale{k}" for k in range(stale)])   # only node 1 (deposed) has these
    sim.stabilize()
    sim.heal()
    sim.blocked |= {(1, 2), (2, 1), (1, 3), (3, 1)}
    elect(sim, 2)
    propose(sim, 2, "a", "b")
    settle(sim)
    sim.heal()
    sim.hold_flush = {1}
    settle(sim)
    settle(sim)
    n1 = sim.nodes[1]
    assert n1.d_committed == sim.engine(2).committed     # the commit point is on disk ...
    assert n1.d_log.last.term == 1                       # ... the truncation and new entries are not
    sim.crash(1)
    sim.hold_flush = set()
    sim.restart(1)                                       # the harness checks the restored commit point
    c = sim.engine(1).committed
    assert c is None or sim.engine(1).log.term_at(c.index) == c.term
    settle(sim)
    assert sim.nodes[1].sm_h == sim.nodes[2].sm_h


def test_leader_sends_a_snapshot_to_a_new_learner_when_its_log_is_purged():
    """§7: "the leader must occasionally send snapshots to followers that lag behind" — including a
    pristine learner whose next index is 1 when entry 1 is purged (regression: sim seed 30)."""
    sim = Sim(0, voters=3, spares=1, config=CFG, manual=True)
    elect(sim, 1)
    for k in range(10):
        propose(sim, 1, k)
    settle(sim)
    sim.call(1, lambda e: e.trigger_snapshot())
    sim.stabilize()
    sim.call(1, lambda e: e.trigger_purge(e.applied.index))
    sim.stabilize()
    assert sim.engine(1).log.purged_index > 1
    sim.call(1, lambda e: e.add_learner(4, addr(4)))
    sim.advance(0.3)
    assert sim.stats["snap_installs"] >= 1
    assert sim.engine(4).applied == sim.engine(1).applied


def test_a_late_older_snapshot_never_follows_a_newer_one_into_the_state_machine():
    """§7 InstallSnapshot: "If existing log entry has same index and term as snapshot's last included
    entry, retain log entries following it" — and never go back: a delayed or duplicated final chunk
    of an older snapshot, arriving while a newer one is being installed, is not installed after it
    (regression: the state machine went back while the engine believed it applied the newer one)."""
    e = engine(1, [1], vote=Vote(2, None))
    sm = StoredMembership(LogId(0, 1), membership())
    new, old = SnapshotMeta(LogId(2, 100), sm, "new"), SnapshotMeta(LogId(2, 80), sm, "old")
    e.step(2, InstallSnapshotRequest(2, 2, new, 0, b"n", True), token="new")
    e.step(2, InstallSnapshotRequest(2, 2, old, 0, b"o", True), token="old")
    installs = [c.meta for c in e.take_output() if isinstance(c, InstallSnapshot)]
    assert installs == [new]
    e.on_snapshot_installed(new, "new")
    assert e.applied == LogId(2, 100) and e.committed == LogId(2, 100)
    e.step(2, InstallSnapshotRequest(2, 2, old, 0, b"o", True), token="old2")
    out = e.take_output()
    assert not any(isinstance(c, InstallSnapshot) for c in out)
    assert [c.message.done for c in out if isinstance(c, Respond) and c.token == "old2"] == [True]


# --------------------------------------------------------------------------- thesis: PreVote, CheckQuorum


def test_prevote_a_partitioned_node_does_not_raise_its_term_or_disrupt_the_leader():
    """Thesis §9.6: "a candidate would first ask other servers whether its log was up-to-date enough to
    get their vote ... [only then] increment its term" — an isolated node keeps its term, and on
    rejoining does not depose the leader."""
    sim = cluster(3)
    term = sim.engine(1).current_term
    sim.isolate(3)
    sim.advance(1.5)
    assert sim.engine(3).current_term == term
    assert sim.engine(1).state is LEADER
    sim.heal()
    sim.advance(1.0)
    assert sim.engine(1).state is LEADER and sim.engine(1).current_term == term


def test_prevote_request_changes_neither_term_nor_vote():
    e = engine(1, [1])
    e.step(2, VoteRequest(7, 2, LogId(1, 2), pre_vote=True), token="t")
    out = e.take_output()
    assert not any(isinstance(c, SaveVote) for c in out)
    (reply,) = [c.message for c in out if isinstance(c, Respond)]
    assert reply == VoteResponse(7, True, pre_vote=True)
    assert e.vote == Vote(1, None)


def test_check_quorum_a_leader_that_hears_from_no_quorum_steps_down():
    """Thesis §6.2: "a leader steps down if an election timeout elapses without a successful round of
    heartbeats to a majority of its cluster." """
    sim = cluster(3)
    sim.isolate(1)
    sim.advance(0.2)
    assert sim.engine(1).state is LEADER
    sim.advance(0.4)
    assert sim.engine(1).state is not LEADER
    assert sim.leader() in (2, 3)


def test_check_quorum_a_follower_with_a_live_leader_ignores_vote_requests():
    """Thesis §4.2.3: "if a server receives a RequestVote request within the minimum election timeout of
    hearing from a current leader, it does not update its term or grant its vote." """
    sim = cluster(3)
    term = sim.engine(2).current_term
    e2 = sim.engine(2)
    e2.step(3, VoteRequest(term + 5, 3, LogId(term + 4, 99)), token=(3, None))
    out = e2.take_output()
    (reply,) = [c.message for c in out if isinstance(c, Respond)]
    assert reply.granted is False and e2.current_term == term
    assert not any(isinstance(c, SaveVote) for c in out)


# --------------------------------------------------------------------------- 6 membership changes


def test_joint_consensus_needs_a_majority_of_both_configurations():
    """§6: "Agreement (for elections and entry commitment) requires separate majorities from both the old
    and new configurations." """
    cfg = Config(heartbeat_interval=0.05, election_timeout=(0.15, 0.3), rpc_timeout=0.1)
    sim = cluster(3, learners=2, config=cfg)  # voters 1,2,3; learners 4,5
    for i in (4, 5):
        sim.blocked |= {(1, i), (i, 1)}
    j = sim.call(1, lambda e: e.change_membership({3, 4, 5}))
    assert isinstance(j, LogId)
    settle(sim)
    s1 = sim.engine(1)
    assert s1.membership.membership.is_joint
    assert s1.committed.index < j.index          # old majority only: not committed
    sim.blocked -= {(1, 4), (4, 1)}
    sim.advance(0.15)                            # the AppendEntries lost on 1->4 times out, is re-sent
    assert s1.committed.index >= j.index         # {3, 4} is a majority of {3, 4, 5}
    sim.advance(1.0)
    sim.heal()
    sim.advance(1.0)
    leader = sim.leader()
    assert leader in (3, 4, 5)
    m = sim.engine(leader).membership.membership
    assert not m.is_joint and m.voter_ids == {3, 4, 5}


def test_a_candidate_in_a_joint_configuration_needs_a_majority_of_both_voter_sets():
    """§6: "Agreement (for elections and entry commitment) requires separate majorities from both the old
    and new configurations."  With C_old,new = {1,2,3} / {1,4,5} and the old voters gone, nodes 4 and 5
    are a majority of C_new only: neither may win."""
    sim = cluster(3, learners=2)
    final = lambda m: isinstance(m, AppendEntriesRequest) and any(
        e.kind == EntryKind.MEMBERSHIP and not e.payload.is_joint for e in m.entries)
    sim.on_send = lambda s, d, m: not final(m)            # C_new never leaves node 1
    j = sim.call(1, lambda e: e.change_membership({1, 4, 5}))
    assert isinstance(j, LogId)
    settle(sim)
    assert all(sim.engine(i).membership.membership.is_joint for i in (4, 5))
    for i in (1, 2, 3):
        sim.crash(i)
    sim.on_send = None
    sim.skip(1.0)
    for i in (4, 5):
        sim.call(i, lambda e: e.trigger_elect())
        sim.stabilize()
        assert sim.leaders() == []


def test_a_voter_that_an_uncommitted_configuration_leaves_out_still_campaigns():
    """§6 / thesis §4.2.2: the leader leaves the cluster "once it has committed the C_new entry"; if it
    is lost before, the servers that hold C_new may be outside C_new, and the servers of C_new may hold
    only C_old,new, whose old majority will not vote for their shorter logs.  A voter of the committed
    configuration that C_new leaves out must still campaign, or nobody can (regression: sim seed 66)."""
    sim = cluster(3)
    elect(sim, 2)
    final_to_3 = lambda s, d, m: not (d == 3 and isinstance(m, AppendEntriesRequest) and any(
        e.kind == EntryKind.MEMBERSHIP and not e.payload.is_joint for e in m.entries))
    sim.on_send = final_to_3                      # C_new never reaches node 3
    j = sim.call(2, lambda e: e.change_membership({3}, retain=True))  # 1 and 2 stay as learners
    assert isinstance(j, LogId)
    settle(sim)
    e1 = sim.engine(1)
    assert not e1.membership.membership.is_joint and e1.membership.membership.voter_ids == {3}
    assert sim.engine(3).membership.membership.is_joint
    sim.crash(2)                                  # the leader is lost before C_new commits:
    # node 3 needs a vote of {1, 2, 3}, node 1 refuses it (its log has C_new), node 2 is down
    sim.on_send = None
    sim.advance(2.0)
    assert sim.leader() == 3
    m = sim.engine(3).membership
    assert m.membership.voter_ids == {3} and not m.membership.is_joint
    assert sim.engine(3).committed.index >= m.log_id.index


def test_a_refused_vote_request_does_not_restart_the_election_timer():
    """Figure 2, Followers: "If election timeout elapses without receiving AppendEntries RPC from
    current leader or granting vote to candidate: convert to candidate."  A higher-term request that is
    refused (the candidate's log is behind) must not postpone our own election, or stale candidates
    (say, removed servers without PreVote) keep the up-to-date servers from ever running
    (regression: sim seed 907)."""
    cfg = Config(heartbeat_interval=0.05, election_timeout=(0.15, 0.3), pre_vote=False)
    e = engine(1, [1, 2, 2], vote=Vote(2, None), config=cfg)   # election deadline at 0.225
    e.advance_clock(0.2)
    e.step(2, VoteRequest(9, 2, LogId(1, 2)), token="t")
    out = e.take_output()
    assert [c.message.granted for c in out if isinstance(c, Respond)] == [False]
    assert e.current_term == 9
    e.tick(0.23)
    assert any(isinstance(c, SendVote) for c in e.take_output())
    assert e.state is CANDIDATE and e.current_term == 10


def test_a_candidate_refused_by_a_voter_with_a_longer_log_waits_longer_before_campaigning_again():
    """A vote refusal carries the voter's last log id (openraft's VoteResponse does too), and a candidate
    whose log is behind it waits an extra maximum election timeout before its next campaign: it cannot
    get that vote, and a node with a log like the voter's could.  Without it, stale candidates without
    PreVote (with stale configurations that need not even list the up-to-date node, which then learns
    their terms only from refusals of its own requests) raise the term in step with the up-to-date node,
    and it always campaigns in a term one of them already took (regression: soak seeds 1000095, 1004160;
    a candidate's request is what tells the stale node in soak seed 1000502, where nobody refuses it)."""
    cfg = Config(heartbeat_interval=0.05, election_timeout=(0.15, 0.3), pre_vote=False)
    # the refusal carries the voter's last log id; a grant does not
    v = engine(2, [1, 2, 2], config=cfg)
    v.step(1, VoteRequest(3, 1, LogId(1, 2)), token="no")
    v.step(3, VoteRequest(3, 3, LogId(2, 4)), token="yes")
    replies = {c.token: c.message for c in v.take_output() if isinstance(c, Respond)}
    assert replies == {"no": VoteResponse(3, False, last_log_id=LogId(2, 4)), "yes": VoteResponse(3, True)}

    for voter_last, waits in ((LogId(2, 4), True), (LogId(1, 3), False), (LogId(1, 2), False)):
        e = engine(1, [1, 1], vote=Vote(1, None), config=cfg)        # last log id (1, 3)
        e.trigger_elect()                                            # term 2; deadline at 0.225
        e.take_output()
        e.step(2, VoteResponse(2, False, last_log_id=voter_last))
        e.step(3, VoteResponse(3, False, last_log_id=voter_last))    # a higher term: adopted
        assert e.state is FOLLOWER and e.current_term == 3
        e.tick(0.23)
        assert any(isinstance(c, SendVote) for c in e.take_output()) is not waits, voter_last
        if waits:
            e.tick(0.23 + 0.3)
            assert any(isinstance(c, SendVote) for c in e.take_output())
            assert e.state is CANDIDATE and e.current_term == 4
            # the wait lasts until that campaign: the next one, refused for other reasons, is not delayed
            e.step(2, VoteResponse(4, False, last_log_id=LogId(1, 3)))
            e.tick(0.23 + 0.3 + 0.23)
            assert any(isinstance(c, SendVote) for c in e.take_output())

    # A vote request from a candidate whose log is ahead tells the same, granted or not (here not: we
    # voted for ourselves in its term; the stale candidate may not even be in its configuration).
    e = engine(1, [1, 1], vote=Vote(1, None), config=cfg)
    e.trigger_elect()                                                # term 2; deadline at 0.225
    e.step(3, VoteRequest(2, 3, LogId(2, 4)), token="t")
    assert [c.message.granted for c in e.take_output() if isinstance(c, Respond)] == [False]
    e.tick(0.23)
    assert not any(isinstance(c, SendVote) for c in e.take_output())
    e.tick(0.23 + 0.3)
    assert any(isinstance(c, SendVote) for c in e.take_output()) and e.current_term == 3


def test_restart_keeps_the_committed_configuration_first():
    """A restarted node rebuilds its configurations from the state machine's and the log's; the
    saved commit point may cover some of the log's, and the committed one must come first (here it
    decides whether the node may campaign; regression: sim seed 8474)."""
    nodes = {i: addr(i) for i in (1, 2, 3)}
    m_a = Membership(configs=(frozenset({2}),), nodes={1: addr(1), 2: addr(2)})     # 1 a learner
    m_b = Membership(configs=(frozenset({1, 2}), frozenset({3})), nodes=nodes)      # joint
    m_c = Membership(configs=(frozenset({3}),), nodes=nodes)                        # final: 1 a learner
    entries = [Entry(LogId(0, 1), EntryKind.MEMBERSHIP, m_a), Entry(LogId(1, 2), EntryKind.MEMBERSHIP, m_b),
               Entry(LogId(1, 3), EntryKind.MEMBERSHIP, m_c)]
    terms = {e.index: e.term for e in entries}
    rs = RestoredState(vote=Vote(1, None), last_log_id=LogId(1, 3), committed=LogId(1, 2),
                       memberships=[StoredMembership(e.log_id, e.payload) for e in entries], term_at=terms.get)
    e = Engine(1, CFG, FixedRng(), 0.0, rs)
    assert e.committed_membership == StoredMembership(LogId(1, 2), m_b)
    e.take_output()
    e.tick(1.0)   # a voter of the committed configuration that C_new leaves out campaigns (see above)
    votes = [c for c in e.take_output() if isinstance(c, SendVote)]
    assert votes and votes[0].targets == (3,)


def test_no_vote_is_cast_before_the_initial_configuration_is_on_disk():
    """Figure 2's persistent state reaches stable storage before it is acted on: initialize() writes
    the configuration, and the node campaigns only once that entry is flushed.  Otherwise a crash in
    between leaves a node with a saved vote but no configuration: it can never campaign, and is not
    pristine enough to be initialized again (regression: sim seed 9236, a one-node cluster)."""
    sim = Sim(0, voters=1, config=CFG, manual=True, init=None)
    sim.hold_flush = {1}
    sim.stabilize()
    sim.advance(1.0)
    assert sim.engine(1).state is not LEADER and sim.nodes[1].d_vote is None
    sim.crash(1)
    sim.restart(1)
    assert sim.engine(1).is_pristine()            # so initialize() can simply be retried
    sim.call(1, lambda e: e.initialize({1: addr(1)}))
    sim.hold_flush = set()
    sim.advance(1.0)
    assert sim.engine(1).state is LEADER


def test_new_voters_must_catch_up_before_a_joint_configuration_is_proposed():
    """§6 (thesis §4.2.1, "catching up new servers"): a new server joins as a non-voting member until
    its log has caught up, "otherwise ... the cluster is unavailable" while it does.  A joint
    configuration needs a majority of the new voters for every commit."""
    cfg = Config(heartbeat_interval=0.05, election_timeout=(0.15, 0.3), rpc_timeout=0.5, max_payload_entries=2)
    sim = cluster(3, learners=1, config=cfg)
    sim.isolate(4)
    propose(sim, 1, *range(10))
    settle(sim)
    with pytest.raises(ChangeMembershipError, match="caught up") as exc:
        sim.engine(1).change_membership({1, 4})
    assert set(exc.value.lagging) == {4}
    assert not sim.engine(1).membership.membership.is_joint
    sim.heal()
    sim.advance(0.3)
    j = sim.call(1, lambda e: e.change_membership({1, 4}))
    assert isinstance(j, LogId)
    sim.advance(0.3)
    m = sim.engine(1).membership.membership
    assert m.voter_ids == {1, 4} and not m.is_joint


def test_a_removed_voter_learns_that_its_removal_committed_and_stops_campaigning():
    """§6: "servers not in C_new ... will not receive heartbeats, so they will time out and start new
    elections".  The leader replicates to a removed server until it holds the configuration that
    removes it and a commit index covering it; then the server knows, and stays quiet (with PreVote it
    never won, but it campaigned for ever)."""
    sim = cluster(3)
    j = sim.call(1, lambda e: e.change_membership({1, 2}))
    assert isinstance(j, LogId)
    settle(sim)
    votes = []
    sim.on_send = lambda s, d, m: (votes.append(s) if isinstance(m, VoteRequest) else None) or True
    sim.advance(2.0)
    e3 = sim.engine(3)
    assert votes == [] and e3.state is LEARNER and e3.removed
    assert sim.engine(1).replication().keys() == {2}   # it stopped replicating to node 3


def test_remove_learner_commits_a_configuration_without_it_and_stops_replicating_to_it():
    sim = cluster(3, learners=1)
    with pytest.raises(ChangeMembershipError, match="voter"):
        sim.engine(1).remove_learner(2)
    lid = sim.call(1, lambda e: e.remove_learner(4))
    assert isinstance(lid, LogId)
    sim.advance(0.5)
    assert sim.engine(1).committed.index >= lid.index
    assert 4 not in sim.engine(1).membership.membership.nodes and 4 not in sim.engine(1).replication()
    assert sim.engine(4).removed
    assert sim.call(1, lambda e: e.remove_learner(4)) is None   # not a member: nothing to do


def test_learners_are_never_counted_in_a_quorum_and_never_campaign():
    """Learners (the thesis's non-voting members, §4.2.1) receive the log but do not count toward
    majorities and never start elections."""
    sim = cluster(3, learners=2)
    for i in (2, 3):
        sim.blocked |= {(1, i), (i, 1)}
    (lid,) = propose(sim, 1, "x")
    settle(sim)
    assert sim.engine(4).log.last == lid and sim.engine(5).log.last == lid
    assert sim.engine(1).committed.index < lid.index
    sim.heal()
    sim.isolate(4)
    term4 = sim.engine(4).current_term
    votes = []
    sim.on_send = lambda s, d, m: (votes.append(s) if isinstance(m, VoteRequest) else None) or True
    sim.advance(1.0)
    assert 4 not in votes and sim.engine(4).current_term == term4 and sim.engine(4).state is LEARNER


# --------------------------------------------------------------------------- thesis: leadership transfer, ReadIndex


def test_leader_transfer_hands_over_to_the_target():
    """Thesis §3.10: the leader brings the target's log up to date, then sends TimeoutNow; the target
    starts an election at once and wins."""
    sim = cluster(3)
    term = sim.engine(1).current_term
    sim.call(1, lambda e: e.transfer_leader(2))
    sim.stabilize()
    assert sim.engine(2).state is LEADER and sim.engine(2).current_term == term + 1
    assert sim.engine(1).state is FOLLOWER


def test_leader_transfer_catches_up_a_lagging_target_first_and_refuses_writes_meanwhile():
    # rpc_timeout (1 s by default) beyond the transfer deadline: the AppendEntries lost while 1->3 was
    # cut is re-sent after a heartbeat asks node 3 for the entries it should hold, not after rpc_timeout
    sim = cluster(3, config=Config(heartbeat_interval=0.05, election_timeout=(0.15, 0.3)))
    sim.blocked |= {(1, 3)}
    propose(sim, 1, "a", "b")
    settle(sim)
    assert sim.engine(3).log.last != sim.engine(1).log.last
    timeouts = []
    sim.on_send = lambda s, d, m: (timeouts.append(d) if type(m).__name__ == "TimeoutNowRequest" else None) or True
    sim.call(1, lambda e: e.transfer_leader(3))
    sim.stabilize()
    assert timeouts == []                       # not before the target has the whole log
    with pytest.raises(ForwardToLeader):
        sim.engine(1).propose(["c"])
    sim.heal()
    sim.advance(0.25)
    assert timeouts == [3]
    assert sim.engine(3).state is LEADER


def test_timeout_now_starts_no_election_before_the_configuration_is_on_disk():
    """TimeoutNow makes the checks ``trigger.elect()`` makes: a vote saved before the node's first
    configuration is durable could outlive it (see the test of initialize() above)."""
    e = Engine(2, CFG, FixedRng(), 0.0)
    e.initialize({1: addr(1), 2: addr(2)})
    e.take_output()                                            # the configuration is not flushed
    e.step(1, TimeoutNowRequest(1, 1), token="t")
    out = e.take_output()
    assert not any(isinstance(c, SendVote) for c in out) and e.vote.node_id is None
    e.on_log_flushed(LogId(0, 1))
    e.step(1, TimeoutNowRequest(1, 1), token="t2")
    assert any(isinstance(c, SendVote) for c in e.take_output()) and e.vote == Vote(2, 2)


def test_read_index_waits_for_a_quorum_heartbeat_and_covers_the_commit_point():
    """Thesis §6.4: the leader records its commit index as the read index, confirms it is still leader
    with a round of heartbeats to a majority, then serves the read."""
    sim = cluster(3)
    propose(sim, 1, "a")
    settle(sim)
    committed = sim.engine(1).committed
    for i in (2, 3):
        sim.blocked |= {(i, 1)}                  # heartbeats go out, acks do not come back
    tok = sim.read_index(1)
    sim.stabilize()
    assert tok not in sim.reads_done
    sim.heal()
    sim.call(1, lambda e: e.trigger_heartbeat())
    sim.stabilize()
    r = sim.reads_done[tok]
    assert r.ok and r.read_log_id.index >= committed.index


def test_a_pending_read_is_checked_again_when_the_configuration_changes():
    """Thesis §6.4 with §4.3: the leader confirms a read with a quorum of its current configuration.
    When the leader's own flush commits C_old,new and it appends C_new, a read whose heartbeat round
    a majority of C_new (but not of C_old) answered is served then, not after some later reply."""
    sim = cluster(3, learners=1)
    sim.hold_flush = {1}
    j = sim.call(1, lambda e: e.change_membership({1, 4}))
    assert isinstance(j, LogId)
    sim.stabilize()
    assert all(sim.engine(i).log.last == j for i in (2, 3, 4))
    assert sim.engine(1).committed.index < j.index            # node 1 has not flushed it yet
    sim.blocked |= {(1, 2), (1, 3)}                            # 2 and 3 hear no more heartbeats
    tok = sim.read_index(1)
    sim.stabilize()                                            # 4 answers the read's round
    assert tok not in sim.reads_done                           # C_old: {1} is no majority
    sim.blocked |= {(4, 1)}
    sim.flush(1)                                               # commits C_old,new; C_new {1, 4} goes in
    sim.stabilize()
    assert not sim.engine(1).membership.membership.is_joint
    assert sim.reads_done[tok].ok


def test_read_index_on_a_deposed_leader_never_succeeds():
    sim = cluster(3)
    sim.isolate(1)
    tok = sim.read_index(1)
    sim.advance(1.0)
    assert sim.reads_done[tok].ok is False
    assert sim.engine(1).state is not LEADER


def test_read_index_on_a_new_leader_waits_for_an_entry_of_its_term_to_commit():
    """Thesis §6.4 step 1: "If the leader has not yet marked an entry from its current term committed,
    it waits until it has done so." """
    sim = cluster(3)
    sim.on_send = lambda s, d, m: not (s == 2 and isinstance(m, AppendEntriesRequest))
    sim.skip(1.0)
    sim.call(2, lambda e: e.trigger_elect())
    sim.stabilize()
    e2 = sim.engine(2)
    assert e2.state is LEADER and e2.committed.term < e2.current_term
    tok = sim.read_index(2)
    sim.stabilize()
    assert tok not in sim.reads_done
    sim.on_send = None
    settle(sim)
    r = sim.reads_done[tok]
    assert r.ok and r.read_log_id.term == e2.current_term
