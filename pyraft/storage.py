"""Storage interfaces: the log store and the state machine.

Both are ``typing.Protocol``s: implement the methods, no base class needed.
Each method says which thread calls it and what must be durable when it
returns.  pyraft ships ``LmdbLogStore`` (``pyraft.stores.lmdb``), the test-only
``MemoryLogStore`` and ``MemoryStateMachine`` (``pyraft.stores.memory``), and
``KVStateMachine`` (``pyraft.kv``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, Sequence, Union, runtime_checkable

from .engine.commands import AppendToLog, PurgeLog, SaveCommitted, SaveVote, TruncateLog
from .types import Entry, LogId, SnapshotMeta, StoredMembership, Vote

#: The operations ``LogStore.write`` executes: the engine's storage commands.
LogOp = Union[SaveVote, AppendToLog, TruncateLog, PurgeLog, SaveCommitted]


@dataclass(frozen=True, slots=True)
class LogState:
    """``last_purged``: the last entry removed by purging (None: none purged).

    ``last_log_id``: the last entry in the log, or ``last_purged`` when the
    log is empty after a purge, or None when it has never held an entry.
    """

    last_purged: LogId | None
    last_log_id: LogId | None


@runtime_checkable
class LogStore(Protocol):
    """The Raft log, the vote and the committed log id.

    Writes come only from the RaftCore thread, in order.  Reads may come from
    any thread (replication workers, the state-machine worker, tools) while
    writes go on; a read sees a consistent state (whole batches or nothing).
    """

    def read_vote(self) -> Vote | None:
        """The last saved vote, None on a pristine store."""

    def read_committed(self) -> LogId | None:
        """The last saved committed log id (a hint; committed entries are never lost either way)."""

    def log_state(self) -> LogState:
        """The purged and last log ids, as of the last completed ``write``."""

    def read(self, start: int, stop: int) -> list[Entry]:
        """Entries with ``start <= index < stop`` that exist, in order.

        Entries are consecutive: the result is a prefix of the range (empty if
        ``start`` was purged or is past the end).
        """

    def write(self, ops: Sequence[LogOp]) -> None:
        """Execute ``ops`` in order as one atomic batch; when it returns, all are durable.

        Called only by RaftCore.  ``AppendToLog`` entries continue the log
        (the engine guarantees it); ``TruncateLog(since)`` deletes every entry
        with index >= since; ``PurgeLog(upto)`` deletes every entry with index
        <= upto.index and records ``upto`` as the last purged log id (if upto
        is past the last entry, the log becomes empty); ``SaveVote`` and
        ``SaveCommitted`` overwrite their value.  An exception means nothing
        of the batch may be assumed durable: the node stops as Fatal.
        """

    def close(self) -> None:
        """Release the store.  Idempotent."""


@runtime_checkable
class StateMachine(Protocol):
    """The application's state, fed committed entries in log order.

    ``apply``, ``install_snapshot`` and ``begin_receiving_snapshot`` are
    called only by the state-machine worker thread; ``build_snapshot`` by a
    short-lived snapshot-builder thread while ``apply`` may run concurrently,
    so it must read a consistent view (an LMDB read transaction is one);
    ``open_snapshot`` by replication workers.

    What may fail, and what it costs: a command is input, so ``apply``
    returns an error *result* for a command it cannot execute (the built-in
    state machines never raise on a command).  A received snapshot is input
    too: ``install_snapshot`` raises :class:`~pyraft.errors.CodecError` for
    content it refuses, and the node goes on.  Anything else raised by these
    methods means the disk or the state machine's own code failed: the node
    stops as ``Fatal``, loudly.

    Optional (not part of the protocol, found by name): ``check_command(command)``
    raises to refuse a command before it is proposed; nothing is proposed
    then.  ``Raft.client_write_async`` calls it on the caller's thread (any
    thread), on the node the write is submitted to, for every write: keep it
    cheap.  Raise a :class:`~pyraft.errors.RaftError` (``NoSpace``, a command
    error) or ``TypeError``/``ValueError``; it reaches the caller as raised.
    ``KVStateMachine`` refuses keys and client ids LMDB cannot hold, and past
    its quota the commands that add data.  ``apply`` must still cope with any
    command: an entry may be in a log without having passed there (written
    by an older version, or forged).
    """

    def applied_state(self) -> tuple[LogId | None, StoredMembership | None]:
        """The last applied log id and the last membership applied (from entries or a snapshot)."""

    def apply(self, entries: Sequence[Entry]) -> list[Any]:
        """Apply committed entries in order; return one result per entry (None for blank and membership entries).

        The new ``applied_state`` must be recorded atomically with the
        effects, so that a restart never applies an entry twice or skips one.
        A result that is an exception instance is delivered to the waiting
        client as raised (for application-level errors); any raised exception
        stops the node as Fatal.  Every replica applies every entry, whatever
        its own disk usage: a decision that may differ between replicas (a
        size quota) belongs in ``check_command``, never here.
        """

    def build_snapshot(self) -> SnapshotMeta:
        """Write a snapshot of a consistent view and make it the current one; return its meta."""

    def current_snapshot(self) -> SnapshotMeta | None:
        """The meta of the current snapshot, if any.

        Durable with the state it describes: after ``install_snapshot`` returns
        (and across a crash right after it) it is that snapshot's meta.  A node
        whose applied point is past its log's last entry and past its current
        snapshot refuses to start (its files were changed or come from another
        node).
        """

    def open_snapshot(self) -> tuple[SnapshotMeta, BinaryIO] | None:
        """The current snapshot and a readable binary file of its data (the caller closes it)."""

    def begin_receiving_snapshot(self) -> BinaryIO:
        """A new writable binary file that will receive a snapshot from the leader."""

    def install_snapshot(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        """Replace the whole state with the snapshot in ``data`` (written by ``begin_receiving_snapshot``).

        Atomic: after a crash at any point the state is either the old one or
        the new one, and ``applied_state`` says which.  ``data`` is closed by
        the callee.

        The data comes from the leader, over the network: raise
        :class:`~pyraft.errors.CodecError` when it does not decode or
        validate, with the state unchanged.  The snapshot is then refused
        (logged, counted as ``snapshots_refused``) and the leader told to send
        it again; the node goes on.  Any other exception (a disk that fails,
        a bug) stops the node as Fatal.
        """

    def close(self) -> None:
        """Release the state machine.  Idempotent."""
