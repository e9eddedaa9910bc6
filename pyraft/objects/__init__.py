"""Replicated Python objects: PySyncObj's programming model on pyraft.

::

    from pyraft.objects import ObjectStateMachine, ReplCounter

    counter = ReplCounter()
    sm = ObjectStateMachine(counter, path=data_dir)      # this node's copy of the objects
    raft = Raft(node_id, config, transport, log_store, sm)
    sm.attach(raft)                                       # calls now go through this node
    counter.inc(timeout=5)                                # replicated: proposed via the leader
    counter.get()                                         # local read

See ``docs/objects.md``.
"""
from .base import (BoundReplicatedMethod, NotAttached, ReplicatedMethod, ReplicatedMethodError, ReplicatedObject,
                   VersionMismatch, replicated)
from .statemachine import ObjectStateMachine
from .structures import ReplCounter, ReplDict, ReplList, ReplLockManager, ReplQueue, ReplSet

__all__ = [
    "ReplicatedObject", "replicated", "ObjectStateMachine",
    "ReplCounter", "ReplDict", "ReplList", "ReplSet", "ReplQueue", "ReplLockManager",
    "VersionMismatch", "ReplicatedMethodError", "NotAttached", "ReplicatedMethod", "BoundReplicatedMethod",
]
