"""A linearizability checker for histories of a key-value store.

The algorithm is Wing & Gong's search with Lowe's memoization, as Porcupine
(``porcupine/checker.go``) implements it:

- The history is partitioned per key (a KV store is a product of independent
  registers, so it is linearizable iff every key's sub-history is: P-compositionality).
- A key's operations become call and return events sorted by time (at equal
  times calls come first, so touching intervals count as concurrent), in a
  doubly linked list.  The search walks the list: at a call it tries to
  linearize that operation now (the model must accept it in the current
  state), lifts it and its return out of the list, and starts again at the
  head; reaching a return means the operation it closes must already have
  been linearized, so it backtracks.
- A cache of ``(bitset of linearized operations, state)`` pairs cuts every
  branch that reaches a configuration seen before.
- Indeterminate operations are placed only where they matter (see below):
  one that would change nothing, or a blind write (put, delete) right after
  another indeterminate operation, is never placed (it can go last instead),
  and the search succeeds once every determinate operation is placed.  This
  keeps many concurrent timeouts from costing 2**k.

Indeterminate operations (the client gave up: a timeout; the write may or may
not have taken effect, at any time after its call) have ``return_time=None``:
their return event sits at +infinity, so they may be linearized anywhere after
their call, including "after everything", which is the same as never.  Their
result is unknown, so the model accepts any outcome (a ``cas`` then swaps iff
the state matches).  An indeterminate ``get`` has no effect and is dropped.

The model (one register per key, ``None`` = absent, so a stored None is absent):

=========================  ===================================================
``put(value)``             state := value; any result
``get()``                  result must equal the state
``delete()``               result (when not None) must be ``state is not None``; state := None
``cas(expected, new)``     matched := (state is None if expected is None else state == expected);
                           result must equal matched; if matched, state := new
=========================  ===================================================

Values are compared by a frozen form (lists as tuples, maps as sorted items).
"""
from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

__all__ = ["Op", "check_history", "check_key", "HistoryRecorder", "OPS"]

OPS = ("put", "get", "delete", "cas")
_INF = math.inf


@dataclass(frozen=True)
class Op:
    """One operation of a history.

    ``args``: ``(value,)`` for put, ``()`` for get and delete,
    ``(expected, new)`` for cas.  ``return_time=None``: indeterminate (the
    client does not know whether it took effect; ``result`` is ignored).
    """

    client: Hashable
    op: str
    key: Any
    args: tuple = ()
    call_time: float = 0.0
    return_time: float | None = None
    result: Any = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {', '.join(OPS)}")
        want = {"put": 1, "get": 0, "delete": 0, "cas": 2}[self.op]
        if len(self.args) != want:
            raise ValueError(f"{self.op} takes {want} argument(s), got {self.args!r}")
        if self.return_time is not None and self.return_time < self.call_time:
            raise ValueError(f"return_time {self.return_time} is before call_time {self.call_time}")

    @property
    def indeterminate(self) -> bool:
        return self.return_time is None

    def __str__(self) -> str:
        args = ", ".join(repr(a) for a in self.args)
        end = "?" if self.return_time is None else f"{self.return_time:.6f}"
        res = "?" if self.return_time is None else repr(self.result)
        return (f"[{self.call_time:.6f} .. {end}] client {self.client}: "
                f"{self.op}({self.key!r}{', ' if args else ''}{args}) -> {res}")


def _freeze(v: Any) -> Any:
    """A hashable, comparable stand-in for a value (lists and tuples alike, maps by sorted items)."""
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return ("__map__", tuple(sorted(((_freeze(k), _freeze(x)) for k, x in v.items()), key=repr)))
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    return v


class _Node:
    """An event in the search's doubly linked list: a call (``match`` is its return) or a return."""

    __slots__ = ("is_call", "idx", "match", "prev", "next")

    def __init__(self, is_call: bool, idx: int) -> None:
        self.is_call = is_call
        self.idx = idx
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None

    def lift(self) -> None:
        """Take this call and its return out of the list."""
        self.prev.next = self.next
        self.next.prev = self.prev
        m = self.match
        m.prev.next = m.next
        if m.next is not None:
            m.next.prev = m.prev

    def unlift(self) -> None:
        """Put this call and its return back (the exact inverse of lift)."""
        m = self.match
        m.prev.next = m
        if m.next is not None:
            m.next.prev = m
        self.prev.next = self
        self.next.prev = self


# A prepared operation: (kind, frozen args, frozen result, determinate)
_Prepared = tuple


def _prepare(op: Op) -> _Prepared:
    return (op.op, tuple(_freeze(a) for a in op.args), _freeze(op.result), op.return_time is not None)


def _step(state: Any, p: _Prepared) -> tuple[bool, Any]:
    """The model: may ``p`` take effect in ``state``, and what is the state after it?"""
    kind, args, result, determinate = p
    if kind == "put":
        return True, args[0]
    if kind == "get":
        return (not determinate or result == state), state
    if kind == "delete":
        if determinate and result is not None and bool(result) != (state is not None):
            return False, state
        return True, None
    expected, new = args  # cas
    matched = state is None if expected is None else state == expected
    if determinate and result != matched:
        return False, state
    return True, (new if matched else state)


_BLIND = ("put", "delete")


class _Deadline(Exception):
    pass


def check_key(ops: Sequence[Op], *, initial: Any = None, deadline: float | None = None) -> tuple[bool, dict]:
    """Check the operations of ONE key.  Returns ``(ok, info)``.

    ``info`` on failure: ``{"ops": [...], "longest": [indexes of the largest
    set of operations that could be linearized], "explored": n}``.
    Raises ``_Deadline`` past ``deadline`` (``time.monotonic()`` value).
    """
    # Indeterminate gets have no effect and constrain nothing.
    ops = [o for o in ops if not (o.indeterminate and o.op == "get")]
    n = len(ops)
    if n == 0:
        return True, {"ops": [], "explored": 0}
    prepared = [_prepare(o) for o in ops]
    events: list[tuple[float, int, int]] = []
    for i, o in enumerate(ops):
        events.append((o.call_time, 0, i))
        events.append((_INF if o.return_time is None else o.return_time, 1, i))
    events.sort()
    head = _Node(False, -1)
    calls: dict[int, _Node] = {}
    prev = head
    for _t, kind, i in events:
        node = _Node(kind == 0, i)
        if kind == 0:
            calls[i] = node
        else:
            calls[i].match = node
        prev.next = node
        node.prev = prev
        prev = node

    state = _freeze(initial)
    linearized = 0  # bitset of operation indexes
    cache: set[tuple[int, Any]] = {(0, state)}
    stack: list[tuple[_Node, Any]] = []
    longest: list[int] = []
    explored = 0
    # Indeterminate operations may always go last (= never), so the search is done once
    # every determinate one is placed.
    determinate_left = sum(1 for p in prepared if p[3])
    entry = head.next
    while determinate_left:
        explored += 1
        if deadline is not None and explored & 0x3FF == 0 and time.monotonic() > deadline:
            raise _Deadline()
        if entry.is_call:
            p = prepared[entry.idx]
            ok, new_state = _step(state, p)
            if ok and not p[3] and (new_state == state or (
                    p[0] in _BLIND and stack and not prepared[stack[-1][0].idx][3])):
                # Only place an indeterminate operation where it matters: one that changes
                # nothing, or a blind write right after another indeterminate operation
                # (which it would overwrite), can be moved to the end instead.  Without this,
                # k concurrent timed-out writes cost 2**k.
                ok = False
            if ok:
                bits = linearized | (1 << entry.idx)
                if (bits, new_state) not in cache:
                    cache.add((bits, new_state))
                    stack.append((entry, state))
                    state = new_state
                    linearized = bits
                    determinate_left -= p[3]
                    entry.lift()
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # A return whose call is still in the list: that operation should already have
            # taken effect.  Undo the most recent choice and try the next candidate instead.
            if len(stack) > len(longest):
                longest = [e.idx for e, _s in stack]
            if not stack:
                return False, {"ops": ops, "longest": longest, "explored": explored}
            entry, state = stack.pop()
            linearized &= ~(1 << entry.idx)
            determinate_left += prepared[entry.idx][3]
            entry.unlift()
            entry = entry.next
    return True, {"ops": ops, "explored": explored, "order": [e.idx for e, _s in stack]}


def check_history(ops: Iterable[Op], *, timeout: float | None = None,
                  initial: Callable[[Any], Any] | None = None) -> tuple[bool | None, dict]:
    """Is this KV history linearizable?  Returns ``(ok, info)``.

    ``ok`` is True or False, or None when ``timeout`` seconds passed first
    (the answer is unknown).  ``info`` holds ``keys`` and ``ops`` (counts),
    ``explored`` (search steps) and, when not linearizable, ``key`` (the first
    key found to be non-linearizable), ``key_ops`` (its operations, in call
    order), ``longest`` (the largest prefix set that could be linearized, as
    indexes into ``key_ops``) and ``report`` (a printable explanation).
    ``initial(key)`` gives a key's state before the history (default: absent).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    by_key: dict[Any, list[Op]] = defaultdict(list)
    n = 0
    for o in ops:
        by_key[_freeze(o.key)].append(o)
        n += 1
    info: dict[str, Any] = {"keys": len(by_key), "ops": n, "explored": 0}
    for key, kops in by_key.items():
        kops.sort(key=lambda o: o.call_time)
        try:
            ok, kinfo = check_key(kops, initial=None if initial is None else initial(key), deadline=deadline)
        except _Deadline:
            info["timed_out"] = True
            info["key"] = key
            return None, info
        info["explored"] += kinfo["explored"]
        if not ok:
            key_ops = kinfo["ops"]
            info.update(key=key, key_ops=key_ops, longest=kinfo["longest"],
                        report=_report(key, key_ops, kinfo["longest"]))
            return False, info
    return True, info


def _report(key: Any, ops: Sequence[Op], longest: Sequence[int], limit: int = 60) -> str:
    done = set(longest)
    lines = [f"key {key!r} is not linearizable ({len(ops)} operations; at most {len(done)} linearize together;"
             f" '*' marks them):"]
    for i, o in enumerate(ops[:limit]):
        lines.append(f"  {'*' if i in done else ' '} {o}")
    if len(ops) > limit:
        lines.append(f"  ... {len(ops) - limit} more")
    return "\n".join(lines)


@dataclass
class HistoryRecorder:
    """Collects a history from many threads: ``record(client, op, key, args, fn)``.

    ``fn()`` performs the operation; its return value is the result.  An
    exception for which ``definite_failure(e)`` is true means the operation
    did not take effect (it is left out); any other exception makes it
    indeterminate (writes) or drops it (gets), and is re-raised.
    """

    definite_failure: Callable[[BaseException], bool] = lambda e: False
    clock: Callable[[], float] = time.monotonic
    ops: list[Op] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, client: Hashable, op: str, key: Any, args: tuple, fn: Callable[[], Any]) -> Any:
        t0 = self.clock()
        try:
            result = fn()
        except BaseException as e:
            if not self.definite_failure(e):
                with self._lock:
                    self.ops.append(Op(client, op, key, tuple(args), t0, None, None))
            raise
        t1 = self.clock()
        with self._lock:
            self.ops.append(Op(client, op, key, tuple(args), t0, t1, result))
        return result

    def history(self) -> list[Op]:
        with self._lock:
            return list(self.ops)
