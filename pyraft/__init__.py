"""pyraft: Raft consensus for threaded Python programs."""
import os as _os

# setup.py installs the top-level transports/, stores/ and tools/ of a checkout as
# pyraft.transports, pyraft.stores and pyraft.tools.  When this package is imported from
# a checkout instead (Python run from the repository root finds the source pyraft/ before
# an installed copy), its siblings are those subpackages: look for submodules there too.
# An installed pyraft sits in site-packages, which has no setup.py: nothing changes then.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and \
        _os.path.isfile(_os.path.join(_root, "transports", "__init__.py")):
    __path__.append(_root)
del _root
from ._version import __version__
from .config import Config
from .metrics import ClientWriteResponse, RaftMetrics
from .gctune import tune_gc
from .raft import Raft
from .types import LogId, Membership, Node, ServerState, Vote

__all__ = ["Raft", "Config", "Node", "ServerState", "LogId", "RaftMetrics", "ClientWriteResponse",
           "Membership", "Vote", "tune_gc"]
