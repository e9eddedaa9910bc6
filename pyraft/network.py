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

from typing import Any, Callable, Protocol, runtime_checkable

from .types import Node


@runtime_checkable
class ReplyHandle(Protocol):
    def reply(self, message: Any) -> None:
        """Send the response to the request this handle came with.

        Callable from any thread, at most once; it never blocks and never
        raises (a reply to a vanished peer is dropped).
        """


#: ``handler(from_id, message, reply)``: called on the transport's server
#: thread for every valid incoming request.  It must not block: RaftCore's
#: handler only puts the request on its inbox.
RequestHandler = Callable[[int, Any, ReplyHandle], None]


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


@runtime_checkable
class Transport(Protocol):
    """A node's endpoint."""

    node_id: int

    def start(self, handler: RequestHandler) -> None:
        """Start serving: every valid incoming request is passed to ``handler``."""

    def connect(self, target_id: int, node: Node) -> Connection:
        """A new connection to ``target_id`` at ``node``, for the calling thread only."""

    def close(self) -> None:
        """Stop serving and release everything.  Idempotent."""
