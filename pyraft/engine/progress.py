"""A leader's view of one follower or learner (etcd-raft's ``tracker.Progress``).

States:

* ``PROBE``: the leader does not know where the target's log matches; it
  sends one AppendEntries at a time (each heartbeat interval at most) and
  backs off on rejection.
* ``REPLICATE``: the logs match up to ``matched``; the leader streams entries
  optimistically, at most ``max_inflight`` messages ahead.  A lost message is
  found by a rejection: of a later message (its prev is past the gap), or of
  a heartbeat that asks for the last entry of the appends unacknowledged for
  more than a heartbeat interval.  Either takes the target back to ``PROBE``
  from ``matched``, and the leader re-sends at once.
* ``SNAPSHOT``: the entries the target needs were purged; a snapshot is on
  its way and nothing else is sent until it is acknowledged or fails.

Invariant: ``index(matched) < next_index``.
"""
from __future__ import annotations

import enum
from collections import deque

from ..types import LogId, log_index


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


# Enum members as module globals: reading one as a class attribute goes through EnumType's
# __getattr__ hook (a Python-level lookup, several times the cost of a global), and a leader
# checks these on every reply.
_PROBE, _REPLICATE, _SNAPSHOT = ProgressState.PROBE, ProgressState.REPLICATE, ProgressState.SNAPSHOT


class Progress:
    __slots__ = ("matched", "next_index", "state", "inflight", "probe_sent", "acked_seq",
                 "last_ack", "snapshot_last")

    def __init__(self, next_index: int, now: float) -> None:
        self.matched: LogId | None = None
        self.next_index = next_index
        self.state = _PROBE
        #: (last index sent, time sent) of each AppendEntries in flight (REPLICATE)
        self.inflight: deque[tuple[int, float]] = deque()
        self.probe_sent = False
        self.acked_seq = 0
        #: when the target last answered (CheckQuorum); a new leader counts from its start
        self.last_ack = now
        self.snapshot_last: LogId | None = None

    def __repr__(self) -> str:
        return (f"Progress({self.state.value}, matched={self.matched}, next={self.next_index}, "
                f"inflight={len(self.inflight)})")

    @property
    def matched_index(self) -> int:
        return log_index(self.matched)

    def maybe_update(self, matched: LogId | None) -> bool:
        """Record a success up to ``matched``; False if it tells nothing new."""
        idx = log_index(matched)
        updated = idx > self.matched_index
        if updated:
            self.matched = matched
        if self.state == _PROBE and idx >= self.next_index - 1:
            self.become_replicate()
            updated = True
        if self.next_index < idx + 1:
            self.next_index = idx + 1
        while self.inflight and self.inflight[0][0] <= idx:
            self.inflight.popleft()
        return updated

    def maybe_decrease_to(self, rejected: int, next_hint: int) -> bool:
        """Handle a rejection of the AppendEntries whose prev index was ``rejected``.

        ``next_hint`` is where the leader's term search says to retry.
        False for a stale rejection.
        """
        if self.state == _REPLICATE:
            if rejected <= self.matched_index:
                return False
            self.become_probe()
            return True
        if self.state != _PROBE or rejected != self.next_index - 1:
            return False
        self.next_index = max(min(rejected, next_hint), self.matched_index + 1)
        self.probe_sent = False
        return True

    def become_probe(self) -> None:
        self.state = _PROBE
        self.next_index = self.matched_index + 1
        self.inflight.clear()
        self.probe_sent = False
        self.snapshot_last = None

    def become_replicate(self) -> None:
        self.state = _REPLICATE
        self.next_index = self.matched_index + 1
        self.inflight.clear()
        self.probe_sent = False

    def become_snapshot(self, last: LogId | None) -> None:
        self.state = _SNAPSHOT
        self.inflight.clear()
        self.probe_sent = False
        self.snapshot_last = last
