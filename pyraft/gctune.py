"""tune_gc: make Python's cyclic garbage collector cost a busy Raft process less.

CPython runs its cyclic collector every 700 net allocations of container
objects (Python 3.11's default), and each run walks every young object that is
still alive.  A busy node keeps thousands of writes in flight (futures, log
entries, decoded messages), each alive for milliseconds: long enough to be
walked by several young collections, promoted, and walked again by the older
ones, which also walk every object the program made at start-up (modules,
functions, classes).  On ``pyraft-bench``'s 10-byte write load that was a
tenth to a seventh of each node's CPU (``garbage collector, share of each
node's CPU`` in its table).

:func:`tune_gc` does what long-running Python servers do about it:

- ``gc.collect()`` then ``gc.freeze()``: what the process has built so far
  (imports, the node's own objects) moves to the permanent generation, so no
  later collection walks it again;
- ``gc.set_threshold(young, ...)``: the young generation is collected every
  ``young`` net allocations instead of every 700; the older thresholds stay.

Reference counting still frees everything without a cycle at once; a cycle
waits for the next collection, so at most about ``young`` more container
objects can be waiting (a few MiB at the default).  It is process-wide, like
every ``gc`` setting: ``pyraft-kv serve`` calls it once after start-up, and a
program that embeds :class:`pyraft.Raft` may call it the same way (after
building its nodes) when it owns its process's memory policy.
"""
from __future__ import annotations

import gc

__all__ = ["tune_gc", "DEFAULT_YOUNG_THRESHOLD"]

#: Net container allocations between young collections after :func:`tune_gc`.
DEFAULT_YOUNG_THRESHOLD = 50_000

_MAX_YOUNG = 10_000_000


def tune_gc(young: int = DEFAULT_YOUNG_THRESHOLD, *, freeze: bool = True) -> tuple[int, int, int]:
    """Collect, freeze what exists (``freeze=True``), and collect the young generation every ``young`` allocations.

    Call it once the process has started (its imports done, its Raft nodes
    built).  It only ever makes the collector run less often: a young
    threshold the program set higher already is kept, and a collector the
    program switched off (``gc.disable()``, or a threshold of 0) stays off.
    Returns the thresholds it replaced (``gc.get_threshold()`` before),
    which ``gc.set_threshold(*old)`` restores; ``gc.unfreeze()`` undoes the
    freeze.  Raises TypeError or ValueError for a ``young`` that is not an
    integer in [700, 10,000,000] (700 is CPython 3.11's default: a smaller
    value would make the collector run more often, not less).
    """
    if type(young) is not int:
        raise TypeError(f"tune_gc: young must be an int, not {type(young).__name__}")
    if not 700 <= young <= _MAX_YOUNG:
        raise ValueError(f"tune_gc: young must be in [700, {_MAX_YOUNG:,}], got {young}")
    if type(freeze) is not bool:
        raise TypeError(f"tune_gc: freeze must be a bool, not {type(freeze).__name__}")
    old = gc.get_threshold()
    if freeze:
        gc.collect()
        gc.freeze()
    if old[0] != 0:
        gc.set_threshold(max(young, old[0]), old[1], old[2])
    return old
