"""``cd tests && python -m faults``: a long Jepsen-style fault-injection run against a local ``pyraft-kv`` cluster.

Starts a local cluster of ``pyraft-kv serve`` processes, drives concurrent
clients while nemeses kill, pause, partition, slow down and reconfigure nodes,
then heals everything and checks the history (linearizable per key), the
acknowledged writes, the logs and the state machines::

    cd tests && python -m faults --duration 180 --nodes 3 --seed 7
    cd tests && python -m faults --duration 60 --nemesis partition,kill --nodes 5
    cd tests && python -m faults --duration 600 --nemesis all,power --seed 3   # and power losses

The power nemeses (``power-one``, ``power-minority``, ``power-all``) keep each
node's data on a lazy FUSE filesystem that forgets unsynced writes
(``tests/powerloss/``, see ``docs/power-loss.md``).

Prints one summary line (operations ok / failed / indeterminate, faults
injected, verdict) and exits 0 when every check passed, 1 otherwise, 2 on a
usage error.  It is test code, run from a checkout with pyraft installed; see
``docs/testing.md``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import runner


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m faults",
                                description="Jepsen-style fault-injection run against a local pyraft-kv cluster.")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of faults under load (default 180)")
    p.add_argument("--nodes", type=int, default=3, choices=[3, 5], help="cluster size (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule and the workload")
    p.add_argument("--nemesis", default="all",
                   help="comma-separated: kill,pause,partition,transfer,membership,disk, all (default: those six), "
                        "power-one,power-minority,power-all, power (those three); e.g. all,power")
    p.add_argument("--lazyfs", choices=["strict", "ext4"], default=None,
                   help="keep each node's data on a lazy FUSE filesystem that forgets unsynced writes at a power "
                        "cut, with this rule for new names (default: strict when a power nemesis runs)")
    p.add_argument("--clients", type=int, default=6, help="client threads, one KVClient each (default 6)")
    p.add_argument("--keys", type=int, default=3, help="keys in use at a time (default 3)")
    p.add_argument("--vary-config", action="store_true",
                   help="draw the nodes' Config from the seed (PreVote/CheckQuorum off, tiny batches and "
                        "snapshot chunks, ...) instead of the default fault-run settings")
    p.add_argument("--dir", help="keep the nodes' data, logs and the history here")
    p.add_argument("--keep", action="store_true", help="keep the run's directory even when it passes")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        nemeses = runner.parse_nemeses(args.nemesis)
    except ValueError as e:
        print(f"pyraft-faults: {e}", file=sys.stderr)
        return 2
    if args.duration <= 0 or args.clients < 1 or args.keys < 1:
        print("pyraft-faults: --duration, --clients and --keys must be positive", file=sys.stderr)
        return 2
    extra = {"raft_config": runner.varied_config(args.seed)} if args.vary_config else {}
    cfg = runner.RunConfig(nodes=args.nodes, duration=args.duration, seed=args.seed, nemeses=nemeses, **extra,
                           clients=args.clients, keys=args.keys, base_dir=args.dir, keep=args.keep or bool(args.dir),
                           verbose=not args.quiet, lazyfs=args.lazyfs)
    result = runner.run_with_signals(cfg)
    print(result.summary(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
