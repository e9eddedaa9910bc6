"""The built-in replicated key-value service: state machine, commands and client.

``KVStateMachine`` (LMDB) applies the commands of :mod:`pyraft.kv.commands`;
``KVClient`` lives in :mod:`pyraft.kv.client`.
"""
from importlib.util import find_spec as _find_spec

from .commands import KVCommandError
from .statemachine import KVStateMachine

__all__ = ["KVStateMachine", "KVCommandError"]

# The client module is written separately; export it once it exists (an
# error inside it is raised, not hidden).
if _find_spec(__name__ + ".client") is not None:
    from .client import KVClient  # noqa: E402

    __all__.append("KVClient")
