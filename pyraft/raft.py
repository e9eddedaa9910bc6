"""The Raft handle: what a user's threads call.

Every call crosses into the RaftCore thread through its inbox and comes
back through a ``concurrent.futures.Future``.  Blocking calls take a
``timeout`` (seconds; None waits as long as it takes) and raise
:class:`~pyraft.errors.Timeout` when it passes.
"""
from __future__ import annotations

import concurrent.futures
import inspect
import logging
import math
import random
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Mapping

from .codec import ClientRequest, ClientResponse, pack, pack_command
from .config import Config
from .errors import (ChangeMembershipError, CodecError, ForwardToLeader, InitializeError, PermissionDenied, RaftError,
                     Timeout)
from .metrics import ClientWriteResponse, RaftMetrics
from .network import OP_ROLES, TRUSTED, Transport
from .runtime.core import RaftCore
from .runtime.futures import fail, new_future, succeed
from .storage import LogStore, StateMachine
from .types import LogId, Node, ServerState, log_index

log = logging.getLogger("pyraft")

__all__ = ["Raft", "Wait", "Trigger", "ClientWriteResponse", "RaftMetrics"]


#: Node ids are what the wire format carries: integers in [0, 2**63 - 1].
_MAX_NODE_ID = 2**63 - 1
#: A member's ``Node.data``, encoded, at most (it goes into every membership entry and snapshot).
MAX_NODE_DATA_BYTES = 16 * 1024
#: A membership, encoded, at most.  Each change sends it to every member in AppendEntries (a 17 MB
#: one was dropped by every transport and stalled replication behind it), and a megabyte sent
#: to a dozen members per change already starved a test cluster's heartbeats.
MAX_MEMBERSHIP_BYTES = 256 * 1024
#: A command at least this long encoded is a large write: its bytes count against
#: Config.max_pending_write_bytes while it is in flight (smaller ones only against
#: Config.max_pending_writes, at no cost on their path).
LARGE_COMMAND_BYTES = 4096


def _check_membership_size(nodes: Mapping[int, Node], what: str) -> None:
    """ValueError when a membership of ``nodes`` would be more than MAX_MEMBERSHIP_BYTES encoded."""
    size = len(pack([[i, n.addr, n.data] for i, n in nodes.items()]))
    if size > MAX_MEMBERSHIP_BYTES:
        raise ValueError(f"{what}: the membership would be about {size} bytes encoded, at most "
                         f"{MAX_MEMBERSHIP_BYTES} (it goes to every member with each change and in every snapshot)")


def _check_node_id(v: Any, what: str = "node_id") -> int:
    """``v`` if it is a node id; TypeError or ValueError saying why not."""
    if type(v) is not int:
        raise TypeError(f"{what} must be an int, got {type(v).__name__} {v!r:.40}")
    if not 0 <= v <= _MAX_NODE_ID:
        raise ValueError(f"{what} must be an integer in [0, 2**63 - 1], got {v}")
    return v


def _check_timeout(t: Any, what: str = "timeout") -> float | None:
    """``t`` if it is None or a finite number of seconds >= 0; TypeError or ValueError otherwise."""
    if t is None:
        return None
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        raise TypeError(f"{what} must be a number of seconds or None, got {type(t).__name__}")
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"{what} must be a finite number of seconds >= 0 (or None), got {t!r}")
    return t


def _check_bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise TypeError(f"{what} must be True or False, got {type(v).__name__}")
    return v


def _result(fut: Future, timeout: float | None, what: str) -> Any:
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        raise Timeout(f"{what} did not finish within {timeout} s") from None


class Raft:
    """One Raft node: starts its threads on construction; ``shutdown()`` (or ``with``) stops them."""

    def __init__(self, node_id: int, config: Config, transport: Transport, log_store: LogStore,
                 state_machine: StateMachine, *, rng: random.Random | None = None) -> None:
        if type(node_id) is not int or not 0 <= node_id <= _MAX_NODE_ID:
            raise ValueError(f"node_id must be an integer in [0, 2**63 - 1], got {node_id!r}")
        if not isinstance(config, Config):
            raise TypeError(f"config must be a pyraft.Config, got {type(config).__name__}")
        if getattr(transport, "node_id", node_id) != node_id:
            # Its replies would carry the other id, and every peer would drop them as another node's.
            raise ValueError(f"the transport is node {transport.node_id}'s, not node {node_id}'s: give "
                             f"the transport and Raft the same node id")
        self.node_id = node_id
        self.config = config
        self.transport = transport
        self.log_store = log_store
        self.state_machine = state_machine
        self._core = RaftCore(node_id, config, transport, log_store, state_machine, rng)
        self._max_pending_writes = config.max_pending_writes
        #: the state machine's optional check of a command before it is proposed (storage.py)
        self._check_command: Callable[[Any], None] | None = getattr(state_machine, "check_command", None)
        #: the transport's optional check of a node address (ZmqTransport.check_address)
        self._check_address: Callable[[str], None] | None = getattr(transport, "check_address", None)
        # op -> (handler, the role its caller needs)
        self._client_handlers: dict[str, tuple[Callable[[int, ClientRequest, Any], None], str]] = {}
        #: threads that delivered requests to this node (the transport's): shutdown() from
        #: one of them must not wait for the transport to stop (it would wait for itself)
        self._serving_threads: set[threading.Thread] = set()
        self._shutdown_lock = threading.Lock()  # guards the joining stop and _shutdown_hooks
        self._shutdown_hooks: list[Callable[[], None]] = []
        # A stop started from one of the node's own threads is finished by this thread
        # (see shutdown); _finisher_lock guards it and is never held while joining.
        self._finisher_lock = threading.Lock()
        self._finisher: threading.Thread | None = None
        self.trigger = Trigger(self)
        # Client writes and reads that handlers make while the transport delivers one burst of
        # requests (on the transport's thread): handed to RaftCore together when it ends (_end_burst).
        self._burst = _Burst()
        start_kw: dict[str, Any] = {}
        try:
            self._bursts = "on_burst_end" in inspect.signature(transport.start).parameters
        except (TypeError, ValueError):
            self._bursts = False
        if self._bursts:
            start_kw["on_burst_end"] = self._end_burst
        self._core.start()
        try:
            # A transport that can no longer serve makes the node Fatal (visible in its
            # metrics and to every caller) rather than leave it running deaf.
            transport.start(self._on_request, on_failure=lambda reason: self._core.post(("fatal", reason)),
                            **start_kw)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ plumbing

    def _on_request(self, from_id: int, msg: Any, reply: Any) -> None:
        """Transport server thread: Raft RPCs go to RaftCore, client requests to their op's handler.

        The transport has already checked who may send Raft RPCs; a client op
        runs only when ``reply.principal`` has the role the op needs (else
        ``PermissionDenied``).
        """
        t = threading.current_thread()
        if t not in self._serving_threads:
            self._serving_threads.add(t)
        if not isinstance(msg, ClientRequest):
            self._core.post_rpc(("rpc", from_id, msg, reply))
            return
        entry: tuple[Callable[[int, ClientRequest, Any], None], str] | None
        if msg.op == "metrics":
            entry = (self._reply_metrics, "reader")
        else:
            entry = self._client_handlers.get(msg.op)
        if entry is None:
            reply.reply(error_response(RaftError(f"node {self.node_id} does not serve {msg.op!r}")))
            return
        handler, role = entry
        principal = getattr(reply, "principal", TRUSTED)
        if not principal.allows(role):
            reply.reply(error_response(PermissionDenied(
                f"{msg.op!r} needs the {role} role; the caller's key has the {principal.role} role")))
            return
        burst = self._burst
        if burst.items is None:
            burst.items = []
        try:
            handler(from_id, msg, reply)
        except Exception as e:  # noqa: BLE001 - a bad request never takes the node down
            log.warning("node %s: %r request failed: %s", self.node_id, msg.op, e)
            reply.reply(error_response(e))
        if not self._bursts:
            self._end_burst()

    def _end_burst(self) -> None:
        """The transport's thread, after a burst of requests: its client writes and reads go to RaftCore at once.

        One inbox item for the lot, so RaftCore wakes once and proposes the
        writes as one batch (the reads share a heartbeat round), instead of
        once per request as they trickle in.
        """
        burst = self._burst
        items = burst.items
        burst.items = None
        if items:
            self._post_burst(items)

    def _post_burst(self, items: list) -> None:
        try:
            self._core.call(("burst", items))
        except RaftError as e:  # ShutDown, Fatal: nobody will handle them
            for it in items:
                fail(it[-1], e)

    def _reply_metrics(self, _from_id: int, _msg: ClientRequest, reply: Any) -> None:
        reply.reply(ClientResponse(True, self.metrics().to_dict()))

    def set_client_handler(self, op: str, handler: Callable[[int, ClientRequest, Any], None] | None, *,
                           role: str = "client") -> None:
        """Serve ``ClientRequest(op, ...)`` messages arriving on this node's transport.

        ``handler(from_id, request, reply)`` runs on the transport's thread and
        must not block: use the ``*_async`` calls and ``reply.reply(...)`` from
        a future's callback.  ``None`` removes the handler.  The op
        ``"metrics"`` is built in: it answers with ``metrics().to_dict()``.

        ``role`` is what the caller's key must carry (``"reader"``,
        ``"client"`` or ``"admin"``; see ``pyraft.network.Principal``): a
        caller below it gets ``PermissionDenied``.  Without CURVE every
        caller is trusted.  The built-in ``"metrics"`` needs ``"reader"``.
        """
        if type(op) is not str:
            raise TypeError(f"op must be a str, got {type(op).__name__}")
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be callable or None, got {type(handler).__name__}")
        if role not in OP_ROLES:
            raise ValueError(f"role must be one of {', '.join(OP_ROLES)}, got {role!r}")
        if op == "metrics":
            raise ValueError("'metrics' is built in")
        if handler is None:
            self._client_handlers.pop(op, None)
        else:
            self._client_handlers[op] = (handler, role)

    def _api(self, fn: Callable[[Any], Any]) -> Future:
        fut: Future = Future()
        self._core.call(("api", fn, fut))
        return fut

    # ------------------------------------------------------------------ cluster set-up

    def initialize(self, nodes: Mapping[int, Node], timeout: float | None = 10.0) -> None:
        """Write the initial membership on a pristine node.  ``InitializeError`` otherwise."""
        if not isinstance(nodes, Mapping):
            raise InitializeError("initialize takes a mapping of node id (int) to Node")
        _check_timeout(timeout)
        checked: dict[int, Node] = {}
        for k, v in nodes.items():
            try:
                _check_node_id(k, "a node id")
                checked[k] = self._check_node(v, f"node {k}")
            except (TypeError, ValueError) as e:
                raise InitializeError(f"initialize takes a mapping of node id (int) to Node: {e}") from None
        try:
            _check_membership_size(checked, "initialize")
        except ValueError as e:
            raise InitializeError(str(e)) from None
        _result(self._api(lambda e: e.initialize(checked)), timeout, "initialize")

    def _check_node(self, node: Any, what: str) -> Node:
        """``node`` if it is a Node this cluster can store and its transport can reach; else TypeError/ValueError.

        Its address goes into the log with the membership: one the transport
        cannot use would otherwise be found only by the replication worker of
        every leader to come.  Its ``data`` goes as the followers will decode
        it (:func:`pyraft.codec.pack_command`: a tuple becomes a list), so the
        Node returned may be a copy.
        """
        if not isinstance(node, Node):
            raise TypeError(f"{what} must be a pyraft.Node, got {type(node).__name__}")
        if type(node.addr) is not str or not node.addr:
            raise ValueError(f"{what}: the address must be a non-empty str, got {node.addr!r:.60}")
        if node.data is not None:
            if not isinstance(node.data, Mapping):
                raise TypeError(f"{what}: data must be a mapping or None, got {type(node.data).__name__}")
            try:
                raw, data = pack_command(dict(node.data))
            except (TypeError, ValueError, OverflowError, CodecError) as e:
                raise ValueError(f"{what}: data cannot be encoded with msgpack: {e}") from None
            if len(raw) > MAX_NODE_DATA_BYTES:
                raise ValueError(f"{what}: data is {len(raw)} bytes encoded, at most {MAX_NODE_DATA_BYTES}")
            node = Node(node.addr, data)
        if self._check_address is not None:
            self._check_address(node.addr)
        return node

    # ------------------------------------------------------------------ writes

    def client_write_async(self, command: Any) -> Future:
        """Propose ``command``; the future gets a ``ClientWriteResponse`` once it is applied here.

        Raises at once, with nothing proposed: ``Overloaded`` when
        ``Config.max_pending_writes`` writes are in flight on this node already
        (or, for a command of at least :data:`LARGE_COMMAND_BYTES` encoded, when
        it would pass ``Config.max_pending_write_bytes``),
        whatever the state machine's ``check_command`` raises for a command it
        could not hold (``NoSpace``, ``KVCommandError``), ``CodecError`` for a
        command msgpack cannot encode or followers could not decode
        (:func:`pyraft.codec.pack_command`), ``ShutDown``/``Fatal`` when the node
        stopped.  A command that is not made of plain values (a tuple, a
        subclass of int) is applied everywhere, here too, as followers decode
        it (a list, an int).
        """
        core = self._core
        # The hot path: a few attribute reads, no lock (see RaftCore.write_tickets).
        if core.writes_accepted - core.writes_released - core.writes_released_sm >= self._max_pending_writes:
            raise core.overloaded()
        check = self._check_command
        if check is not None:
            check(command)
        try:
            # The encoding, and the command as followers will decode it: the value applied here too.
            packed, command = pack_command(command)
        except (TypeError, ValueError, OverflowError) as e:
            raise CodecError(f"the command cannot be encoded with msgpack: {e}") from None
        fut: Future = new_future()  # a concurrent.futures.Future, cheaper to make (runtime/futures.py)
        large = len(packed) >= LARGE_COMMAND_BYTES
        if large:
            core.hold_write_bytes(fut, len(packed))  # Overloaded past Config.max_pending_write_bytes
        batch = self._burst.items
        try:
            if batch is not None:  # a client handler on the transport's thread: proposed at the burst's end
                if core._closed:
                    raise core.stopped_error()
                batch.append(("write", command, fut, packed))
            else:
                # The bytes go along: RaftCore stores them as the entry's payload (no second pack on its thread).
                core.call(("write", command, fut, packed))
        except RaftError as e:  # the node stopped: nothing was handed over
            if large:
                fail(fut, e)  # gives its bytes back
            raise
        core.writes_accepted = next(core.write_tickets)
        return fut

    def client_write(self, command: Any, timeout: float | None = None) -> ClientWriteResponse:
        """Propose ``command`` and wait until it is committed and applied on this node."""
        _check_timeout(timeout)
        fut = self.client_write_async(command)
        self._hand_over_burst()
        return _result(fut, timeout, "client_write")

    def _hand_over_burst(self) -> None:
        """Before a blocking call waits on the transport's thread (a handler should not block; one
        that does must not wait for its own request, held until the burst ends): hand the burst over now."""
        burst = self._burst
        if burst.items:
            items, burst.items = burst.items, []
            self._post_burst(items)

    # ------------------------------------------------------------------ reads

    def ensure_linearizable_async(self) -> Future:
        """ReadIndex: the future gets the LogId the state machine has applied up to when the read is safe.

        With ``Config.lease_reads``, a leader whose read lease holds completes
        it at once, on the calling thread, with what its state machine has
        applied (no heartbeat round; see ``Engine.read_lease``).
        """
        fut: Future = new_future()  # one per client read, like a write's (runtime/futures.py)
        lid = self._core.lease_read()
        if lid is not None:
            succeed(fut, lid)
            return fut
        batch = self._burst.items
        if batch is not None:  # a client handler on the transport's thread: handed over at the burst's end
            if self._core._closed:
                raise self._core.stopped_error()
            batch.append(("read", fut))
        else:
            self._core.call(("read", fut))
        return fut

    def ensure_linearizable(self, timeout: float | None = None) -> LogId:
        """Block until reading the local state machine is linearizable (ReadIndex)."""
        _check_timeout(timeout)
        fut = self.ensure_linearizable_async()
        self._hand_over_burst()
        return _result(fut, timeout, "ensure_linearizable")

    # ------------------------------------------------------------------ membership

    def add_learner(self, node_id: int, node: Node, blocking: bool = True, timeout: float | None = None) -> LogId | None:
        """Add a learner; with ``blocking`` return once it has caught up with the log as of the call.

        ``node_id`` must be an int in [0, 2**63 - 1] and ``node`` a :class:`Node`
        whose address the transport accepts (``ZmqTransport.check_address``),
        else TypeError or ValueError, with nothing proposed.  Adding an existing
        learner again with another ``Node`` changes its address.
        """
        _check_node_id(node_id)
        node = self._check_node(node, f"node {node_id}")
        _check_bool(blocking, "blocking")
        _check_timeout(timeout)
        m = self.metrics().membership
        if m is not None:
            _check_membership_size({**m.nodes, node_id: node}, "add_learner")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait_leader_ready(deadline)
        fut = self._api(lambda e: (e.add_learner(node_id, node), e.log.last_index))
        lid, target = _result(fut, _left(deadline), "add_learner")
        w = self.wait(_left(deadline))
        if lid is not None:
            w.metrics(lambda m: log_index(m.committed) >= lid.index, f"the learner entry {lid} to commit")
            self._check_committed(lid, lambda m: m.membership is not None and m.membership.nodes.get(node_id) == node,
                                  deadline, f"add_learner {node_id}")
        if blocking:
            w.metrics(lambda m: log_index(m.replication.get(node_id)) >= target,
                      f"learner {node_id} to catch up to index {target}")
        return lid

    def _check_committed(self, lid: LogId, shows: Callable[[RaftMetrics], bool], deadline: float | None,
                         what: str) -> None:
        """Once the commit point passed ``lid.index``: ForwardToLeader unless the entry committed there is ``lid``.

        A leader deposed before its entry committed may see a new leader's
        entry committed at that index instead (its own was overwritten).
        When the log no longer holds the index (a snapshot replaced it), the
        metrics must show the change (``shows``).
        """
        term = _result(self._api(lambda e: e.log.term_at(lid.index)), _left(deadline), what)
        m = self.metrics()
        if term == lid.term or (term is None and shows(m)):
            return
        leader = m.current_leader
        node = m.membership.nodes.get(leader) if m.membership is not None and leader is not None else None
        raise ForwardToLeader(leader, node, f"{what}: its entry {lid} was overwritten by a new leader's "
                                            f"(the entry committed at index {lid.index} has term {term}); "
                                            f"nothing changed: ask the leader again")

    def remove_learner(self, node_id: int, timeout: float | None = None) -> LogId | None:
        """Remove the learner ``node_id``; returns once a committed configuration no longer lists it.

        Returns the log id of the configuration entry, or None when the node
        was not a member.  The leader keeps replicating to the node until it
        has learned of its removal (an election timeout at most), then its
        replication worker stops.  ``ChangeMembershipError`` for a voter
        (remove it with ``change_membership``) or while a change is in
        progress; ``ForwardToLeader`` off the leader.  ``node_id`` must be an
        int in [0, 2**63 - 1], else TypeError or ValueError, with nothing proposed.
        """
        _check_node_id(node_id)
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait_leader_ready(deadline)
        lid = _result(self._api(lambda e: e.remove_learner(node_id)), _left(deadline), "remove_learner")
        if lid is not None:
            self.wait(_left(deadline)).metrics(
                lambda m: m.membership is not None and node_id not in m.membership.nodes and m.membership_committed,
                f"the removal of learner {node_id} to commit")
        return lid

    def change_membership(self, voter_ids: Iterable[int], retain: bool = False, timeout: float | None = None) -> None:
        """Joint-consensus change to ``voter_ids``; returns once the final configuration is committed.

        New voters must first catch up with the log (within one AppendEntries
        of the commit point): the call waits for that, since a joint
        configuration commits nothing without a majority of the new voters.
        One change at a time: ``ChangeMembershipError`` while one is in
        progress, for an empty voter set, or for a voter that is not a learner
        yet.  Removed voters leave the cluster (``retain=True`` keeps them as
        learners); their replication workers stop.  A leader that removes
        itself refuses new writes (``ForwardToLeader``) once the final
        configuration is in its log, steps down when it commits and hands over
        to the most up-to-date remaining voter with TimeoutNow.  ``Timeout``
        when the change does not complete in time (for example because the
        leader lost its quorum): the cluster then settles on the old
        configuration (the joint entry was discarded) or on the new one (a
        later leader finalizes it), never on anything else.
        """
        voters = set(voter_ids)
        if not all(type(v) is int and 0 <= v <= _MAX_NODE_ID for v in voters):
            raise ChangeMembershipError(f"voter ids must be integers in [0, 2**63 - 1], got {sorted(map(repr, voters))}")
        _check_bool(retain, "retain")
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait_leader_ready(deadline)
        while True:
            self._wait_caught_up(voters, deadline)
            try:
                _result(self._api(lambda e: e.change_membership(voters, retain)), _left(deadline), "change_membership")
                break
            except ChangeMembershipError as e:
                if not getattr(e, "lagging", None):
                    raise
                # The commit point moved on between the wait and the call, or a new voter has not
                # answered lately (the engine knows; metrics do not): wait again, a heartbeat later.
                left = _left(deadline)
                if left is not None and left <= 0:
                    raise Timeout(f"change_membership: {e}") from None
                time.sleep(self.config.heartbeat_interval if left is None else
                           min(left, self.config.heartbeat_interval))

        def done(m: RaftMetrics) -> bool:
            if m.membership is None or m.membership.is_joint or m.membership.voter_ids != voters:
                return False
            return m.membership_committed

        # The leader may be removed by this change: then its metrics still show the commit.
        self.wait(_left(deadline)).metrics(done, f"membership {sorted(voters)} to commit")

    def _wait_caught_up(self, voters: set[int], deadline: float | None) -> None:
        """On the leader, wait until each new voter is as close to the commit point as the engine
        requires (``Engine.lagging``).  Elsewhere return at once: the engine says what is wrong."""
        m = self.metrics()
        if m.state != ServerState.LEADER or m.membership is None:
            return
        new = {v for v in voters - m.membership.voter_ids if v in m.membership.nodes}
        slack = self.config.max_payload_entries

        def caught_up(m: RaftMetrics) -> bool:  # (a new voter that never answered has no entry here)
            return m.state != ServerState.LEADER or all(
                m.replication.get(v) is not None and log_index(m.replication.get(v)) + slack >= log_index(m.committed)
                for v in new)

        if new:
            self.wait(_left(deadline)).metrics(caught_up, f"new voters {sorted(new)} to catch up with the log")

    def _wait_leader_ready(self, deadline: float | None) -> None:
        """On a leader that has not committed an entry of its term yet, wait (briefly) until it has.

        A new leader cannot change the membership before that (its view of the
        committed configuration may be stale); waiting here spares the caller a
        spurious "retry shortly".  Not a leader: return at once, the call raises
        ForwardToLeader.
        """
        def ready(m: RaftMetrics) -> bool:
            return (m.state != ServerState.LEADER
                    or (m.committed is not None and m.committed.term == m.current_term))

        left = _left(deadline)
        cap = 2 * self.config.election_timeout[1]
        try:
            self.wait(cap if left is None else min(left, cap)).metrics(ready, "the leader's first commit")
        except Timeout:
            pass  # the engine says why

    # ------------------------------------------------------------------ observing

    def metrics(self) -> RaftMetrics:
        return self._core.metrics

    def is_leader(self) -> bool:
        return self._core.metrics.state == ServerState.LEADER

    def wait(self, timeout: float | None = None) -> "Wait":
        return Wait(self._core, _check_timeout(timeout))

    # ------------------------------------------------------------------ stopping

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop every thread of this node and close its transport.  Idempotent; from any thread.

        Pending calls fail with ``ShutDown``; what was durable stays durable.
        A node that stopped as ``Fatal`` keeps its transport open until this
        call: it answers ``"metrics"`` (state Fatal, with the reason in
        ``error``) and fails every other request with ``Fatal``.
        From a user's thread it returns once every thread of the node has
        ended and the shutdown hooks have run (``Timeout`` if that takes longer
        than ``timeout``).

        From one of the node's own threads (a future's done-callback, a client
        request handler, a replicated method) it cannot wait for them: that
        thread is one of them.  It then starts the stop and returns at once.
        The caller can rely on this: RaftCore stops at the end of its current
        turn; every call made from then on, and every call still pending,
        fails with ``ShutDown``; the node's threads end as soon as the calling
        one returns to the node (a background thread ``pyraft-shutdown-<id>``
        joins them and runs the hooks); a later ``shutdown()`` from a user's
        thread waits for all of that.
        """
        _check_timeout(timeout)
        core = self._core
        core.shut_down = True
        core.post(("stop",))
        if core.owns_current_thread() or threading.current_thread() in self._serving_threads:
            with self._finisher_lock:
                if self._finisher is None:
                    self._finisher = threading.Thread(target=self._finish_shutdown, args=(None,),
                                                      name=f"pyraft-shutdown-{self.node_id}", daemon=True)
                    self._finisher.start()
            return
        self._finish_shutdown(timeout)
        with self._finisher_lock:
            finisher = self._finisher
        if finisher is not None and finisher is not threading.current_thread():
            finisher.join(timeout)  # the hooks it runs (if it got the lock first) are done too

    def _finish_shutdown(self, timeout: float | None) -> None:
        """Wait for RaftCore (which joins the other threads) to end, then run the shutdown hooks once."""
        with self._shutdown_lock:
            core = self._core
            core.join(timeout)
            if core.is_alive():
                raise Timeout(f"node {self.node_id} did not stop within {timeout} s")
            if core.fatal is not None:
                core.close_transport()  # kept open while Fatal (RaftCore._teardown); idempotent
            hooks, self._shutdown_hooks = self._shutdown_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - one failing hook must not keep the others from running
                log.exception("node %s: a shutdown hook failed", self.node_id)

    def add_shutdown_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` once, after this node's threads have stopped.

        For components bound to the node that own threads of their own (the
        replicated objects' call dispatcher does), so that ``shutdown()``
        leaves no ``pyraft-`` thread behind.
        """
        with self._shutdown_lock:
            if self._core.is_alive() or not self._core.shut_down:
                self._shutdown_hooks.append(hook)
                return
        hook()

    def __enter__(self) -> "Raft":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        m = self._core.metrics
        return f"<Raft {self.node_id} {m.state} term={m.current_term} leader={m.current_leader}>"


class _Burst(threading.local):
    """Per thread: the client writes and reads of the burst the transport is delivering on it (None: not in one).

    ``("write", command, future)`` and ``("read", future)``: RaftCore's inbox items, in arrival order.
    """

    items: list | None = None


def error_response(e: BaseException) -> ClientResponse:
    """A ClientResponse carrying ``e``: ``[type name, message, leader_id, leader_addr]``.

    A private error class goes by the name of its nearest public base (a client
    knows ``RaftError``, not a server's ``_BadRequest``).
    """
    name = next(c.__name__ for c in type(e).__mro__ if not c.__name__.startswith("_"))
    if isinstance(e, ForwardToLeader):
        addr = e.leader_node.addr if e.leader_node is not None else None
        return ClientResponse(False, None, [name, str(e), e.leader_id, addr])
    return ClientResponse(False, None, [name, str(e), None, None])


def raise_error_response(resp: ClientResponse) -> None:
    """Raise the pyraft error a failed ClientResponse carries (the inverse of ``error_response``)."""
    from . import errors
    name, message, leader_id, addr = resp.error
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.RaftError)):
        cls = errors.RaftError
    if cls is errors.ForwardToLeader:
        raise errors.ForwardToLeader(leader_id, Node(addr) if addr else None, message)
    raise cls(message)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Wait:
    """``raft.wait(timeout).state(...)`` and friends: block until the metrics satisfy a condition."""

    def __init__(self, core: RaftCore, timeout: float | None) -> None:
        self._core = core
        self._timeout = timeout

    def metrics(self, predicate: Callable[[RaftMetrics], bool], message: str = "condition") -> RaftMetrics:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        core = self._core
        with core.cond:
            core.metrics_waiters += 1  # RaftCore wakes for each applied batch while it is > 0
            core.inbox.wake()  # for an applied batch posted (lazily) before we counted
            try:
                while True:
                    m = core.metrics
                    if predicate(m):
                        return m
                    if m.state in (ServerState.FATAL, ServerState.SHUTDOWN):
                        raise core.stopped_error()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise Timeout(f"node {m.id}: timed out after {self._timeout} s waiting for {message}; "
                                      f"now state={m.state} term={m.current_term} leader={m.current_leader} "
                                      f"last_log={m.last_log_index} committed={m.committed} "
                                      f"applied={m.last_applied}")
                    core.cond.wait(left)
            finally:
                core.metrics_waiters -= 1

    def state(self, state: ServerState, message: str | None = None) -> RaftMetrics:
        return self.metrics(lambda m: m.state == state, message or f"state {state}")

    def current_leader(self, leader_id: int | None, message: str | None = None) -> RaftMetrics:
        return self.metrics(lambda m: m.current_leader == leader_id, message or f"leader {leader_id}")

    def applied_index_at_least(self, index: int, message: str | None = None) -> RaftMetrics:
        return self.metrics(lambda m: log_index(m.last_applied) >= index, message or f"applied index >= {index}")

    def log_index_at_least(self, index: int, message: str | None = None) -> RaftMetrics:
        return self.metrics(lambda m: m.last_log_index >= index, message or f"log index >= {index}")

    def voter_ids(self, ids: Iterable[int], message: str | None = None) -> RaftMetrics:
        want = set(ids)
        return self.metrics(lambda m: m.membership is not None and m.membership.voter_ids == want,
                            message or f"voters {sorted(want)}")


class Trigger:
    """``raft.trigger.elect()`` and friends: ask the node to act now."""

    def __init__(self, raft: Raft) -> None:
        self._raft = raft

    def _do(self, fn: Callable[[Any], Any], what: str, timeout: float | None = 10.0) -> Any:
        return _result(self._raft._api(fn), timeout, what)

    def elect(self) -> None:
        self._do(lambda e: e.trigger_elect(), "trigger.elect")

    def heartbeat(self) -> None:
        self._do(lambda e: e.trigger_heartbeat(), "trigger.heartbeat")

    def snapshot(self) -> None:
        self._do(lambda e: e.trigger_snapshot(), "trigger.snapshot")

    def purge_log(self, upto_index: int) -> LogId | None:
        if type(upto_index) is not int or upto_index < 0:
            raise ValueError("upto_index must be a non-negative integer")
        return self._do(lambda e: e.trigger_purge(upto_index), "trigger.purge_log")

    def transfer_leader(self, to_node_id: int) -> None:
        _check_node_id(to_node_id, "to_node_id")
        self._do(lambda e: e.transfer_leader(to_node_id), "trigger.transfer_leader")
