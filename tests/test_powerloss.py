"""Power loss: pyraft's stores and clusters on the lazy filesystem (tests/powerloss/), which forgets unsynced writes.

- A fresh node's stores keep everything they acknowledged through a power cut,
  under the strict POSIX rule too (the directory fsyncs of issue 19).
- A short fault run: a ``pyraft-kv serve`` cluster, each node's data on its own
  lazy mount, nodes losing power one, a minority, and all at once; no
  acknowledged write lost, logs agree, linearizable history.

Skipped, with the reason, where FUSE cannot be mounted; failed under ``CI=true``.
The mutants that these runs catch, and how often: docs/power-loss.md.
"""
from __future__ import annotations

import os

import pytest

from powerloss.mount import LazyMount, require_fuse

SEED = int(os.environ.get("PYRAFT_SEED", "1"))


@pytest.fixture
def strict_mount(tmp_path):
    require_fuse()
    m = LazyMount(str(tmp_path / "disk"), str(tmp_path / "mnt"), "strict")
    yield m
    m.close()


@pytest.mark.timeout(120)
def test_a_fresh_nodes_stores_keep_what_they_acknowledged_through_a_power_cut_under_strict_posix(strict_mount):
    from pyraft.engine.commands import AppendToLog, SaveCommitted, SaveVote
    from pyraft.kv import KVStateMachine
    from pyraft.stores.lmdb import LmdbLogStore
    from pyraft.types import Entry, LogId, Vote

    # The node's data directory is new, below a directory that is new too: every name on
    # the way down has to be made durable by the stores themselves.
    data = os.path.join(strict_mount.mountpoint, "cluster", "node1")
    entries = [Entry(LogId(2, i), payload={"op": "put", "key": f"k{i}", "value": i}) for i in range(1, 534)]
    log, sm = LmdbLogStore(data, node_id=1), KVStateMachine(data)
    log.write([SaveVote(Vote(2, 1))])
    log.write([AppendToLog(entries), SaveCommitted(LogId(2, 533))])
    sm.apply(entries)
    snap = sm.build_snapshot()
    log.close()
    sm.close()

    strict_mount.cut()

    log, sm = LmdbLogStore(data, node_id=1), KVStateMachine(data)
    try:
        assert log.read_vote() == Vote(2, 1)
        assert log.log_state().last_log_id == LogId(2, 533) and log.read_committed() == LogId(2, 533)
        assert sm.applied_state()[0] == LogId(2, 533) and sm.get("k533") == 533 and len(sm) == 533
        assert sm.current_snapshot() == snap
        with sm.open_snapshot()[1] as f:
            assert len(f.read()) > 533 * 8
    finally:
        log.close()
        sm.close()


@pytest.mark.timeout(120)
def test_data_directories_and_files_are_private(tmp_path):
    # Issue 15: data dirs 0700, LMDB files and lock files 0600 (even with a permissive umask).
    from pyraft.kv import KVStateMachine
    from pyraft.objects import ObjectStateMachine, ReplCounter
    from pyraft.stores.lmdb import LmdbLogStore

    old = os.umask(0)
    try:
        data = tmp_path / "new" / "node"
        LmdbLogStore(data).close()
        sm = KVStateMachine(data)
        sm.build_snapshot()
        sm.close()
        ObjectStateMachine(ReplCounter(), path=str(tmp_path / "objects")).close()
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(tmp_path):
        for d in dirs:
            assert os.stat(os.path.join(root, d)).st_mode & 0o777 == 0o700, os.path.join(root, d)
        for f in files:
            assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o600, os.path.join(root, f)


# ---------------------------------------------------------------------------
# A short power-loss run (the long ones: python -m pyraft.tools.faults --nemesis all,power)

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_power_losses_of_one_node_a_minority_and_the_whole_cluster(tmp_path):
    from faults.runner import POWER_NEMESES, RunConfig, run

    require_fuse()
    cfg = RunConfig(base_dir=str(tmp_path / "run"), nemeses=POWER_NEMESES, duration=20, seed=SEED,
                    lazyfs="strict", first_faults=("power-all",))
    result = run(cfg)
    print(result.summary())
    assert result.ok, result.summary()
    assert result.ops["ok"] > 100 and result.faults["power-all"] >= 1, result.summary()
    assert result.forgotten["cuts"] >= 3, result.summary()
