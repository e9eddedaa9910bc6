"""The short ways of applying KV commands change no result and no stored byte.

``apply_entries`` applies the common put itself (``_plain_put``) rather than
through ``apply_command``, and ``KVStateMachine`` keeps decoded sessions from
batch to batch (``_LmdbBackend.session_memo``).  Replicas running code with and
without them must stay identical: the same random mix of commands, full of
puts that take the short way and puts that only nearly qualify (a lease, a
bad key or value, bad or repeated session fields, an extra field), is applied
with and without them, and every result and every record of every database
must be the same.
"""
from __future__ import annotations

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_kv_apply_batches import _batches, _lmdb_state, _memory_state, _plain  # noqa: E402

from pyraft.kv import KVStateMachine  # noqa: E402
from pyraft.kv import commands, statemachine  # noqa: E402
from pyraft.stores.memory import MemoryStateMachine  # noqa: E402
from pyraft.types import Entry, EntryKind, LogId  # noqa: E402

pytestmark = pytest.mark.timeout(120)

KEYS = ["a", "b", "é", b"c", b"\x00d", "x" * 127, "x" * 128, b"y" * 510, b"y" * 511, "\ud800", 7, ["e", 1], None]
VALUES = [b"v", b"", "s", "\udc80", 0, -1, 2**64 - 1, 2**64, -2**63 - 1, 1.5, float("-inf"), True, False, None,
          [1, [2]], {"m": 1}, [[[[]]]] * 2]
CLIENTS = ["c1", "c2", b"c3", "c4" * 300, ["c5"], "\ud800"]


def _put(rng: random.Random, index: int, leases: list[int], seqs: dict) -> dict:
    cmd = {"op": "put", "key": rng.choice(KEYS), "value": rng.choice(VALUES)}
    roll = rng.random()
    if roll < 0.05:
        cmd["lease"] = rng.choice(leases + [0, 999_999])
    elif roll < 0.08:
        cmd["other"] = 1  # an unknown field: ignored
    elif roll < 0.10:
        del cmd[rng.choice(["key", "value"])]
    if rng.random() < 0.6:
        client = rng.choice(CLIENTS) if rng.random() < 0.1 else rng.choice(CLIENTS[:3])
        last = seqs.get(repr(client), 0)
        seq = rng.choice([last + 1] * 6 + [last, last, max(0, last - 1), -1, "3", 1.0, True])
        if type(seq) is int and seq > last:
            seqs[repr(client)] = seq
        roll = rng.random()
        if roll < 0.03:
            cmd["client"] = client  # without seq
        elif roll < 0.06:
            cmd["seq"] = seq  # without client
        else:
            cmd.update(client=client, seq=seq)
    return cmd


def _stream(seed: int, n: int) -> list[Entry]:
    rng = random.Random(seed)
    leases: list[int] = []
    seqs: dict = {}
    out = []
    for i in range(1, n + 1):
        roll = rng.random()
        if roll < 0.75:
            cmd = _put(rng, i, leases, seqs)
        elif roll < 0.80:
            cmd = {"op": "lease_grant", "ttl": 60}
            leases.append(i)
        elif roll < 0.83 and leases:
            cmd = {"op": "lease_revoke", "id": rng.choice(leases)}
        elif roll < 0.90:
            cmd = {"op": "delete", "key": rng.choice(KEYS)}
        elif roll < 0.95:
            cmd = {"op": "get", "key": rng.choice(KEYS), "client": "c1", "seq": seqs.get(repr("c1"), 0)}
        elif roll < 0.97:
            cmd = {"op": "txn", "compare": [], "success": [{"op": "range", "key": "a", "end": "z"}]}
        else:
            out.append(Entry(LogId(1, i), EntryKind.BLANK, None))
            continue
        out.append(Entry(LogId(1, i), EntryKind.NORMAL, cmd))
    return out


@pytest.fixture
def short_way_taken(monkeypatch):
    """How many commands _plain_put applied."""
    done = [0]
    plain_put = commands._plain_put

    def counted(*args):
        ok = plain_put(*args)
        done[0] += ok
        return ok
    monkeypatch.setattr(commands, "_plain_put", counted)
    return done


def _long_way(monkeypatch) -> None:
    monkeypatch.setattr(commands, "_plain_put", lambda *args: False)
    monkeypatch.setattr(statemachine._LmdbBackend, "_memo_session", lambda *args: None)


@pytest.mark.parametrize("ttl", (5, 100_000))
@pytest.mark.parametrize("seed", range(4))
def test_the_short_ways_apply_as_the_long_way(tmp_path, monkeypatch, short_way_taken, seed, ttl):
    entries = _stream(seed, 1500)
    results, states, items = [], [], []
    for name in ("short", "long"):
        if name == "long":
            _long_way(monkeypatch)
        with KVStateMachine(str(tmp_path / name), session_ttl=ttl) as sm:
            results.append(_plain([r for b in _batches(entries, random.Random(seed)) for r in sm.apply(b)]))
            states.append(_lmdb_state(sm))
            items.append(sm.items())
        if name == "short":
            assert short_way_taken[0] > len(entries) // 5, "many puts must take the short way"
    mem = MemoryStateMachine(session_ttl=ttl)
    assert results[0] == results[1] == _plain([r for b in _batches(entries, random.Random(seed)) for r in mem.apply(b)])
    assert states[0] == states[1]
    assert items[0] == items[1] == mem.items()
    assert states[0]["events"] and (states[0]["sessions"] or ttl < 100)
    assert len({r for r in results[0] if type(r) is tuple}) > 10, "the stream must make many different errors"


def test_memory_state_machine_applies_the_short_way_as_the_long_way(monkeypatch, short_way_taken):
    entries = _stream(9, 1500)
    short = MemoryStateMachine(session_ttl=50)
    r1 = [r for b in _batches(entries, random.Random(1)) for r in short.apply(b)]
    assert short_way_taken[0] > len(entries) // 5
    _long_way(monkeypatch)
    long = MemoryStateMachine(session_ttl=50)
    r2 = [r for b in _batches(entries, random.Random(1)) for r in long.apply(b)]
    assert _plain(r1) == _plain(r2)
    assert _memory_state(short) == _memory_state(long)


def test_a_retry_returns_the_result_as_applied_even_if_the_caller_changed_it(tmp_path):
    with KVStateMachine(str(tmp_path / "kv")) as sm:
        put = {"op": "put", "key": "k", "value": [1, 2], "client": "c", "seq": 1}
        get = {"op": "get", "key": "k", "client": "c", "seq": 2}
        assert sm.apply([Entry(LogId(1, 1), EntryKind.NORMAL, put), Entry(LogId(1, 2), EntryKind.NORMAL, get)]) \
            == [None, [1, 2]]
        (first,) = sm.apply([Entry(LogId(1, 3), EntryKind.NORMAL, get)])
        assert first == [1, 2]
        first.append(3)  # the caller's to change
        (again,) = sm.apply([Entry(LogId(1, 4), EntryKind.NORMAL, get)])
        assert again == [1, 2]


def test_a_session_kept_from_an_earlier_batch_is_not_used_after_a_snapshot_replaced_it(tmp_path):
    def put(index: int, seq: int) -> Entry:
        return Entry(LogId(1, index), EntryKind.NORMAL, {"op": "put", "key": "k", "value": seq, "client": "c",
                                                         "seq": seq})
    with KVStateMachine(str(tmp_path / "a")) as a, KVStateMachine(str(tmp_path / "b")) as b:
        b.apply([put(1, 1)])
        b.build_snapshot()
        a.apply([put(1, 1), put(2, 2), put(3, 3)])  # a's apply keeps seq 3's session at hand
        meta, f = b.open_snapshot()
        sink = a.begin_receiving_snapshot()
        with f:
            sink.write(f.read())
        a.install_snapshot(meta, sink)  # back to seq 1
        assert a.apply([put(2, 2)]) == b.apply([put(2, 2)]) == [None]
        assert _lmdb_state(a)["sessions"] == _lmdb_state(b)["sessions"]
        assert a.get("k") == b.get("k") == 2
