"""Lease expiry: decided by the leader with its own clock, written to the log as a revoke.

Leases live in the state machine (granted by a ``lease_grant`` entry, whose
revision is the lease id; removed by a ``lease_revoke`` entry), so every
replica has the same leases and keys.  Their deadlines do not: those are
kept by the :class:`LeaseKeeper` of the node that leads, in memory only, and
a replica's clock never decides anything.

- Keepalives (``kv.lease_keepalive``) go to the leader and are not logged.
  Each first confirms leadership with a ReadIndex round (a quorum heard from
  this leader after the request arrived), then sets the lease's deadline to
  now + ttl and answers the ttl.  So a lease is never revoked before the
  client's send time of its last successful keepalive + ttl, even across a
  leader change: a new leader was elected after that round, and
- a new leader starts every lease's deadline at now + ttl when it takes over
  (once a ReadIndex round of its own term shows that its state machine holds
  every lease granted before), as etcd does: it never expires a lease
  earlier than the old leader would have.
- When a deadline passes, the keeper proposes ``{"op": "lease_revoke", "id":
  id}`` (retried while it is not applied) and from then on refuses
  keepalives for that lease with :class:`~pyraft.kv.LeaseNotFound`.  The
  revoke deletes the lease's keys on every replica, at one revision.

Memory: a keepalive only moves the lease's deadline in ``_deadlines``; it
pushes nothing on the heap, which holds one entry per lease (at or before
its deadline, or its revoke's retry time).  When an entry comes up for a
lease whose deadline has moved since, it is pushed again at that deadline.
So a client that renews a long lease many times a second costs nothing
that stays (a heap entry per keepalive would stay until its ttl, up to
:data:`~pyraft.kv.commands.MAX_LEASE_TTL`), and a lease is revoked at the
same time as with an entry per deadline.  The entries of revoked leases
are dropped when they come up, or all at once when they outnumber the
live leases' by ``_HEAP_SLACK``, so granting and revoking long leases
does not grow the heap either.

Threads: one ``pyraft-lease-<id>`` thread per node, idle unless the node
leads.  The state machine's apply listener and the ReadIndex callbacks only
put items on its queue, so applying never waits for it.
"""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from typing import Any, Callable

from ..codec import ClientResponse
from ..errors import ForwardToLeader, LeaseNotFound, Overloaded, RaftError, ShutDown
from ..raft import Raft, error_response
from ..types import ServerState

__all__ = ["LeaseKeeper", "min_lease_ttl"]

log = logging.getLogger("pyraft.kv")

#: A revoke proposed for an expired lease that is still there this long after is proposed again.
_REVOKE_RETRY = 1.0
#: At most this many revokes are proposed per tick (the rest wait for the next ticks).
_REVOKES_PER_TICK = 256
#: Keepalives that may wait for a new leader to take over its leases.
_MAX_PENDING = 10_000
#: The heap is rebuilt from the live leases once the entries left by revoked ones outnumber theirs by more than this.
_HEAP_SLACK = 1024


def min_lease_ttl(config: Any) -> float:
    """The shortest ttl the KV service grants: three of the longest election timeouts, at least 1 s.

    A lease must outlive the election that follows its leader's death, and the
    keepalive that then finds the new leader.
    """
    from .commands import MIN_LEASE_TTL
    return max(MIN_LEASE_TTL, 3 * config.election_timeout[1])


class LeaseKeeper:
    """Keeps lease deadlines while this node leads, and revokes expired leases (module docstring)."""

    def __init__(self, raft: Raft, sm: Any, *, tick: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self._raft = raft
        self._sm = sm
        self._tick = tick
        self._clock = clock
        #: items for the keeper thread: ("applied", revision, changes), ("keepalive", id, reply, read future),
        #: ("activated", term, read future), ("stop",)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        # The rest belongs to the keeper thread alone.
        self._term: int | None = None  # the term this node leads in with its deadlines loaded; None: inactive
        self._revision = 0  # the revision the loaded leases were read at
        self._activating: int | None = None  # the term an activation read was started for
        self._ttls: dict[int, float] = {}
        self._deadlines: dict[int, float] = {}  # lease -> its current deadline (only moves later)
        self._expiring: dict[int, float] = {}  # lease -> when its revoke is proposed again
        # (time, lease): one entry per lease, at or before its deadline, or at its retry time when
        # expiring; plus the entries of leases revoked since, dropped when they come up.
        self._heap: list[tuple[float, int]] = []
        self._pending: list[tuple[int, Any]] = []  # keepalives waiting for the activation
        sm.add_apply_listener(self._on_applied)
        self._thread = threading.Thread(target=self._run, name=f"pyraft-lease-{raft.node_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ other threads

    def _on_applied(self, revision: int, changes: Any) -> None:
        if changes is None or changes:
            self._q.put(("applied", revision, changes))

    def keepalive(self, lease_id: int, reply: Any) -> None:
        """Answer a keepalive for ``lease_id`` through ``reply`` (never blocks)."""
        try:
            fut = self._raft.ensure_linearizable_async()
        except RaftError as e:
            reply.reply(error_response(e))
            return
        fut.add_done_callback(lambda f: self._q.put(("keepalive", lease_id, reply, f)))

    def stop(self) -> None:
        """Stop the thread (waiting keepalives get ShutDown).  Idempotent."""
        self._sm.remove_apply_listener(self._on_applied)
        self._q.put(("stop",))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------ the keeper thread

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._q.get(timeout=self._tick)
                except queue.Empty:
                    item = None
                while item is not None:
                    if item[0] == "stop":
                        return
                    self._handle(item)
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        item = None
                self._check_leadership()
                if self._term is not None:
                    self._expire(self._clock())
        except Exception:  # noqa: BLE001
            log.exception("lease keeper stopped")
        finally:
            for _lid, reply in self._pending:
                reply.reply(error_response(ShutDown("the lease keeper stopped")))
            self._pending = []

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        now = self._clock()
        if kind == "applied":
            _, revision, changes = item
            if self._term is None or revision <= self._revision:
                return
            if changes is None:  # a snapshot replaced everything: read the leases again
                self._load(now)
                return
            for lid, ttl in changes:
                if ttl is None:
                    self._forget(lid)
                else:
                    self._ttls[lid] = ttl
                    self._set_deadline(lid, now + ttl)
        elif kind == "keepalive":
            _, lid, reply, fut = item
            e = fut.exception()
            if e is not None:
                reply.reply(error_response(e))
                return
            m = self._raft.metrics()
            if m.state != ServerState.LEADER:
                reply.reply(error_response(self._not_leader(m)))
            elif self._term != m.current_term:
                if len(self._pending) >= _MAX_PENDING:
                    reply.reply(error_response(Overloaded("too many keepalives wait for this new leader")))
                    return
                self._pending.append((lid, reply))
                self._activate(m.current_term)
            else:
                self._renew(lid, reply, now)
        elif kind == "activated":
            _, term, fut = item
            if self._activating == term:
                self._activating = None
            m = self._raft.metrics()
            if fut.exception() is None and m.state == ServerState.LEADER and m.current_term == term:
                self._term = term
                self._load(now)
                log.info("lease keeper: leading in term %s with %d lease(s), deadlines start now", term,
                         len(self._ttls))
                pending, self._pending = self._pending, []
                for lid, reply in pending:
                    self._renew(lid, reply, now)

    def _check_leadership(self) -> None:
        m = self._raft.metrics()
        leading = m.state == ServerState.LEADER
        if self._term is not None and (not leading or m.current_term != self._term):
            self._deactivate()
        if leading and self._term is None:
            self._activate(m.current_term)
        if not leading and self._pending:
            pending, self._pending = self._pending, []
            err = error_response(self._not_leader(m))
            for _lid, reply in pending:
                reply.reply(err)

    def _activate(self, term: int) -> None:
        """Start a ReadIndex round of ``term``: once it is done the state machine holds every lease."""
        if self._activating == term:
            return
        try:
            fut = self._raft.ensure_linearizable_async()
        except RaftError:
            return  # stopping; _check_leadership tries again at the next tick if still leading
        self._activating = term
        fut.add_done_callback(lambda f: self._q.put(("activated", term, f)))

    def _load(self, now: float) -> None:
        self._revision, leases = self._sm.leases()
        self._ttls = leases
        self._deadlines = {}
        self._expiring = {}
        self._heap = []
        for lid, ttl in leases.items():
            self._set_deadline(lid, now + ttl)

    def _deactivate(self) -> None:
        log.info("lease keeper: no longer leading; %d lease deadline(s) dropped", len(self._ttls))
        self._term = None
        self._activating = None
        self._ttls, self._deadlines, self._expiring, self._heap = {}, {}, {}, []

    def _set_deadline(self, lid: int, deadline: float) -> None:
        """Move the lease's deadline to ``deadline`` if that is later; a lease new here gets its heap entry.

        A lease that has an entry gets no other: :meth:`_expire` moves the
        entry to the deadline when it comes up (module docstring, Memory).
        """
        old = self._deadlines.get(lid)
        if old is None:
            heapq.heappush(self._heap, (deadline, lid))
        elif old >= deadline:
            return
        self._deadlines[lid] = deadline

    def _forget(self, lid: int) -> None:
        """Drop a revoked lease.  Its heap entry stays until it comes up, unless such entries pile up."""
        self._ttls.pop(lid, None)
        self._deadlines.pop(lid, None)
        self._expiring.pop(lid, None)
        if len(self._heap) > 2 * len(self._ttls) + _HEAP_SLACK:
            self._heap = [(self._expiring.get(live, t), live) for live, t in self._deadlines.items()]
            heapq.heapify(self._heap)

    def _renew(self, lid: int, reply: Any, now: float) -> None:
        ttl = self._ttls.get(lid)
        if ttl is None or lid in self._expiring:
            reply.reply(error_response(LeaseNotFound(f"lease {lid} not found (expired or revoked)")))
            return
        self._set_deadline(lid, now + ttl)
        reply.reply(ClientResponse(True, ttl))

    def _expire(self, now: float) -> None:
        heap = self._heap
        proposed = 0
        while heap and heap[0][0] <= now and proposed < _REVOKES_PER_TICK:
            t, lid = heapq.heappop(heap)
            if lid not in self._ttls:
                continue  # revoked meanwhile
            retry = self._expiring.get(lid)
            if retry is None and self._deadlines[lid] > now:
                heapq.heappush(heap, (self._deadlines[lid], lid))  # renewed since: the entry moves to its deadline
                continue
            try:
                self._raft.client_write_async({"op": "lease_revoke", "id": lid})
            except RaftError as e:  # Overloaded, stopping: try again soon
                log.debug("lease keeper: cannot propose the revoke of lease %s yet: %s", lid, e)
            else:
                proposed += 1
                if retry is None:
                    log.info("lease keeper: lease %s expired; revoking it", lid)
            self._expiring[lid] = now + _REVOKE_RETRY
            heapq.heappush(heap, (now + _REVOKE_RETRY, lid))

    def _not_leader(self, m: Any) -> ForwardToLeader:
        node = None
        if m.membership is not None and m.current_leader is not None:
            node = m.membership.nodes.get(m.current_leader)
        return ForwardToLeader(m.current_leader, node)
