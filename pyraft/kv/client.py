"""KVClient: the blocking, thread-safe client of a replicated KV cluster (``pyraft-kv serve``).

::

    with KVClient(["tcp://10.0.0.5:7001", "tcp://10.0.0.6:7001", "tcp://10.0.0.7:7001"]) as kv:
        kv.put("x", 1)
        kv.get("x")              # 1, linearizable (ReadIndex on the leader)
        kv.cas("x", 1, 2)        # True
        kv.delete("x")           # True: it existed

How a call proceeds:

- It goes to the last known leader (or the first address), over one
  ZeroMQ DEALER per node that every thread of the client shares
  (:class:`~pyraft.transports.zmq.ZmqChannel`): each call has its own
  request id and waits for the reply with that id, so calls from many
  threads are in flight on one connection at once (pipelined), and those
  queued together leave together.  No thread of the client's own: one of
  the waiting callers drives the sockets for all of them, so a lone
  caller sends and receives on its own thread.
- A ``ForwardToLeader`` reply names the leader's address: the call follows it
  at once.  A reply without a usable hint (an election is running), a lost
  reply or an unreachable node: the call waits a little and tries the next
  node.  Each attempt waits at most ``attempt_timeout`` for its reply
  (default: a third of ``timeout``, between 0.2 and 1 s).
- The whole call returns or raises within ``timeout`` seconds: past it,
  :class:`~pyraft.errors.Timeout` (the outcome of a write is then unknown:
  it may still take effect).  A command the state machine refuses raises
  :class:`~pyraft.kv.commands.KVCommandError` at once (a key the store
  cannot hold is refused here, before anything is sent), and so do
  :class:`~pyraft.errors.NoSpace` (the cluster's store is past its quota)
  and :class:`~pyraft.errors.Overloaded` (the leader has too many writes in
  flight): retrying cannot help the first and would add to the second.

Exactly-once: every write carries a session, ``client`` (16 random bytes)
and ``seq`` (one more per write), and every retry of that write carries the
same pair.  The state machine applies a ``(client, seq)`` once and answers
duplicates with the remembered result, so a write whose reply was lost and
that was retried returns its original result and is not applied twice.
The state machine remembers only each session's *last* seq, so a session
must never have two writes in flight: a newer seq applied first would make
the older one "stale" (refused, though it was never applied).  So each
write takes a session of its own from a pool for as long as the call lasts,
retries included, and gives it back after; concurrent writes hold distinct
sessions (the pool grows to the number of writes in flight at once, and
the state machine forgets idle sessions after ``session_ttl`` entries).  A
copy of an earlier write of the same session that arrives late (its call
gave up with ``Timeout``) carries a smaller seq than anything sent on the
session since, so it is refused, never applied a second time.  Reads carry
no session.

CURVE: with ``curve`` (a :class:`~pyraft.transports.zmq.CurveConfig` with
this client's ``secret_key_file`` and the ``allowed_keys_dir`` holding each
node's public key as ``peers/N.key``), the client must know each address's
node id: give ``addresses`` as ``{1: "tcp://...", ...}`` or as
``"1=tcp://..."`` strings.  A server that does not list this client's public
key never completes the handshake: calls raise ``Timeout``.  A key whose
role does not allow the call (a reader's key writing) raises
:class:`~pyraft.errors.PermissionDenied` at once, as does a request larger
than the nodes accept (:class:`~pyraft.errors.RequestTooLarge`): no retry.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterable, Mapping

from ..codec import ClientRequest, ClientResponse
from ..errors import RaftError, Timeout
from ..raft import raise_error_response
from ..transports.zmq import CurveConfig, TransportError, ZmqChannel, ZmqClient
from .commands import KVCommandError, check_key

__all__ = ["KVClient", "parse_addresses"]

#: How long an address that just failed (no reply in time) is avoided when choosing where to go.
_AVOID_FOR = 1.5
#: Pauses between attempts while no leader is known: doubles from the first to the last.
_BACKOFF_MIN, _BACKOFF_MAX = 0.02, 0.25
#: Errors after which the call is retried on another node (anything else, such as KVCommandError,
#: PermissionDenied or RequestTooLarge, raises at once: no node would answer otherwise).
_RETRY_ELSEWHERE = ("ForwardToLeader", "Timeout", "QuorumNotEnough", "ShutDown", "Fatal", "RaftError",
                    "CodecError")


def parse_addresses(addresses: str | Iterable[str] | Mapping[int, str]) -> list[tuple[int | None, str]]:
    """``"tcp://a:1,tcp://b:2"``, ``["1=tcp://a:1", ...]`` or ``{1: "tcp://a:1"}`` -> ``[(id or None, addr)]``."""
    if isinstance(addresses, Mapping):
        items: list[Any] = [f"{k}={v}" for k, v in addresses.items()]
    elif isinstance(addresses, str):
        items = [a for a in addresses.split(",")]
    else:
        items = list(addresses)
    out: list[tuple[int | None, str]] = []
    for a in items:
        if not isinstance(a, str):
            raise ValueError(f"an address is a string like 'tcp://127.0.0.1:7001', got {a!r}")
        a = a.strip()
        if not a:
            continue
        node_id = None
        head, sep, rest = a.partition("=")
        if sep and "://" not in head:
            try:
                node_id = int(head)
            except ValueError:
                raise ValueError(f"bad address {a!r}: expected N=tcp://HOST:PORT") from None
            a = rest.strip()
        if "://" not in a:
            raise ValueError(f"bad address {a!r}: expected tcp://HOST:PORT")
        out.append((node_id, a))
    if not out:
        raise ValueError("no cluster addresses given")
    return out


class _Session:
    """A write session (client id, last seq) and, for calls that use their own, connections.

    Used by one thread at a time: one write in flight at most (see the
    module docstring).  The connections are for calls that hold one for a
    while (watches); ordinary calls share the client's channel.
    """

    __slots__ = ("client_id", "seq", "conns")

    def __init__(self) -> None:
        self.client_id = os.urandom(16)
        self.seq = 0
        self.conns: dict[str, ZmqClient] = {}

    def close(self) -> None:
        for c in self.conns.values():
            c.close()
        self.conns.clear()


class KVClient:
    """A client of a pyraft KV cluster; see the module docstring.  Thread-safe."""

    def __init__(self, addresses: str | Iterable[str] | Mapping[int, str], timeout: float = 5.0, *,
                 cluster_name: str = "pyraft", curve: CurveConfig | None = None,
                 attempt_timeout: float | None = None) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.timeout = float(timeout)
        self.attempt_timeout = (float(attempt_timeout) if attempt_timeout
                                else min(self.timeout, max(0.2, min(1.0, self.timeout / 3))))
        self.cluster_name = cluster_name
        self.curve = curve
        targets = parse_addresses(addresses)
        self._addrs: list[str] = []
        # _lock guards everything below it, and _closed.
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}  # address -> node id (given, or learned from leader hints)
        for node_id, addr in targets:
            if addr not in self._addrs:
                self._addrs.append(addr)
            if node_id is not None:
                self._ids[addr] = node_id
        if curve is not None:
            missing = [a for a in self._addrs if a not in self._ids]
            if missing:
                raise ValueError(f"with CURVE every address needs its node id (N=tcp://...): {missing}")
            curve.keypair()  # a missing or bad key file fails here, not on the first call
        self._leader: str | None = None
        self._failed: dict[str, float] = {}  # address -> monotonic time of its last failed attempt
        self._free: list[_Session] = []
        self._closed = False
        self._chan = ZmqChannel(cluster_name, curve=curve,
                                server_key=self._server_key if curve is not None else None)

    # ------------------------------------------------------------------ the API

    def put(self, key: Any, value: Any) -> None:
        """Set ``key`` to ``value``."""
        check_key(key)
        self._write({"op": "put", "key": key, "value": value})

    def get(self, key: Any, stale: bool = False) -> Any:
        """The value of ``key`` (None when absent): linearizable, or with ``stale`` any node's local copy."""
        check_key(key)
        if stale:
            return self._call("kv.get_stale", {"key": key}, write=False)
        return self._call("kv.get", {"key": key}, write=False)

    def delete(self, key: Any) -> bool:
        """Remove ``key``; True if it existed."""
        check_key(key)
        return bool(self._write({"op": "delete", "key": key}))

    def cas(self, key: Any, expected: Any, new: Any) -> bool:
        """Set ``key`` to ``new`` if its value is ``expected`` (None: if absent); True if it did."""
        check_key(key)
        return bool(self._write({"op": "cas", "key": key, "expected": expected, "value": new}))

    def status(self, address: str | None = None, timeout: float | None = None) -> dict:
        """``kv.status`` of one node (default: the one this client would try first)."""
        if self._closed:
            raise RaftError("KVClient is closed")
        addr = address or self._first_choice()
        resp = self._chan.call(addr, ClientRequest("kv.status", None), timeout or self.timeout)
        if not isinstance(resp, ClientResponse):
            raise RaftError(f"{addr}: unexpected reply {type(resp).__name__}")
        if not resp.ok:
            raise_error_response(resp)
        return resp.body

    @property
    def leader_address(self) -> str | None:
        """Where the last successful write or read went (a hint)."""
        return self._leader

    def close(self) -> None:
        """Close every connection; later calls raise RaftError.  Idempotent."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        self._chan.close()
        for s in free:
            s.close()

    def __enter__(self) -> "KVClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVClient({self._addrs!r}, timeout={self.timeout})"

    # ------------------------------------------------------------------ sessions

    def _acquire(self) -> _Session:
        with self._lock:
            if self._closed:
                raise RaftError("KVClient is closed")
            return self._free.pop() if self._free else _Session()

    def _release(self, sess: _Session) -> None:
        with self._lock:
            if not self._closed:
                self._free.append(sess)
                return
        sess.close()

    def _server_key(self, addr: str) -> bytes:
        """The CURVE public key of the node at ``addr`` (TransportError when its node id is unknown)."""
        assert self.curve is not None
        with self._lock:
            node_id = self._ids.get(addr)
        if node_id is None:
            raise TransportError(f"CURVE: no node id known for {addr}, so no server key")
        return self.curve.server_key_for(node_id)

    def _conn(self, sess: _Session, addr: str) -> ZmqClient:
        """A connection of the session's own to ``addr`` (for calls that hold one a while, as watches)."""
        c = sess.conns.get(addr)
        if c is None:
            key = self._server_key(addr) if self.curve is not None else None
            c = ZmqClient(addr, self.cluster_name, curve=self.curve, server_key=key, timeout=self.attempt_timeout)
            sess.conns[addr] = c
        return c

    # ------------------------------------------------------------------ routing

    def _first_choice(self) -> str:
        with self._lock:
            if self._leader is not None:
                return self._leader
            now = time.monotonic()
            for a in self._addrs:
                if now - self._failed.get(a, -1e9) > _AVOID_FOR:
                    return a
            return self._addrs[0]

    def _next_after(self, addr: str) -> str:
        """The next address in the list after ``addr``, preferring ones that did not fail lately."""
        with self._lock:
            addrs = self._addrs
            i = addrs.index(addr) if addr in addrs else -1
            order = [addrs[(i + k) % len(addrs)] for k in range(1, len(addrs) + 1)]
            now = time.monotonic()
            for a in order:
                if now - self._failed.get(a, -1e9) > _AVOID_FOR:
                    return a
            # All failed lately: the one that failed longest ago.
            return min(order, key=lambda a: self._failed.get(a, -1e9))

    def _mark_failed(self, addr: str) -> None:
        with self._lock:
            self._failed[addr] = time.monotonic()
            if self._leader == addr:
                self._leader = None

    def _recently_failed(self, addr: str) -> bool:
        with self._lock:
            return time.monotonic() - self._failed.get(addr, -1e9) <= _AVOID_FOR

    def _learn(self, addr: str, node_id: int | None) -> None:
        with self._lock:
            if addr not in self._addrs:
                self._addrs.append(addr)
            if node_id is not None:
                self._ids.setdefault(addr, node_id)

    def _set_leader(self, addr: str) -> None:
        with self._lock:
            self._leader = addr
            self._failed.pop(addr, None)

    # ------------------------------------------------------------------ calls

    def _write(self, cmd: dict) -> Any:
        return self._call("kv.write", cmd, write=True)

    def _call(self, op: str, body: dict, *, write: bool) -> Any:
        deadline = time.monotonic() + self.timeout
        if not write:
            if self._closed:
                raise RaftError("KVClient is closed")
            return self._attempts(ClientRequest(op, body), deadline, False)
        sess = self._acquire()
        try:
            # One seq per logical write, the same on every retry: the state machine dedups.
            # The session is this call's alone until it returns (one write in flight per session).
            sess.seq += 1
            body = {**body, "client": sess.client_id, "seq": sess.seq}
            return self._attempts(ClientRequest(op, body), deadline, op == "kv.write")
        finally:
            self._release(sess)

    def _attempts(self, req: ClientRequest, deadline: float, is_write: bool) -> Any:
        addr = self._first_choice()
        last_error = "no attempt finished"
        backoff = _BACKOFF_MIN
        attempts = 0
        last_hint, hints = None, 0  # consecutive ForwardToLeader hints naming the same address
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                outcome = "the write may or may not have taken effect" if is_write else "nothing was changed"
                raise Timeout(f"{req.op} did not complete within {self.timeout} s after {attempts} attempt(s) "
                              f"({outcome}); last: {last_error}")
            attempts += 1
            try:
                resp = self._chan.call(addr, req, min(left, self.attempt_timeout))
            except Timeout:
                # Unreachable, or the reply was lost: retrying is safe (writes are deduplicated).
                last_error = f"no reply from {addr}"
                self._mark_failed(addr)
                addr = self._next_after(addr)
                continue
            if not isinstance(resp, ClientResponse):
                last_error = f"unexpected {type(resp).__name__} from {addr}"
                addr = self._next_after(addr)
                continue
            if resp.ok:
                self._set_leader(addr)
                return resp.body
            name, message, leader_id, leader_addr = resp.error
            if name == "KVCommandError":
                raise KVCommandError(message)
            if name not in _RETRY_ELSEWHERE:
                raise_error_response(resp)
            last_error = f"{addr}: {name}: {message}"
            if name == "ForwardToLeader" and leader_addr and leader_addr != addr:
                self._learn(leader_addr, leader_id)
                # A hint to a node that just failed us is followed only once the other
                # nodes keep insisting (they still hear from it: our reply was lost, or it
                # was slow); a dead leader stops being named within an election timeout.
                hints = hints + 1 if leader_addr == last_hint else 1
                last_hint = leader_addr
                if not self._recently_failed(leader_addr) or hints >= 2 * max(1, len(self._addrs) - 1):
                    addr = leader_addr  # follow the hint at once
                    backoff = _BACKOFF_MIN
                    hints = 0
                    continue
            # No usable hint (an election, a node starting or stopping): pause, then the next node.
            if name != "ForwardToLeader":
                self._mark_failed(addr)
            time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
            backoff = min(backoff * 2, _BACKOFF_MAX)
            addr = self._next_after(addr)
