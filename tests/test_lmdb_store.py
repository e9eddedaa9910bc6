"""LmdbLogStore: the LogStore contract, plus durability, locking, map growth, identity checks,
read-only access from other processes, and kill -9."""
import hashlib
import os
import random
import signal
import sys
import threading
import time

import lmdb
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers_store import LogStoreContract, ents, indexes, run_python, spawn_python  # noqa: E402

import pyraft.stores.lmdb as lmdb_store  # noqa: E402
from pyraft.codec import pack  # noqa: E402
from pyraft.engine.commands import AppendToLog, PurgeLog, SaveCommitted, SaveVote, TruncateLog  # noqa: E402
from pyraft.errors import Fatal, StorageError  # noqa: E402
from pyraft.storage import LogState  # noqa: E402
from pyraft.stores.lmdb import (LOG_ENV_NAME, LOG_LOCK_NAME, LmdbLogReader, LmdbLogStore,  # noqa: E402
                                node_dir_layout)
from pyraft.types import Entry, EntryKind, LogId, Vote  # noqa: E402

KIB = 1024


class TestLmdbLogStoreContract(LogStoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        s = LmdbLogStore(tmp_path / "node", node_id=1, cluster_name="test")
        yield s
        s.close()


def big(i, term=1, size=KIB):
    return Entry(LogId(term, i), EntryKind.NORMAL, {"i": i, "pad": "x" * size})


def data_digest(path):
    with open(os.path.join(path, LOG_ENV_NAME, "data.mdb"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------
# Durability and layout

def test_everything_survives_a_reopen(tmp_path):
    with LmdbLogStore(tmp_path, node_id=3, cluster_name="c") as s:
        s.write([SaveVote(Vote(4, 3)), AppendToLog(ents(1, 21, term=2)), SaveCommitted(LogId(2, 15))])
        s.write([PurgeLog(LogId(2, 5)), TruncateLog(19)])
    with LmdbLogStore(tmp_path, node_id=3, cluster_name="c") as s:
        assert s.read_vote() == Vote(4, 3)
        assert s.read_committed() == LogId(2, 15)
        assert s.log_state() == LogState(LogId(2, 5), LogId(2, 18))
        assert s.read(6, 100) == ents(6, 19, term=2)
        assert s.read(5, 100) == []
        m = s.meta()
        assert (m.format_version, m.node_id, m.cluster_name) == (lmdb_store.FORMAT_VERSION, 3, "c")


def test_layout_of_the_node_data_directory(tmp_path):
    with LmdbLogStore(tmp_path) as s:
        assert s.path == str(tmp_path)
    lay = node_dir_layout(tmp_path)
    assert lay.log_env == os.path.join(tmp_path, LOG_ENV_NAME)
    assert os.path.isfile(os.path.join(lay.log_env, "data.mdb"))
    assert os.path.isfile(lay.log_lock)
    assert sorted(os.listdir(tmp_path)) == sorted([LOG_ENV_NAME, LOG_LOCK_NAME])


def test_commits_are_synced_unless_explicitly_asked_not_to(tmp_path):
    with LmdbLogStore(tmp_path / "a") as s:
        flags = s._env._live().flags()
        assert flags["sync"] and flags["metasync"]
    with LmdbLogStore(tmp_path / "b", sync=False) as s:
        assert not s._env._live().flags()["sync"]


def test_unknown_operations_are_refused(tmp_path):
    with LmdbLogStore(tmp_path) as s:
        with pytest.raises(StorageError):
            s.write(["not an op"])


# ---------------------------------------------------------------------------
# Map growth

def test_the_map_grows_by_doubling_as_the_log_grows(tmp_path):
    with LmdbLogStore(tmp_path, map_size=32 * KIB) as s:
        first = s.map_size()
        s.write([AppendToLog([big(i) for i in range(1, 1001)])])   # one batch bigger than several doublings
        for b in range(10):
            s.write([AppendToLog([big(i) for i in range(1001 + b * 100, 1101 + b * 100)])])
        assert s.map_size() > 32 * first
        assert s.log_state().last_log_id == LogId(1, 2000)
        got = s.read(1, 3000)
        assert indexes(got) == list(range(1, 2001)) and got[1999] == big(2000)
        grown = s.map_size()
    with LmdbLogStore(tmp_path, map_size=32 * KIB) as s:   # keeps the grown map
        assert s.map_size() >= grown
        assert len(s.read(1, 3000)) == 2000


def test_readers_on_other_threads_while_the_map_grows(tmp_path):
    s = LmdbLogStore(tmp_path, map_size=32 * KIB)
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            try:
                got = s.read(1, 10_000)
                if indexes(got) != list(range(1, len(got) + 1)) or len(got) % 50:
                    errors.append(len(got))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for b in range(30):
            s.write([AppendToLog([big(i) for i in range(1 + b * 50, 51 + b * 50)])])
    finally:
        stop.set()
        for t in threads:
            t.join()
        s.close()
    assert errors == []


def test_past_max_map_size_write_raises_fatal_naming_the_directory_and_stores_nothing(tmp_path):
    s = LmdbLogStore(tmp_path, map_size=64 * KIB, max_map_size=256 * KIB)
    i = 1
    with pytest.raises(Fatal) as ex:
        for _ in range(1000):
            s.write([AppendToLog([big(j) for j in range(i, i + 20)]), SaveVote(Vote(i, 1))])
            i += 20
    msg = str(ex.value)
    assert str(tmp_path) in msg and "max_map_size" in msg and "free" in msg
    assert s.map_size() == 256 * KIB
    assert s.log_state().last_log_id == LogId(1, i - 1)          # the failed batch left nothing
    assert s.read_vote() == Vote(i - 20, 1)
    assert indexes(s.read(1, 100_000)) == list(range(1, i))
    s.close()
    with LmdbLogStore(tmp_path) as s2:                             # and the files are sound
        assert s2.log_state().last_log_id == LogId(1, i - 1)


# ---------------------------------------------------------------------------
# One live owner per directory

def test_a_second_open_in_the_same_process_fails_at_once(tmp_path):
    with LmdbLogStore(tmp_path) as s:
        s.write([AppendToLog(ents(1, 3))])
        before = data_digest(tmp_path)
        with pytest.raises(StorageError) as ex:
            LmdbLogStore(tmp_path)
        assert str(tmp_path) in str(ex.value) and "already open" in str(ex.value)
        assert s.read(1, 10) == ents(1, 3)
    assert data_digest(tmp_path) == before
    with LmdbLogStore(tmp_path) as s:                              # released by close
        assert s.read(1, 10) == ents(1, 3)


def test_a_second_open_in_another_process_fails(tmp_path):
    code = ("import sys\nfrom pyraft.stores.lmdb import LmdbLogStore\n"
            "from pyraft.errors import StorageError\n"
            "try:\n    LmdbLogStore(sys.argv[1])\nexcept StorageError as e:\n    print('REFUSED', e)\n"
            "else:\n    print('OPENED')\n")
    with LmdbLogStore(tmp_path):
        r = run_python(code, str(tmp_path))
    assert r.stdout.startswith("REFUSED"), r.stdout + r.stderr
    assert str(tmp_path) in r.stdout
    r = run_python(code, str(tmp_path))                            # the lock died with its owner
    assert r.stdout.startswith("OPENED"), r.stdout + r.stderr


# ---------------------------------------------------------------------------
# Identity and format checks at open

@pytest.mark.parametrize("kw, words", [({"node_id": 2}, "node 1"), ({"cluster_name": "other"}, "'c'")])
def test_a_directory_of_another_node_or_cluster_is_refused_untouched(tmp_path, kw, words):
    with LmdbLogStore(tmp_path, node_id=1, cluster_name="c") as s:
        s.write([AppendToLog(ents(1, 3))])
    before = data_digest(tmp_path)
    with pytest.raises(StorageError) as ex:
        LmdbLogStore(tmp_path, **{"node_id": 1, "cluster_name": "c", **kw})
    assert words in str(ex.value) and str(tmp_path) in str(ex.value)
    assert data_digest(tmp_path) == before
    with LmdbLogStore(tmp_path, node_id=1, cluster_name="c") as s:  # the right node still opens it
        assert s.read(1, 10) == ents(1, 3)


def test_node_id_and_cluster_are_recorded_when_first_given(tmp_path):
    with LmdbLogStore(tmp_path):
        pass
    with LmdbLogStore(tmp_path, node_id=5, cluster_name="x") as s:
        assert (s.meta().node_id, s.meta().cluster_name) == (5, "x")
    with pytest.raises(StorageError):
        LmdbLogStore(tmp_path, node_id=6)


def test_an_unknown_format_version_is_refused_untouched(tmp_path):
    with LmdbLogStore(tmp_path) as s:
        s.write([AppendToLog(ents(1, 3))])
    env = lmdb.open(os.path.join(tmp_path, LOG_ENV_NAME), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"format", pack(99), db=env.open_db(b"meta", txn=txn))
    env.close()
    before = data_digest(tmp_path)
    with pytest.raises(StorageError) as ex:
        LmdbLogStore(tmp_path)
    assert "format version 99" in str(ex.value)
    assert data_digest(tmp_path) == before
    with pytest.raises(StorageError):
        LmdbLogStore.open_readonly(tmp_path)


def test_a_foreign_lmdb_environment_is_refused_untouched(tmp_path):
    env = lmdb.open(os.path.join(tmp_path, LOG_ENV_NAME))
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    before = data_digest(tmp_path)
    with pytest.raises(StorageError) as ex:
        LmdbLogStore(tmp_path)
    assert "not a pyraft log store" in str(ex.value)
    assert data_digest(tmp_path) == before


def test_a_non_lmdb_file_where_the_environment_should_be(tmp_path):
    env_dir = tmp_path / LOG_ENV_NAME
    env_dir.mkdir()
    (env_dir / "data.mdb").write_bytes(b"this is not LMDB" * 1000)
    with pytest.raises(StorageError) as ex:
        LmdbLogStore(tmp_path)
    assert "not an LMDB environment" in str(ex.value) and str(env_dir) in str(ex.value)
    assert (env_dir / "data.mdb").read_bytes() == b"this is not LMDB" * 1000
    with pytest.raises(StorageError):
        LmdbLogStore.open_readonly(tmp_path)


def test_a_plain_file_in_place_of_the_environment_directory(tmp_path):
    (tmp_path / LOG_ENV_NAME).write_bytes(b"x")
    with pytest.raises(StorageError) as ex:
        LmdbLogStore(tmp_path)
    assert "is a file" in str(ex.value)


def test_a_data_dir_under_a_regular_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StorageError) as ex:
        LmdbLogStore(tmp_path / "f" / "node")
    assert str(tmp_path / "f") in str(ex.value)
    with pytest.raises(StorageError):
        LmdbLogStore(tmp_path / "f")


def test_a_read_only_directory_is_refused_with_nothing_created(tmp_path, monkeypatch):
    # Tests run as root, whom chmod does not stop: simulate what an ordinary
    # user would see through the same os.access check the store makes.
    real_access = os.access
    ro = str(tmp_path / "ro")
    os.mkdir(ro)
    monkeypatch.setattr(lmdb_store.os, "access",
                        lambda p, mode, **kw: False if (str(p) == ro and mode & os.W_OK) else real_access(p, mode, **kw))
    with pytest.raises(StorageError) as ex:
        LmdbLogStore(ro)
    assert "not writable" in str(ex.value) and ro in str(ex.value)
    assert os.listdir(ro) == []


def test_a_data_dir_that_cannot_be_created(tmp_path, monkeypatch):
    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(lmdb_store.os, "mkdir", refuse)
    with pytest.raises(StorageError) as ex:
        LmdbLogStore(tmp_path / "new")
    assert "Permission denied" in str(ex.value)


# ---------------------------------------------------------------------------
# Read-only access (for pyraft-inspect)

def test_the_read_only_reader_exposes_meta_state_and_entries(tmp_path):
    with LmdbLogStore(tmp_path, node_id=2, cluster_name="c") as s:
        s.write([SaveVote(Vote(3, 2)), AppendToLog(ents(1, 11, term=3)), SaveCommitted(LogId(3, 8)),
                 PurgeLog(LogId(3, 2))])
    before = data_digest(tmp_path)
    with LmdbLogStore.open_readonly(tmp_path) as r:
        assert isinstance(r, LmdbLogReader) and r.consistent
        m = r.meta()
        assert (m.node_id, m.cluster_name, m.vote, m.committed, m.purged) == (
            2, "c", Vote(3, 2), LogId(3, 8), LogId(3, 2))
        assert r.read_vote() == Vote(3, 2) and r.read_committed() == LogId(3, 8)
        assert r.log_state() == LogState(LogId(3, 2), LogId(3, 10))
        assert r.read(3, 5) == ents(3, 5, term=3)
        with r.view() as v:
            assert v.first_index() == 3 and v.count() == 8
            assert list(v.iter_entries()) == ents(3, 11, term=3)
            assert [i for i, _ in v.iter_raw(9)] == [9, 10]
            assert v.log_state == r.log_state()
        with pytest.raises(StorageError):
            r.write([SaveVote(Vote(9, 9))])
    assert data_digest(tmp_path) == before


def test_the_read_only_reader_needs_an_existing_store(tmp_path):
    with pytest.raises(StorageError):
        LmdbLogStore.open_readonly(tmp_path / "nothing")
    assert not os.path.exists(tmp_path / "nothing")


def test_the_read_only_reader_in_the_writers_own_process_is_refused_clearly(tmp_path):
    with LmdbLogStore(tmp_path):
        with pytest.raises(StorageError) as ex:
            LmdbLogStore.open_readonly(tmp_path)
        assert "already open in this process" in str(ex.value)


READER_CHILD = r"""
import sys, time
from pyraft.stores.lmdb import LmdbLogStore
r = LmdbLogStore.open_readonly(sys.argv[1])
print("READY", flush=True)
deadline = time.monotonic() + 20
n = last = 0
while time.monotonic() < deadline:
    with r.view() as v:
        st = v.log_state
        got = list(v.iter_entries())
    if [e.index for e in got] != list(range(1, len(got) + 1)):
        print("ERR hole", flush=True); break
    if got and not got[-1].payload["end"]:
        print("ERR half a batch at", got[-1].index, flush=True); break
    if (st.last_log_id.index if st.last_log_id else 0) != len(got):
        print("ERR state", st, len(got), flush=True); break
    tail = r.read(max(1, len(got) - 5), len(got) + 1)
    if got and tail[-1].index < got[-1].index:
        print("ERR went back", flush=True); break
    n += 1
    last = len(got)
    if last >= int(sys.argv[2]):
        break
print("OK", n, last, r.map_size(), flush=True)
"""


def test_another_process_reads_consistently_while_the_node_writes_and_grows_the_map(tmp_path):
    s = LmdbLogStore(tmp_path, map_size=32 * KIB)
    s.write([AppendToLog([Entry(LogId(1, 1), EntryKind.NORMAL, {"end": True})])])
    total = 1
    child = spawn_python(READER_CHILD, str(tmp_path), "1500")
    try:
        assert child.stdout.readline().strip() == "READY"
        b = 0
        while total < 1500:
            size = 1 + b % 9
            s.write([AppendToLog([Entry(LogId(1, total + 1 + k), EntryKind.NORMAL,
                                        {"end": k == size - 1, "pad": "p" * 700}) for k in range(size)])])
            total += size
            b += 1
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        s.close()
    assert out.startswith("OK"), out + err
    _, reads, last, child_map = out.split()
    assert int(reads) > 1 and int(last) == total
    assert int(child_map) > 32 * KIB   # the reader followed the writer's map growth


# ---------------------------------------------------------------------------
# kill -9

WRITER_CHILD = r"""
import sys
from pyraft.stores.lmdb import LmdbLogStore
from pyraft.engine.commands import AppendToLog, SaveCommitted
from pyraft.types import Entry, EntryKind, LogId
s = LmdbLogStore(sys.argv[1], node_id=1, cluster_name="k9", map_size=64 * 1024)
last = s.log_state().last_log_id
i = (last.index if last else 0) + 1
print("START", i - 1, flush=True)
while True:
    n = 1 + i % 13
    batch = [Entry(LogId(1, j), EntryKind.NORMAL, {"j": j, "pad": "x" * (j % 700)}) for j in range(i, i + n)]
    s.write([AppendToLog(batch), SaveCommitted(batch[-1].log_id)])
    i += n
    print(i - 1, flush=True)
"""


def test_kill_9_loses_no_acknowledged_entry_and_leaves_no_hole(tmp_path):
    rng = random.Random(1234)
    acked_overall = 0
    for round_ in range(6):
        child = spawn_python(WRITER_CHILD, str(tmp_path))
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            time.sleep(0.005)
        assert lines and lines[0].startswith("START"), child.stderr.read() if child.poll() is not None else ""
        assert int(lines[0].split()[1]) >= acked_overall
        time.sleep(rng.uniform(0.02, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        reader.join(timeout=10)
        child.stderr.close()
        acked = [int(x) for x in lines[1:] if x.strip().isdigit()]
        if acked:
            acked_overall = max(acked_overall, acked[-1])
        with LmdbLogStore(tmp_path, node_id=1, cluster_name="k9") as s:
            st = s.log_state()
            assert st.last_log_id is not None and st.last_log_id.index >= acked_overall, (round_, st, acked_overall)
            got = s.read(1, st.last_log_id.index + 1)
            assert indexes(got) == list(range(1, st.last_log_id.index + 1))
            assert all(e.payload["j"] == e.index for e in got)
            assert s.read_committed() == st.last_log_id
    assert acked_overall > 0
