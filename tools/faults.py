"""Fault injection for ``pyraft-kv serve`` nodes (test-only).

Two halves:

- :class:`FaultControl`, the node side of ``pyraft-kv serve --fault-control
  FILE``: a daemon thread (``pyraft-fault-control``) reads the small JSON file
  ``FILE`` every 50 ms and applies it::

      {"drop": [2, 3], "drop_out": [4], "loss": 0.1, "disk_delay": 0.05}

  ``drop``: node ids whose Raft traffic this node drops, in both directions
  (its requests to them and their replies, their requests to it and its
  replies), through :meth:`ZmqTransport.set_fault_filter
  <pyraft.transports.zmq.ZmqTransport.set_fault_filter>`.  ``drop_out``:
  node ids this node cannot reach (its requests to them, and their replies,
  are dropped) while they still reach it: a one-way partition.  ``loss``: the
  probability that any message through this node's transport is dropped,
  client requests and replies included (a flaky network).  Otherwise client
  requests (``KVClient``, ``pyraft-admin``: sender id 0) are never dropped.
  ``disk_delay``: seconds every log write sleeps before it commits
  (:attr:`LmdbLogStore.write_delay <pyraft.stores.lmdb.LmdbLogStore.write_delay>`),
  a slow disk.  A missing file, or ``{}``, means no faults.

  The control is local on purpose: only a process that can write ``FILE`` on
  the node's machine can use it, nothing arrives over the network, and it is
  off unless the node was started with the flag.  A file that is not owned by
  the node's user, or that other users may write, is ignored (with a
  warning).  It exists for fault-injection tests; never give it in production.

- :func:`write_fault_file`, the other side: what a fault-injection run (the test
  suite's ``tests/faults/``, see ``docs/testing.md``) calls to change a node's faults.
"""
from __future__ import annotations

import json
import logging
import os
import random
import stat
import sys
import threading
from typing import Any, Sequence

log = logging.getLogger("pyraft.faults")

#: How often the node looks at its fault-control file, in seconds.
POLL_INTERVAL = 0.05


class FaultControl:
    """Applies the fault-control file ``path`` to a node's transport and log store (see the module docstring).

    ``start()`` starts the daemon thread; ``stop()`` stops it and removes every
    fault.  ``poll_once()`` does one round (the thread calls it every
    :data:`POLL_INTERVAL` seconds); it is public for tests.
    """

    def __init__(self, path: str | os.PathLike, transport: Any, log_store: Any, node_id: int | None = None) -> None:
        self.path = os.fspath(path)
        self.transport = transport
        self.log_store = log_store
        self.node_id = node_id
        #: the faults now (each replaced whole; read by the transport threads)
        self.dropped: frozenset[int] = frozenset()
        self.dropped_out: frozenset[int] = frozenset()
        self.loss = 0.0
        self.disk_delay = 0.0
        self._stamp: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: str | None = None

    # -- the filter the transport calls (any of its threads)

    def _filter(self, direction: str, peer: int, _message: Any) -> bool:
        if peer in self.dropped:
            return True
        if peer in self.dropped_out and (direction == "send" or direction == "recv"):
            return True
        loss = self.loss
        return loss > 0 and random.random() < loss

    # -- reading the file

    def poll_once(self) -> bool:
        """Read the file if it changed and apply it; True when the faults changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            stamp = None
            wanted: dict | None = {}
        except OSError as e:
            self._warn(f"cannot stat {self.path}: {e}")
            return False
        else:
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            wanted = None
        if stamp == self._stamp and self._stamp is not None:
            return False
        if wanted is None:
            if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                self._warn(f"{self.path} is not owned by this user or is writable by others: ignored")
                return False
            try:
                with open(self.path, encoding="utf-8") as f:
                    wanted = json.load(f)
            except (OSError, ValueError) as e:  # half-written: the next poll reads it again
                self._warn(f"cannot read {self.path}: {e}")
                return False
        self._stamp = stamp
        try:
            faults = _parse(wanted)
        except ValueError as e:
            self._warn(f"{self.path}: {e}")
            return False
        return self.apply(*faults)

    def apply(self, drop: frozenset[int], disk_delay: float, drop_out: frozenset[int] = frozenset(),
              loss: float = 0.0) -> bool:
        """Install these faults now; True when they changed."""
        if (drop, drop_out, loss, disk_delay) == (self.dropped, self.dropped_out, self.loss, self.disk_delay):
            return False
        self.dropped, self.dropped_out, self.loss = drop, drop_out, loss
        self.disk_delay = disk_delay
        self.transport.set_fault_filter(self._filter if (drop or drop_out or loss) else None)
        if self.log_store is not None and hasattr(self.log_store, "write_delay"):
            self.log_store.write_delay = disk_delay
        log.warning("node %s: FAULT INJECTION: dropping traffic of nodes %s, requests to nodes %s, "
                    "%.0f%% of all messages; disk delay %.3f s", self.node_id, sorted(drop) or "none",
                    sorted(drop_out) or "none", loss * 100, disk_delay)
        self._warned = None
        return True

    def _warn(self, msg: str) -> None:
        if msg != self._warned:
            self._warned = msg
            log.warning("node %s: fault control: %s", self.node_id, msg)

    # -- the thread

    def start(self) -> "FaultControl":
        log.warning("node %s: fault injection is ON (test-only): watching %s", self.node_id, self.path)
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name="pyraft-fault-control", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - a test hook must never take the node down
                log.exception("node %s: fault control failed", self.node_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self.apply(frozenset(), 0.0)


def _ids(d: dict, name: str) -> frozenset[int]:
    v = d.get(name) or []
    if not isinstance(v, list) or not all(type(x) is int and x > 0 for x in v):
        raise ValueError(f"'{name}' must be a list of node ids (positive integers)")
    return frozenset(v)


def _number(d: dict, name: str, hi: float) -> float:
    v = d.get(name) or 0.0
    if type(v) not in (int, float) or not 0 <= v <= hi:
        raise ValueError(f"'{name}' must be a number between 0 and {hi}")
    return float(v)


def _parse(d: Any) -> tuple[frozenset[int], float, frozenset[int], float]:
    if not isinstance(d, dict):
        raise ValueError("expected a JSON object like {\"drop\": [2, 3], \"disk_delay\": 0.05}")
    return _ids(d, "drop"), _number(d, "disk_delay", 10), _ids(d, "drop_out"), _number(d, "loss", 1)


def write_fault_file(path: str | os.PathLike, drop: Sequence[int] = (), disk_delay: float = 0.0, *,
                     drop_out: Sequence[int] = (), loss: float = 0.0) -> None:
    """Write a fault-control file atomically (a temporary file renamed over it), mode 0600."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"drop": sorted(set(drop)), "drop_out": sorted(set(drop_out)), "loss": loss,
                   "disk_delay": disk_delay}, f)
    os.replace(tmp, path)


if __name__ == "__main__":
    # The long fault-injection runs that drive this hook are test code, not part of an
    # installed pyraft: say what this module is without pointing at files a wheel lacks.
    print("pyraft.tools.faults has no command line: it is the node side of the test-only hook "
          "`pyraft-kv serve --fault-control FILE`; the file's format is in its docstring "
          "(python -m pydoc pyraft.tools.faults). The fault-injection runs that write that file are "
          "part of pyraft's test suite, not of the installed package.",
          file=sys.stdout if sys.argv[1:2] in (["-h"], ["--help"]) else sys.stderr)
    sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
