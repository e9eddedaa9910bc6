"""Messages the engine refuses: what no correct peer sends (h11's ``RemoteProtocolError``).

Raft assumes honest peers; the network a node listens on is not.  Every
message is checked here, before it can change anything, against the rules
a correct peer keeps.  A message that breaks one raises
:class:`~pyraft.errors.RemoteProtocolError` with a short ``reason`` (the
runtime counts it as ``refused_<reason>``) and the node goes on serving.
Nothing here asserts: an ``assert`` on what a peer sent is a crash waiting
for a peer to send it.

What is not refused is what an honest peer may send in a faulty network: a
late, duplicated or reordered message, a reply from an earlier run of its
sender.  The handlers in :mod:`.core` make those harmless.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import RemoteProtocolError
from ..messages import (AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
                        InstallSnapshotResponse, TimeoutNowRequest, TimeoutNowResponse, VoteRequest,
                        VoteResponse)
from ..types import LogId, ServerState

_LEADER = ServerState.LEADER  # (a global: an Enum class attribute costs several times more)

if TYPE_CHECKING:
    from .core import Engine

#: The largest term a node enters.  The wire format carries terms up to 2**63 - 1 (msgpack's
#: signed 64 bits); a node must be able to campaign in the term after any term it stores, so a
#: term with no successor the format carries is refused.  Without this, one forged VoteRequest
#: with term 2**63 - 1 (and ``transfer`` set, which passes the leader lease) made every node
#: store a term it could never campaign past, for good, restarts included.
MAX_TERM = 2**63 - 2

#: How far ahead of its own term a message may be.  Honest terms grow by one per campaign: no
#: real cluster runs 2**32 elections (one every 150 ms for twenty years) while a node is away.
#: A forged term just below :data:`MAX_TERM` would leave the cluster a single election before it
#: runs out of terms; with this bound a forger needs some 2**31 accepted messages to get there.
MAX_TERM_STEP = 2**32

_KNOWN = (AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse, InstallSnapshotRequest,
          InstallSnapshotResponse, TimeoutNowRequest, TimeoutNowResponse)


def _refuse(reason: str, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(reason, message)


def check_message(e: "Engine", from_id: int, msg: Any) -> None:
    """Raise RemoteProtocolError if ``msg`` (from ``from_id``) breaks a rule every correct peer keeps."""
    t = type(msg)
    if t not in _KNOWN:
        raise _refuse("unknown_message", f"the engine handles no {t.__name__}")
    term = msg.term
    if term > MAX_TERM:
        raise _refuse("term_overflow", f"term {term} has no successor the wire format can carry")
    if term > e.vote.term + MAX_TERM_STEP:
        raise _refuse("term_jump", f"term {term} is more than {MAX_TERM_STEP} terms ahead of ours ({e.vote.term})")
    if t is AppendEntriesRequest:
        _check_sender(from_id, msg.leader_id)
        _check_append_entries(e, msg)
    elif t is InstallSnapshotRequest:
        _check_sender(from_id, msg.leader_id)
        _check_snapshot(e, msg)
    elif t is VoteRequest:
        _check_sender(from_id, msg.candidate_id)
        _check_not_from_future(msg.last_log_id, term, "the candidate's last log id")
    elif t is TimeoutNowRequest:
        _check_sender(from_id, msg.leader_id)
        _check_one_leader(e, msg.term, msg.leader_id)
    elif t is VoteResponse:
        _check_not_from_future(msg.last_log_id, term, "the voter's last log id")
    elif t is AppendEntriesResponse:
        if msg.success and msg.matched is not None:
            _check_in_leader_log(e, term, msg.matched, "acknowledges")
    elif t is InstallSnapshotResponse:
        if msg.done and msg.last_log_id is not None:
            _check_in_leader_log(e, term, msg.last_log_id, "reports a snapshot at")


def _check_sender(from_id: int, claimed: int) -> None:
    # The transport names the sender (under CURVE, the key's node); a request speaking for another
    # node is forged.  A request claiming to come from this very node has from_id == our id, and
    # step() drops those before they get here.
    if claimed != from_id:
        raise _refuse("forged_sender", f"a request from node {from_id} claims to come from node {claimed}")


def _check_not_from_future(lid: LogId | None, term: int, what: str) -> None:
    if lid is not None and lid.term > term:
        raise _refuse("term_from_future", f"{what} {lid} is of a term after the message's ({term})")


def _check_one_leader(e: "Engine", term: int, leader_id: int) -> None:
    """Election Safety: one leader per term.  A second one is a forgery (or a broken peer)."""
    if term != e.vote.term:
        return  # older: refused by step(); newer: we learn the term and its leader
    if e.state == _LEADER or e.led_term == term:
        raise _refuse("two_leaders", f"node {leader_id} claims to lead term {term}, which node {e.id} leads")
    if e.leader_id is not None and e.leader_id != leader_id:
        raise _refuse("two_leaders", f"node {leader_id} claims to lead term {term}, which node {e.leader_id} leads")


def _check_committed_prefix(e: "Engine", lid: LogId | None) -> None:
    """An entry at or below our commit point must be ours: a leader's log holds every committed entry."""
    if lid is None:
        return
    floor = max(e.committed.index if e.committed else 0, e.log.purged_index)
    if lid.index <= floor:
        mine = e.log.term_at(lid.index)
        if mine is not None and mine != lid.term:
            raise _refuse("conflicts_with_committed",
                          f"{lid} conflicts with committed entry {LogId(mine, lid.index)} of node {e.id}")


def _check_append_entries(e: "Engine", msg: AppendEntriesRequest) -> None:
    prev = msg.prev_log_id
    term = msg.term
    _check_not_from_future(prev, term, "prev_log_id")
    t = prev.term if prev is not None else 0
    i = prev.index if prev is not None else 0
    for ent in msg.entries:  # (every message a follower gets passes here: one attribute read per entry)
        lid = ent.log_id
        i += 1
        if lid.index != i or lid.term < t:
            raise _refuse("entries_out_of_order", f"entry {lid} does not follow {LogId(t, i - 1)}")
        t = lid.term
    if t > term:  # terms never decrease along the entries: the last one is the newest
        raise _refuse("term_from_future", f"entry {msg.entries[-1].log_id} is of a term after the leader's ({term})")
    if msg.term < e.vote.term:
        return  # refused with our term; nothing else about it matters
    _check_one_leader(e, msg.term, msg.leader_id)
    # Where the message overlaps our committed prefix it must agree with it.  Not a case for a
    # rejection (a leader retries lower, for ever): no correct leader lacks a committed entry, and
    # an entry appended there would break the log's term order.
    _check_committed_prefix(e, prev)
    floor = max(e.committed.index if e.committed else 0, e.log.purged_index)
    for ent in msg.entries:
        if ent.index > floor:
            break
        _check_committed_prefix(e, ent.log_id)


def _check_snapshot(e: "Engine", msg: InstallSnapshotRequest) -> None:
    last = msg.meta.last_log_id
    _check_not_from_future(last, msg.term, "the snapshot's last log id")
    sm = msg.meta.last_membership
    if sm is not None and sm.log_id is not None and (last is None or sm.log_id > last):
        raise _refuse("bad_snapshot_meta", f"the snapshot's membership {sm.log_id} is after its last entry {last}")
    if msg.term < e.vote.term:
        return
    _check_one_leader(e, msg.term, msg.leader_id)
    _check_committed_prefix(e, last)


def _check_in_leader_log(e: "Engine", term: int, lid: LogId, what: str) -> None:
    """A success reply to this leader's term names an entry of this leader's log (or one it purged)."""
    if term != e.vote.term or e.state != _LEADER:
        return  # not for us: step() drops it (or learns a newer term from it)
    if lid.index > e.log.last_index or (lid.index >= e.log.purged_index and e.log.term_at(lid.index) != lid.term):
        raise _refuse("ack_beyond_log", f"a reply {what} {lid}, which leader {e.id}'s log (last {e.log.last}) "
                                        f"does not hold")
