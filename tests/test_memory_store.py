"""MemoryLogStore and MemoryStateMachine (test-only stores) against the storage contracts."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers_store import Applier, KVContract, LogStoreContract, ent, ents, put  # noqa: E402

from pyraft.engine.commands import AppendToLog, SaveVote  # noqa: E402
from pyraft.errors import CodecError  # noqa: E402
from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine  # noqa: E402
from pyraft.types import LogId, Vote  # noqa: E402


class TestMemoryLogStoreContract(LogStoreContract):
    @pytest.fixture
    def store(self):
        return MemoryLogStore()


class TestMemoryStateMachineContract(KVContract):
    @pytest.fixture
    def make_sm(self):
        return lambda name, **kw: MemoryStateMachine(**kw)


def test_memory_log_store_keeps_its_data_through_close_for_simulated_restarts():
    s = MemoryLogStore()
    s.write([SaveVote(Vote(2, 1)), AppendToLog(ents(1, 4))])
    s.close()
    assert s.read_vote() == Vote(2, 1)
    assert s.read(1, 10) == ents(1, 4)


def test_memory_log_store_returns_fresh_copies_of_entries():
    s = MemoryLogStore()
    payload = {"list": [1, 2]}
    s.write([AppendToLog([ent(1, 1, payload)])])
    payload["list"].append(3)                      # the caller's object changes later...
    got = s.read(1, 2)[0]
    assert got.payload == {"list": [1, 2]}         # ...the stored entry does not
    got.payload["list"].append(4)
    assert s.read(1, 2)[0].payload == {"list": [1, 2]}


def test_memory_state_machine_keeps_its_state_through_close():
    sm = MemoryStateMachine()
    Applier(sm)(put("a", 1))
    sm.close()
    assert sm.get("a") == 1
    assert sm.applied_state()[0] == LogId(1, 1)


def test_memory_state_machine_rejects_a_malformed_snapshot_and_keeps_its_state():
    sm = MemoryStateMachine()
    Applier(sm)(put("a", 1))
    src = MemoryStateMachine()
    meta = src.build_snapshot()
    sink = sm.begin_receiving_snapshot()
    sink.write(b"\x93garbage")
    with pytest.raises(CodecError):
        sm.install_snapshot(meta, sink)
    assert sm.items() == [("a", 1)]
    assert sm.applied_state()[0] == LogId(1, 1)
