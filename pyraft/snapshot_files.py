"""Snapshot files of the LMDB state machines (internal to :mod:`pyraft.kv` and :mod:`pyraft.objects`).

Stream: a magic, then msgpack records: a header map ``{"version": v,
"meta": <snapshot-meta wire>}``, lists ``[kind, ...]``, an end record
``[end, n0, n1]`` counting the records of kinds 0 and 1; then the CRC-32 of
everything before it, 4 bytes big-endian.

Directory: ``snap-<term>-<index>-<random><suffix>`` files (``snap-empty-``
when nothing was applied), and ``build-*.tmp`` / ``recv-*.tmp`` files being
built or received.  The current file is named by a pointer
``[snapshot-meta wire, file name]`` in the state machine's LMDB meta database.

Unsynced state (:class:`UnsyncedMark`): a state machine that commits without
fsync (the log makes every applied entry recoverable) names, in a small
fsynced file, the boot of the machine in which it did so.  A process crash
keeps the page cache, so the same boot finds every commit; another boot (a
power loss or a kernel crash came between) may find the environment torn,
and the state machine rebuilds it from its newest snapshot file
(:func:`newest_first`, every one fsynced when it was made).
"""
from __future__ import annotations

import logging
import os
import shutil
import struct
import uuid
import zlib
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

import lmdb
import msgpack

from .codec import pack, snapshot_meta_from_wire, snapshot_meta_to_wire, unpack
from .errors import CodecError, StorageError
from .stores.lmdb import make_dirs, sync_dir
from .types import SnapshotMeta, log_index

CHUNK = 1 << 20
_TMP_SUFFIX = ".tmp"

log = logging.getLogger("pyraft.snapshot_files")


class SnapshotWriter:
    """Writes one stream to ``f``: magic and header at once, then :meth:`record` calls, then :meth:`finish`."""

    def __init__(self, f: BinaryIO, magic: bytes, version: int, meta: SnapshotMeta) -> None:
        self._f = f
        self._crc = 0
        self._packer = msgpack.Packer(use_bin_type=True)
        self._counts = [0, 0]
        self._write(magic)
        self._write(self._packer.pack({"version": version, "meta": snapshot_meta_to_wire(meta)}))

    def _write(self, b: bytes) -> None:
        self._crc = zlib.crc32(b, self._crc)
        self._f.write(b)

    def record(self, kind: int, *fields: Any) -> None:
        self._write(self._packer.pack([kind, *fields]))
        if kind in (0, 1):
            self._counts[kind] += 1

    def finish(self, end: int) -> None:
        """Write the end record ``[end, n0, n1]`` and the CRC."""
        self._write(self._packer.pack([end, *self._counts]))
        self._f.write(struct.pack(">I", self._crc))


def read_records(f: BinaryIO, magic: bytes, version: int, meta: SnapshotMeta, end: int,
                 what: str) -> Iterator[list]:
    """Yield the records of the stream in ``f`` between its header and its end record ``end``.

    Checks as it goes: the magic (else "not a pyraft ``what``"), the header
    (``version``, ``meta.last_log_id``), that records are lists, the end
    record's counts, nothing after it; after the last record, the CRC.
    Raises StorageError (CodecError for a header meta that does not decode).
    The caller checks each record's fields and trusts none of them before
    the iteration has ended.
    """
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size < len(magic) + 4 or f.read(len(magic)) != magic:
        raise StorageError(f"not a pyraft {what}")
    crc = zlib.crc32(magic)
    remaining = size - 4 - len(magic)
    unpacker = msgpack.Unpacker(raw=False, use_list=True, strict_map_key=False, max_buffer_size=0)
    header_seen = ended = False
    counts = [0, 0]
    while remaining > 0:
        chunk = f.read(min(CHUNK, remaining))
        if not chunk:
            raise StorageError("snapshot file is truncated")
        remaining -= len(chunk)
        crc = zlib.crc32(chunk, crc)
        try:
            unpacker.feed(chunk)
            records = list(unpacker)
        except (msgpack.UnpackException, ValueError) as e:
            raise StorageError(f"snapshot stream is not msgpack: {e}") from None
        for rec in records:
            if ended:
                raise StorageError("data after the end record")
            if not header_seen:
                if type(rec) is not dict or rec.get("version") != version:
                    raise StorageError(f"unknown snapshot header {str(rec)[:80]!r}")
                hmeta = snapshot_meta_from_wire(rec.get("meta"))
                if hmeta is None or hmeta.last_log_id != meta.last_log_id:
                    raise StorageError(f"file holds a snapshot up to {hmeta and hmeta.last_log_id}, "
                                       f"expected {meta.last_log_id}")
                header_seen = True
            elif type(rec) is not list or not rec:
                raise StorageError("malformed snapshot record")
            elif rec[0] == end:
                if len(rec) != 3:
                    raise StorageError("malformed snapshot record")
                if rec[1] != counts[0] or rec[2] != counts[1]:
                    raise StorageError("snapshot record counts do not match")
                ended = True
            else:
                if rec[0] in (0, 1):
                    counts[rec[0]] += 1
                yield rec
    if not ended:
        raise StorageError("snapshot file is truncated (no end record)")
    if struct.unpack(">I", f.read(4))[0] != crc & 0xFFFFFFFF:
        raise StorageError("snapshot file checksum mismatch")


def read_header(f: BinaryIO, magic: bytes, version: int, what: str) -> SnapshotMeta:
    """The meta in the header of the stream in ``f`` (only the header is read; nothing else is checked).

    Raises StorageError (CodecError for a meta that does not decode).
    """
    f.seek(0)
    if f.read(len(magic)) != magic:
        raise StorageError(f"not a pyraft {what}")
    unpacker = msgpack.Unpacker(f, raw=False, use_list=True, strict_map_key=False, max_buffer_size=CHUNK)
    try:
        rec = next(unpacker)
    except (StopIteration, msgpack.UnpackException, ValueError) as e:
        raise StorageError(f"{what}: no readable header: {e}") from None
    if type(rec) is not dict or rec.get("version") != version:
        raise StorageError(f"unknown snapshot header {str(rec)[:80]!r}")
    meta = snapshot_meta_from_wire(rec.get("meta"))
    if meta is None:
        raise StorageError(f"{what}: the header holds no snapshot meta")
    return meta


def _private(path: str, flags: int) -> int:
    """``open()``'s opener for snapshot files: created 0600, as they hold all the data."""
    return os.open(path, flags, 0o600)


@contextmanager
def durable(path: str) -> Iterator[BinaryIO]:
    """``path`` (created 0600) opened for writing; flushed and fsynced when the block ends without an error."""
    with open(path, "wb", buffering=CHUNK, opener=_private) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def get_pointer(txn: lmdb.Transaction, db: Any, key: bytes) -> tuple[SnapshotMeta | None, str] | None:
    """The pointer stored under ``key``: ``(meta, file name)``, None when absent; CodecError when malformed."""
    raw = txn.get(key, db=db)
    if raw is None:
        return None
    w = unpack(bytes(raw), f"meta {key.decode()}")
    if type(w) is not list or len(w) != 2 or type(w[1]) is not str:
        raise CodecError(f"meta {key.decode()}: expected [meta, file name]")
    return snapshot_meta_from_wire(w[0]), os.path.basename(w[1])


def set_pointer(txn: lmdb.Transaction, db: Any, key: bytes, meta: SnapshotMeta, path: str, *,
                unless_newer: bool = False) -> bool:
    """Point ``key`` at the file ``path`` holding ``meta``; with ``unless_newer``, not past a newer one (False)."""
    if unless_newer:
        cur = get_pointer(txn, db, key)
        if cur is not None and cur[0] is not None and log_index(cur[0].last_log_id) > log_index(meta.last_log_id):
            return False
    txn.put(key, pack([snapshot_meta_to_wire(meta), os.path.basename(path)]), db=db)
    return True


class SnapshotDir:
    """A state machine's snapshot directory (created if absent); ``suffix`` ends its snapshot file names."""

    def __init__(self, path: str, suffix: str) -> None:
        make_dirs(path, "snapshot directory")  # 0700, its name durable before a snapshot goes in
        self.path = path
        self.suffix = suffix
        self._receiving: list[str] = []  # .tmp files handed out by begin_receiving (SM thread only)

    def tmp_path(self, kind: str) -> str:
        return os.path.join(self.path, f"{kind}-{uuid.uuid4().hex}{_TMP_SUFFIX}")

    def new_file_path(self, meta: SnapshotMeta) -> str:
        lid = meta.last_log_id
        tag = "empty" if lid is None else f"{lid.term}-{lid.index}"
        return os.path.join(self.path, f"snap-{tag}-{uuid.uuid4().hex[:12]}{self.suffix}")

    def existing(self, pointer: tuple[SnapshotMeta | None, str] | None) -> tuple[SnapshotMeta, str] | None:
        """``(meta, path)`` of a pointer from :func:`get_pointer`, None unless its file exists."""
        if pointer is None or pointer[0] is None:
            return None
        path = os.path.join(self.path, pointer[1])
        return (pointer[0], path) if os.path.isfile(path) else None

    @contextmanager
    def building(self) -> Iterator[str]:
        """A new ``build-*.tmp`` path, deleted on the way out if it is still there."""
        tmp = self.tmp_path("build")
        try:
            yield tmp
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def publish(self, tmp: str, meta: SnapshotMeta) -> str:
        """Rename the fsynced file ``tmp`` to a new snapshot file name for ``meta``; fsync the directory; return it."""
        final = self.new_file_path(meta)
        os.rename(tmp, final)
        self.sync()
        return final

    def sync(self) -> None:
        """fsync the directory (its entries: renames, new files)."""
        sync_dir(self.path, "snapshot directory")

    def begin_receiving(self) -> BinaryIO:
        """A new empty ``recv-*.tmp`` file; the one handed out before is dropped."""
        for old in self._receiving:
            unlink_quietly(old)
        path = self.tmp_path("recv")
        self._receiving = [path]
        return open(path, "w+b", opener=_private)

    def forget_received(self, name: Any) -> bool:
        """True when ``name`` is the file :meth:`begin_receiving` handed out; the caller disposes of it."""
        if name in self._receiving:
            self._receiving.remove(name)
            return True
        return False

    def newest_first(self) -> list[str]:
        """The paths of the snapshot files here, the highest log index first (``snap-empty-`` last)."""
        return newest_first(self.path, self.suffix)

    def cleanup(self, current: str | None, at_open: bool = False) -> None:
        """Delete every snapshot file but ``current`` (and, at open, every leftover .tmp)."""
        for name in os.listdir(self.path):
            path = os.path.join(self.path, name)
            if path == current:
                continue
            if name.endswith(self.suffix) or (at_open and name.endswith(_TMP_SUFFIX)):
                unlink_quietly(path)


def newest_first(path: str, suffix: str) -> list[str]:
    """The snapshot files (``snap-*suffix``) in the directory ``path``, the highest log index first.

    What a rebuild after a reboot tries, in this order; a module function so that
    offline readers list a directory without making it.
    """
    found = []
    for name in os.listdir(path):
        if name.startswith("snap-") and name.endswith(suffix):
            parts = name.split("-")
            index = int(parts[2]) if len(parts) > 3 and parts[1] != "empty" and parts[2].isdigit() else 0
            found.append((index, name))
    return [os.path.join(path, name) for _i, name in sorted(found, reverse=True)]


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def boot_id() -> str | None:
    """This boot of the machine (Linux), None where unknown (every unclean stop then counts as a reboot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


class UnsyncedMark:
    """The file ``root/name`` that says an LMDB environment may hold commits not yet fsynced (module doc).

    Use: ``LmdbEnv(..., sync=False, prepare=mark.discard_if_rebooted)``,
    which writes the mark before LMDB commits anything (even a new
    environment's first transaction); then, if :attr:`discarded`, rebuild from
    the newest snapshot, fsync, and :meth:`set` (until then the old mark asks
    for the rebuild again); :meth:`clear` after a final fsync (a clean close).
    ``boot`` is this boot's id (tests pass another).
    """

    def __init__(self, root: str, name: str, what: str, boot: str | None = None) -> None:
        self.path = os.path.join(root, name)
        self.what = what
        self.boot = boot if boot is not None else boot_id()
        #: set by discard_if_rebooted: the environment was removed and must be rebuilt
        self.discarded = False

    def discard_if_rebooted(self, env_path: str) -> None:
        """Remove ``env_path`` when the mark names another boot (or none is known); without a mark, write it."""
        try:
            with open(self.path, encoding="ascii", errors="replace") as f:
                written = f.read().strip()
        except FileNotFoundError:
            self.set()  # clean (closed and synced) or new: nothing to discard
            return
        if self.boot is not None and written == self.boot:
            return  # a process crash: the page cache kept every committed write
        log.warning("%s in %s: it was written without fsync before the machine restarted (boot %s, now %s); "
                    "discarding %s and rebuilding it from the newest snapshot (the log replays the rest)",
                    self.what, os.path.dirname(env_path), written or "?", self.boot or "unknown",
                    os.path.basename(env_path))
        if os.path.isdir(env_path):
            shutil.rmtree(env_path)
        self.discarded = True

    def set(self) -> None:
        """Write the mark (fsynced, and its directory): before anything is committed without fsync."""
        tmp = self.path + _TMP_SUFFIX
        with durable(tmp) as f:
            f.write(f"{self.boot or ''}\n".encode("ascii"))
        os.replace(tmp, self.path)
        sync_dir(os.path.dirname(self.path), self.what)

    def clear(self) -> None:
        """Remove the mark: call only once everything committed has been fsynced."""
        unlink_quietly(self.path)
        sync_dir(os.path.dirname(self.path), self.what)
