"""The built-in replicated key-value service: state machine, commands and client.

``KVStateMachine`` (LMDB) applies the commands of :mod:`pyraft.kv.commands`;
``KVClient`` (:mod:`pyraft.kv.client`) sends them with exactly-once sessions
and reads ranges, watches and leases (:mod:`pyraft.kv.server` serves them);
:mod:`pyraft.kv.recipes` builds locks, elections and service registration on top.
"""
from .client import KVClient
from ..errors import LeaseNotFound, ResultNotKept
from .encoding import KVCommandError
from .reads import KeyValue, RangeResult, TxnResult, WatchEvent
from .statemachine import KVReader, KVStateMachine, KVStatus

__all__ = ["KVStateMachine", "KVReader", "KVStatus", "KVCommandError", "LeaseNotFound", "ResultNotKept", "KVClient",
           "KeyValue", "RangeResult", "WatchEvent", "TxnResult"]
