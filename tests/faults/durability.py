"""What a node must still hold after it loses power: the checks made at every power cut.

A node publishes its metrics (term, vote, commit index) only after the writes
of that turn returned, fsynced; a follower acknowledges entries only once they
are on its disk, and the leader's ``replication`` shows what each follower
acknowledged.  So, read just before the power goes (for followers, from the
leader once they are dead), this is a floor under what each node's disk must
hold afterwards, read offline before the node restarts:

- its vote: the same term and candidate, or a later term (Raft's persistent
  ``currentTerm`` and ``votedFor``);
- every entry it acknowledged or knew committed: in its log, or below its
  purge point or applied index (a snapshot covers those);
- a current snapshot whose file exists and reads back whole.

These catch a missing fsync the moment it matters, on the node that had it,
without waiting for the cluster to turn it into lost writes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Floor:
    """The least node ``node``'s disk must hold after a power loss, and where each part was read."""

    node: int
    vote_term: int = 0
    vote_for: int | None = None
    index: int = 0            # entries 1..index must survive (in the log, or covered by purge/applied)
    index_why: str = ""


def floor_from(node: int, own: dict | None, leader: dict | None) -> Floor:
    """The floor of ``node`` from its own metrics (``own``) and the leader's (``leader``), either may be None."""
    vote = (own or {}).get("vote") or {}
    term, voted = vote.get("term") or 0, vote.get("node_id")
    index, why = 0, ""
    if own and own.get("committed"):
        index, why = own["committed"][1], "its own commit index"
    if leader and leader.get("committed") and leader["id"] != node:
        matched = (leader.get("replication") or {}).get(str(node))
        if matched:
            acked = min(matched[1], leader["committed"][1])
            if acked > index:
                index, why = acked, f"acknowledged to leader {leader['id']} and committed"
    return Floor(node, term, voted, index, why)


@dataclass(frozen=True, slots=True)
class OnDisk:
    """A node's durable state, read offline while it is down."""

    vote_term: int
    vote_for: int | None
    covered: int              # max(last log index, purge point, applied index)
    problem: str | None = None


def read_disk(data_dir: str) -> OnDisk:
    from pyraft.kv import KVStateMachine
    from pyraft.kv.statemachine import KVReader
    from pyraft.stores.lmdb import LmdbLogStore
    from pyraft.types import log_index
    vote_term, vote_for, covered = 0, None, 0
    try:
        with LmdbLogStore.open_readonly(data_dir) as r:
            meta, state = r.meta(), r.log_state()
        if meta.vote is not None:
            vote_term, vote_for = meta.vote.term, meta.vote.node_id
        covered = max(log_index(state.last_log_id), log_index(meta.purged))
    except Exception as e:  # noqa: BLE001 - gone (a lost directory) counts as empty
        if "no LMDB environment" not in str(e):
            return OnDisk(0, None, 0, f"its log store is unreadable: {type(e).__name__}: {e}")
    try:
        with KVStateMachine.open_readonly(data_dir) as k:
            st = k.status()
        covered = max(covered, log_index(st.last_applied))
        if st.snapshot is not None:
            KVReader.check_snapshot_file(st.snapshot_file, st.snapshot)
    except Exception as e:  # noqa: BLE001
        if "no LMDB environment" not in str(e):
            return OnDisk(vote_term, vote_for, covered, f"its state machine or current snapshot is unreadable: "
                                                        f"{type(e).__name__}: {e}")
    return OnDisk(vote_term, vote_for, covered)


def check(floor: Floor, disk: OnDisk) -> list[str]:
    """What ``disk`` lost of ``floor`` (empty when nothing)."""
    out = []
    n = floor.node
    if disk.problem:
        out.append(f"node {n} after a power loss: {disk.problem}")
    if disk.vote_term < floor.vote_term:
        out.append(f"node {n} after a power loss: its term went back from {floor.vote_term} to {disk.vote_term} "
                   f"(a vote or term it had used was not on disk)")
    elif (disk.vote_term == floor.vote_term and floor.vote_for is not None
          and disk.vote_for != floor.vote_for):
        out.append(f"node {n} after a power loss: its vote in term {floor.vote_term} changed from node "
                   f"{floor.vote_for} to {disk.vote_for} (the vote was not on disk)")
    if disk.covered < floor.index:
        out.append(f"node {n} after a power loss: entries {disk.covered + 1}..{floor.index} are gone "
                   f"({floor.index_why}: they were reported durable)")
    return out
