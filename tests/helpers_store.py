"""Shared store tests: the LogStore and KV state-machine contracts, run against every implementation.

A test module subclasses :class:`LogStoreContract` or :class:`KVContract`
as ``Test...`` and provides the fixtures they name.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from pyraft.engine.commands import AppendToLog, PurgeLog, SaveCommitted, SaveVote, TruncateLog
from pyraft.errors import Compacted, LeaseNotFound, RaftError, StorageError
from pyraft.kv.commands import KVCommandError
from pyraft.storage import LogState, LogStore, StateMachine
from pyraft.types import Entry, EntryKind, LogId, Membership, Node, StoredMembership, Vote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ent(index: int, term: int = 1, payload=None, kind: EntryKind = EntryKind.NORMAL) -> Entry:
    if payload is None and kind == EntryKind.NORMAL:
        payload = {"i": index}
    return Entry(LogId(term, index), kind, payload)


def ents(start: int, stop: int, term: int = 1) -> list[Entry]:
    return [ent(i, term) for i in range(start, stop)]


def indexes(entries: list[Entry]) -> list[int]:
    return [e.index for e in entries]


def run_python(code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (no fork of this test process's LMDB handles)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def spawn_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


# ---------------------------------------------------------------------------
# LogStore

class LogStoreContract:
    """Every LogStore method against the contract in pyraft/storage.py.

    Fixtures: ``store`` (a fresh, open store).
    """

    def test_is_a_log_store(self, store):
        assert isinstance(store, LogStore)

    def test_pristine_store_is_empty(self, store):
        assert store.read_vote() is None
        assert store.read_committed() is None
        assert store.log_state() == LogState(None, None)
        assert store.read(1, 100) == []

    def test_appended_entries_read_back_in_ranges(self, store):
        store.write([AppendToLog(ents(1, 11))])
        assert store.log_state() == LogState(None, LogId(1, 10))
        assert store.read(1, 11) == ents(1, 11)
        assert indexes(store.read(3, 5)) == [3, 4]
        assert indexes(store.read(10, 100)) == [10]
        assert store.read(11, 20) == []
        assert store.read(5, 5) == []
        assert store.read(7, 3) == []

    def test_entries_of_every_kind_round_trip(self, store):
        m = Membership.of({1: Node("tcp://a:1", {"zone": "x"}), 2: Node("tcp://b:2")})
        batch = [ent(1, 1, None, EntryKind.BLANK), ent(2, 1, m, EntryKind.MEMBERSHIP),
                 ent(3, 2, {"op": "put", "key": b"k", "value": [1, 2.5, None, "s"]}),
                 ent(4, 2, "plain string"), ent(5, 2, b"\x00" * 3000)]
        store.write([AppendToLog(batch[:2])])
        store.write([AppendToLog(batch[2:])])
        assert store.read(1, 6) == batch
        assert store.log_state().last_log_id == LogId(2, 5)

    def test_appends_may_carry_their_encodings(self, store):
        from pyraft.codec import encode_entry
        batch = ents(1, 4) + [ent(4, 1, None, EntryKind.BLANK)]
        store.write([AppendToLog(batch, encoded=[encode_entry(e) for e in batch])])
        assert store.read(1, 10) == batch
        with pytest.raises(StorageError):
            store.write([AppendToLog(ents(5, 7), encoded=[encode_entry(ent(5))])])
        assert store.log_state().last_log_id == LogId(1, 4)

    def test_truncate_deletes_from_since_and_the_log_continues_there(self, store):
        store.write([AppendToLog(ents(1, 6, term=1) + ents(6, 11, term=2))])
        store.write([TruncateLog(7)])
        assert store.log_state() == LogState(None, LogId(2, 6))
        assert indexes(store.read(1, 100)) == [1, 2, 3, 4, 5, 6]
        store.write([TruncateLog(6)])
        assert store.log_state().last_log_id == LogId(1, 5)
        store.write([AppendToLog(ents(6, 8, term=3))])
        assert store.read(5, 100) == [ent(5, 1)] + ents(6, 8, term=3)

    def test_truncate_past_the_end_changes_nothing(self, store):
        store.write([AppendToLog(ents(1, 4))])
        store.write([TruncateLog(4)])
        store.write([TruncateLog(100)])
        assert store.log_state() == LogState(None, LogId(1, 3))
        assert indexes(store.read(1, 10)) == [1, 2, 3]

    def test_truncate_everything(self, store):
        store.write([AppendToLog(ents(1, 4))])
        store.write([TruncateLog(1)])
        assert store.log_state() == LogState(None, None)
        assert store.read(1, 10) == []
        store.write([AppendToLog(ents(1, 3, term=2))])
        assert store.read(1, 10) == ents(1, 3, term=2)

    def test_purge_deletes_up_to_and_records_last_purged(self, store):
        store.write([AppendToLog(ents(1, 11))])
        store.write([PurgeLog(LogId(1, 4))])
        assert store.log_state() == LogState(LogId(1, 4), LogId(1, 10))
        assert store.read(1, 100) == []
        assert store.read(4, 100) == []
        assert indexes(store.read(5, 100)) == [5, 6, 7, 8, 9, 10]

    def test_purge_an_older_point_changes_nothing(self, store):
        store.write([AppendToLog(ents(1, 11))])
        store.write([PurgeLog(LogId(1, 6))])
        store.write([PurgeLog(LogId(1, 3))])
        assert store.log_state() == LogState(LogId(1, 6), LogId(1, 10))
        assert indexes(store.read(7, 100)) == [7, 8, 9, 10]

    def test_purge_to_the_last_entry_empties_the_log(self, store):
        store.write([AppendToLog(ents(1, 6))])
        store.write([PurgeLog(LogId(1, 5))])
        assert store.log_state() == LogState(LogId(1, 5), LogId(1, 5))
        assert store.read(1, 100) == []
        store.write([AppendToLog([ent(6, 2)])])
        assert store.read(6, 7) == [ent(6, 2)]
        assert store.log_state() == LogState(LogId(1, 5), LogId(2, 6))

    def test_purge_past_the_last_entry_empties_the_log_and_appends_continue_after_it(self, store):
        store.write([AppendToLog(ents(1, 6))])
        store.write([PurgeLog(LogId(3, 50))])
        assert store.log_state() == LogState(LogId(3, 50), LogId(3, 50))
        assert store.read(1, 100) == []
        store.write([AppendToLog(ents(51, 53, term=4))])
        assert store.log_state() == LogState(LogId(3, 50), LogId(4, 52))
        assert store.read(51, 100) == ents(51, 53, term=4)

    def test_purge_on_a_pristine_store(self, store):
        store.write([PurgeLog(LogId(2, 7))])
        assert store.log_state() == LogState(LogId(2, 7), LogId(2, 7))
        store.write([AppendToLog([ent(8, 2)])])
        assert store.read(8, 9) == [ent(8, 2)]

    def test_truncate_after_purge_leaves_the_purged_id_as_last(self, store):
        store.write([AppendToLog(ents(1, 11))])
        store.write([PurgeLog(LogId(1, 5))])
        store.write([TruncateLog(6)])
        assert store.log_state() == LogState(LogId(1, 5), LogId(1, 5))
        assert store.read(1, 100) == []

    def test_vote_and_committed_round_trip_and_overwrite(self, store):
        store.write([SaveVote(Vote(1, None))])
        assert store.read_vote() == Vote(1, None)
        store.write([SaveVote(Vote(3, 2)), SaveCommitted(LogId(2, 9))])
        assert store.read_vote() == Vote(3, 2)
        assert store.read_committed() == LogId(2, 9)
        store.write([SaveCommitted(LogId(3, 12)), SaveVote(Vote(4, 4))])
        assert (store.read_vote(), store.read_committed()) == (Vote(4, 4), LogId(3, 12))

    def test_ops_of_a_batch_run_in_order(self, store):
        store.write([AppendToLog(ents(1, 6))])
        store.write([TruncateLog(3), AppendToLog(ents(3, 5, term=2)), SaveVote(Vote(2, 1)),
                     PurgeLog(LogId(1, 2)), SaveCommitted(LogId(2, 3))])
        assert store.log_state() == LogState(LogId(1, 2), LogId(2, 4))
        assert store.read(3, 10) == ents(3, 5, term=2)
        assert store.read_vote() == Vote(2, 1)
        assert store.read_committed() == LogId(2, 3)

    def test_an_empty_batch_is_fine(self, store):
        store.write([])
        store.write([AppendToLog([])])
        assert store.log_state() == LogState(None, None)

    def _assert_untouched(self, store):
        assert store.read_vote() == Vote(1, 1)
        assert store.read_committed() == LogId(1, 2)
        assert store.log_state() == LogState(None, LogId(1, 3))
        assert store.read(1, 100) == ents(1, 4)

    def test_a_batch_with_an_unencodable_entry_stores_nothing(self, store):
        store.write([SaveVote(Vote(1, 1)), AppendToLog(ents(1, 4)), SaveCommitted(LogId(1, 2))])
        with pytest.raises(RaftError):
            store.write([SaveVote(Vote(9, 9)), TruncateLog(2), AppendToLog([ent(2, 9), ent(3, 9, object())]),
                         SaveCommitted(LogId(9, 3))])
        self._assert_untouched(store)

    def test_a_batch_that_would_leave_a_hole_stores_nothing(self, store):
        store.write([SaveVote(Vote(1, 1)), AppendToLog(ents(1, 4)), SaveCommitted(LogId(1, 2))])
        with pytest.raises(StorageError):
            store.write([SaveVote(Vote(9, 9)), PurgeLog(LogId(1, 1)), AppendToLog([ent(4), ent(6)])])
        self._assert_untouched(store)
        with pytest.raises(StorageError):
            store.write([SaveCommitted(LogId(9, 9)), AppendToLog([ent(3)])])  # overwrite, not append
        self._assert_untouched(store)

    def test_readers_on_other_threads_see_whole_batches(self, store):
        """Concurrent readers never see half a batch, a hole, or a log_state ahead of the entries."""
        stop = threading.Event()
        errors: list[str] = []
        reads = [0]

        def reader():
            while not stop.is_set():
                st = store.log_state()
                got = store.read(1, 1_000_000)
                reads[0] += 1
                if indexes(got) != list(range(1, len(got) + 1)):
                    errors.append(f"hole: {indexes(got)[:5]}...")
                if got and not got[-1].payload["end"]:
                    errors.append(f"half a batch: ends at {got[-1].index}")
                if st.last_log_id is not None and len(got) < st.last_log_id.index:
                    errors.append("log_state ahead of the entries")

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            i = 1
            for b in range(150):
                size = 1 + b % 7
                batch = [Entry(LogId(1, i + k), EntryKind.NORMAL, {"b": b, "end": k == size - 1})
                         for k in range(size)]
                store.write([AppendToLog(batch), SaveCommitted(batch[-1].log_id)])
                i += size
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == []
        assert reads[0] > 0
        assert store.log_state().last_log_id == LogId(1, i - 1)

    def test_close_is_idempotent(self, store):
        store.close()
        store.close()


# ---------------------------------------------------------------------------
# KV state machines

M12 = Membership.of({1: Node("tcp://a:1"), 2: Node("tcp://b:2")})


def normal(i: int, cmd, term: int = 1) -> Entry:
    return Entry(LogId(term, i), EntryKind.NORMAL, cmd)


def put(k, v, lease=None, **s):
    return {"op": "put", "key": k, "value": v, **({} if lease is None else {"lease": lease}), **s}


def cas(k, e, v, lease=None, **s):
    return {"op": "cas", "key": k, "expected": e, "value": v, **({} if lease is None else {"lease": lease}), **s}


def delete(k, **s):
    return {"op": "delete", "key": k, **s}


def get(k, **s):
    return {"op": "get", "key": k, **s}


class Applier:
    """Feeds commands to a state machine as consecutive entries."""

    def __init__(self, sm, start: int = 1, term: int = 1):
        self.sm = sm
        self.next = start
        self.term = term

    def __call__(self, *cmds):
        entries = []
        for c in cmds:
            entries.append(normal(self.next, c, self.term))
            self.next += 1
        res = self.sm.apply(entries)
        return res if len(cmds) != 1 else res[0]

    def entries(self, *entries_: Entry):
        self.next = entries_[-1].index + 1
        return self.sm.apply(list(entries_))


class KVContract:
    """KV command semantics, sessions and snapshots, for every KV state machine.

    Fixtures: ``make_sm`` (``make_sm(name, **kw)`` -> a new, empty state
    machine; ``kw`` may hold ``session_ttl``).
    """

    def test_is_a_state_machine(self, make_sm):
        assert isinstance(make_sm("a"), StateMachine)

    def test_pristine(self, make_sm):
        sm = make_sm("a")
        assert sm.applied_state() == (None, None)
        assert sm.items() == []
        assert sm.get("x") is None
        assert sm.current_snapshot() is None
        assert sm.open_snapshot() is None

    def test_put_get_delete_cas(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        assert ap(put("k", "v1")) is None
        assert sm.get("k") == "v1"
        assert ap(get("k")) == "v1"
        assert ap(get("nope")) is None
        assert ap(cas("k", "wrong", "v2")) is False
        assert ap(cas("k", "v1", "v2")) is True
        assert sm.get("k") == "v2"
        assert ap(cas("k", None, "v3")) is False      # None means "absent"
        assert ap(cas("new", None, "n1")) is True
        assert ap(cas("gone", "x", "y")) is False
        assert ap(delete("k")) is True
        assert ap(delete("k")) is False
        assert sm.get("k") is None
        assert sm.items() == [("new", "n1")]
        assert sm.applied_state()[0] == LogId(1, ap.next - 1)

    def test_keys_and_values_are_any_msgpack_scalars_or_arrays(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        ap(put(1, "int"), put(1.0, "float"), put(True, "bool"), put("a", "str"), put(b"a", "bytes"),
           put(None, "nil"), put(["t", 1], {"nested": [1, {"x": b"y"}]}))
        assert sm.get(1) == "int" and sm.get(1.0) == "float" and sm.get(True) == "bool"
        assert sm.get("a") == "str" and sm.get(b"a") == "bytes" and sm.get(None) == "nil"
        assert sm.get(("t", 1)) == sm.get(["t", 1]) == {"nested": [1, {"x": b"y"}]}
        assert len(sm.items()) == 7
        assert ("t", 1) in dict(sm.items())
        assert ap(cas(["t", 1], {"nested": [1, {"x": b"y"}]}, 0)) is True

    def test_malformed_commands_give_an_error_result_and_the_node_goes_on(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        bad = ["not a map", None, 42, [1, 2], {"op": "frobnicate", "key": 1}, {"key": 1},
               {"op": "put", "value": 1}, {"op": "put", "key": 1}, {"op": "cas", "key": 1, "value": 2},
               {"op": "put", "key": {"a": 1}, "value": 1}, {"op": "get", "key": [1, {"b": 2}]},
               {"op": "put", "key": 1, "value": {1, 2}}, {"op": "put", "key": object(), "value": 1},
               {"op": 7, "key": 1}, put("k", 1, client="c"), put("k", 1, seq=1),
               put("k", 1, client=5, seq=1), put("k", 1, client="c", seq=-1),
               put("k", 1, client="c", seq="1"), put("k", 1, client="c", seq=True)]
        results = ap(*bad)
        for cmd, r in zip(bad, results):
            assert isinstance(r, KVCommandError), cmd
            assert isinstance(r, RaftError)
        assert sm.items() == []
        assert sm.applied_state()[0] == LogId(1, len(bad))
        assert ap(put("k", "fine")) is None
        assert sm.get("k") == "fine"

    def test_blank_and_membership_entries(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        res = ap.entries(Entry(LogId(1, 1), EntryKind.BLANK), Entry(LogId(1, 2), EntryKind.MEMBERSHIP, M12),
                         normal(3, put("a", 1)))
        assert res == [None, None, None]
        assert sm.applied_state() == (LogId(1, 3), StoredMembership(LogId(1, 2), M12))

    def test_entries_must_continue_the_applied_log(self, make_sm):
        sm = make_sm("a")
        sm.apply([normal(1, put("a", 1))])
        with pytest.raises(StorageError):
            sm.apply([normal(3, put("b", 1))])
        with pytest.raises(StorageError):
            sm.apply([normal(1, put("b", 1))])
        assert sm.items() == [("a", 1)]
        assert sm.applied_state()[0] == LogId(1, 1)

    def test_a_retried_command_is_applied_once_and_returns_the_first_result(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        assert ap(put("n", 1, client="c1", seq=1)) is None
        assert ap(cas("n", 1, 2, client="c1", seq=2)) is True
        assert ap(cas("n", 1, 2, client="c1", seq=2)) is True     # retry: not re-applied, same result
        assert sm.get("n") == 2
        assert ap(delete("other", client=b"c2", seq=7)) is False   # another client, bytes id
        assert ap(put("n", 9, client="c1", seq=1)) == KVCommandError(
            "stale request: seq 1 is older than this client's last one (2)")
        assert sm.get("n") == 2
        assert ap(get("n", client="c1", seq=5)) == 2               # gaps are fine
        assert ap(put("n", 3)) is None
        assert ap(get("n", client="c1", seq=5)) == 2               # the remembered result
        err = ap({"op": "bogus", "key": 1, "client": "c3", "seq": 1})
        assert isinstance(err, KVCommandError)
        assert ap({"op": "bogus", "key": 1, "client": "c3", "seq": 1}) == err

    def test_sessions_expire_by_log_index_only(self, make_sm):
        sm = make_sm("a", session_ttl=5)
        ap = Applier(sm)
        ap(put("x", 1, client="old", seq=1))                        # index 1
        ap(put("x", 2, client="fresh", seq=1))                      # index 2
        for _ in range(3):
            ap(put("filler", 0))                                     # 3..5
        assert ap(put("x", 99, client="old", seq=1)) is None         # index 6: 5 behind, kept: dedup
        assert sm.get("x") == 2
        assert ap(put("x", 99, client="old", seq=1)) is None         # index 7: forgotten -> applied again
        assert sm.get("x") == 99
        assert ap(put("x", 98, client="fresh", seq=1)) is None       # index 8: forgotten as well
        assert sm.get("x") == 98

    def test_results_and_state_do_not_depend_on_batching(self, make_sm):
        cmds = []
        for i in range(60):
            c = f"c{i % 4}"
            cmds.append(cas("k", i - 1 if i else None, i, client=c, seq=i // 4))
            if i % 5 == 0:
                cmds.append(put(f"p{i}", i, client=c, seq=i // 4))   # often a duplicate seq
            if i % 7 == 0:
                cmds.append("junk")
        one, many = make_sm("one", session_ttl=9), make_sm("many", session_ttl=9)
        entries = [normal(i + 1, c) for i, c in enumerate(cmds)]
        r1 = one.apply(entries)
        r2 = []
        i = 0
        for size in [1, 2, 3, 5, 8, 13] * 20:
            if i >= len(entries):
                break
            r2 += many.apply(entries[i:i + size])
            i += size
        assert r1 == r2
        assert one.items() == many.items()
        assert one.applied_state() == many.applied_state()

    def test_snapshot_round_trip_into_another_machine(self, make_sm):
        src = make_sm("src")
        ap = Applier(src)
        ap.entries(Entry(LogId(1, 1), EntryKind.MEMBERSHIP, M12))
        for i in range(200):
            ap(put(("k", i), {"v": i, "pad": "x" * (i % 50)}))
        ap(put("s", 1, client="cl", seq=3))
        meta = src.build_snapshot()
        assert meta.last_log_id == LogId(1, ap.next - 1)
        assert meta.last_membership == StoredMembership(LogId(1, 1), M12)
        assert src.current_snapshot() == meta
        got = src.open_snapshot()
        assert got is not None
        meta2, f = got
        assert meta2 == meta
        dst = make_sm("dst")
        Applier(dst)(put("stale", "gone after install"))
        sink = dst.begin_receiving_snapshot()
        while True:
            chunk = f.read(1000)
            if not chunk:
                break
            sink.write(chunk)
        f.close()
        dst.install_snapshot(meta, sink)
        assert dst.items() == src.items()
        assert dst.get("stale") is None
        assert dst.applied_state() == src.applied_state()
        assert dst.current_snapshot() == meta
        # the sessions came along: a retry is still deduplicated after the install
        dap = Applier(dst, start=ap.next)
        assert dap(put("s", 2, client="cl", seq=3)) is None
        assert dst.get("s") == 1
        # and the installed snapshot can be served on
        m3, f3 = dst.open_snapshot()
        f3.close()
        assert m3 == meta

    def test_snapshot_of_a_pristine_machine(self, make_sm):
        sm = make_sm("a")
        meta = sm.build_snapshot()
        assert meta.last_log_id is None
        other = make_sm("b")
        Applier(other)(put("a", 1))
        m, f = sm.open_snapshot()
        sink = other.begin_receiving_snapshot()
        sink.write(f.read())
        f.close()
        other.install_snapshot(m, sink)
        assert other.items() == []
        assert other.applied_state() == (None, None)

    def test_apply_continues_after_an_installed_snapshot(self, make_sm):
        src = make_sm("src")
        Applier(src)(put("a", 1), put("b", 2))
        meta = src.build_snapshot()
        m, f = src.open_snapshot()
        dst = make_sm("dst")
        sink = dst.begin_receiving_snapshot()
        sink.write(f.read())
        f.close()
        dst.install_snapshot(m, sink)
        with pytest.raises(StorageError):
            dst.apply([normal(2, put("c", 3))])
        assert dst.apply([normal(3, put("c", 3))]) == [None]
        assert dst.items() == [("a", 1), ("b", 2), ("c", 3)]
        assert meta.last_log_id == LogId(1, 2)

    # ------------------------------------------------------------------ revisions, ranges, history

    def test_revisions_and_versions(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        ap(put("k", 1), put("other", 0), put("k", 2))            # revisions 1, 2, 3
        [kv] = sm.range("k")
        assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == ("k", 2, 1, 3, 2, 0)
        assert ap(cas("k", 2, 3)) is True                          # 4: a swap is a put
        assert ap(cas("k", 2, 9)) is False                         # 5: no change
        assert sm.range("k")[0].mod_revision == 4 and sm.range("k")[0].version == 3
        assert ap(delete("k")) is True                             # 6
        assert sm.range("k") == [] and sm.range("k").revision == 6
        ap(put("k", "again"))                                      # 7: created anew
        kv = sm.range("k")[0]
        assert (kv.create_revision, kv.mod_revision, kv.version) == (7, 7, 1)
        assert sm.revision == 7

    def test_keys_sort_by_type_then_value_and_prefixes_are_contiguous(self, make_sm):
        sm = make_sm("a")
        keys = [None, False, True, -2**63, -1, 0, 1, 2**64 - 1, float("-inf"), -0.5, -0.0, 0.0, 2.5,
                "", "a", "a\x00", "aa", "b", "\u00e9", b"", b"\x00", b"a", ("a",), ("a", 1), ("a", "b"),
                ("a\x00",), ("aa",), (("x",),)]
        ap = Applier(sm)
        ap(*[put(k, i) for i, k in enumerate(reversed(keys))])
        # (1 == 1.0 == True in Python: compare by type and repr)
        assert [(type(k), repr(k)) for k, _v in sm.items()] == [(type(k), repr(k)) for k in keys]
        assert [kv.key for kv in sm.range("", prefix=True)] == ["", "a", "a\x00", "aa", "b", "\u00e9"]
        assert [kv.key for kv in sm.range("a", prefix=True)] == ["a", "a\x00", "aa"]
        assert [kv.key for kv in sm.range(b"", prefix=True)] == [b"", b"\x00", b"a"]
        assert [kv.key for kv in sm.range(("a",), prefix=True)] == [("a",), ("a", 1), ("a", "b")]
        assert [kv.key for kv in sm.range(-1, 2)] == [-1, 0, 1]
        assert [kv.key for kv in sm.range("a", "b")] == ["a", "a\x00", "aa"]
        assert [kv.key for kv in sm.range(0.0)] == [0.0] and [kv.key for kv in sm.range(-0.0)] == [-0.0]
        for bad in (1, None, 2.5):
            with pytest.raises(KVCommandError, match="prefix"):
                sm.range(bad, prefix=True)

    def test_range_limit_count_more_and_keys_only(self, make_sm):
        sm = make_sm("a")
        Applier(sm)(*[put(f"p/{i:02}", i) for i in range(10)], put("q", 1))
        r = sm.range("p/", prefix=True, limit=3)
        assert [kv.key for kv in r] == ["p/00", "p/01", "p/02"]
        assert (r.count, r.more, r.revision) == (10, True, 11)
        r = sm.range("p/", prefix=True, limit=10, keys_only=True)
        assert r.count == 10 and not r.more and all(kv.value is None for kv in r)
        assert sm.count("p/", prefix=True) == 10 and sm.count("", prefix=True) == 11
        assert sm.count("zzz") == 0

    def test_every_change_leaves_an_event_in_the_history(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        ap(put("a", 1), put("b", 2), delete("a"), delete("nope"), cas("b", 2, 3), cas("b", 0, 4), get("b"))
        ev, nxt = sm.events("", prefix=True, start_revision=1)
        assert [(e.type, e.key, e.value, e.revision) for e in ev] == [
            ("put", "a", 1, 1), ("put", "b", 2, 2), ("delete", "a", None, 3), ("put", "b", 3, 5)]
        assert nxt == 8
        assert [e.revision for e in sm.events("b", start_revision=3)[0]] == [5]
        assert sm.events("a", start_revision=nxt) == ([], 8)
        assert sm.events("a")[0] == []  # None: only what comes after now

    def test_the_history_keeps_a_window_of_revisions(self, make_sm):
        sm = make_sm("a", watch_history=5)
        ap = Applier(sm)
        ap(*[put("k", i) for i in range(1, 11)])                   # revisions 1..10
        ev, _ = sm.events("k", start_revision=6)
        assert [e.value for e in ev] == [6, 7, 8, 9, 10]
        with pytest.raises(Compacted, match="revision 5 is compacted"):
            sm.events("k", start_revision=5)

    def test_compact_drops_the_history_before_a_revision_in_a_batch_or_alone(self, make_sm):
        cmds = [put("a", 1), put("b", 2), put("a", 3), compact(3), put("b", 4),
                compact(2),                                    # below where the history starts: nothing
                compact(8), compact(0), {"op": "compact"}, compact(True), compact(2**64)]
        one, many = make_sm("one"), make_sm("many")
        entries = [normal(i + 1, c) for i, c in enumerate(cmds)]
        r1 = one.apply(entries)  # compact(3) drops events added earlier in its own batch
        r2 = [r for e in entries for r in many.apply([e])]
        assert r1 == r2
        assert r1[:6] == [None] * 6
        assert r1[6] == KVCommandError("compact: revision 8 is in the future (this compaction is revision 7)")
        assert all(isinstance(r, KVCommandError) and "'revision' must be an integer >= 1" in str(r)
                   for r in r1[7:10]), r1[7:10]
        assert "revision 18446744073709551616 is in the future" in str(r1[10])
        for sm in (one, many):
            with pytest.raises(Compacted, match="revision 2 is compacted"):
                sm.events("", prefix=True, start_revision=2)
            ev, _ = sm.events("", prefix=True, start_revision=3)
            assert [(e.key, e.value, e.revision) for e in ev] == [("a", 3, 3), ("b", 4, 5)]
            assert sm.items() == [("a", 3), ("b", 4)]  # the data is untouched
            assert sm.revision == len(cmds)

    # ------------------------------------------------------------------ leases

    def test_leases_attach_keys_and_revoke_deletes_exactly_them(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        lid = ap(lease_grant(10))
        assert lid == 1 and sm.leases() == (1, {1: 10.0})
        other = ap(lease_grant(5.5))
        ap(put("e/1", 1, lease=lid), put("e/2", 2, lease=lid), put("e/3", 3, lease=other), put("plain", 0))
        ap(put("e/2", 22))                                         # a put without the lease detaches it
        ap(put("e/4", 4, lease=lid), delete("e/4"))                # a delete detaches too
        assert sm.range("e/1")[0].lease == lid and sm.range("e/2")[0].lease == 0
        assert ap(put("x", 1, lease=999)) == LeaseNotFound("put: lease 999 not found")
        assert ap(cas("x", None, 1, lease=999)) == LeaseNotFound("cas: lease 999 not found")
        assert sm.get("x") is None
        before = sm.revision
        assert ap(lease_revoke(lid)) is True
        assert sm.get("e/1") is None and sm.get("e/2") == 22 and sm.get("e/3") == 3 and sm.get("plain") == 0
        ev, _ = sm.events("", prefix=True, start_revision=before + 1)
        assert [(e.type, e.key, e.revision) for e in ev] == [("delete", "e/1", before + 1)]
        assert ap(lease_revoke(lid)) is False
        assert ap(put("y", 1, lease=lid)) == LeaseNotFound(f"put: lease {lid} not found")
        assert sm.leases()[1] == {other: 5.5}

    def test_lease_grants_are_validated(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        for bad in (0, 0.5, -1, float("inf"), float("nan"), "10", True, None, 2e9):
            assert isinstance(ap(lease_grant(bad)), KVCommandError), bad
        for bad in (-1, "1", 1.5, 2**64):
            assert isinstance(ap(lease_revoke(bad)), KVCommandError), bad
            assert isinstance(ap(put("k", 1, lease=bad)), KVCommandError), bad
        assert sm.leases()[1] == {} and sm.items() == []

    def test_apply_listeners_hear_of_every_batch_and_its_lease_changes(self, make_sm):
        sm = make_sm("a")
        heard = []
        sm.add_apply_listener(lambda rev, changes: heard.append((rev, changes)))
        ap = Applier(sm)
        ap(put("a", 1))
        lid = ap(lease_grant(3))
        ap(put("b", 1, lease=lid), lease_revoke(lid))
        assert heard == [(1, ()), (2, ((2, 3.0),)), (4, ((2, None),))]

    # ------------------------------------------------------------------ transactions

    def test_txn_compares_every_target_and_runs_one_branch(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        lid = ap(lease_grant(10))                                          # 1
        ap(put("k", 5, lease=lid), put("k", 6, lease=lid))                 # 2, 3: version 2
        cases = [("value", "==", 6, True), ("value", "!=", 6, False), ("value", "<", 7, True),
                 ("value", ">", 7, False), ("version", "==", 2, True), ("create_revision", "==", 2, True),
                 ("mod_revision", ">", 2, True), ("mod_revision", "<", 3, False), ("lease", "==", lid, True),
                 ("version", "!=", 2, False)]
        for target, op, value, held in cases:
            r = ap(txn([cmp("k", target, op, value)], [get("k")], [get("nope")]))
            assert r[0] is held, (target, op, value)
            assert r[1] == ([[6, 2, 3, 2, lid]] if held else [None])
        # a missing key: version and revisions 0, and every compare on its value fails
        assert ap(txn([cmp("gone", "version", "==", 0), cmp("gone", "create_revision", "<", 1)], [], []))[0] is True
        for op in ("==", "!=", "<", ">"):
            assert ap(txn([cmp("gone", "value", op, 1)], [], []))[0] is False
        assert isinstance(ap(txn([cmp("k", "value", "<", "a string")], [], [])), KVCommandError)

    def test_txn_ops_run_in_order_at_one_revision(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        ap(put("acct/a", 10), put("acct/b", 0))
        r = ap(txn([cmp("acct/a", "value", "==", 10)],
                   [put("acct/a", 7), put("acct/b", 3), get("acct/a"), delete("acct/x"),
                    {"op": "range", "key": "acct/", "prefix": True, "limit": 1}], []))
        assert r == [True, [None, None, [7, 1, 3, 2, 0], False, [[["acct/a", 7, 1, 3, 2, 0]], True]], 3]
        ev, _ = sm.events("acct/", prefix=True, start_revision=3)
        assert [(e.key, e.value, e.revision) for e in ev] == [("acct/a", 7, 3), ("acct/b", 3, 3)]

    def test_a_txn_is_all_or_nothing(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        ap(put("a", 1))
        # The chosen branch puts to a lease that does not exist: nothing of it happens.
        r = ap(txn([], [put("a", 2), put("b", 2, lease=77)], []))
        assert r == LeaseNotFound("txn put: lease 77 not found")
        bad = [txn("x", [], []), txn([], "x", []), txn([{"key": "a"}], [], []),
               txn([cmp("a", "size", "==", 1)], [], []), txn([cmp("a", "version", "~", 1)], [], []),
               txn([cmp("a", "version", "==", "1")], [], []), txn([], [{"op": "cas", "key": "a"}], []),
               txn([], [put("a", 3)], [{"op": "put", "key": {"m": 1}, "value": 1}]),
               txn([], [put("a", 3)] * 129, []), txn([cmp("a", "version", "==", 1)] * 129, [], [])]
        for b in bad:
            assert isinstance(ap(b), KVCommandError), b
        assert sm.items() == [("a", 1)] and sm.range("a")[0].version == 1
        ev, _ = sm.events("", prefix=True, start_revision=2)
        assert ev == []

    def test_a_retried_txn_is_applied_once(self, make_sm):
        sm = make_sm("a")
        ap = Applier(sm)
        t = txn([cmp("n", "version", "==", 0)], [put("n", 1)], [get("n")], client="c", seq=1)
        assert ap(t) == [True, [None], 1]
        assert ap(t) == [True, [None], 1]
        assert sm.range("n")[0].version == 1

    def test_snapshots_keep_revisions_and_leases_and_the_history_starts_after_them(self, make_sm):
        src = make_sm("src")
        ap = Applier(src)
        lid = ap(lease_grant(30))
        ap(put("a", 1, lease=lid), put("a", 2, lease=lid), put("b", 1))
        meta = src.build_snapshot()
        m, f = src.open_snapshot()
        dst = make_sm("dst")
        heard = []
        dst.add_apply_listener(lambda rev, changes: heard.append((rev, changes)))
        sink = dst.begin_receiving_snapshot()
        sink.write(f.read())
        f.close()
        dst.install_snapshot(m, sink)
        assert heard == [(4, None)]
        assert list(dst.range("", prefix=True)) == list(src.range("", prefix=True))
        assert dst.leases() == (4, {lid: 30.0})
        with pytest.raises(Compacted):
            dst.events("a", start_revision=4)
        assert dst.events("a", start_revision=5) == ([], 5)
        dap = Applier(dst, start=5)
        assert dap(lease_revoke(lid)) is True
        assert dst.items() == [("b", 1)]
        assert [e.type for e in dst.events("a", start_revision=5)[0]] == ["delete"]
        assert meta.last_log_id == LogId(1, 4)

    def test_history_and_leases_do_not_depend_on_batching(self, make_sm):
        cmds = [lease_grant(10), put("a", 1, lease=1), txn([cmp("a", "version", "==", 1)],
                                                            [put("b", 1), delete("a")], []),
                put("c", 1, lease=1), lease_revoke(1), put("d", 2), lease_grant(4)]
        one, many = make_sm("one", watch_history=3), make_sm("many", watch_history=3)
        entries = [normal(i + 1, c) for i, c in enumerate(cmds)]
        r1 = one.apply(entries)
        r2 = []
        for i in range(0, len(entries), 2):
            r2 += many.apply(entries[i:i + 2])
        assert r1 == r2
        for sm in (one, many):
            with pytest.raises(Compacted):
                sm.events("", prefix=True, start_revision=4)
        assert one.events("", prefix=True, start_revision=5) == many.events("", prefix=True, start_revision=5)
        assert one.leases() == many.leases() == (7, {7: 4.0})
        assert list(one.range("", prefix=True)) == list(many.range("", prefix=True))

    def test_a_batch_reads_its_own_writes(self, make_sm):
        # One batch applied whole (writes kept for its end, reads served from them) and the
        # same entries one by one must agree on every result and on the state.
        cmds = [put("a", 1), put("b", 1), get("a"), cas("a", 1, 2), delete("b"), get("b"), put("b", 3),
                txn([cmp("b", "version", "==", 1)], [{"op": "range", "key": "", "prefix": True}], []),
                lease_grant(10), put("c", 1, lease=9), put("a", 4, lease=9), lease_revoke(9), get("a"),
                cas("c", None, 5), delete("zz"), put("a", 6),
                txn([cmp("a", "value", "==", 6)], [delete("a"), get("a"), put("d", 1)], [])]
        whole, single = make_sm("whole"), make_sm("single")
        entries = [normal(i + 1, c) for i, c in enumerate(cmds)]
        r1 = whole.apply(entries)
        r2 = [single.apply([e])[0] for e in entries]
        assert r1 == r2
        assert r1[7] == [True, [[[["a", 2, 1, 4, 2, 0], ["b", 3, 7, 7, 1, 0]], False]], 8]
        assert list(whole.range("", prefix=True)) == list(single.range("", prefix=True))
        assert whole.events("", prefix=True, start_revision=1) == single.events("", prefix=True, start_revision=1)


def lease_grant(ttl, **s):
    return {"op": "lease_grant", "ttl": ttl, **s}


def lease_revoke(lease_id, **s):
    return {"op": "lease_revoke", "id": lease_id, **s}


def compact(revision, **s):
    return {"op": "compact", "revision": revision, **s}


def cmp(key, target, op, value):
    return {"key": key, "target": target, "op": op, "value": value}


def txn(compare, success, failure, **s):
    return {"op": "txn", "compare": compare, "success": success, "failure": failure, **s}


def wait_for(pred, timeout: float = 10.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
