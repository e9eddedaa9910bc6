"""Server side of ``pyraft-admin``: cluster-management requests answered by a running node.

:func:`serve_admin` registers these client ops on a :class:`~pyraft.Raft`
node (next to the built-in ``"metrics"``); ``pyraft-admin`` sends them as
:class:`~pyraft.codec.ClientRequest` messages::

    op                       body (msgpack map)                         result body
    admin.add_learner        {id, addr, data?, blocking?, timeout?}     {log_id, membership}
    admin.change_membership  {voters: [id...], retain?, timeout?}       {membership}
    admin.remove             {id, timeout?}                              {membership}
    admin.transfer_leader    {id, timeout?}                              {leader, term}
    admin.remove_learner     {id, timeout?}                              {log_id, membership}
    admin.snapshot           {timeout?}                                  {snapshot, last_applied}
    admin.purge_log          {index, timeout?}                           {purged_now, purged, snapshot, ...}
    admin.backup_begin       {min_index?, timeout?}                      {backup, size, snapshot_meta, ...}
    admin.backup_chunk       {backup, offset}                            {data}
    admin.backup_end         {backup}                                    {}

Log ids are ``[term, index]`` and memberships are in the shape of
``RaftMetrics.to_dict()["membership"]``, as in the ``"metrics"`` reply.

The first five change the cluster and are leader-only: a node that is not
the leader answers ``ForwardToLeader`` with the leader's id and address (when
it knows them) and the tool retries there.  ``admin.snapshot``,
``admin.purge_log`` and the backup ops act on the node that receives them:
snapshots and the log are per node.

Backups (``pyraft-admin backup``, file format in :mod:`pyraft.backup`):
``admin.backup_begin`` picks a fence index, waits until this node has applied
it, makes sure the current snapshot covers it (building one if not), opens
that snapshot file and answers with a backup id, the file's size and its
meta.  The fence is what makes the backup hold every acknowledged write: on
the leader it is a ReadIndex (:meth:`Raft.ensure_linearizable`); on another
node it is ``min_index`` (the tool reads the leader's commit index) or, at
least, this node's own commit index.  The client then reads the file with
``admin.backup_chunk`` (at most :data:`BACKUP_CHUNK` bytes each, so both
sides hold one chunk at a time) and ends with ``admin.backup_end``.  The
open file stays readable while newer snapshots replace it (POSIX keeps an
unlinked file's data while it is open).  At most :data:`MAX_BACKUPS` backups
are open at once per node; one idle for :data:`BACKUP_IDLE` seconds is
closed at the next backup request, and all are closed when the node stops.

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
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from .codec import ClientRequest, ClientResponse, log_id_to_wire, snapshot_meta_to_wire
from .errors import ChangeMembershipError, ForwardToLeader, RaftError, Timeout
from .metrics import RaftMetrics
from .raft import Raft, error_response
from .snapshot_files import CHUNK
from .types import Node, ServerState, SnapshotMeta, log_index

__all__ = ["serve_admin", "stop_serving_admin", "ADMIN_OPS", "DEFAULT_TIMEOUT", "MAX_TIMEOUT",
           "BACKUP_CHUNK", "MAX_BACKUPS", "BACKUP_IDLE"]

log = logging.getLogger("pyraft.admin")

#: Seconds an operation may take when the request names no timeout.
DEFAULT_TIMEOUT = 30.0
#: The longest timeout a request may ask for.
MAX_TIMEOUT = 600.0
#: Admin operations running at once on one node, at most.
MAX_CONCURRENT = 4

#: Bytes of a backup sent per ``admin.backup_chunk`` reply (well under every frame limit).
BACKUP_CHUNK = CHUNK
#: Backups open at once on one node, at most (each holds a snapshot file open).
MAX_BACKUPS = 2
#: Seconds after which a backup nobody asked a chunk of is closed.
BACKUP_IDLE = 60.0

ADMIN_OPS = ("admin.add_learner", "admin.change_membership", "admin.remove", "admin.remove_learner",
             "admin.transfer_leader", "admin.snapshot", "admin.purge_log", "admin.backup_begin",
             "admin.backup_chunk", "admin.backup_end")


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
    try:
        lid = raft.add_learner(nid, Node(addr, data), blocking=blocking, timeout=timeout)
    except (ValueError, TypeError) as e:  # what Raft.add_learner refuses before proposing: the caller's input
        raise _BadRequest(f"{op}: {e}") from None
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
        lid = raft.remove_learner(nid, timeout=timeout)
        return {"log_id": log_id_to_wire(lid), "membership": _membership_dict(raft.metrics())}
    voters = set(ms.configs[-1]) - {nid}
    if not voters:
        raise ChangeMembershipError(f"node {nid} is the only voter; it cannot be removed")
    raft.change_membership(voters, retain=False, timeout=timeout)
    return {"membership": _membership_dict(raft.metrics())}


def _remove_learner(raft: Raft, b: dict, timeout: float) -> dict:
    nid = _node_id(b, "admin.remove_learner")
    m = _check_leader(raft)
    ms = m.membership
    if ms is not None and ms.is_voter(nid):
        raise ChangeMembershipError(f"node {nid} is a voter, not a learner: remove it with a membership "
                                    f"change (pyraft-admin remove {nid})")
    lid = raft.remove_learner(nid, timeout=timeout)
    if lid is None:
        raise ChangeMembershipError(f"node {nid} is not a member of the cluster")
    return {"log_id": log_id_to_wire(lid), "membership": _membership_dict(raft.metrics())}


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


#: Seconds between two asks for a snapshot while waiting for one that covers an index.
_RETRIGGER_EVERY = 0.25


def _await_snapshot(raft: Raft, index: int, deadline: float, timeout: float) -> RaftMetrics:
    """Have this node build snapshots until one covers ``index``; the metrics that show it.

    ``trigger.snapshot()`` does nothing while a build runs, and a build that
    was already running may have taken its view below ``index`` (a policy
    build, another admin's): so ask again every ``_RETRIGGER_EVERY`` seconds
    until a snapshot covers it.  :class:`Timeout` at ``deadline``.
    """
    while True:
        raft.trigger.snapshot()
        left = deadline - time.monotonic()
        try:
            return raft.wait(max(0.0, min(left, _RETRIGGER_EVERY))).metrics(
                lambda m: log_index(m.snapshot) >= index, f"a snapshot covering index {index}")
        except Timeout:
            if time.monotonic() >= deadline:
                raise Timeout(f"node {raft.node_id}: no snapshot covering index {index} within "
                              f"{timeout:g} s") from None


def _snapshot(raft: Raft, b: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    m0 = raft.metrics()
    want = log_index(m0.last_applied)
    if want == 0:
        raise RaftError(f"node {m0.id} has applied nothing yet: there is nothing to snapshot")
    m = _await_snapshot(raft, want, deadline, timeout)
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


# ---------------------------------------------------------------------------
# Backups

@dataclass(slots=True)
class _OpenBackup:
    """One backup being read: its snapshot file (open), size and meta, and when it was last asked for."""

    file: BinaryIO
    size: int
    meta: SnapshotMeta
    last_used: float


class _Backups:
    """The backups open on one node (see the module docstring)."""

    def __init__(self, raft: Raft) -> None:
        self.raft = raft
        self._lock = threading.Lock()  # guards _open
        self._open: dict[str, _OpenBackup] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            old = [k for k, v in self._open.items() if now - v.last_used > BACKUP_IDLE]
            gone = [self._open.pop(k) for k in old]
        for b in gone:
            b.file.close()
        for k in old:
            log.info("node %s: backup %s closed after %.0f s unused", self.raft.node_id, k, BACKUP_IDLE)

    def _fence(self, b: dict, timeout: float) -> int:
        """The log index the backup must cover (module docstring)."""
        raft = self.raft
        if raft.metrics().state == ServerState.LEADER:
            try:
                return raft.ensure_linearizable(timeout).index
            except ForwardToLeader:
                pass  # deposed meanwhile: fall back to what the caller and this node know
        want = b.get("min_index", 0)
        if type(want) is not int or want < 0:
            raise _BadRequest(f"admin.backup_begin: 'min_index' must be a non-negative integer, got {want!r}")
        return max(want, log_index(raft.metrics().committed))

    def begin(self, raft: Raft, b: dict, timeout: float) -> dict:
        self._expire()
        with self._lock:
            if len(self._open) >= MAX_BACKUPS:
                raise RaftError(f"node {raft.node_id} has {MAX_BACKUPS} backups open; retry later")
        deadline = time.monotonic() + timeout
        fence = self._fence(b, timeout)
        left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
        raft.wait(left()).applied_index_at_least(fence, f"applied index >= {fence} for the backup")
        if fence == 0:
            raise RaftError(f"node {raft.node_id} has applied nothing yet: there is nothing to back up")
        sm = raft.state_machine
        while True:
            cur = sm.current_snapshot()
            if cur is not None and log_index(cur.last_log_id) >= fence:
                opened = sm.open_snapshot()
                if opened is not None and log_index(opened[0].last_log_id) >= fence:
                    break
                if opened is not None:  # replaced by an older one meanwhile (an install): build again
                    opened[1].close()
            _await_snapshot(raft, fence, deadline, timeout)
        meta, f = opened
        size = os.fstat(f.fileno()).st_size
        head = os.pread(f.fileno(), 8, 0)
        bid = uuid.uuid4().hex
        with self._lock:
            if len(self._open) >= MAX_BACKUPS:
                f.close()
                raise RaftError(f"node {raft.node_id} has {MAX_BACKUPS} backups open; retry later")
            self._open[bid] = _OpenBackup(f, size, meta, time.monotonic())
        log.info("node %s: backup %s started: snapshot %s (%d bytes) covering fence index %d",
                 raft.node_id, bid, meta.last_log_id, size, fence)
        return {"backup": bid, "size": size, "snapshot_meta": snapshot_meta_to_wire(meta),
                "snapshot_format": head.decode("ascii", "replace"), "fence_index": fence,
                "cluster_name": raft.config.cluster_name, "node_id": raft.node_id, "chunk": BACKUP_CHUNK}

    def _get(self, b: dict, op: str) -> tuple[str, _OpenBackup]:
        bid = b.get("backup")
        if type(bid) is not str:
            raise _BadRequest(f"{op}: 'backup' must be the id admin.backup_begin returned")
        with self._lock:
            ob = self._open.get(bid)
            if ob is None:
                raise RaftError(f"node {self.raft.node_id} has no open backup {bid[:40]!r} (it ended, was idle "
                                f"for over {BACKUP_IDLE:g} s, or the node restarted): start again")
            ob.last_used = time.monotonic()
        return bid, ob

    def chunk(self, raft: Raft, b: dict, timeout: float) -> dict:
        _bid, ob = self._get(b, "admin.backup_chunk")
        offset = b.get("offset")
        if type(offset) is not int or not 0 <= offset <= ob.size:
            raise _BadRequest(f"admin.backup_chunk: 'offset' must be an integer in [0, {ob.size}]")
        return {"data": os.pread(ob.file.fileno(), min(BACKUP_CHUNK, ob.size - offset), offset)}

    def end(self, raft: Raft, b: dict, timeout: float) -> dict:
        bid, ob = self._get(b, "admin.backup_end")
        with self._lock:
            self._open.pop(bid, None)
        ob.file.close()
        log.info("node %s: backup %s ended", raft.node_id, bid)
        return {}

    def close_all(self) -> None:
        with self._lock:
            gone, self._open = list(self._open.values()), {}
        for ob in gone:
            ob.file.close()


_Op = Callable[[Raft, dict, float], dict]

#: op -> (function, leader only)
_OPS: dict[str, tuple[_Op, bool]] = {
    "admin.add_learner": (_add_learner, True),
    "admin.change_membership": (_change_membership, True),
    "admin.remove": (_remove, True),
    "admin.remove_learner": (_remove_learner, True),
    "admin.transfer_leader": (_transfer_leader, True),
    "admin.snapshot": (_snapshot, False),
    "admin.purge_log": (_purge_log, False),
}


# ---------------------------------------------------------------------------
# Registration

def serve_admin(raft: Raft, *, max_timeout: float = MAX_TIMEOUT, max_concurrent: int = MAX_CONCURRENT) -> None:
    """Register the ``admin.*`` ops on ``raft`` (see the module docstring); each needs the role "admin".

    Idempotent.  Open backups are closed when the node shuts down.
    """
    if not max_timeout > 0 or max_concurrent < 1:
        raise ValueError("max_timeout must be positive and max_concurrent at least 1")
    slots = threading.BoundedSemaphore(max_concurrent)  # one per running worker
    backups = _Backups(raft)
    raft.add_shutdown_hook(backups.close_all)

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

    ops: dict[str, tuple[_Op, bool]] = dict(_OPS)
    ops["admin.backup_begin"] = (backups.begin, False)
    ops["admin.backup_chunk"] = (backups.chunk, False)
    ops["admin.backup_end"] = (backups.end, False)
    for op, (fn, leader_only) in ops.items():
        raft.set_client_handler(op, make_handler(op, fn, leader_only), role="admin")


def stop_serving_admin(raft: Raft) -> None:
    """Remove the ``admin.*`` ops from ``raft`` (operations already running finish)."""
    for op in ADMIN_OPS:
        raft.set_client_handler(op, None)
