"""``ReplicatedObject``, the ``@replicated`` decorator, and the errors of replicated calls.

A replicated method is a descriptor (:class:`ReplicatedMethod`).  On an
instance it gives a :class:`BoundReplicatedMethod`: calling it proposes the
call through the Raft leader and returns what the method returned when this
node applied the call; ``.future(...)`` returns a ``concurrent.futures.Future``
instead.  The method body itself runs only inside
:meth:`ObjectStateMachine.apply <pyraft.objects.ObjectStateMachine.apply>`,
on every node, in log order.

Each class keeps a registry ``{method name: {version: ReplicatedMethod}}``
built once in ``__init_subclass__``: ``@replicated(ver=N)`` declares version
N.  An older implementation stays applicable (for a rolling upgrade, see
``docs/objects.md``) when the method is defined again in the same class body
with another version (PySyncObj's way: the earlier one is kept as
``<name>_v<ver>``), or when it is declared under another attribute with
``@replicated(ver=K, name="m")``.
"""
from __future__ import annotations

import builtins
import concurrent.futures
import functools
import inspect
import sys
import threading
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterator, Protocol

from .. import errors as _errors
from ..errors import RaftError, Timeout
from ..types import LogId
from . import _values

__all__ = ["ReplicatedObject", "replicated", "ReplicatedMethod", "BoundReplicatedMethod",
           "VersionMismatch", "ReplicatedMethodError", "NotAttached"]

#: Extra seconds a blocking call waits for its future after ``timeout``: the
#: dispatcher thread fails the future at the deadline; this only guards
#: against that thread being gone.
_GRACE = 1.0


# ---------------------------------------------------------------------------
# Errors

class VersionMismatch(RaftError):
    """A replicated call named a method version that is not applied everywhere.

    Raised by the call on the node it came from; it changed nothing on any
    node.  ``object_name``, ``method`` and ``version`` name the call;
    ``supported`` maps node ids to the versions of that method they run
    (as announced in the log; a node with no entry lacks the method).
    """

    def __init__(self, message: str = "version mismatch", *, object_name: str | None = None,
                 method: str | None = None, version: int | None = None,
                 supported: dict[int, list[int]] | None = None) -> None:
        super().__init__(message)
        self.object_name = object_name
        self.method = method
        self.version = version
        self.supported = supported or {}


class ReplicatedMethodError(RaftError):
    """A replicated method raised an exception whose type cannot be rebuilt on this node.

    Only seen when the outcome of a call had to be taken from the replicated
    record (a snapshot, a duplicate) rather than from running the method here;
    ``type_name`` is the original exception's qualified type name.
    """

    def __init__(self, message: str = "", type_name: str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name


class NotAttached(RaftError):
    """The object is in no ObjectStateMachine, or that one is not attached to a Raft node."""


_ERROR_MODULES = {"builtins": builtins, _errors.__name__: _errors}


def outcome_to_wire(ok: bool, value: Any) -> list:
    """``["r", bytes]`` for a result, ``["e", module, type, message, args bytes | None]`` for an exception.

    ``["x", text]`` for a result that cannot be encoded (it can then only be
    delivered by running the method, never from the replicated record).
    """
    if ok:
        try:
            return ["r", _values.dumps(value)]
        except TypeError as e:
            return ["x", str(e)]
    try:
        args: bytes | None = _values.dumps(value.args)
    except TypeError:
        args = None
    return ["e", type(value).__module__, type(value).__qualname__, str(value), args]


def outcome_from_wire(w: Any) -> tuple[bool, Any]:
    """The inverse of :func:`outcome_to_wire`: ``(True, result)`` or ``(False, exception instance)``."""
    if not isinstance(w, list) or not w:
        return False, RaftError(f"malformed call outcome {w!r:.80}")
    if w[0] == "r" and len(w) == 2 and isinstance(w[1], bytes):
        try:
            return True, _values.loads(w[1], "call result")
        except _errors.CodecError as e:
            return False, ReplicatedMethodError(f"the call's recorded result is unreadable: {e}")
    if w[0] == "x":
        return False, ReplicatedMethodError(f"the call was applied but its result cannot be replicated: {w[1]}")
    if w[0] == "e" and len(w) == 5:
        _tag, module, qualname, message, args = w
        mod = _ERROR_MODULES.get(module) if module != __name__ else sys.modules[__name__]
        cls = getattr(mod, qualname, None) if mod is not None and isinstance(qualname, str) else None
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                if isinstance(args, bytes) and cls not in (VersionMismatch, ReplicatedMethodError):
                    return False, cls(*_values.loads(args, "exception args"))
                return False, cls(message)
            except Exception:  # noqa: BLE001 - a constructor with other needs: fall through
                pass
        return False, ReplicatedMethodError(f"{module}.{qualname}: {message}", f"{module}.{qualname}")
    return False, RaftError(f"malformed call outcome {w!r:.80}")


# ---------------------------------------------------------------------------
# The decorator

class ReplicatedMethod:
    """A ``@replicated`` method of a ReplicatedObject class (the descriptor on the class).

    ``method_name`` is the name calls use on the wire (the attribute name
    unless ``name=`` was given); ``ver`` its version.
    """

    def __init__(self, fn: Callable[..., Any], ver: int = 0, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError("@replicated decorates a method")
        if type(ver) is not int or ver < 0:
            raise ValueError(f"@replicated(ver=...) takes a non-negative int, got {ver!r}")
        if name is not None and (not isinstance(name, str) or not name.isidentifier()):
            raise ValueError(f"@replicated(name=...) takes a method name, got {name!r}")
        self.fn = fn
        self.ver = ver
        self.method_name = name or fn.__name__
        self.attr = fn.__name__
        # The method's name and docstring on the descriptor (help() shows them); typeshed wants a
        # callable wrapper, this one is a descriptor.
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return BoundReplicatedMethod(obj, self)

    def __repr__(self) -> str:
        return f"<replicated method {self.method_name} ver={self.ver}>"


def replicated(fn: Callable[..., Any] | None = None, *, ver: int = 0, name: str | None = None) -> Any:
    """Make a method of a :class:`ReplicatedObject` replicated: ``@replicated`` or ``@replicated(ver=N)``.

    ``ver``: the method's version (default 0); bump it whenever the method's
    effect on the state or its result changes.  ``name``: register this
    function as a version of another method (to keep an older
    implementation under a different attribute during a rolling upgrade).

    The method must be deterministic: its effect and result may depend only
    on the object's state, the arguments and ``self.log_time()`` /
    ``self.log_id()`` (no clocks, randomness, I/O, set or hash order).
    Arguments, keyword arguments and results are msgpack values, tuples and
    sets.  The keyword ``timeout`` is taken by the call machinery.
    """
    if fn is not None:
        return ReplicatedMethod(fn, ver, name)
    return lambda f: ReplicatedMethod(f, ver, name)


class BoundReplicatedMethod:
    """``obj.method``: call it (blocking) or ``.future(...)`` it."""

    __slots__ = ("_obj", "_method")

    def __init__(self, obj: "ReplicatedObject", method: ReplicatedMethod) -> None:
        self._obj = obj
        self._method = method

    def __call__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Replicate the call and return its result once applied on this node.

        Inside another replicated method (while it is applied) the method
        simply runs, as part of that call.

        Raises what the method raised, :class:`VersionMismatch`,
        :class:`~pyraft.errors.Timeout` (the call may still be applied, at
        most once), :class:`~pyraft.errors.ShutDown` or ``Fatal``.
        """
        sm = getattr(self._obj, "_repl_sm", None)
        if sm is not None and sm._apply_thread == threading.get_ident():
            # called by another replicated method while it is applied: part of that call
            return self._method.fn(self._obj, *args, **kwargs)
        fut = self.future(*args, timeout=timeout, **kwargs)
        try:
            return fut.result(None if timeout is None else timeout + _GRACE)
        except concurrent.futures.TimeoutError:
            raise Timeout(f"{self!r} did not finish within {timeout} s") from None

    def future(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Future:
        """Replicate the call; the future gets its result (or exception) once applied on this node."""
        sm = getattr(self._obj, "_repl_sm", None)
        if sm is None:
            raise NotAttached(f"{self._obj.object_name!r} is in no ObjectStateMachine")
        if sm._apply_thread == threading.get_ident():  # nested in an applied call: run it as part of it
            fut: Future = Future()
            try:
                fut.set_result(self._method.fn(self._obj, *args, **kwargs))
            except Exception as e:  # noqa: BLE001 - delivered through the future
                fut.set_exception(e)
            return fut
        return sm._submit_call(self._obj, self._method, args, kwargs, timeout)

    @property
    def ver(self) -> int:
        return self._method.ver

    def __repr__(self) -> str:
        return f"<replicated {self._obj.object_name}.{self._method.method_name} ver={self._method.ver}>"


# ---------------------------------------------------------------------------
# The base class

class _Namespace(dict):
    """A class body namespace that keeps a redefined replicated method's earlier versions.

    ``@replicated def inc`` followed by ``@replicated(ver=1) def inc`` in one
    class body (PySyncObj's way to keep old versions) stores the first under
    ``inc_v0``; both stay applicable.
    """

    def __setitem__(self, key: str, value: Any) -> None:
        old = self.get(key)
        if isinstance(old, ReplicatedMethod) and isinstance(value, ReplicatedMethod) \
                and old.method_name == value.method_name:
            if old.ver == value.ver:
                raise TypeError(f"version {value.ver} of replicated method {key!r} is defined twice")
            super().__setitem__(f"{key}_v{old.ver}", old)
        super().__setitem__(key, value)


class _ReplicatedMeta(type):
    @classmethod
    def __prepare__(mcls, name: str, bases: tuple, **kw: Any) -> dict:  # type: ignore[override]
        return _Namespace()

    def __new__(mcls, name: str, bases: tuple, ns: dict, **kw: Any) -> type:
        return super().__new__(mcls, name, bases, dict(ns), **kw)


class ObjectHost(Protocol):
    """What a ReplicatedObject uses of the ObjectStateMachine it is registered in (which is one)."""

    @property
    def _apply_thread(self) -> int | None:
        """The thread running replicated methods (inside ``apply``), else None."""

    @property
    def _lock(self) -> ContextManager[Any]:
        """Held while calls are applied (``ReplicatedObject.locked``)."""

    @property
    def _log_time(self) -> float:
        """The log time of the call being applied, or of the last one."""

    @property
    def _current_log_id(self) -> LogId | None:
        """The log id of the entry being applied, or of the last one."""

    def _submit_call(self, obj: ReplicatedObject, method: ReplicatedMethod, args: tuple, kwargs: dict,
                     timeout: float | None) -> Future:
        """Replicate a call of ``method`` on ``obj``; the future completes when this node applied it."""

    def sync(self, timeout: float | None = None) -> LogId:
        """ReadIndex: local reads then see every call completed before."""


class ReplicatedObject(metaclass=_ReplicatedMeta):
    """Base class of objects whose ``@replicated`` methods run on every node in log order.

    State: declare ``__replicated_state__ = ("attr", ...)`` (the attributes
    that make up the state; msgpack values, tuples and sets), or override
    :meth:`get_state` / :meth:`set_state`.  Everything else on the object is
    node-local.

    Name: the class name, or ``name=`` given to ``__init__``; objects in one
    :class:`~pyraft.objects.ObjectStateMachine` have distinct names, and the
    same object on every node has the same name.

    Methods without ``@replicated`` are local reads: they see this node's
    state as of the last entry it applied; call :meth:`sync` first for a
    linearizable read.
    """

    #: The attribute names of the replicated state (None: override get_state/set_state).
    __replicated_state__: tuple[str, ...] | None = None

    #: {method name: {version: ReplicatedMethod}}, built per class.
    _repl_methods: dict[str, dict[int, ReplicatedMethod]] = {}
    #: {method name: the version a call proposes when the cluster runs it}
    _repl_current: dict[str, int] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        methods: dict[str, dict[int, ReplicatedMethod]] = {}
        for klass in reversed(cls.__mro__):
            seen: set[tuple[str, int]] = set()
            for attr, v in vars(klass).items():
                if not isinstance(v, ReplicatedMethod):
                    continue
                key = (v.method_name, v.ver)
                if key in seen:
                    raise TypeError(f"{klass.__qualname__} defines version {v.ver} of {v.method_name!r} twice")
                seen.add(key)
                # a subclass that rebinds the attribute (to anything) drops the parent's version
                if inspect.getattr_static(cls, attr, None) is v:
                    methods.setdefault(v.method_name, {})[v.ver] = v
        current: dict[str, int] = {}
        for mname, vers in methods.items():
            bound = inspect.getattr_static(cls, mname, None)
            current[mname] = bound.ver if isinstance(bound, ReplicatedMethod) and bound.method_name == mname \
                else max(vers)
        cls._repl_methods = methods
        cls._repl_current = current

    def __init__(self, *, name: str | None = None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("an object name is a non-empty string")
        self._repl_name = name
        self._repl_sm: ObjectHost | None = None

    # -- identity ------------------------------------------------------------------

    @property
    def object_name(self) -> str:
        """The name calls address this object by (same on every node)."""
        return getattr(self, "_repl_name", None) or type(self).__name__

    # -- state -----------------------------------------------------------------------

    def get_state(self) -> Any:
        """The replicated state as a value (default: the ``__replicated_state__`` attributes)."""
        names = type(self).__replicated_state__
        if names is None:
            raise TypeError(f"{type(self).__name__} declares neither __replicated_state__ nor get_state/set_state")
        return {a: getattr(self, a) for a in names}

    def set_state(self, state: Any) -> None:
        """Replace the replicated state with ``state`` (what :meth:`get_state` returned, decoded)."""
        names = type(self).__replicated_state__
        if names is None:
            raise TypeError(f"{type(self).__name__} declares neither __replicated_state__ nor get_state/set_state")
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__}: state must be a map of attributes")
        for a in names:
            if a in state:
                setattr(self, a, state[a])

    # -- reads ----------------------------------------------------------------------

    def sync(self, timeout: float | None = None) -> LogId:
        """Make the next local read linearizable (ReadIndex through the leader).

        Returns the read's log id: once this returns, this node has applied
        every call that completed anywhere before ``sync`` was called.
        """
        sm = getattr(self, "_repl_sm", None)
        if sm is None:
            raise NotAttached(f"{self.object_name!r} is in no ObjectStateMachine")
        return sm.sync(timeout)

    def locked(self) -> ContextManager[Any]:
        """A context in which no call is applied to this node's objects (for multi-step local reads)."""
        sm = getattr(self, "_repl_sm", None)
        return nullcontext() if sm is None else sm._lock

    def log_time(self) -> float:
        """The log time: inside a replicated method, the timestamp the leader put in this call's entry.

        Never earlier than any earlier entry's time (the log's clock does not
        go back).  Outside a replicated method: the time of the last applied
        call (0.0 before any).  Use it instead of ``time.time()`` in
        replicated methods, so that every node computes the same thing.
        """
        sm = getattr(self, "_repl_sm", None)
        return 0.0 if sm is None else sm._log_time

    def log_id(self) -> LogId | None:
        """Inside a replicated method: the log id of the entry being applied; else the last applied one."""
        sm = getattr(self, "_repl_sm", None)
        return None if sm is None else sm._current_log_id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.object_name!r}>"


def iter_versions(cls: type[ReplicatedObject]) -> Iterator[tuple[str, list[int]]]:
    """``(method name, sorted versions)`` of a ReplicatedObject class."""
    for mname, vers in sorted(cls._repl_methods.items()):
        yield mname, sorted(vers)

