"""Values the Raft handle returns: metrics and write responses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .types import LogId, Membership, ServerState, Vote, new_object, slot_setter


@dataclass(frozen=True, slots=True)
class ClientWriteResponse:
    """A committed, applied write: where it sits in the log and what the state machine returned."""

    log_id: LogId
    result: Any


# The SM worker makes one response per applied write: built without the frozen dataclass
# __init__ (types.FAST_BUILD has the reasoning), while the class checks nothing on construction.
_FAST_RESPONSE = not hasattr(ClientWriteResponse, "__post_init__")
_set_response_log_id = slot_setter(ClientWriteResponse, "log_id")
_set_response_result = slot_setter(ClientWriteResponse, "result")


def write_response(log_id: LogId, result: Any) -> ClientWriteResponse:
    """``ClientWriteResponse(log_id, result)``, built faster."""
    if not _FAST_RESPONSE:
        return ClientWriteResponse(log_id, result)
    r = new_object(ClientWriteResponse)
    _set_response_log_id(r, log_id)
    _set_response_result(r, result)
    return r


@dataclass(frozen=True, slots=True)
class RaftMetrics:
    """A consistent snapshot of one node's state, published by RaftCore after each loop turn.

    ``raft.metrics()`` gives it with ``last_applied`` as the state machine's when
    read (never past ``committed``): a write whose answer came shows as applied.
    """

    id: int
    state: ServerState
    current_term: int
    vote: Vote
    last_log_index: int
    committed: LogId | None
    last_applied: LogId | None
    snapshot: LogId | None
    purged: LogId | None
    current_leader: int | None
    membership: Membership | None
    #: the log id of the entry that carried ``membership`` (None: the initial one)
    membership_log_id: LogId | None = None
    #: on the leader: each target's matched log id
    replication: Mapping[int, LogId | None] = field(default_factory=dict)
    #: why the node stopped, when ``state`` is Fatal
    error: str | None = None
    #: frames dropped by the transport, and similar counters
    counters: Mapping[str, int] = field(default_factory=dict)
    #: on the leader: why a replication target cannot be reached (its connection
    #: failed, and the worker retries with back-off; or another node answers at its
    #: address), for each target that has such an error
    replication_errors: Mapping[int, str] = field(default_factory=dict)

    @property
    def membership_committed(self) -> bool:
        """True when the effective membership's entry is committed."""
        if self.membership_log_id is None:
            return self.membership is not None
        return self.committed is not None and self.committed.index >= self.membership_log_id.index

    def to_dict(self) -> dict:
        def lid(l: LogId | None):
            return None if l is None else [l.term, l.index]
        m = self.membership
        return {
            "id": self.id,
            "state": str(self.state),
            "current_term": self.current_term,
            "vote": {"term": self.vote.term, "node_id": self.vote.node_id},
            "last_log_index": self.last_log_index,
            "committed": lid(self.committed),
            "last_applied": lid(self.last_applied),
            "snapshot": lid(self.snapshot),
            "purged": lid(self.purged),
            "current_leader": self.current_leader,
            "membership": None if m is None else {
                "configs": [sorted(c) for c in m.configs],
                "voters": sorted(m.voter_ids),
                "learners": sorted(m.learner_ids),
                "nodes": {str(k): v.addr for k, v in sorted(m.nodes.items())},
            },
            "membership_log_id": lid(self.membership_log_id),
            "replication": {str(k): lid(v) for k, v in sorted(self.replication.items())},
            "error": self.error,
            "counters": dict(self.counters),
            "replication_errors": {str(k): v for k, v in sorted(self.replication_errors.items())},
        }
