"""The Raft safety properties (the paper's Figure 3), checked incrementally.

The simulation calls these hooks as it executes the engines' commands; every
check is O(1) or O(nodes) per call (never a scan of whole logs), so the
checker can run after every simulated event.

Entries are compared by *prefix hash*: the hash of an entry chained with the
hash of the entry before it (see :func:`chain`).  Two logs with the same
prefix hash at an index are identical up to that index, so comparing one
integer checks the whole Log Matching property, and the state machine keeps
the same hash chain over the entries it applied, so a snapshot carries the
prefix hash of its last entry.

Checked here:

* Election Safety: at most one leader per term, over the whole history.
* Leader Append-Only: a leader never truncates its log during its term.
* Log Matching: two logs with an entry of the same (index, term) agree up to it.
* Leader Completeness: an entry committed in term t is in the log (or the
  snapshot) of every leader of a term after t.
* State Machine Safety: every node applies the same entry at each index,
  and only committed ones.
* Durability: after a crash, the newest committed entry is on the durable
  log or snapshot of a majority of the voters.
* Linearizable reads: a successful ReadIndex returns a log id at least the
  commit point when the read was started.
"""
from __future__ import annotations

import zlib
from typing import Any

from pyraft.types import Entry, EntryKind, LogId, StoredMembership

# (globals: an Enum class attribute is a slow lookup, and entry_digest runs for every append and apply)
NORMAL, MEMBERSHIP = EntryKind.NORMAL, EntryKind.MEMBERSHIP


class InvariantViolation(AssertionError):
    """A Raft safety property does not hold."""


def entry_digest(e: Entry) -> int:
    """A hash of an entry's content that is the same in every process (ints and tuples only)."""
    if e.kind == NORMAL:
        p = e.payload
        # str hashes differ between processes; a replay must see the very same numbers
        return hash((1, p)) if type(p) is int else hash((1, zlib.crc32(repr(p).encode())))
    if e.kind == MEMBERSHIP:
        m = e.payload
        return hash((2, tuple(tuple(sorted(c)) for c in m.configs), tuple(sorted(m.nodes)),
                     tuple(sorted(m.leaving))))
    return 0


def chain(prev_hash: int, e: Entry) -> int:
    """The prefix hash of ``e`` given the prefix hash of the entry before it."""
    return hash((prev_hash, e.log_id.term, e.log_id.index, entry_digest(e)))


class Invariants:
    def __init__(self) -> None:
        #: term -> the one node that led it
        self.leaders: dict[int, int] = {}
        #: (index, term) -> prefix hash, for every entry any log ever held
        self.entries: dict[tuple[int, int], int] = {}
        #: index -> prefix hash of the committed entry there (where known)
        self.committed: dict[int, int] = {}
        self.c_max = 0
        #: term -> the greatest index known committed by a node in that term
        self.commit_by_term: dict[int, int] = {}
        #: the latest membership among the committed entries
        self.committed_membership: StoredMembership | None = None
        #: index -> prefix hash of what the state machines applied there
        self.applied: dict[int, int] = {}
        #: read token -> (node, commit point when the read started)
        self.reads: dict[Any, tuple[int, int]] = {}

    @staticmethod
    def fail(msg: str) -> None:
        raise InvariantViolation(msg)

    # --- Election Safety ---------------------------------------------------------

    def on_leader(self, node_id: int, term: int, log: Any) -> bool:
        """``node_id`` is leader of ``term``; True the first time it is seen."""
        other = self.leaders.get(term)
        if other is None:
            self.leaders[term] = node_id
            self.check_leader_complete(node_id, term, log)
            return True
        if other != node_id:
            self.fail(f"Election Safety: nodes {other} and {node_id} both led term {term}")
        return False

    # --- Log Matching ------------------------------------------------------------

    def on_append(self, node_id: int, e: Entry, h: int) -> None:
        key = (e.log_id.index, e.log_id.term)
        known = self.entries.setdefault(key, h)
        if known != h:
            self.fail(f"Log Matching: node {node_id} holds entry {e.log_id} whose log prefix differs "
                      f"from another log's entry {e.log_id}")

    def on_truncate(self, node_id: int, since: int, log: Any, led_term: int, cur_term: int) -> None:
        if since > log.last_index:
            return
        if led_term == cur_term:
            self.fail(f"Leader Append-Only: node {node_id}, leader of term {cur_term}, "
                      f"truncates its log from {since}")
        idx = min(self.c_max, log.last_index)
        if idx >= since and self.committed.get(idx) == log.hash_at(idx):
            self.fail(f"committed entry lost: node {node_id} truncates from {since}, "
                      f"but its log holds committed entry {idx}")

    # --- commit, Leader Completeness --------------------------------------------

    def on_commit(self, node_id: int, term: int, lid: LogId, log: Any, snap_membership: StoredMembership | None,
                  leaders: list[tuple[int, int, Any]]) -> None:
        """Node ``node_id`` in ``term`` saved ``lid`` as committed; ``log`` is its log."""
        i = lid.index
        h = log.hash_at(i)
        if h is None or log.term_at(i) != lid.term:
            self.fail(f"node {node_id} commits {lid}, which is not in its log "
                      f"(purged {log.purged}, last {log.last})")
        known = self.committed.get(i)
        if known is not None and known != h:
            self.fail(f"two different entries committed at index {i} (node {node_id} commits {lid})")
        if i <= self.c_max:
            self.committed[i] = h
        else:
            self._advance(node_id, lid, log, snap_membership)
        if self.commit_by_term.get(term, 0) < i:
            self.commit_by_term[term] = i
            for lid2, lterm, llog in leaders:
                if lterm > term:
                    self._check_has_committed(lid2, lterm, llog, i)

    def _advance(self, node_id: int, lid: LogId, log: Any, snap_membership: StoredMembership | None) -> None:
        i = lid.index
        old = self.c_max
        if old:
            ho = log.hash_at(old)
            if ho is not None and ho != self.committed[old]:
                self.fail(f"node {node_id} commits {lid} on a log that does not hold committed entry {old}")
        lo = max(old + 1, log.purged_index)
        if lo > old + 1 and snap_membership is not None:
            cm = self.committed_membership
            if cm is None or (snap_membership.log_id and snap_membership.log_id.index > (cm.log_id.index if cm.log_id else 0)):
                self.committed_membership = snap_membership
        for j in range(lo, i + 1):
            self.committed[j] = log.hash_at(j)
            e = log.get(j)
            if e is not None and e.kind == MEMBERSHIP:
                self.committed_membership = StoredMembership(e.log_id, e.payload)
        self.c_max = i

    def _check_has_committed(self, node_id: int, term: int, log: Any, index: int) -> None:
        if index <= log.purged_index:
            return  # in its snapshot (State Machine Safety checks snapshots' contents)
        if index > log.last_index:
            self.fail(f"Leader Completeness: leader {node_id} of term {term} lacks committed entry {index} "
                      f"(its last entry is {log.last})")
        if log.hash_at(index) != self.committed[index]:
            self.fail(f"Leader Completeness: leader {node_id} of term {term} holds a different entry "
                      f"at committed index {index}")

    def check_leader_complete(self, node_id: int, term: int, log: Any) -> None:
        best = 0
        for t, i in self.commit_by_term.items():
            if t < term and i > best:
                best = i
        if best:
            self._check_has_committed(node_id, term, log, best)

    def check_commit_point(self, node_id: int, committed: LogId | None, log: Any) -> None:
        """An engine's commit point (say, restored after a restart) is a committed entry."""
        if committed is None:
            return
        i = committed.index
        known = self.committed.get(i)
        if known is None:
            if i > self.c_max:
                self.fail(f"node {node_id} believes {committed} committed, beyond every commit ({self.c_max})")
            return
        h = log.hash_at(i)
        if h is not None and log.term_at(i) == committed.term and h != known:
            self.fail(f"node {node_id} believes {committed} committed, but it is not the committed entry")
        if h is not None and log.term_at(i) != committed.term:
            self.fail(f"node {node_id} believes {committed} committed, but its log has term "
                      f"{log.term_at(i)} at index {i}")

    # --- State Machine Safety ----------------------------------------------------

    def on_apply(self, node_id: int, lid: LogId, h: int) -> None:
        i = lid.index
        known = self.applied.setdefault(i, h)
        if known != h:
            self.fail(f"State Machine Safety: node {node_id} applies {lid}, another node applied a "
                      f"different entry at index {i}")
        if i > self.c_max:
            self.fail(f"node {node_id} applies {lid}, which is not committed (commit point {self.c_max})")
        c = self.committed.get(i)
        if c is not None and c != h:
            self.fail(f"node {node_id} applies {lid}, which is not the committed entry at index {i}")

    def on_snapshot_state(self, node_id: int, lid: LogId | None, h: int) -> None:
        """A state machine now holds a snapshot up to ``lid`` (installed or restored)."""
        if lid is None:
            return
        known = self.applied.get(lid.index)
        if known is not None and known != h:
            self.fail(f"State Machine Safety: node {node_id} holds a snapshot at {lid} that differs "
                      f"from what was applied there elsewhere")
        c = self.committed.get(lid.index)
        if c is not None and c != h:
            self.fail(f"node {node_id} holds a snapshot at {lid} of entries that were not committed")

    # --- durability --------------------------------------------------------------

    def check_durable(self, holders: dict[int, bool]) -> None:
        """After a crash: the newest committed entry survives on a majority of the voters.

        ``holders`` maps each voter of the newest committed configuration to
        whether its disk holds entry ``c_max``.
        """
        n_hold = sum(holders.values())
        if n_hold * 2 <= len(holders):
            self.fail(f"committed entry {self.c_max} is durable on only {sorted(k for k, v in holders.items() if v)} "
                      f"of voters {sorted(holders)}")

    # --- linearizable reads --------------------------------------------------------

    def on_read_start(self, token: Any, node_id: int) -> None:
        self.reads[token] = (node_id, self.c_max)

    def on_read_done(self, token: Any, read_log_id: LogId | None, ok: bool) -> None:
        node_id, floor = self.reads.pop(token)
        if not ok:
            return
        idx = read_log_id.index if read_log_id else 0
        if idx < floor:
            self.fail(f"linearizability: read {token} on node {node_id} got read index {read_log_id}, "
                      f"but {floor} was committed before the read started")
        if idx and idx not in self.committed:
            self.fail(f"linearizability: read {token} on node {node_id} got read index {read_log_id}, "
                      f"which is not known committed")
