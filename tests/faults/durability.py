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
  purge point or the index its state machine restarts at (a snapshot covers
  those);
- snapshot files that read back whole, one of them at or past the purge
  point (the state machine, written without fsync, rebuilds from it).

These catch a missing fsync the moment it matters, on the node that had it,
without waiting for the cluster to turn it into lost writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pyraft.kv import KVStateMachine
from pyraft.kv.statemachine import _SNAP_SUFFIX as KV_SNAPSHOT_SUFFIX  # the files a rebuild tries
from pyraft.kv.statemachine import KV_BOOT_NAME, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, KVReader
from pyraft.snapshot_files import newest_first, read_header
from pyraft.stores.lmdb import SNAPSHOT_DIR_NAME, LmdbLogStore
from pyraft.types import log_index


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
    """A node's durable state, read offline while it is down, as it will find it after the reboot."""

    vote_term: int
    vote_for: int | None
    covered: int              # max(last log index, purge point, the index its state machine restarts at)
    problem: str | None = None


def read_disk(data_dir: str) -> OnDisk:
    """What node data directory ``data_dir`` holds after a power loss (read while the node is down).

    The KV state machine commits without fsync and marks that in ``kv.boot``:
    after the reboot it discards its environment and rebuilds from the newest
    snapshot file that reads whole (without ``kv.boot`` it was closed cleanly
    and keeps it).  Every snapshot file renamed into place must read whole,
    and the state machine must restart at or past the log's purge point, or
    entries in between are gone on this node.
    """
    vote_term, vote_for, last, purged = 0, None, 0, 0
    try:
        with LmdbLogStore.open_readonly(data_dir) as r:
            meta, state = r.meta(), r.log_state()
        if meta.vote is not None:
            vote_term, vote_for = meta.vote.term, meta.vote.node_id
        last, purged = log_index(state.last_log_id), log_index(meta.purged)
    except Exception as e:  # noqa: BLE001 - gone (a lost directory) counts as empty
        if "no LMDB environment" not in str(e):
            return OnDisk(0, None, 0, f"its log store is unreadable: {type(e).__name__}: {e}")
    restarts_at, problem = state_machine_restarts_at(data_dir)
    if problem is None and restarts_at < purged:
        problem = (f"its state machine restarts at index {restarts_at} but its log is purged up to {purged}: "
                   f"entries {restarts_at + 1}..{purged} are gone on this node (it cannot restart)")
    return OnDisk(vote_term, vote_for, max(last, purged, restarts_at), problem)


def state_machine_restarts_at(data_dir: str) -> tuple[int, str | None]:
    """The applied index the KV state machine of ``data_dir`` restarts at after a reboot, and a problem or None."""
    snaps = os.path.join(data_dir, SNAPSHOT_DIR_NAME)
    whole, broken = [], []
    for path in newest_first(snaps, KV_SNAPSHOT_SUFFIX) if os.path.isdir(snaps) else ():
        try:
            with open(path, "rb") as f:
                meta = read_header(f, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, "KV snapshot file")
            KVReader.check_snapshot_file(path, meta)
            whole.append(log_index(meta.last_log_id))
        except Exception as e:  # noqa: BLE001
            broken.append(f"{os.path.basename(path)} ({type(e).__name__}: {e})")
    problem = (f"snapshot files renamed into place do not read whole: {'; '.join(broken)}" if broken else None)
    if os.path.exists(os.path.join(data_dir, KV_BOOT_NAME)):
        return max(whole, default=0), problem  # written without fsync since: rebuilt from a snapshot
    try:
        with KVStateMachine.open_readonly(data_dir) as k:  # closed cleanly (synced): kept
            return log_index(k.status().last_applied), problem
    except Exception as e:  # noqa: BLE001
        if "no LMDB environment" in str(e):
            return 0, problem
        return 0, f"its state machine is unreadable: {type(e).__name__}: {e}"


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
