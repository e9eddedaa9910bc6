"""Jepsen-style fault-injection runs against a local cluster of ``pyraft-kv serve`` processes.

- :mod:`.runner`: the cluster, the workload (concurrent ``KVClient`` threads
  recording a history), the final checks and :func:`.runner.run`.
- :mod:`.nemesis`: the faults (SIGKILL and restart, SIGSTOP/SIGCONT pauses,
  network partitions, a slow disk, leadership transfers, membership changes,
  power losses) and the schedule that mixes them.
- :mod:`.durability`: what a node must still hold after it lost power.
- :mod:`.node`: how nodes start on lazy filesystems (a boot id that each
  power cut renews, and a mutant if asked for).
- :mod:`.mutants` and :mod:`.teeth`: durability bugs patched into the nodes,
  and the harness that counts what catches each (``docs/power-loss.md``).

``tests/test_faults.py`` runs short scenarios in the default suite;
``cd tests && python -m faults`` runs long ones (:mod:`.__main__`).  See
``docs/testing.md``.
"""
