"""Durability mutants: ``pyraft-kv serve`` with one fsync bug patched in, to show the power-loss runs catch it.

Test-only; nothing here is in shipped code.  The patch is applied in memory in
the node process, before the node starts, by the node launcher
(:mod:`.node`)::

    python tests/faults/node.py --mutant NAME serve --id 1 ...   # pyraft-kv serve ... with mutant NAME

:class:`~.nemesis.FaultCluster` starts every node so with ``mutant=NAME``
(``cd tests && python -m faults.teeth NAME``).  What each mutant is, what
caught it and how often: docs/power-loss.md.
"""
from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

MUTANTS = {
    "log-nosync": "the log store opened with LmdbLogStore(sync=False): LMDB never fsyncs the log",
    "log-nometasync": "the log environment opened with metasync=False: a commit's meta page is synced "
                      "only by the next commit",
    "vote-nosync": "a write of the vote alone (at most the commit point riding along) is not synced: it becomes "
                   "durable with the next write of entries (LMDB's commit of it, its meta page, waits in the "
                   "page cache)",
    "snapshot-unsynced-rename": "a snapshot file is renamed into place (and made current) without being "
                                "fsynced first",
    "no-dir-fsync": "no directory is ever fsynced (new data dirs, environments, lock files, kv.boot, "
                    "snapshot renames)",
    "sm-trusts-reboot": "the state machines that commit without fsync (KV, objects) keep their environment "
                        "after a power loss (they take every start for the same boot of the machine)",
}


def _log_env_open(**force: Any) -> None:
    """Make every writable ``lmdb.open`` of a log environment use the options ``force``."""
    import lmdb

    from pyraft.stores.lmdb import LOG_ENV_NAME
    real_open = lmdb.open

    def open_(path: str, *a: Any, **kw: Any) -> Any:
        if os.path.basename(os.fspath(path).rstrip("/")) == LOG_ENV_NAME and not kw.get("readonly"):
            kw.update(force)
        return real_open(path, *a, **kw)

    lmdb.open = open_


def _log_nosync() -> None:
    from pyraft.stores.lmdb import LmdbLogStore
    real_init = LmdbLogStore.__init__

    def init(self: LmdbLogStore, path: Any, **kw: Any) -> None:
        real_init(self, path, **{**kw, "sync": False})

    LmdbLogStore.__init__ = init


def _vote_nosync() -> None:
    # What a store that syncs every write but a vote-only one does with LMDB, which syncs
    # whole environments: commits without syncing their meta page (the page that makes a
    # commit the current state; NOMETASYNC: the other pages are synced first, so nothing
    # tears), then syncs after every write but a vote-only one.  That vote stays in the page
    # cache until the next write syncs the environment: a power cut before then forgets it.
    from pyraft.engine.commands import SaveCommitted, SaveVote
    from pyraft.stores.lmdb import LmdbLogStore
    _log_env_open(metasync=False)
    real_init, real_write = LmdbLogStore.__init__, LmdbLogStore.write

    def init(self: LmdbLogStore, path: Any, **kw: Any) -> None:
        real_init(self, path, **kw)
        self._env.sync()  # the store's own records (format version, node id), durable as shipped

    def write(self: LmdbLogStore, ops: Any) -> None:
        real_write(self, ops)
        # The commit point often rides along with a vote (RaftCore defers it to the next write).
        if not any(isinstance(op, SaveVote) for op in ops) or \
                not all(isinstance(op, (SaveVote, SaveCommitted)) for op in ops):
            self._env.sync()

    LmdbLogStore.__init__ = init
    LmdbLogStore.write = write


def _snapshot_unsynced_rename() -> None:
    from pyraft import snapshot_files
    from pyraft.kv import statemachine
    from pyraft.stores.lmdb import SNAPSHOT_DIR_NAME

    real_durable = snapshot_files.durable

    @contextmanager
    def durable(path: str) -> Iterator[BinaryIO]:
        if os.path.basename(os.path.dirname(path)) != SNAPSHOT_DIR_NAME:  # kv.boot: as shipped
            with real_durable(path) as f:
                yield f
            return
        with open(path, "wb", buffering=snapshot_files.CHUNK) as f:
            yield f
            f.flush()  # no fsync: the rename that follows may be durable before the bytes are

    class _OsWithoutFsync(types.ModuleType):  # KVStateMachine._adopt syncs a received file with os.fsync
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        @staticmethod
        def fsync(fd: int) -> None:
            pass

    snapshot_files.durable = statemachine.durable = durable
    statemachine.os = _OsWithoutFsync("os")


def _no_dir_fsync() -> None:
    from pyraft import snapshot_files
    from pyraft.stores import lmdb as store
    for module in (store, snapshot_files):  # each one's own binding of the name
        module.sync_dir = lambda path, what: None


def _sm_trusts_reboot() -> None:
    from pyraft import snapshot_files
    snapshot_files.boot_id = lambda: "the-only-boot"


_APPLY = {
    "log-nosync": _log_nosync,
    "log-nometasync": lambda: _log_env_open(metasync=False),
    "vote-nosync": _vote_nosync,
    "snapshot-unsynced-rename": _snapshot_unsynced_rename,
    "no-dir-fsync": _no_dir_fsync,
    "sm-trusts-reboot": _sm_trusts_reboot,
}


def apply(name: str) -> None:
    """Patch mutant ``name`` into this process."""
    if name not in MUTANTS:
        raise ValueError(f"unknown mutant {name!r}; choose from {', '.join(MUTANTS)}")
    _APPLY[name]()

