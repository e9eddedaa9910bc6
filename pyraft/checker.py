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

Ranges and transactions touch several keys, so the keys they touch are
checked together: the keys fall into groups (union-find: a txn joins the
keys it names, a range every key of the history inside its bounds, in the KV
service's key order), a group without a range or txn keeps the register
model above, and a group with one is searched with a map model whose state
is every key's value and version (1 on create, +1 per put or swap, 0 when
absent):

=============================================  ======================================================
``range(end, prefix, limit)`` (key: the start)  result must equal the ``(key, value)`` pairs in the
                                               range, in key order, the first ``limit`` (0/None: all)
``txn(compare, success, failure)``              compares ``(key, target, op, value)`` with target
                                               ``value`` or ``version`` and op ``== != < >``; ops
                                               ``("put", k, v)``, ``("delete", k)``, ``("get", k)``;
                                               result ``(succeeded, responses)``, responses as
                                               put/delete/get above (put: None)
=============================================  ======================================================

As in the KV service, a compare on a missing key's value is false whatever
its op, and a missing key has version 0.  An indeterminate txn is placed
anywhere after its call, with either branch the state then gives; an
indeterminate range is dropped.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

__all__ = ["Op", "check_history", "check_key", "HistoryRecorder", "OPS"]

OPS = ("put", "get", "delete", "cas", "range", "txn")
_ARITY = {"put": 1, "get": 0, "delete": 0, "cas": 2, "range": 3, "txn": 3}
_INF = math.inf


@dataclass(frozen=True)
class Op:
    """One operation of a history.

    ``args``: ``(value,)`` for put, ``()`` for get and delete,
    ``(expected, new)`` for cas, ``(end, prefix, limit)`` for range (``key``
    is the range's start or prefix), ``(compare, success, failure)`` for txn
    (``key`` is not used; see the module docstring).  ``return_time=None``:
    indeterminate (the client does not know whether it took effect;
    ``result`` is ignored).
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
        want = _ARITY[self.op]
        if len(self.args) != want:
            raise ValueError(f"{self.op} takes {want} argument(s), got {self.args!r}")
        if self.op == "txn":
            compare, success, failure = self.args
            for c in compare:
                if len(c) != 4 or c[1] not in ("value", "version") or c[2] not in ("==", "!=", "<", ">"):
                    raise ValueError(f"txn compare must be (key, 'value'|'version', op, value), got {c!r}")
            for o in (*success, *failure):
                if not o or o[0] not in ("put", "delete", "get") or len(o) != (3 if o[0] == "put" else 2):
                    raise ValueError(f"txn op must be ('put', k, v), ('delete', k) or ('get', k), got {o!r}")
        if self.return_time is not None and self.return_time < self.call_time:
            raise ValueError(f"return_time {self.return_time} is before call_time {self.call_time}")

    @property
    def indeterminate(self) -> bool:
        return self.return_time is None

    def keys(self) -> list[Any]:
        """The keys this operation names (a range: its start; the keys it covers are found by the checker)."""
        if self.op != "txn":
            return [self.key]
        compare, success, failure = self.args
        return [c[0] for c in compare] + [o[1] for o in (*success, *failure)]

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
        self.match: _Node | None = None  # a call's return
        self.prev: _Node = self  # linked by _search (the head's stays itself)
        self.next: _Node | None = None  # None: the last event

    def lift(self) -> None:
        """Take this call and its return out of the list."""
        nxt, m = self.next, self.match
        assert nxt is not None and m is not None, "a call is never last: its return follows it"
        self.prev.next = nxt
        nxt.prev = self.prev
        m.prev.next = m.next
        if m.next is not None:
            m.next.prev = m.prev

    def unlift(self) -> None:
        """Put this call and its return back (the exact inverse of lift)."""
        nxt, m = self.next, self.match
        assert nxt is not None and m is not None, "a call is never last: its return follows it"
        m.prev.next = m
        if m.next is not None:
            m.next.prev = m
        self.prev.next = self
        nxt.prev = self


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
    """Check the operations of ONE key (register model).  Returns ``(ok, info)``.

    ``info`` on failure: ``{"ops": [...], "longest": [indexes of the largest
    set of operations that could be linearized], "explored": n}``.
    Raises ``_Deadline`` past ``deadline`` (``time.monotonic()`` value).
    """
    # Indeterminate gets have no effect and constrain nothing.
    ops = [o for o in ops if not (o.indeterminate and o.op == "get")]
    return _search(ops, [_prepare(o) for o in ops], _step, _freeze(initial), True, deadline)


def _search(ops: list[Op], prepared: list[_Prepared], step: Callable[[Any, _Prepared], tuple[bool, Any]],
            state: Any, blind_rule: bool, deadline: float | None) -> tuple[bool, dict]:
    """Wing & Gong's search with Lowe's cache over ``ops`` (module docstring); ``step`` is the model."""
    n = len(ops)
    if n == 0:
        return True, {"ops": [], "explored": 0}
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
        # The list ends with a return, whose call the search meets first and places or
        # backtracks over: it never walks past the end.
        assert entry is not None, "the search walked past the last event"
        explored += 1
        if deadline is not None and explored & 0x3FF == 0 and time.monotonic() > deadline:
            raise _Deadline()
        if entry.is_call:
            p = prepared[entry.idx]
            ok, new_state = step(state, p)
            if ok and not p[3] and (new_state == state or (
                    blind_rule and p[0] in _BLIND and stack and not prepared[stack[-1][0].idx][3])):
                # Only place an indeterminate operation where it matters: one that changes
                # nothing, or (one register) a blind write right after another indeterminate
                # operation (which it would overwrite), can be moved to the end instead.
                # Without this, k concurrent timed-out writes cost 2**k.
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


# ---------------------------------------------------------------------------------- several keys

def _order(key: Any) -> bytes:
    """A key's place in the KV service's key order (its stored form)."""
    from .kv.encoding import encode_key
    return encode_key(key)


class _Covers:
    """Which keys a range covers: ``[start, stop)`` in stored forms (pyraft.kv.encoding)."""

    def __init__(self, op: Op) -> None:
        from .kv.encoding import range_bounds
        end, prefix, _limit = op.args
        self.start, self.stop = range_bounds(op.key, end, bool(prefix))

    def __call__(self, key: Any) -> bool:
        return self.start <= _order(key) < self.stop


def _map_step(covers: dict[int, _Covers]) -> Callable[[Any, _Prepared], tuple[bool, Any]]:
    """The map model: the state is a tuple of ``(stored form, key, value, version)`` sorted by stored form."""

    def lookup(state: tuple, key: Any) -> tuple[Any, int]:
        for _o, k, v, ver in state:
            if k == key:
                return v, ver
        return None, 0

    def setkey(state: tuple, key: Any, value: Any, version: int) -> tuple:
        rest = [row for row in state if row[1] != key]
        if version:
            rest.append((_order(key), key, value, version))
            rest.sort(key=lambda r: r[0])
        return tuple(rest)

    def run_txn(state: tuple, args: tuple) -> tuple[tuple, tuple]:
        compare, success, failure = args
        ok = True
        for key, target, op, value in compare:
            cur, ver = lookup(state, key)
            if target == "value" and cur is None:
                ok = False
                break
            x = cur if target == "value" else ver
            try:
                holds = {"==": lambda: x == value, "!=": lambda: x != value, "<": lambda: x < value,
                         ">": lambda: x > value}[op]()
            except TypeError:  # values that do not order: the store refuses such a txn
                holds = False
            if not holds:
                ok = False
                break
        responses: list[Any] = []
        for o in (success if ok else failure):
            cur, ver = lookup(state, o[1])
            if o[0] == "put":
                state = setkey(state, o[1], o[2], ver + 1)
                responses.append(None)
            elif o[0] == "delete":
                state = setkey(state, o[1], None, 0)
                responses.append(cur is not None)
            else:
                responses.append(cur)
        return state, (ok, tuple(responses))

    def step(state: tuple, p: _Prepared) -> tuple[bool, Any]:
        kind, args, result, determinate, idx, key = p
        if kind == "range":
            rows = tuple((k, v) for _o, k, v, _ver in state if covers[idx](k))
            limit = args[2]
            if limit:
                rows = rows[:limit]
            return (not determinate or result == rows), state
        if kind == "txn":
            new, got = run_txn(state, args)
            return (not determinate or result == got), new
        cur, ver = lookup(state, key)
        if kind == "put":
            return True, setkey(state, key, args[0], ver + 1)
        if kind == "get":
            return (not determinate or result == cur), state
        if kind == "delete":
            if determinate and result is not None and bool(result) != (cur is not None):
                return False, state
            return True, setkey(state, key, None, 0)
        expected, new = args  # cas
        matched = cur is None if expected is None else cur == expected
        if determinate and result != matched:
            return False, state
        return True, (setkey(state, key, new, ver + 1) if matched else state)

    return step


def _check_group(ops: list[Op], keys: list[Any], initial: Callable[[Any], Any] | None,
                 deadline: float | None) -> tuple[bool, dict]:
    """Check the operations of a group of keys joined by ranges and txns (map model)."""
    ops = [o for o in ops if not (o.indeterminate and o.op in ("get", "range"))]
    covers = {i: _Covers(o) for i, o in enumerate(ops) if o.op == "range"}
    prepared = []
    for i, o in enumerate(ops):
        prepared.append((*_prepare(o), i, _freeze(o.key)))
    rows = []
    for k in keys:
        v = None if initial is None else _freeze(initial(k))
        if v is not None:
            rows.append((_order(k), k, v, 1))
    rows.sort(key=lambda r: r[0])
    return _search(ops, prepared, _map_step(covers), tuple(rows), False, deadline)


def _groups(ops: list[Op]) -> list[tuple[list[Any], list[Op], bool]]:
    """Partition the history: ``(keys, ops, multi)`` per group; ``multi`` when ranges or txns join keys."""
    parent: dict[Any, Any] = {}

    def find(k: Any) -> Any:
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: Any, b: Any) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb

    universe: set[Any] = set()
    for o in ops:
        if o.op == "range":
            if o.return_time is not None:
                universe.update(_freeze(r[0]) for r in o.result)
        else:
            universe.update(_freeze(k) for k in o.keys())
    for k in universe:
        find(k)
    anchor: dict[int, Any] = {}  # op index -> a key of its group
    empty_ranges: list[Op] = []
    for i, o in enumerate(ops):
        if o.op == "range":
            cov = _Covers(o)
            inside = [k for k in universe if cov(k)]
            if not inside:
                empty_ranges.append(o)
                continue
            for k in inside[1:]:
                union(inside[0], k)
            anchor[i] = inside[0]
        elif o.op == "txn":
            ks = [_freeze(k) for k in o.keys()]
            for k in ks[1:]:
                union(ks[0], k)
            if ks:
                anchor[i] = ks[0]
            else:
                empty_ranges.append(o)
        else:
            anchor[i] = _freeze(o.key)
    by_root: dict[Any, tuple[list[Any], list[Op], list[bool]]] = {}
    for k in universe:
        by_root.setdefault(find(k), ([], [], [False]))[0].append(k)
    for i, o in enumerate(ops):
        if i in anchor:
            g = by_root[find(anchor[i])]
            g[1].append(o)
            if o.op in ("range", "txn"):
                g[2][0] = True
    out = [(keys, gops, multi[0]) for keys, gops, multi in by_root.values() if gops]
    if empty_ranges:  # ranges over no key of the history, txns naming none: checked alone
        out.append(([], empty_ranges, True))
    return out


def check_history(ops: Iterable[Op], *, timeout: float | None = None,
                  initial: Callable[[Any], Any] | None = None) -> tuple[bool | None, dict]:
    """Is this KV history linearizable?  Returns ``(ok, info)``.

    ``ok`` is True or False, or None when ``timeout`` seconds passed first
    (the answer is unknown).  ``info`` holds ``keys`` and ``ops`` (counts),
    ``explored`` (search steps) and, when not linearizable, ``key`` (the first
    key found to be non-linearizable; for a group of keys joined by ranges or
    txns, a tuple of them), ``key_ops`` (its operations, in call order),
    ``longest`` (the largest prefix set that could be linearized, as indexes
    into ``key_ops``) and ``report`` (a printable explanation).
    ``initial(key)`` gives a key's state before the history (default: absent).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    ops = list(ops)
    groups = _groups(ops)
    info: dict[str, Any] = {"keys": sum(len(g[0]) for g in groups), "ops": len(ops), "explored": 0}
    for keys, gops, multi in groups:
        gops.sort(key=lambda o: o.call_time)
        key: Any = tuple(keys) if multi else keys[0]
        try:
            if multi:
                ok, kinfo = _check_group(gops, keys, initial, deadline)
            else:
                ok, kinfo = check_key(gops, initial=None if initial is None else initial(key), deadline=deadline)
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
