"""Reading the nodes' stores from outside the nodes, in a process of its own.

A store that a durability bug let a power cut tear (a mutant's log written
without fsync, a state machine trusted after a reboot) can make LMDB abort
the process that reads it: an assertion in ``mdb.c`` ends it with SIGABRT.
So the fault runner never opens a node's store itself: it asks
:class:`OfflineReader`, one spawned worker process that runs the read
functions below.  When the worker dies, the read raises :class:`ReaderDied`
with the tail of what the worker printed (the run reports it) and the next
read starts a new worker.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO, Callable

from pyraft.kv import KVStateMachine
from pyraft.kv.statemachine import KVReader
from pyraft.stores.lmdb import LmdbLogStore

__all__ = ["OfflineReader", "ReaderDied", "log_and_commit", "committed_entries", "state", "check_current_snapshot"]


class ReaderDied(RuntimeError):
    """The process reading a node's store died (or hung): the store is damaged beyond what LMDB survives."""


class OfflineReader:
    """Runs read functions of node stores in a worker process; its stderr goes to ``stderr_path``.

    The worker is a fresh interpreter (no fork of a process full of threads)
    that imports this package; calls and results travel pickled over its
    stdin and stdout.
    """

    def __init__(self, stderr_path: str) -> None:
        self.stderr_path = stderr_path
        self._lock = threading.Lock()  # one read at a time; guards _proc
        self._proc: subprocess.Popen | None = None

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
        """``fn(*args)`` in the worker: its result, or the exception it raised; ReaderDied if the worker died."""
        with self._lock:
            if self._proc is None:
                with open(self.stderr_path, "ab") as err:
                    self._proc = subprocess.Popen(
                        [sys.executable, "-c", f"import sys; sys.path.insert(0, {_TESTS!r}); "
                                               f"from faults.offline import _serve; _serve()"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            proc = self._proc
            timer = threading.Timer(timeout, proc.kill)  # a read that hangs ends as one that crashed
            timer.start()
            try:
                _send(proc.stdin, (fn, args))
                ok, value = _receive(proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                self._end()
                raise ReaderDied(f"reading with {fn.__name__}: the reader died (exit code {proc.returncode}"
                                 f"{'; killed after ' + format(timeout, 'g') + ' s' if not timer.is_alive() else ''}"
                                 f"): {self._stderr_tail()}") from None
            finally:
                timer.cancel()
        if ok:
            return value
        raise value

    def _end(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _stderr_tail(self, n: int = 600) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace").strip() or "(it printed nothing)"
        except OSError:
            return "(no stderr)"

    def close(self) -> None:
        """Stop the worker (it ends when its stdin closes).  Idempotent."""
        with self._lock:
            self._end()


_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LEN = struct.Struct(">Q")


def _send(f: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj)
    f.write(_LEN.pack(len(data)) + data)
    f.flush()


def _receive(f: BinaryIO) -> Any:
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("the other end is gone")
    n = _LEN.unpack(head)[0]
    data = f.read(n)
    if len(data) < n:
        raise EOFError("the other end is gone")
    return pickle.loads(data)


def _serve() -> None:
    """The worker: run each call read from stdin, write its outcome to stdout, until stdin ends."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the reply stream
    while True:
        try:
            fn, args = _receive(inp)
        except EOFError:
            return
        try:
            reply = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - handed to the caller
            try:
                pickle.dumps(e)
                reply = (False, e)
            except Exception:  # noqa: BLE001
                reply = (False, RuntimeError(f"{type(e).__name__}: {e}"))
        _send(out, reply)


# ---------------------------------------------------------------------------
# The reads (run in the worker)

def log_and_commit(data_dir: str) -> tuple[dict[int, tuple], int, int]:
    """A node's whole log (index -> (term, kind, payload)), its commit index (max of stored and applied), purge point."""
    with LmdbLogStore.open_readonly(data_dir) as r, r.view() as v:
        meta = v.meta
        entries = {e.index: (e.term, e.kind, e.payload) for e in v.iter_entries()}
    with KVStateMachine.open_readonly(data_dir) as kvr:
        applied = kvr.state()[0]
    committed = max(meta.committed.index if meta.committed else 0, applied.index if applied else 0)
    return entries, committed, meta.purged.index if meta.purged else 0


def committed_entries(data_dir: str, start: int) -> tuple[int, int, list[tuple]]:
    """``(upto, first, entries)``: a node's committed entries from ``start`` on (each ``(index, term, kind, payload)``).

    ``upto`` is the commit index the node stored (or applied), trusted only
    where its log holds an entry of that log id's term (as the engine does at
    start-up); ``first`` is its log's first index.
    """
    with KVStateMachine.open_readonly(data_dir) as kvr:
        applied = kvr.state()[0]
    with LmdbLogStore.open_readonly(data_dir) as r, r.view() as v:
        meta = v.meta
        first = v.first_index() or 0
        upto = 0
        for lid in (x for x in (meta.committed, applied) if x is not None):
            got = next(v.iter_entries(lid.index), None)
            if got is not None and got.index == lid.index and got.term == lid.term:
                upto = max(upto, lid.index)
        out = []
        if upto >= start:
            for e in v.iter_entries(max(start, first)):
                if e.index > upto:
                    break
                out.append((e.index, e.term, e.kind, e.payload))
    return upto, first, out


def state(data_dir: str) -> tuple[int, dict]:
    """A node's KV state machine: its applied index and its items."""
    with KVStateMachine.open_readonly(data_dir) as r:
        lid = r.state()[0]
        return (lid.index if lid else 0), dict(r.items())


def check_current_snapshot(data_dir: str) -> None:
    """The current snapshot file of a node's KV state machine reads back whole (or there is none)."""
    with KVStateMachine.open_readonly(data_dir) as r:
        st = r.status()
    if st.snapshot is not None:
        KVReader.check_snapshot_file(st.snapshot_file, st.snapshot)
