"""A batch of KV commands applies exactly as the same commands one entry at a time.

``apply_entries`` expires client sessions once per batch (and before each
command that has a session) rather than before every command; the state and
every result must not depend on where the batches begin and end, or one
replica (which applies in other batches than the leader) would differ.
Checked on random command streams, with a session lifetime short enough that
sessions expire in the middle of batches, on both KV state machines.
"""
from __future__ import annotations

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from pyraft.kv import KVStateMachine  # noqa: E402
from pyraft.kv.commands import apply_command  # noqa: E402
from pyraft.stores.memory import MemoryStateMachine, _MemoryBackend  # noqa: E402
from pyraft.types import Entry, EntryKind, LogId, Membership, Node  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TTLS = (1, 7)  # a session lives 1 or 7 log entries: many expire inside a batch
MEMBERSHIP = Membership(configs=({1, 2, 3},), nodes={i: Node(f"mem://{i}") for i in (1, 2, 3)})


def _command(rng: random.Random, seqs: dict[str, int], leases: list[int], index: int):
    keys = ["a", "b", "c", b"d", ["e", 1]]
    k = rng.choice(keys)
    roll = rng.random()
    if roll < 0.30:
        cmd = {"op": "put", "key": k, "value": rng.choice([b"x", "y", 3, None, [1, 2]])}
        if leases and rng.random() < 0.2:
            cmd["lease"] = rng.choice(leases + [999_999])
    elif roll < 0.40:
        cmd = {"op": "delete", "key": k}
    elif roll < 0.48:
        cmd = {"op": "cas", "key": k, "expected": rng.choice([None, b"x", "y"]), "value": b"z"}
    elif roll < 0.54:
        cmd = {"op": "get", "key": k}
    elif roll < 0.60:
        cmd = {"op": "txn", "compare": [{"key": k, "target": "version", "op": ">", "value": 0}],
               "success": [{"op": "delete", "key": k}, {"op": "range", "key": "a", "end": "z"}],
               "failure": [{"op": "put", "key": k, "value": b"t"}, {"op": "get", "key": "b"}]}
    elif roll < 0.65:
        cmd = {"op": "lease_grant", "ttl": 60}
        leases.append(index)  # a granted lease's id is its entry's index
    elif roll < 0.68 and leases:
        cmd = {"op": "lease_revoke", "id": rng.choice(leases)}
    elif roll < 0.72:
        return rng.choice([42, "nope", {"op": "bogus"}, {"op": "put", "key": k},
                           {"op": "put", "key": k, "value": b"v", "client": "lonely"},
                           {"op": "put", "key": k, "value": b"v", "seq": 3}])
    else:
        cmd = {"op": "put", "key": k, "value": rng.randbytes(3)}
    if rng.random() < 0.45:  # with a session: new, repeated (deduplicated) or stale sequence numbers
        client = rng.choice(["c1", "c2", "c3"])
        last = seqs.get(client, 0)
        seq = rng.choice([last + 1, last + 1, last, max(0, last - 1)])
        seqs[client] = max(last, seq)
        cmd.update(client=client, seq=seq)
    return cmd


def _stream(seed: int, n: int) -> list[Entry]:
    rng = random.Random(seed)
    seqs: dict[str, int] = {}
    leases: list[int] = []
    out = []
    for i in range(1, n + 1):
        roll = rng.random()
        if roll < 0.04:
            out.append(Entry(LogId(1, i), EntryKind.BLANK, None))
        elif roll < 0.06:
            out.append(Entry(LogId(1, i), EntryKind.MEMBERSHIP, MEMBERSHIP))
        else:
            out.append(Entry(LogId(1, i), EntryKind.NORMAL, _command(rng, seqs, leases, i)))
    return out


def _batches(entries: list[Entry], rng: random.Random | None) -> list[list[Entry]]:
    if rng is None:
        return [[e] for e in entries]
    out, i = [], 0
    while i < len(entries):
        n = rng.choice([1, 2, 3, 5, 8, 13, 40])
        out.append(entries[i:i + n])
        i += n
    return out


def _plain(results: list) -> list:
    return [(type(r).__name__, str(r)) if isinstance(r, BaseException) else r for r in results]


def _lmdb_state(sm: KVStateMachine) -> dict:
    """Every record of every database of the state machine's environment."""
    out = {}
    with sm._env.read() as txn:
        for name in sm._dbs.__slots__:
            out[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=getattr(sm._dbs, name))]
    return out


def _memory_state(sm: MemoryStateMachine) -> dict:
    st = sm._st
    return {"data": dict(st.data), "keys": list(st.keys), "sessions": sorted(st.sessions.items()),
            "events": list(st.events), "leases": dict(st.leases),
            "lease_keys": {k: sorted(v) for k, v in st.lease_keys.items() if v}}


@pytest.mark.parametrize("ttl", TTLS)
@pytest.mark.parametrize("seed", range(6))
def test_memory_state_machine_batches_apply_as_single_entries(seed, ttl):
    entries = _stream(seed, 600)
    one, many = (MemoryStateMachine(session_ttl=ttl) for _ in range(2))
    r1 = [r for b in _batches(entries, None) for r in one.apply(b)]
    r2 = [r for b in _batches(entries, random.Random(seed)) for r in many.apply(b)]
    # The reference: apply_command before every command, as each entry was applied before batching.
    ref = MemoryStateMachine(session_ttl=ttl)
    backend = _MemoryBackend(ref._st)
    r0 = [apply_command(backend, e.index, e.payload, ttl) if e.kind == EntryKind.NORMAL else None
          for e in entries]
    assert _plain(r0) == _plain(r1) == _plain(r2)
    assert _memory_state(ref) == _memory_state(one) == _memory_state(many)
    assert one.applied_state() == many.applied_state()
    assert any(isinstance(r, BaseException) for r in r1) and any(r is None for r in r1)
    txns = [r for e, r in zip(entries, r1) if type(e.payload) is dict and e.payload.get("op") == "txn"]
    assert txns and any(type(r) is list for r in txns), "the stream's transactions must run, not be refused"
    assert many.applied_state()[1] is not None  # a membership entry was applied


@pytest.mark.parametrize("ttl", TTLS)
@pytest.mark.parametrize("seed", range(3))
def test_lmdb_state_machine_batches_apply_as_single_entries_and_as_memory(tmp_path, seed, ttl):
    entries = _stream(100 + seed, 500)
    one = KVStateMachine(str(tmp_path / "one"), session_ttl=ttl)
    many = KVStateMachine(str(tmp_path / "many"), session_ttl=ttl)
    mem = MemoryStateMachine(session_ttl=ttl)
    try:
        r1 = [r for b in _batches(entries, None) for r in one.apply(b)]
        r2 = [r for b in _batches(entries, random.Random(seed)) for r in many.apply(b)]
        r3 = [r for b in _batches(entries, random.Random(seed + 50)) for r in mem.apply(b)]
        assert _plain(r1) == _plain(r2) == _plain(r3)
        s1, s2 = _lmdb_state(one), _lmdb_state(many)
        assert s1 == s2
        assert s1["sessions"] or ttl == 1, "the stream must leave live sessions to compare"
        assert one.items() == many.items() == mem.items()
    finally:
        one.close()
        many.close()


@pytest.mark.parametrize("kwargs", [{"session_ttl": 0}, {"session_ttl": -5}, {"session_ttl": 2.5},
                                    {"session_ttl": True}, {"session_ttl": "7"}, {"watch_history": 0},
                                    {"watch_history": 1.0}])
def test_both_state_machines_refuse_the_same_bad_lifetimes(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MemoryStateMachine(**kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        KVStateMachine(str(tmp_path / "kv"), **kwargs)
