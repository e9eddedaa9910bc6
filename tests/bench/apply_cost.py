"""What one applied put costs KVStateMachine: CPU time, or instructions under valgrind.

    python tests/bench/apply_cost.py [--batch 2000] [--batches 40] [--keys 1024] [--history N] [--clients N]
    python tests/bench/apply_cost.py --instructions      # needs valgrind (apt install valgrind)

Applies ``--batches`` batches of ``--batch`` 10-byte puts over ``--keys`` keys
(the shape of ``pyraft-bench``'s load) to a KVStateMachine in a temporary
directory, after one warm-up batch.  ``--history`` is the state machine's
``watch_history``: with fewer revisions than puts, each put also compacts an
old watch event away, as on a node that has run for a while.  ``--clients N``
gives every put the session fields of one of N clients, in turn, as
``KVClient``'s writes carry them (exactly-once).  ``--instructions`` runs this script
twice under ``valgrind --tool=callgrind`` (once with no measured batches) and
prints the difference per put: a count that does not depend on what else the
machine is doing, for comparing two versions of the apply path.
"""
from __future__ import annotations

import argparse
import gc
import random
import re
import subprocess
import sys
import tempfile
import time

from pyraft.kv.commands import DEFAULT_WATCH_HISTORY


def apply_puts(batch: int, batches: int, keys: int, history: int, clients: int = 0, apply: bool = True) -> float:
    from pyraft import tune_gc
    from pyraft.kv import KVStateMachine
    from pyraft.types import Entry, EntryKind, LogId

    rng = random.Random(1)
    values = [rng.randbytes(10) for _ in range(keys)]

    def put(i: int) -> dict:
        cmd = {"op": "put", "key": f"k{i % keys}", "value": values[i % keys]}
        if clients:
            cmd["client"] = f"client-{i % clients}"
            cmd["seq"] = i // clients + 1
        return cmd

    todo = [[Entry(LogId(1, 1 + b * batch + k), EntryKind.NORMAL, put(b * batch + k)) for k in range(batch)]
            for b in range(batches + 1)]
    tune_gc()
    with tempfile.TemporaryDirectory(prefix="pyraft-apply-cost-") as d:
        sm = KVStateMachine(d, watch_history=history)
        try:
            sm.apply(todo[0])
            t0 = time.process_time()
            for entries in todo[1:] if apply else ():
                sm.apply(entries)
            return time.process_time() - t0
        finally:
            sm.close()
            gc.collect()


def _instructions(batch: int, batches: int, keys: int, history: int, clients: int, apply: bool) -> int:
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
            "--batch", str(batch), "--batches", str(batches), "--keys", str(keys), "--history", str(history),
            "--clients", str(clients)]
    if not apply:
        argv.append("--setup-only")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stderr
    m = re.search(r"Collected : (\d+)", out)
    if m is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out[-2000:]}")
    return int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--keys", type=int, default=1024)
    p.add_argument("--history", type=int, default=DEFAULT_WATCH_HISTORY,
                   help=f"watch_history of the state machine (default {DEFAULT_WATCH_HISTORY:,})")
    p.add_argument("--clients", type=int, default=0,
                   help="puts carry the session fields of this many clients (default 0: none)")
    p.add_argument("--instructions", action="store_true", help="count instructions under valgrind instead")
    p.add_argument("--setup-only", action="store_true",
                   help="build the batches but apply only the warm-up one (--instructions's baseline run)")
    a = p.parse_args()
    if a.batch < 1 or a.batches < 1 or a.keys < 1 or a.history < 1:
        p.error("--batch, --batches, --keys and --history must be at least 1")
    if a.clients < 0:
        p.error("--clients must be at least 0")
    puts = a.batch * a.batches
    if a.setup_only:
        apply_puts(a.batch, a.batches, a.keys, a.history, a.clients, apply=False)
        return 0
    if a.instructions:
        n = (_instructions(a.batch, a.batches, a.keys, a.history, a.clients, True)
             - _instructions(a.batch, a.batches, a.keys, a.history, a.clients, False))
        print(f"{n / puts:,.0f} instructions per put ({puts:,} puts in batches of {a.batch:,})")
    else:
        s = apply_puts(a.batch, a.batches, a.keys, a.history, a.clients)
        print(f"{s / puts * 1e6:.2f} us of CPU per put ({puts:,} puts in batches of {a.batch:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
