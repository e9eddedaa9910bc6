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
        log_store = log_store or MemoryLogStore()
        sm = sm or MemoryStateMachine()
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
