"""KVStateMachine: the KV contract, plus restarts, concurrent snapshots, locking, and crash-atomic installs."""
import os
import signal
import sys
import threading

import msgpack
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers_store import M12, Applier, KVContract, get, normal, put, spawn_python  # noqa: E402

from pyraft.errors import CodecError, Compacted, StorageError  # noqa: E402
from pyraft.kv import KVCommandError, KVReader, KVStateMachine  # noqa: E402
from pyraft.stores.lmdb import KV_ENV_NAME, KV_LOCK_NAME, LmdbLogStore, SNAPSHOT_DIR_NAME  # noqa: E402
from pyraft.types import Entry, EntryKind, LogId, StoredMembership  # noqa: E402

KIB = 1024


class TestKVStateMachineContract(KVContract):
    @pytest.fixture
    def make_sm(self, tmp_path):
        opened = []

        def make(name, **kw):
            sm = KVStateMachine(tmp_path / name, **kw)
            opened.append(sm)
            return sm

        yield make
        for sm in opened:
            sm.close()


def snapshot_files(path):
    return sorted(os.listdir(os.path.join(path, SNAPSHOT_DIR_NAME)))


def transfer(src, dst):
    """What replication does: stream src's current snapshot into dst's receiving file; return (meta, file)."""
    meta, f = src.open_snapshot()
    sink = dst.begin_receiving_snapshot()
    with f:
        while chunk := f.read(4096):
            sink.write(chunk)
    return meta, sink


def test_layout_shares_the_node_data_directory_with_the_log_store(tmp_path):
    with LmdbLogStore(tmp_path), KVStateMachine(tmp_path) as sm:
        Applier(sm)(put("a", 1))
        sm.build_snapshot()
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(["log.lmdb", "log.lock", KV_ENV_NAME, KV_LOCK_NAME, SNAPSHOT_DIR_NAME])
    assert len(snapshot_files(tmp_path)) == 1


def test_restart_keeps_state_applied_state_sessions_and_snapshot(tmp_path):
    with KVStateMachine(tmp_path) as sm:
        ap = Applier(sm)
        ap.entries(Entry(LogId(1, 1), EntryKind.MEMBERSHIP, M12))
        ap(put("a", 1), put("b", [2]), put("c", 3, client="cl", seq=4))
        meta = sm.build_snapshot()
        ap(put("d", 4))
    with KVStateMachine(tmp_path) as sm:
        assert sm.applied_state() == (LogId(1, 5), StoredMembership(LogId(1, 1), M12))
        assert sm.items() == [("a", 1), ("b", [2]), ("c", 3), ("d", 4)]
        assert sm.current_snapshot() == meta
        m, f = sm.open_snapshot()
        f.close()
        assert m == meta
        ap = Applier(sm, start=6)
        assert ap(put("c", 99, client="cl", seq=4)) is None          # still deduplicated
        assert sm.get("c") == 3
        assert len(sm) == 4


def test_a_second_open_is_refused(tmp_path):
    with KVStateMachine(tmp_path):
        with pytest.raises(StorageError) as ex:
            KVStateMachine(tmp_path)
        assert str(tmp_path) in str(ex.value)


def test_the_map_grows_under_apply(tmp_path):
    with KVStateMachine(tmp_path, map_size=32 * KIB) as sm:
        ap = Applier(sm)
        for b in range(20):
            ap(*[put(("k", b, i), "v" * 900) for i in range(50)])
        assert len(sm) == 1000
        assert sm.get(("k", 19, 49)) == "v" * 900


def test_only_the_current_snapshot_file_is_kept(tmp_path):
    with KVStateMachine(tmp_path) as sm:
        ap = Applier(sm)
        for i in range(3):
            ap(put(i, i))
            meta = sm.build_snapshot()
            assert len(snapshot_files(tmp_path)) == 1
        assert sm.current_snapshot() == meta
        stray = os.path.join(tmp_path, SNAPSHOT_DIR_NAME, "recv-stray.tmp")
        with open(stray, "wb") as f:
            f.write(b"partial")
    with KVStateMachine(tmp_path) as sm:                  # leftovers of a crash go at open
        assert len(snapshot_files(tmp_path)) == 1
        assert sm.current_snapshot() == meta


def test_a_snapshot_built_while_apply_runs_is_one_consistent_state(tmp_path):
    """Each entry i puts k<i> and sets "last" = i: a consistent view has exactly k1..k<last>."""
    sm = KVStateMachine(tmp_path / "src")
    stop = threading.Event()
    errors = []

    def applier():
        try:
            i = 1
            while not stop.is_set() and i < 20_000:
                batch = []
                for _ in range(25):
                    batch.append(normal(i, {"op": "put", "key": f"k{i}", "value": i}))
                    batch.append(normal(i + 1, put("last", i)))
                    i += 2
                sm.apply(batch)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    t = threading.Thread(target=applier)
    t.start()
    metas = []
    try:
        while len(metas) < 4:
            meta = sm.build_snapshot()
            if meta.last_log_id is not None:
                metas.append(meta)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert len({m.last_log_id for m in metas}) > 1        # built at different points while applying
    dst = KVStateMachine(tmp_path / "dst")
    meta, sink = transfer(sm, dst)
    dst.install_snapshot(meta, sink)
    last = meta.last_log_id.index
    got = dict(dst.items())
    assert got["last"] == last - 1
    assert {k for k in got if k != "last"} == {f"k{i}" for i in range(1, last, 2)}
    assert dst.applied_state()[0] == meta.last_log_id
    sm.close()
    dst.close()


def test_sessions_of_an_installed_snapshot_expire_as_on_the_member_that_built_it(tmp_path):
    # The apply thread keeps a lower bound on the sessions' indexes between batches
    # (so most batches need not look for expired ones); an installed snapshot brings
    # other sessions, which must expire all the same.
    src = KVStateMachine(tmp_path / "src", session_ttl=3)
    Applier(src)(put("x", 1, client="c", seq=1))
    src.build_snapshot()
    dst = KVStateMachine(tmp_path / "dst", session_ttl=3)
    Applier(dst)(put("y", 1))  # dst has seen that it has no sessions
    meta, sink = transfer(src, dst)
    dst.install_snapshot(meta, sink)
    later = [put("a", 1), put("b", 1), put("c", 1), put("d", 1), put("x", 9, client="c", seq=1)]
    for sm in (src, dst):
        # index 6 is more than 3 after the session's last command (1): the session is gone and
        # seq 1 is a new request, not a repeat
        assert Applier(sm, start=2)(*later)[-1] is None
        assert sm.get("x") == 9
    src.close()
    dst.close()


def test_install_replaces_the_whole_state(tmp_path):
    src = KVStateMachine(tmp_path / "src")
    Applier(src)(put("new", 1), put("both", "src"))
    src.build_snapshot()
    dst = KVStateMachine(tmp_path / "dst")
    dap = Applier(dst)
    dap(put("old", 1), put("both", "dst"), put("x", 1, client="only-in-dst", seq=1), put("y", 2), put("z", 3))
    meta, sink = transfer(src, dst)
    dst.install_snapshot(meta, sink)
    assert dict(dst.items()) == {"both": "src", "new": 1}
    assert dst.applied_state() == (LogId(1, 2), None)
    # the old session went with the old state: the same seq is applied anew
    assert Applier(dst, start=3)(put("x", 5, client="only-in-dst", seq=1)) is None
    assert dst.get("x") == 5
    src.close()
    dst.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "wrong-meta"])
def test_a_damaged_snapshot_is_refused_and_the_old_state_stays(tmp_path, damage):
    src = KVStateMachine(tmp_path / "src")
    Applier(src)(*[put(i, "v" * 100) for i in range(100)])
    src.build_snapshot()
    dst = KVStateMachine(tmp_path / "dst")
    Applier(dst)(put("mine", 1))
    meta, f = src.open_snapshot()
    data = bytearray(f.read())
    f.close()
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        del data[-100:]
    elif damage == "empty":
        data = bytearray()
    else:
        meta = type(meta)(LogId(9, 999), meta.last_membership, meta.snapshot_id)
    sink = dst.begin_receiving_snapshot()
    sink.write(bytes(data))
    with pytest.raises(CodecError):  # content refused: the node goes on (storage.py)
        dst.install_snapshot(meta, sink)
    assert dst.items() == [("mine", 1)]
    assert dst.applied_state()[0] == LogId(1, 1)
    assert dst.current_snapshot() is None
    assert snapshot_files(tmp_path / "dst") == []
    src.close()
    dst.close()


def _install_crafted(tmp_path, dst: KVStateMachine, lease: bool, key: bytes, header: tuple) -> None:
    """Install into ``dst`` a snapshot (at index 1) of one crafted data record."""
    from pyraft.kv.encoding import RECORD_HEADER, encode_key, encode_value
    from pyraft.kv.statemachine import _REC_DATA, _REC_END, _REC_LEASE, SNAPSHOT_MAGIC, SNAPSHOT_VERSION
    from pyraft.snapshot_files import SnapshotWriter
    src = KVStateMachine(tmp_path / "src")
    Applier(src)(put("a", 1))
    meta = src.build_snapshot()
    src.close()
    sink = dst.begin_receiving_snapshot()
    w = SnapshotWriter(sink, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, meta)
    if lease:
        w.record(_REC_LEASE, 1, 60.0)
    w.record(_REC_DATA, encode_key(key), RECORD_HEADER.pack(*header) + encode_value(1))
    w.finish(_REC_END)
    dst.install_snapshot(meta, sink)


@pytest.mark.parametrize("key, header, why", [
    (b"k" * 508, (1, 1, 1, 1), "attached to a lease"),  # 509 bytes: fits the store, not the lease's index
    (b"k", (1, 1, 2**64 - 1, 0), "impossible"),          # the next put could not count it
    (b"k", (1, 2, 1, 0), "impossible"),                  # modified after the snapshot's index
    (b"k", (0, 1, 1, 0), "impossible"),
    (b"k", (1, 1, 0, 0), "impossible"),
], ids=["leased-key-too-long", "version-max", "mod-past-snapshot", "create-0", "version-0"])
def test_a_snapshot_record_apply_would_fail_on_later_is_refused_as_content(tmp_path, key, header, why):
    """Refused as content (CodecError: the node goes on), not loaded to fail a later apply (Fatal)."""
    dst = KVStateMachine(tmp_path / "dst")
    try:
        Applier(dst)(put("mine", 1))
        with pytest.raises(CodecError, match=why):
            _install_crafted(tmp_path, dst, header[3] != 0, key, header)
        assert dst.items() == [("mine", 1)]
    finally:
        dst.close()


def test_a_snapshot_session_written_past_the_snapshots_index_is_refused_as_content(tmp_path):
    """A session at index 11 in a snapshot at index 1: no applied entry wrote it, so it is a lie.

    Loaded, its index-order key would outlive the session's next write and
    later expire it while its client still writes: a retry would then run again.
    """
    from pyraft.kv.statemachine import _REC_END, _REC_SESSION, SNAPSHOT_MAGIC, SNAPSHOT_VERSION
    from pyraft.snapshot_files import SnapshotWriter
    src = KVStateMachine(tmp_path / "src")
    Applier(src)(put("a", 1))
    meta = src.build_snapshot()
    src.close()
    dst = KVStateMachine(tmp_path / "dst")
    try:
        Applier(dst)(put("mine", 1))
        for index, refused in ((1, False), (11, True)):
            sink = dst.begin_receiving_snapshot()
            w = SnapshotWriter(sink, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, meta)
            w.record(_REC_SESSION, msgpack.packb("c"), msgpack.packb([1, index, [0, None]]))
            w.finish(_REC_END)
            if refused:
                with pytest.raises(CodecError, match="log index 11 is past the snapshot's"):
                    dst.install_snapshot(meta, sink)
            else:
                dst.install_snapshot(meta, sink)
                assert dst.items() == []
    finally:
        dst.close()


def test_a_key_put_twice_in_one_txn_survives_a_snapshot_install(tmp_path):
    """Its version (2) is more than its revisions span (one): still a valid record."""
    src = KVStateMachine(tmp_path / "src")
    Applier(src)({"op": "txn", "success": [put("k", 1), put("k", 2)]})
    assert src.range("k")[0].version == 2
    meta = src.build_snapshot()
    _, f = src.open_snapshot()
    dst = KVStateMachine(tmp_path / "dst")
    sink = dst.begin_receiving_snapshot()
    sink.write(f.read())
    f.close()
    dst.install_snapshot(meta, sink)
    assert dst.get("k") == 2 and dst.range("k")[0].version == 2
    Applier(dst, start=2)(put("k", 3))
    assert dst.range("k")[0].version == 3
    src.close()
    dst.close()


def test_install_accepts_a_plain_binary_stream_too(tmp_path):
    import io
    src = KVStateMachine(tmp_path / "src")
    Applier(src)(put("a", 1))
    meta = src.build_snapshot()
    _, f = src.open_snapshot()
    buf = io.BytesIO(f.read())
    f.close()
    dst = KVStateMachine(tmp_path / "dst")
    dst.install_snapshot(meta, buf)
    assert buf.closed
    assert dst.items() == [("a", 1)]
    src.close()
    dst.close()


def test_get_through_the_log_and_bad_local_keys(tmp_path):
    with KVStateMachine(tmp_path) as sm:
        ap = Applier(sm)
        ap(put(b"\x00bin", {"v": 1}))
        assert ap(get(b"\x00bin")) == {"v": 1}
        with pytest.raises(KVCommandError):
            sm.get({"a": 1})


# ---------------------------------------------------------------------------
# Crash atomicity of install: kill -9 at each point that matters

INSTALL_CHILD = r"""
import os, sys, time
from pyraft.kv import KVStateMachine
from pyraft.kv.statemachine import KVStateMachine as K
from pyraft.codec import snapshot_meta_from_wire
import msgpack
point, dst, src = sys.argv[1], sys.argv[2], sys.argv[3]
def hook(where):
    if where == point:
        print("AT", where, flush=True)
        time.sleep(60)
K._crash_point = staticmethod(hook)
s = KVStateMachine(src)
meta, f = s.open_snapshot()
d = KVStateMachine(dst)
sink = d.begin_receiving_snapshot()
sink.write(f.read())
f.close()
d.install_snapshot(meta, sink)
print("DONE", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("point, expect_new", [("install:renamed", False), ("install:loading", False),
                                               ("install:committed", True)])
def test_install_killed_at_any_point_leaves_the_old_or_the_new_state(tmp_path, point, expect_new):
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    with KVStateMachine(src_dir) as src:
        Applier(src)(*[put(("new", i), i) for i in range(3000)])
        new_meta = src.build_snapshot()
        new_items = src.items()
    with KVStateMachine(dst_dir) as dst:
        ap = Applier(dst)
        ap(*[put(("old", i), i) for i in range(50)])
        old_meta = dst.build_snapshot()
        old_items = dst.items()
    child = spawn_python(INSTALL_CHILD, point, str(dst_dir), str(src_dir))
    try:
        line = child.stdout.readline()
        assert line.strip() == f"AT {point}", line + child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
        child.stderr.close()
    with KVStateMachine(dst_dir) as dst:
        if expect_new:
            assert dst.applied_state()[0] == new_meta.last_log_id
            assert dst.items() == new_items
            assert dst.current_snapshot() == new_meta
        else:
            assert dst.applied_state()[0] == old_meta.last_log_id
            assert dst.items() == old_items
            assert dst.current_snapshot() == old_meta
        assert len(snapshot_files(dst_dir)) == 1          # the loser's file is gone
        m, f = dst.open_snapshot()
        f.close()


def test_the_read_only_view_for_tools(tmp_path):
    with KVStateMachine(tmp_path) as sm:
        ap = Applier(sm)
        ap.entries(Entry(LogId(1, 1), EntryKind.MEMBERSHIP, M12))
        ap(put("a", 1), put(("b", 2), [3]))
        meta = sm.build_snapshot()
    with KVStateMachine.open_readonly(tmp_path) as r:
        assert r.state() == (LogId(1, 3), StoredMembership(LogId(1, 1), M12), meta, 2)
        assert r.get(("b", 2)) == [3] and r.get("zz") is None
        assert dict(r.items()) == {"a": 1, ("b", 2): [3]}
        status = r.status()
        assert status[:3] == r.state()[:3] and status.keys == 2
        assert status.snapshot_file == os.path.join(tmp_path, SNAPSHOT_DIR_NAME, snapshot_files(tmp_path)[0])
        assert r.check_snapshot_file(status.snapshot_file, meta) == (2, 0)
        assert r.data_file_size() > 0 and r.map_size() >= r.data_file_size()
    with open(status.snapshot_file, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(StorageError, match="checksum mismatch"):
        KVReader.check_snapshot_file(status.snapshot_file, meta)
    with pytest.raises(StorageError):
        KVStateMachine.open_readonly(tmp_path / "nothing")


# ---------------------------------------------------------------------------
# Format 2 and durability without fsync on apply (issue 20)

def test_a_format_1_store_is_refused_with_a_clear_error(tmp_path):
    import lmdb as _lmdb
    env = _lmdb.open(str(tmp_path / KV_ENV_NAME), max_dbs=8)
    meta = env.open_db(b"meta")
    for name in (b"data", b"sessions", b"session_index"):
        env.open_db(name)
    with env.begin(write=True) as txn:
        txn.put(b"format", msgpack.packb(1), db=meta)
    env.close()
    with pytest.raises(StorageError, match="format version 1 .* does not convert it"):
        KVStateMachine(tmp_path)
    with pytest.raises(StorageError, match="format version 1"):
        KVReader(tmp_path)


APPLY_CHILD = r"""
import sys, time
from pyraft.kv import KVStateMachine
sys.path.insert(0, "tests")
from helpers_store import Applier, put
sm = KVStateMachine(sys.argv[1])
ap = Applier(sm)
ap(*[put(("a", i), i) for i in range(100)])
if sys.argv[2] == "snapshot":
    sm.build_snapshot()
    ap(*[put(("b", i), i) for i in range(50)])
print("APPLIED", sm.applied_state()[0].index, flush=True)
time.sleep(60)
"""


def _apply_and_kill(path, mode):
    """A child applies entries (never closing: nothing synced but what a snapshot synced) and is SIGKILLed."""
    child = spawn_python(APPLY_CHILD, str(path), mode)
    try:
        line = child.stdout.readline()
        assert line.startswith("APPLIED"), line + child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
        child.stderr.close()
    return int(line.split()[1])


def test_kill_9_loses_nothing_applied(tmp_path):
    # Apply commits without fsync; a process crash leaves the page cache to the kernel: all there.
    last = _apply_and_kill(tmp_path, "snapshot")
    assert last == 150
    with KVStateMachine(tmp_path) as sm:
        assert sm.applied_state()[0].index == 150
        assert len(sm) == 150
        assert [e.revision for e in sm.events(("b",), prefix=True, start_revision=101)[0]] == list(range(101, 151))


@pytest.mark.parametrize("mode", ["snapshot", "none"])
def test_after_a_reboot_unsynced_state_is_rebuilt_from_the_newest_snapshot(tmp_path, monkeypatch, caplog, mode):
    # kv.boot names the boot the unsynced writes were made in; another boot id means the
    # machine went down since: the environment may be torn and is rebuilt (the log replays the rest).
    _apply_and_kill(tmp_path, mode)
    monkeypatch.setattr("pyraft.snapshot_files.boot_id", lambda: "another-boot")
    with KVStateMachine(tmp_path) as sm:
        if mode == "snapshot":
            assert sm.applied_state()[0].index == 100          # the snapshot's, fsynced when it was made
            assert sm.current_snapshot().last_log_id.index == 100
            assert len(sm) == 100 and sm.get(("b", 0)) is None
            with pytest.raises(Compacted):
                sm.events(("a",), prefix=True, start_revision=100)
            assert sm.events(("a",), prefix=True, start_revision=101) == ([], 101)
        else:
            assert sm.applied_state() == (None, None) and len(sm) == 0  # no snapshot: the log replays all
        assert "rebuilding it from the newest snapshot" in caplog.text
        with open(tmp_path / "kv.boot") as f:
            assert f.read().strip() == "another-boot"
    assert not os.path.exists(tmp_path / "kv.boot")                # a clean close synced and said so


def test_a_clean_close_needs_no_rebuild_after_a_reboot(tmp_path, monkeypatch):
    with KVStateMachine(tmp_path) as sm:
        Applier(sm)(put("a", 1), put("b", 2))
    monkeypatch.setattr("pyraft.snapshot_files.boot_id", lambda: "another-boot")
    with KVStateMachine(tmp_path) as sm:
        assert sm.applied_state()[0].index == 2 and sm.get("b") == 2


def test_a_new_environment_is_marked_unsynced_before_its_first_transaction(tmp_path, monkeypatch):
    # A new kv.lmdb's first transaction (its databases, its format) is committed without fsync
    # too: a power loss right after it may leave a torn environment, which kv.boot must name.
    marks = []

    def dies_after_the_first_transaction(self):
        self._open_dbs_for_real()
        marks.append(os.path.exists(tmp_path / "kv.boot"))
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(KVStateMachine, "_open_dbs_for_real", KVStateMachine._open_dbs, raising=False)
    monkeypatch.setattr(KVStateMachine, "_open_dbs", dies_after_the_first_transaction)
    with pytest.raises(KeyboardInterrupt):
        KVStateMachine(tmp_path)
    assert marks == [True]
    monkeypatch.undo()
    monkeypatch.setattr("pyraft.snapshot_files.boot_id", lambda: "another-boot")
    with KVStateMachine(tmp_path) as sm:  # after a reboot: rebuilt (empty), not trusted
        assert sm.applied_state() == (None, None)


def test_the_log_is_purged_only_up_to_what_the_state_machine_holds_durably(tmp_path):
    """Every PurgeLog reaches the log store after the state machine synced at least that far."""
    from pyraft import Config, Node, Raft, ServerState
    from pyraft.engine.commands import PurgeLog
    from pyraft.stores.memory import MemoryLogStore
    from pyraft.transports.memory import MemoryNetwork

    synced = [0]  # the applied index the state machine had at its last sync
    purges = []

    class SpySM(KVStateMachine):
        def __init__(self, path):
            super().__init__(path)
            env_sync = self._env.sync

            def sync():
                applied = self.revision
                env_sync()
                synced[0] = max(synced[0], applied)
            self._env.sync = sync

    class SpyLog(MemoryLogStore):
        def write(self, ops):
            for op in ops:
                if isinstance(op, PurgeLog):
                    purges.append((op.upto.index, synced[0]))
            return super().write(ops)

    cfg = Config(heartbeat_interval=0.02, election_timeout=(0.1, 0.2), snapshot_every=20,
                 max_in_snapshot_log_to_keep=0)
    net = MemoryNetwork()
    sm = SpySM(tmp_path)
    r = Raft(1, cfg, net.transport(1), SpyLog(), sm)
    try:
        r.initialize({1: Node("mem://1")})
        r.wait(10).state(ServerState.LEADER)
        for i in range(150):
            r.client_write(put(f"k{i}", i), timeout=10)
        r.wait(10).metrics(lambda m: m.purged is not None and m.purged.index >= 100, "purges")
    finally:
        r.shutdown()
        sm.close()
    assert purges
    assert all(upto <= durable for upto, durable in purges), purges


@pytest.mark.parametrize("applied, why", [
    (LogId(1, 1_000_000), "past the log's last entry"),  # it would skip the cluster's writes, then overwrite them
    (LogId(7, 5), "the log holds 1-5 at that index"),
])
def test_a_node_whose_state_machine_applied_what_its_log_never_held_refuses_to_start(applied, why):
    from pyraft import Config, Raft
    from pyraft.engine.commands import AppendToLog
    from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
    from pyraft.transports.memory import MemoryNetwork

    log = MemoryLogStore()
    log.write([AppendToLog([normal(i, put("k", i)) for i in range(1, 11)])])
    sm = MemoryStateMachine()
    sm.apply([normal(i, put("k", i)) for i in range(1, 6)])
    sm.applied_state = lambda: (applied, None)  # as a changed file would say
    with pytest.raises(StorageError, match=why):
        Raft(1, Config(), MemoryNetwork().transport(1), log, sm)


def test_a_state_machine_ahead_of_its_log_by_an_installed_snapshot_starts():
    """The crash window of an install: the snapshot is in the state machine, the log not yet reset."""
    from pyraft import Config, Raft
    from pyraft.engine.commands import AppendToLog
    from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
    from pyraft.transports.memory import MemoryNetwork

    src = MemoryStateMachine()
    src.apply([normal(i, put("k", i), term=1 if i < 15 else 3) for i in range(1, 21)])
    meta = src.build_snapshot()
    _, f = src.open_snapshot()
    sm = MemoryStateMachine()
    sink = sm.begin_receiving_snapshot()
    sink.write(f.read())
    sink.seek(0)
    sm.install_snapshot(meta, sink)
    log = MemoryLogStore()
    log.write([AppendToLog([normal(i, put("k", i)) for i in range(1, 11)])])
    r = Raft(1, Config(), MemoryNetwork().transport(1), log, sm)
    try:
        assert r.metrics().last_applied == LogId(3, 20)
    finally:
        r.shutdown()
    # The log still holds another term's entry at the snapshot's index (a deposed leader's, which
    # the install was about to drop): the snapshot is the truth.
    log = MemoryLogStore()
    log.write([AppendToLog([normal(i, put("k", i), term=1 if i < 15 else 2) for i in range(1, 25)])])
    r = Raft(1, Config(), MemoryNetwork().transport(1), log, sm)
    try:
        assert r.metrics().last_applied == LogId(3, 20)
    finally:
        r.shutdown()


def test_a_node_whose_state_machine_is_behind_the_purged_log_refuses_to_start():
    from pyraft import Config, Raft
    from pyraft.engine.commands import AppendToLog, PurgeLog
    from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
    from pyraft.transports.memory import MemoryNetwork

    log = MemoryLogStore()
    log.write([AppendToLog([normal(i, put("k", i)) for i in range(1, 11)]), PurgeLog(LogId(1, 6))])
    with pytest.raises(StorageError, match="entries 1..6 are lost on this node"):
        Raft(1, Config(), MemoryNetwork().transport(1), log, MemoryStateMachine())
