"""A flood of connections to the leader must not cost it its leadership.

Three ``pyraft-kv serve`` processes; this process opens thousands of ZeroMQ
connections to the leader (each completes its handshake, then stays idle, or
heartbeats as fast as libzmq lets it) and watches the followers: same leader,
same term, and writes keep committing.

The cause it guards against: libzmq keeps the timers of all connections of an
I/O thread in one list and cancels them by a linear scan, so ZMTP heartbeats
on N connections cost O(N^2) a second.  With the ROUTER heartbeating 5,000
idle connections, the node's only I/O thread did nothing else, and the node's
own connections to its followers, on that thread too, fell silent.
"""
from __future__ import annotations

import time

import pytest
import zmq
import zmq.auth

from procs import make_cluster, need_fds  # noqa: F401 - fixture

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def flood_and_watch(c, n: int, seconds: float, *, curve: bool = False, heartbeat: bool = False) -> None:
    need_fds(2 * n + 1000)  # a DEALER is a TCP socket and a mailbox
    c.start_all()
    lead = c.wait_leader(30)
    followers = [i for i in c.ids if i != lead]
    term = c.status(lead, 2.0)["term"]
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = n + 100
    socks = []
    kv = c.client(timeout=10)
    try:
        kv.put("before", 1)
        if curve:
            pub, sec = zmq.auth.load_certificate(c.secret_file("client"))
            server_key, _ = zmq.auth.load_certificate(f"{c.keys_dir}/peers/{lead}.key")
        for _ in range(n):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            if heartbeat:  # a client that pings every 100 ms with a 1 s TTL: timers on the server
                s.heartbeat_ivl, s.heartbeat_ttl, s.heartbeat_timeout = 100, 1000, 3000
            if curve:
                s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_key, pub, sec
            s.connect(c.addrs[lead])
            socks.append(s)
        deadline = time.monotonic() + seconds
        k = 0
        while time.monotonic() < deadline:
            for i in followers:
                st = c.status(i, 2.0)
                assert st is not None, f"follower {i} stopped answering"
                assert (st["term"], st["leader"]) == (term, lead), \
                    f"follower {i} moved on: term {st['term']}, leader {st['leader']} (was {term}, {lead})"
            kv.put("during", k)
            k += 1
            time.sleep(0.5)
        assert kv.get("during") == k - 1
    finally:
        kv.close()
        for s in socks:
            s.close()
        ctx.term()


def test_5000_idle_connections_do_not_cost_the_leader_its_leadership(make_cluster):
    flood_and_watch(make_cluster(3), 5000, 8)


@pytest.mark.soak
@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_5000_heartbeating_connections_do_not_cost_the_leader_its_leadership(make_cluster, curve):
    flood_and_watch(make_cluster(3, curve=curve), 5000, 30, curve=curve, heartbeat=True)
