"""Ready-made replicated structures: counter, dict, list, set, queue, lock manager.

Replicated methods (decorated) go through the log; the others are local
reads of this node's copy (call ``obj.sync()`` first for a linearizable
read).  Local reads that copy take the state machine's lock, so they never
see a half-applied batch.  Keys, values and items are msgpack values,
tuples and sets.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Hashable, Iterable, Iterator

from . import _values
from .base import ReplicatedObject, replicated

__all__ = ["ReplCounter", "ReplDict", "ReplList", "ReplSet", "ReplQueue", "ReplLockManager"]

#: The integers msgpack carries: a counter's value stays inside them (its state must replicate).
_INT_MIN, _INT_MAX = -2**63, 2**64 - 1


def _number(v: Any) -> int | float:
    """``v`` if it is a value a counter can hold and replicate, else TypeError or OverflowError (nothing changed)."""
    if type(v) is bool or not isinstance(v, (int, float)):
        raise TypeError(f"a counter holds an int or a float, not {type(v).__name__}")
    if isinstance(v, int) and not _INT_MIN <= v <= _INT_MAX:
        raise OverflowError(f"a counter's int stays within [-2**63, 2**64 - 1]; {v} is outside")
    return v


def _ordered(items: Any, what: str) -> Any:
    """``items`` unless they are a set: its order differs from node to node (str hashing is per process)."""
    if isinstance(items, (set, frozenset)):
        raise TypeError(f"{what} takes an ordered collection (a list, a dict), not a {type(items).__name__}: "
                        f"each node would iterate it in another order")
    return items


def _check_settable(items: Iterable) -> None:
    """ValueError unless a set holding ``items`` still replicates (tuples and sets nest at most MAX_EXT_DEPTH)."""
    try:
        _values.dumps({0: set(items)})
    except TypeError as e:
        raise ValueError(f"cannot keep that in a replicated set: {e}") from None


class ReplCounter(ReplicatedObject):
    """A replicated number.  ``set``/``add``/``sub``/``inc``/``dec`` return the new value."""

    __replicated_state__ = ("_value",)

    def __init__(self, initial: int | float = 0, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self._value = initial

    @replicated
    def set(self, value: int | float) -> int | float:
        self._value = _number(value)
        return self._value

    @replicated
    def add(self, n: int | float) -> int | float:
        self._value = _number(self._value + _number(n))
        return self._value

    @replicated
    def sub(self, n: int | float) -> int | float:
        self._value = _number(self._value - _number(n))
        return self._value

    @replicated
    def inc(self) -> int | float:
        self._value = _number(self._value + 1)
        return self._value

    @replicated
    def dec(self) -> int | float:
        self._value = _number(self._value - 1)
        return self._value

    def get(self) -> int | float:
        """The value on this node (local read)."""
        return self._value


class ReplDict(ReplicatedObject):
    """A replicated dict."""

    __replicated_state__ = ("_data",)

    def __init__(self, initial: dict | None = None, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self._data: dict = dict(initial or {})

    @replicated
    def set(self, key: Hashable, value: Any) -> None:
        self._data[key] = value

    @replicated
    def update(self, other: dict) -> None:
        self._data.update(_ordered(other, "ReplDict.update"))

    @replicated
    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key``; its value, or ``default`` when absent."""
        return self._data.pop(key, default)

    @replicated
    def delete(self, key: Hashable) -> bool:
        """Remove ``key``; True when it was there."""
        return self._data.pop(key, _MISSING) is not _MISSING

    @replicated
    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        return self._data.setdefault(key, default)

    @replicated
    def clear(self) -> None:
        self._data.clear()

    # local reads
    def get(self, key: Hashable, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __getitem__(self, key: Hashable) -> Any:
        return self._data[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list:
        with self.locked():
            return list(self._data)

    def values(self) -> list:
        with self.locked():
            return list(self._data.values())

    def items(self) -> list[tuple[Any, Any]]:
        with self.locked():
            return list(self._data.items())

    def to_dict(self) -> dict:
        """A copy of the whole dict."""
        with self.locked():
            return dict(self._data)


class ReplList(ReplicatedObject):
    """A replicated list."""

    __replicated_state__ = ("_data",)

    def __init__(self, initial: Iterable | None = None, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self._data: list = list(initial or [])

    @replicated
    def append(self, item: Any) -> int:
        """Append; returns the new length."""
        self._data.append(item)
        return len(self._data)

    @replicated
    def extend(self, items: list) -> int:
        self._data.extend(_ordered(items, "ReplList.extend"))
        return len(self._data)

    @replicated
    def insert(self, index: int, item: Any) -> None:
        self._data.insert(index, item)

    @replicated
    def set(self, index: int, item: Any) -> None:
        self._data[index] = item

    @replicated
    def remove(self, item: Any) -> None:
        """Remove the first ``item``; ValueError when absent."""
        self._data.remove(item)

    @replicated
    def pop(self, index: int = -1) -> Any:
        """Remove and return the item at ``index``; IndexError when out of range."""
        return self._data.pop(index)

    @replicated
    def clear(self) -> None:
        self._data.clear()

    @replicated
    def sort(self, reverse: bool = False) -> None:
        self._data.sort(reverse=reverse)

    # local reads
    def get(self, index: int, default: Any = None) -> Any:
        try:
            return self._data[index]
        except IndexError:
            return default

    def __getitem__(self, index: int) -> Any:
        return self._data[index]

    def __len__(self) -> int:
        return len(self._data)

    def len(self) -> int:
        return len(self._data)

    def __contains__(self, item: Any) -> bool:
        with self.locked():
            return item in self._data

    def __iter__(self) -> Iterator:
        return iter(self.to_list())

    def index(self, item: Any) -> int:
        with self.locked():
            return self._data.index(item)

    def count(self, item: Any) -> int:
        with self.locked():
            return self._data.count(item)

    def to_list(self) -> list:
        with self.locked():
            return list(self._data)


class ReplSet(ReplicatedObject):
    """A replicated set.  ``add``/``discard`` return whether the set changed.

    No ``pop``: which element it takes depends on hashing, which differs
    between processes, so it would not be deterministic.
    """

    __replicated_state__ = ("_data",)

    def __init__(self, initial: Iterable | None = None, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self._data: set = set(initial or ())

    @replicated
    def add(self, item: Hashable) -> bool:
        if item in self._data:
            return False
        _check_settable([item])
        self._data.add(item)
        return True

    @replicated
    def remove(self, item: Hashable) -> None:
        """Remove ``item``; KeyError when absent."""
        self._data.remove(item)

    @replicated
    def discard(self, item: Hashable) -> bool:
        if item not in self._data:
            return False
        self._data.discard(item)
        return True

    @replicated
    def update(self, items: list | set) -> None:
        items = list(items)
        _check_settable(items)
        self._data.update(items)

    @replicated
    def clear(self) -> None:
        self._data.clear()

    # local reads
    def contains(self, item: Hashable) -> bool:
        return item in self._data

    def __contains__(self, item: Hashable) -> bool:
        return item in self._data

    def __len__(self) -> int:
        return len(self._data)

    def to_set(self) -> set:
        with self.locked():
            return set(self._data)


class ReplQueue(ReplicatedObject):
    """A replicated FIFO queue.  ``get`` returns None (or ``default``) when empty.

    ``maxsize`` (0: unbounded) is configuration: give every node the same.
    """

    def __init__(self, maxsize: int = 0, *, name: str | None = None) -> None:
        super().__init__(name=name)
        if type(maxsize) is not int or maxsize < 0:
            raise ValueError("maxsize must be a non-negative int")
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()

    def get_state(self) -> Any:
        return {"items": list(self._items)}

    def set_state(self, state: Any) -> None:
        self._items = collections.deque(state["items"])

    @replicated
    def put(self, item: Any) -> bool:
        """Append ``item``; False (and nothing added) when the queue is full."""
        if self.maxsize and len(self._items) >= self.maxsize:
            return False
        self._items.append(item)
        return True

    @replicated
    def get(self, default: Any = None) -> Any:
        """Remove and return the oldest item; ``default`` when empty."""
        return self._items.popleft() if self._items else default

    # local reads
    def size(self) -> int:
        return len(self._items)

    qsize = size

    def __len__(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return bool(self.maxsize) and len(self._items) >= self.maxsize

    def peek(self, default: Any = None) -> Any:
        with self.locked():
            return self._items[0] if self._items else default

    def to_list(self) -> list:
        with self.locked():
            return list(self._items)


class ReplLockManager(ReplicatedObject):
    """Named locks with automatic expiry judged by log time.

    ``auto_unlock``: seconds after which a lock that was not renewed is
    free again (None: never).  Configuration: give every node the same.

    Every decision (granted, expired, renewed) is made while the call is
    applied, against ``self.log_time()`` -- the timestamp the leader wrote
    into the entry -- so every node decides the same at every log position:
    a lock has at most one holder at any point of the log, whichever node
    leads, whatever the nodes' clocks say.  Time the holder may rely on is
    measured from when it *sent* the acquire (or renew), not from when it
    got the answer: stop using the lock before ``auto_unlock`` has passed
    since then, or renew it.  ``lock_info(...)["token"]`` (the log index of
    the grant) is a fencing token that only grows.
    """

    __replicated_state__ = ("_locks", "_next_sweep")

    def __init__(self, auto_unlock: float | None = None, *, name: str | None = None) -> None:
        super().__init__(name=name)
        if auto_unlock is not None and not (isinstance(auto_unlock, (int, float)) and auto_unlock > 0):
            raise ValueError("auto_unlock must be a positive number of seconds or None")
        self.auto_unlock = auto_unlock
        # lock id -> [client id, expires at (log time) or None, token (log index of the grant)]
        self._locks: dict = {}
        self._next_sweep = 0.0

    def _expired(self, rec: list, now: float) -> bool:
        return rec[1] is not None and now >= rec[1]

    def _now(self) -> float:
        now = self.log_time()
        if now >= self._next_sweep and self._locks:  # drop expired locks now and then
            for lock_id in [k for k, rec in self._locks.items() if self._expired(rec, now)]:
                del self._locks[lock_id]
            self._next_sweep = now + self.auto_unlock if self.auto_unlock else math.inf
        return now

    def _expiry(self, now: float) -> float | None:
        return None if self.auto_unlock is None else now + self.auto_unlock

    @replicated
    def try_acquire(self, lock_id: Hashable, client_id: Hashable) -> bool:
        """Take ``lock_id`` for ``client_id`` if it is free or expired (or renew it if already held)."""
        now = self._now()
        rec = self._locks.get(lock_id)
        if rec is not None and rec[0] != client_id and not self._expired(rec, now):
            return False
        if rec is not None and rec[0] == client_id and not self._expired(rec, now):
            rec[1] = self._expiry(now)
            return True
        lid = self.log_id()
        self._locks[lock_id] = [client_id, self._expiry(now), lid.index if lid is not None else 0]
        return True

    @replicated
    def release(self, lock_id: Hashable, client_id: Hashable) -> bool:
        """Free ``lock_id`` if ``client_id`` holds it (and it has not expired); True when it did."""
        now = self._now()
        rec = self._locks.get(lock_id)
        if rec is None or rec[0] != client_id or self._expired(rec, now):
            return False
        del self._locks[lock_id]
        return True

    @replicated
    def renew(self, lock_id: Hashable, client_id: Hashable) -> bool:
        """Push the expiry of a lock ``client_id`` still holds; False when it does not hold it any more."""
        now = self._now()
        rec = self._locks.get(lock_id)
        if rec is None or rec[0] != client_id or self._expired(rec, now):
            return False
        rec[1] = self._expiry(now)
        return True

    @replicated
    def renew_all(self, client_id: Hashable) -> int:
        """Renew every lock ``client_id`` holds (PySyncObj's ``prolongate``); how many."""
        now = self._now()
        n = 0
        for rec in self._locks.values():
            if rec[0] == client_id and not self._expired(rec, now):
                rec[1] = self._expiry(now)
                n += 1
        return n

    @replicated
    def is_acquired(self, lock_id: Hashable, client_id: Hashable) -> bool:
        """Whether ``client_id`` holds ``lock_id`` at this point of the log (a replicated read)."""
        now = self._now()
        rec = self._locks.get(lock_id)
        return rec is not None and rec[0] == client_id and not self._expired(rec, now)

    # local reads (as of the last entry applied here; expiry judged by its log time)
    def holder(self, lock_id: Hashable) -> Any:
        """The client holding ``lock_id`` as of this node's last applied entry, or None."""
        info = self.lock_info(lock_id)
        return None if info is None else info["client_id"]

    def lock_info(self, lock_id: Hashable) -> dict | None:
        """``{"client_id", "expires_at" (log time or None), "token"}`` of a held lock, else None."""
        with self.locked():
            rec = self._locks.get(lock_id)
            if rec is None or self._expired(rec, self.log_time()):
                return None
            return {"client_id": rec[0], "expires_at": rec[1], "token": rec[2]}

    def locks(self) -> dict:
        """Every held lock: ``{lock id: client id}`` (local read)."""
        with self.locked():
            now = self.log_time()
            return {k: rec[0] for k, rec in self._locks.items() if not self._expired(rec, now)}


_MISSING = object()
