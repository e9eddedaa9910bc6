"""Coordination recipes on :class:`~pyraft.kv.KVClient`: a lock with fencing tokens, leader election, service registration.

All three rest on the same parts: a lease kept alive from a thread (its
keys vanish when the holder dies and the lease expires), a txn that creates
a key only if it does not exist (``create_revision == 0``), and a watch that
waits for a key to be deleted.  See docs/kv.md for their guarantees.

::

    with Lock(kv, "locks/reindex") as token:      # blocks until held
        kv.txn(lock.guard(), [{"op": "put", "key": "index", "value": v}])  # fenced write

    election = Election(kv, "leader/db", ttl=10)
    election.campaign("node-a")                   # blocks until this one leads
    ...                                           # lead while election.is_leader
    election.resign()

    reg = register_service(kv, "api", "node-a", {"addr": "10.0.0.5:80"}, ttl=10)
    instances, revision = discover(kv, "api")     # {"node-a": {"addr": ...}}
    reg.stop()
"""
from __future__ import annotations

import time
from typing import Any

from ..errors import LeaseNotFound, RaftError, Timeout
from ..raft import _check_timeout
from .client import KVClient, Lease, Watch
from .reads import KeyValue

__all__ = ["Lock", "Election", "ServiceRegistration", "register_service", "discover", "watch_services"]


def _created(key: str) -> dict:
    """A compare that holds while ``key`` does not exist."""
    return {"key": key, "target": "create_revision", "op": "==", "value": 0}


def _header(key: str) -> dict:
    """A txn op reading ``key``'s revisions, version and lease, not its value.

    A txn's result is what a retry of it gets back (its session keeps it), and a
    session keeps at most MAX_REMEMBERED_RESULT: a value of a kilobyte would turn a
    retried campaign into ResultNotKept.
    """
    return {"op": "range", "key": key, "keys_only": True}


def _first(rows: Any) -> KeyValue | None:
    return rows[0] if rows else None


def _wait_deleted(kv: KVClient, key: str, after: int, deadline: float | None, lease: Lease | None) -> None:
    """Block until ``key`` is deleted at a revision > ``after``.

    Timeout at ``deadline``; LeaseNotFound once ``lease`` is lost (the
    caller's own key is gone then: waiting on makes no sense).
    """
    with kv.watch(key, start_revision=after + 1) as w:
        while True:
            if lease is not None and lease.lost.is_set():
                raise LeaseNotFound(f"lease {lease.id} was lost while waiting for {key!r}")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"{key!r} was not deleted in time")
            ev = w.get(1.0 if left is None else min(left, 1.0))
            if ev is not None and ev.type == "delete":
                return


class Lock:
    """A distributed lock (etcd's ``concurrency.Mutex``) whose holder gets a fencing token.

    Each contender puts ``<name>/<lease id>`` under its own lease; the holder
    is the contender whose key has the smallest ``create_revision``, and that
    revision is its **fencing token**: it grows with every new holder.  A
    waiter watches only the contender just before it (no thundering herd).
    A holder that dies stops keeping its lease alive; the lease expires, its
    key is deleted, and the next waiter holds the lock.  A holder that is
    only paused (GC, SIGSTOP) may still believe it holds the lock after its
    lease expired: guard every write it makes with :meth:`guard` (a compare
    that fails once its key is gone), or hand the token to the resource it
    writes, which refuses tokens older than one it has seen.
    """

    def __init__(self, kv: KVClient, name: str, *, ttl: float = 10.0) -> None:
        if type(name) is not str or not name:
            raise ValueError("a lock's name is a non-empty str")
        self.kv = kv
        self.prefix = name + "/"
        self.ttl = ttl
        self.lease: Lease | None = None
        self.key: str | None = None
        self.token: int | None = None

    def acquire(self, timeout: float | None = None) -> int:
        """Block until held (Timeout after ``timeout`` s: nothing held then); returns the fencing token."""
        _check_timeout(timeout)
        if self.token is not None:
            raise RuntimeError(f"lock {self.prefix[:-1]!r} is held already by this object")
        deadline = None if timeout is None else time.monotonic() + timeout
        self.lease = self.kv.lease(self.ttl)
        self.key = f"{self.prefix}{self.lease.id:016x}"
        try:
            r = self.kv.txn([_created(self.key)],
                            [{"op": "put", "key": self.key, "value": b"", "lease": self.lease.id},
                             _header(self.key)], [_header(self.key)])
            mine = r.responses[-1][0].create_revision
            while True:
                waiters = self.kv.range(self.prefix, prefix=True, keys_only=True)
                if not any(kv.create_revision == mine for kv in waiters):
                    raise LeaseNotFound(f"lock {self.prefix[:-1]!r}: our key is gone (lease {self.lease.id} "
                                        f"expired while waiting)")
                before = [kv for kv in waiters if kv.create_revision < mine]
                if not before:
                    self.token = mine
                    return mine
                # Wait for the contender just before us only; then look again (it may have
                # been a waiter that gave up, not the holder).
                prev = max(before, key=lambda kv: kv.create_revision)
                _wait_deleted(self.kv, prev.key, waiters.revision, deadline, self.lease)
        except BaseException:
            self._leave()
            raise

    def guard(self) -> list[dict]:
        """Compares that hold only while this object holds the lock (for ``KVClient.txn``)."""
        if self.token is None:
            raise RuntimeError(f"lock {self.prefix[:-1]!r} is not held")
        return [{"key": self.key, "target": "create_revision", "op": "==", "value": self.token}]

    @property
    def held(self) -> bool:
        """True while held and the lease is certainly alive (see KeepAlive.alive)."""
        return self.token is not None and self.lease is not None and self.lease.alive

    def release(self) -> None:
        """Give the lock up (delete the key, revoke the lease).  Idempotent."""
        self._leave()

    def _leave(self) -> None:
        lease, self.lease, self.token = self.lease, None, None
        if lease is not None:
            try:
                lease.revoke()  # deletes the key with it
            except RaftError:
                pass  # unreachable now: the lease expires by itself, and the key with it

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Election:
    """Leader election on one key with a lease, the pattern of Patroni's DCS.

    The leader holds ``name`` (created only if absent, attached to its
    lease, holding its ``value``) and keeps the lease alive; the others
    watch the key and try again when it is deleted (the leader resigned or
    its lease expired).  The leader key's ``create_revision`` (returned by
    :meth:`campaign`) numbers the leaderships: use it as a fencing token.
    """

    def __init__(self, kv: KVClient, name: str, *, ttl: float = 10.0) -> None:
        self.kv = kv
        self.key = name
        self.ttl = ttl
        self.lease: Lease | None = None
        self.revision: int | None = None  # create_revision of our leader key while we lead

    def campaign(self, value: Any, timeout: float | None = None) -> int:
        """Block until this one leads (Timeout after ``timeout`` s); returns the leadership's revision."""
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.lease is None or not self.lease.alive:
            self.lease = self.kv.lease(self.ttl)
        while True:
            r = self.kv.txn([_created(self.key)],
                            [{"op": "put", "key": self.key, "value": value, "lease": self.lease.id},
                             _header(self.key)], [_header(self.key)])
            cur = _first(r.responses[-1])
            if cur is not None and (r.succeeded or cur.lease == self.lease.id):  # (succeeded: our put is there)
                self.revision = cur.create_revision
                return self.revision
            if cur is not None:
                _wait_deleted(self.kv, self.key, r.revision, deadline, self.lease)

    @property
    def is_leader(self) -> bool:
        """True while this one leads and its lease is certainly alive."""
        return self.revision is not None and self.lease is not None and self.lease.alive

    def proclaim(self, value: Any) -> bool:
        """Change the leader key's value, only while still the leader; True if it did."""
        if self.revision is None or self.lease is None:
            return False
        return self.kv.txn([{"key": self.key, "target": "create_revision", "op": "==", "value": self.revision}],
                           [{"op": "put", "key": self.key, "value": value, "lease": self.lease.id}]).succeeded

    def leader(self) -> KeyValue | None:
        """The current leader key (its value is the leader's), None when there is none."""
        r = self.kv.range(self.key)
        return r[0] if r else None

    def observe(self, start_revision: int | None = None) -> Watch:
        """A watch of the leader key: a put is a new leader (or value), a delete an election to come."""
        return self.kv.watch(self.key, start_revision=start_revision)

    def resign(self) -> None:
        """Stop leading: delete the key if it is still ours, and revoke the lease."""
        lease, rev, self.lease, self.revision = self.lease, self.revision, None, None
        if rev is not None:
            self.kv.txn([{"key": self.key, "target": "create_revision", "op": "==", "value": rev}],
                        [{"op": "delete", "key": self.key}])
        if lease is not None:
            lease.revoke()


class ServiceRegistration:
    """One instance's entry under ``services/<service>/<instance>``, alive while its lease is.

    ``stop()`` removes it at once; if the process dies, it disappears within
    ``ttl`` seconds.  ``lost`` is set when the lease could not be kept alive.
    """

    def __init__(self, kv: KVClient, service: str, instance: str, value: Any, ttl: float) -> None:
        self.kv = kv
        self.key = _service_prefix(service) + instance
        self.lease = kv.lease(ttl)
        try:
            kv.put(self.key, value, lease=self.lease.id)
        except BaseException:
            self.lease.revoke()
            raise

    @property
    def lost(self) -> Any:
        return self.lease.lost

    def update(self, value: Any) -> None:
        self.kv.put(self.key, value, lease=self.lease.id)

    def stop(self) -> None:
        self.lease.revoke()

    def __enter__(self) -> "ServiceRegistration":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _service_prefix(service: str) -> str:
    if type(service) is not str or not service or "/" in service:
        raise ValueError(f"a service name is a non-empty str without '/', got {service!r}")
    return f"services/{service}/"


def register_service(kv: KVClient, service: str, instance: str, value: Any, *,
                     ttl: float = 10.0) -> ServiceRegistration:
    """Register ``instance`` of ``service`` with ``value`` (an address, a map), alive while this process keeps it."""
    return ServiceRegistration(kv, service, instance, value, ttl)


def discover(kv: KVClient, service: str) -> tuple[dict[str, Any], int]:
    """``({instance: value}, revision)``: the live instances, and the revision to watch from (+1)."""
    prefix = _service_prefix(service)
    r = kv.range(prefix, prefix=True)
    return {kv_.key[len(prefix):]: kv_.value for kv_ in r}, r.revision


def watch_services(kv: KVClient, service: str, start_revision: int) -> Watch:
    """The changes to ``service``'s instances from ``start_revision`` on (``discover``'s revision + 1)."""
    return kv.watch(_service_prefix(service), prefix=True, start_revision=start_revision)
