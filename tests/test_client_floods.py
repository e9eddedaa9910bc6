"""One client pipelining valid but heavy requests at a node: the others are still served, the leader keeps leading.

Attacks a client key allows (the resource review of 2026-12-07), each against
a 3-node cluster of ``pyraft-kv serve`` processes with the default timers:

- hundreds of writes just under the 1.5 MiB client frame limit, sent in a
  fraction of a second (before ``Config.max_pending_write_bytes`` the leader
  appended them in one turn, stopped heartbeating and was deposed, round
  after round, with nothing committed).

The cap on requests in flight per connection is tested on the transport
(test_zmq_connection_limits.py), the fair shares of the KV service in
test_kv_service_fairness.py.
"""
from __future__ import annotations

import pytest

from pyraft.codec import ClientRequest
from hostile import hostile_cluster  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(300)

#: Config's own timers (heartbeat 0.1 s, an election after 1-2 s of silence), as a deployment runs.
DEFAULT_TIMERS = {"heartbeat_interval": 0.1, "election_timeout": [1.0, 2.0], "rpc_timeout": 1.0}


def _answers(sock, n: int, timeout: float) -> dict[str, int]:
    """Error kinds (or "ok") of the replies to ``n`` requests."""
    kinds: dict[str, int] = {}
    got = 0
    for _rid, msg in sock.replies(timeout):
        kind = "ok" if msg.ok else msg.error[0]
        kinds[kind] = kinds.get(kind, 0) + 1
        got += 1
        if got == n:
            break
    return kinds


def test_a_burst_of_megabyte_writes_is_partly_refused_and_the_rest_commits(hostile_cluster):
    c = hostile_cluster(layout="none", config=DEFAULT_TIMERS)
    lead = c.wait_leader(20)
    value = b"v" * 1_400_000  # under the 1.5 MiB client frame limit
    socks = [c.raw(lead, None) for _ in range(3)]
    try:
        n = 100  # per connection: 420 MB in all
        for k in range(n):
            for j, s in enumerate(socks):
                s.send(ClientRequest("kv.write", {"op": "put", "key": f"big{j}-{k % 10}", "value": value}), 0)
        kinds: dict[str, int] = {}
        for s in socks:
            for kind, count in _answers(s, n, 120).items():
                kinds[kind] = kinds.get(kind, 0) + count
    finally:
        for s in socks:
            s.close()
    # Every request answered at once or committed: nothing lost to a deposed leader (before the
    # byte budget: 300 of 300 ForwardToLeader, nothing committed, round after round).
    assert sum(kinds.values()) == 3 * n, kinds
    assert set(kinds) <= {"ok", "Overloaded"} and kinds.get("ok", 0) >= 40, kinds
    # The budget holds 64 MiB in flight; fsyncing that may still outlast an election timeout on
    # a slow shared disk (seen once in about 70 runs), so a new term is allowed, a lost cluster not.
    c.wait_leader(20)
    with c.kv(timeout=20) as kv:
        kv.put("after", 1)
        assert kv.get("after") == 1

