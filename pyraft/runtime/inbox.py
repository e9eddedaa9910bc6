"""Inbox: RaftCore's many-producers, one-consumer queue.

``queue.Queue`` takes a lock and signals a condition on every ``put``; at tens
of thousands of client writes a second that is a good part of a write's cost.
Here ``put`` is a ``deque.append`` (atomic) and a flag test: the lock and the
condition are touched only when the consumer is asleep, waiting for work.

No lost wake-up: the consumer sets ``_sleeping`` under the lock *before* it
looks at the deque a last time and waits; a producer appends *before* it
reads ``_sleeping``.  So either the consumer sees the item, or the producer
sees the flag and notifies under the lock (which the consumer holds until it
waits).

One notify is enough: the producer that notifies clears the flag (under the
lock), so the producers behind it, until the woken consumer runs, only
append.  A consumer woken late (it needs the GIL that a busy producer holds)
otherwise cost every put in between a lock and a notify.  Their items are
in the deque before the consumer drains it, which it does once it runs.
"""
from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable

__all__ = ["Inbox", "Lane"]


def _always() -> bool:
    return True


class Inbox:
    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition(threading.Lock())  # guards the consumer's sleep
        self._sleeping = False  # set by the consumer while it waits, cleared by the producer that wakes it (under _cond)

    def put(self, item: Any) -> None:
        """Any thread: never blocks (unbounded)."""
        self._items.append(item)
        if self._sleeping:
            self._rouse(_always)

    def put_lazy(self, item: Any, urgent: Callable[[], bool]) -> None:
        """``put`` for an item that can wait for the consumer's next wake-up.

        A sleeping consumer (it sleeps until its next timer at the latest) is
        woken only when ``urgent()`` says so.  ``urgent`` runs under the lock
        while the consumer sleeps, so the consumer's state it reads stands
        still.  An awake consumer finds the item at its next drain anyway.
        """
        self._items.append(item)
        if self._sleeping:
            self._rouse(urgent)

    def wake(self) -> None:
        """Wake a sleeping consumer if items wait (those ``put_lazy`` left, when they became urgent)."""
        if self._sleeping:
            self._rouse(self._items.__len__)

    def _rouse(self, should: Callable[[], object]) -> None:
        """Wake the consumer if it still sleeps and ``should()`` (run under the lock) says so."""
        with self._cond:
            if self._sleeping and should():
                self._sleeping = False  # woken: the producers after this one need not notify
                self._cond.notify()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def drain(self, timeout: float, limit: int) -> list:
        """The consumer: up to ``limit`` items, waiting at most ``timeout`` seconds for the first."""
        items = self._items
        if not items and timeout > 0:
            with self._cond:
                self._sleeping = True
                try:
                    if not items:
                        self._cond.wait(timeout)
                finally:
                    self._sleeping = False
        out: list = []
        if items:
            pop = items.popleft
            append = out.append
            try:
                for _ in range(limit):
                    append(pop())
            except IndexError:
                pass
        return out

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """``queue.Queue.get`` for the consumer (``queue.Empty`` when nothing came)."""
        got = self.drain((1e9 if timeout is None else timeout) if block else 0.0, 1)
        if not got:
            raise queue.Empty
        return got[0]

    def get_nowait(self) -> Any:
        return self.get(False)


class Lane:
    """A bound on the inbox items of one kind that come from the network (peers' requests, or replies).

    The inbox itself never refuses: API calls and the node's own
    notifications must always get through.  What peers send goes through a
    lane first: beyond ``limit`` items waiting, :meth:`admit` says no and the
    item is dropped, as a congested network would drop it (Raft sends again).
    """

    __slots__ = ("limit", "_lock", "_admitted", "taken", "dropped")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()  # guards _admitted and dropped: several threads admit
        self._admitted = 0  # items ever admitted
        #: items ever taken off the inbox; written by the consumer only (a stale read only makes admit stricter)
        self.taken = 0
        self.dropped = 0  # items refused

    def admit(self) -> bool:
        """Any thread: True when one more item may wait (and count it), False when it must be dropped."""
        with self._lock:
            if self._admitted - self.taken >= self.limit:
                self.dropped += 1
                return False
            self._admitted += 1
            return True
