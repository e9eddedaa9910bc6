"""Reading a KV state machine: ranges, counts and the watch history, the same for every backend.

A state machine offers a :class:`KVView` (one consistent read: an LMDB read
transaction, or the memory state machine's lock held); the functions here
read it.  They return stored forms (keys and records as bytes) for the
server to send as they are; :class:`KeyValue` and :class:`WatchEvent` are
what a caller finally sees.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from ..errors import Compacted
from .encoding import (EVENT_TYPES, RECORD_HEADER, decode_key, decode_value, event_key, range_bounds,
                       record_header, unpack_event)

__all__ = ["KeyValue", "RangeResult", "WatchEvent", "TxnResult", "KVView", "KVReads", "ApplyListener",
           "ApplyListeners", "read_range", "read_events", "count_keys", "check_limit", "MAX_REPLY_BYTES",
           "MAX_COUNT"]

log = logging.getLogger("pyraft.kv")

#: A range or watch reply stops adding keys or events past this many bytes (the
#: transport's frames are at most 16 MiB by default), and says there is more.
MAX_REPLY_BYTES = 4 * 1024 * 1024
#: The most keys the count of one ``kv.range`` walks (past its rows, or all of them with
#: ``count_only``); a range that holds more is answered "at least this many" (``count_exact``
#: False).  About 50 ms of the reads thread on an LMDB store.
MAX_COUNT = 100_000


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key as ``range`` returns it: revisions are log indexes; ``lease`` is 0 without one."""

    key: Any
    value: Any
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_stored(cls, key: bytes, record: bytes) -> "KeyValue":
        """From a stored key and its record (a bare header: ``value`` None, as keys_only asks)."""
        c, m, v, lease = record_header(record)
        value = decode_value(record[RECORD_HEADER.size:]) if len(record) > RECORD_HEADER.size else None
        return cls(decode_key(key), value, c, m, v, lease)


class RangeResult(list[KeyValue]):
    """The keys of a range, sorted by key (a list of :class:`KeyValue`).

    ``revision``: the state machine's revision (applied log index) the range
    was read at; ``count``: how many keys the range holds (past ``limit``
    too); ``more``: True when keys were left out (``limit``, or the reply's
    size bound); ``count_exact``: False when the range holds more keys than
    a count walks (:data:`MAX_COUNT` past the rows), so ``count`` is a lower
    bound.
    """

    # The documented name for the range's size (docs/kv.md) hides list.count on purpose.
    count: int  # type: ignore[assignment]

    def __init__(self, items: Iterable[KeyValue] = (), revision: int = 0, count: int = 0, more: bool = False,
                 count_exact: bool = True):
        super().__init__(items)
        self.revision = revision
        self.count = count
        self.more = more
        self.count_exact = count_exact

    def __repr__(self) -> str:
        return f"RangeResult({list.__repr__(self)}, revision={self.revision}, count={self.count}, more={self.more})"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change: ``type`` is ``"put"`` or ``"delete"`` (``value`` None); ``revision`` the change's."""

    type: str
    key: Any
    value: Any
    revision: int

    @classmethod
    def from_stored(cls, revision: int, event: bytes) -> "WatchEvent":
        kind, key, value = unpack_event(event)
        return cls(EVENT_TYPES[kind], decode_key(key), None if value is None else decode_value(value), revision)


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``succeeded``: whether every compare held; ``responses``: one per op run; ``revision``: the txn's."""

    succeeded: bool
    responses: tuple
    revision: int = 0


class KVView(Protocol):
    """One consistent read of a KV state machine (valid inside its ``with`` block only)."""

    #: the revision the view shows: the state machine's applied log index
    revision: int
    #: the oldest revision whose watch events are all kept
    history_start: int

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        """``(key, record)`` for the keys in ``[start, stop)``, in order (buffers: copy what you keep)."""

    def count(self, start: bytes, stop: bytes) -> int:
        """How many keys are in ``[start, stop)``.

        A view whose count walks the keys may also offer ``count_at_most(start,
        stop, most)``: the same, but it stops walking at ``most`` keys (see
        :func:`count_keys`).
        """

    def events(self, revision: int, sub: int) -> Iterator[tuple[int, int, bytes | memoryview]]:
        """``(revision, sub, event)`` of the history from ``(revision, sub)`` on, in order.

        Events may be buffers, valid inside the view only: copy what you keep.
        """

    def leases(self) -> Iterator[tuple[int, float]]:
        """``(lease id, ttl)`` of every lease."""


def count_keys(view: KVView, start: bytes, stop: bytes, most: int | None = None) -> tuple[int, bool]:
    """``(n, exact)``: how many keys are in ``[start, stop)``, counting at most ``most`` (None: all).

    When the range holds more than ``most`` keys, ``n`` is ``most`` and
    ``exact`` False.  A view with ``count_at_most`` (KVView.count) stops
    walking there; another's count is taken whole and cut, so that every
    backend answers alike.
    """
    if most is None:
        return view.count(start, stop), True
    walk = getattr(view, "count_at_most", None)
    n = walk(start, stop, most + 1) if walk is not None else view.count(start, stop)
    return (n, True) if n <= most else (most, False)


def read_range(view: KVView, start: bytes, stop: bytes, *, limit: int | None = None, keys_only: bool = False,
               count_only: bool = False, max_bytes: int = MAX_REPLY_BYTES,
               max_count: int | None = None) -> tuple[list[tuple[bytes, bytes]], int, bool, bool]:
    """``(rows, count, more, count_exact)`` of the keys in ``[start, stop)``: rows are ``(key, record)``.

    At most ``limit`` rows; ``keys_only`` leaves the records' values out
    (their 32-byte headers stay); ``count_only`` returns no rows.  ``more``:
    keys were left out of the rows, or (``count_only``) out of the count.
    Counting walks the keys past the last row without reading their values,
    at most ``max_count`` of them (None: all, for local reads): past it,
    ``count`` is a lower bound and ``count_exact`` False.
    """
    if count_only:
        n, exact = count_keys(view, start, stop, max_count)
        return [], n, not exact, exact
    rows: list[tuple[bytes, bytes]] = []
    size = 0
    more = False
    for k, rec in view.scan(start, stop):
        if (limit and len(rows) >= limit) or size >= max_bytes:
            more = True
            break
        r = bytes(rec[:RECORD_HEADER.size]) if keys_only else bytes(rec)
        k = bytes(k)
        rows.append((k, r))
        size += len(k) + len(r)
    rest, exact = count_keys(view, rows[-1][0] + b"\x00", stop, max_count) if more and rows else (0, True)
    return rows, len(rows) + rest, more, exact


def read_events(view: KVView, revision: int | None, sub: int, start: bytes, stop: bytes, *, limit: int,
                max_bytes: int = MAX_REPLY_BYTES,
                max_scan: int = 100_000) -> tuple[list[tuple[int, bytes]], tuple[int, int]]:
    """The watch events of keys in ``[start, stop)`` from position ``(revision, sub)`` on.

    Returns ``(events, next position)``: events are ``(revision, event
    record)``, at most ``limit`` and about ``max_bytes``, scanning at most
    ``max_scan`` events of the history; the next position is where the
    following read goes on (past the view's revision when everything was
    read).  ``revision`` None: from the view's next revision (new events
    only).  Raises :class:`~pyraft.errors.Compacted` when the history no
    longer holds ``revision``.
    """
    head = view.revision + 1
    if revision is None:
        revision, sub = head, 0
    if revision < view.history_start:
        raise Compacted(f"revision {revision} is compacted: this node keeps the events of revisions "
                        f"{view.history_start}..{view.revision}")
    out: list[tuple[int, bytes]] = []
    size = scanned = 0
    for r, s, ev in view.events(revision, sub):
        if len(out) >= limit or size >= max_bytes or scanned >= max_scan:
            return out, (r, s)
        scanned += 1
        k = event_key(ev)
        if start <= k < stop:
            e = bytes(ev)
            out.append((r, e))
            size += len(e)
    return out, max((revision, sub), (head, 0))


def check_limit(limit: Any) -> int | None:
    """``limit`` if it is None or an integer >= 0 (0: no limit); TypeError or ValueError otherwise."""
    if limit is None:
        return None
    if type(limit) is not int:
        raise TypeError(f"limit must be an integer or None, got {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return limit


class KVReads(abc.ABC):
    """Local reads of a KV state machine, from any thread (the class provides ``view()``).

    Linearizable only after ``Raft.ensure_linearizable`` (the KV service does
    that for ``KVClient.range``); otherwise as of this replica's applied state.
    """

    @abc.abstractmethod
    def view(self) -> Any:
        """A context manager giving a KVView of one consistent state."""

    def range(self, key: Any, end: Any = None, *, prefix: bool = False, limit: int | None = None,
              keys_only: bool = False) -> RangeResult:
        """The keys of ``key`` alone, ``[key, end)`` or the prefix ``key``, sorted by key (see KVClient.range)."""
        start, stop = range_bounds(key, end, prefix)
        limit = check_limit(limit)
        with self.view() as v:
            rows, count, more, _exact = read_range(v, start, stop, limit=limit, keys_only=keys_only,
                                                   max_bytes=1 << 62)
            rev = v.revision
        return RangeResult((KeyValue.from_stored(k, r) for k, r in rows), rev, count, more)

    def count(self, key: Any, end: Any = None, *, prefix: bool = False) -> int:
        start, stop = range_bounds(key, end, prefix)
        with self.view() as v:
            return v.count(start, stop)

    def leases(self) -> tuple[int, dict[int, float]]:
        """``(revision, {lease id: ttl})``, read together."""
        with self.view() as v:
            return v.revision, dict(v.leases())

    def events(self, key: Any, end: Any = None, *, prefix: bool = False, start_revision: int | None = None,
               limit: int = 1000) -> tuple[list[WatchEvent], int]:
        """``(events, next revision)``: the history of the range from ``start_revision``; Compacted if gone.

        The next revision is where a later call goes on once everything up to
        the applied revision was read (for a local follower of the history;
        ``KVClient.watch`` is the blocking, cluster-wide one).
        """
        start, stop = range_bounds(key, end, prefix)
        events: list[WatchEvent] = []
        rev: int | None = start_revision
        sub = 0
        with self.view() as v:
            while True:
                got, (rev, sub) = read_events(v, rev, sub, start, stop, limit=limit - len(events))
                events += [WatchEvent.from_stored(r, e) for r, e in got]
                if len(events) >= limit or rev > v.revision:
                    return events, rev


#: ``listener(revision, lease_changes)``, called after each applied batch on the applying
#: thread: ``lease_changes`` is a tuple of ``(lease id, ttl, or None when revoked)`` of the
#: batch, or None when a snapshot replaced the whole state.  It must be quick and never block.
ApplyListener = Callable[[int, "tuple[tuple[int, float | None], ...] | None"], None]


class ApplyListeners:
    """What the KV service's watch and lease threads hear from a state machine (a mixin)."""

    # Added rarely, from any thread, and read by apply: replaced whole, never changed in place.
    _listeners: tuple[ApplyListener, ...] = ()

    def add_apply_listener(self, listener: ApplyListener) -> None:
        """Call ``listener`` after every applied batch and snapshot install (see :data:`ApplyListener`)."""
        self._listeners = self._listeners + (listener,)

    def remove_apply_listener(self, listener: ApplyListener) -> None:
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    def _notify(self, revision: int, lease_changes: tuple | None) -> None:
        for fn in self._listeners:
            try:
                fn(revision, lease_changes)
            except Exception:  # noqa: BLE001 - a listener never stops applying
                log.exception("KV state machine: an apply listener failed")
