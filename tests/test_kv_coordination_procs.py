"""Watches, leases, txns and the no-fsync state machine on ``pyraft-kv serve`` processes, through SIGKILL.

- A watch stream is complete and in order across a SIGKILL of the leader.
- Leases: one kept alive survives the leader's SIGKILL; one not kept alive is
  expired by the new leader, which deletes exactly its keys.
- KVStateMachine commits without fsync: SIGKILL of every node at once loses no
  acknowledged write, and the replicas agree on every key's revisions after.
- (soak) a history of txns and ranges through kill rounds is linearizable.
"""
from __future__ import annotations

import random
import threading
import time

import pytest

from pyraft.checker import HistoryRecorder, check_history
from pyraft.errors import LeaseNotFound, Timeout
from pyraft.kv import KVClient, KVCommandError

from kvhistory import transfer_client
from procs import PROC_CONFIG, make_cluster, random_faults, wait_caught_up, wait_for  # noqa: F401

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

#: Three of PROC_CONFIG's longest election timeouts: the shortest lease these clusters grant.
TTL = 3 * PROC_CONFIG["election_timeout"][1]


def test_a_watch_stream_is_complete_and_in_order_across_a_leader_kill(make_cluster):
    c = make_cluster()
    c.start_all()
    lead = c.wait_leader(20)
    n = 400
    acked: list[int] = []
    errors: list = []
    with c.client(timeout=15) as kv, c.client(timeout=20) as wkv:
        kv.put("start", 0)
        w = wkv.watch("s/", prefix=True)
        got = []

        def watcher():
            try:
                for ev in w:
                    got.append(ev)
                    if len(got) == n:
                        return
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=watcher)
        t.start()
        for i in range(n):
            if i == n // 3:
                c.kill(lead)
            try:
                kv.put(f"s/{i % 10}", i)
            except Timeout:
                continue  # outcome unknown: then it must show up once or never
            acked.append(i)
        # Every write was retried until acknowledged or timed out; the stream must end with the last.
        t.join(60)
        w.close()
    assert not errors, errors
    assert not t.is_alive(), f"the watch saw only {len(got)} of {n} events"
    values = [e.value for e in got]
    revisions = [e.revision for e in got]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions), "repeated or out of order"
    assert values == sorted(values) and len(set(values)) == len(values)
    assert set(acked) <= set(values), f"lost: {sorted(set(acked) - set(values))[:10]}"
    assert [e.key for e in got] == [f"s/{v % 10}" for v in values]


def test_leases_across_a_leader_kill(make_cluster):
    c = make_cluster()
    c.start_all()
    lead = c.wait_leader(20)
    with c.client(timeout=10) as kv:
        kept = kv.lease(TTL)
        doomed = kv.lease_grant(TTL)
        kv.put("kept", 1, lease=kept.id)
        for i in range(3):
            kv.put(f"doomed/{i}", i, lease=doomed)
        kv.put("plain", 1)
        c.kill(lead)
        new = c.wait_leader(20, among=[i for i in c.ids if i != lead])
        # The new leader restarts every deadline at its take-over, keeps the kept lease alive
        # through its keepalives, and expires the other one: its keys go, at one revision.
        wait_for(lambda: kv.count("doomed/", prefix=True) == 0, TTL + 15, "the doomed lease to expire")
        with pytest.raises(LeaseNotFound):
            kv.lease_keepalive(doomed)
        time.sleep(TTL)
        assert kv.get("kept") == 1 and kv.get("plain") == 1
        assert kept.alive and c.leader() == new
        c.start(lead)
        kept.revoke()
        assert kv.get("kept") is None


def test_sigkill_of_every_node_at_once_loses_no_acknowledged_write(make_cluster):
    """The state machine does not fsync what it applies; the log does.  Kill -9 everything, restart:
    every acknowledged write is there, and every replica has the same revisions."""
    c = make_cluster(config={**PROC_CONFIG, "snapshot_every": 300})
    c.start_all()
    c.wait_leader(20)
    acked: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    errors: list = []
    with c.client(timeout=10) as kv:
        def writer(t: int) -> None:
            i = 0
            while not stop.is_set():
                k = f"w{t}-{i % 50}"
                try:
                    kv.put(k, i)
                except Timeout:
                    pass
                except BaseException as e:  # noqa: BLE001 - the cluster going away mid-call
                    if not stop.is_set():
                        errors.append(e)
                    return
                else:
                    with lock:
                        acked[k] = i
                i += 1

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        time.sleep(2.5)
        with lock:
            snapshot_of_acked = dict(acked)
            for i in c.ids:  # all at once, while writes are in flight
                c.procs[i].kill()
        stop.set()
        for t in threads:
            t.join(30)
        for i in c.ids:
            c.procs[i].wait(10)
    assert not errors, errors
    assert len(snapshot_of_acked) > 50
    for i in c.ids:
        c.start(i, wait=False)
    for i in c.ids:
        c.wait_ready(i)
    c.wait_leader(30)
    with c.client(timeout=10) as kv:
        for k, v in snapshot_of_acked.items():
            got = kv.get(k)
            assert got is not None and got >= v, f"acknowledged {k}={v} lost (now {got})"
        kv.put("after", 1)
    wait_caught_up(c, c.ids)
    views = []
    for i in c.ids:
        with KVClient({i: c.addrs[i]}, timeout=5) as one:
            views.append([(x.key, x.value, x.create_revision, x.mod_revision, x.version)
                          for x in one.range("", prefix=True, stale=True)])
    assert views[0] == views[1] == views[2]


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", range(3))
def test_soak_txn_and_range_history_through_kill_rounds_is_linearizable(make_cluster, seed):
    rng = random.Random(seed)
    c = make_cluster()
    c.start_all()
    c.wait_leader(20)
    accounts = [f"acct/{x}" for x in "abc"]
    rec = HistoryRecorder(definite_failure=lambda e: isinstance(e, KVCommandError))
    stop = threading.Event()
    errors: list = []
    with c.client(timeout=10) as kv:
        for a in accounts:
            rec.record("init", "put", a, (50,), lambda a=a: kv.put(a, 50))

    def client(cid: int) -> None:
        with c.client(timeout=4) as kv:
            transfer_client(kv, rec, cid, accounts, stop, errors)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        random_faults(c, rng, 60, pauses=False)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    ok, info = check_history(rec.history(), timeout=300)
    assert ok is True, info.get("report", info)
    with c.client(timeout=10) as kv:
        assert sum(x.value for x in kv.range("acct/", prefix=True)) == 150
