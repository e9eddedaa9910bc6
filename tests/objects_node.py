"""One node of a replicated-objects cluster (a ``ReplDict`` named "d") as its own process.

For tests whose attack may kill a node outright (a segfault would take the
test process with it)::

    python tests/objects_node.py --id N --listen tcp://127.0.0.1:P --peers 1=tcp://...,2=... --data-dir DIR [--init]

The node serves ``objects.call`` and the built-in ``metrics`` on ``--listen``
(ZeroMQ, no CURVE: loopback only), keeps its log and its objects in LMDB
under ``--data-dir`` (a restart loads the objects back on the main thread),
and runs until SIGTERM, or until its parent process is gone.  It exits 1
when it goes Fatal.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pyraft import Config, Node, Raft, ServerState
from pyraft.objects import ObjectStateMachine, ReplDict
from pyraft.stores.lmdb import LmdbLogStore
from pyraft.tools.kv import StopSignals, parse_peers
from pyraft.transports.zmq import ZmqTransport

CLUSTER_NAME = "objects"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--peers", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--init", action="store_true")
    args = p.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s %(levelname)-7s node-{args.id} %(name)s: %(message)s")
    peers = parse_peers(args.peers)
    parent = os.getppid()
    stop = StopSignals()
    config = Config(cluster_name=CLUSTER_NAME, heartbeat_interval=0.05, election_timeout=(0.3, 0.6),
                    rpc_timeout=0.5)
    log_store = LmdbLogStore(args.data_dir, node_id=args.id, cluster_name=CLUSTER_NAME)
    sm = ObjectStateMachine(ReplDict(name="d"), path=args.data_dir)
    raft = Raft(args.id, config, ZmqTransport(args.id, args.listen, cluster_name=CLUSTER_NAME), log_store, sm)
    sm.attach(raft)
    if args.init:
        raft.initialize({i: Node(a) for i, a in peers.items()})
    code = 0
    try:
        while not stop.wait(0.1):
            if raft.metrics().state == ServerState.FATAL:
                code = 1
                break
            if os.getppid() != parent:
                break
    finally:
        raft.shutdown(timeout=20)
        sm.close()
        log_store.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
