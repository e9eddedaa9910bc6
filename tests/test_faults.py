"""Fault-injection runs (Jepsen-style) against ``pyraft-kv serve`` processes: short ones here.

Each scenario starts a local cluster, drives concurrent KVClients, injects
one family of faults (or all of them) for a few seconds, heals, and checks
that the history is linearizable per key, that no acknowledged write was
lost, that the logs agree up to the commit index and that the state
machines match.  See ``tests/faults/`` and ``docs/testing.md``; the long runs
are ``cd tests && python -m faults`` and the ``soak`` tests below.

``PYRAFT_SEED`` changes the seed of every scenario.
"""
from __future__ import annotations

import json
import os
import stat

import pytest

from faults import durability
from faults.runner import (RAFT_CONFIG, LogAuditor, RunConfig, check_acknowledged, check_election_safety,
                           check_logs, run, scan_node_logs, varied_config)
from pyraft.checker import Op
from pyraft.tools.faults import FaultControl, write_fault_file
from pyraft.types import EntryKind

SEED = int(os.environ.get("PYRAFT_SEED", "1"))


def _run(tmp_path, **kw) -> None:
    cfg = RunConfig(base_dir=str(tmp_path / "run"), verbose=True, **kw)
    result = run(cfg)
    print(result.summary())
    assert result.ok, result.summary()
    assert result.ops["ok"] > 100, result.summary()


# ---------------------------------------------------------------------------
# Short scenarios (the default suite)

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_and_restart_nodes_and_the_leader(tmp_path):
    _run(tmp_path, nemeses=("kill",), duration=15, seed=SEED)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pauses_longer_than_the_election_timeout(tmp_path):
    _run(tmp_path, nemeses=("pause",), duration=12, seed=SEED)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_partitions_majority_minority_isolated_leader_bridge(tmp_path):
    _run(tmp_path, nemeses=("partition",), duration=15, seed=SEED)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mixed_faults_with_membership_changes_transfers_and_a_slow_disk(tmp_path):
    _run(tmp_path, nemeses=("kill", "pause", "partition", "disk", "transfer", "membership"), duration=20,
         seed=SEED)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_lease_reads_under_pauses_partitions_kills_and_transfers(tmp_path):
    """Config.lease_reads: a paused or cut-off leader's lease must end before anyone else is
    elected, and no read served under it may miss an acknowledged write."""
    _run(tmp_path, nemeses=("pause", "partition", "kill", "transfer"), duration=15, seed=SEED,
         raft_config=dict(RAFT_CONFIG, lease_reads=True))


# ---------------------------------------------------------------------------
# Long runs: pytest -m soak tests/test_faults.py

@pytest.mark.soak
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("nodes", [3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_soak_mixed_faults(tmp_path, nodes, seed):
    _run(tmp_path, nodes=nodes, duration=180, seed=seed)


@pytest.mark.soak
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("seed", range(100, 106))
def test_soak_mixed_faults_with_varied_node_config(tmp_path, seed):
    _run(tmp_path, nodes=3 + 2 * (seed % 2), duration=180, seed=seed, raft_config=varied_config(seed))


# ---------------------------------------------------------------------------
# The checks themselves, on made-up data

def _op(client, op, key, args, t0, t1, result=None):
    return Op(client, op, key, tuple(args), t0, t1, result)


def test_an_acknowledged_write_missing_at_the_end_is_reported():
    ops = [_op(1, "put", "k", ["a"], 0.0, 1.0), _op(2, "put", "k", ["b"], 2.0, 3.0)]
    assert check_acknowledged(ops, ["ok", "ok"], {"k": "b"}) == []
    lost = check_acknowledged(ops, ["ok", "ok"], {"k": "a"})
    assert len(lost) == 1 and "'b'" in lost[0]


def test_a_write_that_may_come_later_supersedes_an_acknowledged_one():
    # b was acknowledged; c (indeterminate, called before b returned) may have landed after it.
    ops = [_op(1, "put", "k", ["b"], 0.0, 1.0), _op(2, "put", "k", ["c"], 0.5, None)]
    assert check_acknowledged(ops, ["ok", "indeterminate"], {"k": "c"}) == []
    # A delete counts as a write of "absent"; a cas that did not swap wrote nothing.
    ops = [_op(1, "delete", "k", [], 0.0, 1.0, True), _op(2, "cas", "k", [None, "x"], 2.0, 3.0, False)]
    assert check_acknowledged(ops, ["ok", "ok"], {"k": None}) == []
    assert check_acknowledged(ops, ["ok", "ok"], {"k": "x"})


def test_logs_that_differ_at_a_committed_index_are_reported():
    n = EntryKind.NORMAL
    a = {1: (1, n, "x"), 2: (1, n, "y"), 3: (2, n, "z")}
    b = {1: (1, n, "x"), 2: (1, n, "y"), 3: (3, n, "w")}
    assert check_logs({1: a, 2: b}, {1: 2, 2: 2}) == []  # index 3 is not committed on both: may differ
    assert check_logs({1: a, 2: b}, {1: 3, 2: 3})
    # Same term at index 3 but different entries below it: Log Matching is broken.
    c = {1: (1, n, "x"), 2: (1, n, "DIFFERENT"), 3: (2, n, "z")}
    probs = check_logs({1: a, 3: c}, {1: 1, 3: 1})
    assert probs and "Log Matching" in probs[0]
    # Purged prefixes: only indexes both still hold are compared.
    d = {3: (2, n, "z")}
    assert check_logs({1: a, 4: d}, {1: 3, 4: 3}) == []


def test_the_log_auditor_reports_a_committed_entry_that_changed():
    class _C:
        ids = [1, 2]
    a = LogAuditor(_C())
    n = EntryKind.NORMAL
    a._check(1, 5, (2, n, {"op": "put"}))
    a._check(2, 5, (2, n, {"op": "put"}))
    assert a.problems == []
    a._check(2, 6, (2, n, "x"))
    a._check(1, 6, (3, n, "y"))
    assert len(a.problems) == 1 and "committed entry 6 differs" in a.problems[0]


def test_errors_in_the_node_logs_are_reported(tmp_path):
    a, b = tmp_path / "node1.log", tmp_path / "node2.log"
    a.write_text("2026-01-01 10:00:00,000 INFO    node-1 pyraft.runtime: node 1: Leader in term 2, leader 1\n"
                 "2026-01-01 10:00:00,000 WARNING node-1 pyraft.faults: node 1: FAULT INJECTION: dropping ...\n")
    b.write_text("2026-01-01 10:00:00,000 ERROR   node-2 pyraft.runtime: thread pyraft-sm-2 died\n"
                 "Traceback (most recent call last):\n"
                 "2026-01-01 10:00:00,000 WARNING node-2 pyraft.runtime: node 2: dropped an invalid "
                 "AppendEntriesRequest from 1: ...\n")
    assert scan_node_logs({1: str(a)}) == []
    probs = scan_node_logs({1: str(a), 2: str(b)})
    assert len(probs) == 3 and all(p.startswith("node 2 logged") for p in probs)


def test_power_nemeses_are_asked_for_by_name_and_put_the_data_on_lazy_filesystems():
    from faults.nemesis import NEMESES, POWER_NEMESES, parse_nemeses
    assert parse_nemeses("all") == NEMESES and parse_nemeses("power") == POWER_NEMESES
    assert parse_nemeses("all,power") == NEMESES + POWER_NEMESES
    assert parse_nemeses("kill,power-all") == ("kill", "power-all")
    with pytest.raises(ValueError):
        parse_nemeses("power-some")
    assert RunConfig(nemeses=("power-one",)).lazyfs == "strict" and RunConfig().lazyfs is None
    assert RunConfig(nemeses=("kill", "power-all"), lazyfs="ext4").lazyfs == "ext4"


def test_two_leaders_in_one_term_are_reported(tmp_path):
    a, b = tmp_path / "node1.log", tmp_path / "node2.log"
    a.write_text("... INFO    node-1 pyraft.runtime: node 1: Leader in term 2, leader 1\n"
                 "... INFO    node-1 pyraft.runtime: node 1: Follower in term 3, leader 2\n")
    b.write_text("... INFO    node-2 pyraft.runtime: node 2: Leader in term 3, leader 2\n")
    assert check_election_safety({1: str(a), 2: str(b)}) == []
    b.write_text("... INFO    node-2 pyraft.runtime: node 2: Leader in term 2, leader 2\n")
    probs = check_election_safety({1: str(a), 2: str(b)})
    assert probs == ["Election Safety: nodes [1, 2] were all leader in term 2"]


def test_what_a_node_reported_durable_must_survive_its_power_loss():
    own = {"id": 2, "vote": {"term": 5, "node_id": 1}, "committed": [5, 40]}
    leader = {"id": 1, "committed": [5, 90], "replication": {"2": [5, 100], "3": [5, 60]}}
    floor = durability.floor_from(2, own, leader)
    assert (floor.vote_term, floor.vote_for, floor.index) == (5, 1, 90)  # acknowledged and committed
    assert durability.floor_from(3, None, leader).index == 60
    assert durability.check(floor, durability.OnDisk(5, 1, 90)) == []
    assert durability.check(floor, durability.OnDisk(6, None, 95)) == []   # a later term is fine
    lost = durability.check(floor, durability.OnDisk(4, 1, 89))
    assert len(lost) == 2 and "term went back" in lost[0] and "entries 90..90 are gone" in lost[1]
    assert "vote in term 5 changed" in durability.check(floor, durability.OnDisk(5, 3, 90))[0]


class _FakeTransport:
    def __init__(self):
        self.filter = None

    def set_fault_filter(self, f):
        self.filter = f


class _FakeStore:
    write_delay = 0.0


def test_fault_control_file_drops_peers_and_slows_the_disk(tmp_path):
    path = tmp_path / "faults.json"
    t, s = _FakeTransport(), _FakeStore()
    fc = FaultControl(path, t, s, node_id=1)
    assert fc.poll_once() is False and t.filter is None  # no file: no faults
    write_fault_file(path, [2, 3], 0.05)
    assert fc.poll_once() is True
    assert t.filter("send", 2, None) and t.filter("request", 3, None) and t.filter("reply", 2, None)
    assert not t.filter("send", 4, None)
    assert not t.filter("request", 0, None)  # clients (id 0) are never cut off
    assert s.write_delay == 0.05
    assert fc.poll_once() is False  # unchanged
    write_fault_file(path, [], 0.0)
    assert fc.poll_once() is True and t.filter is None and s.write_delay == 0.0
    # Garbage keeps the last good state; a file other users may write is ignored.
    path.write_text("{not json")
    assert fc.poll_once() is False
    path.write_text(json.dumps({"drop": [2]}))
    os.chmod(path, 0o666)
    assert fc.poll_once() is False and t.filter is None
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    path.write_text(json.dumps({"drop": [2]}))
    assert fc.poll_once() is True and t.filter("send", 2, None)
    path.unlink()
    assert fc.poll_once() is True and t.filter is None
    # One-way: this node's requests to 3 (and their replies) are lost; 3's requests still arrive.
    write_fault_file(path, drop_out=[3])
    assert fc.poll_once() is True
    assert t.filter("send", 3, None) and t.filter("recv", 3, None)
    assert not t.filter("request", 3, None) and not t.filter("reply", 3, None)
    # Loss: every message, clients' included, with that probability.
    write_fault_file(path, loss=1.0)
    assert fc.poll_once() is True and t.filter("request", 0, None) and t.filter("send", 2, None)
    write_fault_file(path, loss=0.0)
    assert fc.poll_once() is True and t.filter is None


def test_lmdb_log_store_write_delay_hook(tmp_path):
    import time

    from pyraft.engine.commands import SaveVote
    from pyraft.stores.lmdb import LmdbLogStore
    from pyraft.types import Vote
    with LmdbLogStore(tmp_path / "d") as store:
        assert store.write_delay == 0.0
        store.write_delay = 0.2
        t0 = time.monotonic()
        store.write([SaveVote(Vote(1, 1))])
        assert time.monotonic() - t0 >= 0.2
        assert store.read_vote() == Vote(1, 1)
    with LmdbLogStore(tmp_path / "e", write_delay=0.1) as store:
        assert store.write_delay == 0.1
