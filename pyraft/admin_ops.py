"""Server side of ``pyraft-admin``: cluster-management requests answered by a running node.

:func:`serve_admin` registers these client ops on a :class:`~pyraft.Raft`
node (next to the built-in ``"metrics"``); ``pyraft-admin`` sends them as
:class:`~pyraft.codec.ClientRequest` messages::

    op                       body (msgpack map)                         result body
    admin.add_learner        {id, addr, data?, blocking?, timeout?}     {log_id, membership}
    admin.change_membership  {voters: [id...], retain?, timeout?}       {membership}
    admin.remove             {id, timeout?}                              {membership}
    admin.transfer_leader    {id, timeout?}                              {leader, term}
    admin.snapshot           {timeout?}                                  {snapshot, last_applied}
    admin.purge_log          {index, timeout?}                           {purged_now, purged, snapshot, ...}

Log ids are ``[term, index]`` and memberships are in the shape of
``RaftMetrics.to_dict()["membership"]``, as in the ``"metrics"`` reply.

The first four change the cluster and are leader-only: a node that is not
the leader answers ``ForwardToLeader`` with the leader's id and address (when
it knows them) and the tool retries there.  ``admin.snapshot`` and
``admin.purge_log`` act on the node that receives them: snapshots and the
log are per node.

Threads: a handler runs on the transport's server thread and must not block,
so each request that passes its checks gets a short-lived worker thread
(``pyraft-admin-<node>-<op>``) that makes the blocking :class:`Raft` call
and replies when it returns.  At most ``max_concurrent`` of them run at once
per node; more are refused at once ("busy").  Every operation is bounded by
its ``timeout`` (default :data:`DEFAULT_TIMEOUT`, at most ``max_timeout``):
on expiry the reply is a ``Timeout`` error and the outcome is unknown (a
membership entry may still commit).  A node shutting down fails its pending
operations with ``ShutDown``.

Security: every op here needs the ``admin`` role: with CURVE
(:class:`~pyraft.transports.zmq.CurveConfig`), a key in the allow list's
``admins/``; other keys get ``PermissionDenied``.  Without CURVE whoever can
send requests to the node's address can run these.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from .codec import ClientRequest, ClientResponse, log_id_to_wire
from .errors import ChangeMembershipError, ForwardToLeader, RaftError, Timeout
from .metrics import RaftMetrics
from .raft import Raft, error_response
from .types import Node, ServerState, log_index

__all__ = ["serve_admin", "stop_serving_admin", "ADMIN_OPS", "DEFAULT_TIMEOUT", "MAX_TIMEOUT"]

log = logging.getLogger("pyraft.admin")

#: Seconds an operation may take when the request names no timeout.
DEFAULT_TIMEOUT = 30.0
#: The longest timeout a request may ask for.
MAX_TIMEOUT = 600.0
#: Admin operations running at once on one node, at most.
MAX_CONCURRENT = 4

ADMIN_OPS = ("admin.add_learner", "admin.change_membership", "admin.remove", "admin.transfer_leader",
             "admin.snapshot", "admin.purge_log")


class _BadRequest(RaftError):
    """The request body is malformed (sent back as a RaftError)."""


# ---------------------------------------------------------------------------
# Body checks (run on the transport thread, before any worker is started)

def _body(req: ClientRequest) -> dict:
    b = req.body if req.body is not None else {}
    if type(b) is not dict:
        raise _BadRequest(f"{req.op}: the body must be a map, got {type(b).__name__}")
    return b


def _node_id(b: dict, op: str, key: str = "id") -> int:
    v = b.get(key)
    if type(v) is not int or v < 0:
        raise _BadRequest(f"{op}: {key!r} must be a non-negative integer node id, got {v!r}")
    return v


def _timeout(b: dict, op: str, max_timeout: float) -> float:
    v = b.get("timeout", DEFAULT_TIMEOUT)
    if type(v) not in (int, float) or not v > 0:
        raise _BadRequest(f"{op}: 'timeout' must be a positive number of seconds, got {v!r}")
    return min(float(v), max_timeout)


def _membership_dict(m: RaftMetrics) -> Any:
    return m.to_dict()["membership"]


def _check_leader(raft: Raft) -> RaftMetrics:
    """The node's metrics if it leads; else ForwardToLeader with the leader's id and address when known."""
    m = raft.metrics()
    if m.state != ServerState.LEADER:
        leader = m.current_leader
        node = m.membership.nodes.get(leader) if (m.membership is not None and leader is not None) else None
        raise ForwardToLeader(leader, node, f"node {m.id} is not the leader; current leader: {leader}")
    return m


# ---------------------------------------------------------------------------
# The operations (each runs on its worker thread; returns the result body)

def _add_learner(raft: Raft, b: dict, timeout: float) -> dict:
    op = "admin.add_learner"
    nid = _node_id(b, op)
    addr = b.get("addr")
    if type(addr) is not str or not addr:
        raise _BadRequest(f"{op}: 'addr' must be a non-empty string")
    data = b.get("data")
    if data is not None and type(data) is not dict:
        raise _BadRequest(f"{op}: 'data' must be a map or nil")
    blocking = b.get("blocking", True)
    if type(blocking) is not bool:
        raise _BadRequest(f"{op}: 'blocking' must be a boolean")
    lid = raft.add_learner(nid, Node(addr, data), blocking=blocking, timeout=timeout)
    m = raft.metrics()
    return {"log_id": log_id_to_wire(lid), "membership": _membership_dict(m),
            "matched": log_id_to_wire(m.replication.get(nid))}


def _voters(b: dict, op: str) -> set[int]:
    v = b.get("voters")
    if type(v) is not list or not v or not all(type(x) is int and x >= 0 for x in v):
        raise _BadRequest(f"{op}: 'voters' must be a non-empty list of node ids")
    return set(v)


def _change_membership(raft: Raft, b: dict, timeout: float) -> dict:
    op = "admin.change_membership"
    voters = _voters(b, op)
    retain = b.get("retain", False)
    if type(retain) is not bool:
        raise _BadRequest(f"{op}: 'retain' must be a boolean")
    raft.change_membership(voters, retain=retain, timeout=timeout)
    return {"membership": _membership_dict(raft.metrics())}


def _remove(raft: Raft, b: dict, timeout: float) -> dict:
    nid = _node_id(b, "admin.remove")
    m = _check_leader(raft)
    ms = m.membership
    if ms is None or nid not in ms.nodes:
        raise ChangeMembershipError(f"node {nid} is not a member of the cluster")
    if ms.is_joint:
        raise ChangeMembershipError("a membership change is already in progress")
    if not ms.is_voter(nid):
        raise ChangeMembershipError(f"node {nid} is a learner; this version of pyraft cannot remove "
                                    f"learners (only voters, through a membership change)")
    voters = set(ms.configs[-1]) - {nid}
    if not voters:
        raise ChangeMembershipError(f"node {nid} is the only voter; it cannot be removed")
    raft.change_membership(voters, retain=False, timeout=timeout)
    return {"membership": _membership_dict(raft.metrics())}


def _transfer_leader(raft: Raft, b: dict, timeout: float) -> dict:
    target = _node_id(b, "admin.transfer_leader")
    m0 = _check_leader(raft)
    if target == raft.node_id:
        return {"leader": target, "term": m0.current_term}
    raft.trigger.transfer_leader(target)
    # The engine gives the target an election timeout to catch up and win;
    # past a few of those the transfer has been dropped and this node leads on.
    window = min(timeout, max(2.0, 4 * raft.config.election_timeout[1] + raft.config.rpc_timeout))
    try:
        m = raft.wait(window).metrics(lambda m: m.current_leader == target and m.current_term > m0.current_term,
                                      f"node {target} to take over the leadership")
    except Timeout:
        m = raft.metrics()
        if m.state == ServerState.LEADER:
            raise RaftError(f"leadership transfer to node {target} did not happen within {window:.1f} s; "
                            f"node {m.id} still leads in term {m.current_term} "
                            f"(is node {target} reachable and caught up?)") from None
        raise RaftError(f"leadership transfer to node {target} did not complete within {window:.1f} s; "
                        f"node {m.id} sees leader {m.current_leader} in term {m.current_term}") from None
    return {"leader": m.current_leader, "term": m.current_term}


def _snapshot(raft: Raft, b: dict, timeout: float) -> dict:
    m0 = raft.metrics()
    want = log_index(m0.last_applied)
    if want == 0:
        raise RaftError(f"node {m0.id} has applied nothing yet: there is nothing to snapshot")
    raft.trigger.snapshot()
    m = raft.wait(timeout).metrics(lambda m: log_index(m.snapshot) >= want,
                                   f"a snapshot covering index {want}")
    return {"snapshot": log_id_to_wire(m.snapshot), "last_applied": log_id_to_wire(m.last_applied)}


def _purge_log(raft: Raft, b: dict, timeout: float) -> dict:
    op = "admin.purge_log"
    index = b.get("index")
    if type(index) is not int or index < 0:
        raise _BadRequest(f"{op}: 'index' must be a non-negative integer")
    lid = raft.trigger.purge_log(index)
    if lid is not None:
        raft.wait(timeout).metrics(lambda m: log_index(m.purged) >= lid.index, f"the log purged up to {lid}")
    m = raft.metrics()
    return {"purged_now": log_id_to_wire(lid), "purged": log_id_to_wire(m.purged), "requested": index,
            "snapshot": log_id_to_wire(m.snapshot), "last_applied": log_id_to_wire(m.last_applied)}


_Op = Callable[[Raft, dict, float], dict]

#: op -> (function, leader only)
_OPS: dict[str, tuple[_Op, bool]] = {
    "admin.add_learner": (_add_learner, True),
    "admin.change_membership": (_change_membership, True),
    "admin.remove": (_remove, True),
    "admin.transfer_leader": (_transfer_leader, True),
    "admin.snapshot": (_snapshot, False),
    "admin.purge_log": (_purge_log, False),
}


# ---------------------------------------------------------------------------
# Registration

def serve_admin(raft: Raft, *, max_timeout: float = MAX_TIMEOUT, max_concurrent: int = MAX_CONCURRENT) -> None:
    """Register the ``admin.*`` ops on ``raft`` (see the module docstring).  Idempotent."""
    if not max_timeout > 0 or max_concurrent < 1:
        raise ValueError("max_timeout must be positive and max_concurrent at least 1")
    slots = threading.BoundedSemaphore(max_concurrent)  # one per running worker

    def make_handler(op: str, fn: _Op, leader_only: bool) -> Callable[[int, ClientRequest, Any], None]:
        short = op.split(".", 1)[1]

        def handler(from_id: int, req: ClientRequest, reply: Any) -> None:
            # Transport thread: checks only, then hand the blocking part to a worker.
            try:
                b = _body(req)
                timeout = _timeout(b, op, max_timeout)
                if leader_only:
                    _check_leader(raft)
                if not slots.acquire(blocking=False):
                    raise RaftError(f"node {raft.node_id} is busy with {max_concurrent} admin operations; "
                                    f"retry later")
            except RaftError as e:
                reply.reply(error_response(e))
                return

            def work() -> None:
                try:
                    try:
                        resp = ClientResponse(True, fn(raft, b, timeout))
                    except RaftError as e:
                        resp = error_response(e)
                    except Exception as e:  # noqa: BLE001 - reply with the reason, keep the node up
                        log.exception("node %s: %s failed", raft.node_id, op)
                        resp = error_response(RaftError(f"{op} failed: {type(e).__name__}: {e}"))
                    reply.reply(resp)
                finally:
                    slots.release()

            t = threading.Thread(target=work, name=f"pyraft-admin-{raft.node_id}-{short}", daemon=True)
            try:
                t.start()
            except BaseException:
                slots.release()
                raise

        return handler

    for op, (fn, leader_only) in _OPS.items():
        raft.set_client_handler(op, make_handler(op, fn, leader_only), role="admin")


def stop_serving_admin(raft: Raft) -> None:
    """Remove the ``admin.*`` ops from ``raft`` (operations already running finish)."""
    for op in ADMIN_OPS:
        raft.set_client_handler(op, None)
