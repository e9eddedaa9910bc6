"""Offline recovery: start a new cluster from a backup, or from the survivor of a lost quorum.

Both functions work on a node's stores while no :class:`~pyraft.Raft` runs
on them (``pyraft-kv restore`` and ``pyraft-kv serve --force-new-cluster``
call them before the node starts).  They write only through the storage
interfaces (:mod:`pyraft.storage`), so they work with any ``LogStore`` and
``StateMachine``.

The log ids, and why every member agrees
----------------------------------------

:func:`restore_snapshot` makes a pristine node hold a backup's snapshot as
its whole state, at the snapshot's own last log id ``L = (T, I)``, with a
new membership: the state machine gets the snapshot (applied = L, the
membership recorded at L), the log store gets ``PurgeLog(L)`` (the log is
empty, its last log id L), ``SaveCommitted(L)`` and the vote ``(T, none)``.
Every node restored from the same file with the same members holds exactly
that, so they agree on every index up to I (all of it is the snapshot) and
on the configuration.  Keeping I keeps the log indexes (the KV revisions)
growing past every index the data already carries; setting the term to T
makes the first election run in term T + 1, so that new entries continue
the log in a higher term than the snapshot's (terms never decrease along a
log, and the engine refuses entries that break that).  A node added later
gets the snapshot from the leader, as any lagging node does.

:func:`force_new_cluster` (etcd's ``--force-new-cluster``, hashicorp/raft's
``RecoverCluster``) appends one membership entry naming this node alone, at
``(T', last + 1)`` with ``T'`` one above every term the node has seen, votes
for itself in T' and saves the commit point at that entry, all in one
durable write.  The engine trusts a saved commit point where its log holds
an entry of that term, so on start the node takes every entry up to the new
one as committed, applies them, and campaigns alone in T' + 1.  The fresh
term is what keeps the Log Matching property: no other node can hold a
different entry at that index in T', since none was ever leader in it.
The price (documented in docs/operations.md): entries the survivor had
that were never committed become committed.
"""
from __future__ import annotations

import logging
from typing import Any, BinaryIO, Iterable

from .engine.commands import AppendToLog, PurgeLog, SaveCommitted, SaveVote
from .errors import RaftError
from .runtime.core import restore_state
from .types import Entry, EntryKind, LogId, Membership, Node, SnapshotMeta, StoredMembership, Vote, log_index

__all__ = ["RecoveryError", "ForcedCluster", "restore_snapshot", "force_new_cluster"]

log = logging.getLogger("pyraft.recovery")


class RecoveryError(RaftError):
    """The stores are not in a state the recovery step can start from."""


def _is_pristine(log_store: Any, state_machine: Any) -> bool:
    ls = log_store.log_state()
    return (log_store.read_vote() is None and ls.last_log_id is None and ls.last_purged is None
            and state_machine.applied_state() == (None, None) and state_machine.current_snapshot() is None)


def restore_snapshot(log_store: Any, state_machine: Any, meta: SnapshotMeta, chunks: Iterable[bytes],
                     members: dict[int, Node]) -> SnapshotMeta:
    """Make a pristine node hold the snapshot ``chunks`` (of ``meta``) as a member of ``members``.

    Returns the meta the node now holds (``meta``'s last log id, the new
    membership at it).  RecoveryError when the stores are not pristine or
    the snapshot covers nothing; the state machine's ``install_snapshot``
    raises (CodecError) for a snapshot it does not accept.
    """
    lid = meta.last_log_id
    if lid is None:
        raise RecoveryError("the snapshot covers no log entry: there is nothing to restore")
    if not members:
        raise RecoveryError("the new cluster needs at least one member")
    if not _is_pristine(log_store, state_machine):
        raise RecoveryError("the node's stores are not empty: restore only into a new data directory")
    new = SnapshotMeta(lid, StoredMembership(lid, Membership.of(dict(members))), f"restored-{meta.snapshot_id}")
    f: BinaryIO = state_machine.begin_receiving_snapshot()
    try:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        f.seek(0)
    except BaseException:
        f.close()
        raise
    state_machine.install_snapshot(new, f)  # closes f
    log_store.write([SaveVote(Vote(lid.term, None)), PurgeLog(lid), SaveCommitted(lid)])
    return new


class ForcedCluster:
    """What :func:`force_new_cluster` did: the new membership entry and the entries it made committed."""

    __slots__ = ("entry", "committed_before", "last_before")

    def __init__(self, entry: LogId, committed_before: LogId | None, last_before: LogId | None) -> None:
        self.entry = entry
        self.committed_before = committed_before
        self.last_before = last_before

    @property
    def newly_committed(self) -> int:
        """How many entries the node had that it did not know to be committed, and now are."""
        return max(0, log_index(self.last_before) - log_index(self.committed_before))


def force_new_cluster(log_store: Any, state_machine: Any, node_id: int, node: Node) -> ForcedCluster | None:
    """Rewrite the membership of a stopped node to ``node_id`` alone, keeping its data.

    None when it already is a one-member cluster of itself (the call is
    idempotent).  RecoveryError for a pristine node (it has no data to keep).
    See the module docstring for the log ids.
    """
    restored = restore_state(log_store, state_machine)
    if not restored.memberships:
        raise RecoveryError(f"node {node_id} has no membership (a new node?): there is nothing to recover; "
                            f"start a new cluster with --init instead")
    current = restored.memberships[-1].membership
    if not current.is_joint and current.configs[0] == frozenset({node_id}) and set(current.nodes) == {node_id}:
        return None
    old = current.nodes.get(node_id)
    me = Node(node.addr, node.data if node.data is not None else (old.data if old is not None else None))
    vote = restored.vote or Vote(0, None)
    last = restored.last_log_id
    term = max(vote.term, last.term if last is not None else 0) + 1
    lid = LogId(term, log_index(last) + 1)
    entry = Entry(lid, EntryKind.MEMBERSHIP, Membership.of({node_id: me}))
    log_store.write([SaveVote(Vote(term, node_id)), AppendToLog([entry]), SaveCommitted(lid)])
    known = max((x for x in (restored.committed, restored.applied) if x is not None),
                key=lambda x: x.index, default=None)
    return ForcedCluster(lid, known, last)
