"""Every error pyraft raises subclasses :class:`RaftError`.

The layers follow openraft: :class:`Fatal` means this node is dead (a storage
or thread failure; restart it); :class:`ForwardToLeader` means "retry
elsewhere"; :class:`Timeout` means the outcome is unknown; the rest say that
the request itself was wrong.
"""
from __future__ import annotations

from typing import Any


class RaftError(Exception):
    """Base class of every error raised by pyraft."""


class ForwardToLeader(RaftError):
    """This node is not the leader; ``leader_id``/``leader_node`` hint where to go (may be None)."""

    def __init__(self, leader_id: int | None = None, leader_node: Any = None, message: str | None = None):
        self.leader_id = leader_id
        self.leader_node = leader_node
        super().__init__(message or f"not the leader; current leader: {leader_id}")

    def __reduce__(self):
        return (type(self), (self.leader_id, self.leader_node, str(self)))


class Timeout(RaftError):
    """The operation did not finish in time; its outcome is unknown."""


class ShutDown(RaftError):
    """The node has been shut down."""


class Fatal(RaftError):
    """The node stopped because of an unrecoverable failure (storage, a dead thread)."""


class ChangeMembershipError(RaftError):
    """A membership change was refused: one is in progress, the voter set is empty, or a voter is not a learner yet."""

    #: set when the refusal is only that new voters have not caught up yet: node id -> entries
    #: behind the commit point (``Raft.change_membership`` waits for them and retries)
    lagging: dict[int, int] | None = None


class InitializeError(RaftError):
    """``initialize`` was called on a node that is not pristine, or with a bad membership."""


class QuorumNotEnough(RaftError):
    """The leader could not confirm a quorum (for example for a linearizable read)."""


class RemoteProtocolError(RaftError, ValueError):
    """A peer's message breaks a Raft rule that no correct peer breaks; it was refused (h11's word).

    The engine raises it *before* the message changes anything, so the node
    keeps serving: a second leader in one term, a term it could not increment
    and encode, entries out of order or at odds with committed ones, a reply
    claiming entries the leader never sent.  ``reason`` is a short snake_case
    name; the runtime counts each refusal as the metrics counter
    ``refused_<reason>``.  A ``ValueError`` too, so that code catching that
    (as RaftCore did) keeps working.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.reason, str(self)))


class CodecError(RaftError):
    """Bytes that are not a valid pyraft frame: malformed, truncated, wrong type, version or cluster."""


class StorageError(RaftError):
    """A store cannot be opened or used (wrong directory, locked, wrong cluster or node, bad version)."""


class PermissionDenied(RaftError):
    """The caller's CURVE key does not carry the role this request needs (reader < client < admin)."""


class Overloaded(RaftError):
    """The node has ``Config.max_pending_writes`` writes in flight already; retry later (nothing was proposed)."""


class NoSpace(RaftError):
    """The store is past its size quota: writes that add data are refused; reads, deletes and compaction work."""


class Compacted(RaftError):
    """The requested revision was compacted away (a watch's ``start_revision``, a read at an old revision)."""


class LeaseNotFound(RaftError):
    """The KV lease does not exist: never granted, revoked, or expired (etcd's ErrLeaseNotFound)."""

    def __eq__(self, other: object) -> bool:  # a command's result: compared by value, as KVCommandError
        return type(other) is type(self) and other.args == self.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class ResultNotKept(RaftError):
    """A retried KV write was applied before, but its result was too large to keep for a retry.

    The message names the revision (log index) it was applied at and, for a
    txn, whether its compares held: read the keys again for the rest.
    """

    def __eq__(self, other: object) -> bool:  # a command's result: compared by value, as KVCommandError
        return type(other) is type(self) and other.args == self.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class RequestTooLarge(RaftError):
    """A client request's frame is larger than the node accepts (``ZmqTransport(max_client_frame_size=...)``)."""
