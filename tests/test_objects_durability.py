"""ObjectStateMachine commits without fsync (the log makes applied calls recoverable): what a crash keeps.

docs/objects.md, "What a node keeps after a crash".
"""
from __future__ import annotations

import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers_store import spawn_python  # noqa: E402
from powerloss.mount import LazyMount, require_fuse  # noqa: E402

from pyraft import Config, Node, Raft, ServerState  # noqa: E402
from pyraft.engine.commands import PurgeLog  # noqa: E402
from pyraft.objects import ObjectStateMachine, ReplList  # noqa: E402
from pyraft.stores.lmdb import LmdbLogStore  # noqa: E402
from pyraft.transports.memory import MemoryNetwork  # noqa: E402

pytestmark = pytest.mark.timeout(120)

CFG = dict(heartbeat_interval=0.02, election_timeout=(0.1, 0.2), snapshot_every=40, max_in_snapshot_log_to_keep=0)

# One node with its log and its objects in LMDB; appends 0, 1, 2, ... one call at a time and
# prints each acknowledged one, until it is killed.  Snapshots (and log purges) every 40 entries.
CALLER = r"""
import sys
from pyraft import Config, Node, Raft, ServerState
from pyraft.objects import ObjectStateMachine, ReplList
from pyraft.stores.lmdb import LmdbLogStore
from pyraft.transports.memory import MemoryNetwork
cfg = Config(**eval(sys.argv[2]))
lst = ReplList(name="l")
sm = ObjectStateMachine(lst, path=sys.argv[1])
raft = Raft(1, cfg, MemoryNetwork().transport(1), LmdbLogStore(sys.argv[1]), sm)
sm.attach(raft)
raft.initialize({1: Node("mem://1")})
raft.wait(10).state(ServerState.LEADER)
i = 0
while True:
    lst.append(i, timeout=10)
    print("ACK", i, flush=True)
    i += 1
"""


def _restart(path: str) -> tuple[Raft, ObjectStateMachine, ReplList, LmdbLogStore]:
    lst = ReplList(name="l")
    sm = ObjectStateMachine(lst, path=path)
    log_store = LmdbLogStore(path)
    raft = Raft(1, Config(**CFG), MemoryNetwork().transport(1), log_store, sm)
    sm.attach(raft)
    raft.wait(10).state(ServerState.LEADER)
    return raft, sm, lst, log_store


def _run_and_kill(path: str) -> int:
    """Run CALLER on ``path`` until 300 calls are acknowledged, SIGKILL it mid-call; the last acknowledged."""
    child = spawn_python(CALLER, path, repr(CFG))
    acked = -1
    try:
        for line in child.stdout:
            acked = int(line.split()[1])
            if acked >= 300:
                break
        assert acked >= 300, child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)  # mid-call: the next append may or may not have committed
        child.wait(timeout=10)
        child.stdout.close()
        child.stderr.close()
    return acked


def _restart_and_check(path: str, acked: int) -> None:
    raft, sm, lst, log_store = _restart(path)
    try:
        assert sm.current_snapshot() is not None and sm.current_snapshot().last_log_id.index >= 200
        raft.wait(10).metrics(lambda m: m.last_applied.index == m.last_log_index, "the log to be applied")
        got = lst.to_list()
        # Every acknowledged call once, in order; at most the one in flight at the kill after them.
        assert got[:acked + 1] == list(range(acked + 1))
        assert got[acked + 1:] in ([], [acked + 1])
        lst.append("after", timeout=10)
        assert lst.to_list()[-1] == "after"
    finally:
        raft.shutdown()
        sm.close()
        log_store.close()
    assert not os.path.exists(os.path.join(path, "objects.boot"))  # a clean close synced and said so


@pytest.mark.parametrize("reboot", [False, True], ids=["process-crash", "machine-reboot"])
def test_kill_9_after_acknowledged_calls_keeps_each_exactly_once(tmp_path, monkeypatch, caplog, reboot):
    acked = _run_and_kill(str(tmp_path))
    if reboot:
        # Another boot id: the objects' unsynced LMDB may be torn, so it is rebuilt from
        # the newest snapshot file and the log replays the rest.
        monkeypatch.setattr("pyraft.snapshot_files.boot_id", lambda: "another-boot")
    _restart_and_check(str(tmp_path), acked)
    assert ("rebuilding it from the newest snapshot" in caplog.text) == reboot


def test_the_log_is_purged_only_up_to_what_the_objects_hold_durably(tmp_path):
    """Every PurgeLog reaches the log store after the objects' LMDB was fsynced at least that far."""
    synced = [0]  # the applied index at the last fsync of the objects' environment
    purges: list[tuple[int, int]] = []

    class SpyLog(LmdbLogStore):
        def write(self, ops):
            purges.extend((op.upto.index, synced[0]) for op in ops if isinstance(op, PurgeLog))
            return super().write(ops)

    lst = ReplList(name="l")
    sm = ObjectStateMachine(lst, path=tmp_path)
    env_sync = sm._env.sync

    def sync():
        applied = sm.applied_state()[0]
        env_sync()
        synced[0] = max(synced[0], applied.index if applied else 0)

    sm._env.sync = sync
    log_store = SpyLog(tmp_path)
    raft = Raft(1, Config(**CFG), MemoryNetwork().transport(1), log_store, sm)
    try:
        sm.attach(raft)
        raft.initialize({1: Node("mem://1")})
        raft.wait(10).state(ServerState.LEADER)
        for i in range(150):
            lst.append(i, timeout=10)
        raft.wait(10).metrics(lambda m: m.purged is not None and m.purged.index >= 100, "purges")
    finally:
        raft.shutdown()
        sm.close()
        log_store.close()
    assert purges and all(upto <= durable for upto, durable in purges), purges


@pytest.mark.parametrize("writeback", [0.0, 0.5], ids=["nothing-written-back", "half-written-back"])
def test_a_power_cut_after_kill_9_keeps_each_acknowledged_call_exactly_once(tmp_path, monkeypatch, caplog,
                                                                           writeback):
    """The same on the power-loss filesystem: what was not fsynced is gone, the machine reboots, the log replays.

    With ``writeback`` a share of the unsynced pages reached the disk before the
    cut (the kernel writes dirty pages back in its own order), so objects.lmdb/
    may be torn: only the rebuild on the new boot id makes the calls come back
    right.
    """
    require_fuse()
    # ext4's rule (a sync makes the name changes before it durable): this test is about the
    # objects' unsynced commits, not about directory fsyncs
    mount = LazyMount(str(tmp_path / "disk"), str(tmp_path / "mnt"), "ext4")
    try:
        data = os.path.join(mount.mountpoint, "node1")
        acked = _run_and_kill(data)
        cut = mount.cut(writeback, seed=7)  # the machine loses power right after the process died
        assert cut["dropped_bytes"] + cut["written_back_bytes"] > 0  # the objects' commits since their last fsync, at least
        monkeypatch.setattr("pyraft.snapshot_files.boot_id", lambda: "the-boot-after-the-cut")
        _restart_and_check(data, acked)
        assert "rebuilding it from the newest snapshot" in caplog.text
    finally:
        mount.close()
