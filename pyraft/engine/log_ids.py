"""LogIdList: the terms of the whole log in memory, one LogId per term run.

The engine must know the term of any entry (consistency checks, conflict
hints, commit rule) without reading storage.  Terms never decrease along a
log, so storing the first log id of each run of equal terms is enough:
memory is O(number of terms), lookup is a binary search (openraft's
``LogIdList``).

Invariants: ``purged.index < keys[0].index`` when both exist; keys are
strictly increasing in index and term; ``last`` is None, or ``purged`` (empty
log after a purge), or an entry in the last run.
"""
from __future__ import annotations

import bisect
import operator
from typing import Callable

from ..types import LogId

_index = operator.attrgetter("index")


class LogIdList:
    __slots__ = ("purged", "keys", "last")

    def __init__(self, purged: LogId | None = None) -> None:
        self.purged: LogId | None = purged
        self.keys: list[LogId] = []
        self.last: LogId | None = purged

    @classmethod
    def load(cls, purged: LogId | None, last: LogId | None,
             term_at: Callable[[int], int | None]) -> "LogIdList":
        """Rebuild from storage with O(terms * log n) calls to ``term_at``."""
        out = cls(purged)
        first = (purged.index if purged else 0) + 1
        if last is None or last.index < first:
            return out

        def term(i: int) -> int:
            t = term_at(i)
            if t is None:
                raise ValueError(f"log store has no entry {i} between {first} and {last.index}")
            return t

        # Find each run start by binary search over [lo, last.index].
        lo = first
        while lo <= last.index:
            t = term(lo)
            out.keys.append(LogId(t, lo))
            # the last index whose term is t
            a, b = lo, last.index
            while a < b:
                mid = (a + b + 1) // 2
                if term(mid) == t:
                    a = mid
                else:
                    b = mid - 1
            lo = a + 1
        out.last = LogId(out.keys[-1].term, last.index)
        return out

    @property
    def last_index(self) -> int:
        return self.last.index if self.last else 0

    @property
    def purged_index(self) -> int:
        return self.purged.index if self.purged else 0

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index``; None if unknown (purged below, or past the end).

        Index 0 (before the first entry) has term 0.
        """
        if index == 0:
            return 0
        last = self.last
        if last is None or index > last.index:
            return None
        purged = self.purged
        if purged is not None:
            if index == purged.index:
                return purged.term
            if index < purged.index:
                return None
        keys = self.keys
        if keys:
            k = keys[-1]
            if index >= k.index:
                return k.term  # in the last run (most lookups: the newest entries)
        pos = bisect.bisect_right(keys, index, key=_index) - 1
        return keys[pos].term if pos >= 0 else None

    def log_id_at(self, index: int) -> LogId | None:
        """The LogId at ``index`` (None for index 0 or an unknown index)."""
        if index == 0:
            return None
        t = self.term_at(index)
        return None if t is None else LogId(t, index)

    def append(self, log_id: LogId) -> None:
        assert log_id.index == self.last_index + 1, f"append {log_id} after {self.last}"
        if not self.keys or self.keys[-1].term != log_id.term:
            assert not self.last or log_id.term >= self.last.term, "terms never decrease along a log"
            self.keys.append(log_id)
        self.last = log_id

    def append_run(self, first: LogId, last: LogId) -> None:
        """Append the entries ``first.index .. last.index``, all of term ``first.term`` (== ``last.term``)."""
        assert first.index == self.last_index + 1 and first.term == last.term and last.index >= first.index, \
            f"append run {first}..{last} after {self.last}"
        if not self.keys or self.keys[-1].term != first.term:
            assert not self.last or first.term >= self.last.term, "terms never decrease along a log"
            self.keys.append(first)
        self.last = last

    def truncate(self, since: int) -> None:
        """Forget entries with index >= since."""
        assert since > self.purged_index, "cannot truncate purged entries"
        if since > self.last_index:
            return
        pos = bisect.bisect_left(self.keys, since, key=_index)
        del self.keys[pos:]
        if since - 1 == self.purged_index:
            self.last = self.purged
        else:
            self.last = LogId(self.keys[-1].term, since - 1) if self.keys else None

    def purge(self, upto: LogId) -> None:
        """Forget entries with index <= upto.index; ``upto`` becomes the purged id."""
        if upto.index <= self.purged_index:
            return
        if upto.index >= self.last_index:
            self.keys = []
            self.last = upto
        else:
            nxt = upto.index + 1
            t = self.term_at(nxt)
            assert t is not None, "every index between the purged and the last entry has a term"
            pos = bisect.bisect_right(self.keys, nxt, key=_index)
            self.keys = [LogId(t, nxt)] + self.keys[pos:]
        self.purged = upto
