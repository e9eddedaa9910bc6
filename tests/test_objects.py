"""Replicated objects (pyraft.objects) on in-process three-node clusters over MemoryNetwork.

Every node has its own ObjectStateMachine and its own instances of the
objects; calls are made on all nodes.  Each test waits on conditions with
deadlines; the only sleeps are pacing inside worker loops.
"""
from __future__ import annotations

import io
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import pytest

from pyraft import Config, Node, Raft, ServerState
from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import CodecError, ForwardToLeader, RaftError, ShutDown, Timeout
from pyraft.objects import (NotAttached, ObjectStateMachine, ReplCounter, ReplDict, ReplicatedObject, ReplList,
                            ReplLockManager, ReplQueue, ReplSet, VersionMismatch, replicated)
from pyraft.objects import _values
from pyraft.stores.lmdb import LmdbLogStore
from pyraft.stores.memory import MemoryLogStore
from pyraft.transports.memory import MemoryNetwork
from pyraft.types import Entry, EntryKind, LogId, Membership, StoredMembership

from memcluster import pyraft_threads, wait_until

pytestmark = pytest.mark.timeout(120)

# Generous for 2-core CI boxes where a node thread may wait 100+ ms for the GIL.
CFG = Config(heartbeat_interval=0.03, election_timeout=(0.25, 0.5), rpc_timeout=0.5)
T = 10.0  # per-call timeout in tests


class ObjCluster:
    """Nodes 1..n on one MemoryNetwork; ``factory(node_id)`` makes that node's objects (a tuple)."""

    def __init__(self, factory: Callable[[int], tuple], n: int = 3, config: Config = CFG,
                 paths: dict[int, Any] | None = None, clocks: dict[int, Callable[[], float]] | None = None,
                 lmdb_log: bool = False, init: bool = True) -> None:
        self.factory = factory
        self.config = config
        self.paths = paths or {}
        self.clocks = clocks or {}
        self.lmdb_log = lmdb_log
        self.net = MemoryNetwork()
        self.ids = list(range(1, n + 1))
        self.logs: dict[int, Any] = {}
        self.sms: dict[int, ObjectStateMachine] = {}
        self.objs: dict[int, tuple] = {}
        self.rafts: dict[int, Raft] = {}
        for i in self.ids:
            self.start(i)
        if init:
            self.rafts[1].initialize({i: Node(f"mem://{i}") for i in self.ids})
            for r in self.rafts.values():
                r.wait(10).voter_ids(self.ids)
            self.wait_announced()

    def wait_announced(self) -> None:
        """Wait until every running node has applied every running node's version announcement."""
        for i in self.rafts:
            wait_until(lambda i=i: set(self.sms[i].cluster_versions()) >= set(self.rafts), 10,
                       f"node {i} to see every node's versions")

    def start(self, i: int, objs: tuple | None = None, fresh_sm: bool = False) -> Raft:
        """Start node ``i``: over its previous stores and state machine if it ran before (a restart)."""
        if i not in self.logs:
            self.logs[i] = LmdbLogStore(self.paths[i]) if self.lmdb_log else MemoryLogStore()
        if i not in self.sms or fresh_sm or objs is not None:
            if i in self.sms:
                self.sms[i].close()
            self.objs[i] = objs if objs is not None else self.factory(i)
            self.sms[i] = ObjectStateMachine(*self.objs[i], path=self.paths.get(i),
                                             **({"clock": self.clocks[i]} if i in self.clocks else {}))
        r = Raft(i, self.config, self.net.transport(i), self.logs[i], self.sms[i])
        self.sms[i].attach(r)
        self.rafts[i] = r
        return r

    def stop(self, i: int) -> None:
        self.rafts.pop(i).shutdown()

    def kill(self, i: int) -> None:
        """Stop node ``i`` and close its stores (an LMDB node then restarts from disk)."""
        self.stop(i)
        self.sms.pop(i).close()
        self.objs.pop(i)
        if self.lmdb_log:
            self.logs.pop(i).close()

    def leader(self, timeout: float = 10.0) -> Raft:
        def one():
            found = [r for r in self.rafts.values() if r.metrics().state == ServerState.LEADER]
            return found[0] if len(found) == 1 else None
        return wait_until(one, timeout, "exactly one leader")

    def sync_all(self) -> None:
        for i in self.rafts:
            self.objs[i][0].sync(timeout=T)

    def close(self) -> None:
        for r in list(self.rafts.values()):
            r.shutdown()
        self.rafts.clear()
        for sm in self.sms.values():
            sm.close()
        if self.lmdb_log:
            for s in self.logs.values():
                s.close()
        self.net.close()

    def __enter__(self) -> "ObjCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_threads(fns: list[Callable[[], None]], timeout: float = 60.0) -> None:
    errors: list[BaseException] = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread did not finish"
    if errors:
        raise errors[0]


def call_id(fut: Future) -> tuple[bytes, int]:
    return fut._pyraft_call  # set by the dispatcher for tests and debugging


def applied_calls(c: ObjCluster, node: int) -> list[tuple[LogId, dict]]:
    """The call commands in node ``node``'s log, in order, first copy of each (client, seq) only."""
    store = c.logs[node]
    last = store.log_state().last_log_id
    seen: set = set()
    out = []
    for e in store.read(1, (last.index if last else 0) + 1):
        p = e.payload
        if e.kind == EntryKind.NORMAL and isinstance(p, dict) and p.get("k") == "call":
            key = (p["c"], p["s"])
            if key not in seen:
                seen.add(key)
                out.append((e.log_id, p))
    return out


# ---------------------------------------------------------------------------
# Plain Python models: the same method names on plain containers.

class Model:
    def __init__(self) -> None:
        self.counter = 0
        self.dict: dict = {}
        self.list: list = []
        self.set: set = set()
        self.queue: deque = deque()

    def run(self, obj: str, method: str, args: list, kwargs: dict) -> Any:
        if obj == "ReplCounter":
            if method == "inc":
                self.counter += 1
            elif method == "add":
                self.counter += args[0]
            elif method == "set":
                self.counter = args[0]
            return self.counter
        if obj == "ReplDict":
            d = self.dict
            return {"set": lambda k, v: d.__setitem__(k, v), "pop": lambda k, default=None: d.pop(k, default),
                    "update": lambda o: d.update(o), "setdefault": lambda k, v=None: d.setdefault(k, v)}[method](
                *args, **kwargs)
        if obj == "ReplList":
            lst = self.list
            if method == "append":
                lst.append(args[0])
                return len(lst)
            if method == "extend":
                lst.extend(args[0])
                return len(lst)
            if method == "insert":
                return lst.insert(*args)
            if method == "pop":
                return lst.pop(*args)
        if obj == "ReplSet":
            s = self.set
            if method == "add":
                was = args[0] in s
                s.add(args[0])
                return not was
            if method == "discard":
                was = args[0] in s
                s.discard(args[0])
                return was
        if obj == "ReplQueue":
            if method == "put":
                self.queue.append(args[0])
                return True
            if method == "get":
                return self.queue.popleft() if self.queue else None
        raise AssertionError(f"no model for {obj}.{method}")


def all_structures(i: int) -> tuple:
    return ReplCounter(), ReplDict(), ReplList(), ReplSet(), ReplQueue()


# ---------------------------------------------------------------------------
# Structures against plain Python models

def test_every_structure_matches_a_plain_python_model_under_concurrent_calls_from_all_nodes():
    with ObjCluster(all_structures) as c:
        futures: list[tuple[int, Future]] = []  # (node, future) in submission order per thread
        lock = threading.Lock()

        def worker(node: int, t: int):
            counter, d, lst, s, q = c.objs[node]
            rnd = random.Random(node * 100 + t)
            mine: list[tuple[int, Future]] = []
            for k in range(60):
                op = rnd.randrange(9)
                key = (node, rnd.randrange(5))  # tuple keys survive the log
                if op == 0:
                    f = counter.inc.future(timeout=T)
                elif op == 1:
                    f = counter.add.future(rnd.randrange(-3, 4), timeout=T)
                elif op == 2:
                    f = d.set.future(key, {"n": k, "tags": {node, t}}, timeout=T)
                elif op == 3:
                    f = d.pop.future(key, "absent", timeout=T)
                elif op == 4:
                    f = lst.append.future([node, t, k], timeout=T)
                elif op == 5:
                    f = lst.pop.future(0, timeout=T) if k % 4 == 0 else lst.insert.future(0, (node, k), timeout=T)
                elif op == 6:
                    f = s.add.future(rnd.randrange(10), timeout=T)
                elif op == 7:
                    f = s.discard.future(rnd.randrange(10), timeout=T)
                else:
                    f = q.put.future(f"{node}-{t}-{k}", timeout=T) if rnd.random() < 0.6 else q.get.future(timeout=T)
                mine.append((node, f))
                if k % 10 == 9:  # keep some calls outstanding, wait for others
                    for _n, f2 in mine[-10:]:
                        f2.exception(T + 5)
            with lock:
                futures.extend(mine)

        run_threads([lambda n=n, t=t: worker(n, t) for n in c.ids for t in range(2)])
        c.sync_all()

        # Replay the leader's log through the plain models: every result any node saw must
        # equal the model's result at that log position, and every node's final state the model's.
        model = Model()
        expected: dict[tuple[bytes, int], Any] = {}
        for _lid, cmd in applied_calls(c, c.leader().node_id):
            args, kwargs = _values.loads(cmd["a"])
            try:
                expected[(cmd["c"], cmd["s"])] = ("ok", model.run(cmd["o"], cmd["m"], args, kwargs))
            except Exception as e:  # noqa: BLE001 - e.g. pop from an empty list
                expected[(cmd["c"], cmd["s"])] = ("err", type(e))
        assert len(futures) == 6 * 60
        for _node, f in futures:
            exp = expected[call_id(f)]
            if exp[0] == "ok":
                assert f.result() == exp[1]
            else:
                assert isinstance(f.exception(), exp[1])
        for i in c.ids:
            counter, d, lst, s, q = c.objs[i]
            assert counter.get() == model.counter
            assert d.to_dict() == model.dict
            assert lst.to_list() == model.list
            assert s.to_set() == model.set
            assert q.to_list() == list(model.queue)


def test_call_on_a_follower_returns_the_result_and_the_follower_sees_it_locally():
    with ObjCluster(lambda i: (ReplCounter(), ReplDict())) as c:
        leader = c.leader()
        f = next(i for i in c.ids if i != leader.node_id)
        counter, d = c.objs[f]
        assert counter.inc(timeout=T) == 1
        assert counter.get() == 1  # applied here before the call returned
        d.set("k", ("tuple", {1, 2}), timeout=T)
        assert d.get("k") == ("tuple", {1, 2})
        fut = counter.add.future(41, timeout=T)
        assert isinstance(fut, Future) and fut.result(T) == 42
        # a method's own exception is raised on the calling node, and the node keeps going
        c.objs[f][0].set(0, timeout=T)
        with pytest.raises(TypeError):
            c.objs[f][0].add("x", timeout=T)  # int += str in the method body
        assert c.objs[leader.node_id][0].inc(timeout=T) == 1


class Account(ReplicatedObject):
    __replicated_state__ = ("balance", "journal")

    def __init__(self) -> None:
        super().__init__()
        self.balance = 0
        self.journal: list = []

    @replicated
    def note(self, what):
        self.journal.append((what, self.log_id().index, self.log_time()))

    @replicated
    def deposit(self, n):
        if n <= 0:
            raise ValueError("deposit a positive amount")
        self.balance += n
        self.note(("deposit", n))  # a replicated method called while applied: part of this call
        return self.balance


def test_a_replicated_method_may_call_another_and_methods_see_log_id_and_time():
    with ObjCluster(lambda i: (Account(),)) as c:
        c.leader()
        assert c.objs[2][0].deposit(5, timeout=T) == 5
        with pytest.raises(ValueError):
            c.objs[3][0].deposit(-1, timeout=T)
        c.sync_all()
        journals = [c.objs[i][0].journal for i in c.ids]
        assert journals[0] == journals[1] == journals[2] and len(journals[0]) == 1
        (what, index, t), = journals[0]
        assert what == ("deposit", 5) and index > 0 and abs(t - time.time()) < 60


def test_sync_makes_a_follower_read_linearizable():
    with ObjCluster(lambda i: (ReplCounter(),)) as c:
        leader = c.leader()
        followers = [i for i in c.ids if i != leader.node_id]
        # A follower that lags (its replies are delayed) still reads the latest value after sync().
        c.net.set_one_way(leader.node_id, followers[0], blocked=True)
        for _ in range(5):
            c.objs[followers[1]][0].inc(timeout=T)
        c.net.heal()
        lid = c.objs[followers[0]][0].sync(timeout=T)
        assert c.objs[followers[0]][0].get() == 5
        assert c.sms[followers[0]].applied_state()[0].index >= lid.index


def test_duplicate_proposals_of_one_call_apply_once():
    with ObjCluster(lambda i: (ReplList(),)) as c:
        leader = c.leader()
        f = next(i for i in c.ids if i != leader.node_id)
        lst = c.objs[f][0]
        lst.append("warm-up", timeout=T)
        requests: list = []

        def lose_answers(direction, peer, msg):
            if direction == "request" and isinstance(msg, ClientRequest) and msg.op == "objects.call":
                requests.append((msg.body["c"], msg.body["s"]))
            return direction == "reply" and peer == f and isinstance(msg, ClientResponse)

        # The leader applies node f's call but its answer is lost, and f cannot apply the entry
        # itself (its state machine is held): after try_timeout f sends the same call again.
        leader.transport.set_fault_filter(lose_answers)
        with lst.locked():
            fut = lst.append.future("once", timeout=T)
            wait_until(lambda: len(requests) >= 2, T, "node f to send its call again")
            assert len(set(requests)) == 1  # the same call (same client and seq), twice
            c.objs[leader.node_id][0].sync(timeout=T)
        leader.transport.set_fault_filter(None)
        assert fut.result(T) == 2
        c.sync_all()
        for i in c.ids:
            assert c.objs[i][0].to_list() == ["warm-up", "once"]
        store = c.logs[leader.node_id]
        copies = [e for e in store.read(1, store.log_state().last_log_id.index + 1)
                  if isinstance(e.payload, dict) and e.payload.get("k") == "call"
                  and _values.loads(e.payload["a"]) == [["once"], {}]]
        assert len(copies) >= 2  # several copies in the log; the call ran once


def test_a_repeated_call_in_the_log_runs_once_and_repeats_its_recorded_outcome():
    lst = ReplList()
    sm = ObjectStateMachine(lst)

    def call(method, args, seq, floor):
        return dict(_cmd("ReplList", method, args, seq, 1000.0), f=floor)

    entries = [call("append", ["x"], 1, 1), call("append", ["x"], 1, 1),  # a call and its re-sent copy
               call("pop", [5], 2, 1), call("pop", [5], 2, 2),            # it raised: the copy raises the same
               call("append", ["y"], 3, 3), call("append", ["x"], 1, 1)]  # a copy below the floor: nothing
    results = sm.apply([Entry(LogId(1, i), EntryKind.NORMAL, p) for i, p in enumerate(entries, start=1)])
    assert results[:2] == [1, 1] and results[4] == 2
    assert isinstance(results[2], IndexError) and isinstance(results[3], IndexError)
    assert results[2].pyraft_log_id == LogId(1, 3)  # applied outcomes carry their log id
    assert isinstance(results[5], RaftError) and "already completed" in str(results[5])
    assert lst.to_list() == ["x", "y"]


def test_a_call_times_out_without_a_quorum_and_applies_at_most_once_later():
    with ObjCluster(lambda i: (ReplList(),)) as c:
        leader = c.leader()
        lst = c.objs[leader.node_id][0]
        lst.append("a", timeout=T)
        c.net.isolate(leader.node_id)
        with pytest.raises(Timeout):
            lst.append("maybe", timeout=0.5)
        c.net.heal()
        wait_until(lambda: c.leader(), 10, "a leader")
        for i in c.ids:
            wait_until(lambda i=i: _try(lambda: c.objs[i][0].append(f"after-{i}", timeout=2)), 30,
                       f"node {i} to append")
        c.sync_all()
        final = c.objs[1][0].to_list()
        assert final.count("maybe") <= 1 and final.count("a") == 1
        assert all(c.objs[i][0].to_list() == final for i in c.ids)


def _try(fn: Callable[[], Any]) -> bool:
    try:
        fn()
        return True
    except (Timeout, ForwardToLeader, ShutDown):
        return False


def test_leader_shutdown_mid_call_each_call_raises_or_completes_and_applies_at_most_once():
    with ObjCluster(lambda i: (ReplList(),), config=CFG) as c:
        old = c.leader()
        outcomes: dict[str, str] = {}
        lock = threading.Lock()
        go = threading.Event()
        half = threading.Event()

        def worker(node: int, t: int):
            lst = c.objs[node][0]
            futs = []
            for k in range(40):
                token = f"{node}.{t}.{k}"
                try:
                    futs.append((token, lst.append.future(token, timeout=T)))
                except RaftError:
                    with lock:
                        outcomes[token] = "refused"
                if k == 10:
                    half.set()
                    go.wait(T)
            for token, f in futs:
                e = f.exception(T + 5)
                with lock:
                    outcomes[token] = "ok" if e is None else type(e).__name__

        threads = [threading.Thread(target=worker, args=(n, t)) for n in c.ids for t in range(2)]
        for th in threads:
            th.start()
        assert half.wait(T)
        c.stop(old.node_id)  # the leader dies with calls in flight everywhere
        go.set()
        for th in threads:
            th.join(60)
        survivors = [i for i in c.ids if i != old.node_id]
        c.leader()
        for i in survivors:
            c.objs[i][0].sync(timeout=T)
        final = c.objs[survivors[0]][0].to_list()
        assert c.objs[survivors[1]][0].to_list() == final
        assert len(final) == len(set(final)), "a call was applied twice"
        assert len(outcomes) == 6 * 40
        for token, how in outcomes.items():
            if how == "ok":
                assert token in final  # completed => applied (exactly once)
            else:
                assert how in ("ShutDown", "Timeout", "refused"), how
        # calls from the survivors all completed through the new leader
        assert all(how == "ok" for token, how in outcomes.items() if int(token.split(".")[0]) in survivors)


# ---------------------------------------------------------------------------
# Persistence and snapshots

def test_restart_from_lmdb_restores_every_object_without_replaying_the_log(tmp_path):
    paths = {i: tmp_path / f"n{i}" for i in (1, 2, 3)}
    with ObjCluster(all_structures, paths=paths, lmdb_log=True) as c:
        for i in c.ids:
            counter, d, lst, s, q = c.objs[i]
            counter.add(10, timeout=T)
            d.set(("k", i), {i}, timeout=T)
            lst.append(i, timeout=T)
            s.add(i, timeout=T)
            q.put(i, timeout=T)
        c.sync_all()
        before = {i: (c.sms[i].applied_state()[0], [o.get_state() for o in c.objs[i]]) for i in c.ids}
        for i in list(c.ids):
            c.kill(i)
        # Reopened state machines have the objects back at construction, before any Raft runs.
        for i in c.ids:
            objs = all_structures(i)
            sm = ObjectStateMachine(*objs, path=paths[i])
            assert sm.applied_state()[0] == before[i][0]
            assert [o.get_state() for o in objs] == before[i][1]
            assert objs[0].get() == 30 and objs[1].get(("k", 2)) == {2}
            sm.close()
        for i in c.ids:
            c.start(i)
        c.leader()
        assert c.objs[2][0].inc(timeout=T) == 31
        c.sync_all()
        assert all(c.objs[i][0].get() == 31 for i in c.ids)
        assert c.objs[3][4].get(timeout=T) == 1  # the queue kept its order


def test_lagging_node_catches_up_from_a_snapshot(tmp_path):
    for paths in ({}, {i: tmp_path / f"n{i}" for i in (1, 2, 3)}):
        cfg = Config(heartbeat_interval=0.03, election_timeout=(0.25, 0.5), rpc_timeout=0.5,
                     max_in_snapshot_log_to_keep=0)
        with ObjCluster(lambda i: (ReplCounter(), ReplDict(), ReplLockManager(auto_unlock=60)), config=cfg,
                        paths=paths) as c:
            leader = c.leader()
            lagging = next(i for i in c.ids if i != leader.node_id)
            c.net.isolate(lagging)
            me = leader.node_id
            for k in range(30):
                c.objs[me][0].inc(timeout=T)
                c.objs[me][1].set(k, (k, "v"), timeout=T)
            c.objs[me][2].try_acquire("L", "holder", timeout=T)
            leader.trigger.snapshot()
            leader.wait(T).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= m.last_applied.index,
                                   "a snapshot of everything applied")
            snap = leader.metrics().snapshot.index
            leader.trigger.purge_log(snap)  # done once no stream to the isolated node is in flight
            leader.wait(T).metrics(lambda m: m.purged is not None and m.purged.index >= snap, "the purge")
            c.net.heal()
            c.objs[lagging][0].sync(timeout=T)
            assert c.sms[lagging].current_snapshot() is not None  # it came by snapshot, not by entries
            assert c.objs[lagging][0].get() == 30
            assert c.objs[lagging][1].to_dict() == {k: (k, "v") for k in range(30)}
            assert c.objs[lagging][2].holder("L") == "holder"
            assert c.objs[lagging][2].try_acquire("L", "other", timeout=T) is False
            assert c.objs[lagging][0].inc(timeout=T) == 31


def test_snapshot_is_consistent_while_applying_goes_on_and_installs_atomically():
    objs = (ReplCounter(), ReplList())
    sm = ObjectStateMachine(*objs)
    stop = threading.Event()
    idx = [0]

    def applier():
        while not stop.is_set():
            idx[0] += 1
            sm.apply([Entry(LogId(1, idx[0]), EntryKind.NORMAL,
                            _cmd("ReplCounter", "inc", [], idx[0], 1000.0))])
            idx[0] += 1
            sm.apply([Entry(LogId(1, idx[0]), EntryKind.NORMAL,
                            _cmd("ReplList", "append", [idx[0] - 1], idx[0], 1000.0))])

    th = threading.Thread(target=applier)
    th.start()
    try:
        metas = []
        for _ in range(20):
            metas.append(sm.build_snapshot())
    finally:
        stop.set()
        th.join()
    # every snapshot is one consistent cut: counter == number of inc entries <= its index
    for _ in range(3):
        meta, f = sm.open_snapshot()
        other = (ReplCounter(), ReplList())
        osm = ObjectStateMachine(*other)
        recv = osm.begin_receiving_snapshot()
        recv.write(f.read())
        f.close()
        osm.install_snapshot(meta, recv)
        n = meta.last_log_id.index
        assert other[0].get() == (n + 1) // 2
        assert other[1].to_list() == list(range(1, n - n % 2, 2))
        assert osm.applied_state()[0] == meta.last_log_id
    # a corrupt stream is refused and changes nothing
    meta, f = sm.open_snapshot()
    blob = bytearray(f.read())
    blob[len(blob) // 2] ^= 0xFF
    before = other[0].get()
    with pytest.raises(CodecError):
        osm.install_snapshot(meta, io.BytesIO(bytes(blob)))
    assert other[0].get() == before


# ---------------------------------------------------------------------------
# Versions and rolling upgrades

class CounterV0(ReplicatedObject):
    __replicated_state__ = ("value",)

    def __init__(self) -> None:
        super().__init__(name="counter")
        self.value = 0

    @replicated
    def add(self, n):
        self.value += n
        return self.value

    @replicated
    def reset(self):
        self.value = 0


class CounterV1Only(CounterV0):
    @replicated(ver=1)
    def add(self, n):  # new behaviour: adds twice n
        self.value += 2 * n
        return self.value


class CounterV1Kept(ReplicatedObject):
    """The upgrade done right: version 0 stays (PySyncObj style: same name defined twice)."""

    __replicated_state__ = ("value",)

    def __init__(self) -> None:
        super().__init__(name="counter")
        self.value = 0

    @replicated
    def add(self, n):
        self.value += n
        return self.value

    @replicated(ver=1)
    def add(self, n):  # noqa: F811 - the next version of the same method
        self.value += 2 * n
        return self.value

    @replicated
    def reset(self):
        self.value = 0


def _wait_announced(c: ObjCluster, want: dict[int, list[int]]) -> None:
    for i in c.rafts:
        wait_until(lambda i=i: {n: t.get("counter.add") for n, t in c.sms[i].cluster_versions().items()} == want,
                   10, f"node {i} to see versions {want}")


def test_version_mismatch_raises_the_typed_error_on_the_calling_node_and_the_cluster_keeps_working():
    classes = {1: CounterV0, 2: CounterV0, 3: CounterV1Only}
    with ObjCluster(lambda i: (classes[i](),)) as c:
        c.leader()
        _wait_announced(c, {1: [0], 2: [0], 3: [1]})
        with pytest.raises(VersionMismatch) as ei:
            c.objs[3][0].add(5, timeout=T)  # node 3 only runs add v1; 1 and 2 run v0
        assert ei.value.method == "add" and ei.value.version == 1 and set(ei.value.supported) == {1, 2}
        with pytest.raises(VersionMismatch):
            c.objs[1][0].add(5, timeout=T)  # and node 3 cannot run v0
        # nothing changed anywhere, no node stopped, unchanged methods work
        c.sync_all()
        assert [c.objs[i][0].value for i in c.ids] == [0, 0, 0]
        c.objs[2][0].reset(timeout=T)
        assert all(r.metrics().state in (ServerState.LEADER, ServerState.FOLLOWER) for r in c.rafts.values())
        # upgrade nodes 1 and 2 (restart with the new code): add v1 now runs everywhere
        for i in (1, 2):
            c.stop(i)
            c.start(i, objs=(CounterV1Only(),))
        _wait_announced(c, {1: [1], 2: [1], 3: [1]})
        assert c.objs[3][0].add(5, timeout=T) == 10
        c.sync_all()
        assert [c.objs[i][0].value for i in c.ids] == [10, 10, 10]


def test_a_call_is_refused_until_every_member_has_announced_it_can_run_that_version():
    """Issue 16: the version check counted only the members that had announced.  Nodes 1 and 2 ran
    ``add`` version 0; node 3, a member that had not started yet, ran only version 1.  ``add(1)`` on
    node 1 succeeded; node 3 then could not apply the entry and its counter differed for good.  Now
    a member that has not announced refuses every version, so nothing can diverge."""
    classes = {1: CounterV0, 2: CounterV0, 3: CounterV1Only}
    with ObjCluster(lambda i: (classes[i](),), init=False) as c:
        c.stop(3)                                     # a member that has not started yet
        c.rafts[1].initialize({i: Node(f"mem://{i}") for i in c.ids})
        c.leader()
        for i in (1, 2):
            wait_until(lambda i=i: set(c.sms[i].cluster_versions()) == {1, 2}, 10, f"node {i} to see 1 and 2")
        with pytest.raises(VersionMismatch, match="not announced") as ei:
            c.objs[1][0].add(1, timeout=T)
        assert ei.value.version == 0 and 3 in ei.value.supported
        c.start(3, objs=(CounterV1Only(),))           # it announces version 1 only
        _wait_announced(c, {1: [0], 2: [0], 3: [1]})
        c.sync_all()
        assert [c.objs[i][0].value for i in c.ids] == [0, 0, 0]
        with pytest.raises(VersionMismatch):
            c.objs[1][0].add(1, timeout=T)            # 3 cannot run version 0: refused on every node


def test_a_node_without_a_version_the_log_ran_stops_rather_than_diverge():
    """A node restarted with code that dropped a version it announced (or a new node replaying calls
    made before it joined) cannot apply such a call the way the others did: its state machine raises
    (the node stops, Fatal, naming the object, method and version) instead of going on different."""
    sm = ObjectStateMachine(CounterV1Only())
    sm._versions = {1: {"counter.add": [0]}}
    sm._applied = (LogId(1, 1), StoredMembership(LogId(0, 1), Membership.of({1: Node("mem://1")})))
    call = {"k": "call", "o": "counter", "m": "add", "v": 0, "a": _values.dumps([[1], {}]), "c": b"c" * 16,
            "s": 1, "f": 0, "t": 1.0}
    with pytest.raises(VersionMismatch, match="counter.add version 0"):
        sm.apply([Entry(LogId(1, 2), EntryKind.NORMAL, call)])
    assert sm.objects["counter"].value == 0 and sm.applied_state()[0] == LogId(1, 1)
    sm.close()


def test_rolling_upgrade_with_the_old_version_kept_never_fails_a_call():
    with ObjCluster(lambda i: (CounterV0(),)) as c:
        c.leader()
        _wait_announced(c, {1: [0], 2: [0], 3: [0]})
        total = 0
        for i in (1, 2):  # upgrade one node at a time, calling from every node in between
            c.stop(i)
            c.start(i, objs=(CounterV1Kept(),))  # a memory state machine: it replays the log with v0
            c.leader()
            for j in c.ids:
                total += 1
                assert c.objs[j][0].add(1, timeout=T) == total  # v0: node 3 does not run v1 yet
        _wait_announced(c, {1: [0, 1], 2: [0, 1], 3: [0]})
        c.stop(3)
        c.start(3, objs=(CounterV1Kept(),))
        _wait_announced(c, {1: [0, 1], 2: [0, 1], 3: [0, 1]})
        assert c.objs[2][0].add(1, timeout=T) == total + 2  # v1 now
        c.sync_all()
        assert [c.objs[i][0].value for i in c.ids] == [total + 2] * 3


# ---------------------------------------------------------------------------
# Locks: mutual exclusion at every log position, expiry by log time

class RecordingLocks(ReplLockManager):
    """Records every applied lock call with its log position, log time and outcome (node-local)."""

    def __init__(self, auto_unlock):
        super().__init__(auto_unlock, name="locks")
        self.history: list[tuple] = []

    def _rec(self, method, lock_id, client_id, result):
        rec = self._locks.get(lock_id)
        self.history.append((self.log_id().index, method, lock_id, client_id, result, self.log_time(),
                             None if rec is None else (rec[0], rec[1])))
        return result

    @replicated
    def try_acquire(self, lock_id, client_id):
        return self._rec("try_acquire", lock_id, client_id,
                         ReplLockManager.try_acquire.fn(self, lock_id, client_id))

    @replicated
    def release(self, lock_id, client_id):
        return self._rec("release", lock_id, client_id, ReplLockManager.release.fn(self, lock_id, client_id))


def _check_lock_history(history: list[tuple], auto_unlock: float) -> int:
    """Replay a node's history through a model; return how many grants came from expiry."""
    holders: dict = {}  # lock -> (client, expires)
    last_index, last_time, expired_grants = 0, 0.0, 0
    for index, method, lock_id, client, result, now, after in history:
        assert index > last_index and now >= last_time, "log order and log time never go back"
        last_index, last_time = index, now
        h = holders.get(lock_id)
        live = h is not None and now < h[1]
        if method == "try_acquire":
            assert result == (not live or h[0] == client), (index, h, client, now)
            if result:
                expired_grants += h is not None and not live and h[0] != client
                holders[lock_id] = (client, now + auto_unlock)
        else:
            assert result == (live and h[0] == client)
            if result:
                del holders[lock_id]
        # the one live holder (if any) after the call is the one the model says; an expired
        # record may or may not have been swept yet, it holds nothing either way
        h = holders.get(lock_id)
        live_model = h if h is not None and now < h[1] else None
        live_after = tuple(after) if after is not None and now < after[1] else None
        assert live_model == live_after, (index, method, client, live_model, live_after)
    return expired_grants


def test_lock_manager_mutual_exclusion_through_leader_changes_with_skewed_clocks():
    auto_unlock = 0.4
    clocks = {1: lambda: time.time() + 0.15, 2: lambda: time.time() - 0.15, 3: time.time}
    with ObjCluster(lambda i: (RecordingLocks(auto_unlock),), clocks=clocks) as c:
        c.leader()
        stop = threading.Event()
        grants: list[tuple] = []

        def client(node: int, name: str, seed: int):
            rnd = random.Random(seed)
            while not stop.is_set():
                locks = c.objs[node][0]
                try:
                    if locks.try_acquire("L", name, timeout=2):
                        grants.append(name)
                        if rnd.random() < 0.7:
                            locks.release("L", name, timeout=2)
                        else:  # "crash" holding it and stay away: only expiry frees it
                            stop.wait(2 * auto_unlock)
                except RaftError:
                    time.sleep(0.01)  # the node is restarting or leaderless: try again
                time.sleep(rnd.random() * 0.02)

        threads = [threading.Thread(target=client, args=(n, f"c{n}{k}", n * 10 + k)) for n in c.ids for k in range(2)]
        for t in threads:
            t.start()
        try:
            for step in range(4):  # leader changes: transfers and a restart of the leader
                wait_until(lambda n=len(grants): len(grants) > n + 3, 20, "progress")
                leader = c.leader()
                if step % 2 == 0:
                    target = [i for i in c.ids if i != leader.node_id][step % 2]
                    leader.trigger.transfer_leader(target)
                    wait_until(lambda: c.rafts[target].is_leader(), 10, f"node {target} to lead")
                else:
                    c.stop(leader.node_id)
                    c.leader()
                    c.start(leader.node_id)
            wait_until(lambda n=len(grants): len(grants) > n + 3, 20, "progress after the changes")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        c.sync_all()
        histories = {i: c.objs[i][0].history for i in c.ids}
        expired = [_check_lock_history(h, auto_unlock) for h in histories.values()]
        # every node decided exactly the same at every log position (the log's clock, not theirs)
        for i in c.ids:
            assert histories[i] == histories[1]
        assert expired[0] > 0, "some grants must have come from expiry"
        # the log time at each call is the leader's stamp, never a replica's clock at apply time
        stamps = {}
        hi = 0.0
        store = c.logs[1]
        for e in store.read(1, store.log_state().last_log_id.index + 1):
            if isinstance(e.payload, dict) and "t" in e.payload:
                hi = max(hi, e.payload["t"])
                stamps[e.index] = hi
        for index, *_rest, now, _after in histories[1]:
            assert now == stamps[index]


def _cmd(obj: str, method: str, args: list, seq: int, t: float, client: bytes = b"c" * 16, ver: int = 0) -> dict:
    return {"k": "call", "o": obj, "m": method, "v": ver, "a": _values.dumps([args, {}]), "c": client,
            "s": seq, "f": seq, "t": t}


def test_lock_expiry_is_decided_by_the_leader_timestamps_in_the_log_not_by_the_applying_node():
    def run() -> list:
        locks = ReplLockManager(auto_unlock=10)
        sm = ObjectStateMachine(locks)
        steps = [("try_acquire", ["L", "a"], 1000.0),  # granted, expires at log time 1010
                 ("try_acquire", ["L", "b"], 1009.9),  # held by a
                 ("try_acquire", ["L", "b"], 1010.0),  # a expired by log time: b gets it until 1020
                 ("release", ["L", "a"], 1011.0),      # a holds nothing
                 ("try_acquire", ["L", "a"], 995.0),   # a leader with a slow clock: log time stays 1011
                 ("renew", ["L", "b"], 1019.0),        # b renews until 1029
                 ("try_acquire", ["L", "a"], 1025.0),  # still b's
                 ("is_acquired", ["L", "b"], 1029.0)]  # expired exactly at 1029
        out = []
        for n, (m, args, t) in enumerate(steps, start=1):
            out += sm.apply([Entry(LogId(1, n), EntryKind.NORMAL, _cmd("ReplLockManager", m, args, n, t))])
        assert locks.log_time() == 1029.0
        return out

    first = run()
    assert first == [True, False, True, False, False, True, False, False]
    assert run() == first  # the same log gives the same answers, whenever and wherever it is applied


# ---------------------------------------------------------------------------
# Errors, values, robustness

def test_values_survive_the_log_but_code_does_not():
    v = {"t": (1, (2, 3)), "s": {1, 2}, "f": frozenset({"a"}), (1, 2): [b"x", None, 1.5]}
    assert _values.loads(_values.dumps(v)) == v
    assert type(_values.loads(_values.dumps((1,)))) is tuple

    class Thing:
        pass

    with pytest.raises(TypeError):
        _values.dumps({"x": Thing()})
    with pytest.raises(TypeError):
        _values.dumps(lambda: 1)


def test_construction_and_call_errors_are_typed():
    with pytest.raises(ValueError):
        ObjectStateMachine(ReplCounter(), ReplCounter())  # duplicate names
    ObjectStateMachine(ReplCounter(), ReplCounter(name="other")).close()

    class NoState(ReplicatedObject):
        @replicated
        def f(self):
            pass

    with pytest.raises(TypeError):
        ObjectStateMachine(NoState())
    with pytest.raises(NotAttached):
        ReplCounter().inc()
    sm = ObjectStateMachine(ReplCounter(name="c"))
    with pytest.raises(NotAttached):
        sm["c"].inc()
    sm.close()
    with pytest.raises(TypeError):
        class Twice(ReplicatedObject):
            __replicated_state__ = ()

            @replicated(ver=1)
            def f(self):
                pass

            @replicated(ver=1)
            def f(self):  # noqa: F811
                pass


def test_unencodable_arguments_fail_at_the_caller_and_malformed_entries_never_stop_a_node():
    with ObjCluster(lambda i: (ReplDict(),)) as c:
        leader = c.leader()
        with pytest.raises(TypeError):
            c.objs[1][0].set("k", object(), timeout=T)
        # foreign or garbled commands in the log: error results, the node keeps applying
        for bad in ({"op": "put", "key": "k", "value": 1}, "garbage",
                    {"k": "call", "o": "ReplDict", "m": "set", "v": 0, "a": b"\xc1", "c": b"x", "s": 1, "f": 1,
                     "t": 1.0},
                    {"k": "call", "o": "Nope", "m": "set", "v": 0, "a": _values.dumps([[], {}]), "c": b"x", "s": 2,
                     "f": 1, "t": 1.0}):
            with pytest.raises(RaftError):
                leader.client_write(bad, timeout=T)
        c.objs[2][0].set("after", 1, timeout=T)
        c.sync_all()
        assert all(c.objs[i][0].to_dict() == {"after": 1} for i in c.ids)
        assert all(r.metrics().state != ServerState.FATAL for r in c.rafts.values())


def test_shutdown_fails_pending_calls_and_stops_the_dispatcher_thread():
    with ObjCluster(lambda i: (ReplCounter(),)) as c:
        leader = c.leader()
        f = next(i for i in c.ids if i != leader.node_id)
        for i in c.ids:
            if i != f:
                c.net.isolate(i)
        fut = c.objs[f][0].inc.future()  # no quorum: stays pending
        c.stop(f)
        with pytest.raises(ShutDown):
            fut.result(T)
        with pytest.raises(ShutDown):
            c.objs[f][0].inc(timeout=T)
        wait_until(lambda: f"pyraft-objects-{f}" not in pyraft_threads(), 5, "the dispatcher to stop")


def test_shutdown_stops_the_call_dispatcher_with_the_node():
    """raft.shutdown() joins every pyraft- thread, the objects' dispatcher included."""
    c = ObjCluster(lambda i: (ReplCounter(),))
    try:
        c.objs[1][0].inc(timeout=T)
    finally:
        rafts = list(c.rafts.values())
        for r in rafts:
            r.shutdown()
        c.rafts.clear()
    assert pyraft_threads() == []
    c.close()


def test_a_follower_sends_the_leader_at_most_a_window_of_calls_at_once(monkeypatch):
    """The leader's ZeroMQ transport answers a connection past 1,024 requests in flight with Overloaded:
    a follower with thousands of calls pending keeps at most MAX_SENT of them there, and all complete."""
    from pyraft.objects import caller as caller_mod

    monkeypatch.setattr(caller_mod, "MAX_SENT", 16)
    sent_with: list[int] = []
    connect = caller_mod.Caller._connect

    def counting_connect(self, tid, node):
        conn = connect(self, tid, node)
        send = conn.send

        def counting_send(req):
            sent_with.append(len(self._inflight))  # requests awaiting replies, before this one
            return send(req)

        monkeypatch.setattr(conn, "send", counting_send, raising=False)
        return conn

    monkeypatch.setattr(caller_mod.Caller, "_connect", counting_connect)
    with ObjCluster(lambda i: (ReplCounter(),)) as c:
        leader = c.leader()
        f = next(i for i in c.ids if i != leader.node_id)
        c.net.set_delay(0.001, 0.003)  # replies take a while: calls pile up behind the window
        futs = [c.objs[f][0].inc.future(timeout=T) for _ in range(300)]
        assert sorted(fu.result(T) for fu in futs) == list(range(1, 301))
        assert sent_with and max(sent_with) < 16, max(sent_with)


def test_built_in_structures_refuse_what_would_stop_or_split_the_replicas():
    """A counter past 64 bits or a set item one level too deep could not be replicated (every node
    stopped, again on every restart); a set handed to update/extend is iterated in another order on
    each node (str hashing is per process).  Each is refused, as the call's error, nothing changed."""
    deep: Any = 1
    for _ in range(31):
        deep = (deep,)   # 31 tuples: a call argument may nest 32 deep, so it is taken ...
    deeper = (deep,)     # ... but a set holding this one would nest 33 deep
    with ObjCluster(lambda i: (ReplCounter(), ReplDict(), ReplList(), ReplSet())) as c:
        leader = c.leader()
        counter, d, lst, st = c.objs[leader.node_id]
        assert counter.set(2**64 - 1, timeout=T) == 2**64 - 1
        with pytest.raises(OverflowError):
            counter.inc(timeout=T)
        with pytest.raises(OverflowError):
            counter.add(1, timeout=T)
        assert counter.set(-2**63, timeout=T) == -2**63
        with pytest.raises(OverflowError):
            counter.sub(1, timeout=T)
        with pytest.raises(TypeError):
            counter.set("x", timeout=T)
        assert counter.add(1.5, timeout=T) == -2**63 + 1.5
        with pytest.raises(TypeError, match="ordered"):
            d.update({("k", f"v{i}") for i in range(16)}, timeout=T)
        with pytest.raises(TypeError, match="ordered"):
            lst.extend({f"v{i}" for i in range(16)}, timeout=T)
        assert st.add(deep, timeout=T) is True
        with pytest.raises(ValueError, match="nest more than"):
            st.add(deeper, timeout=T)
        with pytest.raises(ValueError, match="nest more than"):
            st.update([1, deeper], timeout=T)
        d.update([("k", 1)], timeout=T)
        c.sync_all()
        for i in c.ids:
            assert c.rafts[i].metrics().state in (ServerState.LEADER, ServerState.FOLLOWER)
            cnt, dd, ll, ss = c.objs[i]
            assert (cnt.get(), dd.get("k"), len(ll), ss.contains(deep), ss.contains(1)) == \
                (-2**63 + 1.5, 1, 0, True, False), i


def test_only_node_n_announces_node_ns_versions_when_keys_say_who_sends():
    """A version announcement decides which calls every node runs: a client (or another peer) that
    forged one for the members could make every node refuse calls, or stop on one no node can run."""
    from pyraft.codec import ClientRequest
    from pyraft.network import Principal

    class Reply:
        def __init__(self, principal):
            self.principal, self.got = principal, []

        def reply(self, resp):
            self.got.append(resp)

    with ObjCluster(lambda i: (ReplDict(),)) as c:
        leader = c.leader()
        caller = c.sms[leader.node_id]._caller
        last = leader.metrics().last_log_index
        for who in (Principal("client", key="c"), Principal("admin", key="a"), Principal("peer", 2, key="p2")):
            r = Reply(who)
            caller.on_call_request(0, ClientRequest("objects.call", {"k": "hello", "n": 1, "vers": {"d.set": [0, 7]}}), r)
            [resp] = r.got
            assert not resp.ok and resp.error[0] == "PermissionDenied", (who, resp)
        assert leader.metrics().last_log_index == last  # nothing proposed
        r = Reply(Principal("peer", 1, key="p1"))  # node 1 itself: past the role check
        caller.on_call_request(0, ClientRequest("objects.call", {"k": "hello", "n": 1, "vers": {}}), r)
        [resp] = r.got  # a bare body is refused as malformed, before proposing
        assert resp.error[0] == "CodecError" and leader.metrics().last_log_index == last, resp
        r = Reply(Principal("peer", 1, key="p1"))
        caller.on_call_request(0, ClientRequest("objects.call", {"k": "hello", "n": 1, "vers": {}, "c": b"n1",
                                                                 "s": 0, "f": 0}), r)
        wait_until(lambda: r.got, 10, "the announcement applied")
        assert r.got[0].ok and leader.metrics().last_log_index > last, r.got


# ------------------------------------------------------------------ hostile clients (a second run)

def _apply_one(sm: ObjectStateMachine, index: int, cmd: dict) -> Any:
    return sm.apply([Entry(LogId(1, index), EntryKind.NORMAL, cmd)])[0]


def test_an_empty_client_id_is_refused_before_proposing_and_applies_as_an_error(tmp_path):
    """A call with ``c = b""`` was committed and made every node Fatal in apply (LMDB refuses an
    empty key), again on every restart."""
    d = ReplDict()
    sm = ObjectStateMachine(d, path=tmp_path)
    try:
        bad = _cmd("ReplDict", "set", ["k", 1], 1, 1000.0, client=b"")
        with pytest.raises(CodecError, match="client id"):
            sm.check_command(bad)
        r = _apply_one(sm, 1, bad)
        assert isinstance(r, RaftError) and "malformed" in str(r)
        assert _apply_one(sm, 2, _cmd("ReplDict", "set", ["k", 2], 1, 1000.0)) is None
        assert d.get("k") == 2
    finally:
        sm.close()


@pytest.mark.parametrize("body, why", [
    ([1, 2], "malformed"),
    ({"k": "frob"}, "malformed"),
    ({**_cmd("ReplDict", "set", [1, 1], 1, 0.0), "junk": b"x" * 1000}, "unknown"),
    ({**_cmd("ReplDict", "set", [1, 1], 1, 0.0), "c": "str"}, "client id"),
    ({**_cmd("ReplDict", "set", [1, 1], 1, 0.0), "c": b"c" * 256}, "client id"),
    ({**_cmd("ReplDict", "set", [1, 1], 1, 0.0), "s": True}, "'s' and 'f'"),
    ({**_cmd("ReplDict", "set", [1, 1], 5, 0.0), "f": 7}, "'s' and 'f'"),
    ({**_cmd("ReplDict", "set", [1, 1], 1, 0.0), "f": -1}, "'s' and 'f'"),
    ({**_cmd("ReplDict", "set", [1, 1], 1, 0.0), "a": "not bytes"}, "'a' bytes"),
    ({**_cmd("ReplDict", "set", [1, 1], 1, 0.0), "v": None}, "'v' an int"),
    ({**_cmd("ReplDict", "set", [1, 1], 1, 0.0), "o": "o" * 600}, "object name"),
    ({"k": "hello", "c": b"c", "s": 0, "f": 0, "n": "1", "vers": {}}, "'n' must be"),
    ({"k": "hello", "c": b"c", "s": 0, "f": 0, "n": 1}, "'vers'"),
])
def test_a_malformed_objects_call_is_refused_by_the_leader_before_it_reaches_the_log(body, why):
    """The leader proposed any map whose 'k' was call or hello: garbage of any size went into every log."""
    class Reply:
        got: list = []

        def reply(self, resp):
            self.got.append(resp)

    with ObjCluster(lambda i: (ReplDict(),)) as c:
        leader = c.leader()
        last = leader.metrics().last_log_index
        r = Reply()
        r.got = []
        c.sms[leader.node_id]._caller.on_call_request(0, ClientRequest("objects.call", body), r)
        [resp] = r.got
        assert not resp.ok and resp.error[0] in ("CodecError", "RaftError") and why in resp.error[1], resp
        assert leader.metrics().last_log_index == last


def test_a_call_the_leader_refuses_as_malformed_fails_on_a_follower_instead_of_retrying():
    """A follower's dispatcher retried a call the leader answered with CodecError until its
    deadline: a call without a timeout hung for good.  (A node's own calls are well formed; a
    leader whose code reads calls differently, in a rolling upgrade, refuses them so.)"""
    with ObjCluster(lambda i: (ReplDict(),)) as c:
        leader = c.leader()
        follower = next(i for i in c.ids if i != leader.node_id)
        last = leader.metrics().last_log_index
        body = {"k": "call", "o": "ReplDict", "m": "set", "v": 0, "a": _values.dumps([["k", 1], {}]),
                "from_a_newer_node": 1}
        fut = c.sms[follower]._caller.submit_call(body, None)
        with pytest.raises(CodecError, match="unknown"):
            fut.result(timeout=10)  # without the fix: no result, TimeoutError here
        assert leader.metrics().last_log_index == last
        # The dispatcher goes on: the node's next call succeeds.
        c.objs[follower][0].set("k", 2, timeout=10)
        assert c.objs[follower][0].get("k") == 2


def test_a_node_that_does_not_lead_forwards_a_call_before_judging_its_form():
    """Only the leader's CodecError is final for a caller: a follower, maybe running other code in a
    rolling upgrade, answers ForwardToLeader (naming the leader) whatever the call carries."""
    class Reply:
        def __init__(self) -> None:
            self.got: list = []

        def reply(self, resp):
            self.got.append(resp)

    with ObjCluster(lambda i: (ReplDict(),)) as c:
        leader = c.leader()
        follower = next(i for i in c.ids if i != leader.node_id)
        body = {**_cmd("ReplDict", "set", [1, 1], 1, 0.0), "junk": 1}
        r = Reply()
        c.sms[follower]._caller.on_call_request(0, ClientRequest("objects.call", body), r)
        [resp] = r.got
        assert not resp.ok and resp.error[0] == "ForwardToLeader" and resp.error[2] == leader.node_id, resp


def test_arguments_nested_past_the_limit_fail_the_call_and_a_lock_holder_cannot_stop_the_nodes(tmp_path):
    """A lock holder nested 1022 deep passed the caller's check, then the lock table (one level
    deeper) could not be encoded in apply: every node Fatal, again on every restart."""
    from pyraft.objects import ReplLockManager
    deep: Any = 1
    for _ in range(_values.MAX_ARGS_DEPTH - 1):
        deep = [deep]
    with pytest.raises(TypeError, match="nest more than"):
        _values.check_args_depth(_values.dumps([["L", deep], {}]))
    _values.check_args_depth(_values.dumps([["L", deep[0]], {}]))  # as deep as allowed: [args, kwargs], args, holder
    wide = [[list(range(100_000)), {"m": [1, (2, {3})]}], {"k": [[[]]]}]  # long, shallow: walked, refused not
    _values.check_args_depth(_values.dumps(wide))
    assert len(_values.dumps([["L", deep[0]], {}])) > _values.MAX_ARGS_DEPTH  # (long enough to be walked)
    locks = ReplLockManager(auto_unlock=10)
    sm = ObjectStateMachine(locks, path=tmp_path)
    try:
        very: Any = 1
        for _ in range(1022):
            very = [very]
        r = _apply_one(sm, 1, _cmd("ReplLockManager", "try_acquire", ["L", very], 1, 1000.0))
        assert isinstance(r, RaftError) and "nest more than" in str(r)
        r = _apply_one(sm, 2, _cmd("ReplLockManager", "try_acquire", ["L", deep[0]], 2, 1000.0))
        assert r is True  # the deepest allowed holder is stored, and the state still encodes
        assert _apply_one(sm, 3, _cmd("ReplLockManager", "is_acquired", ["L", deep[0]], 3, 1000.0)) is True
    finally:
        sm.close()
    with ObjCluster(lambda i: (ReplLockManager(auto_unlock=10),)) as c:
        with pytest.raises(TypeError, match="nest more than"):
            c.objs[1][0].try_acquire("L", very, timeout=T)


def test_a_session_keeps_a_bounded_number_of_small_outcomes_whatever_floor_the_client_sends(tmp_path):
    """A floor held at 0 kept every outcome for a day, and each held a copy of the value it
    returned: 150 small calls made a 28 MB session on every replica."""
    from pyraft.errors import ResultNotKept
    from pyraft.objects.statemachine import MAX_KEPT_OUTCOME, MAX_SESSION_OUTCOMES
    d = ReplDict()
    sm = ObjectStateMachine(d, path=tmp_path)
    try:
        def call(method, args, seq, floor=0):
            return dict(_cmd("ReplDict", method, args, seq, 1000.0), f=floor)

        n = 1
        assert _apply_one(sm, n, call("set", ["big", "v" * 100_000], 1)) is None
        n += 1
        assert _apply_one(sm, n, call("setdefault", ["big"], 2)) == "v" * 100_000  # the first run: all of it
        n += 1
        retry = _apply_one(sm, n, call("setdefault", ["big"], 2))                  # a retry: not kept
        assert isinstance(retry, ResultNotKept) and f"log index {n - 1}" in str(retry)
        for seq in range(3, MAX_SESSION_OUTCOMES + 103):
            n += 1
            _apply_one(sm, n, call("setdefault", ["big"], seq))
        sess = sm._sessions[b"c" * 16]
        assert len(sess.done) == MAX_SESSION_OUTCOMES and sess.floor == 103
        assert len(ObjectStateMachine._dump_state(d)) > 100_000
        assert sum(len(_values.dumps(o)) for o in sess.done.values()) <= MAX_SESSION_OUTCOMES * MAX_KEPT_OUTCOME
        n += 1
        old = _apply_one(sm, n, call("set", ["x", 1], 50))  # below the moved floor: never run
        assert isinstance(old, RaftError) and "below its session's floor" in str(old)
        assert d.get("x") is None
    finally:
        sm.close()


def test_a_lost_call_is_not_overtaken_by_more_calls_than_a_session_keeps(monkeypatch):
    """A node's oldest call, its request lost once, was overtaken by any number of newer calls; past
    MAX_SESSION_OUTCOMES of them the session's floor moved past it and its retry failed unrun."""
    from pyraft.objects import caller as caller_mod
    from pyraft.objects import statemachine as sm_mod
    monkeypatch.setattr(caller_mod, "MAX_SENT", 4)
    monkeypatch.setattr(sm_mod, "MAX_SESSION_OUTCOMES", 8)
    with ObjCluster(lambda i: (ReplList(),)) as c:
        leader = c.leader()
        f = next(i for i in c.ids if i != leader.node_id)
        lst = c.objs[f][0]
        lst.append("warm-up", timeout=T)
        first_args = _values.dumps([["first"], {}])
        lost: list = []

        def lose_the_first_request(direction, peer, msg):
            if (direction == "request" and isinstance(msg, ClientRequest) and msg.op == "objects.call"
                    and msg.body.get("a") == first_args and not lost):
                lost.append(msg.body["s"])
                return True
            return False

        leader.transport.set_fault_filter(lose_the_first_request)
        first = lst.append.future("first", timeout=T)
        rest = [lst.append.future(i, timeout=T) for i in range(40)]
        assert first.result(T) >= 2  # sent again after try_timeout, and run
        for fut in rest:
            fut.result(T)
        leader.transport.set_fault_filter(None)
        assert lost and lst.to_list().count("first") == 1 and len(lst.to_list()) == 42


def test_a_snapshot_installed_over_a_nodes_own_calls_completes_every_waiter_it_covers():
    """The calling node's waiter of a call covered by a snapshot gets the session's outcome: the
    result, a ResultNotKept that says the call ran once, or an error for one below the floor."""
    from concurrent.futures import Future
    from pyraft.errors import ResultNotKept
    me = b"c" * 16

    def call(m, args, seq, floor):
        return dict(_cmd("ReplDict", m, args, seq, 1000.0, client=me), f=floor)

    ahead = ObjectStateMachine(ReplDict())
    ahead.apply([Entry(LogId(1, 1), EntryKind.NORMAL, call("set", ["big", "v" * 5000], 1, 1)),
                 Entry(LogId(1, 2), EntryKind.NORMAL, call("pop", ["big"], 2, 1)),
                 Entry(LogId(1, 3), EntryKind.NORMAL, call("set", ["k", 1], 3, 1)),
                 Entry(LogId(1, 4), EntryKind.NORMAL, call("setdefault", ["k"], 4, 2))])
    meta = ahead.build_snapshot()
    _, data = ahead.open_snapshot()
    lagging = ObjectStateMachine(ReplDict())
    lagging._client_id = me  # as attach() sets it: this node made the calls
    waiters = {s: Future() for s in (1, 2, 4, 5)}
    for s, fut in waiters.items():
        lagging._register_waiter(s, fut)
    lagging.install_snapshot(meta, data)
    assert isinstance(waiters[1].exception(0), RaftError) and "below its session's floor" in str(waiters[1].exception())
    e = waiters[2].exception(0)
    assert isinstance(e, ResultNotKept) and "ran once, at log index 2" in str(e)
    assert waiters[4].result(0) == 1
    assert not waiters[5].done()  # not applied yet: it waits for its entry
