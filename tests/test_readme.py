"""The README's two set-up commands are the ones CI runs."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)
            for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_shows_exactly_two_setup_commands():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    assert "pyraft-kv demo" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _setup_commands()[1] in ci


def _guide_namespace() -> dict:
    """Execute the README's own-state-machine example and return its names."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own state machine in LMDB", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    ns: dict = {}
    exec(compile(code, "README.md (state machine guide)", "exec"), ns)
    return ns


def test_the_readme_lmdb_state_machine_runs_a_cluster_restarts_and_installs_a_snapshot(tmp_path):
    import pytest
    from pyraft import Config, Node, Raft, ServerState
    from pyraft.stores.lmdb import LmdbLogStore
    from pyraft.transports.memory import MemoryNetwork
    from memcluster import wait_until

    Tally = _guide_namespace()["TallyStateMachine"]
    cfg = Config(heartbeat_interval=0.03, election_timeout=(0.25, 0.5), snapshot_every=None,
                 max_in_snapshot_log_to_keep=0, snapshot_chunk_size=64)
    net = MemoryNetwork()
    nodes = {i: Node(f"mem://{i}") for i in (1, 2, 3, 4)}
    rafts: dict = {}

    def start(i):
        d = tmp_path / f"n{i}"
        rafts[i] = Raft(i, cfg, net.transport(i), LmdbLogStore(d), Tally(str(d)))
        return rafts[i]

    try:
        for i in (1, 2, 3):
            start(i)
        rafts[1].initialize({i: nodes[i] for i in (1, 2, 3)})
        leader = wait_until(lambda: next((r for r in rafts.values() if r.is_leader()), None), 10, "a leader")
        totals = [leader.client_write({"add": f"c{i % 3}", "n": i}, timeout=10).result for i in range(30)]
        assert totals[-1] == sum(i for i in range(30) if i % 3 == 2)
        with pytest.raises(ValueError):
            leader.client_write({"add": "x"}, timeout=10)  # a bad command is refused, the node goes on
        # Restart a follower over its directory: the counters and last_applied come back from LMDB.
        f = next(i for i in rafts if i != leader.node_id)
        applied = rafts[f].wait(10).applied_index_at_least(leader.metrics().last_log_index).last_applied
        rafts[f].shutdown()
        rafts[f].log_store.close()
        rafts[f].state_machine.close()
        r = start(f)
        assert r.state_machine.applied_state()[0] == applied
        assert r.state_machine.get("c2") == totals[-1]
        # Snapshot and purge on the leader; a new learner catches up through the snapshot.
        leader.trigger.snapshot()
        leader.wait(10).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= applied.index, "a snapshot")
        wait_until(lambda: leader.trigger.purge_log(applied.index) or leader.metrics().purged, 10, "a purge")
        start(4)
        leader.add_learner(4, nodes[4], blocking=True, timeout=20)
        rafts[4].wait(10).applied_index_at_least(applied.index)
        assert rafts[4].metrics().state == ServerState.LEARNER
        assert rafts[4].state_machine.get("c2") == totals[-1]
        assert rafts[4].metrics().snapshot is not None
    finally:
        for r in rafts.values():
            r.shutdown()
            r.log_store.close()
            r.state_machine.close()
        net.close()
