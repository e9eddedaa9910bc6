"""An in-process switchboard for nodes in one process, with fault injection.  Test-only.

``MemoryNetwork`` routes by node id: ``net.transport(1)`` is node 1's
:class:`~pyraft.network.Transport`, and a connection made with
``connect(2, Node("anything"))`` reaches whatever transport is node 2 when the
message is delivered.  Every message is encoded and decoded with
:mod:`pyraft.codec`, exactly as on the wire, so a value that ZeroMQ could not
carry fails here too (``send`` raises :class:`~pyraft.errors.CodecError`).

Delivery model::

    sender thread ──encode──► heap (due time, seq) ──pyraft-memnet thread──decode──► handler / reply queue

- One delivery thread, ``pyraft-memnet``, a daemon started on the first
  message and stopped by :meth:`MemoryNetwork.close` (or when the last open
  transport closes; it restarts on demand).  Request handlers run on it, never
  on the sender's thread, so a sender holding a lock cannot deadlock with the
  receiver.  Handlers must not block (the :data:`~pyraft.network.RequestHandler`
  contract): one slow handler delays every node.
- Without a delay, messages are delivered in the order they were sent.  With
  ``set_delay(lo, hi)`` each message waits a uniform random time in
  ``[lo, hi]``, so messages may be reordered, as on a real network.
- A message is dropped (silently, counted in :attr:`MemoryNetwork.stats`) when
  the link from sender to receiver is cut at send time *or* at delivery time,
  when the loss draw says so, when the receiving transport is closed or not
  started, or when the receiving connection is closed.

Faults (all take effect at once and apply to requests and replies alike):

- ``partition(*groups)``: each argument is a set of node ids; nodes in
  different groups cannot talk.  Nodes named in no group form one more group
  together: ``partition({1})`` cuts node 1 off from all others, and with
  nodes 1-5 ``partition({1, 2}, {3})`` leaves 4 and 5 together in a third
  group.  A new ``partition`` replaces the previous one.
- ``isolate(node_id)``: cut one node off from all others (adds to the isolated
  set; independent of ``partition``).
- ``set_one_way(from_id, to_id, blocked=True)``: drop messages from
  ``from_id`` to ``to_id`` only (requests *and* replies travelling that way).
- ``heal()``: undo partitions, isolations and one-way blocks (not loss or delay).
- ``set_loss(p)``: drop each message with probability ``p``.
- ``set_delay(lo, hi)``: delay each message by a uniform random time (seconds);
  ``set_delay(0, 0)`` turns it off.

Principals (test-only, in place of CURVE keys): requests arrive with
``reply.principal`` set to the sending transport's principal,
:data:`~pyraft.network.TRUSTED` unless ``net.transport(id, principal=p)``
gave it one.  A sender with a principal
counts as authenticated: its Raft RPCs are dropped (``dropped_rpc_not_peer``,
``dropped_rpc_wrong_id``, counted on the receiver) unless it is
``Principal("peer", node_id=<its own id>)``, as ZmqTransport does with CURVE.

Per-transport fault filter (same signature as ZmqTransport's):
``transport.set_fault_filter(f)`` where ``f(direction, peer_id, message) -> bool``
returns True to drop.  ``direction`` is ``"send"`` (a request leaving a
connection), ``"request"`` (a request arriving at the server side),
``"reply"`` (a reply leaving the server side) or ``"recv"`` (a reply arriving
at a connection).  It is called from arbitrary threads, so it must be
thread-safe and must not block.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import random
import threading
import time
from collections import Counter
from typing import Any, Callable

from pyraft.codec import ClientRequest, decode_message, encode_message
from pyraft.errors import CodecError, RaftError
from pyraft.messages import AppendEntriesRequest, InstallSnapshotRequest, TimeoutNowRequest, VoteRequest
from pyraft.network import TRUSTED, FailureHandler, Principal, RequestHandler, raft_sender_refusal
from pyraft.types import Node

__all__ = ["MemoryNetwork", "MemoryTransport", "MemoryConnection", "FaultFilter"]

log = logging.getLogger("pyraft.transport")

#: ``f(direction, peer_id, message) -> bool``: True drops the message.
FaultFilter = Callable[[str, int, Any], bool]

_REQUEST_TYPES = (AppendEntriesRequest, VoteRequest, InstallSnapshotRequest, TimeoutNowRequest, ClientRequest)

_REQ = 0
_REP = 1

_CONNECTION_SERIALS = itertools.count(1)  # next() on an itertools.count is atomic under the GIL


class MemoryNetwork:
    """The switchboard.  ``MemoryNetwork(cluster_name="pyraft", seed=None)``.

    ``seed`` seeds the loss and delay draws (reproducible runs).
    """

    def __init__(self, cluster_name: str = "pyraft", *, seed: int | None = None):
        self.cluster_name = cluster_name
        # _lock guards every field below, the heap and the fault settings.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._transports: dict[int, MemoryTransport] = {}
        self._group_of: dict[int, int] | None = None  # None: no partition
        self._isolated: set[int] = set()
        self._blocked: set[tuple[int, int]] = set()
        self._loss = 0.0
        self._delay = (0.0, 0.0)
        self._rng = random.Random(seed)
        self._heap: list[tuple[float, int, tuple]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats: Counter[str] = Counter()

    # ------------------------------------------------------------------ nodes

    def transport(self, node_id: int, *, cluster_name: str | None = None,
                  principal: Principal | None = None) -> "MemoryTransport":
        """A new transport for ``node_id``.

        Raises ``ValueError`` while another open transport has that id (close
        it first: that is how a test restarts a node).  ``cluster_name``
        overrides the network's (to test cluster-name checks).  ``principal``:
        who its requests arrive as (see the module docstring).
        """
        with self._lock:
            if self._closed:
                raise RaftError("MemoryNetwork is closed")
            old = self._transports.get(node_id)
            if old is not None and not old._closed:
                raise ValueError(f"node {node_id} already has an open transport on this network")
            t = MemoryTransport(self, node_id, cluster_name or self.cluster_name)
            t._principal = principal
            self._transports[node_id] = t
            return t

    # ----------------------------------------------------------------- faults

    def partition(self, *groups: set[int] | frozenset[int] | list[int]) -> None:
        """Split the network: nodes in different groups cannot talk.

        Nodes named in no group form one more group together.  Replaces any
        earlier partition; isolations and one-way blocks stay.
        """
        group_of: dict[int, int] = {}
        for i, g in enumerate(groups):
            for n in g:
                if n in group_of:
                    raise ValueError(f"node {n} is in more than one group")
                group_of[n] = i
        with self._lock:
            self._group_of = group_of

    def isolate(self, node_id: int) -> None:
        """Cut ``node_id`` off from every other node (until :meth:`heal`)."""
        with self._lock:
            self._isolated.add(node_id)

    def set_one_way(self, from_id: int, to_id: int, blocked: bool = True) -> None:
        """Drop (or stop dropping) every message travelling from ``from_id`` to ``to_id``."""
        with self._lock:
            if blocked:
                self._blocked.add((from_id, to_id))
            else:
                self._blocked.discard((from_id, to_id))

    def heal(self) -> None:
        """Undo partitions, isolations and one-way blocks.  Loss and delay stay."""
        with self._lock:
            self._group_of = None
            self._isolated.clear()
            self._blocked.clear()

    def set_loss(self, p: float) -> None:
        """Drop each message (request or reply) with probability ``p`` in [0, 1]."""
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"loss probability must be in [0, 1], got {p}")
        with self._lock:
            self._loss = p

    def set_delay(self, lo: float, hi: float | None = None) -> None:
        """Delay each message by a uniform random time in ``[lo, hi]`` seconds (``hi`` defaults to ``lo``)."""
        lo = float(lo)
        hi = lo if hi is None else float(hi)
        if not 0.0 <= lo <= hi:
            raise ValueError(f"delay must satisfy 0 <= lo <= hi, got ({lo}, {hi})")
        with self._lock:
            self._delay = (lo, hi)

    def can_talk(self, from_id: int, to_id: int) -> bool:
        """Whether a message from ``from_id`` to ``to_id`` would pass the current cuts (ignoring loss)."""
        with self._lock:
            return self._link_ok(from_id, to_id)

    @property
    def stats(self) -> dict[str, int]:
        """Counters of the whole network: ``sends``, ``delivered_requests``,
        ``delivered_replies``, ``dropped_<reason>`` (``partition``, ``loss``,
        ``closed``, ``no_target``, ``invalid``, ``not_request``, ``not_reply``,
        ``fault_filter``, ``rpc_not_peer``, ``rpc_wrong_id``), ``handler_errors``."""
        with self._lock:
            return dict(self._stats)

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close every transport, drop what is in flight, stop the delivery thread.  Idempotent."""
        with self._lock:
            self._closed = True
            transports = list(self._transports.values())
        for t in transports:
            t.close()
        with self._cond:
            self._cond.notify_all()
            th = self._thread
        if th is not None and th is not threading.current_thread():
            th.join(5.0)

    def __enter__(self) -> "MemoryNetwork":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _link_ok(self, a: int, b: int) -> bool:
        # Called with _lock held.
        if a == b:
            return True
        if a in self._isolated or b in self._isolated or (a, b) in self._blocked:
            return False
        g = self._group_of
        return g is None or g.get(a, -1) == g.get(b, -1)

    def _any_open(self) -> bool:
        return any(not t._closed for t in self._transports.values())

    def _submit(self, src: int, dst: int, item: tuple) -> None:
        """Queue one encoded message for delivery (any thread)."""
        with self._cond:
            sender = self._transports.get(src)
            if self._closed:
                self._count_locked("dropped_closed", sender)
                return
            if not self._link_ok(src, dst):
                self._count_locked("dropped_partition", sender)
                return
            if self._loss and self._rng.random() < self._loss:
                self._count_locked("dropped_loss", sender)
                return
            lo, hi = self._delay
            due = time.monotonic() + (self._rng.uniform(lo, hi) if hi > 0 else 0.0)
            heapq.heappush(self._heap, (due, next(self._seq), item))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pyraft-memnet", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _transport_closed(self) -> None:
        """A transport closed: when none is open any more, stop the delivery thread."""
        with self._cond:
            if self._any_open():
                return
            self._cond.notify_all()
            th = self._thread
        if th is not None and th is not threading.current_thread():
            th.join(5.0)

    def _run(self) -> None:
        try:
            self._deliver_loop()
        except BaseException as e:  # a bug here leaves every node deaf: tell their owners
            log.exception("memory network: the delivery thread failed")
            with self._lock:
                self._thread = None
                transports = [t for t in self._transports.values() if not t._closed]
            for t in transports:
                t._report_failure(f"memory network delivery thread failed: {type(e).__name__}: {e}")

    def _deliver_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed or not self._any_open():
                        self._stats["dropped_closed"] += len(self._heap)
                        self._heap.clear()
                        self._thread = None
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cond.wait(None if not self._heap else self._heap[0][0] - now)
                batch = []
                while self._heap and self._heap[0][0] <= now:
                    _, _, item = heapq.heappop(self._heap)
                    if self._link_ok(item[1], item[2]):  # the link may have been cut in flight
                        batch.append(item)
                    else:
                        self._count_locked("dropped_partition", self._transports.get(item[1]))
            for item in batch:
                try:
                    if item[0] == _REQ:
                        self._deliver_request(item)
                    else:
                        self._deliver_reply(item)
                except Exception:  # a bug in a handler must not stop the network
                    log.exception("memory network: delivery failed")
                    self._count("handler_errors", self._transports.get(item[2]))

    def _count(self, key: str, t: "MemoryTransport | None" = None) -> None:
        with self._lock:
            self._count_locked(key, t)

    def _count_locked(self, key: str, t: "MemoryTransport | None") -> None:
        # Called with _lock held: the network's counter, and the transport's when given.
        self._stats[key] += 1
        if t is not None:
            t._stats[key] += 1

    def _deliver_request(self, item: tuple) -> None:
        _, src, dst, conn, data = item
        with self._lock:
            target = self._transports.get(dst)
        handler = target._handler if target is not None else None
        if target is None or target._closed or handler is None:
            self._count("dropped_no_target", self._transports.get(src))
            return
        try:
            frame = decode_message(data, target.cluster_name)
        except CodecError as e:
            log.debug("memory network: node %s dropped a request: %s", dst, e)
            self._count("dropped_invalid", target)
            return
        msg = frame.message
        if not isinstance(msg, _REQUEST_TYPES):
            self._count("dropped_not_request", target)
            return
        principal = conn._transport._principal
        if principal is not None and not isinstance(msg, ClientRequest):
            refusal = raft_sender_refusal(principal, frame.from_id)
            if refusal is not None:
                self._count("dropped_" + refusal, target)
                return
        if target._filtered("request", frame.from_id, msg):
            self._count("dropped_fault_filter", target)
            return
        self._count("delivered_requests", target)
        handler(frame.from_id, msg, _MemoryReply(self, target, conn, frame.from_id, frame.request_id,
                                                 principal or TRUSTED))

    def _deliver_reply(self, item: tuple) -> None:
        _, _src, _dst, conn, data = item
        t = conn._transport
        if conn._closed or t._closed:
            self._count("dropped_no_target", t)
            return
        try:
            frame = decode_message(data, conn._transport.cluster_name)
        except CodecError as e:
            log.debug("memory network: node %s dropped a reply: %s", conn._transport.node_id, e)
            self._count("dropped_invalid", t)
            return
        if isinstance(frame.message, _REQUEST_TYPES):
            self._count("dropped_not_reply", t)
            return
        if conn._transport._filtered("recv", conn.target_id, frame.message):
            self._count("dropped_fault_filter", t)
            return
        if conn._put_reply((frame.request_id, frame.message)):
            self._count("delivered_replies", t)
        else:
            self._count("dropped_no_target", t)


class MemoryTransport:
    """One node's endpoint on a :class:`MemoryNetwork`.  Made by ``net.transport(node_id)``."""

    def __init__(self, net: MemoryNetwork, node_id: int, cluster_name: str):
        self.node_id = node_id
        self.cluster_name = cluster_name
        self._net = net
        self._handler: RequestHandler | None = None
        self._on_failure: FailureHandler | None = None
        self._closed = False
        self._fault_filter: FaultFilter | None = None
        #: who this transport's requests arrive as; None: TRUSTED, and its Raft RPCs pass
        self._principal: Principal | None = None
        self._stats: Counter[str] = Counter()  # guarded by the network's _lock

    @property
    def stats(self) -> dict[str, int]:
        """This node's counters (same names as :attr:`MemoryNetwork.stats`, plus ``sends``).

        Drops are counted on the sender when cut or lost in the network, on the
        receiver when it rejects what arrived.
        """
        with self._net._lock:
            return dict(self._stats)

    def start(self, handler: RequestHandler, on_failure: FailureHandler | None = None) -> None:
        """Deliver this node's requests to ``handler``; ``on_failure(reason)`` if the network's thread dies."""
        if self._closed:
            raise RaftError(f"transport of node {self.node_id} is closed")
        if self._handler is not None:
            raise RaftError(f"transport of node {self.node_id} is already started")
        self._on_failure = on_failure
        self._handler = handler

    def _report_failure(self, reason: str) -> None:
        cb = self._on_failure
        if cb is not None:
            try:
                cb(reason)
            except Exception:  # noqa: BLE001 - one owner's callback must not keep the others from theirs
                log.exception("memory network: node %s's failure callback failed", self.node_id)

    def connect(self, target_id: int, node: Node | None = None) -> "MemoryConnection":
        """A connection to ``target_id``; ``node`` is ignored (routing is by id)."""
        return MemoryConnection(self, target_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._net._transport_closed()

    def set_fault_filter(self, f: FaultFilter | None) -> None:
        """Install ``f(direction, peer_id, message) -> bool`` (True drops), or None to remove it."""
        self._fault_filter = f

    def _filtered(self, direction: str, peer: int, message: Any) -> bool:
        f = self._fault_filter
        return f is not None and bool(f(direction, peer, message))

    def __repr__(self) -> str:
        return f"MemoryTransport(node_id={self.node_id}, closed={self._closed})"


class MemoryConnection:
    """A connection from one transport to one peer id; for one thread (``wake`` from any)."""

    def __init__(self, transport: MemoryTransport, target_id: int):
        self._transport = transport
        self.target_id = target_id
        #: unique in this process: what ``reply.connection`` is for its requests
        self.serial = next(_CONNECTION_SERIALS)
        self._cond = threading.Condition(threading.Lock())  # guards _replies and _woken
        self._replies: collections.deque[tuple[int, Any]] = collections.deque()
        self._woken = False
        self._next_id = 0
        self._closed = False

    def send(self, message: Any) -> int:
        self._next_id += 1
        rid = self._next_id
        t = self._transport
        if self._closed or t._closed:
            return rid
        if t._filtered("send", self.target_id, message):
            t._net._count("dropped_fault_filter", t)
            return rid
        data = encode_message(message, t.cluster_name, t.node_id, rid)  # CodecError: the caller's bug
        t._net._count("sends", t)
        t._net._submit(t.node_id, self.target_id, (_REQ, t.node_id, self.target_id, self, data))
        return rid

    def recv(self, timeout: float) -> tuple[int, Any] | None:
        """The next reply, or None after ``timeout`` seconds or at once after :meth:`wake`."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                if self._woken:
                    self._woken = False
                    return None
                if self._replies:
                    return self._replies.popleft()
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def wake(self) -> None:
        """Make a ``recv`` in progress, or the next one, return None at once.  Any thread."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._replies.clear()
            self._cond.notify_all()

    def _put_reply(self, item: tuple[int, Any]) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._replies.append(item)
            self._cond.notify_all()
            return True


class _MemoryReply:
    """The reply handle of one delivered request."""

    __slots__ = ("_net", "_responder", "_conn", "_requester", "_request_id", "_used", "principal")

    def __init__(self, net: MemoryNetwork, responder: MemoryTransport, conn: MemoryConnection,
                 requester: int, request_id: int, principal: Principal = TRUSTED):
        self._net = net
        self._responder = responder
        self._conn = conn
        self._requester = requester
        self._request_id = request_id
        self._used = False
        #: who sent the request (see pyraft.network.Principal)
        self.principal = principal

    @property
    def connection(self) -> int:
        """The connection the request came on (opaque, hashable): the same for every
        request sent through one :class:`MemoryConnection`, as a ZeroMQ routing id is."""
        return self._conn.serial

    def reply(self, message: Any) -> None:
        if self._used:
            log.warning("memory network: second reply to request %s from node %s ignored",
                        self._request_id, self._requester)
            return
        self._used = True
        r = self._responder
        if r._closed:
            return
        if r._filtered("reply", self._requester, message):
            self._net._count("dropped_fault_filter", r)
            return
        try:
            data = encode_message(message, r.cluster_name, r.node_id, self._request_id)
        except CodecError:
            log.exception("memory network: node %s cannot encode its reply", r.node_id)
            self._net._count("reply_encode_errors", r)
            return
        self._net._submit(r.node_id, self._conn._transport.node_id,
                          (_REP, r.node_id, self._conn._transport.node_id, self._conn, data))
