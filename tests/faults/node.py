"""``pyraft-kv serve`` on a machine that can lose power: how the fault runner starts nodes on lazy filesystems.

Test-only::

    python tests/faults/node.py --boot-id ID [--mutant NAME] serve --id 1 ...

- ``--boot-id``: the machine's boot id as the node sees it (what
  ``pyraft.kv.statemachine._boot_id`` returns instead of the kernel's).
  :class:`~.nemesis.FaultCluster` gives a node a new one after each of its power
  cuts, as a machine gets after a reboot, and keeps it across a kill -9.  The
  KV state machine commits without fsync: after a power cut it must discard
  its environment and rebuild it from its newest snapshot file (the log
  replays the rest), after a kill -9 keep it.  A state machine that takes the
  boot id from another hook (an object state machine made to skip its fsyncs
  too) gets its hook added to :data:`BOOT_ID_HOOKS`.
- ``--mutant``: a durability bug patched in (:mod:`.mutants`), after the boot id.

Run as a script, so that the node imports the installed pyraft and nothing of
the test suite but :mod:`.mutants`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

NODE_PY = os.path.abspath(__file__)

#: Every function a state machine asks for the machine's boot id: (module, name).
BOOT_ID_HOOKS = (("pyraft.kv.statemachine", "_boot_id"),)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="node.py", description=__doc__.split("\n", 1)[0])
    p.add_argument("--boot-id", required=True)
    p.add_argument("--mutant", default=None)
    p.add_argument("serve", nargs=argparse.REMAINDER, help="pyraft-kv's arguments: serve ...")
    a = p.parse_args(argv)
    if not a.serve or a.serve[0] != "serve":
        p.error("the node's arguments begin with serve")
    for module, name in BOOT_ID_HOOKS:
        setattr(importlib.import_module(module), name, lambda boot=a.boot_id: boot)
    if a.mutant is not None:
        sys.path.insert(0, os.path.dirname(NODE_PY))
        import mutants  # tests/faults/mutants.py, as a top-level module of this process
        mutants.apply(a.mutant)
    from pyraft.tools.kv import main as kv_main
    return kv_main(a.serve)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
