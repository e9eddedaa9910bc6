"""In-process clusters on MemoryNetwork, for runtime tests."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from pyraft import Config, Node, Raft, ServerState
from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
from pyraft.transports.memory import MemoryNetwork

FAST = Config(heartbeat_interval=0.02, election_timeout=(0.1, 0.2), rpc_timeout=0.5)


class MemCluster:
    """Nodes ``1..n`` (plus later additions) on one MemoryNetwork, each with memory stores."""

    def __init__(self, n: int, config: Config = FAST, init: bool = True) -> None:
        self.config = config
        self.net = MemoryNetwork()
        self.stores: dict[int, tuple[MemoryLogStore, MemoryStateMachine]] = {}
        self.rafts: dict[int, Raft] = {}
        for i in range(1, n + 1):
            self.start(i)
        if init:
            self.rafts[1].initialize({i: self.node(i) for i in range(1, n + 1)})
            # Every node knows the membership (a node that does not cannot vote or campaign).
            for r in self.rafts.values():
                r.wait(10).voter_ids(range(1, n + 1))

    @staticmethod
    def node(i: int) -> Node:
        return Node(f"mem://{i}")

    def start(self, i: int, log_store=None, sm=None) -> Raft:
        """Start node ``i``; over its previous stores if it ran before (a restart)."""
        if i in self.stores and log_store is None:
            log_store, sm = self.stores[i]
        # "is None", not "or": a store with no keys yet may be falsy (KVStateMachine has __len__).
        log_store = MemoryLogStore() if log_store is None else log_store
        sm = MemoryStateMachine() if sm is None else sm
        self.stores[i] = (log_store, sm)
        r = Raft(i, self.config, self.net.transport(i), log_store, sm)
        self.rafts[i] = r
        return r

    def stop(self, i: int) -> None:
        self.rafts.pop(i).shutdown()

    def leader(self, timeout: float = 10.0, among: Iterable[int] | None = None) -> Raft:
        """Wait until exactly one node of ``among`` (default: all running) leads, and return it."""
        ids = list(among) if among is not None else list(self.rafts)

        def one_leader():
            found = [i for i in ids if self.rafts[i].metrics().state == ServerState.LEADER]
            return self.rafts[found[0]] if len(found) == 1 else None

        return wait_until(one_leader, timeout, f"exactly one leader among {ids}")

    def wait_applied(self, index: int, ids: Iterable[int] | None = None, timeout: float = 10.0) -> None:
        for i in ids if ids is not None else list(self.rafts):
            self.rafts[i].wait(timeout).applied_index_at_least(index)

    def close(self) -> None:
        for r in list(self.rafts.values()):
            r.shutdown()
        self.rafts.clear()
        self.net.close()

    def __enter__(self) -> "MemCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise AssertionError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def pyraft_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pyraft-")]


# --- helpers for membership, snapshot and transfer tests ---------------------

#: Timings for tests that load the cluster (writer threads, 100k entries): a
#: node thread can wait a while for the GIL, so elections must not be hair-trigger.
LOADED = Config(heartbeat_interval=0.05, election_timeout=(0.5, 1.0), rpc_timeout=1.0)


def put(k: Any, v: Any) -> dict:
    return {"op": "put", "key": k, "value": v}


def repl_thread(leader_id: int, target: int) -> str:
    """The name of the replication worker thread from ``leader_id`` to ``target``."""
    return f"pyraft-repl-{leader_id}->{target}"


def current_leader(cluster: "MemCluster") -> Raft | None:
    """The running node that leads in the highest term, or None."""
    best = None
    for r in list(cluster.rafts.values()):
        m = r.metrics()
        if m.state == ServerState.LEADER and (best is None or m.current_term > best[0]):
            best = (m.current_term, r)
    return best[1] if best else None


class LeaderMonitor(threading.Thread):
    """Samples every running node's metrics and records who led in which term.

    ``check()`` asserts Election Safety as observed: at most one leader per term.
    """

    def __init__(self, cluster: "MemCluster", interval: float = 0.001) -> None:
        super().__init__(name="test-leader-monitor", daemon=True)
        self.cluster = cluster
        self.interval = interval
        self.leaders: dict[int, set[int]] = {}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for i, r in list(self.cluster.rafts.items()):
                m = r.metrics()
                if m.state == ServerState.LEADER:
                    self.leaders.setdefault(m.current_term, set()).add(i)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def check(self) -> None:
        bad = {t: ids for t, ids in self.leaders.items() if len(ids) > 1}
        assert not bad, f"more than one leader in a term: {bad}"
        assert self.samples > 0

    def __enter__(self) -> "LeaderMonitor":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Writer(threading.Thread):
    """Writes unique keys to whichever node leads until stopped; records every acknowledged write.

    Writes go out ``batch`` at a time with ``client_write_async``.  A write
    that fails with a ``RaftError`` (ForwardToLeader, Timeout, ShutDown, ...)
    has an unknown outcome and is not recorded; anything else is a test failure
    kept in ``errors``.
    """

    def __init__(self, cluster: "MemCluster", prefix: str = "w", batch: int = 20, timeout: float = 5.0) -> None:
        super().__init__(name=f"test-writer-{prefix}", daemon=True)
        self.cluster = cluster
        self.prefix = prefix
        self.batch = batch
        self.timeout = timeout
        self.acked: dict[str, int] = {}
        self.failed = 0
        self.errors: list[BaseException] = []
        self._halt = threading.Event()
        self._n = 0

    def run(self) -> None:
        from pyraft.errors import RaftError
        try:
            while not self._halt.is_set():
                leader = current_leader(self.cluster)
                if leader is None:
                    self._halt.wait(0.005)
                    continue
                futs = []
                try:
                    for _ in range(self.batch):
                        self._n += 1
                        key = f"{self.prefix}{self._n}"
                        futs.append((key, self._n, leader.client_write_async(put(key, self._n))))
                except RaftError:
                    pass
                deadline = time.monotonic() + self.timeout
                for key, v, f in futs:
                    try:
                        f.result(max(0.0, deadline - time.monotonic()))
                        self.acked[key] = v
                    except RaftError:
                        self.failed += 1
                    except TimeoutError:
                        self.failed += 1
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)

    def wait_acked(self, n: int, timeout: float = 10.0) -> None:
        """Block until at least ``n`` more writes were acknowledged than now."""
        want = len(self.acked) + n
        wait_until(lambda: len(self.acked) >= want or self.errors, timeout, f"{n} more acknowledged writes")
        assert not self.errors, self.errors

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join(30)
        assert not self.is_alive(), "writer did not stop"
        assert not self.errors, self.errors
        return dict(self.acked)


def assert_all_present(cluster: "MemCluster", acked: dict[str, int], ids: Iterable[int],
                       timeout: float = 15.0) -> None:
    """Every acknowledged write is applied on every node of ``ids`` (after they caught up)."""
    ids = list(ids)
    leader = cluster.leader(among=ids, timeout=timeout)
    barrier = leader.client_write(put("__barrier__", 1), timeout=timeout).log_id.index
    cluster.wait_applied(barrier, ids=ids, timeout=timeout)
    for i in ids:
        sm = cluster.rafts[i].state_machine
        missing = [k for k, v in acked.items() if sm.get(k) != v]
        assert not missing, f"node {i} lost {len(missing)} acknowledged writes, e.g. {missing[:5]}"
