"""Leadership transfer in the threaded runtime (Raft thesis 3.10).

``raft.trigger.transfer_leader(to)`` catches the target up, sends it
TimeoutNow, and the target wins the next term; meanwhile the old leader
refuses writes with ForwardToLeader.  In-process clusters, condition waits only.
"""
from __future__ import annotations

import pytest

from pyraft import Config, ServerState
from pyraft.errors import ChangeMembershipError, ForwardToLeader
from pyraft.messages import TimeoutNowRequest

from memcluster import FAST, LOADED, LeaderMonitor, MemCluster, Writer, assert_all_present, put, wait_until

pytestmark = pytest.mark.timeout(60)

#: A long election timeout: a transfer is abandoned after one, and these tests
#: need the window to observe it.
PATIENT = Config(heartbeat_interval=0.05, election_timeout=(1.0, 2.0), rpc_timeout=0.5)


def followers(c: MemCluster, leader) -> list[int]:
    return [i for i in c.rafts if i != leader.node_id]


def test_transfer_hands_leadership_to_the_target_in_the_next_term():
    with MemCluster(3) as c, LeaderMonitor(c) as mon:
        old = c.leader()
        old.client_write(put("a", 1), timeout=5)
        term = old.metrics().current_term
        target = followers(c, old)[0]
        old.trigger.transfer_leader(target)
        new = c.rafts[target]
        m = new.wait(5).state(ServerState.LEADER)
        assert m.current_term == term + 1  # TimeoutNow skips the pre-vote: straight to the next term
        for r in c.rafts.values():
            r.wait(5).current_leader(target)
        with pytest.raises(ForwardToLeader) as ei:
            old.client_write(put("b", 2), timeout=5)
        assert ei.value.leader_id == target and ei.value.leader_node == c.node(target)
        new.client_write(put("b", 2), timeout=5)
        c.wait_applied(new.metrics().last_log_index)
        assert all(r.state_machine.get("a") == 1 and r.state_machine.get("b") == 2 for r in c.rafts.values())
    mon.check()


def test_transfer_brings_a_lagging_target_up_to_date_and_refuses_writes_meanwhile():
    with MemCluster(3, PATIENT) as c, LeaderMonitor(c) as mon:
        old = c.leader()
        target = followers(c, old)[0]
        # What arrives at the target when TimeoutNow does.
        seen: list[int] = []
        c.net._transports[target].set_fault_filter(
            lambda d, peer, msg: (d == "request" and isinstance(msg, TimeoutNowRequest)
                                  and seen.append(c.rafts[target]._core.engine.log.last_index)) or False)
        c.net.set_one_way(old.node_id, target)  # the target hears nothing from the leader: it falls behind
        last = 0
        for i in range(200):
            last = old.client_write_async(put(f"k{i}", i))
        last = last.result(5).log_id.index
        assert c.rafts[target].metrics().last_log_index < last
        term = old.metrics().current_term
        old.trigger.transfer_leader(target)
        # During the transfer the old leader takes no writes, and says where to go.
        with pytest.raises(ForwardToLeader) as ei:
            old.client_write(put("during", 1), timeout=5)
        assert ei.value.leader_id == target
        with pytest.raises(ForwardToLeader):
            old.ensure_linearizable(timeout=5)
        c.net.heal()
        new = c.rafts[target]
        m = new.wait(5).state(ServerState.LEADER)
        assert m.current_term == term + 1
        assert seen and seen[0] >= last  # TimeoutNow went out only once the target had the whole log
        new.client_write(put("after", 1), timeout=5)
        c.wait_applied(new.metrics().last_log_index)
        for r in c.rafts.values():
            assert r.state_machine.get("k199") == 199 and r.state_machine.get("during") is None
    mon.check()


def test_a_transfer_to_an_unreachable_target_is_abandoned_and_the_leader_serves_again():
    with MemCluster(3, PATIENT) as c:
        old = c.leader()
        term = old.metrics().current_term
        target = followers(c, old)[0]
        c.net.isolate(target)
        old.trigger.transfer_leader(target)
        with pytest.raises(ForwardToLeader):
            old.client_write(put("x", 1), timeout=5)

        def write_ok():
            try:
                return old.client_write(put("y", 1), timeout=5)
            except ForwardToLeader:
                return None

        # After an election timeout it gives up and takes writes again, still leader of the same term.
        wait_until(write_ok, 5, "the leader to take writes again")
        m = old.metrics()
        assert m.state == ServerState.LEADER and m.current_term == term
        c.net.heal()
        c.wait_applied(old.metrics().last_log_index)


def test_transfer_requests_that_make_no_sense_are_refused():
    with MemCluster(3) as c:
        leader = c.leader()
        c.start(4)
        leader.add_learner(4, c.node(4), timeout=10)
        with pytest.raises(ChangeMembershipError):
            leader.trigger.transfer_leader(4)  # a learner cannot lead
        with pytest.raises(ChangeMembershipError):
            leader.trigger.transfer_leader(9)  # not a member at all
        leader.trigger.transfer_leader(leader.node_id)  # to itself: nothing to do
        assert leader.is_leader()
        leader.client_write(put("still", 1), timeout=5)
        f = c.rafts[followers(c, leader)[0]]
        with pytest.raises(ForwardToLeader):
            f.trigger.transfer_leader(leader.node_id)


def test_transfers_under_write_load_lose_no_acknowledged_write():
    with MemCluster(3, LOADED) as c, LeaderMonitor(c) as mon:
        w = Writer(c, "t")
        w.start()
        w.wait_acked(50)
        for round_ in range(4):
            old = c.leader()
            target = followers(c, old)[round_ % 2]
            term = old.metrics().current_term
            old.trigger.transfer_leader(target)
            c.rafts[target].wait(10).metrics(lambda m: m.state == ServerState.LEADER and m.current_term > term,
                                             f"{target} to lead")
            w.wait_acked(50)
        acked = w.stop()
        assert_all_present(c, acked, c.rafts)
    mon.check()
