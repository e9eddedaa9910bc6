"""Getting replicated calls and ReadIndex requests to the leader, from any node.

One dispatcher thread per attached node, ``pyraft-objects-<id>``, owns the
node's one connection to the leader (a transport connection is used by one
thread) and every pending request::

    user thread ─submit─► inbox ─► dispatcher ─┬─ leader here: raft.client_write_async
         ▲                                      │                (or ensure_linearizable_async)
         │                                      └─ leader elsewhere: ClientRequest("objects.call" or
         │                                          "objects.read_index") ──► its on_*_request handler
         └── ObjectStateMachine.apply completes the call's future when THIS node applies its entry

A call is finished only by this node applying its entry (the state
machine's waiter), never by a reply: so the result is the local one and a
local read right after it sees the call.  Until then the dispatcher
re-sends it to whoever leads (following ``ForwardToLeader`` hints and this
node's metrics), after ``try_timeout`` without an answer or at once when the
leader changes; the state machine's sessions make every copy after the
first a no-op.  At the call's deadline its future fails with ``Timeout``
(the call may still apply, at most once).

The request handlers run on the transport's server thread and never block:
they stamp the leader's clock into the command, propose it, and reply from
the future's callback with ``[term, index, outcome]`` (or a typed error).
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Protocol

from ..codec import ClientRequest, ClientResponse
from ..network import TRUSTED
from ..errors import (CodecError, Fatal, ForwardToLeader, Overloaded, PermissionDenied, RaftError, RequestTooLarge,
                      ShutDown, Timeout)
from ..raft import error_response
from ..types import LogId, Node, ServerState
from ..runtime.futures import fail, succeed
from .base import _GRACE, outcome_to_wire

log = logging.getLogger("pyraft.objects")

OP_CALL = "objects.call"
OP_READ_INDEX = "objects.read_index"

_POLL = 0.05  # longest the dispatcher sleeps: it notices a stopped node within this
#: Requests sent to the leader and not answered yet, at most: the rest wait here, in order.
#: The ZeroMQ transport answers a connection past 1,024 requests in flight with Overloaded
#: (max_client_requests_per_connection); a window below that never meets it.
MAX_SENT = 512
#: Errors a leader answers that retrying cannot change: the call fails with them at once.
_FINAL_ERRORS = {"PermissionDenied": PermissionDenied, "RequestTooLarge": RequestTooLarge}


class _Pending:
    """One call or ReadIndex request until its future is done.

    ``rid``/``token``: the attempt in flight (remote request id, or the
    marker of a local proposal); ``acked``: the leader applied the call, only
    the local apply is awaited.
    """

    __slots__ = ("pid", "kind", "seq", "body", "future", "deadline", "next_try", "try_deadline", "rid",
                 "token", "target", "hint", "acked", "choose_version")

    def __init__(self, pid: int, kind: str, seq: int, body: dict | None, future: Future,
                 deadline: float | None, choose_version: Callable[[], int] | None = None) -> None:
        self.choose_version = choose_version
        self.pid = pid
        self.kind = kind
        self.seq = seq
        self.body = body
        self.future = future
        self.deadline = deadline
        self.next_try = 0.0
        self.try_deadline = 0.0
        self.rid: int | None = None
        self.token: object | None = None
        self.target: int | None = None
        self.hint: tuple[int, Node | None] | None = None
        self.acked = False

    @property
    def in_flight(self) -> bool:
        return self.rid is not None or self.token is not None


class CallerHost(Protocol):
    """What the dispatcher uses of its ObjectStateMachine (which is one, and starts it)."""

    #: the clock the leader stamps calls with (``ObjectStateMachine(clock=...)``)
    _clock: Callable[[], float]

    def _register_waiter(self, seq: int, fut: Future) -> None:
        """Complete ``fut`` when the call with sequence number ``seq`` is applied here."""

    def _drop_waiter(self, seq: int) -> None:
        """Forget the waiter of ``seq`` (its call failed before it was applied)."""


class Caller:
    """The dispatcher of one attached node (see the module docstring)."""

    def __init__(self, sm: CallerHost, raft: Any, client: bytes) -> None:
        self.sm = sm
        self.raft = raft
        self.client = client
        self.node_id: int = raft.node_id
        cfg = raft.config
        self.try_timeout = max(2 * cfg.rpc_timeout, 4 * cfg.election_timeout[1])
        self.backoff = max(0.005, min(cfg.heartbeat_interval, 0.1))
        # _lock guards _inbox, _next_seq, _stop_requested and _stop_error.
        self._lock = threading.Lock()
        self._inbox: collections.deque[tuple] = collections.deque()
        self._next_seq = 1
        self._stop_requested = False
        self._stop_error: RaftError | None = None
        self._kick = threading.Event()
        self._pids = itertools.count(1)
        # Owned by the dispatcher thread (other threads only wake _conn):
        self._conn: Any = None
        self._conn_target: tuple[int, str] | None = None
        self._pending: dict[int, _Pending] = {}
        self._calls: dict[int, _Pending] = {}  # by seq
        self._seq_heap: list[int] = []         # lazy min-heap of seqs in _calls (the floor)
        self._inflight: dict[int, _Pending] = {}  # by request id on _conn
        self._announcement: Future | None = None  # this node's version announcement, until applied
        self._thread = threading.Thread(target=self._run, name=f"pyraft-objects-{self.node_id}", daemon=True)

    # ------------------------------------------------------------------ any thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Fail everything pending with ShutDown and end the thread.  Idempotent."""
        with self._lock:
            self._stop_requested = True
            if self._stop_error is None:
                self._stop_error = ShutDown(f"node {self.node_id}: the object call dispatcher was stopped")
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def check_running(self) -> None:
        with self._lock:
            if self._stop_error is not None:
                raise self._stop_error

    def submit_call(self, body: dict, timeout: float | None,
                    choose_version: Callable[[], int] | None = None) -> Future:
        """Queue a call; ``choose_version()`` fills ``body["v"]`` before the first send."""
        fut: Future = Future()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._stop_error is not None:
                raise self._stop_error
            seq = self._next_seq
            self._next_seq += 1
            body["c"] = self.client
            body["s"] = seq
            fut._pyraft_call = (self.client, seq)  # type: ignore[attr-defined]  # for tests and debugging
            p = _Pending(next(self._pids), "call", seq, body, fut, deadline, choose_version)
            self.sm._register_waiter(seq, fut)
            self._inbox.append(("new", p))
        self._wake()
        return fut

    def announce(self, body: dict) -> None:
        """Propose this node's version announcement; retried until it applies or the node stops.

        Calls submitted meanwhile wait for it (see ``_attempt``).
        """
        fut = self.submit_call(body, None)
        self._announcement = fut
        fut.add_done_callback(lambda f: self._post(("announced",)))

        def failed(f: Future) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.debug("node %s: version announcement failed: %s", self.node_id, f.exception())
        fut.add_done_callback(failed)

    def read_index(self, timeout: float | None) -> LogId:
        """A read index from the leader (blocking)."""
        fut: Future = Future()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._stop_error is not None:
                raise self._stop_error
            self._inbox.append(("new", _Pending(next(self._pids), "read", 0, None, fut, deadline)))
        self._wake()
        try:
            return fut.result(None if timeout is None else timeout + _GRACE)
        except TimeoutError:
            raise Timeout(f"node {self.node_id}: no read index within {timeout} s") from None

    def _post(self, item: tuple) -> None:
        with self._lock:
            self._inbox.append(item)
        self._wake()

    def _wake(self) -> None:
        self._kick.set()
        conn = self._conn
        if conn is not None:
            conn.wake()

    # ------------------------------------------------------------------ request handlers (leader side)

    def on_call_request(self, from_id: int, req: ClientRequest, reply: Any) -> None:
        """``objects.call``: stamp the leader's time, propose, reply ``[term, index, outcome]`` once applied here."""
        body = req.body
        if not (isinstance(body, dict) and body.get("k") in ("call", "hello")):
            reply.reply(error_response(RaftError("malformed objects.call request")))
            return
        if body["k"] == "hello":
            # Node N's versions decide which calls every node runs: only node N announces them.
            # (Without authentication every sender is TRUSTED: the network is the trust boundary.)
            p = getattr(reply, "principal", TRUSTED)
            if p.key is not None and not (p.role == "peer" and p.node_id == body.get("n")):
                reply.reply(error_response(PermissionDenied(
                    f"objects.call: a version announcement for node {body.get('n')!r} comes from that node's "
                    f"peer key only")))
                return
        m = self.raft.metrics()
        if m.state != ServerState.LEADER:
            # Before the command is checked: only the leader's verdict on a call's form is
            # final for the caller (a node elsewhere may run other code, in a rolling upgrade).
            leader = self._leader(m)
            reply.reply(error_response(ForwardToLeader(
                leader[0] if leader else None, leader[1] if leader else None,
                f"objects.call: node {self.node_id} does not lead")))
            return
        cmd = dict(body)
        cmd["t"] = self.sm._clock()
        try:
            fut = self.raft.client_write_async(cmd)  # the state machine's check_command refuses a malformed one
        except RaftError as e:
            reply.reply(error_response(e))
            return

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is None:
                r = f.result()
                reply.reply(ClientResponse(True, [r.log_id.term, r.log_id.index, outcome_to_wire(True, r.result)]))
                return
            lid = getattr(exc, "pyraft_log_id", None)
            if isinstance(lid, LogId):  # applied; the method raised (or a VersionMismatch)
                reply.reply(ClientResponse(True, [lid.term, lid.index, outcome_to_wire(False, exc)]))
            else:
                reply.reply(error_response(exc))

        fut.add_done_callback(done)

    def on_read_index_request(self, from_id: int, req: ClientRequest, reply: Any) -> None:
        """``objects.read_index``: ReadIndex on this (leader) node; reply ``[term, index]``."""
        fut = self.raft.ensure_linearizable_async()

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                reply.reply(error_response(exc))
                return
            lid = f.result()
            reply.reply(ClientResponse(True, [0, 0] if lid is None else [lid.term, lid.index]))

        fut.add_done_callback(done)

    # ------------------------------------------------------------------ the dispatcher thread

    def _run(self) -> None:
        err: RaftError | None = None
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - fail every waiting call visibly
            log.exception("node %s: the object call dispatcher died", self.node_id)
            err = Fatal(f"node {self.node_id}: the object call dispatcher died: {e!r}")
        finally:
            with self._lock:
                self._stop_requested = True
                if err is not None or self._stop_error is None:
                    self._stop_error = err or ShutDown(f"node {self.node_id} has been shut down")
                stop_error = self._stop_error
                items = list(self._inbox)
                self._inbox.clear()
            for it in items:
                if it[0] == "new":
                    self._add(it[1])
            for p in list(self._pending.values()):
                self._fail(p, stop_error)
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _loop(self) -> None:
        while True:
            self._kick.clear()
            with self._lock:
                if self._stop_requested:
                    return
                items = list(self._inbox)
                self._inbox.clear()
            for it in items:
                if it[0] == "new":
                    self._add(it[1])
                elif it[0] == "done":
                    self._on_local_done(*it[1:])
                else:  # "announced": the calls held for it go now
                    for p in self._pending.values():
                        if p.choose_version is not None:
                            p.next_try = 0.0
            m = self.raft.metrics()
            if m.state in (ServerState.SHUTDOWN, ServerState.FATAL):
                with self._lock:
                    self._stop_error = (Fatal(f"node {self.node_id} stopped: {m.error}")
                                        if m.state == ServerState.FATAL
                                        else ShutDown(f"node {self.node_id} has been shut down"))
                return
            now = time.monotonic()
            wait = self._sweep(now, m)
            self._receive(wait)

    def _add(self, p: _Pending) -> None:
        self._pending[p.pid] = p
        if p.kind == "call":
            self._calls[p.seq] = p
            heapq.heappush(self._seq_heap, p.seq)

    def _remove(self, p: _Pending) -> None:
        self._pending.pop(p.pid, None)
        if p.kind == "call":
            self._calls.pop(p.seq, None)
        if p.rid is not None:
            self._inflight.pop(p.rid, None)
            p.rid = None
        p.token = None

    def _fail(self, p: _Pending, exc: BaseException) -> None:
        if p.kind == "call":
            self.sm._drop_waiter(p.seq)
        fail(p.future, exc)
        self._remove(p)

    def _floor(self) -> int:
        """The smallest seq this node still waits for: every call below it is finished."""
        h = self._seq_heap
        while h and h[0] not in self._calls:
            heapq.heappop(h)
        return h[0] if h else self._next_seq

    def _leader(self, m: Any) -> tuple[int, Node | None] | None:
        if m.state == ServerState.LEADER:
            return self.node_id, None
        lid = m.current_leader
        if lid is None or lid == self.node_id or m.membership is None:
            return None
        node = m.membership.nodes.get(lid)
        return None if node is None else (lid, node)

    def _sweep(self, now: float, m: Any) -> float:
        """Expire, retry and send what is due; return how long to wait for replies."""
        leader = self._leader(m)
        wake_at = now + _POLL
        for p in list(self._pending.values()):
            if p.future.done():  # applied here (call) or answered (read), or cancelled
                self._remove(p)
                continue
            if p.deadline is not None and now >= p.deadline:
                what = "call" if p.kind == "call" else "read index"
                self._fail(p, Timeout(f"node {self.node_id}: the {what} did not complete in time; "
                                      f"a call may still be applied, at most once"))
                continue
            if p.acked:
                if p.deadline is not None:
                    wake_at = min(wake_at, p.deadline)
                continue
            if p.in_flight:
                moved = leader is not None and p.target != leader[0]
                if now < p.try_deadline and not moved:
                    wake_at = min(wake_at, p.try_deadline)
                    continue
                self._forget_attempt(p)
                p.next_try = now
            if now >= p.next_try:
                self._attempt(p, m, leader, now)
            wake_at = min(wake_at, p.try_deadline if p.in_flight else p.next_try)
            if p.deadline is not None:
                wake_at = min(wake_at, p.deadline)
        return max(0.0, wake_at - now)

    def _forget_attempt(self, p: _Pending) -> None:
        if p.rid is not None:
            self._inflight.pop(p.rid, None)
            p.rid = None
        p.token = None

    def _attempt(self, p: _Pending, m: Any, leader: tuple[int, Node | None] | None, now: float) -> None:
        if p.kind == "call" and p.seq >= self._floor() + MAX_SENT:
            # Never a call MAX_SENT or more above the oldest one waiting: every replica keeps the
            # outcomes above a client's floor, at most MAX_SESSION_OUTCOMES (twice this) of them,
            # and drops the oldest past that.  So the oldest call is sent first and never starved.
            p.next_try = now + _POLL
            return
        if p.choose_version is not None:
            ann = self._announcement
            if ann is not None and not ann.done():
                p.next_try = now + self.backoff  # the version table here is not current yet
                return
            assert p.body is not None
            p.body["v"], p.choose_version = p.choose_version(), None
        target, p.hint = (p.hint or leader), None
        if target is None:
            p.next_try = now + self.backoff
            return
        tid, node = target
        if tid == self.node_id:
            if m.state != ServerState.LEADER:
                p.next_try = now + self.backoff
                return
            self._attempt_local(p, now)
            return
        if node is None and m.membership is not None:
            node = m.membership.nodes.get(tid)
        if node is None:
            p.next_try = now + self.backoff
            return
        if len(self._inflight) >= MAX_SENT:  # the window is full: wait for replies
            p.next_try = now + _POLL
            return
        if p.kind == "call":
            assert p.body is not None
            req = ClientRequest(OP_CALL, dict(p.body, f=self._floor()))
        else:
            req = ClientRequest(OP_READ_INDEX, None)
        try:
            rid = self._connect(tid, node).send(req)
        except Exception as e:  # noqa: BLE001 - a transport failure is one failed attempt
            log.debug("node %s: sending to %s failed: %s", self.node_id, tid, e)
            self._drop_conn()
            p.next_try = now + self.backoff
            return
        p.rid, p.target, p.try_deadline = rid, tid, now + self.try_timeout
        self._inflight[rid] = p

    def _attempt_local(self, p: _Pending, now: float) -> None:
        try:
            if p.kind == "call":
                assert p.body is not None
                fut = self.raft.client_write_async(dict(p.body, f=self._floor(), t=self.sm._clock()))
            else:
                fut = self.raft.ensure_linearizable_async()
        except (ShutDown, Fatal, Overloaded):
            p.next_try = now + self.backoff  # the loop sees the node's state next; or room is made
            return
        except RaftError as e:  # the state machine refused the command before it was proposed
            self._fail(p, e)
            return
        token = object()
        p.token, p.target, p.try_deadline = token, self.node_id, now + self.try_timeout
        fut.add_done_callback(lambda f: self._post(("done", p, token, f)))

    def _on_local_done(self, p: _Pending, token: object, f: Future) -> None:
        if p.token is not token or p.pid not in self._pending:
            return  # a superseded attempt
        p.token = None
        now = time.monotonic()
        exc = f.exception()
        if exc is None:
            if p.kind == "read":
                succeed(p.future, f.result())
            else:
                p.acked = True
        elif isinstance(getattr(exc, "pyraft_log_id", None), LogId):
            p.acked = True  # applied; the state machine delivered the exception
        else:
            p.next_try = now + (0.0 if type(exc).__name__ == "ForwardToLeader" else self.backoff)

    def _connect(self, tid: int, node: Node) -> Any:
        if self._conn is not None and self._conn_target == (tid, node.addr):
            return self._conn
        self._drop_conn()
        self._conn = self.raft.transport.connect(tid, node)
        self._conn_target = (tid, node.addr)
        return self._conn

    def _drop_conn(self) -> None:
        conn, self._conn, self._conn_target = self._conn, None, None
        for p in self._inflight.values():
            p.rid = None
            p.next_try = 0.0
        self._inflight.clear()
        if conn is not None:
            conn.close()

    def _receive(self, timeout: float) -> None:
        if self._kick.is_set():
            timeout = 0.0
        conn = self._conn
        if conn is None:
            self._kick.wait(timeout)
            return
        r = conn.recv(timeout)
        while r is not None:
            self._on_reply(r[0], r[1])
            r = conn.recv(0)

    def _on_reply(self, rid: int, resp: Any) -> None:
        p = self._inflight.pop(rid, None)
        if p is None or p.rid != rid:
            return
        p.rid = None
        now = time.monotonic()
        if not isinstance(resp, ClientResponse):
            p.next_try = now + self.backoff
            return
        if resp.ok:
            if p.kind == "call":
                p.acked = True
                return
            body = resp.body
            if isinstance(body, list) and len(body) == 2 and all(type(x) is int for x in body):
                succeed(p.future, LogId(body[0], body[1]))
            else:
                p.next_try = now + self.backoff
            return
        name, msg, leader_id, addr = resp.error
        if name in _FINAL_ERRORS:  # no other node or later try would answer otherwise
            self._fail(p, _FINAL_ERRORS[name](f"node {p.target}: {msg}"))
            return
        if name == "CodecError" and (p.body or {}).get("k") != "hello":
            # The leader refused the call's form before proposing it (a node that does not
            # lead answers ForwardToLeader first, see on_call_request): a leader whose code
            # reads calls differently (a rolling upgrade).  Fail it now, as a local proposal
            # would, rather than retry until its deadline (or forever, without one).  This
            # node's own announcement keeps retrying: the next leader may read it.
            self._fail(p, CodecError(f"node {p.target} refused the call: {msg}"))
            return
        if name == "ForwardToLeader" and type(leader_id) is int and leader_id != p.target:
            p.hint = (leader_id, Node(addr) if isinstance(addr, str) and addr else None)
            p.next_try = now
        else:
            p.next_try = now + self.backoff
