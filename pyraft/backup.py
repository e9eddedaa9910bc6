"""Backup files: one node's snapshot plus what a new cluster needs to start from it.

``pyraft-admin backup FILE`` writes one (the node streams its snapshot in
chunks, see :mod:`pyraft.admin_ops`); ``pyraft-kv restore FILE`` reads it
(:func:`pyraft.recovery.restore_snapshot`).  Layout::

    b"PYRAFTBK"                      magic, 8 bytes
    u32 big-endian N                 length of the header
    header                           msgpack map, N bytes (below)
    snapshot                         the state machine's snapshot file, verbatim
                                     (header["snapshot_size"] bytes; a KV one is
                                     b"PYRAFTKV..." with its own CRC-32)
    SHA-256                          32 bytes: the digest of everything before it

Header fields: ``version`` (:data:`BACKUP_VERSION`), ``cluster_name``,
``node_id`` (the node it was taken from), ``created`` (Unix time),
``pyraft_version``, ``snapshot_meta`` (the snapshot's meta in the codec's
wire form: its last log id and the membership then), ``snapshot_format``
(the first 8 bytes of the snapshot, e.g. ``"PYRAFTKV"``: which state machine
can load it), ``snapshot_size`` and ``fence_index``: every write
acknowledged before the backup started sits at or below that log index, and
the snapshot covers it.

The writer streams to ``FILE.<random>.tmp`` beside FILE, fsyncs it and
renames it over FILE, so FILE is either absent, the old file, or a complete
backup.  The reader checks the digest over the whole file before trusting
any of it, in bounded memory.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

import msgpack

from .codec import snapshot_meta_from_wire, snapshot_meta_to_wire
from .config import Config
from .errors import CodecError, RaftError
from .snapshot_files import CHUNK
from .types import SnapshotMeta

__all__ = ["BackupHeader", "BackupWriter", "BackupError", "read_backup_header", "copy_snapshot",
           "BACKUP_MAGIC", "BACKUP_VERSION"]

BACKUP_MAGIC = b"PYRAFTBK"
BACKUP_VERSION = 1
#: The largest term and log index a backup may name: far beyond what a cluster reaches, and far
#: enough below the wire format's 2**63 - 1 that the restored cluster can elect and append.
MAX_RESTORED = 2**62
_DIGEST = 32
#: A header is a few hundred bytes; anything near this is not one.
_MAX_HEADER = 1 << 20


class BackupError(RaftError):
    """A backup file that is damaged, truncated, of another format, or cannot be written."""


@dataclass(frozen=True, slots=True)
class BackupHeader:
    """What a backup file says about its snapshot (see the module docstring)."""

    cluster_name: str
    node_id: int
    created: float
    pyraft_version: str
    meta: SnapshotMeta
    snapshot_format: str
    snapshot_size: int
    fence_index: int

    def to_wire(self) -> dict:
        return {"version": BACKUP_VERSION, "cluster_name": self.cluster_name, "node_id": self.node_id,
                "created": self.created, "pyraft_version": self.pyraft_version,
                "snapshot_meta": snapshot_meta_to_wire(self.meta), "snapshot_format": self.snapshot_format,
                "snapshot_size": self.snapshot_size, "fence_index": self.fence_index}

    @classmethod
    def from_wire(cls, w: Any) -> "BackupHeader":
        if type(w) is not dict:
            raise BackupError("the backup header is not a map")
        if w.get("version") != BACKUP_VERSION:
            raise BackupError(f"backup format version {w.get('version')!r}; this pyraft reads {BACKUP_VERSION}")
        try:
            meta = snapshot_meta_from_wire(w.get("snapshot_meta"))
        except (CodecError, TypeError, ValueError) as e:
            raise BackupError(f"the backup's snapshot meta does not decode: {e}") from None
        if meta is None:
            raise BackupError("the backup header has no snapshot meta")
        types: dict[str, type | tuple[type, ...]] = {
            "cluster_name": str, "node_id": int, "created": (int, float), "pyraft_version": str,
            "snapshot_format": str, "snapshot_size": int, "fence_index": int}
        for k, t in types.items():
            if not isinstance(w.get(k), t) or isinstance(w.get(k), bool):
                raise BackupError(f"backup header field {k!r} is missing or malformed")
        if w["snapshot_size"] < 0:
            raise BackupError("backup header: negative snapshot size")
        lid = meta.last_log_id
        if lid is not None and (lid.term > MAX_RESTORED or lid.index > MAX_RESTORED):
            raise BackupError(f"backup header: the snapshot's log id {lid} is beyond what a cluster reaches "
                              f"(terms and indexes up to 2**62): the file is damaged or forged")
        if not math.isfinite(w["created"]):
            raise BackupError("backup header: 'created' is not a finite time")
        try:
            Config(cluster_name=w["cluster_name"])
        except ValueError as e:
            raise BackupError(f"backup header: {e}") from None
        return cls(w["cluster_name"], w["node_id"], float(w["created"]), w["pyraft_version"], meta,
                   w["snapshot_format"], w["snapshot_size"], w["fence_index"])

    def summary(self) -> dict:
        """The header as plain JSON-able values (for tools)."""
        m = self.meta
        ms = m.last_membership
        return {"cluster_name": self.cluster_name, "node_id": self.node_id, "created": self.created,
                "pyraft_version": self.pyraft_version, "snapshot_format": self.snapshot_format,
                "snapshot_size": self.snapshot_size, "fence_index": self.fence_index,
                "last_log_id": None if m.last_log_id is None else [m.last_log_id.term, m.last_log_id.index],
                "voters": None if ms is None else sorted(ms.membership.voter_ids),
                "learners": None if ms is None else sorted(ms.membership.learner_ids)}


class BackupWriter:
    """Writes one backup file atomically: header, then :meth:`write` chunks, then :meth:`commit`.

    Bounded memory: each chunk goes straight to the temporary file and into
    the digest.  :meth:`abort` (or leaving the ``with`` block on an
    exception) deletes the temporary file; FILE is untouched until commit.
    """

    def __init__(self, path: str | os.PathLike, header: BackupHeader) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.header = header
        self._tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        self._hash = hashlib.sha256()
        self._written = 0
        try:
            # 0600: a backup holds all the data, as the node's own files do
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._f: BinaryIO | None = os.fdopen(fd, "wb")
        except OSError as e:
            raise BackupError(f"cannot write {self._tmp}: {e.strerror or e}") from None
        head = msgpack.packb(header.to_wire(), use_bin_type=True)
        self._put(BACKUP_MAGIC + struct.pack(">I", len(head)) + head)

    def _put(self, b: bytes) -> None:
        assert self._f is not None
        try:
            self._f.write(b)
        except OSError as e:
            self.abort()
            raise BackupError(f"cannot write {self._tmp}: {e.strerror or e}") from None
        self._hash.update(b)

    def write(self, chunk: bytes) -> None:
        """Append the next piece of the snapshot."""
        if self._written + len(chunk) > self.header.snapshot_size:
            self.abort()
            raise BackupError(f"the node sent more than the {self.header.snapshot_size} bytes it announced")
        self._put(chunk)
        self._written += len(chunk)

    @property
    def written(self) -> int:
        return self._written

    def commit(self) -> None:
        """Write the digest, fsync, rename over the destination, fsync the directory."""
        if self._written != self.header.snapshot_size:
            self.abort()
            raise BackupError(f"got {self._written} of the {self.header.snapshot_size} snapshot bytes")
        f = self._f
        assert f is not None
        try:
            f.write(self._hash.digest())
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._f = None
            os.rename(self._tmp, self.path)
            fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self.abort()
            raise BackupError(f"cannot write {self.path}: {e.strerror or e}") from None

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "BackupWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None or self._f is not None:
            self.abort()


def read_backup_header(f: BinaryIO) -> tuple[BackupHeader, int]:
    """Check the whole file ``f`` (digest, magic, header, sizes); return its header and the snapshot's offset.

    BackupError when anything is wrong; nothing of the file is trusted
    before its digest matched.
    """
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size < len(BACKUP_MAGIC) + 4 + _DIGEST or f.read(len(BACKUP_MAGIC)) != BACKUP_MAGIC:
        raise BackupError("not a pyraft backup file")
    h = hashlib.sha256(BACKUP_MAGIC)
    remaining = size - len(BACKUP_MAGIC) - _DIGEST
    while remaining > 0:
        chunk = f.read(min(CHUNK, remaining))
        if not chunk:
            raise BackupError("the backup file is truncated")
        h.update(chunk)
        remaining -= len(chunk)
    if f.read(_DIGEST) != h.digest():
        raise BackupError("the backup file's SHA-256 does not match: it is damaged or truncated")
    f.seek(len(BACKUP_MAGIC))
    (n,) = struct.unpack(">I", f.read(4))
    if n > _MAX_HEADER or len(BACKUP_MAGIC) + 4 + n + _DIGEST > size:
        raise BackupError("the backup header's length is impossible")
    try:
        wire = msgpack.unpackb(f.read(n), raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise BackupError(f"the backup header does not decode: {e}") from None
    header = BackupHeader.from_wire(wire)
    offset = len(BACKUP_MAGIC) + 4 + n
    if offset + header.snapshot_size + _DIGEST != size:
        raise BackupError(f"the backup file is {size} bytes; its header announces a "
                          f"{header.snapshot_size}-byte snapshot")
    return header, offset


def copy_snapshot(f: BinaryIO, header: BackupHeader, offset: int) -> Iterator[bytes]:
    """The snapshot bytes of a backup checked by :func:`read_backup_header`, in chunks."""
    f.seek(offset)
    left = header.snapshot_size
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise BackupError("the backup file is truncated")
        left -= len(chunk)
        yield chunk
