"""Config.lease_reads: linearizable reads on the leader without a heartbeat round, while its lease holds.

The safety argument lives in ``Engine.read_lease``; the seeded simulation
checks it after every event (half its seeds run with leases: no node is
elected while another's lease holds, and a lease read never misses an
acknowledged write), and ``sim.teeth`` shows that each of its guards is needed.
These tests check the runtime: reads take the lease path, stop when the
lease can no longer be renewed, and the other side elects only after it ended.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from pyraft import Config, ServerState
from pyraft.engine.commands import Respond
from pyraft.engine.core import LEASE_SHARE, Engine, RestoredState
from pyraft.errors import ForwardToLeader, RaftError
from pyraft.messages import AppendEntriesRequest, VoteRequest, VoteResponse
from pyraft.types import LogId, Membership, Node, StoredMembership, Vote

from memcluster import FAST, MemCluster, put, wait_until
from test_raft_paper import cluster, propose, settle

pytestmark = pytest.mark.timeout(60)

LEASE = dataclasses.replace(FAST, lease_reads=True)
#: Default timers: a lease of 0.9 s, which a loaded machine's scheduling delays never eat up.
LONG_LEASE = Config(lease_reads=True, rpc_timeout=0.5)


def lease_count(r) -> int:
    return r.metrics().counters.get("lease_reads", 0)


def test_config_needs_check_quorum_and_a_real_bool():
    with pytest.raises(ValueError, match="check_quorum"):
        Config(lease_reads=True, check_quorum=False)
    with pytest.raises(ValueError, match="lease_reads must be True or False"):
        Config(lease_reads="yes")
    assert Config().lease_reads is False


def test_reads_take_the_lease_and_see_every_acknowledged_write():
    with MemCluster(3, LEASE) as c:
        leader = c.leader()
        for i in range(20):
            leader.client_write(put("k", i), timeout=5)
            leader.ensure_linearizable(timeout=5)
            assert c.stores[leader.node_id][1].get("k") == i
        wait_until(lambda: leader.ensure_linearizable(timeout=5) and lease_count(leader) >= 10, 5,
                   "reads served by the lease")
        # Followers never serve a lease read: they answer ForwardToLeader as before.
        follower = next(r for r in c.rafts.values() if r is not leader)
        with pytest.raises(ForwardToLeader):
            follower.ensure_linearizable(timeout=5)
        assert lease_count(follower) == 0


def test_without_the_option_every_read_takes_a_round():
    with MemCluster(3) as c:
        leader = c.leader()
        leader.client_write(put("k", 1), timeout=5)
        for _ in range(10):
            leader.ensure_linearizable(timeout=5)
        assert "lease_reads" not in leader.metrics().counters


def test_an_isolated_leader_serves_lease_reads_only_until_its_lease_ends_and_nobody_leads_before():
    """Cut the leader off; read from it in a loop.  Reads go on for less than LEASE_SHARE of a minimum
    election timeout after the cut, then stop; the majority elects a new leader only after the old
    leader's last lease read.

    Each read is timed from just before the call: its lease check came after that moment, and
    the check passed only before the lease's end, itself before any other node could be elected.
    The cut is timed just after the isolation: every round acknowledged was sent before it."""
    with MemCluster(3, LONG_LEASE) as c:
        old = c.leader()
        old.client_write(put("k", "before"), timeout=5)
        wait_until(lambda: old.ensure_linearizable(timeout=5) and lease_count(old) > 0, 5, "a first lease read")
        others = [i for i in c.rafts if i != old.node_id]
        last_read = [0.0]
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    old.ensure_linearizable(timeout=0.05)
                    last_read[0] = t0
                except (RaftError, TimeoutError):
                    pass

        c.net.isolate(old.node_id)
        cut = time.monotonic()
        t = threading.Thread(target=reader)
        t.start()
        try:
            new = c.leader(among=others, timeout=10)
            elected = time.monotonic()
            new.client_write(put("k", "after"), timeout=5)
        finally:
            stop.set()
            t.join()
        assert last_read[0] > 0, "the old leader served no read after the cut"
        assert last_read[0] - cut < LEASE_SHARE * LONG_LEASE.election_timeout[0]
        assert last_read[0] < elected, "a lease read was served after another node was elected"
        # Healed, the old leader follows and its reads are refused or forwarded, never stale.
        c.net.heal()
        wait_until(lambda: old.metrics().state == ServerState.FOLLOWER, 10, "the old leader to step down")
        with pytest.raises(ForwardToLeader):
            old.ensure_linearizable(timeout=5)


def test_the_new_leader_after_a_transfer_serves_lease_reads_of_its_own():
    with MemCluster(3, LEASE) as c:
        leader = c.leader()
        leader.client_write(put("k", 1), timeout=5)
        wait_until(lambda: leader.ensure_linearizable(timeout=5) and lease_count(leader) > 0, 5, "a lease read")
        target = next(i for i in c.rafts if i != leader.node_id)
        leader.trigger.transfer_leader(target)
        new = c.rafts[target]
        wait_until(lambda: new.metrics().state == ServerState.LEADER, 10, "the transfer")
        new.client_write(put("k", 2), timeout=5)
        wait_until(lambda: new.ensure_linearizable(timeout=5) and lease_count(new) > 0, 5, "the new leader's lease")
        assert c.stores[target][1].get("k") == 2


# --------------------------------------------------------------------------- the engine's guards


def _engine(node_id: int, *, term: int, now: float, config: Config = LEASE) -> Engine:
    m = Membership(configs=(frozenset({1, 2, 3}),), nodes={i: Node(f"mem://{i}") for i in (1, 2, 3)})
    rs = RestoredState(vote=Vote(term, None), last_log_id=LogId(1, 1),
                       memberships=[StoredMembership(LogId(1, 1), m)], term_at={1: 1}.get)

    class Rng:
        def uniform(self, a: float, b: float) -> float:
            return a

    e = Engine(node_id, config, Rng(), now, rs)
    e.take_output()
    return e


def test_a_restarted_node_refuses_votes_for_a_minimum_election_timeout_only_with_leases():

    def granted(e: Engine) -> bool:
        e.step(2, VoteRequest(5, 2, LogId(1, 1)), token="t")
        return [c.message.granted for c in e.take_output() if isinstance(c, Respond)] == [True]

    et0 = LEASE.election_timeout[0]
    assert not granted(_engine(1, term=3, now=100.0)), "granted a vote right after a restart"
    e = _engine(1, term=3, now=100.0)
    e.tick(100.0 + et0)
    assert granted(e)
    plain = dataclasses.replace(LEASE, lease_reads=False)
    assert granted(_engine(1, term=3, now=100.0, config=plain))
    # A node that never had a term (a fresh cluster) is not held back.
    assert granted(_engine(1, term=0, now=100.0))


def _manual(config: Config = LEASE):
    return cluster(3, config=config)


def test_the_lease_comes_from_a_quorum_round_and_lasts_lease_share_of_the_minimum_election_timeout():
    sim = _manual()
    e = sim.engine(1)
    settle(sim)
    lease = e.read_lease()
    assert lease is not None
    until, applied_from = lease
    et0 = LEASE.election_timeout[0]
    # The newest round a quorum acknowledged was assigned at most now; the lease ends LEASE_SHARE later.
    assert sim.nodes[1].now() < until <= sim.nodes[1].now() + LEASE_SHARE * et0 + 1e-9
    assert applied_from == e._term_start and e.log.term_at(applied_from) == e.current_term
    # Without acknowledgments (both followers cut off) the leader's new rounds give nothing: after a
    # minimum election timeout of them, the lease has not moved and has run out.
    sim.blocked |= {(1, 2), (1, 3), (2, 1), (3, 1)}
    sim.advance(et0)
    lease = e.read_lease()
    assert lease is None or (lease[0] <= until <= sim.nodes[1].now())


def test_a_transfer_ends_the_lease_for_the_rest_of_the_term_and_an_unconfirmed_config_suspends_it():
    sim = _manual()
    e = sim.engine(1)
    settle(sim)
    assert e.read_lease() is not None
    sim.call(1, lambda e: e.transfer_leader(2))  # node 2 is caught up: TimeoutNow goes at once
    assert e.read_lease() is None
    e.transferee = None  # as if the transfer had timed out: the term's lease stays forfeit
    assert e.state is ServerState.LEADER and e.read_lease() is None

    # A transfer that never sent TimeoutNow (its target never caught up) only pauses the lease.
    sim = _manual()
    e = sim.engine(1)
    settle(sim)
    sim.blocked |= {(1, 2), (2, 1)}
    propose(sim, 1, 7)
    settle(sim)
    sim.call(1, lambda e: e.transfer_leader(2))
    assert e.transferee == 2 and e.read_lease() is None
    e.transferee = None  # the transfer timed out
    assert e.read_lease() is not None

    sim = _manual()
    e = sim.engine(1)
    settle(sim)
    assert e.read_lease() is not None
    sim.call(1, lambda e: e.add_learner(4, Node("mem://4")))  # a configuration entry, not yet committed
    assert e.read_lease() is None


def test_a_follower_restarted_inside_a_lease_does_not_help_elect_another_leader():
    """Node 2 acknowledged leader 1's round, then restarts at once; node 3, cut off from 1, campaigns.
    Node 2 must refuse (it forgot the acknowledgment 1's lease counts on): else 3 leads while 1 still
    serves lease reads (the simulation's check fails in stabilize())."""
    sim = _manual()
    e1 = sim.engine(1)
    settle(sim)
    assert e1.read_lease() is not None
    sim.blocked |= {(1, 3), (3, 1)}
    sim.crash(2)
    sim.restart(2)
    sim.stabilize()
    sim.call(3, lambda e: e.trigger_elect())
    sim.stabilize()
    lease = e1.read_lease()
    assert lease is not None and sim.nodes[1].now() < lease[0]
    assert sim.engine(3).state is not ServerState.LEADER


def test_the_vote_guard_outlives_a_higher_term_seen_in_a_stale_reply():
    """A follower of leader 1 learns a later term from a delayed VoteResponse (its own old campaign)
    and forgets its leader; it still refuses node 3's vote for a minimum election timeout after 1's
    last message."""
    e = _engine(2, term=0, now=10.0)
    e.step(1, AppendEntriesRequest(1, 1, LogId(1, 1), (), 1, 1), token="ae")
    e.take_output()
    e.step(3, VoteResponse(2, False))
    assert e.current_term == 2 and e.leader_id is None
    e.take_output()
    e.step(3, VoteRequest(2, 3, LogId(1, 1)), token="v")
    assert [c.message.granted for c in e.take_output() if isinstance(c, Respond)] == [False]
    e.tick(10.0 + LEASE.election_timeout[0])
    e.step(3, VoteRequest(2, 3, LogId(1, 1)), token="v2")
    assert [c.message.granted for c in e.take_output() if isinstance(c, Respond)] == [True]


def test_a_follower_inside_a_lease_does_not_campaign_even_when_told_to():
    """trigger.elect() on node 2, which acknowledged leader 1's round: its own vote is one 1's lease
    counts on.  Node 3 (cut off from 1 long enough for its guard to run out) would grant it; with
    the campaign, 2 would lead while 1 still serves lease reads (the simulation's check fails)."""
    sim = _manual()
    e1 = sim.engine(1)
    settle(sim)
    sim.blocked |= {(1, 3), (3, 1)}
    sim.advance(0.2)
    lease = e1.read_lease()
    assert e1.state is ServerState.LEADER and lease is not None and sim.nodes[1].now() < lease[0]
    sim.call(2, lambda e: e.trigger_elect())
    sim.stabilize()
    assert sim.engine(2).state is ServerState.FOLLOWER and e1.state is ServerState.LEADER
    # Without lease reads, trigger.elect() campaigns as before.
    plain = _manual(dataclasses.replace(LEASE, lease_reads=False))
    settle(plain)
    plain.call(2, lambda e: e.trigger_elect())
    plain.stabilize()
    assert plain.engine(2).current_term > plain.engine(1).current_term or plain.engine(2).state is ServerState.LEADER


def test_a_lease_read_made_after_a_write_was_acknowledged_returns_an_index_that_covers_it():
    """The read is made from the write's done-callback (the SM worker's thread, as the write is
    acknowledged): the index it returns must cover the write (ObjectStateMachine.sync and the
    backup fence wait for that index)."""
    with MemCluster(3, LEASE) as c:
        leader = c.leader()
        leader.client_write(put("k", 0), timeout=5)
        wait_until(lambda: leader.ensure_linearizable(timeout=5) and lease_count(leader) > 0, 5, "a lease read")
        tried = []  # (write, read) log ids; read None when the lease did not hold at that moment

        def write_then_read() -> bool:
            got = []
            done = threading.Event()

            def on_ack(f):
                r = leader.ensure_linearizable_async()
                got.append((f.result().log_id, r.result(timeout=0) if r.done() else None))
                done.set()

            leader.client_write_async(put("k", len(tried))).add_done_callback(on_ack)
            assert done.wait(5)
            tried.extend(got)
            return got[0][1] is not None

        wait_until(write_then_read, 10, "a lease read from a write's done-callback")
        assert tried[-1][1] is not None, "the read took a ReadIndex round, not the lease"
        assert all(read.index >= write.index for write, read in tried if read is not None), tried
