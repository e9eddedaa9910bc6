"""KVClient: the blocking, thread-safe client of a replicated KV cluster (``pyraft-kv serve``).

::

    with KVClient(["tcp://10.0.0.5:7001", "tcp://10.0.0.6:7001", "tcp://10.0.0.7:7001"]) as kv:
        kv.put("x", 1)
        kv.get("x")              # 1, linearizable (ReadIndex on the leader)
        kv.cas("x", 1, 2)        # True
        kv.delete("x")           # True: it existed
        kv.range("svc/", prefix=True)          # [KeyValue(...)], with .revision, .count, .more
        for ev in kv.watch("svc/", prefix=True): ...   # WatchEvent(type, key, value, revision)
        with kv.lease(10) as lease:            # granted, kept alive by a thread, revoked at the end
            kv.put("svc/me", "10.0.0.5:80", lease=lease.id)
        kv.txn([{"key": "x", "target": "version", "op": "==", "value": 0}],
               [{"op": "put", "key": "x", "value": 1}])        # TxnResult(succeeded, responses, revision)

Each key-value call has a twin that returns a
:class:`concurrent.futures.Future` at once (``put_async``, ``get_async`` ...:
see :meth:`KVClient.put_async`), driven by a thread of the client's own.

The coordination primitives and their guarantees: docs/kv.md.  Watches
(:class:`Watch`) and keep-alive helpers (:class:`KeepAlive`, :class:`Lease`)
own their connections or their thread; the other calls share the machinery
below.

How a call proceeds:

- It goes to the last known leader (or the first address), over one
  ZeroMQ DEALER per node that every thread of the client shares
  (:class:`~pyraft.transports.zmq.ZmqChannel`): each call has its own
  request id and waits for the reply with that id, so calls from many
  threads are in flight on one connection at once (pipelined), and those
  queued together leave together.  A blocking call needs no thread of the client's own: one of
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

import collections
import functools
import heapq
import itertools
import logging
import os
import random
import struct
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from ..codec import ClientRequest, ClientResponse
from ..errors import CodecError, LeaseNotFound, RaftError, Timeout
from ..raft import _check_timeout, raise_error_response
from ..transports.zmq import CurveConfig, TransportError, ZmqChannel, ZmqClient, check_address
from .commands import MAX_LEASE_TTL, KVCommandError, check_command, check_key
from .encoding import range_bounds
from .reads import KeyValue, RangeResult, TxnResult, WatchEvent, check_limit
from .watch import MAX_WATCH_REVISION, MAX_WATCH_SUB

__all__ = ["KVClient", "Watch", "KeepAlive", "Lease", "parse_addresses"]

log = logging.getLogger(__name__)

#: How long an address that just failed (no reply in time) is avoided when choosing where to go.
_AVOID_FOR = 1.5
#: Pauses between attempts while no leader is known: doubles from the first to the last.
_BACKOFF_MIN, _BACKOFF_MAX = 0.02, 0.25
#: What a converter of a reply's body raises for a body of the wrong shape (then: CodecError).
_MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError, struct.error, RecursionError)
#: The largest lease id (ids are signed 64-bit, as etcd's).
_MAX_LEASE_ID = 2**63 - 1
#: Addresses a client learns from leader hints beyond those it was given, at most (the oldest
#: learned is forgotten first): a node that named a new address in every reply would otherwise
#: grow the client's lists, and the sockets it opens, without end.
_MAX_LEARNED = 16
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


class _Req(NamedTuple):
    """One key-value call, checked and ready to send: what :meth:`KVClient._run` and ``_submit`` take."""

    op: str
    body: dict
    write: bool  # it takes a write session (exactly-once)
    convert: Callable[[Any], Any]  # the reply's body -> the call's result

    def result(self, body: Any) -> Any:
        """The call's result from its reply's body; CodecError for a body of the wrong shape."""
        try:
            return self.convert(body)
        except _MALFORMED as e:
            # A node running other code, or one that lies: a typed error, not a crash in the caller.
            raise CodecError(f"{self.op}: a reply this client cannot read "
                             f"({type(e).__name__}: {e})") from None


def _none(_: Any) -> None:
    return None


def _same(body: Any) -> Any:
    return body


def _int_reply(body: Any) -> int:
    if type(body) is not int:
        raise TypeError(f"expected an integer, got {type(body).__name__}")
    return body


def _ttl_reply(body: Any) -> float:
    if type(body) not in (int, float) or not 0 < body <= MAX_LEASE_TTL:
        raise ValueError(f"expected a ttl in (0, {MAX_LEASE_TTL:g}] seconds, got {body!r:.40}")
    return body


def _lease_id_reply(body: Any) -> int:
    if type(body) is not int or not 0 <= body <= _MAX_LEASE_ID:
        raise ValueError(f"expected a lease id, got {body!r:.40}")
    return body


def _count_reply(body: Any) -> int:
    return _int_reply(body["count"])


def _revision_reply(body: Any) -> int:
    return _int_reply(body["revision"])


def _put(key: Any, value: Any, lease: int | None) -> _Req:
    check_key(key)
    cmd = {"op": "put", "key": key, "value": value}
    if lease is not None:
        cmd["lease"] = _lease_id(lease)
        check_command(cmd)  # a key attached to a lease is 8 bytes shorter
    return _Req("kv.write", cmd, True, _none)


def _get(key: Any, stale: bool) -> _Req:
    check_key(key)
    return _Req("kv.get_stale" if stale else "kv.get", {"key": key}, False, _same)


def _delete(key: Any) -> _Req:
    check_key(key)
    return _Req("kv.write", {"op": "delete", "key": key}, True, bool)


def _cas(key: Any, expected: Any, new: Any) -> _Req:
    check_key(key)
    return _Req("kv.write", {"op": "cas", "key": key, "expected": expected, "value": new}, True, bool)


def _range_body(key: Any, end: Any, prefix: bool, stale: bool) -> dict:
    range_bounds(key, end, _bool(prefix, "prefix"))  # a key the store cannot hold is refused here
    return {"key": key, "end": end, "prefix": prefix, "stale": _bool(stale, "stale")}


def _range_result(r: dict) -> RangeResult:
    return RangeResult([KeyValue.from_stored(k, rec) for k, rec in r["kvs"]], r["revision"], r["count"],
                       r["more"], r.get("count_exact", True))  # (an older node's count is exact)


def _range(key: Any, end: Any, prefix: bool, limit: int | None, keys_only: bool, stale: bool) -> _Req:
    body = _range_body(key, end, prefix, stale)
    body["limit"] = check_limit(limit)
    body["keys_only"] = _bool(keys_only, "keys_only")
    return _Req("kv.range", body, False, _range_result)


def _count(key: Any, end: Any, prefix: bool, stale: bool) -> _Req:
    body = _range_body(key, end, prefix, stale)
    body["count_only"] = True
    return _Req("kv.range", body, False, _count_reply)


def _txn(compare: Iterable[Mapping], success: Iterable[Mapping], failure: Iterable[Mapping]) -> _Req:
    compare, success, failure = list(compare), list(success), list(failure)
    cmd = {"op": "txn", "compare": compare, "success": success, "failure": failure}
    check_command(cmd)

    def convert(reply: Any) -> TxnResult:
        succeeded, responses, revision = reply
        out: list[Any] = []
        for op, r in zip(success if succeeded else failure, responses):
            kind = op.get("op")
            if kind == "get":
                out.append(None if r is None else KeyValue(_tuplify(op["key"]), *r))
            elif kind == "range":
                rows, more = r
                out.append(RangeResult([KeyValue(_tuplify(k), *rest) for k, *rest in rows], revision,
                                       len(rows), more))
            else:
                out.append(r)
        return TxnResult(bool(succeeded), tuple(out), revision)

    return _Req("kv.write", cmd, True, convert)


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
                 attempt_timeout: float | None = None, max_in_flight: int = 1024) -> None:
        if _check_timeout(timeout) is None or not timeout > 0:
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        if attempt_timeout is not None and not (_check_timeout(attempt_timeout, "attempt_timeout") or 0) > 0:
            raise ValueError(f"attempt_timeout must be a finite number of seconds > 0 (or None), "
                             f"got {attempt_timeout!r}")
        if type(max_in_flight) is not int or not 1 <= max_in_flight <= 50_000:
            raise ValueError(f"max_in_flight must be an integer in [1, 50000], got {max_in_flight!r}")
        self.timeout = float(timeout)
        self.max_in_flight = max_in_flight
        self.attempt_timeout = (float(attempt_timeout) if attempt_timeout is not None
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
        self._given = len(self._addrs)  # the first _given addresses were given; the rest were learned
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
        self._keepalives: set[KeepAlive] = set()  # running KeepAlive helpers: close() stops them
        self._async: _AsyncCalls | None = None  # the futures' thread, from the first *_async call

    # ------------------------------------------------------------------ the API

    def put(self, key: Any, value: Any, lease: int | None = None) -> None:
        """Set ``key`` to ``value``, attached to ``lease`` (it dies with it) or, without one, to none."""
        return self._run(_put(key, value, lease))

    def get(self, key: Any, stale: bool = False) -> Any:
        """The value of ``key`` (None when absent): linearizable, or with ``stale`` any node's local copy."""
        return self._run(_get(key, stale))

    def delete(self, key: Any) -> bool:
        """Remove ``key``; True if it existed."""
        return self._run(_delete(key))

    def cas(self, key: Any, expected: Any, new: Any) -> bool:
        """Set ``key`` to ``new`` if its value is ``expected`` (None: if absent); True if it did."""
        return self._run(_cas(key, expected, new))

    def range(self, key: Any, end: Any = None, *, prefix: bool = False, limit: int | None = None,
              keys_only: bool = False, stale: bool = False) -> RangeResult:
        """The keys of a range, sorted by key: a list of :class:`KeyValue` with ``revision``, ``count``, ``more``.

        ``key`` alone; ``[key, end)``; or, with ``prefix``, every key that
        starts with ``key`` (a str, bytes or tuple: see pyraft.kv.encoding for
        the key order).  At most ``limit`` keys (``more`` then says whether
        there were others; ``count`` counts them all); ``keys_only`` leaves
        the values out (None).  Linearizable, or with ``stale`` as one node
        has it now.  ``revision`` is the revision the range was read at.
        """
        return self._run(_range(key, end, prefix, limit, keys_only, stale))

    def count(self, key: Any, end: Any = None, *, prefix: bool = False, stale: bool = False) -> int:
        """How many keys ``range`` with these arguments holds (their values are not read).

        A node counts at most :data:`~pyraft.kv.reads.MAX_COUNT` keys (100,000):
        past it, this is that lower bound (``range(...).count_exact`` says so).
        """
        return self._run(_count(key, end, prefix, stale))

    def txn(self, compare: Iterable[Mapping], success: Iterable[Mapping],
            failure: Iterable[Mapping] = ()) -> TxnResult:
        """Apply ``success`` if every compare holds, else ``failure``, atomically in one entry.

        Compares: ``{"key", "target": "value"|"version"|"create_revision"|"mod_revision"|"lease",
        "op": "=="|"!="|"<"|">", "value"}``; ops: ``{"op": "put", "key", "value"[, "lease"]}``,
        ``{"op": "delete", "key"}``, ``{"op": "get", "key"}``, ``{"op": "range", "key"[, "end",
        "prefix", "limit", "keys_only"]}`` (semantics: :mod:`pyraft.kv.commands`).  Responses,
        one per op run: put None, delete a bool, get a :class:`KeyValue` or None, range a
        :class:`RangeResult` (all the ranges of one txn together at most 1000 keys).
        """
        return self._run(_txn(compare, success, failure))

    # ------------------------------------------------------------------ futures

    def put_async(self, key: Any, value: Any, lease: int | None = None) -> "Future[None]":
        """:meth:`put` without waiting: a :class:`concurrent.futures.Future` of its result.

        The key-value calls each have such a twin (``get_async``,
        ``delete_async``, ``cas_async``, ``range_async``, ``count_async``,
        ``txn_async``): the same checks, the same retries, exactly-once
        writes and the same ``timeout``, but the call returns at once and one
        thread of the client's own (started by the first such call) sends the
        requests and hands out the replies, so one thread of yours can keep
        many calls in flight.  A bad argument raises here; anything else is
        the future's exception.  At most ``max_in_flight`` such calls are in
        flight: past it, the next one waits here for one to finish (up to
        ``timeout``, then :class:`~pyraft.errors.Timeout`).  Calls started one
        after the other are not ordered by that: two writes of one key in
        flight at once may apply in either order (wait on the first future,
        or use ``txn``, where the order matters).  A future cannot be
        cancelled (its request may already be on its way); ``close()`` fails
        the ones still in flight with ``RaftError``.  Callbacks added with
        ``add_done_callback`` run on the client's thread: keep them short and
        never wait there on another call of this client (an ``*_async`` call
        made there never waits for a slot: it may go past ``max_in_flight``).
        A client dropped without ``close()`` stops its thread once collected.
        """
        return self._submit(_put(key, value, lease))

    def get_async(self, key: Any, stale: bool = False) -> "Future[Any]":
        """:meth:`get` without waiting (see :meth:`put_async`)."""
        return self._submit(_get(key, stale))

    def delete_async(self, key: Any) -> "Future[bool]":
        """:meth:`delete` without waiting (see :meth:`put_async`)."""
        return self._submit(_delete(key))

    def cas_async(self, key: Any, expected: Any, new: Any) -> "Future[bool]":
        """:meth:`cas` without waiting (see :meth:`put_async`)."""
        return self._submit(_cas(key, expected, new))

    def range_async(self, key: Any, end: Any = None, *, prefix: bool = False, limit: int | None = None,
                    keys_only: bool = False, stale: bool = False) -> "Future[RangeResult]":
        """:meth:`range` without waiting (see :meth:`put_async`)."""
        return self._submit(_range(key, end, prefix, limit, keys_only, stale))

    def count_async(self, key: Any, end: Any = None, *, prefix: bool = False,
                    stale: bool = False) -> "Future[int]":
        """:meth:`count` without waiting (see :meth:`put_async`)."""
        return self._submit(_count(key, end, prefix, stale))

    def txn_async(self, compare: Iterable[Mapping], success: Iterable[Mapping],
                  failure: Iterable[Mapping] = ()) -> "Future[TxnResult]":
        """:meth:`txn` without waiting (see :meth:`put_async`)."""
        return self._submit(_txn(compare, success, failure))

    # ------------------------------------------------------------------ leases

    def lease_grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds (at least three election timeouts); its id.

        Keep it alive with :meth:`lease_keepalive` more often than ``ttl``
        (:meth:`keep_alive` does it from a thread); past its ttl without one
        the leader revokes it, and its keys are deleted.
        """
        if type(ttl) not in (int, float) or not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        return self._run(_Req("kv.write", {"op": "lease_grant", "ttl": ttl}, True, _lease_id_reply))

    def lease_keepalive(self, lease_id: int) -> float:
        """Restart the lease's ttl now; returns the ttl.  LeaseNotFound once it expired or was revoked."""
        return self._run(_Req("kv.lease_keepalive", {"id": _lease_id(lease_id)}, False, _ttl_reply))

    def lease_revoke(self, lease_id: int) -> bool:
        """Revoke the lease and delete its keys; True if it existed."""
        return self._run(_Req("kv.write", {"op": "lease_revoke", "id": _lease_id(lease_id)}, True, bool))

    def keep_alive(self, lease_id: int, *, interval: float | None = None) -> "KeepAlive":
        """Keep ``lease_id`` alive from a background thread until ``stop()`` (see :class:`KeepAlive`)."""
        return KeepAlive(self, lease_id, interval=interval)

    def lease(self, ttl: float) -> "Lease":
        """A new lease kept alive from a background thread; ``with kv.lease(10) as lease:`` revokes it at the end."""
        return Lease(self, ttl)

    # ------------------------------------------------------------------ history

    def compact(self, revision: int) -> None:
        """Drop every member's watch history before ``revision`` (etcd's compaction).

        ``revision`` is at most the current one (a range's ``revision``);
        later, :class:`~pyraft.kv.commands.KVCommandError`.  Watches from an older
        revision then get :class:`~pyraft.errors.Compacted`; the keys are
        untouched.  It frees the history's share of the store's size quota
        at once, and works past the quota.
        """
        if type(revision) is not int or not 1 <= revision <= MAX_WATCH_REVISION:
            raise ValueError(f"revision must be an integer in [1, {MAX_WATCH_REVISION}], got {revision!r}")
        self._run(_Req("kv.write", {"op": "compact", "revision": revision}, True, _none))

    # ------------------------------------------------------------------ watches

    def watch(self, key: Any, *, prefix: bool = False, end: Any = None,
              start_revision: int | None = None) -> "Watch":
        """An iterator of the :class:`WatchEvent` of ``key`` (or the prefix, or ``[key, end)``).

        From ``start_revision`` on (None: the changes after this call), in
        revision order, blocking in ``next()`` until there is one; ``close()``
        ends it.  It moves to another member when one fails, resuming where
        it was, so no event is lost or repeated.  A ``start_revision`` no
        member keeps any more raises :class:`~pyraft.errors.Compacted` here
        (a first poll that does not wait); one compacted later, from ``next()``.
        """
        query = _range_body(key, end, prefix, False)  # checks the range before anything is sent
        del query["stale"]
        if start_revision is None:
            # "After this call" is after everything a linearizable read sees now (a lagging
            # member's own revision could be older than a write this caller saw finish).
            # (A one-key count: its revision is the point, not its count.)
            start_revision = self._run(_Req("kv.range", {"key": key, "count_only": True}, False,
                                            _revision_reply)) + 1
        elif type(start_revision) is not int or not 1 <= start_revision <= MAX_WATCH_REVISION:
            raise ValueError(f"start_revision must be an integer in [1, {MAX_WATCH_REVISION}] or None, "
                             f"got {start_revision!r}")
        else:
            w = Watch(self, query, start_revision)
            try:
                with w._lock:
                    w._poll(wait=0.0)
            except BaseException:
                w.close()
                raise
            return w
        return Watch(self, query, start_revision)

    def status(self, address: str | None = None, timeout: float | None = None) -> dict:
        """``kv.status`` of one node (default: the one this client would try first)."""
        if _check_timeout(timeout) == 0:
            raise ValueError("timeout must be a finite number of seconds > 0 (or None)")
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
        """Close every connection and stop the keep-alive helpers; later calls raise RaftError.  Idempotent."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            keepalives, self._keepalives = self._keepalives, set()
            calls = self._async  # (kept: a second close() waits for it too)
        for k in keepalives:
            k.stop()
        if calls is not None:
            calls.stop()
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
                if len(self._addrs) > self._given + _MAX_LEARNED:
                    old = self._addrs.pop(self._given)  # the oldest learned one
                    self._failed.pop(old, None)
                    self._ids.pop(old, None)
                    if self._leader == old:
                        self._leader = None
            if node_id is not None:
                self._ids.setdefault(addr, node_id)

    def _set_leader(self, addr: str) -> None:
        with self._lock:
            self._leader = addr
            self._failed.pop(addr, None)

    # ------------------------------------------------------------------ calls

    def _run(self, req: _Req) -> Any:
        return req.result(self._call(req.op, req.body, write=req.write))

    def _submit(self, req: _Req) -> "Future[Any]":
        with self._lock:
            if self._closed:
                raise RaftError("KVClient is closed")
            calls = self._async
            if calls is None or calls.failed:
                calls = self._async = _AsyncCalls(self)
        return calls.submit(self, req)

    def _call(self, op: str, body: dict, *, write: bool) -> Any:
        deadline = time.monotonic() + self.timeout
        if not write:
            if self._closed:
                raise RaftError("KVClient is closed")
            return self._attempts(_Attempts(self, ClientRequest(op, body), deadline))
        sess = self._acquire()
        try:
            return self._attempts(_Attempts(self, self._session_request(sess, op, body), deadline))
        finally:
            self._release(sess)

    @staticmethod
    def _session_request(sess: _Session, op: str, body: dict) -> ClientRequest:
        # One seq per logical write, the same on every retry: the state machine dedups.
        # The session is this call's alone until it returns (one write in flight per session).
        sess.seq += 1
        return ClientRequest(op, {**body, "client": sess.client_id, "seq": sess.seq})

    def _attempts(self, a: "_Attempts") -> Any:
        while True:
            wait = a.next_wait()  # Timeout past the deadline
            try:
                resp = self._chan.call(a.addr, a.req, wait)
            except Timeout:
                a.no_reply()
                continue
            done, value = a.on_reply(resp)
            if done:
                return value
            if value > 0:
                time.sleep(value)


class _Attempts:
    """The retry policy of one call (the module docstring): where its next attempt goes, and when.

    Shared by the blocking calls (:meth:`KVClient._attempts`, a loop on the
    caller's thread) and the futures (:class:`_AsyncCalls`, callbacks on the
    client's thread).
    """

    __slots__ = ("client", "req", "deadline", "is_write", "addr", "last_error", "backoff", "count",
                 "last_hint", "hints")

    def __init__(self, client: KVClient, req: ClientRequest, deadline: float) -> None:
        self.client = client
        self.req = req
        self.deadline = deadline
        self.is_write = req.op == "kv.write"
        self.addr = client._first_choice()
        self.last_error = "no attempt finished"
        self.backoff = _BACKOFF_MIN
        self.count = 0
        self.last_hint: str | None = None  # consecutive ForwardToLeader hints naming the same address
        self.hints = 0

    def next_wait(self) -> float:
        """How long the next attempt (to ``addr``) waits for its reply; Timeout when the call's time is up."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            outcome = "the write may or may not have taken effect" if self.is_write else "nothing was changed"
            raise Timeout(f"{self.req.op} did not complete within {self.client.timeout} s after {self.count} "
                          f"attempt(s) ({outcome}); last: {self.last_error}")
        self.count += 1
        return min(left, self.client.attempt_timeout)

    def no_reply(self) -> None:
        """The attempt got no reply in time: unreachable, or the reply was lost.  Retrying is safe
        (writes are deduplicated): the next attempt goes to the next node."""
        self.last_error = f"no reply from {self.addr}"
        self.client._mark_failed(self.addr)
        self.addr = self.client._next_after(self.addr)

    def on_reply(self, resp: Any) -> tuple[bool, Any]:
        """``(True, body)`` when the call is done; ``(False, pause)`` to try ``addr`` again after
        ``pause`` seconds; raises the error of a call that no retry can help."""
        client, addr = self.client, self.addr
        if not isinstance(resp, ClientResponse):
            self.last_error = f"unexpected {type(resp).__name__} from {addr}"
            self.addr = client._next_after(addr)
            return False, 0.0
        if resp.ok:
            client._set_leader(addr)
            return True, resp.body
        name, message, leader_id, leader_addr = resp.error
        if name == "KVCommandError":
            raise KVCommandError(message)
        if name not in _RETRY_ELSEWHERE:
            raise_error_response(resp)
        self.last_error = f"{addr}: {name}: {message}"
        if name == "ForwardToLeader" and leader_addr and leader_addr != addr and _usable(leader_addr):
            client._learn(leader_addr, leader_id)
            # A hint to a node that just failed us is followed only once the other
            # nodes keep insisting (they still hear from it: our reply was lost, or it
            # was slow); a dead leader stops being named within an election timeout.
            self.hints = self.hints + 1 if leader_addr == self.last_hint else 1
            self.last_hint = leader_addr
            if (not client._recently_failed(leader_addr)
                    or self.hints >= 2 * max(1, len(client._addrs) - 1)):
                self.addr = leader_addr  # follow the hint at once
                self.backoff = _BACKOFF_MIN
                self.hints = 0
                return False, 0.0
        # No usable hint (an election, a node starting or stopping): pause, then the next node.
        if name != "ForwardToLeader":
            client._mark_failed(addr)
        pause = max(0.0, min(self.backoff, self.deadline - time.monotonic()))
        self.backoff = min(self.backoff * 2, _BACKOFF_MAX)
        self.addr = client._next_after(addr)
        return False, pause


class _Pending:
    """A call of the futures' thread: its future, its retry policy, and its current attempt."""

    __slots__ = ("future", "attempts", "req", "sess", "slot", "rid", "gen")

    def __init__(self, future: "Future[Any]", attempts: _Attempts, req: _Req,
                 sess: _Session | None, slot: bool) -> None:
        self.future = future
        self.attempts = attempts
        self.req = req
        self.sess = sess
        self.slot = slot  # it holds one of the max_in_flight slots (not a call made from a callback)
        self.rid = 0  # the channel's id of the attempt in flight (0: none)
        self.gen = 0  # one more per attempt: a timer or reply of an earlier attempt is ignored


class _AsyncCalls:
    """The thread behind KVClient's futures: it owns a :class:`ZmqChannel` and drives every call.

    Callers queue a :class:`_Pending` and wake the thread; the thread sends
    each attempt with ``ZmqChannel.start``, gets its reply in a callback,
    asks the call's :class:`_Attempts` what next (done, follow a hint, pause
    and retry), and keeps a heap of timers: each attempt's reply timeout and
    each pause.  Only this thread touches the channel's sockets and the
    calls' state; the queue and the stop flag are under ``_lock``.

    It holds the client weakly (a call in flight holds it through its
    ``_Attempts``): a client dropped without ``close()`` is collected once
    its calls are done, and its finalizer stops this thread.
    """

    def __init__(self, client: KVClient) -> None:
        self.timeout = client.timeout
        self.max_in_flight = client.max_in_flight
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._stopping = False
        #: set once the thread has failed every call it had and closed its channel
        self.stopped = threading.Event()
        self._slots = threading.BoundedSemaphore(client.max_in_flight)
        server_key = None
        if client.curve is not None:
            ref = weakref.ref(client)

            def server_key(addr: str) -> bytes:
                c = ref()
                if c is None:
                    raise TransportError("KVClient is gone")
                return c._server_key(addr)

        self._chan = ZmqChannel(client.cluster_name, curve=client.curve, server_key=server_key)
        # The thread's own, below.
        self._pending: set[_Pending] = set()
        self._timers: list[tuple[float, int, _Pending, int]] = []  # (when, tie, call, its gen)
        self._tie = itertools.count()
        self._thread = threading.Thread(target=self._run, name="pyraft-kvclient-futures", daemon=True)
        weakref.finalize(client, self._stop_soon)
        self._thread.start()

    @property
    def failed(self) -> bool:
        """The thread ended by itself (a bug, logged): the client starts another."""
        return self.stopped.is_set()

    def submit(self, client: KVClient, req: _Req) -> "Future[Any]":
        deadline = time.monotonic() + self.timeout
        # A call made on this thread (in a future's callback) never waits for a slot: only this
        # thread frees them.  It goes beyond max_in_flight instead.
        slot = threading.current_thread() is not self._thread
        if slot and not self._slots.acquire(timeout=self.timeout):
            raise Timeout(f"{self.max_in_flight} calls stayed in flight for {self.timeout} s "
                          f"(max_in_flight): none was sent")
        sess = None
        try:
            if req.write:
                sess = client._acquire()
                creq = client._session_request(sess, req.op, req.body)
            else:
                creq = ClientRequest(req.op, req.body)
            fut: Future[Any] = Future()
            fut.set_running_or_notify_cancel()  # a request on its way cannot be called back
            p = _Pending(fut, _Attempts(client, creq, deadline), req, sess, slot)
            with self._lock:
                if self._stopping:
                    raise RaftError("KVClient is closed")
                self._queue.append(p)
        except BaseException:
            if sess is not None:
                client._release(sess)
            if slot:
                self._slots.release()
            raise
        self._chan.wake()
        return fut

    def _stop_soon(self) -> None:
        with self._lock:
            self._stopping = True
        self._chan.wake()

    def stop(self) -> None:
        """Fail the calls in flight with RaftError, stop the thread, close the channel; wait for it."""
        self._stop_soon()
        if threading.current_thread() is not self._thread:  # (close() from a future's callback)
            self.stopped.wait()

    # -- the thread

    def _run(self) -> None:
        error: BaseException = RaftError("KVClient is closed")
        try:
            while self._take_new():
                self._chan.pump(self._fire_timers())
        except BaseException as e:  # noqa: BLE001  (a bug here must not strand the callers)
            log.exception("KVClient futures thread failed")
            error = RaftError(f"KVClient's futures thread failed: {e!r}")
        finally:
            with self._lock:
                self._stopping = True
                self._pending.update(self._queue)
                self._queue = []
            for p in list(self._pending):
                self._finish(p, None, error)
            self._chan.close()
            self.stopped.set()

    def _take_new(self) -> bool:
        """Send the calls queued since the last round; False once stopping.

        (A method of its own: a local of ``_run`` would keep the last call, and
        through it the client, alive while the thread waits.)
        """
        with self._lock:
            new, self._queue = self._queue, []
            stopping = self._stopping
        self._pending.update(new)
        if stopping:
            return False
        for p in new:
            self._send(p)
        return True

    def _fire_timers(self) -> float:
        """Run the timers that are due; how long until the next one (at most 1 s)."""
        timers = self._timers
        while timers:
            when, _, p, gen = timers[0]
            now = time.monotonic()
            if when > now:
                return min(when - now, 1.0)
            heapq.heappop(timers)
            if p.gen != gen or p.future.done():
                continue  # an earlier attempt's timer
            if p.rid:  # its reply did not come in time
                self._chan.cancel(p.rid)
                p.rid = 0
                p.attempts.no_reply()
            self._send(p)  # (or, after a pause, the retry)
        return 1.0

    def _at(self, when: float, p: _Pending) -> None:
        heapq.heappush(self._timers, (when, next(self._tie), p, p.gen))

    def _send(self, p: _Pending) -> None:
        p.gen += 1
        try:
            wait = p.attempts.next_wait()
            p.rid = self._chan.start(p.attempts.addr, p.attempts.req, functools.partial(self._reply, p, p.gen))
        except BaseException as e:  # noqa: BLE001  (Timeout: the call's time is up)
            self._finish(p, None, e)
            return
        self._at(time.monotonic() + wait, p)

    def _reply(self, p: _Pending, gen: int, resp: Any, error: BaseException | None) -> None:
        if p.gen != gen or p.future.done():
            return
        p.rid = 0
        p.gen += 1  # this attempt's reply timer is void
        if error is not None:  # the request could not be sent (a CURVE key missing): no retry helps
            self._finish(p, None, error)
            return
        try:
            done, value = p.attempts.on_reply(resp)
            if done:
                self._finish(p, p.req.result(value), None)
            elif value > 0:
                self._at(time.monotonic() + value, p)
            else:
                self._send(p)
        except BaseException as e:  # noqa: BLE001  (the call's error, or a reply that does not convert)
            self._finish(p, None, e)

    def _finish(self, p: _Pending, result: Any, error: BaseException | None) -> None:
        if p.future.done():
            return
        self._pending.discard(p)
        if p.rid:
            self._chan.cancel(p.rid)
            p.rid = 0
        if p.sess is not None:
            p.attempts.client._release(p.sess)
            p.sess = None
        if p.slot:
            self._slots.release()
        try:
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(result)
        except BaseException:  # noqa: BLE001  (a done-callback that raised past Exception: its own bug)
            log.exception("a KVClient future's done-callback raised")


# ---------------------------------------------------------------------------
# Watches and lease helpers (built on the calls above; each owns its thread or connections)

#: How long a watch poll waits on the server for an event: also how soon ``Watch.close()``
#: takes effect while another thread is blocked in ``next()``.
_WATCH_WAIT = 1.0
#: Events asked for per poll.
_WATCH_LIMIT = 1000


def _usable(addr: str) -> bool:
    """A leader hint the client may follow: an address a DEALER can connect to (check_address)."""
    try:
        check_address(addr)
    except (TypeError, ValueError):
        return False
    return True


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise TypeError(f"{what} must be True or False, got {type(v).__name__}")
    return v


def _lease_id(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise ValueError(f"a lease id is an integer >= 0, got {v!r}")
    return v


def _tuplify(key: Any) -> Any:
    """A key as msgpack brought it back (arrays as lists) in its stored form's shape (tuples)."""
    if type(key) in (list, tuple):
        return tuple(_tuplify(k) for k in key)
    return key


class Watch:
    """The iterator :meth:`KVClient.watch` returns; ``close()`` (or ``with``) ends it.

    ``revision`` is where it stands: the revision of the next event it
    delivers (resume a new watch there to continue after this one).  Iterate
    from one thread; ``close()`` may come from any (a ``next()`` blocked in
    another thread returns within about a second, with StopIteration).
    ``next()`` raises :class:`~pyraft.errors.Timeout` when no member answered
    for the client's ``timeout`` (calling it again goes on where it was),
    :class:`~pyraft.errors.Compacted` when every member has compacted the
    events it needs.
    """

    def __init__(self, client: KVClient, query: dict, start_revision: int) -> None:
        self._client = client
        self._query = query
        # Guarded by _lock: the connections and the position, used by the iterating thread.
        self._lock = threading.Lock()
        self._revision = start_revision
        self._sub = 0
        self._events: collections.deque[WatchEvent] = collections.deque()
        self._sess = _Session()
        # Any member serves a watch: spread them, so that they do not all load the leader.
        self._addr = client._next_after(random.choice(client._addrs))
        self._closed = threading.Event()

    @property
    def revision(self) -> int:
        return self._revision

    def __iter__(self) -> "Watch":
        return self

    def __next__(self) -> WatchEvent:
        ev = self.get()
        if ev is None:  # closed
            self._release()
            raise StopIteration
        return ev

    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event; None when none came within ``timeout`` s (up to a second later), or once closed."""
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._events:
                return self._events.popleft()
            if self._closed.is_set():
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return None
            with self._lock:
                if not self._closed.is_set():
                    self._poll()

    def close(self) -> None:
        """End the watch: ``next()`` raises StopIteration from now on.  Idempotent; any thread."""
        self._closed.set()
        self._events.clear()
        if self._lock.acquire(blocking=False):
            try:
                self._sess.close()
            finally:
                self._lock.release()

    def _release(self) -> None:
        with self._lock:
            self._sess.close()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _poll(self, wait: float = _WATCH_WAIT) -> None:
        """One successful poll (its events queued), moving between members as they fail (lock held).

        ``wait``: how long a member holds the poll open when it has no event yet.
        """
        c = self._client
        give_up = time.monotonic() + c.timeout
        compacted: set[str] = set()
        backoff = _BACKOFF_MIN
        last_error = "no attempt finished"
        while not self._closed.is_set():
            if time.monotonic() > give_up:
                raise Timeout(f"watch: no member answered within {c.timeout} s; last: {last_error}")
            body = {**self._query, "start_revision": self._revision, "sub": self._sub, "wait": wait,
                    "limit": _WATCH_LIMIT}
            addr = self._addr
            try:
                resp = c._conn(self._sess, addr).call(ClientRequest("kv.watch", body), wait + c.attempt_timeout)
            except Timeout:
                last_error = f"no reply from {addr}"
                c._mark_failed(addr)
                self._addr = c._next_after(addr)
                continue
            if isinstance(resp, ClientResponse) and resp.ok:
                try:
                    r = resp.body
                    nxt, sub = r["next"]
                    # Where the next poll starts: never back (events again) nor past what a node may name.
                    if (type(nxt) is not int or type(sub) is not int or not 0 <= sub <= MAX_WATCH_SUB
                            or not (self._revision, self._sub) <= (nxt, sub) or nxt > MAX_WATCH_REVISION):
                        raise ValueError(f"next {r['next']!r:.60} is not a position after "
                                         f"{(self._revision, self._sub)}")
                    events = [WatchEvent.from_stored(rev, ev) for rev, ev in r["events"]]
                except _MALFORMED as e:
                    raise CodecError(f"watch: a reply from {addr} this client cannot read "
                                     f"({type(e).__name__}: {e})") from None
                self._revision, self._sub = nxt, sub
                self._events.extend(events)
                return
            if not isinstance(resp, ClientResponse):
                last_error = f"unexpected {type(resp).__name__} from {addr}"
            else:
                name, message = resp.error[0], resp.error[1]
                last_error = f"{addr}: {name}: {message}"
                if name == "Compacted":
                    # Another member may keep more of the history (one that installed a snapshot
                    # keeps less): raise once every member has said so.
                    compacted.add(addr)
                    if len(compacted) >= len(c._addrs):
                        raise_error_response(resp)
                elif name == "KVCommandError":
                    raise KVCommandError(message)
                elif name not in _RETRY_ELSEWHERE + ("Overloaded",):
                    raise_error_response(resp)
                else:
                    c._mark_failed(addr)
            time.sleep(max(0.0, min(backoff, give_up - time.monotonic())))
            backoff = min(backoff * 2, _BACKOFF_MAX)
            self._addr = c._next_after(addr)


#: The shortest interval a KeepAlive may renew its lease at: shorter would only load the leader.
MIN_KEEPALIVE_INTERVAL = 0.05


class KeepAlive:
    """Keeps a lease alive from a background thread ``pyraft-keepalive-<lease id>`` until :meth:`stop`.

    It sends a keepalive every ``interval`` seconds (default: a third of the
    lease's ttl), retrying failed ones.  ``lost`` is set (and the thread
    ends) once the lease is gone (LeaseNotFound) or could not be renewed
    before the ttl of the last successful keepalive ran out: after that, the
    lease must be taken for expired.  ``expires`` is the ``time.monotonic()``
    until which the lease is certainly alive (send time of the last
    successful keepalive + ttl).
    """

    def __init__(self, client: KVClient, lease_id: int, *, interval: float | None = None) -> None:
        self.client = client
        self.lease_id = _lease_id(lease_id)
        sent = time.monotonic()
        self.ttl = client.lease_keepalive(lease_id)  # LeaseNotFound at once for a lease that is gone
        if interval is not None and not ((_check_timeout(interval, "interval") or 0) >= MIN_KEEPALIVE_INTERVAL
                                         and interval < self.ttl):
            raise ValueError(f"interval must be between {MIN_KEEPALIVE_INTERVAL} s and the lease's ttl "
                             f"({self.ttl} s), got {interval!r}")
        self.interval = interval or self.ttl / 3
        self.expires = sent + self.ttl
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pyraft-keepalive-{lease_id}", daemon=True)
        with client._lock:
            if client._closed:
                raise RaftError("KVClient is closed")
            client._keepalives.add(self)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """True while the lease is certainly alive (a keepalive succeeded less than a ttl ago)."""
        return not self.lost.is_set() and time.monotonic() < self.expires

    def _run(self) -> None:
        try:
            wait = self.interval
            while not self._stop.wait(wait):
                sent = time.monotonic()
                if sent >= self.expires:
                    break
                try:
                    ttl = self.client.lease_keepalive(self.lease_id)
                except LeaseNotFound:
                    break
                except RaftError:  # Timeout, no leader right now: try again soon, while it may still be alive
                    wait = min(self.interval, max(0.05, (self.expires - time.monotonic()) / 4))
                    continue
                self.expires = sent + ttl
                wait = self.interval
        except BaseException:  # noqa: BLE001  (a bug: the lease is then taken for lost, never thought alive)
            log.exception("keepalive of lease %s failed", self.lease_id)
        finally:
            # However the thread ends, unless stop() ended it, the lease is lost: a caller waiting
            # on `lost` (the CLI's keepalive loop) must not wait for a thread that is gone.
            if not self._stop.is_set():
                self.lost.set()
            with self.client._lock:
                self.client._keepalives.discard(self)

    def stop(self, revoke: bool = False) -> None:
        """Stop keeping the lease alive (and with ``revoke``, revoke it now).  Idempotent."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        with self.client._lock:
            self.client._keepalives.discard(self)
        if revoke:
            self.client.lease_revoke(self.lease_id)


class Lease:
    """A lease granted now and kept alive from a thread; ``with`` revokes it at the end.

    ``id`` goes to ``put(..., lease=lease.id)``; ``alive`` and ``lost`` are the
    :class:`KeepAlive`'s.
    """

    def __init__(self, client: KVClient, ttl: float) -> None:
        self.client = client
        self.id = client.lease_grant(ttl)
        try:
            self.keepalive = KeepAlive(client, self.id)
        except BaseException:
            client.lease_revoke(self.id)
            raise
        self.ttl = self.keepalive.ttl

    @property
    def alive(self) -> bool:
        return self.keepalive.alive

    @property
    def lost(self) -> threading.Event:
        return self.keepalive.lost

    def revoke(self) -> None:
        """Stop the keepalives and revoke the lease (its keys are deleted).  A lease already gone is fine."""
        self.keepalive.stop()
        try:
            self.client.lease_revoke(self.id)
        except LeaseNotFound:
            pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.revoke()
