"""ClientFuture: a ``concurrent.futures.Future`` that costs less to make, complete and collect.

A plain ``Future`` builds, when it is created, a ``threading.Condition`` (an
RLock, a waiters deque) and two lists, though most of the futures of a busy
leader are completed without anyone ever waiting on them (they have a
done-callback, or are looked at after they completed).  At tens of thousands
of writes a second that is a good part of a write's cost, and worse, every
one of those objects lives as long as the write is in flight, long enough for
the cyclic garbage collector to promote it and walk it again and again.

A :class:`ClientFuture` is one object until somebody needs more:

- the short critical sections of the ``Future`` methods take one process-wide
  RLock (``_LOCK``) instead of a lock of their own;
- ``_condition`` (a :class:`_SharedCondition` on that lock), the ``_waiters``
  list of ``concurrent.futures.wait``/``as_completed`` and the list of
  done-callbacks are made on first use;
- ``done()``, ``result()`` and ``exception()`` of a finished future answer
  without a lock (the state of a finished future never changes again).

It is a real ``concurrent.futures.Future``: every method behaves as
documented and ``concurrent.futures.wait``/``as_completed`` work on it (the
stdlib code that is not overridden here runs unchanged, reaching the lazily
made objects through the ``_condition`` and ``_waiters`` properties).  If this
Python's ``Future`` keeps state this module does not know, :data:`new_future`
is the plain ``Future``.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, LOGGER, PENDING)
from typing import Any, Callable

__all__ = ["ClientFuture", "new_future", "complete_all"]

#: Guards the state of every ClientFuture.  Reentrant: ``concurrent.futures.wait``
#: takes the ``_condition`` of each of its futures in turn, all of them this lock.
_LOCK = threading.RLock()

_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_CANCELLED = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED))


class _SharedCondition:
    """``Future._condition`` of a ClientFuture: ``_LOCK``, and a Condition on it made on first wait."""

    __slots__ = ("_cond",)

    def __init__(self) -> None:
        self._cond: threading.Condition | None = None  # guarded by _LOCK

    def __enter__(self) -> bool:
        return _LOCK.__enter__()

    def __exit__(self, *exc: Any) -> None:
        _LOCK.__exit__(*exc)

    def acquire(self, *args: Any) -> bool:
        return _LOCK.acquire(*args)

    def release(self) -> None:
        _LOCK.release()

    def wait(self, timeout: float | None = None) -> bool:
        # Called with _LOCK held (as Condition.wait requires): making the condition here
        # and notify_all() testing for it, both under _LOCK, cannot miss each other.
        c = self._cond
        if c is None:
            c = self._cond = threading.Condition(_LOCK)
        return c.wait(timeout)

    def notify_all(self) -> None:
        c = self._cond
        if c is not None:
            c.notify_all()

    def notify(self, n: int = 1) -> None:
        c = self._cond
        if c is not None:
            c.notify(n)


class ClientFuture(Future):
    """A ``concurrent.futures.Future`` made of one object until it is waited on (see the module docstring)."""

    def __init__(self) -> None:  # noqa: D107 - no super().__init__: its Condition and lists are made lazily
        self._state = PENDING
        self._result = None
        self._exception = None
        self._cond_: _SharedCondition | None = None   # these three: guarded by _LOCK, made on first use
        self._waiters_: list | None = None
        self._callbacks_: Any = None  # None, the one callback, or a list of them

    # -- the stdlib's fields, made on first use ------------------------------------------

    @property
    def _condition(self) -> _SharedCondition:  # type: ignore[override]
        c = self._cond_
        if c is None:
            with _LOCK:
                c = self._cond_
                if c is None:
                    c = self._cond_ = _SharedCondition()
        return c

    @property
    def _waiters(self) -> list:  # type: ignore[override]
        w = self._waiters_
        if w is None:
            with _LOCK:
                w = self._waiters_
                if w is None:
                    w = self._waiters_ = []
        return w

    @property
    def _done_callbacks(self) -> list:
        cbs = self._callbacks_
        if cbs is None:
            return []
        return cbs if type(cbs) is list else [cbs]

    # -- the hot paths, without the lazily made objects --------------------------------

    def _invoke_callbacks(self) -> None:
        cbs = self._callbacks_
        if cbs is None:
            return
        for callback in (cbs if type(cbs) is list else (cbs,)):
            try:
                callback(self)
            except Exception:
                LOGGER.exception('exception calling callback for %r', self)

    def _wake(self, failed: bool) -> None:
        # with _LOCK held, once the future is FINISHED
        w = self._waiters_
        if w:
            for waiter in w:
                if failed:
                    waiter.add_exception(self)
                else:
                    waiter.add_result(self)
        c = self._cond_
        if c is not None:
            c.notify_all()

    def _finish(self, value: Any, failed: bool) -> bool:
        # with _LOCK held: FINISHED with the exception (failed) or result ``value``, waiters
        # woken; False, changing nothing, if the future was done already
        if self._state in _DONE:
            return False
        if failed:
            self._exception = value
        else:
            self._result = value
        self._state = FINISHED
        if self._waiters_ or self._cond_ is not None:
            self._wake(failed)
        return True

    def set_result(self, result: Any) -> None:
        with _LOCK:
            if not self._finish(result, False):
                raise InvalidStateError('{}: {!r}'.format(self._state, self))
        self._invoke_callbacks()

    def set_exception(self, exception: BaseException | None) -> None:
        with _LOCK:
            if not self._finish(exception, True):
                raise InvalidStateError('{}: {!r}'.format(self._state, self))
        self._invoke_callbacks()

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        with _LOCK:
            if self._state not in _DONE:
                cbs = self._callbacks_
                if cbs is None:
                    self._callbacks_ = fn  # the usual one callback: no list
                elif type(cbs) is list:
                    cbs.append(fn)
                else:
                    self._callbacks_ = [cbs, fn]
                return
        try:
            fn(self)
        except Exception:
            LOGGER.exception('exception calling callback for %r', self)

    def done(self) -> bool:
        return self._state in _DONE  # one read of a field: no lock needed

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED:  # final: _result/_exception were set before it
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    del self  # break the cycle through the traceback, as the stdlib does (self = None)
            return self._result
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)


def _usable() -> bool:
    """True when this Python's Future keeps exactly the state ClientFuture replaces."""
    known = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
    if set(vars(Future())) != known:
        return False
    f = ClientFuture()
    f.add_done_callback(lambda _f: None)
    f.set_result(1)
    return f.done() and f.result() == 1


#: Make a future for a client call: a ClientFuture where this Python's Future is the one it knows.
new_future = ClientFuture if _usable() else Future


#: How many futures complete_all completes under one hold of _LOCK.
_COMPLETE_CHUNK = 256


def complete_all(done: list[tuple[Future, Any, bool]]) -> None:
    """Complete each ``(future, value, failed)``: with the exception ``value`` if ``failed``, else the result ``value``.

    A future already done (its caller cancelled it) is left as it is.  The
    ClientFutures' states are set under one hold of ``_LOCK`` per
    ``_COMPLETE_CHUNK`` futures instead of one per future; each chunk's
    done-callbacks then run in order, outside the lock, as ``set_result``
    runs them (so a callback may find later futures of its chunk done
    already).  Futures of other classes are completed after, by their own
    methods.  A callback that raises an Exception is logged, as
    ``set_result`` does; one that raises anything else (SystemExit,
    KeyboardInterrupt) stops only its own future's callbacks: every other
    future is still completed and its callbacks run, and the first such
    exception is raised at the end.  No caller is left waiting.
    """
    escaped: BaseException | None = None
    for start in range(0, len(done), _COMPLETE_CHUNK):
        ready: list[ClientFuture] = []
        with _LOCK:
            for fut, value, failed in done[start:start + _COMPLETE_CHUNK]:
                if type(fut) is ClientFuture and fut._finish(value, failed) and fut._callbacks_ is not None:
                    ready.append(fut)  # (other classes are completed below, by their own methods)
        for f in ready:
            try:
                f._invoke_callbacks()
            except BaseException as e:  # noqa: BLE001 - raised below, once every future is complete
                escaped = escaped or e
    for fut, value, failed in done:
        if type(fut) is not ClientFuture:
            try:
                if failed:
                    fail(fut, value)
                else:
                    succeed(fut, value)
            except BaseException as e:  # noqa: BLE001 - as above
                escaped = escaped or e
    if escaped is not None:
        raise escaped


def succeed(fut: Future, value: Any) -> None:
    """Complete ``fut`` with ``value`` unless it is already done: a caller may have cancelled it,
    and that must never hurt the thread that completes it."""
    try:
        fut.set_result(value)
    except InvalidStateError:
        pass


def fail(fut: Future, err: BaseException) -> None:
    """Complete ``fut`` with ``err`` unless it is already done (cancelled, or completed by a racing path)."""
    try:
        fut.set_exception(err)
    except InvalidStateError:
        pass
