"""Runtime and protocol settings, validated when constructed."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, fields

_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

#: The longest time a duration knob may be, in seconds (an hour): every one of them is how long a
#: node waits for something, and a wait longer than that is a typo, not a choice.
MAX_TIMEOUT = 3600.0


def _is_number(v: object) -> bool:
    """A real number (int, float, a numpy scalar), not a bool (nor a str, nor a Decimal)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_seconds(name: str, v: object) -> None:
    if not _is_number(v) or not math.isfinite(v) or not 0 < v <= MAX_TIMEOUT:  # type: ignore[arg-type,operator]
        raise ValueError(f"{name} must be a finite number of seconds > 0 and <= {MAX_TIMEOUT:g}, got {v!r}")


_DEFAULT_HEARTBEAT = 0.1


class _DefaultSeconds(float):
    """A default that ``Config.__post_init__`` may adjust to the other fields (a value given is never adjusted)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return float.__repr__(self)


@dataclass(frozen=True)
class Config:
    """Every timing and size knob.  Times are seconds (floats).

    Raises ``ValueError`` at construction when a value is out of range.

    The timing defaults hold on a busy host: a node whose threads wait for the
    GIL behind an application's own (or for a CPU, at low priority) must not
    take that for a dead leader.  Three nodes at nice 19 on a busy 2-core
    machine, each with one CPU-bound Python thread of its own, went through
    57 terms in 80 s with 50 ms / 150-300 ms and stayed in term 1 with these
    (etcd's defaults are 100 ms / 1 s).  :meth:`low_latency` is the preset for
    hosts where Raft's threads are never starved: failover in well under a
    second.
    """

    cluster_name: str = "pyraft"
    #: How often a leader sends heartbeats to an idle follower.  Not given: 0.1 s, or a
    #: third of the minimum election timeout when that is shorter (so that
    #: ``Config(election_timeout=(0.15, 0.3))`` needs no heartbeat of its own).
    heartbeat_interval: float = _DefaultSeconds(_DEFAULT_HEARTBEAT)
    #: A follower that hears nothing from a leader for a time drawn uniformly
    #: from this range starts an election.
    election_timeout: tuple[float, float] = (1.0, 2.0)
    #: Ask for pre-votes before bumping the term (Raft thesis 9.6).
    pre_vote: bool = True
    #: A leader that has not heard from a quorum within an election timeout
    #: steps down; followers that heard from a live leader ignore vote requests.
    check_quorum: bool = True
    #: Serve linearizable reads on the leader without a heartbeat round while
    #: a quorum's acknowledgments keep it sure that no other node can be
    #: elected (etcd-raft's lease-based reads; needs ``check_quorum`` on every
    #: node).  It assumes the nodes' clocks run at rates less than 10 % apart
    #: and that a paused process's monotonic clock counts the pause (true for
    #: SIGSTOP and scheduling delays; a whole virtual machine frozen by its
    #: hypervisor may break it): off, every read costs a heartbeat round
    #: (ReadIndex) and assumes nothing about clocks.
    lease_reads: bool = False
    #: Entries per AppendEntries message, at most.
    max_payload_entries: int = 1024
    #: Bytes of entry payload per AppendEntries message, at most (a single
    #: larger entry is still sent alone).
    max_payload_bytes: int = 4 * 1024 * 1024
    #: AppendEntries messages in flight per target, at most (pipelining depth).
    max_inflight: int = 16
    #: Entries applied to the state machine per batch, at most.
    max_apply_batch: int = 4096
    #: Build a snapshot after this many entries were applied since the last
    #: one; ``None``: never build one by policy (``trigger.snapshot()`` still does).
    snapshot_every: int | None = 100_000
    #: How many entries to keep in the log behind the last snapshot when purging.
    max_in_snapshot_log_to_keep: int = 1000
    #: Snapshot transfer chunk size in bytes.
    snapshot_chunk_size: int = 1024 * 1024
    #: How long a single RPC may wait for its reply before it counts as lost.
    #: For AppendEntries it is the last resort: a lost one is normally found
    #: within about two heartbeat intervals (the heartbeat asks the follower
    #: for the entries it should hold) and re-sent.
    rpc_timeout: float = 1.0
    #: Client writes the leader accepts into one log batch, at most.
    max_proposal_batch: int = 4096
    #: Client writes in flight on this node (accepted by ``client_write_async``,
    #: not yet completed), at most; beyond it a write fails at once with
    #: ``Overloaded`` and nothing is proposed.  The default holds about half a
    #: second of the leader's top rate (~120,000 writes/s in one process) and
    #: five times ``pyraft-bench``'s 10,000 writes in flight, so a busy but
    #: healthy node never refuses; a leader whose followers or disk fall behind
    #: stops buffering there (50,000 writes of 1 KiB hold about 50 MiB).
    max_pending_writes: int = 50_000
    #: Bytes of large client writes in flight on this node, at most: every
    #: command of at least 4 KiB encoded (``pyraft.raft.LARGE_COMMAND_BYTES``)
    #: counts its encoded size until it completes; past the budget such a
    #: write fails at once with ``Overloaded`` (one larger than the whole
    #: budget is still taken while no other is in flight).  Smaller writes are
    #: bounded by ``max_pending_writes`` (50,000 x 4 KiB = 200 MiB at most).
    #: Without it, a burst of writes just under the client frame limit
    #: (hundreds of MiB in a second) held the leader's thread in one long append
    #: until its followers elected another leader.
    max_pending_write_bytes: int = 64 * 1024 * 1024
    #: Raft requests from peers waiting in RaftCore's inbox, at most (and as many
    #: replies to this node's own requests); beyond it they are dropped as a lossy
    #: network drops them (Raft sends again) and counted in the metrics counters
    #: ``inbox_dropped_rpcs`` / ``inbox_dropped_replies``.  Honest peers keep far
    #: fewer waiting: a leader has at most ``max_inflight`` AppendEntries in
    #: flight per follower.
    max_queued_rpcs: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.cluster_name, str) or not _CLUSTER_NAME.match(self.cluster_name):
            raise ValueError(
                f"cluster_name must be 1-64 characters of letters, digits and '_.:-', got {self.cluster_name!r}"
            )
        et = self.election_timeout
        if not isinstance(et, (tuple, list)) or len(et) != 2 or not all(_is_number(x) for x in et):
            raise ValueError(f"election_timeout must be a (min, max) pair of seconds, got {et!r}")
        lo, hi = float(et[0]), float(et[1])
        object.__setattr__(self, "election_timeout", (lo, hi))
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi <= MAX_TIMEOUT):
            raise ValueError(f"election_timeout must satisfy 0 < min < max <= {MAX_TIMEOUT:g} seconds, "
                             f"got {et!r}")
        if type(self.heartbeat_interval) is _DefaultSeconds:
            # Still a default afterwards: dataclasses.replace() with another election timeout derives it again.
            object.__setattr__(self, "heartbeat_interval", _DefaultSeconds(min(_DEFAULT_HEARTBEAT, round(lo / 3, 6))))
        _check_seconds("heartbeat_interval", self.heartbeat_interval)
        if self.heartbeat_interval * 2 > lo:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval}) must be at most half the minimum "
                f"election timeout ({lo}), or followers time out between heartbeats"
            )
        _check_seconds("rpc_timeout", self.rpc_timeout)
        for name in ("pre_vote", "check_quorum", "lease_reads"):
            v = getattr(self, name)
            if type(v) is not bool and not (type(v) is int and v in (0, 1)):  # "no" would be true
                raise ValueError(f"{name} must be True or False (or 1 or 0), got {v!r}")
            object.__setattr__(self, name, bool(v))
        if self.lease_reads and not self.check_quorum:
            raise ValueError("lease_reads needs check_quorum: the vote guard of CheckQuorum is what keeps "
                             "another node from being elected while a read lease holds")
        for name in ("max_payload_entries", "max_payload_bytes", "max_inflight", "max_apply_batch",
                     "snapshot_chunk_size", "max_proposal_batch", "max_pending_writes",
                     "max_pending_write_bytes", "max_queued_rpcs"):
            v = getattr(self, name)
            if type(v) is not int or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if type(self.max_in_snapshot_log_to_keep) is not int or self.max_in_snapshot_log_to_keep < 0:
            raise ValueError(f"max_in_snapshot_log_to_keep must be a non-negative integer, got {self.max_in_snapshot_log_to_keep!r}")
        if self.snapshot_every is not None and (type(self.snapshot_every) is not int or self.snapshot_every <= 0):
            raise ValueError(f"snapshot_every must be a positive integer or None, got {self.snapshot_every!r}")

    @classmethod
    def low_latency(cls, **overrides) -> "Config":
        """The low-latency preset: 50 ms heartbeats, an election after 150-300 ms without a leader.

        For nodes whose threads are never starved of a CPU or of the GIL (a
        dedicated host, no CPU-bound Python threads beside them): a failed
        leader is replaced within a few hundred milliseconds.  Elsewhere it
        churns through elections; the defaults do not.  ``overrides`` are
        further Config fields.
        """
        return cls(**{"heartbeat_interval": 0.05, "election_timeout": (0.15, 0.30), **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A Config from a JSON object's fields (``election_timeout`` as a two-element list).

        Every bad value, wrong types included, is a ``ValueError``.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of Config fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown, key=repr)}")
        d = dict(d)
        et = d.get("election_timeout")
        if isinstance(et, list):
            d["election_timeout"] = tuple(et)
        return cls(**d)
