"""The built-in replicated key-value service: state machine, commands and client.

``KVStateMachine`` (LMDB) applies the commands of :mod:`pyraft.kv.commands`;
``KVClient`` (:mod:`pyraft.kv.client`) sends them with exactly-once sessions.
"""
from .client import KVClient
from .commands import KVCommandError
from .statemachine import KVReader, KVStateMachine, KVStatus

__all__ = ["KVStateMachine", "KVReader", "KVStatus", "KVCommandError", "KVClient"]
