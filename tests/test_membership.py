"""Cluster membership changes in the threaded runtime: learners and joint consensus.

In-process clusters (MemoryNetwork, memory stores).  Every wait is on a
condition; writer threads keep the cluster busy while it changes, and a
monitor samples every node's metrics to check that no term ever has two
leaders.
"""
from __future__ import annotations

import threading

import pytest

from pyraft import ServerState
from pyraft.types import log_index
from pyraft.errors import ChangeMembershipError, ForwardToLeader, InitializeError, Timeout
from pyraft.messages import TimeoutNowRequest

from memcluster import (FAST, LOADED, LeaderMonitor, MemCluster, Writer, assert_all_present, put,
                        pyraft_threads, repl_thread, wait_until)

pytestmark = pytest.mark.timeout(60)


def others(c: MemCluster, *exclude: int) -> list[int]:
    return [i for i in c.rafts if i not in exclude]


# --------------------------------------------------------------------- learners

def test_add_learner_blocks_until_the_learner_caught_up_with_the_log_as_of_the_call():
    with MemCluster(3) as c:
        leader = c.leader()
        for i in range(200):
            leader.client_write_async(put(f"k{i}", i))
        target = leader.client_write(put("last", 1), timeout=5).log_id.index
        c.start(4)
        lid = leader.add_learner(4, c.node(4), blocking=True, timeout=10)
        assert lid is not None and lid.index > target
        # Caught up when add_learner returned: the leader saw it match the whole log as of the call.
        assert leader.metrics().replication[4].index >= lid.index
        assert repl_thread(leader.node_id, 4) in pyraft_threads()
        learner = c.rafts[4]
        learner.wait(5).applied_index_at_least(lid.index)
        assert learner.state_machine.get("last") == 1 and learner.state_machine.get("k199") == 199
        m = learner.metrics()
        assert m.state == ServerState.LEARNER
        assert m.membership.voter_ids == {1, 2, 3} and m.membership.learner_ids == {4}
        lm = leader.metrics().membership
        assert lm.configs == (frozenset({1, 2, 3}),) and lm.learner_ids == {4}
        # Adding it again with the same address changes nothing; a voter cannot be added as a learner.
        assert leader.add_learner(4, c.node(4), timeout=5) is None
        with pytest.raises(ChangeMembershipError):
            leader.add_learner(others(c, leader.node_id, 4)[0], c.node(9), timeout=5)
        follower = c.rafts[others(c, leader.node_id, 4)[0]]
        with pytest.raises(ForwardToLeader):
            follower.add_learner(5, c.node(5), timeout=5)


def test_add_learner_non_blocking_returns_at_once_and_the_learner_catches_up_later():
    with MemCluster(3) as c:
        leader = c.leader()
        for i in range(50):
            leader.client_write_async(put(f"k{i}", i))
        last = leader.client_write(put("x", 1), timeout=5).log_id.index
        c.start(4)
        c.net.isolate(4)
        lid = leader.add_learner(4, c.node(4), blocking=False, timeout=5)
        assert lid is not None  # committed without the learner: it does not count
        assert leader.metrics().replication.get(4) is None
        c.net.heal()
        c.rafts[4].wait(10).applied_index_at_least(last)


def test_learners_never_vote_and_never_count_toward_commit():
    with MemCluster(3, LOADED) as c, LeaderMonitor(c) as mon:
        leader = c.leader()
        c.start(4)
        c.start(5)
        leader.add_learner(4, c.node(4), timeout=10)
        leader.add_learner(5, c.node(5), timeout=10)
        followers = others(c, leader.node_id, 4, 5)
        # The leader and two learners are a majority of five nodes, but not of the voters.
        for f in followers:
            c.net.isolate(f)
        last = leader.metrics().last_log_index + 1
        fut = leader.client_write_async(put("no quorum", 1))
        leader.wait(5).log_index_at_least(last)
        # Both learners hold the entry, yet it does not commit.
        for i in (4, 5):
            c.rafts[i].wait(5).log_index_at_least(last)
        with pytest.raises((Timeout, ForwardToLeader)):
            leader.client_write(put("no quorum 2", 1), timeout=0.3)
        assert log_index(leader.metrics().committed) < last and not fut.done()
        c.net.heal()
        fut.result(5)  # the voters are back: now it commits
        # Now isolate the leader: two voters elect one of themselves, the learners stay learners.
        old = leader.node_id
        c.net.isolate(old)
        new = c.leader(among=followers, timeout=10)
        new.client_write(put("after", 1), timeout=5)
        c.net.heal()
        c.wait_applied(new.metrics().last_log_index)
        mon.check()
        assert all(ids <= {1, 2, 3} for ids in mon.leaders.values())
        for i in (4, 5):
            m = c.rafts[i].metrics()
            assert m.state == ServerState.LEARNER
            assert m.vote.node_id is None  # never asked, never granted a vote
            assert c.rafts[i].state_machine.get("after") == 1


def test_remove_learner_commits_its_removal_and_its_replication_worker_stops():
    with MemCluster(3) as c:
        leader = c.leader()
        c.start(4)
        leader.add_learner(4, c.node(4), timeout=10)
        leader.client_write(put("k", 1), timeout=5)
        assert repl_thread(leader.node_id, 4) in pyraft_threads()
        follower = c.rafts[others(c, leader.node_id, 4)[0]]
        with pytest.raises(ForwardToLeader):
            follower.remove_learner(4, timeout=5)
        with pytest.raises(ChangeMembershipError, match="voter"):
            leader.remove_learner(follower.node_id, timeout=5)
        with pytest.raises(TypeError):
            leader.remove_learner("4", timeout=5)
        lid = leader.remove_learner(4, timeout=10)
        assert lid is not None
        m = leader.metrics()
        assert 4 not in m.membership.nodes and m.membership_committed
        assert m.membership.voter_ids == {1, 2, 3}
        wait_until(lambda: repl_thread(leader.node_id, 4) not in pyraft_threads(), 10,
                   "the replication worker to node 4 to stop")
        assert 4 not in leader.metrics().replication
        # The learner was told before the leader let go of it; it does not campaign.
        c.rafts[4].wait(5).metrics(lambda m: 4 not in m.membership.nodes and m.membership_committed,
                                   "node 4 to know it was removed")
        assert c.rafts[4].metrics().state == ServerState.LEARNER
        assert leader.remove_learner(4, timeout=5) is None   # not a member: nothing to do
        leader.client_write(put("after", 1), timeout=5)


def test_a_removed_voter_learns_of_its_removal_stops_campaigning_and_says_so(caplog):
    """A voter removed from the cluster used to go on campaigning for ever (with PreVote it never
    won, but it never stopped): the leader stopped replicating to it as soon as the new
    configuration was in its log, so it never learned that its removal committed."""
    caplog.set_level("INFO", logger="pyraft.runtime")
    with MemCluster(3) as c:
        leader = c.leader()
        gone = others(c, leader.node_id)[0]
        rest = set(c.rafts) - {gone}
        leader.change_membership(rest, timeout=10)
        r = c.rafts[gone]
        r.wait(5).metrics(lambda m: gone not in m.membership.nodes and m.membership_committed,
                          f"node {gone} to learn that its removal committed")
        states = set()
        for _ in range(20):   # ten election timeouts
            states.add(r.metrics().state)
            threading.Event().wait(0.02)
        assert states == {ServerState.LEARNER}
        assert any(f"node {gone}: the committed configuration" in rec.getMessage()
                   and "removed from the cluster" in rec.getMessage() for rec in caplog.records)
        term = r.metrics().current_term
        assert term == leader.metrics().current_term


# --------------------------------------------------------------------- joint consensus

def test_change_membership_refuses_bad_requests():
    with MemCluster(3) as c:
        leader = c.leader()
        with pytest.raises(ChangeMembershipError):
            leader.change_membership(set(), timeout=5)
        with pytest.raises(ChangeMembershipError, match="not learners"):
            leader.change_membership({1, 2, 3, 4}, timeout=5)
        with pytest.raises(ChangeMembershipError):
            leader.change_membership({1, "2"}, timeout=5)
        with pytest.raises(ForwardToLeader):
            c.rafts[others(c, leader.node_id)[0]].change_membership({1, 2}, timeout=5)
        # The same voters: nothing to do, returns at once.
        leader.change_membership({1, 2, 3}, timeout=5)
        assert leader.metrics().membership.configs == (frozenset({1, 2, 3}),)


def test_a_learner_that_never_answered_is_not_promoted_and_the_cluster_keeps_its_quorum():
    # Counting entries only, a learner added while nothing runs at its address was "caught up"
    # with a young cluster's log: promoting it made a joint configuration that could commit nothing.
    with MemCluster(3) as c:
        leader = c.leader()
        leader.add_learner(4, c.node(4), blocking=False)  # node 4 is never started
        with pytest.raises(Timeout, match=r"new voters \[4\] to catch up"):
            leader.change_membership({1, 2, 3, 4}, timeout=1.5)
        m = leader.metrics()
        assert m.membership.configs == (frozenset({1, 2, 3}),) and m.state == ServerState.LEADER
        leader.client_write(put("still-writable", 1), timeout=5)
        # The engine's own rule, for any caller: refused while the learner has not answered.
        with pytest.raises(ChangeMembershipError, match=r"new voters \[4\] have not caught up"):
            leader._api(lambda e: e.change_membership({1, 2, 3, 4})).result(5)
        c.start(4)  # once it runs and answers, the same change goes through
        leader.change_membership({1, 2, 3, 4}, timeout=10)
        assert leader.metrics().membership.voter_ids == {1, 2, 3, 4}


def test_a_second_member_at_an_address_already_in_the_membership_is_refused():
    with MemCluster(3) as c:
        leader = c.leader()
        with pytest.raises(ChangeMembershipError, match="address 'mem://1' is that of node 1"):
            leader.add_learner(4, c.node(1), timeout=5)
        assert 4 not in leader.metrics().membership.nodes
    with MemCluster(2, init=False) as c:
        with pytest.raises(InitializeError, match="same address"):
            c.rafts[1].initialize({1: c.node(1), 2: c.node(1)})
        assert c.rafts[1].metrics().membership is None


def test_one_change_at_a_time_and_metrics_show_the_joint_configuration():
    # Slow elections: the leader keeps leading (CheckQuorum window 1 s) while the change is stuck.
    with MemCluster(3, LOADED) as c:
        leader = c.leader()
        c.start(4)
        leader.add_learner(4, c.node(4), timeout=10)
        f1, f2 = others(c, leader.node_id, 4)
        # The new configuration needs 3 of {leader, f1, f2, 4}: cut f2 and 4 off so the joint entry cannot commit.
        c.net.partition({leader.node_id, f1}, {f2, 4})
        new_voters = {leader.node_id, f1, f2, 4}
        result: list = []
        t = threading.Thread(target=lambda: result.append(_call(leader.change_membership, new_voters, timeout=20)))
        t.start()
        m = leader.wait(5).metrics(lambda m: m.membership.is_joint, "the joint configuration")
        assert m.membership.configs == (frozenset({leader.node_id, f1, f2}), frozenset(new_voters))
        assert m.membership.voter_ids == new_voters and m.membership.learner_ids == set()
        assert not m.membership_committed
        assert m.to_dict()["membership"]["configs"] == [sorted({leader.node_id, f1, f2}), sorted(new_voters)]
        with pytest.raises((ChangeMembershipError, ForwardToLeader)):
            leader.change_membership({leader.node_id, f1, f2}, timeout=5)
        c.start(5)
        with pytest.raises((ChangeMembershipError, ForwardToLeader)):
            leader.add_learner(5, c.node(5), timeout=5)
        c.net.heal()
        t.join(25)
        assert result == [None], result
        final = c.leader(among=new_voters)
        for i in new_voters:
            c.rafts[i].wait(10).metrics(lambda m: m.membership.configs == (frozenset(new_voters),)
                                        and m.membership_committed, "the final configuration")
        assert final.metrics().membership.voter_ids == new_voters


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except BaseException as e:  # noqa: BLE001
        return e


def test_grow_three_to_five_and_shrink_back_under_write_load():
    with MemCluster(3, LOADED) as c, LeaderMonitor(c) as mon:
        w = Writer(c, "g")
        w.start()
        w.wait_acked(50)
        leader = c.leader()
        for i in (4, 5):
            c.start(i)
            leader.add_learner(i, c.node(i), timeout=15)
            w.wait_acked(20)
        leader.change_membership({1, 2, 3, 4, 5}, timeout=15)
        for r in c.rafts.values():
            r.wait(10).metrics(lambda m: m.membership.configs == (frozenset({1, 2, 3, 4, 5}),)
                               and m.membership_committed, "five voters")
        assert leader.is_leader()
        w.wait_acked(50)
        # Shrink: drop two followers (never the leader here; that has its own test).
        gone = others(c, leader.node_id)[:2]
        keep = set(c.rafts) - set(gone)
        leader.change_membership(keep, timeout=15)
        m = leader.metrics()
        assert m.membership.configs == (frozenset(keep),) and m.membership.nodes.keys() == keep
        # The leader replicates to the removed nodes until they know of their removal (see
        # test_a_removed_voter_learns_of_its_removal_stops_campaigning_and_says_so), then lets go.
        for g in gone:
            wait_until(lambda: repl_thread(leader.node_id, g) not in pyraft_threads(), 5,
                       f"the replication worker to {g} to stop")
        assert set(leader.metrics().replication) == keep - {leader.node_id}
        w.wait_acked(50)
        acked = w.stop()
        assert len(acked) >= 170
        assert_all_present(c, acked, keep)
    mon.check()
    assert pyraft_threads() == []  # shutdown joined every worker, the stopped ones too


def test_replace_a_node():
    with MemCluster(3, LOADED) as c, LeaderMonitor(c) as mon:
        w = Writer(c, "r")
        w.start()
        leader = c.leader()
        old = others(c, leader.node_id)[0]
        c.start(4)
        leader.add_learner(4, c.node(4), timeout=15)
        voters = {1, 2, 3} - {old} | {4}
        leader.change_membership(voters, timeout=15)
        wait_until(lambda: repl_thread(leader.node_id, old) not in pyraft_threads(), 5, "the old worker to stop")
        assert leader.metrics().membership.nodes.keys() == voters
        c.stop(old)
        w.wait_acked(30)
        # The new member carries its weight: with another follower down, writes still commit.
        other = (voters - {leader.node_id, 4}).pop()
        c.net.isolate(other)
        leader.client_write(put("with 4", 1), timeout=5)
        c.net.heal()
        acked = w.stop()
        assert_all_present(c, acked, voters)
        assert c.rafts[4].state_machine.get("with 4") == 1
    mon.check()


@pytest.mark.parametrize("retain", [False, True])
def test_removing_the_leader_hands_leadership_over(retain):
    with MemCluster(3, LOADED) as c, LeaderMonitor(c) as mon:
        w = Writer(c, "x")
        w.start()
        w.wait_acked(30)
        leader = c.leader()
        old, term = leader.node_id, leader.metrics().current_term
        rest = set(others(c, old))
        handovers: list[int] = []
        for t in rest:
            c.net._transports[t].set_fault_filter(
                lambda d, peer, msg: (d == "request" and isinstance(msg, TimeoutNowRequest)
                                      and handovers.append(peer)) or False)
        leader.change_membership(rest, retain=retain, timeout=15)
        # It stepped down once the new configuration committed, and handed over with TimeoutNow.
        m = leader.wait(5).metrics(lambda m: m.state != ServerState.LEADER, "the removed leader to step down")
        assert m.membership.voter_ids == rest and m.membership_committed
        new = c.leader(among=rest, timeout=5)
        assert new.metrics().current_term > term
        assert handovers == [old]  # it told one successor to campaign at once
        for t in rest:
            wait_until(lambda: repl_thread(old, t) not in pyraft_threads(), 5, f"{old}'s worker to {t} to stop")
        w.wait_acked(30)
        nm = new.metrics()
        assert nm.membership.voter_ids == rest
        if retain:
            assert nm.membership.learner_ids == {old}
            assert old in nm.replication
            assert c.rafts[old].metrics().state == ServerState.LEARNER
        else:
            assert old not in nm.membership.nodes and old not in nm.replication
        acked = w.stop()
        assert_all_present(c, acked, rest | ({old} if retain else set()))
        if not retain:
            c.stop(old)
    mon.check()
    assert old not in set().union(*[ids for t, ids in mon.leaders.items() if t > term])


def test_a_change_cut_off_with_a_minority_fails_cleanly_and_never_makes_two_majorities():
    with MemCluster(5, LOADED) as c, LeaderMonitor(c) as mon:
        leader = c.leader()
        old = leader.node_id
        buddy = others(c, old)[0]
        majority = set(others(c, old, buddy))
        leader.client_write(put("before", 1), timeout=5)
        c.net.partition({old, buddy}, majority)
        # A change that only the cut-off leader hears about: its joint entry can never commit.
        with pytest.raises(Timeout):
            leader.change_membership({old, buddy} | set(sorted(majority)[:1]), timeout=2)
        new = c.leader(among=majority, timeout=10)
        new.client_write(put("during", 1), timeout=5)
        assert not leader.is_leader()
        c.net.heal()
        c.wait_applied(new.client_write(put("after", 1), timeout=5).log_id.index, timeout=10)
        for r in c.rafts.values():
            r.wait(5).metrics(lambda m: m.membership.configs == (frozenset({1, 2, 3, 4, 5}),),
                                   "the joint entry to be gone")
            assert r.state_machine.get("during") == 1
        # And a change works again afterwards.
        cur = c.leader()
        cur.change_membership(set(others(c, buddy)), timeout=10)
        assert cur.metrics().membership.voter_ids == set(others(c, buddy))
    mon.check()


def test_a_change_during_a_partition_completes_after_healing():
    with MemCluster(5, LOADED) as c, LeaderMonitor(c) as mon:
        w = Writer(c, "p")
        w.start()
        leader = c.leader()
        c.start(6)
        leader.add_learner(6, c.node(6), timeout=15)
        a, b, *cut = others(c, leader.node_id, 6)
        c.net.partition(set(cut) | {6}, {leader.node_id, a, b})
        # Replace b by the cut-off learner 6: the old configuration has a majority on the leader's
        # side, the new one {leader, a, cut..., 6} does not, so the joint entry waits for the heal.
        new_voters = {leader.node_id, a, 6} | set(cut)
        result: list = []
        t = threading.Thread(target=lambda: result.append(_call(leader.change_membership, new_voters, timeout=30)))
        t.start()
        leader.wait(5).metrics(lambda m: m.membership.is_joint, "the joint entry")
        c.net.heal()
        t.join(35)
        assert result == [None], result
        cur = c.leader(among=new_voters)
        w.wait_acked(30)
        acked = w.stop()
        assert cur.metrics().membership.configs == (frozenset(new_voters),)
        assert_all_present(c, acked, new_voters)
    mon.check()


def test_add_learner_whose_entry_a_new_leader_overwrote_is_not_reported_done():
    """The deposed leader's commit point passes the index of its learner entry, but the entry
    committed there is the new leader's: add_learner must not return as if the learner were added."""
    with MemCluster(3) as c:
        old = c.leader()
        old.client_write(put("before", 1), timeout=10)
        others = [i for i in c.rafts if i != old.node_id]
        c.net.isolate(old.node_id)
        before = old.metrics().last_log_index
        out: list = []

        def add() -> None:
            try:
                out.append(old.add_learner(4, c.node(4), blocking=False, timeout=20))
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                out.append(e)

        t = threading.Thread(target=add)
        t.start()
        old.wait(10).log_index_at_least(before + 1)  # the entry is in its log alone
        new = c.leader(among=others)
        new.client_write(put("after", 1), timeout=10)  # commits the new leader's entries at that index
        c.net.heal()
        t.join(30)
        assert not t.is_alive()
        [res] = out
        assert isinstance(res, ForwardToLeader), res
        assert res.leader_id == new.node_id and "overwritten" in str(res)
        for r in c.rafts.values():
            assert 4 not in r.metrics().membership.nodes
        # Asked again at the leader, it takes.
        lid = new.add_learner(4, c.node(4), blocking=False, timeout=10)
        assert lid is not None and 4 in new.metrics().membership.nodes


def test_node_data_and_the_whole_membership_are_bounded_before_anything_is_proposed():
    """A membership entry rides in AppendEntries and snapshots: one too large for a frame was dropped
    by every transport, and replication stalled behind it."""
    from pyraft import Config, Node
    from pyraft.raft import MAX_MEMBERSHIP_BYTES, MAX_NODE_DATA_BYTES
    with MemCluster(3, Config(heartbeat_interval=0.05, election_timeout=(1.0, 2.0), rpc_timeout=1.0)) as c:
        leader = c.leader()
        last = leader.metrics().last_log_index
        with pytest.raises(ValueError, match="bytes encoded, at most"):
            leader.add_learner(10, Node("mem://10", data={"blob": b"x" * (MAX_NODE_DATA_BYTES + 1)}), blocking=False)
        assert leader.metrics().last_log_index == last
        blob = b"x" * (MAX_NODE_DATA_BYTES - 100)
        added = 0
        with pytest.raises(ValueError, match="the membership would be"):
            for i in range(100, 100 + MAX_MEMBERSHIP_BYTES // len(blob) + 2):
                leader.add_learner(i, Node(f"mem://{i}", data={"blob": blob}), blocking=False, timeout=10)
                added += 1
        assert MAX_MEMBERSHIP_BYTES // len(blob) - 1 <= added <= MAX_MEMBERSHIP_BYTES // len(blob)
        last = leader.metrics().last_log_index
        leader.add_learner(100, Node("mem://100", data={"blob": blob}), blocking=False, timeout=10)  # a known one
        leader.client_write(put("still", 1), timeout=10)
        assert leader.metrics().last_log_index > last
    # Re-adding known learners with larger data counts too (each replaces its entry).
    with MemCluster(3, Config(heartbeat_interval=0.05, election_timeout=(1.0, 2.0), rpc_timeout=1.0)) as c:
        leader = c.leader()
        for i in range(100, 120):
            leader.add_learner(i, Node(f"mem://{i}"), blocking=False, timeout=10)
        with pytest.raises(ValueError, match="the membership would be"):
            for i in range(100, 120):
                leader.add_learner(i, Node(f"mem://{i}", data={"blob": blob}), blocking=False, timeout=10)
    # And so does the first membership.
    c2 = MemCluster(1, init=False)
    try:
        with pytest.raises(InitializeError, match="the membership would be"):
            c2.rafts[1].initialize({i: Node(f"mem://{i}", data={"blob": blob}) for i in range(1, 20)})
    finally:
        c2.close()
