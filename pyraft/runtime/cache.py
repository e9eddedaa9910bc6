"""EntryCache: the newest log entries, in memory, decoded and encoded.

RaftCore puts every batch it has written to the log store here, with the
stored encoding of each entry; the replication workers send the newest
entries from here (their encodings go on the wire as they are) and the
state-machine worker applies them from here, instead of reading them back
from the store and decoding them again.  A range that is not (or no longer)
here is read from the store: the cache is an optimization, never the source
of truth.  It holds entries RaftCore has written or is writing: a leader puts
a batch here just before its write so that its replication workers send it
while it is being written (the engine counts the leader in a quorum only once
the write is durable, and applies only durable entries).

Bounded: at most ``max_entries`` entries and about ``max_bytes`` bytes of
encodings; the oldest go first.  A follower that falls behind (or is down)
therefore costs the leader no memory: it is served from the store.

Threads: written by RaftCore only (``append``, ``truncate``, ``purge``); read
from any thread.  ``_lock`` guards ``_first``, ``_entries``, ``_encoded`` and
``_bytes``.  Invariant: the cached entries have the consecutive indexes
``_first .. _first + len(_entries) - 1`` and ``len(_entries) == len(_encoded)``.
"""
from __future__ import annotations

import builtins
import threading
from typing import Sequence

from ..types import Entry

__all__ = ["EntryCache", "DEFAULT_MAX_ENTRIES", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_ENTRIES = 65536
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class EntryCache:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._first = 1
        self._entries: list[Entry] = []
        self._encoded: list[bytes] = []
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes of encodings held now."""
        return self._bytes

    def bounds(self) -> tuple[int, int]:
        """``(first, stop)``: the cached indexes are ``first <= i < stop``."""
        with self._lock:
            return self._first, self._first + len(self._entries)

    # -- writer (RaftCore) ------------------------------------------------------

    # builtins.bytes: inside the class, ``bytes`` is the property above.
    def append(self, entries: Sequence[Entry], encoded: Sequence[builtins.bytes]) -> None:
        """Add entries that continue the log (``encoded[k]`` is ``entries[k]``'s stored encoding).

        Entries that do not continue the cached ones (after a gap: the cache
        was bypassed, or emptied) start the cache over.
        """
        if not entries:
            return
        size = sum(map(len, encoded))
        with self._lock:
            first = entries[0].index
            if not self._entries or first != self._first + len(self._entries):
                self._first = first
                self._entries = []
                self._encoded = []
                self._bytes = 0
            self._entries.extend(entries)
            self._encoded.extend(encoded)
            self._bytes += size
            over = len(self._entries) - self.max_entries
            if over > 0 or self._bytes > self.max_bytes:
                self._evict(over)

    def _evict(self, over: int) -> None:
        # Drop at least an eighth at a time: deleting from the front of a list moves the rest.
        n = len(self._entries)
        k = max(over, n // 8, 1)
        if self._bytes - sum(map(len, self._encoded[:k])) > self.max_bytes:
            # a few large entries: find how many must go
            acc, k = self._bytes, 0
            for e in self._encoded:
                if acc <= self.max_bytes:
                    break
                acc -= len(e)
                k += 1
        k = min(k, n)
        self._bytes -= sum(map(len, self._encoded[:k]))
        del self._entries[:k]
        del self._encoded[:k]
        self._first += k

    def truncate(self, since: int) -> None:
        """Forget entries with index >= ``since`` (the log store truncated them)."""
        with self._lock:
            keep = since - self._first
            if keep >= len(self._entries):
                return
            keep = max(keep, 0)
            self._bytes -= sum(map(len, self._encoded[keep:]))
            del self._entries[keep:]
            del self._encoded[keep:]

    def purge(self, upto: int) -> None:
        """Forget entries with index <= ``upto`` (the log store purged them)."""
        with self._lock:
            k = upto + 1 - self._first
            if k <= 0:
                return
            k = min(k, len(self._entries))
            self._bytes -= sum(map(len, self._encoded[:k]))
            del self._entries[:k]
            del self._encoded[:k]
            self._first += k

    def clear(self) -> None:
        with self._lock:
            self._entries = []
            self._encoded = []
            self._bytes = 0

    # -- readers (any thread) ----------------------------------------------------

    def get(self, start: int, stop: int) -> tuple[list[Entry], list[builtins.bytes]] | None:
        """Entries ``start <= index < stop`` and their encodings, or None unless all of them are cached."""
        with self._lock:
            a = start - self._first
            b = stop - self._first
            if a < 0 or b > len(self._entries) or b < a:
                return None
            return self._entries[a:b], self._encoded[a:b]

    def get_entries(self, start: int, stop: int) -> list[Entry] | None:
        """Like :meth:`get`, without the encodings."""
        with self._lock:
            a = start - self._first
            b = stop - self._first
            if a < 0 or b > len(self._entries) or b < a:
                return None
            return self._entries[a:b]
