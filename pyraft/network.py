"""The transport interface: how nodes (and clients) exchange messages.

A transport has a server side that delivers incoming requests to a handler
with a reply handle, and a client side of connections, each owned by one
thread, that can carry many requests before the first reply (pipelining).
Messages are the dataclasses of :mod:`pyraft.messages` and
:class:`pyraft.codec.ClientRequest`/``ClientResponse``; a transport that
crosses a process boundary encodes them with :mod:`pyraft.codec`.

Implementations: ``pyraft.transports.zmq.ZmqTransport`` (ZeroMQ
DEALER/ROUTER) and ``pyraft.transports.memory.MemoryNetwork`` (in-process,
with fault injection, for tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol, runtime_checkable

from .types import Node

#: The roles a sender may have, from the least to the most trusted client role.
#: "peer" is a node of the cluster: client rights, plus Raft RPCs as its own id.
ROLES = ("reader", "client", "peer", "admin")
#: The roles a client op may require (``Raft.set_client_handler(op, h, role=...)``).
OP_ROLES = ("reader", "client", "admin")
_RANK = {"reader": 0, "client": 1, "peer": 1, "admin": 2}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request, as the transport authenticated it; ``reply.principal`` carries it.

    - ``role``: one of :data:`ROLES`.  Rights grow reader < client < admin;
      a peer has a client's rights and may also carry Raft RPCs, as node
      ``node_id`` only.
    - ``node_id``: the node a peer key belongs to (None for other roles).
    - ``key``: the sender's CURVE public key (Z85 text), None when the
      transport does not authenticate.

    Without authentication every sender is :data:`TRUSTED` (the network is
    the trust boundary).
    """

    role: str
    node_id: int | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if self.role not in _RANK:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if (self.role == "peer") != (self.node_id is not None):
            raise ValueError("a peer principal needs its node_id, and only a peer has one")

    def allows(self, role: str) -> bool:
        """Whether this principal may run an op that needs ``role`` (one of :data:`OP_ROLES`)."""
        return _RANK[self.role] >= _RANK[role]


#: Every sender on a transport that does not authenticate (no CURVE).
TRUSTED = Principal("admin")


def raft_sender_refusal(principal: Principal, from_id: int) -> str | None:
    """Why an authenticated transport must drop a Raft RPC from ``principal`` claiming ``from_id``.

    None when it may pass: only node N's own key carries Raft RPCs, and only as
    node N.  Returns ``"rpc_not_peer"`` or ``"rpc_wrong_id"`` (the transports'
    ``dropped_<reason>`` counters).
    """
    if principal.role != "peer":
        return "rpc_not_peer"
    if principal.node_id != from_id:
        return "rpc_wrong_id"
    return None


@runtime_checkable
class ReplyHandle(Protocol):
    #: Who sent the request (:data:`TRUSTED` on a transport that does not authenticate).
    principal: Principal

    @property
    def connection(self) -> Hashable:
        """The connection the request came on (opaque, hashable): requests that share it came on
        one client connection, so a service can share its capacity fairly between connections."""

    def reply(self, message: Any) -> None:
        """Send the response to the request this handle came with.

        Callable from any thread, at most once; it never blocks and never
        raises (a reply to a vanished peer is dropped).
        """


#: ``handler(from_id, message, reply)``: called on the transport's server
#: thread for every valid incoming request.  It must not block: RaftCore's
#: handler only puts the request on its inbox.
RequestHandler = Callable[[int, Any, ReplyHandle], None]

#: ``on_failure(reason)``: the transport stopped serving for good (its server
#: thread failed: a bug, or resources such as file descriptors ran out).
#: Called once, from the failing thread; it must not block.
FailureHandler = Callable[[str], None]


@runtime_checkable
class Connection(Protocol):
    """A client connection to one peer, used by exactly one thread."""

    def send(self, message: Any) -> int:
        """Queue ``message`` for the peer and return its request id, without waiting.

        Never blocks for long: if the peer's queue is full the message is
        dropped (as the network might) and the id is still returned; the
        caller's timeout notices.
        """

    def recv(self, timeout: float) -> tuple[int, Any] | None:
        """The next reply as ``(request_id, message)``, or None when ``timeout`` seconds pass first."""

    def wake(self) -> None:
        """Make a ``recv`` in progress (or the next one) return None at once.

        Callable from any thread: the owner blocks in ``recv`` and another
        thread that queued work for it calls ``wake``.
        """

    def close(self) -> None:
        """Close the connection.  Idempotent."""

    # Optional: ``problem``, a str while the connection drops the peer's replies for a reason
    # its user should see (ZmqConnection: another node answers at the address), else None.
    # The leader's replication worker shows it in RaftMetrics.replication_errors.


@runtime_checkable
class Transport(Protocol):
    """A node's endpoint."""

    node_id: int

    def start(self, handler: RequestHandler, on_failure: FailureHandler | None = None) -> None:
        """Start serving: every valid incoming request is passed to ``handler``.

        ``on_failure(reason)`` is called if the transport can no longer serve
        (never for bad input, which is dropped and counted).

        Optional: a transport whose ``start`` also takes ``on_burst_end``
        calls it on its serving thread after each burst of requests it
        delivered; the ``Raft`` handle then hands a burst's client writes and
        reads to RaftCore together (``ZmqTransport`` does; without it each goes
        alone).  Likewise an optional ``replies_held()`` context manager makes
        the replies one thread sends inside it leave together.
        """

    def connect(self, target_id: int, node: Node) -> Connection:
        """A new connection to ``target_id`` at ``node``, for the calling thread only."""

    def close(self) -> None:
        """Stop serving and release everything.  Idempotent."""
