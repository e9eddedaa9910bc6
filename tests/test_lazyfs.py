"""The lazy filesystem (tests/powerloss/lazyfs.py): what it forgets at a power cut, and what it keeps.

Each test mounts one under ``tmp_path`` (skipped, with the reason, where FUSE
cannot be mounted; failed instead under ``CI=true``).
"""
from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from powerloss.mount import LazyMount, require_fuse

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def mount(tmp_path):
    require_fuse()
    made: list[LazyMount] = []

    def make(rule: str = "strict") -> LazyMount:
        m = LazyMount(str(tmp_path / f"disk-{rule}"), str(tmp_path / f"mnt-{rule}"), rule)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def write_file(path: str, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_file(m: LazyMount, name: str, data: bytes) -> str:
    """A file on mount ``m`` made durable (synced, and its directory): what a cut keeps.  Its path."""
    p = os.path.join(m.mountpoint, name)
    write_file(p, data, sync=True)
    sync_dir(m.mountpoint)
    return p


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------
# File contents

def test_an_unsynced_write_is_forgotten_and_a_synced_one_kept(mount):
    m = mount("strict")
    p = durable_file(m, "f", b"a" * 10000)
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"B" * 5000, 3000)      # unsynced, across pages
    os.pwrite(fd, b"C" * 100, 12000)      # unsynced, past the end: the file grows
    assert os.fstat(fd).st_size == 12100
    os.close(fd)
    assert read(p)[2990:3010] == b"a" * 10 + b"B" * 10
    assert m.cut()["dropped_bytes"] > 0
    assert read(p) == b"a" * 10000 and os.path.getsize(p) == 10000
    # Synced this time (fdatasync, as LMDB does): kept.
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"D" * 5000, 3000)
    os.fdatasync(fd)
    os.ftruncate(fd, 4000)                # unsynced truncate: forgotten
    os.close(fd)
    assert os.path.getsize(p) == 4000
    m.cut()
    assert read(p) == b"a" * 3000 + b"D" * 5000 + b"a" * 2000


def test_a_write_through_an_o_dsync_descriptor_is_durable_at_once(mount):
    # LMDB writes its meta pages through such a descriptor (unless metasync is off).
    m = mount("strict")
    p = durable_file(m, "f", b"x" * 8192)
    fd = os.open(p, os.O_WRONLY | os.O_DSYNC)
    os.pwrite(fd, b"M" * 4096, 0)
    os.close(fd)
    m.cut()
    assert read(p) == b"M" * 4096 + b"x" * 4096


def test_mmap_reads_see_unsynced_writes_and_after_a_cut_only_what_was_synced(mount):
    m = mount("strict")
    p = durable_file(m, "data", b"\0" * 65536)
    fd = os.open(p, os.O_RDWR)
    mm = mmap.mmap(fd, 65536, prot=mmap.PROT_READ)   # as LMDB reads its data file
    assert mm[40960:40965] == b"\0" * 5
    os.pwrite(fd, b"page!" * 819, 40960)              # as LMDB writes a page
    assert mm[40960:40965] == b"page!"
    os.pwrite(fd, b"kept!" * 819, 8192)
    os.fdatasync(fd)
    os.pwrite(fd, b"lost!" * 819, 16384)
    assert mm[16384:16389] == b"lost!"
    mm.close()
    os.close(fd)
    m.cut()
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert mm[8192:8197] == b"kept!"
        assert mm[16384:16389] == b"\0" * 5 and mm[40960:40965] == b"page!"  # synced with kept!
        mm.close()


def test_a_shared_writable_mapping_and_locks_work_as_on_a_disk(mount):
    # LMDB's lock.mdb: a shared read-write mapping, and fcntl locks; pyraft's lock file: flock.
    m = mount("strict")
    p = os.path.join(m.mountpoint, "lock")
    write_file(p, b"\0" * 8192, sync=True)
    fd = os.open(p, os.O_RDWR)
    mm = mmap.mmap(fd, 8192)
    mm[0:4] = b"slot"
    mm.flush()
    assert read(p)[:4] == b"slot"
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other = os.open(p, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(other)
    mm.close()
    os.close(fd)


# ---------------------------------------------------------------------------
# Names: the two rules

@pytest.mark.parametrize("rule", ["strict", "ext4"])
def test_a_new_file_synced_but_not_its_directory(mount, rule):
    m = mount(rule)
    d = os.path.join(m.mountpoint, "dir")
    os.mkdir(d)
    write_file(os.path.join(d, "f"), b"data", sync=True)
    m.cut()
    if rule == "strict":  # only a directory fsync makes a new name durable
        assert not os.path.exists(d)
    else:                 # ext4: the file's fsync committed the earlier name changes too
        assert read(os.path.join(d, "f")) == b"data"


def test_strict_names_are_durable_once_their_directories_are_synced(mount):
    m = mount("strict")
    d = os.path.join(m.mountpoint, "dir")
    os.mkdir(d)
    sync_dir(m.mountpoint)                           # "dir" is durable
    write_file(os.path.join(d, "f"), b"data", sync=True)
    write_file(os.path.join(d, "g"), b"gone", sync=True)
    m.cut()                                          # f and g were never named durably
    assert os.listdir(d) == []
    write_file(os.path.join(d, "f"), b"data", sync=True)
    sync_dir(d)
    write_file(os.path.join(d, "g"), b"late", sync=True)  # after the directory's fsync
    m.cut()
    assert os.listdir(d) == ["f"] and read(os.path.join(d, "f")) == b"data"
    # A directory's fsync commits its own names only: "sub" itself is new in "dir", never synced.
    sub = os.path.join(d, "sub")
    os.mkdir(sub)
    write_file(os.path.join(sub, "h"), b"h", sync=True)
    sync_dir(sub)
    m.cut()
    assert os.listdir(d) == ["f"]


@pytest.mark.parametrize("rule", ["strict", "ext4"])
def test_rename_over_a_file_and_unlink_are_undone_unless_durable(mount, rule):
    m = mount(rule)
    root = m.mountpoint
    old, new, tmp = (os.path.join(root, n) for n in ("old", "victim", "tmp"))
    write_file(old, b"old", sync=True)
    write_file(new, b"victim", sync=True)
    sync_dir(root)
    write_file(tmp, b"tmp", sync=True)   # under ext4 this sync also makes "tmp" durable
    os.rename(tmp, new)                  # replaces "victim": not durable yet under either rule
    os.unlink(old)
    assert sorted(os.listdir(root)) == ["victim"] and read(new) == b"tmp"
    m.cut()
    expect = ["old", "victim"] if rule == "strict" else ["old", "tmp", "victim"]
    assert sorted(os.listdir(root)) == expect and read(new) == b"victim" and read(old) == b"old"
    # The same, made durable: a file fsync is enough under ext4, the directory's under strict.
    os.rename(os.path.join(root, "victim"), os.path.join(root, "kept"))
    os.unlink(old)
    if rule == "strict":
        sync_dir(root)
    else:
        write_file(os.path.join(root, "other"), b"", sync=True)
    m.cut()
    assert "kept" in os.listdir(root) and "old" not in os.listdir(root)


# ---------------------------------------------------------------------------
# LMDB as pyraft opens it

def test_lmdb_commits_survive_a_cut_and_an_unsynced_environment_does_not(mount):
    from pyraft.engine.commands import AppendToLog
    from pyraft.errors import StorageError
    from pyraft.stores.lmdb import LmdbLogStore
    from pyraft.types import Entry, LogId

    m = mount("strict")
    synced, unsynced = os.path.join(m.mountpoint, "a"), os.path.join(m.mountpoint, "b")
    for path, sync in ((synced, True), (unsynced, False)):
        with LmdbLogStore(path, sync=sync) as s:
            s.write([AppendToLog([Entry(LogId(1, i), payload=f"v{i}") for i in range(1, 201)])])
            s.write([AppendToLog([Entry(LogId(1, 201), payload="last")])])
            if sync:
                with pytest.raises(StorageError, match="already open"):
                    LmdbLogStore(path)   # the lock file works on the mount
    m.cut()
    with LmdbLogStore(synced) as s:
        assert s.log_state().last_log_id == LogId(1, 201) and s.read(201, 202)[0].payload == "last"
    with LmdbLogStore(unsynced) as s:
        assert s.log_state().last_log_id is None   # sync=False: nothing ever reached the disk


def test_at_a_cut_the_kernel_may_have_written_back_any_subset_of_the_unsynced_pages(mount):
    # Between two syncs a disk holds any subset of the pages written (whole pages here, never torn).
    m = mount("strict")
    p = durable_file(m, "f", b"o" * 4096 * 64)
    fd = os.open(p, os.O_RDWR)
    for i in range(64):
        os.pwrite(fd, bytes([65 + i % 26]) * 4096, i * 4096)
    os.close(fd)
    r = m.cut(0.5, seed=7)
    data = read(p)
    pages = [data[i * 4096:(i + 1) * 4096] for i in range(64)]
    assert all(pg in (b"o" * 4096, bytes([65 + i % 26]) * 4096) for i, pg in enumerate(pages))
    new = sum(pg != b"o" * 4096 for pg in pages)
    assert 10 < new < 54 and r["written_back_bytes"] == new * 4096
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"z" * 4096, 0)
    os.close(fd)
    m.cut(1.0, seed=1)
    assert read(p)[:4096] == b"z" * 4096
