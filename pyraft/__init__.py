"""pyraft: Raft consensus for threaded Python programs."""
from ._version import __version__
from .config import Config
from .metrics import ClientWriteResponse, RaftMetrics
from .raft import Raft
from .types import LogId, Membership, Node, ServerState, Vote

__all__ = ["Raft", "Config", "Node", "ServerState", "LogId", "RaftMetrics", "ClientWriteResponse",
           "Membership", "Vote"]
