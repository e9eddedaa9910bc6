"""Shared test helpers."""
from __future__ import annotations

from pyraft.tools.kv import free_port  # noqa: F401 - the tests' one helper for it


# --- deterministic simulation (tests/test_simulation.py) -------------------------------------


def pytest_addoption(parser):
    group = parser.getgroup("pyraft-sim", "pyraft deterministic simulation")
    group.addoption("--sim-seed", type=int, default=None,
                    help="replay one simulation seed (prints its trace on failure)")
    group.addoption("--sim-seeds", type=int, default=None,
                    help="how many seeds the simulation runs (default suite: 500; soak: 5000)")
    group.addoption("--sim-steps", type=int, default=None,
                    help="events per simulation seed (default suite: 10000; soak: 20000)")
    group.addoption("--sim-first-seed", type=int, default=None,
                    help="the first seed of the range (default: 0; soak: 1000000)")
    group.addoption("--sim-jobs", type=int, default=None,
                    help="worker processes for the seeds (default: the number of CPUs)")


# --- power-loss tests (tests/powerloss/): say why they were skipped -----------------------------


def pytest_terminal_summary(terminalreporter):
    """Print the reason once when the power-loss tests were skipped (FUSE cannot be mounted here)."""
    reasons = set()
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(rep, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else ""
        if "power-loss tests need FUSE" in reason:
            reasons.add(reason.removeprefix("Skipped: "))
    for reason in sorted(reasons):
        terminalreporter.write_line(f"{reason} (skipped)", yellow=True)
