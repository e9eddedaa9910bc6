"""The ranges of one txn return at most MAX_TXN_RANGE keys together: a txn's apply work is bounded.

Before, each of a txn's 128 ranges could return MAX_TXN_RANGE keys: one 4 KB
txn made every replica's apply decode ~128k rows (0.64 s), stalling every
write behind it.  The bound is a count of keys, so every replica returns
the same; a range that reaches it stops with ``more``, as at the byte budget
(MAX_TXN_READ_BYTES).  Checked on both KV state machines; the work test counts
the rows apply reads from the backend and the values it decodes, never time.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest

import pyraft.kv.commands as commands
from pyraft.kv import KVStateMachine
from pyraft.kv.commands import MAX_TXN_OPS, MAX_TXN_RANGE, apply_command
from pyraft.stores.memory import MemoryStateMachine, _MemoryBackend
from pyraft.types import Entry, EntryKind, LogId

pytestmark = pytest.mark.timeout(120)

KEYS = 3000  # k/0000 .. k/2999, three budgets' worth
PUTS = [{"op": "put", "key": f"k/{i:04}", "value": i} for i in range(KEYS)]
WIDE = {"op": "range", "key": "k/", "prefix": True, "limit": MAX_TXN_RANGE, "keys_only": True}


def _txn(*ops: dict) -> dict:
    return {"op": "txn", "success": list(ops)}


@pytest.fixture(params=["memory", "lmdb"])
def sm(request, tmp_path):
    """A state machine holding KEYS keys (revisions 1..KEYS); apply(cmd) applies the next entry."""
    m = MemoryStateMachine() if request.param == "memory" else KVStateMachine(str(tmp_path / "kv"))
    index = 0

    def apply(*cmds: Any) -> list[Any]:
        nonlocal index
        entries = [Entry(LogId(1, index + i), EntryKind.NORMAL, c) for i, c in enumerate(cmds, 1)]
        index += len(cmds)
        return m.apply(entries)

    apply(*PUTS)
    yield apply
    if request.param == "lmdb":
        m.close()


def test_128_ranges_return_the_budget_together_and_say_more(sm):
    succeeded, responses, _rev = sm(_txn(*[WIDE] * MAX_TXN_OPS))[0]
    assert succeeded and len(responses) == MAX_TXN_OPS
    assert sum(len(rows) for rows, _more in responses) == MAX_TXN_RANGE
    assert all(more for _rows, more in responses)
    first, _ = responses[0]
    assert [r[0] for r in first] == [f"k/{i:04}" for i in range(MAX_TXN_RANGE)]
    assert all(r[1] is None for r in first)  # keys_only
    assert all(rows == [] for rows, _more in responses[1:])


def test_the_budget_is_shared_in_order_and_counts_keys_only(sm):
    def span(a: int, b: int) -> dict:
        return {"op": "range", "key": f"k/{a:04}", "end": f"k/{b:04}"}

    _ok, responses, _rev = sm(_txn(span(0, 300), span(300, 600), span(600, 900), span(900, 1200),
                                   span(1200, 1201)))[0]
    assert [(len(rows), more) for rows, more in responses] == [(300, False), (300, False), (300, False),
                                                              (100, True), (0, True)]
    assert responses[3][0][-1][:2] == ["k/0999", 999]
    # a range with nothing in it says no more, also once the budget is spent
    _ok, responses, _rev = sm(_txn(WIDE, {"op": "range", "key": "none/", "prefix": True}))[0]
    assert [(len(rows), more) for rows, more in responses] == [(MAX_TXN_RANGE, True), (0, False)]


def test_a_txn_within_the_budget_is_unchanged(sm):
    cmd = {"op": "txn",
           "compare": [{"key": "k/0001", "target": "version", "op": "==", "value": 1}],
           "success": [{"op": "put", "key": "x", "value": "new"},
                       {"op": "get", "key": "x"},
                       {"op": "range", "key": "k/", "prefix": True, "limit": 3},
                       {"op": "range", "key": "k/0010", "end": "k/0012", "keys_only": True},
                       {"op": "delete", "key": "k/0000"},
                       {"op": "range", "key": "k/", "prefix": True, "limit": 2}],
           "failure": []}
    [result] = sm(cmd)
    rev = KEYS + 1
    assert result == [True, [
        None,
        ["new", rev, rev, 1, 0],
        [[["k/0000", 0, 1, 1, 1, 0], ["k/0001", 1, 2, 2, 1, 0], ["k/0002", 2, 3, 3, 1, 0]], True],
        [[["k/0010", None, 11, 11, 1, 0], ["k/0011", None, 12, 12, 1, 0]], False],
        True,
        [[["k/0001", 1, 2, 2, 1, 0], ["k/0002", 2, 3, 3, 1, 0]], True],
    ], rev]
    # the failure branch, and a range of fewer keys than its limit
    [result] = sm({"op": "txn", "compare": [{"key": "x", "target": "value", "op": "==", "value": "old"}],
                   "success": [], "failure": [{"op": "range", "key": "k/2998", "end": "k/3000"}]})
    assert result == [False, [[[["k/2998", 2998, 2999, 2999, 1, 0], ["k/2999", 2999, 3000, 3000, 1, 0]], False]],
                      rev + 1]


class CountingBackend:
    """A memory KVBackend that counts the rows a scan hands out."""

    def __init__(self, inner: _MemoryBackend) -> None:
        self.inner = inner
        self.rows = 0

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        for row in self.inner.scan(start, stop):
            self.rows += 1
            yield row

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_ranges_of_a_txn_read_a_bounded_number_of_rows_and_no_values(monkeypatch):
    m = MemoryStateMachine()
    m.apply([Entry(LogId(1, i), EntryKind.NORMAL, c) for i, c in enumerate(PUTS, 1)])
    backend = CountingBackend(_MemoryBackend(m._st))
    decoded = 0
    real_decode_value = commands.decode_value

    def counting_decode_value(b: Any) -> Any:
        nonlocal decoded
        decoded += 1
        return real_decode_value(b)

    monkeypatch.setattr(commands, "decode_value", counting_decode_value)
    result = apply_command(backend, KEYS + 1, _txn(*[WIDE] * MAX_TXN_OPS))
    assert result[0] is True
    # the keys returned, and at most one more per range to tell whether there are more
    assert backend.rows <= MAX_TXN_RANGE + MAX_TXN_OPS, backend.rows
    assert decoded == 0  # keys_only
    # with values: one decode per key returned
    backend.rows = 0
    apply_command(backend, KEYS + 2, _txn(*[dict(WIDE, keys_only=False)] * MAX_TXN_OPS))
    assert backend.rows <= MAX_TXN_RANGE + MAX_TXN_OPS, backend.rows
    assert decoded == MAX_TXN_RANGE
