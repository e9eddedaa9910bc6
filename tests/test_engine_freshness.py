"""Replies that arrive late, twice, or from an earlier run of their sender (issue 16).

The shipped transports carry a reply back over the requesting worker's own
connection, which dies with its term and its process; the engine must not
lean on that.  Each test here drives the simulation harness's manual mode
(``sim.cluster.Sim(manual=True)``), holds a message or a flush back by hand
and lets it through when it can do the most harm.  The harness checks every
Figure 3 invariant after every event as well.
"""
from __future__ import annotations

import pytest

from pyraft.engine.commands import Respond
from pyraft.messages import AppendEntriesRequest, InstallSnapshotRequest, InstallSnapshotResponse
from pyraft.types import Entry, EntryKind, LogId, ServerState, SnapshotMeta, Vote

from sim.cluster import Sim
from test_raft_paper import cluster, elect, engine, propose, settle

pytestmark = pytest.mark.timeout(60)

LEADER = ServerState.LEADER


def holders(sim: Sim, lid: LogId) -> list[int]:
    """The nodes whose durable log holds ``lid``."""
    return [i for i, n in sim.nodes.items() if n.d_log.term_at(lid.index) == lid.term]


def test_a_delayed_append_entries_ack_answers_with_the_term_of_its_request():
    """Figure 2: a follower's reply carries the term of the request it answers.  A follower whose disk
    is slow holds its acknowledgement until the entries are flushed; if its term changes meanwhile, the
    late acknowledgement still speaks of the old leader's entries.  Stamped with the new term, it made
    a new leader of that term record entries its own log did not hold, and commit an entry that only
    2 of 5 servers held (issue 16, bug 1)."""
    sim = cluster(5)
    f = 2
    # (a) leader 1 (term 1) streams x, y, z to follower 2 only, whose disk is slow.
    sim.blocked |= {(1, i) for i in (3, 4, 5)}
    sim.hold_flush = {f}
    propose(sim, 1, "x", "y", "z")
    sim.stabilize()
    assert sim.engine(f).log.last.index == sim.engine(1).log.last.index
    # (b) node 3 wins term 2 with 4 and 5, and overwrites those indexes on node 1 (not on 2).
    sim.heal()
    sim.blocked |= {(3, f), (f, 3)}
    sim.crash(1)
    sim.restart(1)
    sim.stabilize()
    elect(sim, 3)
    assert sim.engine(3).current_term == 2
    # (c) node 1 wins term 3 with node 2's vote (node 1's last entry is of term 2, node 2's of term 1).
    sim.heal()
    sim.isolate(3)
    sim.isolate(5)
    sim.on_send = lambda s, d, m: not (s == 1 and d == f and isinstance(m, AppendEntriesRequest))
    sim.skip(1.0)
    sim.call(1, lambda e: e.trigger_elect())
    sim.stabilize()
    e1 = sim.engine(1)
    assert e1.state is LEADER and e1.current_term == 3
    assert sim.nodes[f].d_vote == Vote(3, 1)
    # (d) node 2's disk catches up: its acknowledgement of term 1's entries goes out now.
    sim.hold_flush = set()
    sim.flush(f)
    sim.stabilize()
    settle(sim)
    # Whatever node 1 believes node 2 holds is in node 1's log, and on node 2's disk.
    m = e1.progress[f].matched
    assert m is None or (e1.log.term_at(m.index) == m.term and sim.nodes[f].d_log.term_at(m.index) == m.term)
    c = e1.committed
    assert len(holders(sim, c)) >= 3, f"{c} committed but durable only on {holders(sim, c)}"


def test_a_stale_term_refusal_never_confirms_a_read_of_a_later_run():
    """Thesis §6.4: a ReadIndex read is served once a quorum has answered a heartbeat *sent after the
    read started*.  The heartbeat round counter restarts at 0 with the process, and a follower that
    refuses a request of an old term answered with its own (current) term and echoed the old round:
    a re-elected leader took that as a fresh acknowledgement, and after being cut off it served a read
    that missed a commit the new majority had made meanwhile (issue 16, bug 2)."""
    sim = cluster(3)
    for _ in range(3):   # heartbeat rounds 1..3 of node 1's first run
        tok = sim.read_index(1)
        sim.stabilize()
        assert sim.reads_done[tok].ok
    late = []
    sim.on_send = lambda s, d, m: not (s == 1 and d == 2 and isinstance(m, AppendEntriesRequest)
                                       and m.seq == 3 and not late.append(m))
    sim.call(1, lambda e: e.trigger_heartbeat())
    sim.stabilize()
    assert late, "a heartbeat of round 3 is held back"
    sim.on_send = None
    # Node 1 restarts (round counter back to 0) and is elected again, in term 2.
    sim.crash(1)
    sim.restart(1)
    elect(sim, 1)
    assert sim.engine(1).current_term == 2
    # The round-3 heartbeat of term 1 reaches node 2 only now: node 2 refuses it (term 1 < 2).
    sim._deliver(1, 2, late[0], None, False)
    sim.stabilize()
    # Node 1 is cut off; nodes 2 and 3 elect node 2 and commit a write.
    sim.isolate(1)
    sim.skip(0.2)   # their leader lease expires; node 1's CheckQuorum window (0.3 s) does not
    sim.call(2, lambda e: e.trigger_elect())
    sim.stabilize()
    assert sim.engine(2).state is LEADER
    propose(sim, 2, "new")
    settle(sim)
    # A read on node 1 must not be confirmed by node 2's refusal of round 3 (the harness fails a read
    # whose index is below what was committed when it started).
    tok = sim.read_index(1)
    sim.stabilize()
    assert tok not in sim.reads_done or not sim.reads_done[tok].ok


def test_a_snapshot_already_covered_by_the_commit_point_is_acknowledged_only_as_far_as_the_disk():
    """A follower's commit point may run ahead of its flushes (the leader's commit index covers entries
    still in our write buffer).  An InstallSnapshot it already covers was answered "done up to the
    snapshot's last entry", and the leader counted as held entries this follower's disk did not have
    (found by the simulation's check that a follower really holds what it acknowledged)."""
    e = engine(2, [1, 1], vote=Vote(1, None))             # entries 2..3, on disk
    ents = tuple(Entry(LogId(1, i), EntryKind.NORMAL, i) for i in (4, 5))
    e.step(1, AppendEntriesRequest(1, 1, LogId(1, 3), ents, 5), token="ae")
    e.take_output()                                        # entries 4..5 are not flushed yet
    assert e.committed == LogId(1, 5) and e.flushed == LogId(1, 3)
    snap = SnapshotMeta(LogId(1, 5), None, "s")
    e.step(1, InstallSnapshotRequest(1, 1, snap, 0, b"", True), token="snap")
    (reply,) = [c.message for c in e.take_output() if isinstance(c, Respond) and c.token == "snap"]
    assert reply == InstallSnapshotResponse(1, True, LogId(1, 3))
