"""Serving watches: long polls over the state machine's watch history, on any member.

A watcher pulls: each ``kv.watch`` request names a key range and a position
in the history (a revision and the index of an event within it) and is
answered with the next events, at most ``limit`` of them, as soon as there
are any, or with none once its ``wait`` is over; the reply says where the
next poll goes on.  Every replica holds the same events for a revision
(they are written with the data, in the same apply transaction), so the
client resumes on another node after a leader change at the position it
reached, and nothing is lost or repeated.

Memory stays bounded: nothing is buffered per watcher between polls, a reply
holds at most ``limit`` events and about 4 MiB, at most ``max_waiting``
polls wait on a node at once, and a watcher that falls behind the history's
window gets :class:`~pyraft.errors.Compacted`.

The ``max_waiting`` slots are shared fairly between connections
(``reply.connection``): when they are all taken, a new poll takes the place
of the oldest poll of the connection that holds the most, if that is
another connection holding at least two more polls than the new poll's
own.  That poll ends early, answered as its wait being over: its events so
far, or none, and its ``next`` position, so its client polls again from
there and loses or repeats nothing.  Otherwise the new poll is refused with
:class:`~pyraft.errors.Overloaded` (the client backs off, or tries another
member): so the client that re-polls after its poll ended early finds the
hub full, rather than ending another poll in its turn, and the slots settle
at an even share.  One connection holding every slot never locks another
out.  Applying never waits for watchers: the
state machine's apply listener only sets an event, and only while a poll
waits (O(1)); the hub's thread
``pyraft-kv-watch-<id>`` reads the history and answers the waiting polls.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from ..codec import _MAX_INT, ClientResponse
from ..errors import Compacted, Overloaded, RaftError, ShutDown
from ..raft import error_response
from .reads import read_events
from .statemachine import _SUB

__all__ = ["WatchHub", "connection_of", "DEFAULT_MAX_WATCHERS", "MAX_WATCH_WAIT", "MAX_WATCH_LIMIT", "MAX_WATCH_REVISION",
           "MAX_WATCH_SUB"]

log = logging.getLogger("pyraft.kv")

#: Polls that may wait on one node at once.
DEFAULT_MAX_WATCHERS = 1024
#: The longest a poll waits for an event (seconds).
MAX_WATCH_WAIT = 30.0
#: The most events one reply holds.
MAX_WATCH_LIMIT = 10_000
#: The largest revision a poll may start at: revisions are log indexes (at most 2**63 - 1).
MAX_WATCH_REVISION = _MAX_INT
#: The largest ``sub`` (an event's number within its revision) a poll may name: the history
#: stores it in ``_SUB``'s 4 bytes, so 2**32 - 1.
MAX_WATCH_SUB = 2 ** (8 * _SUB.size) - 1


def connection_of(reply: Any) -> Hashable:
    """The client connection a request came on (``reply.connection``, opaque and hashable).

    A reply handle without one (a test's own, calling a handler directly)
    counts as one anonymous connection, None.
    """
    return getattr(reply, "connection", None)


@dataclass(slots=True)
class WatchPoll:
    """One waiting ``kv.watch`` request; ``revision``/``sub`` advance as the hub reads on."""

    start: bytes  # the key range [start, stop), stored forms
    stop: bytes
    revision: int | None  # None: from the node's next revision
    sub: int
    limit: int
    deadline: float  # time.monotonic() when it is answered even without events
    reply: Any


class WatchHub:
    """Answers the ``kv.watch`` polls of one node (see the module docstring).

    ``sm`` offers ``view()`` and ``add_apply_listener``.  :meth:`submit` is
    called from the transport's thread; everything else happens on the hub's
    own thread.  :meth:`stop` answers the waiting polls with ShutDown.

    Only the hub's thread answers a poll, even one that ends early to free
    its slot (:meth:`submit` moves its deadline to now): the thread may be
    reading that poll's events at that moment, and its reply must carry them
    and the ``next`` position past them.
    """

    def __init__(self, sm: Any, node_id: int, *, max_waiting: int = DEFAULT_MAX_WATCHERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if type(max_waiting) is not int or max_waiting < 1:
            raise ValueError(f"max_waiting must be an integer >= 1, got {max_waiting!r}")
        self._sm = sm
        self._clock = clock
        self._max = max_waiting
        self._lock = threading.Lock()  # guards _polls, _held, _holding and _stopped
        # Every poll not answered yet, in arrival order (those ending early too, until answered).
        self._polls: list[WatchPoll] = []
        # The polls holding a slot, by connection, oldest first (keyed by id(poll): a WatchPoll is
        # not hashable); a connection leaves the map with its last poll.
        # invariant: _holding == sum(len(d) for d in _held.values()) <= _max
        self._held: dict[Hashable, dict[int, WatchPoll]] = {}
        self._holding = 0
        self._stopped = False
        # Set by apply (new events may exist), submit and stop; cleared by the hub's thread
        # before it reads, so a wake-up during a read is never lost.
        self._wake = threading.Event()
        sm.add_apply_listener(self._on_applied)
        self._thread = threading.Thread(target=self._run, name=f"pyraft-kv-watch-{node_id}", daemon=True)
        self._thread.start()

    def _on_applied(self, _revision: int, _lease_changes: Any) -> None:
        # With no poll waiting there is nothing to read: waking the hub for each applied
        # batch would cost a thread switch per batch on every member.  A poll submitted
        # after this check wakes the hub itself, and its read sees this batch (the
        # listeners run after the batch has committed).
        if self._polls:
            self._wake.set()

    def submit(self, poll: WatchPoll) -> None:
        """Queue a poll, ending another connection's early when every slot is taken (the module docstring).

        Overloaded when every slot is taken and no other connection holds at
        least two more polls than the poll's own; ShutDown after stop.
        """
        conn = connection_of(poll.reply)
        with self._lock:
            if self._stopped:
                raise ShutDown("the watch service is stopping")
            mine = self._held.get(conn)
            if self._holding >= self._max:
                own = len(mine) if mine else 0
                heaviest = max(self._held, key=lambda c: len(self._held[c]))
                # Never a poll of the new poll's own connection, and only from one that would
                # still hold at least as many: a client re-polling after its poll ended early
                # then finds the hub full (Overloaded) instead of ending another in turn.
                if heaviest == conn or len(self._held[heaviest]) < own + 2:
                    raise Overloaded(f"{self._max} watch polls are waiting on this node already, shared "
                                     f"between connections (max_watchers); retry later or on another node")
                self._end_early(heaviest)
            if mine is None:
                mine = self._held[conn] = {}
            mine[id(poll)] = poll
            self._holding += 1
            self._polls.append(poll)
        self._wake.set()

    def _end_early(self, conn: Hashable) -> None:
        """Free the slot of ``conn``'s oldest poll: the hub's thread answers it at once (lock held)."""
        held = self._held[conn]
        p = held.pop(next(iter(held)))
        if not held:
            del self._held[conn]
        self._holding -= 1
        p.deadline = float("-inf")  # read by the hub's thread: its wait is over

    def _release(self, p: WatchPoll) -> None:
        """Forget an answered poll's slot, if it still holds one (lock held)."""
        conn = connection_of(p.reply)
        held = self._held.get(conn)
        if held is not None and held.pop(id(p), None) is not None:
            self._holding -= 1
            if not held:
                del self._held[conn]

    @property
    def waiting(self) -> int:
        """Polls holding a slot (those ended early to free theirs are no longer counted)."""
        with self._lock:
            return self._holding

    def stop(self) -> None:
        """Stop the thread; waiting polls get ShutDown (the client resumes elsewhere).  Idempotent."""
        with self._lock:
            self._stopped = True
        self._sm.remove_apply_listener(self._on_applied)
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------ the hub's thread

    def _run(self) -> None:
        while True:
            with self._lock:
                stopped = self._stopped
                polls = list(self._polls)
            if stopped:
                break
            now = self._clock()
            timeout = min((p.deadline for p in polls), default=now + 1.0) - now
            if timeout > 0:
                self._wake.wait(timeout)
            self._wake.clear()
            with self._lock:
                polls = list(self._polls)
            if polls:
                try:
                    done = self._serve(polls)
                except Exception as e:  # noqa: BLE001 - a failing read answers the polls, never kills the hub
                    log.exception("watch: reading the history failed")
                    done = [(p, error_response(e)) for p in polls]
                if done:
                    with self._lock:
                        gone = {id(p) for p, _ in done}
                        self._polls = [p for p in self._polls if id(p) not in gone]
                        for p, _ in done:
                            self._release(p)
                    for p, resp in done:
                        _send(p, resp)
        with self._lock:
            polls, self._polls = self._polls, []
            self._held.clear()
            self._holding = 0
        for p in polls:
            _send(p, error_response(ShutDown("the watch service stopped")))

    def _serve(self, polls: list[WatchPoll]) -> list[tuple[WatchPoll, ClientResponse]]:
        """Read the history for each poll (one read for all); the polls to answer now, with their replies.

        A poll whose read fails is answered with the error, alone: the other polls are served as
        usual (only a failure of the view itself, raised from here, answers them all).
        """
        done: list[tuple[WatchPoll, ClientResponse]] = []
        now = self._clock()
        with self._sm.view() as v:
            for p in polls:
                if p.revision is not None and p.revision > v.revision and p.deadline > now:
                    continue  # nothing new for it
                try:
                    events, (p.revision, p.sub) = read_events(v, p.revision, p.sub, p.start, p.stop,
                                                              limit=p.limit)
                except Compacted as e:
                    done.append((p, error_response(e)))
                    continue
                except Exception as e:  # noqa: BLE001 - one poll's failure is its own, not the other polls'
                    log.exception("watch: reading the history for a poll at (%s, %s) failed", p.revision, p.sub)
                    done.append((p, error_response(e if isinstance(e, RaftError) else
                                                   RaftError(f"kv.watch failed: {type(e).__name__}: {e}"))))
                    continue
                # Answer with events, or with progress when the scan stopped early (the client polls
                # again at once), or with nothing when its wait is over.
                if events or p.revision <= v.revision or p.deadline <= now:
                    done.append((p, ClientResponse(True, {
                        "events": [[r, e] for r, e in events], "next": [p.revision, p.sub],
                        "revision": v.revision, "compact_revision": v.history_start})))
        return done


def _send(p: WatchPoll, resp: ClientResponse) -> None:
    try:
        p.reply.reply(resp)
    except Exception:  # noqa: BLE001 - a reply that cannot go out is the client's loss only
        log.exception("watch: cannot reply")
