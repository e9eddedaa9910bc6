"""The Raft RPC messages, as values.

Requests and their responses.  The codec (:mod:`pyraft.codec`) turns them
into msgpack frames carrying the format version and the cluster name; here
they are plain frozen dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .types import Entry, LogId, SnapshotMeta, fast_init


@dataclass(frozen=True, slots=True)
class AppendEntriesRequest:
    """Entries after ``prev_log_id`` (None: from the start of the log).

    ``seq`` is the leader's heartbeat round, echoed in the response; the
    leader uses it to confirm its leadership for ReadIndex.
    """

    term: int
    leader_id: int
    prev_log_id: LogId | None
    entries: tuple[Entry, ...]
    leader_commit: int
    seq: int = 0


@dataclass(frozen=True, slots=True)
class AppendEntriesResponse:
    """``success``: the follower's log now matches the leader's up to ``matched``.

    On rejection, ``rejected`` is the request's prev index and
    (``hint_index``, ``hint_term``) is the follower's last entry at or before
    it whose term is at most the request's prev term: the leader skips a
    whole term per round trip (fast backtracking).
    """

    term: int
    success: bool
    matched: LogId | None = None
    rejected: int = 0
    hint_index: int = 0
    hint_term: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """A (pre-)vote request.  For PreVote ``term`` is the term the candidate would use."""

    term: int
    candidate_id: int
    last_log_id: LogId | None
    pre_vote: bool = False
    transfer: bool = False  # sent after TimeoutNow: ignore the leader lease


@dataclass(frozen=True, slots=True)
class VoteResponse:
    """``last_log_id``: on a refusal, the voter's last log id (None on a grant).  A candidate
    whose log is behind it cannot get that vote, and waits longer before campaigning again."""

    term: int
    granted: bool
    pre_vote: bool = False
    last_log_id: LogId | None = None


@dataclass(frozen=True, slots=True)
class InstallSnapshotRequest:
    """One chunk of a snapshot; ``done`` marks the last one."""

    term: int
    leader_id: int
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True)
class InstallSnapshotResponse:
    """``done``: the snapshot up to ``last_log_id`` is installed (or was already covered)."""

    term: int
    done: bool = False
    last_log_id: LogId | None = None


@dataclass(frozen=True, slots=True)
class TimeoutNowRequest:
    """Leadership transfer: start an election now, ignoring the leader lease."""

    term: int
    leader_id: int


@dataclass(frozen=True, slots=True)
class TimeoutNowResponse:
    term: int


RaftRequest = Union[AppendEntriesRequest, VoteRequest, InstallSnapshotRequest, TimeoutNowRequest]
RaftResponse = Union[AppendEntriesResponse, VoteResponse, InstallSnapshotResponse, TimeoutNowResponse]
RaftMessage = Union[RaftRequest, RaftResponse]

fast_init(AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse, InstallSnapshotRequest,
          InstallSnapshotResponse, TimeoutNowRequest, TimeoutNowResponse)
