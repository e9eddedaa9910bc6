"""Three ``pyraft-kv serve`` processes with LMDB stores: elections, SIGKILL, restarts, pauses, CURVE.

Every acknowledged write must survive any crash of a minority; a concurrent
history of puts, gets and cas through leader kills and SIGSTOP pauses must be
linearizable (checked with :mod:`pyraft.checker`).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from pyraft.checker import HistoryRecorder, check_history
from pyraft.errors import RaftError, Timeout
from pyraft.kv import KVClient, KVCommandError

from procs import DISTINCT_HOSTS, applied, make_cluster, random_faults, wait_caught_up, wait_for  # noqa: F401

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.mark.parametrize("hosts", [None, DISTINCT_HOSTS], ids=["127.0.0.1", "distinct-loopbacks"])
def test_election_writes_leader_kill_restart_and_catch_up(make_cluster, hosts):
    c = make_cluster(hosts=hosts)
    c.start_all()
    lead = c.wait_leader(20)
    with c.client(timeout=10) as kv:
        for i in range(100):
            kv.put(f"a{i}", i)
        t0 = time.monotonic()
        c.kill(lead)
        survivors = [i for i in c.ids if i != lead]
        new = c.wait_leader(20, among=survivors)
        assert new != lead
        failover = time.monotonic() - t0
        assert failover < 10
        for i in range(100):
            kv.put(f"b{i}", i)
        assert all(kv.get(f"a{i}") == i and kv.get(f"b{i}") == i for i in range(100))
        # Restart without --init: the node catches up from the new leader.
        c.start(lead)
        wait_caught_up(c, c.ids)
        with KVClient({lead: c.addrs[lead]}, timeout=5) as one:
            assert one.get("b99", stale=True) == 99
            assert one.get("a0", stale=True) == 0
        assert c.status(lead, 5.0)["keys"] == 200
        # And it can lead again: kill the current leader, the cluster goes on.
        c.kill(new)
        c.wait_leader(20, among=[i for i in c.ids if i != new])
        kv.put("after", "two kills")
        assert kv.get("after") == "two kills"


def _writers(kv: KVClient, n: int, acked: dict, lock: threading.Lock, stop: threading.Event, errors: list):
    def run(t: int) -> None:
        i = 0
        while not stop.is_set():
            k = f"w{t}-{i}"
            try:
                kv.put(k, i)
            except Timeout:
                pass  # outcome unknown: not acknowledged, so not checked
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            else:
                with lock:
                    acked[k] = i
            i += 1

    threads = [threading.Thread(target=run, args=(t,), name=f"writer-{t}") for t in range(n)]
    for t in threads:
        t.start()
    return threads


def _random_kill_rounds(make_cluster, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    c = make_cluster()
    c.start_all()
    c.wait_leader(20)
    acked: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    errors: list = []
    with c.client(timeout=10) as kv:
        threads = _writers(kv, 4, acked, lock, stop, errors)
        try:
            for r in range(rounds):
                time.sleep(rng.uniform(0.3, 1.0))
                lead = c.leader()
                victim = lead if (lead is not None and rng.random() < 0.6) else rng.choice(c.ids)
                before = len(acked)
                c.kill(victim)
                time.sleep(rng.uniform(0.0, 0.8))
                c.start(victim)
                with lock:
                    print(f"round {r}: killed node {victim} (leader {lead}); acked {before} -> {len(acked)}")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors
        assert len(acked) > 100
        # Every acknowledged write is there, read linearizably...
        for k, v in acked.items():
            assert kv.get(k) == v, f"acknowledged write {k}={v} lost"
    # ...and every node converges on the same state.
    wait_caught_up(c, c.ids)

    def key_counts():  # None while a node is slow to answer (a busy machine), else {id: keys}
        s = {i: c.status(i, timeout=5) for i in c.ids}
        return None if None in s.values() else {i: v["keys"] for i, v in s.items()}

    counts = wait_for(key_counts, 30, "every node to answer kv.status")
    assert len(set(counts.values())) == 1 and counts[1] >= len(acked), counts


def test_random_sigkill_under_write_load_loses_no_acknowledged_write(make_cluster):
    _random_kill_rounds(make_cluster, rounds=4, seed=int(os.environ.get("PYRAFT_SEED", "1")))


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", range(5))
def test_soak_random_sigkill_rounds(make_cluster, seed):
    _random_kill_rounds(make_cluster, rounds=40, seed=seed)


def _record_history(c, stop: threading.Event, n_clients: int = 5, keys=("x", "y", "z")):
    """Client threads doing puts, gets and cas on a few keys until ``stop``; returns (recorder, threads, errors)."""
    rec = HistoryRecorder(definite_failure=lambda e: isinstance(e, KVCommandError))
    errors: list = []

    def client(cid: int) -> None:
        rng = random.Random(cid)
        with c.client(timeout=4) as kv:
            while not stop.is_set():
                k = rng.choice(keys)
                kind = rng.choice(["put", "get", "get", "cas"])
                try:
                    if kind == "put":
                        v = rng.randrange(6)
                        rec.record(cid, "put", k, (v,), lambda: kv.put(k, v))
                    elif kind == "get":
                        rec.record(cid, "get", k, (), lambda: kv.get(k))
                    else:
                        e, n = rng.choice([None, 0, 1, 2, 3, 4, 5]), rng.randrange(6)
                        rec.record(cid, "cas", k, (e, n), lambda: kv.cas(k, e, n))
                except Timeout:
                    pass
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
                    return

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(n_clients)]
    for t in threads:
        t.start()
    return rec, threads, errors


def _check(rec: HistoryRecorder, errors: list, min_ops: int = 100) -> None:
    assert not errors, errors
    h = rec.history()
    done = [o for o in h if not o.indeterminate]
    assert len(done) > min_ops, f"only {len(done)} operations completed"
    ok, info = check_history(h, timeout=120)
    print(f"{len(h)} operations ({len(h) - len(done)} indeterminate), {info.get('explored')} search steps")
    assert ok is True, info.get("report", info)


def test_concurrent_history_through_kills_and_pauses_is_linearizable(make_cluster):
    c = make_cluster()
    c.start_all()
    c.wait_leader(20)
    stop = threading.Event()
    rec, threads, errors = _record_history(c, stop)
    try:
        time.sleep(1.0)
        # 1. SIGKILL the leader, restart it.
        lead = c.wait_leader(20)
        c.kill(lead)
        c.wait_leader(20, among=[i for i in c.ids if i != lead])
        time.sleep(0.5)
        c.start(lead)
        time.sleep(0.5)
        # 2. Pause the leader (SIGSTOP) long enough for an election, then resume it: it
        #    must not serve stale reads or lose writes when it comes back as a deposed leader.
        lead = c.wait_leader(20)
        c.signal(lead, signal.SIGSTOP)
        c.wait_leader(20, among=[i for i in c.ids if i != lead])
        time.sleep(0.5)
        c.signal(lead, signal.SIGCONT)
        time.sleep(0.5)
        # 3. Pause a follower briefly.
        lead = c.wait_leader(20)
        f = next(i for i in c.ids if i != lead)
        c.signal(f, signal.SIGSTOP)
        time.sleep(0.8)
        c.signal(f, signal.SIGCONT)
        time.sleep(0.5)
        # 4. Kill the leader once more, without restarting it until the end.
        lead = c.wait_leader(20)
        c.kill(lead)
        time.sleep(1.5)
    finally:
        for i in c.ids:
            c.signal(i, signal.SIGCONT)
        stop.set()
        for t in threads:
            t.join(30)
    _check(rec, errors)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", range(3))
def test_soak_linearizable_through_random_kills_and_pauses(make_cluster, seed):
    rng = random.Random(seed)
    c = make_cluster()
    c.start_all()
    c.wait_leader(20)
    stop = threading.Event()
    rec, threads, errors = _record_history(c, stop, keys=("x", "y", "z", "w"))
    try:
        random_faults(c, rng, 90)
    finally:
        for i in c.ids:
            c.signal(i, signal.SIGCONT)
        stop.set()
        for t in threads:
            t.join(30)
    _check(rec, errors, min_ops=1000)


def test_curve_cluster_serves_allowed_clients_and_refuses_others(make_cluster):
    c = make_cluster(curve=True)
    c.start_all()
    c.wait_leader(20)
    with c.client(timeout=10) as kv:
        kv.put("secret", "s3")
        assert kv.get("secret") == "s3"
    # A client whose key is not in the allowed directory never gets through.
    intruder = c.make_keypair("intruder", allowed=False)
    with c.client(timeout=1.5, curve=c.client_curve(intruder)) as bad:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            bad.put("intruder", 1)
        with pytest.raises(Timeout):
            bad.get("secret")
        assert time.monotonic() - t0 < 1.5 * 2 + 1
    with c.client(timeout=10) as kv:
        assert kv.get("intruder") is None
        # A plain (non-CURVE) client gets nowhere either.
    with KVClient(list(c.addrs.values()), timeout=1.0) as plain:
        with pytest.raises(Timeout):
            plain.put("plain", 1)
    with c.client(timeout=10) as kv:
        assert kv.get("plain") is None
