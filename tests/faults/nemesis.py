"""The nemeses: faults injected into a :class:`FaultCluster` while the workload runs.

========================  =================================================================
kind                      what it does (each step heals what it broke before it returns)
========================  =================================================================
``kill``                  SIGKILL a node (the leader half of the time; now and then a
                          minority, or the whole cluster), restart it 0-3 s later (or
                          3-8 s: it then catches up by snapshot); now and then kill it
                          again while it catches up
``pause``                 SIGSTOP a node (often the leader) for 0.7-3 s, longer than the
                          election timeout, then SIGCONT
``partition``             cut the network through every node's fault-control file: random
                          majority/minority halves, the leader alone, a bridge (one node
                          sees both sides, which do not see each other), a one-way cut
                          (the leader's requests to the others are lost, theirs to it
                          are not), a flaky network (10-40 % of all messages lost,
                          client traffic included), for 2-6 s; or flapping: a new
                          random cut every 0.1-0.6 s for 3-8 s
``disk``                  a slow disk on one or two nodes (often the leader): every log
                          write sleeps 20-250 ms before it commits, for 3-8 s
``transfer``              move the leadership to another voter (``admin.transfer_leader``)
``membership``            remove a voter (the leader now and then; as a learner or out of
                          the cluster), then add it back (``admin.add_learner``,
                          ``admin.change_membership``)
``power-one``             power loss of one node (often the leader): SIGKILL, then its
                          lazy filesystem forgets every write not synced (half the time
                          but a random share of the pages, written back before the
                          cut), then it restarts 0-3 s later with a new boot id (a
                          reboot); now and then power is lost again while it catches
                          up.  Often in the middle of an election (every time until
                          one such cut wrote nothing back, then half the time): a
                          follower that will lose power stops hearing the leader and
                          gets a slow disk, a leadership transfer to the other one is
                          started, and the power is cut as soon as the follower has
                          granted its vote, its only write since
``power-minority``        the same for a minority at once (on 3 nodes: one node)
``power-all``             the same for the whole cluster at once
========================  =================================================================

The power nemeses need the cluster's data on lazy filesystems
(``FaultCluster(..., lazyfs="strict")``, see ``tests/powerloss/``); they are not in
``all``: ask for them by name, or ``power`` for the three.

:class:`Scheduler` runs them on a thread: a pause of 0.5-2 s, then one fault
(or, a third of the time, two different ones at once), and so on until told
to stop.  Every step is an :class:`Event` in :attr:`Scheduler.events`.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from powerloss.mount import LazyMount
from pyraft.codec import ClientRequest, ClientResponse
from pyraft.errors import ForwardToLeader, RaftError, Timeout
from pyraft.raft import raise_error_response
from pyraft.tools.faults import write_fault_file
from pyraft.tools.kv import LocalCluster, NodeFailed
from pyraft.transports.zmq import ZmqClient

from . import durability
from .mutants import MUTANTS
from .offline import OfflineReader
from .node import NODE_PY

__all__ = ["NEMESES", "POWER_NEMESES", "FaultCluster", "Scheduler", "Event", "parse_nemeses"]

NEMESES = ("kill", "pause", "partition", "disk", "transfer", "membership")
#: Power losses: they need every node's data on a lazy filesystem (tests/powerloss/).
POWER_NEMESES = ("power-one", "power-minority", "power-all")

#: How often each kind is chosen (relative weights).
_WEIGHTS = {"kill": 3, "pause": 3, "partition": 4, "disk": 2, "transfer": 2, "membership": 2,
            "power-one": 3, "power-minority": 2, "power-all": 2}

_GROUPS = {"all": NEMESES, "power": POWER_NEMESES}


def parse_nemeses(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, ``"power"`` (the three power losses), ``"all,power"`` or ``"kill,power-all"`` -> a tuple of kinds.

    ValueError for an unknown one.  Empty means ``all``.
    """
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    kinds: list[str] = []
    for p in parts or ["all"]:
        if p in _GROUPS:
            kinds += _GROUPS[p]
        elif p in _WEIGHTS:
            kinds.append(p)
        else:
            raise ValueError(f"unknown nemesis {p}; choose from {', '.join(NEMESES + POWER_NEMESES)}, "
                             f"all, or power")
    return tuple(dict.fromkeys(kinds))


# ---------------------------------------------------------------------------
# The cluster, with a fault-control file per node

class FaultCluster(LocalCluster):
    """A :class:`LocalCluster` whose nodes run with ``--fault-control base_dir/node<i>.faults.json``.

    Tracks what it was told to break: ``network`` (node -> the ids it drops),
    ``disk`` (node -> delay), ``killed`` (nodes SIGKILLed and not restarted
    yet) and ``paused``.  Process and file operations are serialized by one lock.

    With ``lazyfs`` (``"strict"`` or ``"ext4"``, the rule for names) node ``i``
    keeps its data on a lazy filesystem of its own, ``base_dir/mnt<i>`` over
    ``base_dir/disk<i>`` (:class:`~powerloss.mount.LazyMount`), and can lose
    power (:meth:`power_cut`); :meth:`release` ends them.  Its nodes then run
    through the node launcher (:mod:`.node`) with a boot id of their own
    (:meth:`boot_id`), which every power cut of the node renews (a reboot) and
    a kill -9 does not.  With ``mutant`` (a name from :data:`.mutants.MUTANTS`)
    the nodes run with that bug patched in.
    """

    def __init__(self, *a: Any, lazyfs: str | None = None, mutant: str | None = None, **kw: Any) -> None:
        if mutant is not None and mutant not in MUTANTS:
            raise ValueError(f"unknown mutant {mutant!r}; choose from {', '.join(MUTANTS)}")
        super().__init__(*a, **kw)
        self.mutant = mutant
        self.mounts: dict[int, LazyMount] = {}
        self._run_id = os.urandom(4).hex()
        self._boots = {i: 1 for i in self.ids}  # how many times each node's machine has booted
        #: Nodes whose power was cut and that have not served since: their files are off limits
        #: to outside readers (a state machine written without fsync may be torn until rebuilt).
        self.unpowered: set[int] = set()
        #: What the power cuts made the filesystems forget, summed: cuts, bytes, names.
        self.forgotten: Counter = Counter()
        # One per node: held while the node's files are read from outside (the log auditor)
        # and while its power is cut, so that no reader sees a half-forgotten disk.
        self._disk_locks = {i: threading.Lock() for i in self.ids}
        #: Reads the nodes' stores from outside, in a process of its own (see .offline).
        self.reader = OfflineReader(os.path.join(self.base_dir, "offline-reader.stderr"))
        if lazyfs is not None:
            try:
                for i in self.ids:
                    self.mounts[i] = LazyMount(os.path.join(self.base_dir, f"disk{i}"),
                                               os.path.join(self.base_dir, f"mnt{i}"), lazyfs,
                                               log_path=os.path.join(self.base_dir, f"lazyfs{i}.log"))
            except BaseException:
                self.release()
                raise
        self.lock = threading.RLock()  # guards network, disk, killed, paused and the processes
        self.network: dict[int, frozenset[int]] = {i: frozenset() for i in self.ids}
        self.network_out: dict[int, frozenset[int]] = {i: frozenset() for i in self.ids}
        self.loss: dict[int, float] = {i: 0.0 for i in self.ids}
        self.disk: dict[int, float] = {i: 0.0 for i in self.ids}
        self.killed: set[int] = set()
        self.paused: set[int] = set()
        for i in self.ids:
            self._write_faults(i)

    def fault_file(self, i: int) -> str:
        return os.path.join(self.base_dir, f"node{i}.faults.json")

    def data_dir(self, i: int) -> str:
        m = self.mounts.get(i) if hasattr(self, "mounts") else None
        return super().data_dir(i) if m is None else os.path.join(m.mountpoint, f"node{i}")

    def argv(self, i: int, init: bool = False, extra: Sequence[str] = ()) -> list[str]:
        a = super().argv(i, init, ["--fault-control", self.fault_file(i), *extra])
        if self.mounts or self.mutant is not None:
            prefix = [sys.executable, "-m", "pyraft.tools.kv"]
            if a[:len(prefix)] != prefix:
                raise RuntimeError(f"cannot put the node launcher in front of {a[:len(prefix)]}")
            a = [sys.executable, NODE_PY, "--boot-id", self.boot_id(i),
                 *(["--mutant", self.mutant] if self.mutant else []), *a[len(prefix):]]
        return a

    def boot_id(self, i: int) -> str:
        """The boot id of node ``i``'s machine now: a power cut renews it, a kill -9 does not."""
        return f"{self._run_id}-node{i}-boot{self._boots[i]}"

    def _write_faults(self, i: int) -> None:
        write_fault_file(self.fault_file(i), sorted(self.network[i]), self.disk[i],
                         drop_out=sorted(self.network_out[i]), loss=self.loss[i])

    # -- network and disk

    def partition(self, groups: Sequence[Sequence[int]], bridge: int | None = None) -> None:
        """Nodes in different ``groups`` stop hearing each other; ``bridge`` (in no group) hears everyone."""
        where = {i: g for g, members in enumerate(groups) for i in members}
        with self.lock:
            for i in self.ids:
                if i == bridge or i not in where:
                    self.network[i] = frozenset()
                else:
                    self.network[i] = frozenset(j for j in self.ids if j != bridge and j in where
                                                and where[j] != where[i])
                self._write_faults(i)

    def one_way(self, senders: Sequence[int], receivers: Sequence[int]) -> None:
        """Requests from ``senders`` to ``receivers`` (and their replies) are lost; the other way works."""
        with self.lock:
            for i in senders:
                self.network_out[i] = frozenset(receivers) - {i}
                self._write_faults(i)

    def flaky(self, nodes: Sequence[int], loss: float) -> None:
        """Every message through ``nodes``' transports is lost with probability ``loss``."""
        with self.lock:
            for i in nodes:
                self.loss[i] = loss
                self._write_faults(i)

    def heal_network(self) -> None:
        with self.lock:
            for i in self.ids:
                if self.network[i] or self.network_out[i] or self.loss[i]:
                    self.network[i] = self.network_out[i] = frozenset()
                    self.loss[i] = 0.0
                    self._write_faults(i)

    def slow_disk(self, i: int, delay: float) -> None:
        with self.lock:
            self.disk[i] = delay
            self._write_faults(i)

    def heal_disks(self) -> None:
        with self.lock:
            for i in self.ids:
                if self.disk[i]:
                    self.disk[i] = 0.0
                    self._write_faults(i)

    def sever(self, a: int, b: int, timeout: float = 3.0) -> dict | None:
        """Nodes ``a`` and ``b`` stop hearing each other, cut at ``a``'s end; other faults stay (see :meth:`rejoin`).

        Returns ``a``'s metrics once it has dropped two of ``b``'s requests (a
        leader sends one every heartbeat): by then ``a`` has handled, and
        written, everything ``b`` sent it before.  A node publishes its metrics
        at the end of every turn, and the turn after the one that first showed a
        drop took in whatever had arrived before that drop.  None when this does
        not happen within ``timeout`` (``b`` sends nothing to ``a``, or ``a`` is down).
        """
        before = self.metrics(a, 1.0)
        with self.lock:
            self.network[a] |= {b}
            self._write_faults(a)
        if before is None:
            return None
        drops = [before["counters"].get("dropped_fault_filter", 0)]

        def drained(_i: int, m: dict) -> bool:
            if m["counters"].get("dropped_fault_filter", 0) > drops[-1]:
                drops.append(m["counters"]["dropped_fault_filter"])
            return len(drops) > 2

        got = self.watch([a], drained, timeout)
        return None if got is None else got[1]

    def rejoin(self, a: int, b: int) -> None:
        """Undo :meth:`sever`: ``a`` hears ``b`` again."""
        with self.lock:
            self.network[a] -= {b}
            self._write_faults(a)

    # -- processes

    def crash(self, i: int) -> None:
        """SIGKILL node ``i`` (it stays down until :meth:`restart`)."""
        with self.lock:
            self.kill(i)
            self.killed.add(i)
            self.paused.discard(i)

    def restart(self, i: int, timeout: float = 30.0) -> None:
        with self.lock:
            if i not in self.killed and self.procs[i].poll() is None:
                return
            self.start(i, wait=False)
            self.killed.discard(i)
        self.wait_ready(i, timeout)
        with self._disk_locks[i]:
            self.unpowered.discard(i)

    @contextmanager
    def reading(self, i: int) -> Iterator[bool]:
        """Hold off power cuts of node ``i`` while its files are read from outside.

        Yields False (read nothing) while the node is down after a power cut:
        what it wrote without fsync may be torn until it restarted.
        """
        with self._disk_locks[i]:
            yield i not in self.unpowered

    def power_cut(self, nodes: Sequence[int], seen: dict[int, dict] | None = None, *, writeback: float = 0.0,
                  seed: int = 0) -> tuple[dict[int, dict], list[str]]:
        """Power loss of ``nodes`` at once: SIGKILL each, then each one's filesystem forgets what was not synced.

        They stay down until :meth:`restart`, which starts them with a new boot
        id.  The nodes of ``seen`` (their metrics, just read) die first; the
        others' metrics are read, then the followers die, then the leader,
        whose view of its followers is then final.  Each unsynced page reached
        the disk before the cut with probability ``writeback`` (see
        :meth:`~powerloss.mount.LazyMount.cut`).  Returns what each filesystem
        forgot, and what each node lost that it had reported durable
        (:mod:`.durability`).
        """
        own = dict(seen or {})
        with self.lock:
            for i in own:
                self.crash(i)  # at once: what was seen must not move on (the disk is not cut yet)
        with ExitStack() as held:
            for i in sorted(nodes):
                held.enter_context(self.reading(i))
            with self.lock:
                lead = self.leader()
                for i in nodes:
                    if i not in own and i not in self.killed and i not in self.paused:
                        own[i] = self.metrics(i, 0.5)
                for i in nodes:
                    if i != lead:
                        self.crash(i)
                leader_view = self.metrics(lead, 0.5) if lead is not None else None
                if lead in nodes:
                    self.crash(lead)
                lost = {i: self.mounts[i].cut(writeback, seed + i) for i in nodes}
                for i in nodes:
                    self.unpowered.add(i)
                    self._boots[i] += 1
            problems = []
            for i in nodes:
                try:
                    disk = self.reader.call(durability.read_disk, self.data_dir(i))
                except Exception as e:  # noqa: BLE001 - reading it killed the reader: the worst case
                    problems.append(f"node {i} after a power loss: reading its stores failed: {type(e).__name__}: {e}")
                    continue
                problems += durability.check(durability.floor_from(i, own.get(i), leader_view), disk)
        for r in lost.values():
            self.forgotten.update(cuts=1, bytes=r["dropped_bytes"], names=r["undone_names"],
                                  written_back=r["written_back_bytes"])
        return lost, problems

    def release(self) -> None:
        """Stop the offline reader and unmount the lazy filesystems (after the nodes stopped and were read)."""
        self.reader.close()
        for m in self.mounts.values():
            m.close()

    def pause(self, i: int) -> None:
        with self.lock:
            if i in self.killed:
                return
            self.signal(i, signal.SIGSTOP)
            self.paused.add(i)

    def resume(self, i: int) -> None:
        with self.lock:
            self.signal(i, signal.SIGCONT)
            self.paused.discard(i)

    def heal_processes(self, timeout: float = 30.0) -> list[str]:
        """SIGCONT every node and restart every one that is down; why those that did not come up did not."""
        with self.lock:
            for i in self.ids:
                self.resume(i)
            down = [i for i in self.ids if self.procs[i].poll() is not None]
            for i in down:
                self.start(i, wait=False)
                self.killed.discard(i)
        failed = []
        for i in down:
            try:
                self.wait_ready(i, timeout)
            except NodeFailed as e:  # the run goes on without it, and is judged
                failed.append(f"node {i} did not restart when healing: {e}")
                continue
            with self._disk_locks[i]:
                self.unpowered.discard(i)
        return failed

    def heal_all(self) -> list[str]:
        """Heal the network, the disks and the processes; the nodes that did not come up (why)."""
        self.heal_network()
        self.heal_disks()
        return self.heal_processes()

    def unexpected_exits(self) -> list[tuple[int, int]]:
        """``(node, exit code)`` of nodes that exited although nobody killed them."""
        with self.lock:
            return [(i, p.returncode) for i, p in self.procs.items()
                    if p.poll() is not None and i not in self.killed]

    # -- admin operations (to the leader, following ForwardToLeader)

    def admin(self, op: str, body: dict, timeout: float = 10.0) -> Any:
        """Run ``admin.<op>`` on the leader; its reply body, or the node's error raised."""
        deadline = time.monotonic() + timeout
        lead = self.leader()
        addr = self.addrs[lead] if lead is not None else self.addrs[self.ids[0]]
        hops = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"admin.{op} got no answer within {timeout} s")
            try:
                with ZmqClient(addr, self.cluster_name, timeout=left) as c:
                    resp = c.call(ClientRequest(f"admin.{op}", {**body, "timeout": max(0.5, left - 0.5)}), left)
            except Timeout:
                raise Timeout(f"admin.{op}: no reply from {addr}") from None
            if not isinstance(resp, ClientResponse):
                raise RaftError(f"admin.{op}: unexpected reply {type(resp).__name__}")
            if resp.ok:
                return resp.body
            try:
                raise_error_response(resp)
            except ForwardToLeader as e:
                hops += 1
                if e.leader_node is None or hops > 5:
                    raise
                addr = e.leader_node.addr

    def metrics(self, i: int, timeout: float = 1.0) -> dict | None:
        try:
            with ZmqClient(self.addrs[i], self.cluster_name, timeout=timeout) as c:
                r = c.call(ClientRequest("metrics"), timeout)
        except RaftError:
            return None
        return r.body if isinstance(r, ClientResponse) and r.ok else None

    def watch(self, nodes: Sequence[int], until: Callable[[int, dict], bool],
              timeout: float) -> tuple[int, dict] | None:
        """Poll ``nodes``' metrics in turn until ``until(node, metrics)``: that node and its metrics, else None.

        One connection per node, so polls follow each other within milliseconds:
        fast enough to act on what a node just did before its next write.  A node
        that does not answer is skipped; None once ``timeout`` seconds have passed.
        """
        deadline = time.monotonic() + timeout
        with ExitStack() as stack:
            clients = {i: stack.enter_context(ZmqClient(self.addrs[i], self.cluster_name, timeout=timeout))
                       for i in nodes}
            while time.monotonic() < deadline:
                for i, client in clients.items():
                    try:
                        r = client.call(ClientRequest("metrics"), max(0.05, min(0.5, deadline - time.monotonic())))
                    except RaftError:
                        continue
                    if isinstance(r, ClientResponse) and r.ok and until(i, r.body):
                        return i, r.body
        return None

    def wait_vote(self, nodes: Sequence[int], above: int, timeout: float) -> dict[int, dict] | None:
        """Poll until one of ``nodes`` has granted its vote to another node in a term above ``above``.

        Returns ``{node: its metrics}`` as they were then (what :meth:`power_cut`
        takes as ``seen``), or None when none did within ``timeout`` seconds.
        """
        got = self.watch(nodes, lambda i, m: m["vote"]["term"] > above and m["vote"]["node_id"] not in (None, i),
                         timeout)
        return None if got is None else {got[0]: got[1]}

    def voters(self) -> set[int] | None:
        """The voters in the leader's effective membership (None: no leader answers)."""
        lead = self.leader()
        m = self.metrics(lead) if lead is not None else None
        if not m or not m.get("membership"):
            return None
        return set(m["membership"]["voters"])

    def restore_membership(self, timeout: float = 60.0) -> None:
        """Make every node a voter again (after membership faults); raises Timeout when it cannot."""
        deadline = time.monotonic() + timeout
        everyone = set(self.ids)
        last_error = "no leader"
        while time.monotonic() < deadline:
            lead = self.leader()
            m = self.metrics(lead) if lead is not None else None
            ms = (m or {}).get("membership")
            if not ms:
                time.sleep(0.2)
                continue
            voters, nodes = set(ms["voters"]), {int(k) for k in ms["nodes"]}
            joint = len(ms["configs"]) > 1
            if voters == everyone and not joint:
                return
            try:
                if not joint:
                    for i in sorted(everyone - nodes):
                        self.admin("add_learner", {"id": i, "addr": self.addrs[i]}, timeout=15)
                    self.admin("change_membership", {"voters": sorted(everyone)}, timeout=15)
                else:
                    time.sleep(0.3)  # a change in progress: its leader finishes it
            except RaftError as e:
                last_error = f"{type(e).__name__}: {e}"
                time.sleep(0.3)
        raise Timeout(f"could not make {sorted(everyone)} the voters within {timeout} s: {last_error}")


# ---------------------------------------------------------------------------
# The schedule

@dataclass
class Event:
    """One fault: what, on which nodes, when (seconds since the run started), and how it went."""

    kind: str
    detail: str
    start: float
    end: float | None = None
    error: str | None = None

    def __str__(self) -> str:
        end = "..." if self.end is None else f"{self.end:7.2f}"
        err = f"  ({self.error})" if self.error else ""
        return f"[{self.start:7.2f} - {end}] {self.kind:<10} {self.detail}{err}"


@dataclass
class Scheduler:
    """Runs the nemeses on a thread (``start()``; ``stop()`` ends the current step early and heals)."""

    cluster: FaultCluster
    kinds: Sequence[str]
    rng: random.Random
    t0: float
    log: Callable[[str], None] = lambda s: None
    overlap: float = 0.35  # chance that a step runs two different faults at once
    first: Sequence[str] = ()  # kinds run alone, in this order, before the random schedule begins
    events: list[Event] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy: set[int] = set()  # nodes a running process fault holds (guarded by _lock)
        self._voter_cut = False  # a power loss cut a voter just after its vote, writing nothing back
        self._lock = threading.Lock()
        self._events_lock = threading.Lock()

    # -- life cycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 90.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.problems.append("the nemesis thread did not stop")

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True when the run is stopping."""
        return self._stop.wait(seconds)

    def _run(self) -> None:
        try:
            queued = list(self.first)
            while not self._sleep(self.rng.uniform(0.5, 2.0)):
                self._check_exits()
                forced = queued.pop(0) if queued else None
                kinds = [forced or self._choose()]
                if forced is None and len(self.kinds) > 1 and self.rng.random() < self.overlap:
                    second = self._choose(exclude=kinds[0])
                    if second is not None:
                        kinds.append(second)
                seeds = [self.rng.randrange(1 << 30) for _ in kinds]
                threads = [threading.Thread(target=self._step, args=(k, random.Random(s)), name=f"nemesis-{k}",
                                            daemon=True) for k, s in zip(kinds, seeds)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                self._check_exits()
        except BaseException as e:  # noqa: BLE001
            self.problems.append(f"nemesis thread failed: {type(e).__name__}: {e}")
            self.log(f"nemesis thread failed: {type(e).__name__}: {e}")

    def _choose(self, exclude: str | None = None) -> str | None:
        kinds = [k for k in self.kinds if k != exclude]
        if not kinds:
            return None
        return self.rng.choices(kinds, weights=[_WEIGHTS[k] for k in kinds])[0]

    def _check_exits(self) -> None:
        for i, code in self.cluster.unexpected_exits():
            msg = f"node {i} exited by itself with code {code}:\n{self.cluster.log_tail(i, 15)}"
            self.problems.append(msg)
            self.log(f"PROBLEM: {msg}")
            try:
                self.cluster.restart(i)
            except (NodeFailed, RuntimeError) as e:
                self.problems.append(f"node {i} could not be restarted: {e}")

    def _event(self, kind: str, detail: str) -> Event:
        ev = Event(kind, detail, self._now())
        with self._events_lock:
            self.events.append(ev)
            self.counts[kind] += 1
        self.log(f"[{ev.start:7.2f}] {kind}: {detail}")
        return ev

    def _end(self, ev: Event, error: str | None = None) -> None:
        ev.end = self._now()
        ev.error = error
        if error:
            self.log(f"[{ev.end:7.2f}] {ev.kind}: {ev.detail}: {error}")

    def _step(self, kind: str, rng: random.Random) -> None:
        try:
            getattr(self, f"_do_{kind.replace('-', '_')}")(rng)
        except Exception as e:  # noqa: BLE001 - a failed fault is reported, the run goes on
            self.problems.append(f"nemesis {kind} failed: {type(e).__name__}: {e}")
            self.log(f"PROBLEM: nemesis {kind} failed: {type(e).__name__}: {e}")

    # -- choosing targets

    def _claim(self, rng: random.Random, want: int, prefer_leader: float) -> list[int]:
        """Up to ``want`` nodes no other process fault holds; the leader first with probability ``prefer_leader``."""
        lead = self.cluster.leader() if rng.random() < prefer_leader else None
        with self._lock:
            free = [i for i in self.cluster.ids if i not in self._busy]
            rng.shuffle(free)
            if lead in free:
                free.remove(lead)
                free.insert(0, lead)
            got = free[:want]
            self._busy.update(got)
        return got

    def _release(self, nodes: Sequence[int]) -> None:
        with self._lock:
            self._busy.difference_update(nodes)

    def _minority(self) -> int:
        return (len(self.cluster.ids) - 1) // 2

    # -- the faults

    def _claim_all(self, timeout: float = 10.0) -> list[int]:
        """Every node, once the faults holding some of them let go (fewer if they still hold them at ``timeout``)."""
        got: list[int] = []
        deadline = time.monotonic() + timeout
        while not self._stop.is_set():
            with self._lock:
                free = [i for i in self.cluster.ids if i not in self._busy]
                self._busy.update(free)
            got += free
            if len(got) == len(self.cluster.ids) or time.monotonic() > deadline:
                break
            self._sleep(0.1)
        return sorted(got)

    def _restart(self, nodes: Sequence[int]) -> str | None:
        """Restart ``nodes``; the last failure, also added to the problems, or None."""
        err = None
        for i in nodes:
            try:
                self.cluster.restart(i)
            except NodeFailed as e:
                err = f"node {i} did not restart: {e}"
                self.problems.append(err)
        return err

    def _do_kill(self, rng: random.Random) -> None:
        c = self.cluster
        r = rng.random()
        if r < 0.08:
            want, what = len(c.ids), "the whole cluster"
        elif r < 0.25 and self._minority() > 1:
            want, what = self._minority(), "a minority"
        else:
            want, what = 1, "one node"
        nodes = self._claim(rng, want, prefer_leader=0.5)
        if not nodes:
            return
        try:
            lead = c.leader() if want == 1 else None
            tag = " (the leader)" if lead is not None and nodes[0] == lead else ""
            ev = self._event("kill", f"SIGKILL {what}: nodes {nodes}{tag}")
            for i in nodes:
                c.crash(i)
            down = rng.uniform(3.0, 8.0) if rng.random() < 0.25 else rng.uniform(0.0, 3.0)
            again = rng.random() < 0.25
            self._sleep(down)
            err = self._restart(nodes)
            if again and err is None:
                # Again while it catches up (a snapshot install, a long append): then for good.
                self._sleep(rng.uniform(0.0, 1.5))
                for i in nodes:
                    c.crash(i)
                self._sleep(rng.uniform(0.0, 1.0))
                err = self._restart(nodes)
            ev.detail += f", down {down:.1f} s" + (", killed again while catching up" if again else "")
            self._end(ev, err)
        finally:
            self._release(nodes)

    def _do_power_one(self, rng: random.Random) -> None:
        self._power(rng, "power-one", 1)

    def _do_power_minority(self, rng: random.Random) -> None:
        self._power(rng, "power-minority", self._minority())

    def _do_power_all(self, rng: random.Random) -> None:
        self._power(rng, "power-all", len(self.cluster.ids))

    def _power(self, rng: random.Random, kind: str, want: int) -> None:
        """Power loss of ``want`` nodes at once: SIGKILL, forget what was not synced, restart 0-3 s later."""
        c = self.cluster
        whole = want == len(c.ids)
        # Until a voter has been cut just after its vote, with every write it had not synced
        # forgotten, every power loss tries to come in the middle of an election; then half of them.
        elect = not self._voter_cut or rng.random() < 0.5
        nodes = self._claim_all() if whole else self._claim(rng, want, prefer_leader=0.0 if elect else 0.5)
        try:
            if len(nodes) < want:
                return
            lead = c.leader()
            tag = " (the leader among them)" if lead in nodes and not whole else ""
            election, seen, voter = None, None, None
            voters = [i for i in nodes if i != lead]
            targets = [i for i in c.ids if i != lead and len(set(voters) - {i}) > 0]
            if elect and lead is not None and targets:
                # In the middle of an election: a node about to lose power has just granted its
                # vote, and that vote is all it wrote since (a store that does not sync a write
                # of the vote alone loses it now).  So it hears nothing more from the old
                # leader, whose entries would ride with the vote, and its disk is slow: the new
                # leader's first entries, its next write, take that long to reach its disk.
                # The new leader: the follower most up to date (a lagging one is refused).
                matched = (c.metrics(lead, 0.5) or {}).get("replication") or {}
                to = max(targets, key=lambda i: ((matched.get(str(i)) or [0, 0])[1], rng.random()))
                voter = rng.choice([i for i in voters if i != to])
                slow = rng.uniform(0.2, 0.4)
                c.slow_disk(voter, slow)
                drained = c.sever(voter, lead)
                if drained is None:
                    tag += f" (node {voter} was to vote in an election, but did not stop hearing {lead})"
                else:
                    election = threading.Thread(target=self._quietly, name="nemesis-transfer", daemon=True,
                                                args=(c.admin, "transfer_leader", {"id": to}, 3.0))
                    election.start()
                    seen = c.wait_vote([voter], drained["vote"]["term"], 3.0)
                    tag += (f" during a leadership transfer {lead} -> {to} (node {voter} cut off from {lead}, its "
                            f"disk slow: +{slow * 1000:.0f} ms a write)") + (
                        f", node {voter} cut first, just after it voted in term {seen[voter]['vote']['term']}"
                        if seen else "")
            ev = self._event(kind, f"power loss of nodes {nodes}{tag}")
            writeback = self._writeback(rng)
            lost, found = c.power_cut(nodes, seen, **writeback)
            if voter is not None:  # before it restarts
                c.slow_disk(voter, 0.0)
                c.rejoin(voter, lead)
            self._voter_cut = self._voter_cut or (seen is not None and writeback["writeback"] == 0.0)
            down = rng.uniform(0.0, 3.0)
            again = rng.random() < 0.25
            self._sleep(down)
            err = self._restart(nodes)
            if again and err is None:
                # Again while they catch up (a snapshot install, a long append, an election).
                self._sleep(rng.uniform(0.0, 1.5))
                lost2, found2 = c.power_cut(nodes, **self._writeback(rng))
                for i, r in lost2.items():
                    lost[i] = {k: lost[i][k] + r[k] for k in ("dropped_bytes", "written_back_bytes", "undone_names")}
                found += found2
                self._sleep(rng.uniform(0.0, 1.0))
                err = self._restart(nodes)
            for p in found:
                self.problems.append(p)
                self.log(f"PROBLEM: {p}")
            if election is not None:
                election.join(5)
            forgot = sum(r["dropped_bytes"] for r in lost.values())
            kept = sum(r["written_back_bytes"] for r in lost.values())
            names = sum(r["undone_names"] for r in lost.values())
            ev.detail += (f": {forgot} unsynced bytes ({kept} more written back before the cut) and {names} name "
                          f"changes forgotten, down {down:.1f} s"
                          + (", power lost again while catching up" if again else ""))
            self._end(ev, err)
        finally:
            self._release(nodes)

    @staticmethod
    def _writeback(rng: random.Random) -> dict:
        """How a cut treats unsynced pages: half the time all forgotten, else each written back by chance."""
        return {"writeback": 0.0 if rng.random() < 0.5 else rng.random(), "seed": rng.randrange(1 << 30)}

    @staticmethod
    def _quietly(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except RaftError:
            pass  # the power cut may well interrupt it

    def _do_pause(self, rng: random.Random) -> None:
        c = self.cluster
        want = 1 if self._minority() == 1 or rng.random() < 0.7 else self._minority()
        nodes = self._claim(rng, want, prefer_leader=0.6)
        if not nodes:
            return
        try:
            # Always longer than the election timeout; short ones let clients still waiting on a
            # paused leader get its answers once it resumes, before it learns it was deposed.
            hold = rng.uniform(0.7, 1.0) if rng.random() < 0.4 else rng.uniform(1.0, 3.0)
            ev = self._event("pause", f"SIGSTOP nodes {nodes} for {hold:.1f} s")
            for i in nodes:
                c.pause(i)
            try:
                self._sleep(hold)
            finally:
                for i in nodes:
                    c.resume(i)
            self._end(ev)
        finally:
            self._release(nodes)

    def _do_partition(self, rng: random.Random) -> None:
        c = self.cluster
        ids = list(c.ids)
        shape = rng.choice(["halves", "isolate-leader", "bridge", "one-way", "flaky", "flapping"])
        bridge = None
        if shape in ("one-way", "flaky"):
            return self._partial_partition(rng, shape)
        if shape == "flapping":
            return self._flapping_partition(rng)
        if shape == "isolate-leader":
            lead = c.leader()
            if lead is None:
                shape = "halves"
            else:
                groups = [[lead], [i for i in ids if i != lead]]
        if shape == "halves":
            rng.shuffle(ids)
            k = rng.randint(1, self._minority())
            groups = [sorted(ids[:k]), sorted(ids[k:])]
        elif shape == "bridge":
            rng.shuffle(ids)
            bridge = ids[0]
            rest = ids[1:]
            half = len(rest) // 2
            groups = [sorted(rest[:half]), sorted(rest[half:])]
        hold = rng.uniform(2.0, 6.0)
        where = f" through node {bridge}" if bridge is not None else ""
        ev = self._event("partition", f"{shape}: {groups[0]} | {groups[1]}{where} for {hold:.1f} s")
        c.partition(groups, bridge)
        self._hold_then_heal(hold)
        self._end(ev)

    def _hold_then_heal(self, hold: float) -> None:
        """Keep the network fault just made for ``hold`` seconds (less if the run stops), then heal."""
        try:
            self._sleep(hold)
        finally:
            self.cluster.heal_network()

    def _flapping_partition(self, rng: random.Random) -> None:
        """A new random cut (or none) every 0.1-0.6 s: elections and replication keep being interrupted."""
        c = self.cluster
        hold = rng.uniform(3.0, 8.0)
        ev = self._event("partition", f"flapping: a new random cut every 0.1-0.6 s for {hold:.1f} s")
        end = time.monotonic() + hold
        changes = 0
        try:
            while time.monotonic() < end and not self._stop.is_set():
                ids = list(c.ids)
                rng.shuffle(ids)
                r = rng.random()
                if r < 0.2:
                    c.heal_network()
                elif r < 0.6:
                    k = rng.randint(1, self._minority())
                    c.partition([ids[:k], ids[k:]])
                else:
                    rest = ids[1:]
                    c.partition([rest[:len(rest) // 2], rest[len(rest) // 2:]], bridge=ids[0])
                changes += 1
                self._sleep(rng.uniform(0.1, 0.6))
        finally:
            c.heal_network()
        ev.detail += f" ({changes} cuts)"
        self._end(ev)

    def _partial_partition(self, rng: random.Random, shape: str) -> None:
        c = self.cluster
        hold = rng.uniform(2.0, 6.0)
        if shape == "one-way":
            lead = c.leader()
            src = lead if lead is not None else rng.choice(c.ids)
            dst = [i for i in c.ids if i != src]
            ev = self._event("partition", f"one-way: node {src} cannot reach {dst} (they reach it) for {hold:.1f} s")
            c.one_way([src], dst)
        else:
            nodes = c.ids if rng.random() < 0.5 else rng.sample(c.ids, rng.randint(1, len(c.ids) - 1))
            loss = rng.uniform(0.1, 0.4)
            ev = self._event("partition", f"flaky: {loss * 100:.0f}% of messages through nodes {sorted(nodes)} lost "
                                          f"for {hold:.1f} s")
            c.flaky(nodes, loss)
        self._hold_then_heal(hold)
        self._end(ev)

    def _do_disk(self, rng: random.Random) -> None:
        c = self.cluster
        lead = c.leader() if rng.random() < 0.5 else None
        nodes = [lead] if lead is not None else rng.sample(c.ids, rng.randint(1, 2))
        delay = rng.uniform(0.02, 0.25)
        hold = rng.uniform(3.0, 8.0)
        ev = self._event("disk", f"slow log writes (+{delay * 1000:.0f} ms each) on nodes {nodes} for {hold:.1f} s")
        for i in nodes:
            c.slow_disk(i, delay)
        try:
            self._sleep(hold)
        finally:
            for i in nodes:
                c.slow_disk(i, 0.0)
        self._end(ev)

    def _do_transfer(self, rng: random.Random) -> None:
        c = self.cluster
        lead = c.leader()
        voters = c.voters()
        if lead is None or not voters:
            return
        targets = sorted(voters - {lead})
        if not targets:
            return
        to = rng.choice(targets)
        ev = self._event("transfer", f"leadership {lead} -> {to}")
        try:
            c.admin("transfer_leader", {"id": to}, timeout=6)
        except RaftError as e:
            return self._end(ev, f"{type(e).__name__}: {e}")
        self._end(ev)

    def _do_membership(self, rng: random.Random) -> None:
        c = self.cluster
        voters = c.voters()
        if voters is None:
            return
        if voters != set(c.ids):
            ev = self._event("membership", f"restore the voters {sorted(c.ids)} (now {sorted(voters)})")
            try:
                c.restore_membership(timeout=20)
            except RaftError as e:
                return self._end(ev, f"{type(e).__name__}: {e}")
            return self._end(ev)
        lead = c.leader()
        victim = lead if (lead is not None and rng.random() < 0.3) else rng.choice(sorted(voters))
        retain = rng.random() < 0.5
        hold = rng.uniform(1.0, 4.0)
        how = "to a learner" if retain else "out of the cluster"
        tag = " (the leader)" if victim == lead else ""
        ev = self._event("membership", f"remove node {victim}{tag} {how}, re-add it {hold:.1f} s later")
        try:
            c.admin("change_membership", {"voters": sorted(voters - {victim}), "retain": retain}, timeout=10)
        except RaftError as e:
            err = f"remove: {type(e).__name__}: {e}"
        else:
            err = None
        self._sleep(hold)
        try:
            c.restore_membership(timeout=30)
        except RaftError as e:
            err = (err + "; " if err else "") + f"re-add: {type(e).__name__}: {e}"
        self._end(ev, err)
