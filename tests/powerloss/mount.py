"""Mounting the lazy filesystem (:mod:`.lazyfs`) from tests and fault runs, and cutting its power.

:class:`LazyMount` starts one ``lazyfs.py`` process (its stdin and stdout are the
command channel; it unmounts and exits when this process goes away) and waits
until the mount serves.  :func:`fuse_unavailable` says why FUSE cannot be
mounted here, or None.  Importing this module needs neither FUSE nor mfusepy.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any

LAZYFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lazyfs.py")


class MountError(RuntimeError):
    """The lazy filesystem could not be mounted, or stopped answering."""


class LazyMount:
    """``mountpoint`` serving ``backing`` through a lazy filesystem under ``rule`` (``"strict"`` or ``"ext4"``).

    ``cut()`` is the power loss (call it when no process that should lose its
    writes is still running: kill it first); ``stats()`` the counters;
    ``close()`` unmounts.  The lazy filesystem's stderr goes to ``log_path``.
    """

    def __init__(self, backing: str, mountpoint: str, rule: str = "strict", *, log_path: str | None = None,
                 timeout: float = 20.0) -> None:
        self.backing, self.mountpoint, self.rule = backing, mountpoint, rule
        self.log_path = log_path or f"{mountpoint.rstrip('/')}.lazyfs.log"
        os.makedirs(backing, exist_ok=True)
        os.makedirs(mountpoint, exist_ok=True)
        self._lock = threading.Lock()  # one command at a time on the channel
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen([sys.executable, LAZYFS, backing, mountpoint, "--rule", rule],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"lazyfs-reader-{os.path.basename(mountpoint)}",
                         daemon=True).start()
        try:
            reply = self._next(timeout)
            if not reply.get("ready") or not os.path.ismount(mountpoint):
                raise MountError(f"lazy filesystem at {mountpoint} did not come up: {reply}")
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise MountError(f"lazy filesystem at {self.mountpoint} gave no answer within {timeout} s") from None
        if line is None:
            raise MountError(f"lazy filesystem at {self.mountpoint} exited (code {self._proc.poll()}): "
                             f"{self.log_tail()}")
        return json.loads(line)

    def command(self, cmd: str, timeout: float = 60.0) -> dict:
        with self._lock:
            if self._proc.poll() is not None:
                raise MountError(f"lazy filesystem at {self.mountpoint} is not running: {self.log_tail()}")
            self._proc.stdin.write(cmd + "\n")
            self._proc.stdin.flush()
            reply = self._next(timeout)
        if not reply.get("ok"):
            raise MountError(f"lazy filesystem at {self.mountpoint}: {cmd}: {reply.get('error')}")
        return reply

    def cut(self, writeback: float = 0.0, seed: int = 0) -> dict:
        """The power loss: forget every unsynced write and every name change that is not durable.

        With ``writeback`` > 0 each unsynced page had reached the disk before the
        power went with that probability (drawn from ``seed``), as a kernel that
        writes dirty pages back in its own order leaves a disk.
        """
        if not 0.0 <= writeback <= 1.0:
            raise ValueError(f"writeback must be a probability, got {writeback!r}")
        return self.command(f"cut {writeback!r} {int(seed)}" if writeback else "cut")

    def stats(self) -> dict:
        return self.command("stats")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def close(self, timeout: float = 15.0) -> None:
        """Unmount and stop the process.  Idempotent."""
        p = self._proc
        if p.poll() is None:
            try:
                p.stdin.write("exit\n")
                p.stdin.flush()
                p.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if os.path.ismount(self.mountpoint):
            _unmount(self.mountpoint)
        self._log.close()

    def __enter__(self) -> "LazyMount":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _unmount(mountpoint: str) -> None:
    for argv in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        if shutil.which(argv[0]) and subprocess.run(argv, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL).returncode == 0:
            return


def require_fuse() -> None:
    """Skip the calling test, saying why, where FUSE cannot be mounted; fail it instead when ``CI=true``."""
    import pytest
    reason = fuse_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"power-loss tests need FUSE and CI=true: {reason}", pytrace=False)
    pytest.skip(f"power-loss tests need FUSE: {reason}")


_probe: list[str | None] = []


def fuse_unavailable() -> str | None:
    """Why a lazy filesystem cannot be mounted on this machine, or None when it can (probed once)."""
    if not _probe:
        _probe.append(_probe_once())
    return _probe[0]


def _probe_once() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE in this kernel or container)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e.strerror}"
    check = subprocess.run([sys.executable, "-c", "import mfusepy"], capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return f"mfusepy cannot load libfuse3 (install fuse3, and the test extra): {last}"
    d = tempfile.mkdtemp(prefix="pyraft-fuse-probe-")
    try:
        with LazyMount(os.path.join(d, "disk"), os.path.join(d, "mnt"), log_path=os.path.join(d, "log"),
                       timeout=15):
            pass
    except (MountError, OSError) as e:
        return f"a FUSE filesystem cannot be mounted here: {e}"
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return None
