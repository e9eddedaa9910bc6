"""Helpers for tests that run ``pyraft-kv serve`` nodes as separate OS processes.

The cluster class is the one the demo uses (:class:`pyraft.tools.kv.LocalCluster`);
here it gets a pytest fixture that always stops every process (SIGTERM, then
SIGKILL), prints the nodes' log tails when the test failed, and checks that
nothing was left running.
"""
from __future__ import annotations

import os
import resource
import signal
import sys
import time
from typing import Any, Callable

import pytest

from pyraft.tools.kv import LocalCluster, NodeFailed, free_port  # noqa: F401 - re-exported

#: Timings for node processes on a busy 2-core machine: elections stay rare but quick.
PROC_CONFIG = {"heartbeat_interval": 0.05, "election_timeout": [0.3, 0.6], "rpc_timeout": 0.5}

DISTINCT_HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def need_fds(n: int) -> None:
    """Let this process open ``n`` file descriptors, or skip the calling test saying why.

    Raises the soft limit, and the hard limit too where this process may
    (root may, up to the kernel's ``fs.nr_open``).  Fails instead of skipping
    under ``CI=true``, where the test must run.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or soft >= n:
        return
    if hard == unlimited or hard >= n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (ValueError, OSError) as e:
        why = (f"this test opens {n} file descriptors; the hard limit is {hard} and this process may not "
               f"raise it ({e}): run it as root or raise the limit (ulimit -Hn)")
        if os.environ.get("CI") == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``pred`` until truthy; AssertionError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def make_cluster(request, tmp_path):
    """``make_cluster(n=3, hosts=None, curve=False, config=None)`` -> a LocalCluster, stopped at teardown."""
    made: list[LocalCluster] = []
    failed_before = request.session.testsfailed

    def make(n: int = 3, *, hosts=None, curve: bool = False, config: dict | None = None,
             name: str = "c", **kw: Any) -> LocalCluster:
        c = LocalCluster(tmp_path / f"{name}{len(made)}", n, hosts=hosts, curve=curve,
                         config=config or PROC_CONFIG, **kw)
        made.append(c)
        return c

    yield make
    pids = []
    for c in made:
        pids += [p.pid for p in c.procs.values()]
        c.close()
    if request.session.testsfailed > failed_before or getattr(request.node, "_failed", False):
        for c in made:
            for i in c.ids:
                sys.stderr.write(f"\n----- node {i} log ({c.log_path(i)}) -----\n{c.log_tail(i, 40)}\n")
    left = [pid for pid in pids if pid_alive(pid)]
    for pid in left:  # never leave anything behind, even when the check below fails
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"node processes still running after the test: {left}"


def applied(c: LocalCluster, i: int) -> int:
    st = c.status(i)
    return (st or {}).get("applied") or 0


def wait_caught_up(c: LocalCluster, ids, timeout: float = 20.0) -> int:
    """Wait until every node of ``ids`` has applied as far as the leader had when this was called."""
    lead = c.wait_leader(timeout)
    target = applied(c, lead)
    for i in ids:
        wait_for(lambda: applied(c, i) >= target, timeout, f"node {i} to apply index {target}")
    return target


def random_faults(c: LocalCluster, rng: Any, seconds: float, *, pauses: bool = True) -> None:
    """For ``seconds``: every 0.2-1.5 s hit a node (the leader 60% of the time): SIGKILL and restart it
    after up to 1.5 s, or (with ``pauses``, half the time) SIGSTOP it for 0.1-1.5 s."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(rng.uniform(0.2, 1.5))
        lead = c.leader()
        victim = lead if (lead is not None and rng.random() < 0.6) else rng.choice(c.ids)
        if not pauses or rng.random() < 0.5:
            c.kill(victim)
            time.sleep(rng.uniform(0.0, 1.5))
            c.start(victim)
        else:
            c.signal(victim, signal.SIGSTOP)
            time.sleep(rng.uniform(0.1, 1.5))
            c.signal(victim, signal.SIGCONT)
