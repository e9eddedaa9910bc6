"""Watches, leases, txns and the no-fsync state machine on ``pyraft-kv serve`` processes, through SIGKILL.

- A watch stream is complete and in order across a SIGKILL of the leader.
- Leases: one kept alive survives the leader's SIGKILL; one not kept alive is
  expired by the new leader, which deletes exactly its keys.
- KVStateMachine commits without fsync: SIGKILL of every node at once loses no
  acknowledged write, and the replicas agree on every key's revisions after.
- The lock recipe through leader kills: its fencing tokens grow, two holders'
  certain holds never overlap, and a holder whose lease lapsed cannot write.
- (soak) a history of txns and ranges through kill rounds is linearizable.
"""
from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass

import pytest

from pyraft.checker import HistoryRecorder, check_history
from pyraft.errors import LeaseNotFound, Timeout
from pyraft.kv import KVClient, KVCommandError
from pyraft.kv.recipes import Lock

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


@dataclass(frozen=True)
class Hold:
    """One acquisition of the lock as its holder saw it; times are ``time.monotonic()``, the nodes' clock too."""
    who: int
    token: int
    start: float  # acquire() returned
    end: float  # the holder believed it held the lock until then (its last write, just before release())
    certain_until: float  # its KeepAlive's final ``expires``: no node revokes the lease before that
    held_at_start: bool  # ``lock.held`` right after acquire(): its lease was certainly alive then
    paused: bool  # it played a holder paused past its ttl

    @property
    def sure_end(self) -> float:
        """Its key is deleted only by its release (after ``end``) or its lease's expiry (after ``certain_until``)."""
        return min(self.end, self.certain_until)


#: Leader kills, and holds played as a holder paused past its ttl, in the lock test below.
LOCK_KILLS, LOCK_PAUSES = 3, 2


@pytest.mark.timeout(150)
def test_the_lock_fences_out_every_holder_but_the_newest_through_leader_kills(make_cluster):
    """Four contenders take the lock in turns, each making two fenced writes per hold, while the leader is
    SIGKILLed and restarted three times; on every other turn contender 0 plays a holder paused past its
    ttl (its keepalives stop) and writes once a successor has written.

    The claims checked are the recipe's (docs/kv.md), not "never two holders" in real time:
    1. A key goes only by its holder's release or its lease's expiry, which no node decides before the
       send time of the lease's last successful keepalive + ttl (``KeepAlive.expires``); a successor holds
       only after that delete.  So for tokens a < b, b's hold starts after a's certain hold ends
       (``sure_end``): two holds overlap only where the earlier one's lease could have lapsed.
    2. Fencing tokens strictly grow in the order acquire() returned (among holders whose lease was
       certainly alive then).
    3. A write guarded by ``lock.guard()`` is accepted exactly while the holder's key lives: the accepted
       fenced writes, in revision order, carry non-decreasing tokens; a paused holder's write after its
       successor's is refused; a holder whose lease is certainly alive is never refused.
    """
    c = make_cluster()
    c.start_all()
    c.wait_leader(20)
    holds: list[Hold] = []
    accepted: list[int] = []  # the tokens of acknowledged fenced writes
    paused_writes: list[bool | None] = []  # a paused holder's fenced write: succeeded? (None: timed out)
    gave_up: list[BaseException] = []
    errors: list = []
    stop = threading.Event()
    tags = itertools.count()

    def fenced_write(kv: KVClient, lock: Lock) -> bool | None:
        try:
            r = kv.txn(lock.guard(), [{"op": "put", "key": f"fenced/{lock.token:012d}/{next(tags)}",
                                       "value": lock.token}])
        except Timeout:
            return None  # may or may not have been applied: the range at the end sees it if it was
        if r.succeeded:
            accepted.append(lock.token)
        return r.succeeded

    def contender(who: int) -> None:
        try:
            with c.client(timeout=15) as kv:
                turn = 0
                while not stop.is_set():
                    lock = Lock(kv, "locks/job", ttl=TTL)
                    try:
                        token = lock.acquire(timeout=45)
                    except (LeaseNotFound, Timeout) as e:  # its lease lapsed while waiting, or no leader for long
                        gave_up.append(e)
                        continue
                    start = time.monotonic()
                    held_at_start = lock.held
                    lease = lock.lease
                    turn += 1
                    # Only while paused holds are still wanted: the others keep contending until then.
                    paused = who == 0 and turn % 2 == 0 and len(paused_writes) < LOCK_PAUSES
                    if paused:
                        lease.keepalive.stop()  # a GC pause or SIGSTOP: nothing keeps the lease alive now
                        wait_for(lambda: any(t > token for t in accepted), TTL + 40, "a successor's fenced write")
                        end = time.monotonic()
                        paused_writes.append(fenced_write(kv, lock))
                    else:
                        for _ in range(2):
                            if fenced_write(kv, lock) is False and lock.held:
                                errors.append(AssertionError(f"token {token}: a fenced write was refused while "
                                                             f"its lease was certainly alive"))
                        end = time.monotonic()
                    lock.release()
                    holds.append(Hold(who, token, start, end, lease.keepalive.expires, held_at_start, paused))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=contender, args=(w,), name=f"contender-{w}") for w in range(4)]
    for t in threads:
        t.start()
    try:
        for k in range(LOCK_KILLS):
            seen = len(holds)
            wait_for(lambda: len(holds) >= seen + 4 or errors, 60, f"four holds before kill {k + 1}")
            lead = c.wait_leader(20)
            c.kill(lead)
            c.wait_leader(20, among=[i for i in c.ids if i != lead])
            c.start(lead)
        seen = len(holds)
        wait_for(lambda: (len(holds) >= seen + 4 and len(paused_writes) >= LOCK_PAUSES) or errors, 90,
                 "four holds after the last restart, and the paused holds")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    tokens = {h.token for h in holds}
    assert len(tokens) == len(holds) >= 4 * (LOCK_KILLS + 1), (holds, gave_up)
    # 1. Holds overlap only after the earlier holder's lease could have lapsed.
    by_token = sorted(holds, key=lambda h: h.token)
    for a, b in itertools.combinations(by_token, 2):
        assert b.start >= a.sure_end, f"{b} began while {a} certainly held the lock"
    # 2. Tokens grow in acquisition order.
    sure = [h.token for h in sorted(holds, key=lambda h: h.start) if h.held_at_start]
    assert sure == sorted(sure) and len(sure) > len(holds) // 2, (sure, holds)
    # 3. Fenced writes: only the live holder's are accepted.
    assert paused_writes == [False] * LOCK_PAUSES, f"a paused holder's fenced write: {paused_writes}"
    with c.client(timeout=15) as kv:
        wait_for(lambda: kv.count("locks/job/", prefix=True) == 0, TTL + 20, "every contender's key to go")
        written = [x.value for x in sorted(kv.range("fenced/", prefix=True), key=lambda x: x.create_revision)]
    assert written == sorted(written), f"a fenced write was accepted after a newer holder's: {written}"
    assert set(accepted) <= set(written) <= tokens


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
