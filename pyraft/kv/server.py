"""Serving KV operations on a Raft node: what a ``KVClient`` talks to.

:func:`serve_kv` registers these client ops on the node's transport
(``raft.set_client_handler``); every reply is a ``ClientResponse``.  The role
column is the role each op needs (reader < client < admin):

=====================  ====================================  ======================================  ======
op                     request body                          reply body                              role
=====================  ====================================  ======================================  ======
``kv.write``           a KV command map (:mod:`.commands`):   the command's result once it is         client
                       put, delete, cas, txn, lease_grant,    committed and applied on this node
                       lease_revoke, compact; with
                       ``client``/``seq`` for exactly-once
``kv.get``             ``{"key": k}``                        the value (None when absent), read      reader
                                                             linearizably (ReadIndex, or the
                                                             leader's read lease with
                                                             ``Config.lease_reads``)
``kv.get_stale``       ``{"key": k}``                        this node's value now (may be stale)    reader
``kv.range``           ``{"key", "end", "prefix", "limit",   ``{"kvs": [[key, record], ...],         reader
                       "keys_only", "count_only", "stale"}``  "count", "more", "revision",
                                                             "count_exact"}``
``kv.watch``           ``{"key", "end", "prefix",            ``{"events": [[revision, event], ...],  reader
                       "start_revision", "sub", "limit",      "next": [revision, sub], "revision",
                       "wait"}``                              "compact_revision"}`` (:mod:`.watch`)
``kv.lease_keepalive`` ``{"id": lease_id}``                  the lease's ttl (leader only)           client
``kv.status``          anything                              ``{"id", "state", "term", "leader",     reader
                                                             "leader_addr", "applied", "keys"}``
=====================  ====================================  ======================================  ======

``kv.range`` and ``kv.watch`` send stored forms (:mod:`.encoding`): keys in
their order-preserving encoding, key records (revisions, lease, then the
value's msgpack) and event records; the client decodes them.  Without
``stale`` a range is linearizable (ReadIndex on the leader, as ``kv.get``);
its ``revision`` is the applied index it was read at.  Its ``count`` walks
at most :data:`~pyraft.kv.reads.MAX_COUNT` keys past the rows (with
``count_only``, the whole count): when the range holds more, ``count`` is
the rows plus MAX_COUNT, a lower bound, and ``count_exact`` is False (with
``count_only`` ``more`` is True too); a reply without ``count_exact`` (from
an older node) is exact.  A watch is served by any member from its own
history.

Roles (with CURVE, see ``pyraft.network.Principal``): each op is registered
with the role of the table (``set_client_handler(..., role=...)``): writes,
txns, leases and keepalives need a client key; gets, ranges, watches and
``kv.status`` a reader key.

A node that does not lead answers ``kv.write``, ``kv.get``, a linearizable
``kv.range`` and ``kv.lease_keepalive`` with a ``ForwardToLeader`` error
carrying the leader's id and address when it knows them (see
:func:`pyraft.raft.error_response`).  A refused command answers with a
``KVCommandError`` error (``LeaseNotFound`` for a lease that does not
exist); a write the node will not propose answers ``Overloaded`` (too many
in flight) or ``NoSpace`` (the store is past its quota), decided here,
before proposing (``Raft.client_write_async``).  A ``lease_grant`` with a
ttl below :func:`~pyraft.kv.leases.min_lease_ttl` (three election timeouts)
is refused before proposing.

Threads: handlers run on the transport's server thread and never block: a
write or a read is handed to RaftCore (``client_write_async`` /
``ensure_linearizable_async``) and the reply is sent from the future's
done-callback (the SM worker for writes, RaftCore for gets).  Ranges are
read on the service's ``pyraft-kv-reads-<id>`` thread (round-robin by
client connection, see :class:`_Reads`), watches answered by
``pyraft-kv-watch-<id>`` (:class:`~pyraft.kv.watch.WatchHub`) and leases
kept by ``pyraft-lease-<id>`` (:class:`~pyraft.kv.leases.LeaseKeeper`); the
node's ``shutdown()`` stops them.  ``reply.reply`` may be called from any
thread.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Hashable, TypeVar

from ..codec import ClientRequest, ClientResponse
from ..errors import Overloaded, RaftError, ShutDown
from ..raft import Raft, error_response
from ..types import ServerState
from .commands import _flag
from .encoding import KVCommandError, range_bounds, shown
from .leases import LeaseKeeper, min_lease_ttl
from .reads import MAX_COUNT, check_limit, read_range
from .watch import (DEFAULT_MAX_WATCHERS, MAX_WATCH_LIMIT, MAX_WATCH_REVISION, MAX_WATCH_SUB, MAX_WATCH_WAIT,
                    WatchHub, WatchPoll, connection_of)

__all__ = ["serve_kv", "unserve_kv", "KVService", "KV_OPS", "WRITE_OPS"]

log = logging.getLogger("pyraft.kv")

_P = TypeVar("_P")

KV_OPS = ("kv.write", "kv.get", "kv.get_stale", "kv.status", "kv.range", "kv.watch", "kv.lease_keepalive")
#: The command ops a ``kv.write`` may carry (reads go through ``kv.get`` and ``kv.range``).
WRITE_OPS = ("put", "delete", "cas", "txn", "lease_grant", "lease_revoke", "compact")
#: Range reads waiting for the reads thread of one node, all connections together; beyond, Overloaded.
_MAX_QUEUED_READS = 10_000

_services: "weakref.WeakKeyDictionary[Raft, KVService]" = weakref.WeakKeyDictionary()


def _body(req: ClientRequest) -> dict:
    body = req.body
    if type(body) is not dict or "key" not in body:
        raise KVCommandError(f"{req.op}: the body must be a map with a 'key'")
    return body


class _Reads:
    """The service's reads thread: ranges are read here, off the transport and RaftCore threads.

    Reads queue per client connection (``reply.connection``) and the thread
    takes the connections in turn, one read each: a connection that queues
    many slow ranges delays another's next range by at most one read per
    other connection, not by its whole queue.  :meth:`stop` answers the
    reads still queued with ShutDown (the client retries on another member).
    """

    def __init__(self, node_id: int) -> None:
        self._cond = threading.Condition(threading.Lock())  # guards _queues, _queued and _stopped
        # Each connection's reads in arrival order; the map's order is the turn order (the
        # connection served goes to the back).  A connection leaves it with its last read.
        # invariant: _queued == sum(len(q) for q in _queues.values()) <= _MAX_QUEUED_READS
        self._queues: dict[Hashable, collections.deque[tuple[Callable[[], None], Any]]] = {}
        self._queued = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"pyraft-kv-reads-{node_id}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None], reply: Any) -> None:
        """Queue ``fn`` (which answers ``reply``) behind the other reads of ``reply``'s connection.

        Overloaded when the node has too many queued; ShutDown after stop.
        """
        conn = connection_of(reply)
        with self._cond:
            if self._stopped:
                raise ShutDown("the KV service is stopping")
            if self._queued >= _MAX_QUEUED_READS:
                raise Overloaded(f"{_MAX_QUEUED_READS} range reads are queued on this node; retry later")
            q = self._queues.get(conn)
            if q is None:
                q = self._queues[conn] = collections.deque()
            q.append((fn, reply))
            self._queued += 1
            self._cond.notify()

    def _next(self) -> Callable[[], None] | None:
        """The next read: the first connection's turn (lock held); None once stopped."""
        while not self._queues and not self._stopped:
            self._cond.wait()
        if self._stopped:
            return None
        conn = next(iter(self._queues))
        q = self._queues.pop(conn)
        fn, _reply = q.popleft()
        if q:
            self._queues[conn] = q  # to the back of the turn
        self._queued -= 1
        return fn

    def _run(self) -> None:
        while True:
            with self._cond:
                fn = self._next()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # noqa: BLE001 - fn replies to its own errors; this is a bug's last stop
                log.exception("kv: a read failed")

    def stop(self) -> None:
        """Stop the thread after the read it is doing; the queued reads get ShutDown.  Idempotent."""
        with self._cond:
            self._stopped = True
            queues, self._queues = self._queues, {}
            self._queued = 0
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        for q in queues.values():
            for _fn, reply in q:
                reply.reply(error_response(ShutDown("the KV service stopped")))


class KVService:
    """The KV ops of one node (see the module docstring); ``sm`` is any state machine with ``get(key)``.

    With a state machine that also offers ``view()`` and
    ``add_apply_listener`` (``KVStateMachine``, the test-only
    ``MemoryStateMachine``), ranges, watches and leases are served too.
    """

    def __init__(self, raft: Raft, sm: Any, *, max_watchers: int = DEFAULT_MAX_WATCHERS) -> None:
        self.raft = raft
        self.sm = sm
        self.min_ttl = min_lease_ttl(raft.config)
        self.full = callable(getattr(sm, "view", None)) and callable(getattr(sm, "add_apply_listener", None))
        #: the most keys one kv.range counts (pyraft.kv.reads.MAX_COUNT; tests lower it)
        self.max_count = MAX_COUNT
        self._stop_lock = threading.Lock()  # guards _stopped
        self._stopped = False
        self.reads: _Reads | None = None
        self.watches: WatchHub | None = None
        self.leases: LeaseKeeper | None = None
        if self.full:
            self.reads = _Reads(raft.node_id)
            self.watches = WatchHub(sm, raft.node_id, max_waiting=max_watchers)
            self.leases = LeaseKeeper(raft, sm)

    def handlers(self) -> dict[str, tuple[Callable[[int, ClientRequest, Any], None], str]]:
        """``{op: (handler, the role it needs)}`` (the module docstring's table)."""
        h: dict[str, tuple[Callable[[int, ClientRequest, Any], None], str]] = {
            "kv.write": (self.on_write, "client"), "kv.get": (self.on_get, "reader"),
            "kv.get_stale": (self.on_get_stale, "reader"), "kv.status": (self.on_status, "reader")}
        if self.full:
            h.update({"kv.range": (self.on_range, "reader"), "kv.watch": (self.on_watch, "reader"),
                      "kv.lease_keepalive": (self.on_lease_keepalive, "client")})
        return h

    def _part(self, part: _P | None, op: str) -> _P:
        """``part`` of a full service; a RaftError for an op that a get-only state machine cannot serve."""
        if part is None:
            raise RaftError(f"{op}: this node's state machine serves get only (it has no view() and "
                            f"add_apply_listener())")
        return part

    def stop(self) -> None:
        """Stop the service's threads.  Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        for part in (self.leases, self.watches, self.reads):
            if part is not None:
                part.stop()

    # ------------------------------------------------------------------ writes

    def on_write(self, _from_id: int, req: ClientRequest, reply: Any) -> None:
        cmd = req.body
        if type(cmd) is not dict or cmd.get("op") not in WRITE_OPS:
            reply.reply(error_response(KVCommandError(
                f"kv.write: the body must be a KV command map with op one of {', '.join(WRITE_OPS)}")))
            return
        if cmd["op"] == "lease_grant":
            ttl = cmd.get("ttl")
            if (type(ttl) is int or type(ttl) is float) and math.isfinite(ttl) and ttl < self.min_ttl:
                reply.reply(error_response(KVCommandError(
                    f"lease_grant: ttl {ttl} s is too short for this cluster: at least {self.min_ttl:g} s "
                    f"(three election timeouts), so that a lease outlives a leader change")))
                return
        try:
            fut = self.raft.client_write_async(cmd)
        except RaftError as e:  # ShutDown, Fatal, Overloaded, NoSpace, a refused key
            reply.reply(error_response(e))
            return
        fut.add_done_callback(lambda f: self._reply_write(f, reply))

    @staticmethod
    def _reply_write(fut: Future, reply: Any) -> None:
        try:
            e = fut.exception()
            if e is not None:
                reply.reply(error_response(e))
            else:
                reply.reply(ClientResponse(True, fut.result().result))
        except BaseException as ex:  # noqa: BLE001 - a callback must not raise
            log.exception("kv.write: cannot reply: %s", ex)

    def on_lease_keepalive(self, _from_id: int, req: ClientRequest, reply: Any) -> None:
        body = req.body
        lid = body.get("id") if type(body) is dict else None
        if type(lid) is not int or lid < 0:
            reply.reply(error_response(KVCommandError("kv.lease_keepalive: the body must be {'id': lease id}")))
            return
        self._part(self.leases, "kv.lease_keepalive").keepalive(lid, reply)

    # ------------------------------------------------------------------ reads

    def on_get(self, _from_id: int, req: ClientRequest, reply: Any) -> None:
        key = _body(req)["key"]
        try:
            fut = self.raft.ensure_linearizable_async()
        except RaftError as e:
            reply.reply(error_response(e))
            return
        fut.add_done_callback(lambda f: self._reply_get(f, key, reply))

    def _reply_get(self, fut: Future, key: Any, reply: Any) -> None:
        # Runs once the state machine has applied up to the read index: the read is linearizable.
        try:
            e = fut.exception()
            if e is not None:
                reply.reply(error_response(e))
                return
            reply.reply(ClientResponse(True, self.sm.get(key)))
        except RaftError as ex:
            reply.reply(error_response(ex))
        except BaseException as ex:  # noqa: BLE001 - a callback must not raise
            log.exception("kv.get: cannot reply")
            reply.reply(error_response(RaftError(f"kv.get failed: {type(ex).__name__}: {ex}")))

    def on_get_stale(self, _from_id: int, req: ClientRequest, reply: Any) -> None:
        reply.reply(ClientResponse(True, self.sm.get(_body(req)["key"])))

    def on_range(self, _from_id: int, req: ClientRequest, reply: Any) -> None:
        body = _body(req)
        start, stop = range_bounds(body["key"], body.get("end"), _flag(body, "prefix"))
        try:
            limit = check_limit(body.get("limit"))
        except (TypeError, ValueError) as e:
            raise KVCommandError(f"kv.range: {e}") from None
        keys_only, count_only = _flag(body, "keys_only"), _flag(body, "count_only")
        reads = self._part(self.reads, "kv.range")

        def read() -> None:
            try:
                with self.sm.view() as v:
                    rows, count, more, exact = read_range(v, start, stop, limit=limit, keys_only=keys_only,
                                                          count_only=count_only, max_count=self.max_count)
                    rev = v.revision
                reply.reply(ClientResponse(True, {"kvs": [[k, r] for k, r in rows], "count": count,
                                                  "more": more, "revision": rev, "count_exact": exact}))
            except Exception as e:  # noqa: BLE001 - the reader gets the error, the node goes on
                log.exception("kv.range failed")
                reply.reply(error_response(e if isinstance(e, RaftError) else
                                           RaftError(f"kv.range failed: {type(e).__name__}: {e}")))

        if _flag(body, "stale"):
            reads.submit(read, reply)
            return
        try:
            fut = self.raft.ensure_linearizable_async()
        except RaftError as e:
            reply.reply(error_response(e))
            return

        def linearized(f: Future) -> None:
            e = f.exception()
            if e is not None:
                reply.reply(error_response(e))
                return
            try:
                reads.submit(read, reply)
            except RaftError as ex:
                reply.reply(error_response(ex))

        fut.add_done_callback(linearized)

    def on_watch(self, _from_id: int, req: ClientRequest, reply: Any) -> None:
        body = _body(req)
        start, stop = range_bounds(body["key"], body.get("end"), _flag(body, "prefix"))
        rev, sub = body.get("start_revision"), body.get("sub", 0)
        # The history cannot be read past these (a position is stored in fixed widths): refused here,
        # a poll the hub could not read would only come back as an error later.
        if rev is not None and (type(rev) is not int or not 1 <= rev <= MAX_WATCH_REVISION):
            raise KVCommandError(f"kv.watch: start_revision must be an integer in [1, {MAX_WATCH_REVISION}] "
                                 f"or None, got {shown(rev)}")
        if type(sub) is not int or not 0 <= sub <= MAX_WATCH_SUB or (sub and rev is None):
            raise KVCommandError(f"kv.watch: sub must be an integer in [0, {MAX_WATCH_SUB}] (with a "
                                 f"start_revision), got {shown(sub)}")
        limit = body.get("limit", 1000)
        if type(limit) is not int or not 1 <= limit <= MAX_WATCH_LIMIT:
            raise KVCommandError(f"kv.watch: limit must be an integer in [1, {MAX_WATCH_LIMIT}], got {shown(limit)}")
        wait = body.get("wait", 1.0)
        if type(wait) not in (int, float) or not 0 <= wait <= MAX_WATCH_WAIT:
            raise KVCommandError(f"kv.watch: wait must be a number of seconds in [0, {MAX_WATCH_WAIT:g}], "
                                 f"got {shown(wait)}")
        watches = self._part(self.watches, "kv.watch")
        watches.submit(WatchPoll(start, stop, rev, sub, limit, time.monotonic() + wait, reply))

    def on_status(self, _from_id: int, _req: ClientRequest, reply: Any) -> None:
        m = self.raft.metrics()
        leader_addr = None
        if m.membership is not None and m.current_leader is not None:
            node = m.membership.nodes.get(m.current_leader)
            leader_addr = node.addr if node is not None else None
        try:
            keys = len(self.sm)
        except TypeError:
            keys = None
        reply.reply(ClientResponse(True, {
            "id": m.id, "state": str(m.state), "term": m.current_term, "leader": m.current_leader,
            "leader_addr": leader_addr, "is_leader": m.state == ServerState.LEADER,
            "applied": None if m.last_applied is None else m.last_applied.index,
            "committed": None if m.committed is None else m.committed.index, "keys": keys,
            "watchers": None if self.watches is None else self.watches.waiting,
        }))


def serve_kv(raft: Raft, sm: Any | None = None, *, max_watchers: int = DEFAULT_MAX_WATCHERS) -> KVService:
    """Serve the KV ops (:data:`KV_OPS`) on ``raft``; the service stops with the node.

    ``sm`` (default ``raft.state_machine``) must apply the commands of
    :mod:`pyraft.kv.commands` and offer ``get(key)``: ``KVStateMachine`` or
    the test-only ``MemoryStateMachine`` (with either, ranges, watches and
    leases are served too).  ``max_watchers``: watch polls that may wait on
    this node at once.
    """
    sm = raft.state_machine if sm is None else sm
    if not callable(getattr(sm, "get", None)):
        raise TypeError(f"serve_kv needs a state machine with get(key), got {type(sm).__name__}")
    unserve_kv(raft)
    svc = KVService(raft, sm, max_watchers=max_watchers)
    _services[raft] = svc
    for op, (h, role) in svc.handlers().items():
        raft.set_client_handler(op, h, role=role)
    raft.add_shutdown_hook(svc.stop)
    return svc


def unserve_kv(raft: Raft) -> None:
    """Stop serving the KV ops on ``raft`` (and stop the service's threads)."""
    for op in KV_OPS:
        raft.set_client_handler(op, None)
    svc = _services.pop(raft, None)
    if svc is not None:
        svc.stop()
