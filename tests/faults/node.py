"""``pyraft-kv serve`` on a machine that can lose power: how the fault runner starts nodes on lazy filesystems.

Test-only::

    python tests/faults/node.py --boot-id ID [--mutant NAME] serve --id 1 ...

- ``--boot-id``: the machine's boot id as the node sees it (what
  ``pyraft.snapshot_files.boot_id`` returns instead of the kernel's).
  :class:`~.nemesis.FaultCluster` gives a node a new one after each of its power
  cuts, as a machine gets after a reboot, and keeps it across a kill -9.  The
  KV and object state machines commit without fsync: after a power cut they
  must discard their environment and rebuild it from their newest snapshot
  file (the log replays the rest), after a kill -9 keep it.
- ``--mutant``: a durability bug patched in (:mod:`.mutants`), after the boot id.

Run as a script, so that the node imports the installed pyraft and nothing of
the test suite but :mod:`.mutants`.
"""
from __future__ import annotations

import argparse
import os
import sys

NODE_PY = os.path.abspath(__file__)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="node.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--boot-id", required=True)
    p.add_argument("--mutant", default=None)
    p.add_argument("serve", nargs=argparse.REMAINDER, help="pyraft-kv's arguments: serve ...")
    a = p.parse_args(argv)
    if not a.serve or a.serve[0] != "serve":
        p.error("the node's arguments begin with serve")
    from pyraft import snapshot_files  # where every state machine that skips fsyncs asks for the boot id
    snapshot_files.boot_id = lambda: a.boot_id
    if a.mutant is not None:
        sys.path.insert(0, os.path.dirname(NODE_PY))
        import mutants  # tests/faults/mutants.py, as a top-level module of this process
        mutants.apply(a.mutant)
    from pyraft.tools.kv import main as kv_main
    return kv_main(a.serve)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
