"""A passthrough FUSE filesystem that forgets, on command, everything that was not synced.

Run as a process (``python lazyfs.py BACKING MOUNTPOINT --rule strict|ext4``): it
mounts MOUNTPOINT, serves BACKING through it, and takes commands on stdin, one
per line, answering each with one JSON line on stdout:

``cut [WRITEBACK SEED]``
           a power loss: undo every name change that is not durable under the
           rule and drop every unsynced write, except that each unsynced page
           reached the disk before the power went with probability WRITEBACK
           (default 0; drawn from SEED): the files are then as a machine that
           lost power would find them after a reboot
``stats``  counters, and how much is unsynced now
``exit``   (or end of stdin) unmount and exit

BACKING is the disk: it holds exactly what is durable for file contents.  Writes
go to an in-memory overlay (:class:`Unsynced`, per backing inode) that reads are
served from; ``fsync``/``fdatasync`` of a file (or a write through an ``O_SYNC``
/``O_DSYNC`` descriptor) copies its overlay to BACKING.  (BACKING itself is not
fsynced: the host does not lose power, and a sync through the mount then costs
about what an fdatasync costs on this machine's own disk.)  Name
changes (create, mkdir, unlink, rmdir, rename) are applied to BACKING at once and
journalled with how to undo them; a name change becomes durable

- ``ext4`` rule: at the next ``fsync``/``fdatasync``/directory fsync of anything on the
  mount (ext4 and xfs commit their metadata journal in order, so a sync commits the
  name changes made before it);
- ``strict`` rule: when every directory it changed has been fsynced (POSIX promises
  no more: a new name is durable only after an fsync of its directory).

Between two syncs of a file a real disk may hold any subset of the pages
written to it (the kernel writes dirty pages back in its own order): a cut
with WRITEBACK > 0 keeps such a random subset.  That is what makes a file
written without any fsync (LMDB with NOSYNC) unusable after a power loss: its
meta page may have reached the disk without the pages it points to.  What it
does not model is listed in docs/power-loss.md: torn pages, metadata other
than names and sizes (modes, times).

The mount runs with the kernel page cache on and no ``direct_io``, as a disk
filesystem, so programs use it as they use ext4: ``mmap`` reads (LMDB), ``pwrite``,
shared writable mappings (LMDB's lock file), flock and fcntl locks (handled by the
kernel, as the filesystem implements no lock operation).  Attribute and entry
timeouts are 0 and no file is opened with ``keep_cache``, so after a cut every
opening sees the forgotten state, never the kernel's cached pages of before.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

import mfusepy

PAGE = 4096
RULES = ("ext4", "strict")

log = logging.getLogger("lazyfs")


class Unsynced:
    """The unsynced content of one file: its size now, and the pages written since its last sync.

    Invariants: ``keep <= size``; the backing file's bytes at or past ``keep`` no
    longer exist (a truncate cut them); bytes of ``pages`` at or past ``size`` are
    zero.  The content a program sees is the backing file cut at ``keep``, zero
    filled up to ``size``, with ``pages`` laid over it.  ``fd`` is a descriptor
    of the backing file of its own (the programs' may all be closed by a cut),
    closed by :meth:`close`.
    """

    __slots__ = ("size", "keep", "pages", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self.size = self.keep = os.fstat(fd).st_size
        self.pages: dict[int, bytearray] = {}

    def close(self) -> None:
        os.close(self.fd)

    def _base(self, fd: int, start: int, end: int) -> bytearray:
        """The backing file's bytes ``start..end`` as the overlay sees them (cut at ``keep``, zero filled)."""
        stop = min(end, self.keep)
        out = bytearray(os.pread(fd, stop - start, start)) if stop > start else bytearray()
        out.extend(bytes(end - start - len(out)))
        return out

    def read(self, fd: int, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        out = self._base(fd, offset, end)
        first, last = offset // PAGE, (end - 1) // PAGE
        if last - first + 1 <= len(self.pages):
            hits = [p for p in range(first, last + 1) if p in self.pages]
        else:
            hits = [p for p in self.pages if first <= p <= last]
        for p in hits:
            lo, hi = max(offset, p * PAGE), min(end, (p + 1) * PAGE)
            out[lo - offset:hi - offset] = self.pages[p][lo - p * PAGE:hi - p * PAGE]
        return bytes(out)

    def write(self, fd: int, data: bytes, offset: int) -> None:
        end = offset + len(data)
        for p in range(offset // PAGE, (end - 1) // PAGE + 1):
            page = self.pages.get(p)
            if page is None:
                start = p * PAGE
                page = self._base(fd, start, start + PAGE) if start < self.size else bytearray(PAGE)
                if start + PAGE > self.size:  # keep the bytes past the size zero
                    page[max(0, self.size - start):] = bytes(PAGE - max(0, self.size - start))
                self.pages[p] = page
            lo, hi = max(offset, p * PAGE), min(end, (p + 1) * PAGE)
            page[lo - p * PAGE:hi - p * PAGE] = data[lo - offset:hi - offset]
        self.size = max(self.size, end)

    def truncate(self, length: int) -> None:
        if length < self.size:
            cut = -(-length // PAGE)
            for p in [p for p in self.pages if p >= cut]:
                del self.pages[p]
            page = self.pages.get(length // PAGE)
            if page is not None:
                page[length % PAGE:] = bytes(PAGE - length % PAGE)
            self.keep = min(self.keep, length)
        self.size = length

    def flush(self) -> None:
        """Make this content the backing file's (the caller syncs it)."""
        if os.fstat(self.fd).st_size > self.keep:
            os.ftruncate(self.fd, self.keep)
        for p, page in sorted(self.pages.items()):
            os.pwrite(self.fd, page[:min(PAGE, self.size - p * PAGE)], p * PAGE)
        os.ftruncate(self.fd, self.size)

    def write_back(self, chance: float, rng: random.Random) -> int:
        """At a power cut: each page reaches the backing file with probability ``chance``; how many did."""
        n = 0
        for p, page in sorted(self.pages.items()):
            if chance > 0 and rng.random() < chance and p * PAGE < self.size:
                os.pwrite(self.fd, page[:min(PAGE, self.size - p * PAGE)], p * PAGE)
                n += 1
        return n

    def nbytes(self) -> int:
        return len(self.pages) * PAGE


@dataclass
class NameChange:
    """One name change not yet durable: the directories (backing inodes) whose fsync it awaits, and its undo."""

    kind: str                 # create | mkdir | unlink | rmdir | rename
    path: str                 # backing path (the old name for a rename)
    new: str | None = None    # rename: the new name
    ino: int = 0              # create: the inode made, so the undo removes nothing else
    grave: str | None = None  # unlink, rmdir, rename over a name: where the old file waits
    dirs: set[int] = field(default_factory=set)


@dataclass
class Handle:
    fd: int
    ino: int
    sync: bool  # opened O_SYNC/O_DSYNC: every write is synced before it returns


class LazyFS(mfusepy.Operations):
    """The filesystem (see the module docstring).  One lock guards all its state."""

    use_ns = True

    def __init__(self, backing: str, rule: str) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}")
        self.root = os.path.realpath(backing)
        self.rule = rule
        # Unlinked and replaced files wait here until their removal is durable (same filesystem as root).
        self.graveyard = self.root.rstrip("/") + ".graveyard"
        os.makedirs(self.graveyard, exist_ok=True)
        self._lock = threading.Lock()  # guards everything below
        self._unsynced: dict[int, Unsynced] = {}   # backing inode -> unsynced content
        self._journal: list[NameChange] = []      # name changes not durable yet, oldest first
        self._handles: dict[int, Handle] = {}     # fh -> backing descriptor
        self._graves = 0
        self.counts: Counter = Counter()
        self.ready = threading.Event()

    # -- helpers (lock held) -------------------------------------------------------

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _dir_ino(self, real: str) -> int:
        return os.lstat(os.path.dirname(real) or self.root).st_ino

    def _content(self, h: Handle) -> Unsynced:
        u = self._unsynced.get(h.ino)
        if u is None:
            u = self._unsynced[h.ino] = Unsynced(h.fd)
        return u

    def _sync_file(self, h: Handle) -> None:
        u = self._unsynced.pop(h.ino, None)
        if u is not None:
            u.flush()
            u.close()
            self.counts["bytes_synced"] += u.nbytes()
        if self.rule == "ext4":
            self._names_durable(lambda c: True)

    def _journal_add(self, change: NameChange) -> None:
        self._journal.append(change)
        self.counts["name_changes"] += 1

    def _names_durable(self, durable) -> None:
        """Drop from the journal (and bury for good) the changes ``durable(change)`` says are durable now."""
        keep = []
        for c in self._journal:
            if durable(c):
                if c.grave is not None:
                    _remove(c.grave)
            else:
                keep.append(c)
        self._journal = keep

    def _bury(self, real: str) -> str:
        self._graves += 1
        grave = os.path.join(self.graveyard, str(self._graves))
        os.rename(real, grave)
        return grave

    # -- the power cut ---------------------------------------------------------------

    def cut(self, writeback: float = 0.0, seed: int = 0) -> dict:
        """Forget the unsynced writes (but a ``writeback`` share of their pages) and the names not durable."""
        with self._lock:
            rng = random.Random(seed)
            dropped = sum(u.nbytes() for u in self._unsynced.values())
            files = len(self._unsynced)
            kept = 0
            for _ino, u in sorted(self._unsynced.items()):
                kept += u.write_back(writeback, rng)
                u.close()
            self._unsynced.clear()
            undone = len(self._journal)
            for c in reversed(self._journal):
                _undo(c)
            self._journal.clear()
            for name in os.listdir(self.graveyard):
                _remove(os.path.join(self.graveyard, name))
            self.counts["cuts"] += 1
            return {"dropped_bytes": dropped - kept * PAGE, "written_back_bytes": kept * PAGE,
                    "dropped_files": files, "undone_names": undone}

    def stats(self) -> dict:
        with self._lock:
            return {"rule": self.rule, **self.counts,
                    "unsynced_bytes": sum(u.nbytes() for u in self._unsynced.values()),
                    "unsynced_files": len(self._unsynced), "pending_names": len(self._journal)}

    # -- FUSE operations ---------------------------------------------------------------

    def init_with_config(self, conn_info, config) -> None:
        if config is not None:
            # Nothing about names or sizes may be cached by the kernel across a cut.
            config.entry_timeout = config.attr_timeout = config.negative_timeout = 0.0
            config.hard_remove = 1  # unlink an open file for real (no .fuse_hidden renames)
            config.kernel_cache = config.auto_cache = config.direct_io = 0
        self.ready.set()

    def getattr(self, path, fh=None):
        with self._lock:
            h = self._handles.get(fh) if fh is not None else None
            st = os.fstat(h.fd) if h is not None else os.lstat(self._real(path))
            attrs = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino",
                                                   "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
            for k in ("st_atime", "st_mtime", "st_ctime"):
                attrs[k] = attrs.pop(k + "_ns")
            u = self._unsynced.get(st.st_ino)
            if u is not None and stat.S_ISREG(st.st_mode):
                attrs["st_size"] = u.size
            return attrs

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._real(path))]

    def access(self, path, amode):
        if not os.access(self._real(path), amode):
            raise mfusepy.FuseOSError(errno.EACCES)

    def statfs(self, path):
        sv = os.statvfs(self._real(path))
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                             "f_files", "f_flag", "f_frsize", "f_namemax")}

    def chmod(self, path, mode):
        os.chmod(self._real(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._real(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._real(path), ns=times)

    def _open(self, real: str, flags: int, mode: int | None) -> int:
        fd = os.open(real, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if mode is not None else 0), mode or 0)
        st = os.fstat(fd)
        self._handles[fd] = Handle(fd, st.st_ino, bool(flags & (os.O_SYNC | os.O_DSYNC)))
        if flags & os.O_TRUNC:
            self._content(self._handles[fd]).truncate(0)
        return fd

    def open(self, path, flags):
        with self._lock:
            return self._open(self._real(path), flags, None)

    def create(self, path, mode, flags):
        with self._lock:
            real = self._real(path)
            existed = os.path.lexists(real)
            fd = self._open(real, flags, mode)
            if not existed:
                self._journal_add(NameChange("create", real, ino=self._handles[fd].ino, dirs={self._dir_ino(real)}))
            return fd

    def read(self, path, size, offset, fh):
        with self._lock:
            h = self._handles[fh]
            self.counts["reads"] += 1
            u = self._unsynced.get(h.ino)
            return os.pread(h.fd, size, offset) if u is None else u.read(h.fd, size, offset)

    def write(self, path, data, offset, fh):
        with self._lock:
            h = self._handles[fh]
            self._content(h).write(h.fd, bytes(data), offset)
            self.counts["writes"] += 1
            self.counts["bytes_written"] += len(data)
            if h.sync:
                self._sync_file(h)
            return len(data)

    def truncate(self, path, length, fh=None):
        with self._lock:
            if fh is not None and fh in self._handles:
                self._content(self._handles[fh]).truncate(length)
                return
            fd = self._open(self._real(path), 0, None)
            try:
                self._content(self._handles[fd]).truncate(length)
            finally:
                del self._handles[fd]
                os.close(fd)

    def fsync(self, path, datasync, fh):
        with self._lock:
            self.counts["fsyncs"] += 1
            self._sync_file(self._handles[fh])

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        with self._lock:
            h = self._handles.pop(fh)
            if os.fstat(h.fd).st_nlink == 0 and not any(o.ino == h.ino for o in self._handles.values()):
                u = self._unsynced.pop(h.ino, None)  # gone for good: nobody can see it any more
                if u is not None:
                    u.close()
            os.close(h.fd)

    def opendir(self, path):
        return 0

    def fsyncdir(self, path, datasync, fh):
        with self._lock:
            self.counts["dir_fsyncs"] += 1
            real = self._real(path)
            ino = os.lstat(real).st_ino
            if self.rule == "ext4":
                self._names_durable(lambda c: True)
            else:
                for c in self._journal:
                    c.dirs.discard(ino)
                self._names_durable(lambda c: not c.dirs)

    def mkdir(self, path, mode):
        with self._lock:
            real = self._real(path)
            os.mkdir(real, mode)
            self._journal_add(NameChange("mkdir", real, dirs={self._dir_ino(real)}))

    def unlink(self, path):
        with self._lock:
            real = self._real(path)
            d = self._dir_ino(real)
            self._journal_add(NameChange("unlink", real, grave=self._bury(real), dirs={d}))

    def rmdir(self, path):
        with self._lock:
            real = self._real(path)
            if os.listdir(real):
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            d = self._dir_ino(real)
            self._journal_add(NameChange("rmdir", real, grave=self._bury(real), dirs={d}))

    def rename(self, old, new, flags=0):
        if flags:
            raise mfusepy.FuseOSError(errno.EINVAL)  # RENAME_NOREPLACE/EXCHANGE: not modelled
        with self._lock:
            src, dst = self._real(old), self._real(new)
            if os.path.isdir(dst) and not os.path.islink(dst) and os.listdir(dst):
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            dirs = {self._dir_ino(src), self._dir_ino(dst)}
            grave = self._bury(dst) if os.path.lexists(dst) else None
            try:
                os.rename(src, dst)
            except OSError:
                if grave is not None:
                    os.rename(grave, dst)
                raise
            self._journal_add(NameChange("rename", src, new=dst, grave=grave, dirs=dirs))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _undo(c: NameChange) -> None:
    """Undo one name change (the later ones are undone already)."""
    if c.kind == "create":
        if os.path.lexists(c.path) and os.lstat(c.path).st_ino == c.ino:
            os.unlink(c.path)
    elif c.kind == "mkdir":
        _remove(c.path)  # with whatever durable names inside: the directory itself never was
    elif c.kind in ("unlink", "rmdir"):
        if os.path.isdir(os.path.dirname(c.path)):
            os.rename(c.grave, c.path)
    elif c.kind == "rename":
        if os.path.lexists(c.new):
            if os.path.isdir(os.path.dirname(c.path)):
                os.rename(c.new, c.path)
            else:
                _remove(c.new)
        if c.grave is not None:
            os.rename(c.grave, c.new)


# ---------------------------------------------------------------------------
# The process: mount, serve, take commands on stdin

def _commands(fs: LazyFS, mountpoint: str) -> None:
    fs.ready.wait()
    _reply({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        cmd, *args = line.split() or [""]
        if cmd == "cut" and len(args) in (0, 2):
            _reply({"ok": True, **fs.cut(*((float(args[0]), int(args[1])) if args else ()))})
        elif cmd == "stats":
            _reply({"ok": True, **fs.stats()})
        elif cmd == "exit":
            break
        elif cmd:
            _reply({"ok": False, "error": f"unknown command {cmd!r}"})
    unmount(mountpoint)


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily: processes that still hold files keep them until they close)."""
    for argv in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        try:
            if subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                return
        except FileNotFoundError:
            continue


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--rule", choices=RULES, default="strict")
    a = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s lazyfs %(levelname)s %(name)s: %(message)s")
    os.umask(0)  # the kernel already applied the caller's umask to every mode we get
    fs = LazyFS(a.backing, a.rule)
    threading.Thread(target=_commands, args=(fs, a.mountpoint), name="lazyfs-commands", daemon=True).start()
    mfusepy.FUSE(fs, a.mountpoint, foreground=True, nothreads=True, fsname="pyraft-lazyfs", subtype="lazyfs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
