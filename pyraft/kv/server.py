"""Serving KV operations on a Raft node: what a ``KVClient`` talks to.

:func:`serve_kv` registers these client ops on the node's transport
(``raft.set_client_handler``); every reply is a ``ClientResponse``:

==================  =======================================  =====================================
op                  request body                             reply body
==================  =======================================  =====================================
``kv.write``        a KV command map (:mod:`.commands`),     the command's result once it is
                    with ``client``/``seq`` for exactly-once  committed and applied on this node
``kv.get``          ``{"key": k}``                           the value (None when absent), read
                                                             linearizably (ReadIndex)
``kv.get_stale``    ``{"key": k}``                           this node's value now (may be stale)
``kv.status``       anything                                 ``{"id", "state", "term", "leader",
                                                             "leader_addr", "applied", "keys"}``
==================  =======================================  =====================================

Roles (with CURVE, see ``pyraft.network.Principal``): ``kv.write`` needs a
client key; the reads and ``kv.status`` a reader key.

A node that does not lead answers ``kv.write`` and ``kv.get`` with a
``ForwardToLeader`` error carrying the leader's id and address when it knows
them (see :func:`pyraft.raft.error_response`).  A refused command answers
with a ``KVCommandError`` error; a write the node will not propose answers
``Overloaded`` (too many in flight) or ``NoSpace`` (the store is past its
quota), decided here, before proposing (``Raft.client_write_async``).

Threads: handlers run on the transport's server thread and never block: a
write or a read is handed to RaftCore (``client_write_async`` /
``ensure_linearizable_async``) and the reply is sent from the future's
done-callback, on whichever thread completes it (the SM worker for writes,
RaftCore for reads).  ``reply.reply`` may be called from any thread.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

from ..codec import ClientRequest, ClientResponse
from ..errors import RaftError
from ..raft import Raft, error_response
from ..types import ServerState
from .commands import KVCommandError

__all__ = ["serve_kv", "unserve_kv", "KV_OPS", "WRITE_OPS"]

log = logging.getLogger("pyraft.kv")

KV_OPS = ("kv.write", "kv.get", "kv.get_stale", "kv.status")
#: The command ops a ``kv.write`` may carry (reads go through ``kv.get``).
WRITE_OPS = ("put", "delete", "cas")


def _key_of(req: ClientRequest) -> Any:
    body = req.body
    if type(body) is not dict or "key" not in body:
        raise KVCommandError(f"{req.op}: the body must be a map with a 'key'")
    return body["key"]


class _KVService:
    """The handlers of one node; ``sm`` is any state machine with ``get(key)``."""

    def __init__(self, raft: Raft, sm: Any) -> None:
        self.raft = raft
        self.sm = sm

    # ------------------------------------------------------------------ writes

    def on_write(self, _from_id: int, req: ClientRequest, reply: Any) -> None:
        cmd = req.body
        if type(cmd) is not dict or cmd.get("op") not in WRITE_OPS:
            reply.reply(error_response(KVCommandError(
                f"kv.write: the body must be a KV command map with op one of {', '.join(WRITE_OPS)}")))
            return
        try:
            fut = self.raft.client_write_async(cmd)
        except RaftError as e:  # ShutDown, Fatal, an unencodable command
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

    # ------------------------------------------------------------------ reads

    def on_get(self, _from_id: int, req: ClientRequest, reply: Any) -> None:
        key = _key_of(req)
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
        reply.reply(ClientResponse(True, self.sm.get(_key_of(req))))

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
        }))


def serve_kv(raft: Raft, sm: Any | None = None) -> None:
    """Serve the KV ops (``kv.write``, ``kv.get``, ``kv.get_stale``, ``kv.status``) on ``raft``.

    ``sm`` (default ``raft.state_machine``) must apply the commands of
    :mod:`pyraft.kv.commands` and offer ``get(key)``: ``KVStateMachine`` or
    the test-only ``MemoryStateMachine``.
    """
    sm = raft.state_machine if sm is None else sm
    if not callable(getattr(sm, "get", None)):
        raise TypeError(f"serve_kv needs a state machine with get(key), got {type(sm).__name__}")
    svc = _KVService(raft, sm)
    raft.set_client_handler("kv.write", svc.on_write, role="client")
    raft.set_client_handler("kv.get", svc.on_get, role="reader")
    raft.set_client_handler("kv.get_stale", svc.on_get_stale, role="reader")
    raft.set_client_handler("kv.status", svc.on_status, role="reader")


def unserve_kv(raft: Raft) -> None:
    """Stop serving the KV ops on ``raft``."""
    for op in KV_OPS:
        raft.set_client_handler(op, None)
