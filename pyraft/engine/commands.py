"""What the engine asks its runtime to do: commands are verbs.

The engine returns a list of commands from ``Engine.take_output()``.  The
runtime executes them **in order**, with one freedom: it may gather the
storage commands (``SaveVote``, ``AppendToLog``, ``TruncateLog``,
``PurgeLog``, ``SaveCommitted``) of one output into a single durable batch
executed *before* the other commands of that output.  Moving a write earlier
never breaks an ordering rule; moving a send earlier would.

Ordering contract (etcd-raft's ``Ready`` rule, written where it is enforced):

* A ``SaveVote`` is durable before any later command is executed: no vote is
  granted (``Respond``) or requested (``SendVote``) before the vote is on disk.
* ``AppendToLog`` entries are durable before the runtime reports them with
  ``Engine.on_log_flushed``; the engine acknowledges entries to a leader, and
  a leader counts itself in a quorum, only after that report.
* ``Replicate`` sends entries appended by an earlier ``AppendToLog`` (the
  runtime reads them from the log store, or from its cache of the newest
  entries).  The runtime may send them before that ``AppendToLog`` is durable
  *here* (a leader writes to its disk in parallel with replicating, Raft
  thesis 10.2.1): the engine counts the leader in a quorum only after
  ``on_log_flushed``.  It must not move a send ahead of a ``SaveVote``,
  ``TruncateLog`` or ``PurgeLog``.
* ``Apply`` covers committed entries only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..messages import VoteRequest, TimeoutNowRequest
from ..types import Entry, LogId, Node, SnapshotMeta, Vote, fast_init


# --- storage: executed by RaftCore through LogStore.write -------------------

@dataclass(frozen=True, slots=True)
class SaveVote:
    """Persist the vote.  Durable before any later command runs."""

    vote: Vote


@dataclass(frozen=True, slots=True)
class AppendToLog:
    """Append ``entries`` (consecutive, continuing the log).  Report durability with ``on_log_flushed``.

    ``encoded``: None from the engine.  The runtime may hand the store a copy
    carrying each entry's stored encoding (``codec.encode_entry(e)``, one per
    entry) when it already has them (a leader's client commands, a follower's
    AppendEntries), so that the store does not encode them again.
    """

    entries: list[Entry] = field(default_factory=list)
    encoded: list[bytes] | None = None


@dataclass(frozen=True, slots=True)
class TruncateLog:
    """Delete every entry with index >= ``since`` (never a committed one)."""

    since: int


@dataclass(frozen=True, slots=True)
class PurgeLog:
    """Delete every entry with index <= ``upto.index`` (all of them are in a snapshot)."""

    upto: LogId


@dataclass(frozen=True, slots=True)
class SaveCommitted:
    """Persist the committed log id (lets a restarted node apply without waiting for a leader)."""

    log_id: LogId


# --- network ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Replicate:
    """Send ``target`` an AppendEntries of term ``term`` with the entries after ``prev_log_id`` up to ``end`` (exclusive).

    ``end == index(prev_log_id) + 1`` is a heartbeat (no entries).  The
    sender reads the entries from the log store, may split them into several
    messages by size, and must drop the send if any entry read has a term
    greater than ``term`` (the log changed under a stale leader).  Every
    response goes back to ``Engine.step``; a failure to send to
    ``Engine.on_replication_failed``.
    """

    target: int
    term: int
    prev_log_id: LogId | None
    end: int
    leader_commit: int
    seq: int


@dataclass(frozen=True, slots=True)
class SendSnapshot:
    """Stream the current snapshot (``meta``) to ``target`` in chunks, with term ``term``.

    The final response (``done=True``) goes back to ``Engine.step``; a
    failure to ``Engine.on_replication_failed``.
    """

    target: int
    term: int
    meta: SnapshotMeta


@dataclass(frozen=True, slots=True)
class SendVote:
    """Send ``request`` to each of ``targets``; each response goes back to ``Engine.step``."""

    targets: tuple[int, ...]
    request: VoteRequest


@dataclass(frozen=True, slots=True)
class SendTimeoutNow:
    """Tell ``target`` to start an election now (leadership transfer)."""

    target: int
    request: TimeoutNowRequest


@dataclass(frozen=True, slots=True)
class Respond:
    """Reply ``message`` to the request that came with ``token``."""

    token: Any
    message: Any


@dataclass(frozen=True, slots=True)
class UpdateReplication:
    """The replication targets this node should now run (empty: none; it is not leading).

    The runtime starts a worker for each new target and stops the workers of
    targets no longer listed (or whose term changed).
    """

    term: int
    targets: Mapping[int, Node]


# --- state machine ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Apply:
    """Apply the committed entries after the last applied one, up to and including ``upto``.

    Report progress with ``Engine.on_applied``.
    """

    upto: LogId


@dataclass(frozen=True, slots=True)
class BuildSnapshot:
    """Build a snapshot of the state machine; report it with ``Engine.on_snapshot_built``."""


@dataclass(frozen=True, slots=True)
class ReceiveSnapshotChunk:
    """Write this chunk of a snapshot from the leader into the file being received.

    ``request.offset == 0`` starts a new file (dropping any partial one).
    """

    request: Any  # InstallSnapshotRequest


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """Install the fully received snapshot ``meta`` into the state machine.

    Report completion with ``Engine.on_snapshot_installed(meta, token)``.
    """

    meta: SnapshotMeta
    token: Any


# --- clients ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RespondRead:
    """A ReadIndex request completed.

    ``read_log_id`` is the log id the state machine must reach before the
    read; on failure it is None and ``leader_id`` hints where to go.
    """

    token: Any
    read_log_id: LogId | None
    ok: bool
    leader_id: int | None = None


Command = (SaveVote | AppendToLog | TruncateLog | PurgeLog | SaveCommitted | Replicate | SendSnapshot
           | SendVote | SendTimeoutNow | Respond | UpdateReplication | Apply | BuildSnapshot
           | ReceiveSnapshotChunk | InstallSnapshot | RespondRead)

STORAGE_COMMANDS = (SaveVote, AppendToLog, TruncateLog, PurgeLog, SaveCommitted)

fast_init(SaveVote, AppendToLog, TruncateLog, PurgeLog, SaveCommitted, Replicate, SendSnapshot, SendVote,
          SendTimeoutNow, Respond, UpdateReplication, Apply, BuildSnapshot, ReceiveSnapshotChunk, InstallSnapshot,
          RespondRead)
