"""The linearizability checker on hand-made histories whose answer is known."""
from __future__ import annotations

import random
import threading
import time

import pytest

from pyraft.checker import HistoryRecorder, Op, check_history

pytestmark = pytest.mark.timeout(60)


def op(client, kind, key, args, call, ret, result=None):
    return Op(client, kind, key, tuple(args), call, ret, result)


def put(c, k, v, t0, t1):
    return op(c, "put", k, (v,), t0, t1)


def get(c, k, r, t0, t1):
    return op(c, "get", k, (), t0, t1, r)


def cas(c, k, e, n, r, t0, t1):
    return op(c, "cas", k, (e, n), t0, t1, r)


def delete(c, k, r, t0, t1):
    return op(c, "delete", k, (), t0, t1, r)


def ok(h, **kw):
    res, info = check_history(h, **kw)
    return res


# ---------------------------------------------------------------------------------- basics

def test_an_empty_history_is_linearizable():
    assert ok([]) is True


def test_sequential_history_that_follows_the_model():
    h = [put(1, "x", 1, 0, 1), get(1, "x", 1, 2, 3), cas(1, "x", 1, 2, True, 4, 5), get(2, "x", 2, 6, 7),
         cas(2, "x", 1, 3, False, 8, 9), delete(1, "x", True, 10, 11), get(1, "x", None, 12, 13),
         delete(2, "x", False, 14, 15), cas(2, "x", None, 7, True, 16, 17), get(1, "x", 7, 18, 19)]
    assert ok(h) is True


def test_a_read_of_a_value_never_written_is_not_linearizable():
    assert ok([put(1, "x", 1, 0, 1), get(2, "x", 2, 2, 3)]) is False


def test_a_stale_read_after_a_completed_write_is_not_linearizable():
    # put(1) completes before get starts, so the get must see 1.
    h = [put(1, "x", 0, 0, 1), put(1, "x", 1, 2, 3), get(2, "x", 0, 4, 5)]
    res, info = check_history(h)
    assert res is False
    assert info["key"] == "x" and "not linearizable" in info["report"]


def test_reads_concurrent_with_a_write_may_see_either_value():
    h = [put(1, "x", 0, 0, 1), put(1, "x", 1, 2, 10), get(2, "x", 0, 3, 4), get(3, "x", 1, 5, 6)]
    assert ok(h) is True


def test_reads_cannot_go_back_in_time():
    # Once a reader saw the new value (and returned), a later read cannot see the old one.
    h = [put(1, "x", 0, 0, 1), put(1, "x", 1, 2, 10), get(2, "x", 1, 3, 4), get(3, "x", 0, 5, 6)]
    assert ok(h) is False


def test_two_successful_cas_from_the_same_value_is_not_linearizable():
    h = [put(0, "x", 0, 0, 1), cas(1, "x", 0, 1, True, 2, 5), cas(2, "x", 0, 2, True, 3, 6)]
    assert ok(h) is False


def test_concurrent_cas_one_wins_one_loses():
    h = [put(0, "x", 0, 0, 1), cas(1, "x", 0, 1, True, 2, 5), cas(2, "x", 0, 2, False, 3, 6),
         get(3, "x", 1, 7, 8)]
    assert ok(h) is True
    h[-1] = get(3, "x", 2, 7, 8)
    assert ok(h) is False


def test_a_failed_cas_needs_a_state_that_differs():
    assert ok([cas(1, "x", None, 1, False, 0, 1)]) is False  # absent: cas(None, ...) must succeed
    assert ok([cas(1, "x", None, 1, True, 0, 1), get(1, "x", 1, 2, 3)]) is True


def test_delete_result_reports_existence():
    assert ok([delete(1, "x", True, 0, 1)]) is False
    assert ok([put(1, "x", 1, 0, 1), delete(1, "x", True, 2, 3), delete(1, "x", False, 4, 5)]) is True


def test_keys_are_independent():
    # Each key alone is linearizable, so the whole is; a fault in one key is found.
    h = [put(1, "a", 1, 0, 10), put(2, "b", 1, 0, 10), get(3, "a", 1, 1, 2), get(3, "b", None, 1, 2)]
    assert ok(h) is True
    h.append(get(4, "b", None, 11, 12))
    res, info = check_history(h)
    assert res is False and info["key"] == "b"


def test_values_compare_by_content_lists_and_tuples_alike():
    h = [put(1, ("k", 1), [1, {"a": [2]}], 0, 1), get(2, ["k", 1], (1, {"a": (2,)}), 2, 3)]
    assert ok(h) is True


def test_touching_intervals_count_as_concurrent():
    # get returns at t=1 exactly when the put is called: either order is allowed.
    assert ok([get(1, "x", 5, 1, 2), put(2, "x", 5, 0, 1)]) is True


# ---------------------------------------------------------------------------------- indeterminate

def test_an_indeterminate_write_may_take_effect_later():
    # A put that timed out is seen by a read that starts long after the call.
    h = [put(1, "x", 0, 0, 1), put(2, "x", 1, 2, None), get(3, "x", 0, 3, 4), get(3, "x", 1, 100, 101)]
    assert ok(h) is True


def test_an_indeterminate_write_may_never_take_effect():
    h = [put(1, "x", 0, 0, 1), put(2, "x", 1, 2, None), get(3, "x", 0, 100, 101)]
    assert ok(h) is True


def test_an_indeterminate_write_cannot_take_effect_before_its_call():
    h = [put(1, "x", 0, 0, 1), get(3, "x", 1, 2, 3), put(2, "x", 1, 5, None)]
    assert ok(h) is False


def test_an_indeterminate_write_takes_effect_at_most_once():
    # It may explain one flip to 1, but not 1 -> 0 -> 1 with the 0 written before.
    h = [put(1, "x", 0, 0, 1), put(2, "x", 1, 2, None), get(3, "x", 1, 3, 4), put(1, "x", 0, 5, 6),
         get(3, "x", 1, 7, 8)]
    assert ok(h) is False


def test_an_indeterminate_cas_applies_only_if_the_state_matches():
    h = [put(1, "x", 0, 0, 1), cas(2, "x", 0, 1, None, 2, None), get(3, "x", 1, 3, 4)]
    assert ok(h) is True
    h = [put(1, "x", 5, 0, 1), cas(2, "x", 0, 1, None, 2, None), get(3, "x", 1, 3, 4)]
    assert ok(h) is False


def test_indeterminate_gets_are_ignored():
    h = [put(1, "x", 0, 0, 1), get(2, "x", None, 2, None), get(3, "x", 0, 3, 4)]
    assert ok(h) is True


# ---------------------------------------------------------------------------------- scale

def _simulate(n_clients: int, n_ops: int, keys: int, seed: int, lossy: bool):
    """A linearizable history from a real (locked) register with random timing and timeouts."""
    rng = random.Random(seed)
    store: dict = {}
    lock = threading.Lock()
    t = [0.0]
    ops = []
    pending = []  # (client, kind, key, args, call, effect time, result)
    for i in range(n_ops):
        c = rng.randrange(n_clients)
        k = f"k{rng.randrange(keys)}"
        kind = rng.choice(["put", "get", "cas", "cas", "delete"])
        call = t[0] + rng.random()
        effect = call + rng.random()
        t[0] = call
        if kind == "put":
            args = (rng.randrange(4),)
        elif kind == "cas":
            args = (rng.choice([None, 0, 1, 2, 3]), rng.randrange(4))
        else:
            args = ()
        pending.append((c, kind, k, args, call, effect))
    # Apply in effect order: that is the linearization.
    for c, kind, k, args, call, effect in sorted(pending, key=lambda p: p[5]):
        with lock:
            cur = store.get(k)
            if kind == "put":
                store[k] = args[0]; res = None
            elif kind == "get":
                res = cur
            elif kind == "delete":
                res = k in store; store.pop(k, None)
            else:
                m = cur is None if args[0] is None else cur == args[0]
                if m:
                    store[k] = args[1]
                res = m
        ret = effect + rng.random()
        if lossy and rng.random() < 0.1:
            ops.append(Op(c, kind, k, args, call, None, None))
        else:
            ops.append(Op(c, kind, k, args, call, ret, res))
    return ops


@pytest.mark.parametrize("seed", range(5))
def test_random_linearizable_histories_pass(seed):
    h = _simulate(8, 1500, 5, seed, lossy=seed % 2 == 1)
    res, info = check_history(h, timeout=30)
    assert res is True, info.get("report")


@pytest.mark.parametrize("seed", range(5))
def test_random_histories_with_one_corrupted_read_fail(seed):
    h = _simulate(6, 400, 3, seed, lossy=False)
    rng = random.Random(seed)
    # Find a get whose result can be changed to a value never written: a certain violation.
    gets = [i for i, o in enumerate(h) if o.op == "get"]
    i = rng.choice(gets)
    o = h[i]
    h[i] = Op(o.client, "get", o.key, (), o.call_time, o.return_time, 99)
    res, info = check_history(h, timeout=30)
    assert res is False and info["key"] == o.key


def test_many_concurrent_indeterminate_writes_stay_fast():
    # 40 timed-out puts to one key, all open to +infinity: the memo keeps the search small.
    h = [put(i, "x", i, i, None) for i in range(40)]
    h += [get(99, "x", 7, 100, 101), get(99, "x", 3, 102, 103), get(99, "x", 3, 104, 105)]
    t0 = time.monotonic()
    assert ok(h, timeout=20) is True
    assert time.monotonic() - t0 < 10


def test_timeout_gives_an_unknown_answer():
    h = _simulate(30, 3000, 1, 7, lossy=True)
    res, info = check_history(h, timeout=0.0)
    assert res is None and info["timed_out"]


# ---------------------------------------------------------------------------------- recorder

def test_recorder_marks_failed_writes_indeterminate():
    rec = HistoryRecorder(definite_failure=lambda e: isinstance(e, KeyError))
    rec.record(1, "put", "x", (1,), lambda: None)
    with pytest.raises(TimeoutError):
        rec.record(1, "put", "x", (2,), lambda: (_ for _ in ()).throw(TimeoutError()))
    with pytest.raises(KeyError):
        rec.record(1, "put", "x", (3,), lambda: (_ for _ in ()).throw(KeyError()))
    assert rec.record(2, "get", "x", (), lambda: 2) == 2
    h = rec.history()
    assert [o.args for o in h] == [(1,), (2,), ()]
    assert h[1].indeterminate and not h[0].indeterminate
    assert ok(h) is True


# ---------------------------------------------------------------------------------- against brute force

def _orders(ops, optional=lambda o: o.indeterminate):
    """Every subset of the optional ops with all the others, in every order that respects real time."""
    import itertools
    det = [o for o in ops if not optional(o)]
    ind = [o for o in ops if optional(o)]
    for r in range(len(ind) + 1):
        for chosen in itertools.combinations(ind, r):
            sel = det + list(chosen)
            for perm in itertools.permutations(sel):
                pos = {id(o): i for i, o in enumerate(perm)}
                if not any(a.return_time is not None and a.return_time < b.call_time and pos[id(a)] > pos[id(b)]
                           for a in sel for b in sel):
                    yield perm


def _brute_force(ops):
    """Every subset of the indeterminate ops, every order respecting real time: any that the model accepts?"""
    from pyraft.checker import _prepare, _step
    for perm in _orders(ops):
        state = None
        for o in perm:
            good, state = _step(state, _prepare(o))
            if not good:
                break
        else:
            return True
    return False


@pytest.mark.parametrize("seed", range(300))
def test_agrees_with_brute_force_on_small_random_histories(seed):
    rng = random.Random(seed)
    ops = []
    for i in range(rng.randint(1, 6)):
        kind = rng.choice(["put", "get", "cas", "delete"])
        t0 = rng.randrange(10)
        t1 = None if rng.random() < 0.3 else t0 + rng.randrange(1, 5)
        args = {"put": (rng.randrange(3),), "get": (), "delete": (),
                "cas": (rng.choice([None, 0, 1, 2]), rng.randrange(3))}[kind]
        res = {"put": None, "get": rng.choice([None, 0, 1, 2]), "delete": rng.choice([True, False]),
               "cas": rng.choice([True, False])}[kind]
        ops.append(Op(i, kind, "k", args, t0, t1, None if t1 is None else res))
    assert check_history(ops)[0] is _brute_force(ops), "\n".join(map(str, ops))


# ---------------------------------------------------------------------------------- ranges and txns

def rng_(c, key, result, t0, t1, end=None, prefix=False, limit=0):
    return op(c, "range", key, (end, prefix, limit), t0, t1, result)


def txn(c, compare, success, failure, result, t0, t1):
    return Op(c, "txn", None, (tuple(compare), tuple(success), tuple(failure)), t0, t1, result)


def test_a_range_sees_the_keys_in_it_in_key_order():
    h = [put(1, "a/2", 2, 0, 1), put(1, "a/1", 1, 2, 3), put(1, "b", 9, 4, 5),
         rng_(2, "a/", [("a/1", 1), ("a/2", 2)], 6, 7, prefix=True),
         rng_(2, "a/", [("a/1", 1)], 8, 9, prefix=True, limit=1),
         rng_(2, "a/1", [("a/1", 1), ("a/2", 2), ("b", 9)], 10, 11, end="c")]
    assert ok(h) is True


def test_a_range_missing_a_key_written_before_it_is_not_linearizable():
    h = [put(1, "a/1", 1, 0, 1), put(1, "a/2", 2, 2, 3), rng_(2, "a/", [("a/1", 1)], 4, 5, prefix=True)]
    res, info = check_history(h)
    assert res is False and set(info["key"]) == {"a/1", "a/2"}


def test_a_range_may_see_a_concurrent_write_or_not_but_in_one_order():
    h = [put(1, "x", 1, 0, 10), put(2, "y", 1, 0, 10),
         rng_(3, "", [("x", 1)], 1, 2, prefix=True), rng_(4, "", [("y", 1)], 1, 2, prefix=True)]
    # Each range alone is fine; together they say x before y and y before x.
    assert ok(h[:3]) is True and ok(h[:2] + h[3:]) is True
    assert ok(h) is False


def test_a_range_result_in_the_wrong_order_is_not_linearizable():
    h = [put(1, "a", 1, 0, 1), put(1, "b", 2, 2, 3), rng_(2, "", [("b", 2), ("a", 1)], 4, 5, prefix=True)]
    assert ok(h) is False


def test_a_range_over_keys_nobody_wrote_must_be_empty():
    assert ok([rng_(1, "q", [], 0, 1, prefix=True)]) is True
    assert ok([rng_(1, "q", [("q1", 5)], 0, 1, prefix=True)]) is False


def transfer_txn(c, frm, to, have_frm, have_to, amount, ok_, t0, t1, now_frm=None):
    """Move ``amount`` from key ``frm`` to ``to`` if their values are still those read (else get ``frm``)."""
    return txn(c, [(frm, "value", "==", have_frm), (to, "value", "==", have_to)],
               [("put", frm, have_frm - amount), ("put", to, have_to + amount)], [("get", frm)],
               None if t1 is None else (ok_, (None, None) if ok_ else (now_frm,)), t0, t1)


def test_txn_compares_and_branches():
    h = [put(1, "a", 10, 0, 1), put(1, "b", 0, 2, 3),
         transfer_txn(1, "a", "b", 10, 0, 3, True, 4, 5),
         transfer_txn(2, "a", "b", 10, 0, 3, False, 6, 7, now_frm=7),
         rng_(3, "", [("a", 7), ("b", 3)], 8, 9, prefix=True),
         txn(3, [("a", "version", "==", 2), ("zz", "version", "==", 0)], [("delete", "a"), ("get", "a")], [],
             (True, (True, None)), 10, 11),
         txn(3, [("a", "value", "!=", 1)], [], [("get", "b")], (False, (3,)), 12, 13)]
    assert ok(h) is True
    bad = h[:-1] + [txn(3, [("a", "value", "!=", 1)], [], [("get", "b")], (True, ()), 12, 13)]
    assert ok(bad) is False  # a compare on a missing key's value never holds


def test_a_range_that_sees_half_a_txn_is_not_linearizable():
    h = [put(1, "a", 10, 0, 1), put(1, "b", 0, 2, 3),
         transfer_txn(1, "a", "b", 10, 0, 3, True, 4, 10),
         rng_(2, "", [("a", 7), ("b", 0)], 5, 6, prefix=True)]
    assert ok(h) is False
    h[-1] = rng_(2, "", [("a", 7), ("b", 3)], 5, 6, prefix=True)
    assert ok(h) is True


def test_an_indeterminate_txn_may_apply_once_or_never():
    h = [put(1, "a", 10, 0, 1), put(1, "b", 0, 2, 3), transfer_txn(1, "a", "b", 10, 0, 3, None, 4, None)]
    assert ok(h + [rng_(2, "", [("a", 7), ("b", 3)], 5, 6, prefix=True)]) is True
    assert ok(h + [rng_(2, "", [("a", 10), ("b", 0)], 5, 6, prefix=True)]) is True
    assert ok(h + [rng_(2, "", [("a", 7), ("b", 0)], 5, 6, prefix=True)]) is False


def test_random_concurrent_transfers_keep_their_sum_and_pass():
    # A simulated store: txn transfers and ranges over three accounts, each op taking effect
    # at a random point of its interval; some replies lost (indeterminate).
    rng = random.Random(4)
    accounts = {"acct/a": 30, "acct/b": 30, "acct/c": 30}
    ops = [put(0, k, v, -3 + i, -2 + i) for i, (k, v) in enumerate(accounts.items())]
    pending = []
    for i in range(60):
        t0 = rng.uniform(0, 100)
        pending.append((i % 5 + 1, t0, t0 + rng.uniform(0.1, 4), rng.random()))
    for c, t0, t1, r in sorted(pending, key=lambda p: p[1] + (p[2] - p[1]) * p[3]):
        if r < 0.3:
            rows = sorted(accounts.items())
            ops.append(rng_(c, "acct/", rows, t0, t1, prefix=True))
            continue
        frm, to = rng.sample(sorted(accounts), 2)
        have_frm, have_to = accounts[frm], accounts[to]
        amount = rng.randrange(1, 5)
        accounts[frm] -= amount
        accounts[to] += amount
        lost = rng.random() < 0.1
        ops.append(transfer_txn(c, frm, to, have_frm, have_to, amount, True, t0, None if lost else t1))
    assert sum(accounts.values()) == 90
    res, info = check_history(ops, timeout=60)
    assert res is True, info.get("report")


def _brute_force_map(ops):
    """Every subset of the indeterminate writes in every real-time order, run on a plain dict model."""
    for perm in _orders([o for o in ops if not (o.indeterminate and o.op in ("get", "range"))]):
        store: dict = {}  # key -> [value, version]
        good = True
        for o in perm:
            if o.op == "put":
                store[o.key] = [o.args[0], store.get(o.key, [None, 0])[1] + 1]
            elif o.op == "get":
                good = o.result == store.get(o.key, [None])[0]
            elif o.op == "range":
                good = [tuple(x) for x in o.result] == [(k, v[0]) for k, v in sorted(store.items())]
            else:  # txn over plain values/versions
                compare, success, failure = o.args
                held = all(k in store and (store[k][0] == v) == (op_ == "==") if t == "value" else
                           (store.get(k, [None, 0])[1] == v) == (op_ == "==") for k, t, op_, v in compare)
                resp = []
                for x in (success if held else failure):
                    if x[0] == "put":
                        store[x[1]] = [x[2], store.get(x[1], [None, 0])[1] + 1]
                        resp.append(None)
                    else:
                        resp.append(store.get(x[1], [None])[0])
                if not o.indeterminate:
                    good = (held, tuple(resp)) == (o.result[0], tuple(o.result[1]))
            if not good:
                break
        if good:
            return True
    return False


@pytest.mark.parametrize("seed", range(200))
def test_map_model_agrees_with_brute_force_on_small_random_histories(seed):
    rng = random.Random(1000 + seed)
    ops = []
    keys = ["a", "b"]
    for i in range(rng.randint(1, 6)):
        kind = rng.choice(["put", "put", "get", "range", "txn", "txn"])
        t0 = rng.randrange(10)
        t1 = None if rng.random() < 0.3 else t0 + rng.randrange(1, 5)
        k = rng.choice(keys)
        if kind == "put":
            o = Op(i, "put", k, (rng.randrange(2),), t0, t1, None)
        elif kind == "get":
            o = Op(i, "get", k, (), t0, t1, None if t1 is None else rng.choice([None, 0, 1]))
        elif kind == "range":
            rows = [(kk, rng.randrange(2)) for kk in keys if rng.random() < 0.5]
            o = Op(i, "range", "", (None, True, 0), t0, t1, None if t1 is None else rows)
        else:
            compare = ((k, rng.choice(["value", "version"]), rng.choice(["==", "!="]), rng.randrange(3)),)
            other = rng.choice(keys)
            success = (("put", other, rng.randrange(2)),)
            failure = (("get", other),)
            held = rng.random() < 0.5
            res = (held, (None,) if held else (rng.choice([None, 0, 1]),))
            o = Op(i, "txn", None, (compare, success, failure), t0, t1, None if t1 is None else res)
        ops.append(o)
    assert check_history(ops)[0] is _brute_force_map(ops), "\n".join(map(str, ops))
