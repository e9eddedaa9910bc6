"""Do the power-loss runs have teeth?  Run them against each durability mutant and count what catches it.

Each mutant (:mod:`.mutants`) is patched into the node processes in memory;
nothing on disk changes.  For every mutant and seed one power-loss run is
made (:func:`.runner.run`, the nodes' data on lazy filesystems) and the
problems it reports are sorted into what caught the bug::

    cd tests && python -m faults.teeth [--runs 3] [--duration 30] [--first-seed 1] [--rule strict]
                                       [--nemesis power] [mutant ...]

``none`` runs the code as shipped (last, by default): those runs must all pass.  The
figures of the last full run are in docs/power-loss.md.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter

from .mutants import MUTANTS
from .nemesis import parse_nemeses
from .runner import RunConfig, RunResult, run

#: (what caught it, how to recognise it in a problem line), first match wins.
CATCHES = (
    ("durability check at a power cut", "after a power loss"),
    ("Election Safety", "Election Safety"),
    ("committed entries lost or changed", "committed entr"),
    ("logs differ", "logs: nodes"),
    ("the cluster did not serve again", "did not serve"),
    ("no operation after healing", "no operation succeeded"),
    ("a node failed", "exited"),
    ("a node failed", "did not restart"),
    ("a node failed", "never served again"),
    ("a node logged an error", "logged"),
    ("a snapshot unreadable", "snapshot is unreadable"),
)


def caught_by(res: RunResult) -> Counter:
    """What flagged the run (one count per kind of problem)."""
    out: Counter = Counter()
    if res.lost_writes:
        out["lost acknowledged writes"] += 1
    if res.linearizable is False:
        out["not linearizable"] += 1
    if res.sm_problems:
        out["state machines differ" if any("differ" in p for p in res.sm_problems) else "a snapshot unreadable"] += 1
    for line in res.problems + [f"logs: {p}" for p in res.log_problems]:
        for what, sign in CATCHES:
            if sign in line:
                out[what] += 1
                break
    return Counter({k: 1 for k in out})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m faults.teeth", description=__doc__.split("\n", 1)[0])
    ap.add_argument("mutants", nargs="*", help=f"default: all of {', '.join(MUTANTS)}, then none (no mutant)")
    ap.add_argument("--runs", type=int, default=3, help="runs (seeds) per mutant")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of faults per run")
    ap.add_argument("--rule", choices=["strict", "ext4"], default="strict")
    ap.add_argument("--nemesis", default="power")
    a = ap.parse_args(argv)
    names = a.mutants or [*MUTANTS, "none"]
    bad = [m for m in names if m != "none" and m not in MUTANTS]
    if bad:
        print(f"unknown mutant {', '.join(bad)}; choose from {', '.join(MUTANTS)} or none", file=sys.stderr)
        return 2
    nemeses = parse_nemeses(a.nemesis)
    rows = []
    for name in names:
        t0 = time.monotonic()
        total: Counter = Counter()
        failed: list[int] = []
        for seed in range(a.first_seed, a.first_seed + a.runs):
            base = tempfile.mkdtemp(prefix=f"pyraft-teeth-{name}-")
            try:
                res = run(RunConfig(nemeses=nemeses, duration=a.duration, seed=seed, lazyfs=a.rule,
                                    mutant=None if name == "none" else name, base_dir=base, verbose=False))
            finally:
                shutil.rmtree(base, ignore_errors=True)
            if not res.ok:
                failed.append(seed)
                total += caught_by(res)
            first = "" if res.ok else f"; first problem: {res.all_problems()[0][:200]}"
            print(f"  {name} seed {seed}: {'PASS' if res.ok else 'FAIL'}: ops {res.ops['ok']} ok, "
                  f"{res.forgotten['cuts']} power cuts{first}", flush=True)
        how = ", ".join(f"{k} {v}/{a.runs}" for k, v in total.most_common()) or "-"
        print(f"{name}: {MUTANTS.get(name, 'the code as shipped')}\n   caught in {len(failed)}/{a.runs} runs "
              f"({time.monotonic() - t0:.0f}s; seeds {failed or '-'}); by: {how}", flush=True)
        rows.append(f"| `{name}` | {MUTANTS.get(name, 'none: the code as shipped')} | {len(failed)}/{a.runs} | "
                    f"{how} |")
    print(f"\n{a.runs} runs of {a.duration:g} s each ({','.join(nemeses)}, rule {a.rule}), seeds "
          f"{a.first_seed}..{a.first_seed + a.runs - 1}:\n\n| mutant | the bug | caught | by |\n|---|---|---|---|")
    print("\n".join(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
