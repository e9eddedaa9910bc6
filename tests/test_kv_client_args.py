"""Arguments a careless caller passes to KVClient and the recipes: refused at once, never a spin or a hang."""
from __future__ import annotations

import math

import pytest

from pyraft.kv import KVClient, KVStateMachine
from pyraft.kv.client import MIN_KEEPALIVE_INTERVAL, Watch
from pyraft.kv.recipes import Election, Lock

from test_kv_client import ZmqCluster

pytestmark = pytest.mark.timeout(60)

NOWHERE = ["tcp://127.0.0.1:9"]  # never contacted: every check below comes before any call


@pytest.mark.parametrize("kw", [{"timeout": math.nan}, {"timeout": math.inf}, {"timeout": -1}, {"timeout": 0},
                                {"attempt_timeout": -1}, {"attempt_timeout": math.nan}, {"attempt_timeout": 0},
                                {"attempt_timeout": math.inf}, {"timeout": True}, {"attempt_timeout": "1"}])
def test_a_client_refuses_timeouts_that_are_not_finite_positive_seconds(kw):
    # attempt_timeout=-1 used to make every call spin through tens of thousands of attempts
    with pytest.raises((ValueError, TypeError), match="timeout"):
        KVClient(NOWHERE, **kw)


def test_calls_refuse_timeouts_that_would_never_end_or_never_start():
    kv = KVClient(NOWHERE, timeout=1)
    try:
        with pytest.raises(ValueError, match="timeout"):
            kv.status(timeout=-1)
        with pytest.raises(ValueError, match="timeout"):
            kv.status(timeout=0)
        w = Watch(kv, {"key": "a"}, 1)  # as kv.watch makes it, without its first poll (nobody is there)
        with pytest.raises(ValueError, match="timeout"):
            w.get(math.nan)  # blocked forever before
        with pytest.raises(TypeError, match="timeout"):
            w.get("1")
        w.close()
        with pytest.raises(ValueError, match="timeout"):
            Lock(kv, "h", ttl=10).acquire(timeout=math.nan)  # blocked forever while another held it
        with pytest.raises(ValueError, match="timeout"):
            Election(kv, "el", ttl=10).campaign("me", timeout=math.nan)
        with pytest.raises(ValueError, match="timeout"):
            Lock(kv, "h", ttl=10).acquire(timeout=-1)
    finally:
        kv.close()


def test_a_keepalive_interval_shorter_than_the_floor_is_refused(tmp_path):
    c = ZmqCluster(sm_factory=lambda i: KVStateMachine(tmp_path / f"n{i}"))
    try:
        c.leader()
        with c.client() as kv:
            lease = kv.lease_grant(30)
            for bad in (1e-9, 0, -1, math.nan):
                with pytest.raises(ValueError, match="interval"):
                    kv.keep_alive(lease, interval=bad)
            ka = kv.keep_alive(lease, interval=MIN_KEEPALIVE_INTERVAL)
            ka.stop()
    finally:
        c.close()
