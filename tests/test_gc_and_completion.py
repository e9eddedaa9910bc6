"""pyraft.tune_gc, and completing a batch of client futures at once (runtime.futures.complete_all)."""
from __future__ import annotations

import gc
import logging
import threading
from concurrent.futures import CancelledError, Future, wait

import pytest

import msgpack

import pyraft
from pyraft.codec import KEEP_PACKER_BELOW, _local, pack_fast
from pyraft.runtime import futures
from pyraft.runtime.futures import _COMPLETE_CHUNK, ClientFuture, complete_all

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def gc_restored():
    old = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*old)


def test_tune_gc_freezes_what_exists_and_raises_the_young_threshold(gc_restored):
    gc.unfreeze()
    before = gc.get_threshold()
    keep = [[i] for i in range(1000)]  # tracked objects alive at the call: frozen with the rest
    old = pyraft.tune_gc()
    assert old == before
    assert gc.get_threshold() == (pyraft.gctune.DEFAULT_YOUNG_THRESHOLD, before[1], before[2])
    assert gc.get_freeze_count() >= len(keep)
    # Collections still run and still free cycles made after the call.
    a: list = []
    a.append(a)
    del a
    assert gc.collect() >= 1


def test_tune_gc_without_freezing_and_with_its_own_threshold(gc_restored):
    gc.unfreeze()
    pyraft.tune_gc(10_000, freeze=False)
    assert gc.get_threshold()[0] == 10_000
    assert gc.get_freeze_count() == 0


def test_tune_gc_never_makes_the_collector_run_more_often(gc_restored):
    gc.set_threshold(200_000, 10, 10)
    assert pyraft.tune_gc(freeze=False) == (200_000, 10, 10)
    assert gc.get_threshold() == (200_000, 10, 10)  # a higher threshold is kept
    gc.set_threshold(0)  # the program switched the collector off: it stays off
    pyraft.tune_gc(freeze=False)
    assert gc.get_threshold()[0] == 0


@pytest.mark.parametrize("young, freeze, err", [
    (699, True, ValueError), (10_000_001, True, ValueError), (0, True, ValueError), (-1, True, ValueError),
    (5e4, True, TypeError), ("50000", True, TypeError), (True, True, TypeError), (None, True, TypeError),
    (50_000, 1, TypeError), (50_000, None, TypeError),
])
def test_tune_gc_refuses_bad_arguments_and_changes_nothing(gc_restored, young, freeze, err):
    before = gc.get_threshold()
    with pytest.raises(err, match="tune_gc"):
        pyraft.tune_gc(young, freeze=freeze)
    assert gc.get_threshold() == before


def test_complete_all_completes_results_and_exceptions_and_runs_callbacks_in_order():
    n = 3 * _COMPLETE_CHUNK + 7  # more than one chunk under the lock
    futs = [ClientFuture() for _ in range(n)]
    seen: list[int] = []
    for i, f in enumerate(futs):
        f.add_done_callback(lambda _f, i=i: seen.append(i))
    boom = ValueError("boom")
    complete_all([(f, boom if i % 5 == 0 else i, i % 5 == 0) for i, f in enumerate(futs)])
    assert seen == list(range(n))
    for i, f in enumerate(futs):
        assert f.done()
        if i % 5 == 0:
            assert f.exception() is boom
            with pytest.raises(ValueError):
                f.result()
        else:
            assert f.result() == i


def test_complete_all_leaves_a_cancelled_future_alone():
    a, b = ClientFuture(), ClientFuture()
    assert b.cancel()
    called = []
    b.add_done_callback(lambda f: called.append(f))  # runs at once: b is done
    complete_all([(a, 1, False), (b, 2, False)])
    assert a.result() == 1
    assert b.cancelled() and len(called) == 1
    with pytest.raises(CancelledError):
        b.result()


def _blocked_in_result(f: ClientFuture) -> bool:
    # The waiter makes the condition under _LOCK and waiting releases _LOCK: once we hold
    # _LOCK and the condition exists, the waiter is inside Condition.wait.
    with futures._LOCK:
        return f._cond_ is not None and f._cond_._cond is not None


def _blocked_in_wait(g: ClientFuture) -> bool:
    with futures._LOCK:
        return bool(g._waiters_)


def test_complete_all_wakes_waiters_and_concurrent_futures_wait():
    f, g = ClientFuture(), ClientFuture()
    got: list = []
    t = threading.Thread(target=lambda: got.append(f.result(timeout=30)))
    t.start()
    box: list = []
    w = threading.Thread(target=lambda: box.append(wait([g], timeout=30)))
    w.start()
    for _ in range(10_000):
        if _blocked_in_result(f) and _blocked_in_wait(g):
            break
        threading.Event().wait(0.001)
    assert _blocked_in_result(f) and _blocked_in_wait(g), "the waiters never blocked"
    complete_all([(f, "r", False), (g, "s", False)])
    t.join(30)
    w.join(30)
    assert got == ["r"]
    done, not_done = box[0]
    assert done == {g} and not not_done


def test_a_raising_callback_is_logged_and_the_others_still_run(caplog):
    futs = [ClientFuture() for _ in range(3)]
    ran = []
    futs[0].add_done_callback(lambda f: ran.append(0))
    futs[1].add_done_callback(lambda f: 1 / 0)
    futs[2].add_done_callback(lambda f: ran.append(2))
    with caplog.at_level(logging.ERROR):
        complete_all([(f, None, False) for f in futs])
    assert ran == [0, 2]
    assert "exception calling callback" in caplog.text


def test_a_callback_raising_systemexit_leaves_no_future_pending():
    n = _COMPLETE_CHUNK + 44
    futs = [ClientFuture() for _ in range(n)] + [Future()]
    ran: list[int] = []
    for i, f in enumerate(futs):
        if i == 0:
            f.add_done_callback(lambda _f: (_ for _ in ()).throw(SystemExit(3)))
        else:
            f.add_done_callback(lambda _f, i=i: ran.append(i))
    futs[-1].add_done_callback(lambda _f: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit):
        complete_all([(f, i, False) for i, f in enumerate(futs)])
    assert all(f.done() for f in futs)
    assert [f.result() for f in futs] == list(range(len(futs)))
    assert ran == list(range(1, len(futs)))  # every other callback ran, in order


def test_pack_fast_is_safe_when_packing_runs_code_that_packs():
    class Sneaky(dict):
        def items(self):
            pack_fast({"inner": [1, 2, 3]})  # the same thread packs again, half-way through
            return super().items()

    value = Sneaky(a={"x": 1, "y": [1, 2, 3]})
    assert pack_fast(value) == msgpack.packb(dict(value), use_bin_type=True)
    assert msgpack.unpackb(pack_fast(value)) == {"a": {"x": 1, "y": [1, 2, 3]}}


def test_pack_fast_does_not_keep_a_packer_grown_by_a_large_value():
    pack_fast(b"x")
    assert "packer" in _local.__dict__
    big = b"y" * KEEP_PACKER_BELOW
    assert pack_fast(big) == msgpack.packb(big, use_bin_type=True)
    assert "packer" not in _local.__dict__
    with pytest.raises(TypeError):
        pack_fast([object()])
    assert pack_fast([1, "a"]) == msgpack.packb([1, "a"], use_bin_type=True)


def test_plain_futures_are_completed_too():
    f, g, h = Future(), Future(), Future()
    assert h.cancel()
    complete_all([(f, 1, False), (g, KeyError("k"), True), (h, 3, False)])
    assert f.result() == 1
    assert isinstance(g.exception(), KeyError)
    assert h.cancelled()
