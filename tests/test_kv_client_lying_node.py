"""KVClient against a node that lies: every reply the wire allows, in every shape a caller reads.

A node running other code, or one an attacker controls, must never crash a caller with an untyped
exception, hang a call past its timeout, kill a client thread silently, or make the client open
sockets without end: a bad reply is a RaftError (CodecError for a reply of the wrong shape,
Timeout when nothing usable came), within the call's timeout.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import pytest

from pyraft.errors import CodecError, RaftError
from pyraft.kv import KVClient

from fake_kv_node import FakeNode, err, frame

pytestmark = pytest.mark.timeout(60)


def _lying(handler, **kw):
    return FakeNode(handler, raw=True, **kw)


def _nested(depth):
    k = 1
    for _ in range(depth):
        k = [k]
    return k


BAD_ERRORS = {
    "error=None": lambda rid: frame(False, None, None, rid),
    "name=5": lambda rid: err(5, rid=rid),
    "name=bytes": lambda rid: err(b"Timeout", rid=rid),
    "message=5": lambda rid: err("Timeout", 5, rid=rid),
    "three items": lambda rid: frame(False, None, ["Timeout", "m", None], rid),
    "ok with an error": lambda rid: frame(True, 1, ["Timeout", "m", None, None], rid),
    "hint id a str": lambda rid: err("ForwardToLeader", "m", "2", "tcp://127.0.0.1:1", rid=rid),
    "hint addr an int": lambda rid: err("ForwardToLeader", "m", 2, 5, rid=rid),
    "hint addr bytes": lambda rid: err("ForwardToLeader", "m", 2, b"tcp://127.0.0.1:1", rid=rid),
    "hint addr not an address": lambda rid: err("ForwardToLeader", "m", 2, "garbage", rid=rid),
}
CALLS = {
    "get": lambda kv: kv.get("x"),
    "put": lambda kv: kv.put("x", 1),
    "get_async": lambda kv: kv.get_async("x").result(5),
    "status": lambda kv: kv.status(),
    "watch": lambda kv: kv.watch("a", start_revision=1),
}


@pytest.mark.parametrize("bad", BAD_ERRORS)
@pytest.mark.parametrize("call", CALLS)
def test_an_error_reply_of_the_wrong_shape_is_a_raft_error_within_the_timeout(bad, call):
    n = _lying(lambda op, body, rid: [BAD_ERRORS[bad](rid)])
    kv = KVClient([n.addr], timeout=0.4)
    try:
        t0 = time.monotonic()
        with pytest.raises(RaftError):
            CALLS[call](kv)
        assert time.monotonic() - t0 < 0.4 + 1.0  # (a watch's poll may wait its 1 s on the node)
    finally:
        kv.close()
        n.close()


BAD_BODIES = {
    "range record shorter than its header": ({"kvs": [[b"\x01a", b""]], "revision": 1, "count": 1, "more": False},
                                             lambda kv: kv.range("a")),
    "range record shorter, future": ({"kvs": [[b"\x01a", b"xx"]], "revision": 1, "count": 1, "more": False},
                                     lambda kv: kv.range_async("a").result(3)),
    "txn row key nested 600 deep": ([True, [[[[_nested(600), None, 1, 1, 1, 0]], False]], 5],
                                    lambda kv: kv.txn([], [{"op": "range", "key": "a", "prefix": True}])),
    "txn row key nested, future": ([True, [[[[_nested(600), None, 1, 1, 1, 0]], False]], 5],
                                   lambda kv: kv.txn_async([], [{"op": "range", "key": "a"}]).result(3)),
    "lease id -1": (-1, lambda kv: kv.lease_grant(10)),
    "lease id -1, the helper": (-1, lambda kv: kv.lease(10)),
    "lease id 2**64 - 1": (2**64 - 1, lambda kv: kv.lease_grant(10)),
    "ttl inf": (float("inf"), lambda kv: kv.lease_keepalive(7)),
    "ttl nan": (float("nan"), lambda kv: kv.lease_keepalive(7)),
    "ttl 0": (0, lambda kv: kv.lease_keepalive(7)),
    "ttl nan, the helper": (float("nan"), lambda kv: kv.keep_alive(7)),
    "watch next not a number": ({"next": ["x", 0], "events": []}, lambda kv: kv.watch("a", start_revision=3)),
    "watch next goes back": ({"next": [2, 0], "events": []}, lambda kv: kv.watch("a", start_revision=3)),
    "watch next sub too large": ({"next": [3, 2**40], "events": []}, lambda kv: kv.watch("a", start_revision=3)),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_a_body_of_the_wrong_shape_is_a_codec_error(case):
    body, call = BAD_BODIES[case]
    n = _lying(lambda op, b, rid: [frame(True, body, None, rid)])
    kv = KVClient([n.addr], timeout=1.0)
    try:
        with pytest.raises(CodecError):
            call(kv)
    finally:
        kv.close()
        n.close()


def test_a_hint_that_is_not_an_address_neither_kills_the_futures_thread_nor_is_learned():
    good = FakeNode(lambda op, body: ("delay", 0.3, "v"))
    liar = _lying(lambda op, body, rid: [frame(False, None, ["ForwardToLeader", "m", 2, "not an address"], rid)])
    kv = KVClient([liar.addr, good.addr], timeout=2.0)
    try:
        kv._set_leader(good.addr)
        innocent = kv.get_async("x")  # to the good node: answered after 0.3 s
        kv._set_leader(liar.addr)
        other = kv.get_async("y")  # the liar's hint is ignored: the call goes on to the good node
        assert innocent.result(5) == "v" and other.result(5) == "v"
        assert kv._addrs == [liar.addr, good.addr]
    finally:
        kv.close()
        good.close()
        liar.close()


def test_a_node_naming_a_new_leader_in_every_reply_grows_nothing_without_bound():
    # It listens on every interface and names 127.x.y.z:its port each time: each hint is
    # followed, reaches it again, and names the next.  Before, one call opened ~1,000 sockets
    # and the process's ZeroMQ context ran out (an untyped ZMQError for every later call).
    ctr = itertools.count(2)
    port = []

    def h(op, body, rid):
        i = next(ctr)
        return [err("ForwardToLeader", "m", i, f"tcp://127.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{port[0]}",
                    rid=rid)]

    n = _lying(h, bind="tcp://*")
    port.append(n.port)
    kv = KVClient([n.addr], timeout=1.5)
    try:
        for _ in range(2):
            with pytest.raises(RaftError):
                kv.get("x")
        assert next(ctr) > 100  # many hints were followed
        assert len(kv._addrs) <= 1 + 16
        assert len(kv._chan._socks) <= 64
    finally:
        kv.close()
        n.close()


def test_a_keepalive_whose_later_replies_lie_ends_with_the_lease_lost():
    sent = itertools.count()

    def h(op, body, rid):
        if op == "kv.lease_keepalive" and next(sent) > 0:
            return [frame(False, None, None, rid)]  # (decoded as a CodecError: no reply at all)
        return [frame(True, 1.0, None, rid)]

    n = _lying(h)
    kv = KVClient([n.addr], timeout=0.5)
    try:
        ka = kv.keep_alive(7, interval=0.1)
        assert ka.lost.wait(10)  # past the 1 s ttl of the only keepalive that got through
        assert not ka.alive
    finally:
        kv.close()
        n.close()


PYRAFT_KV = os.path.join(os.path.dirname(sys.executable), "pyraft-kv")
CLI_NODES = {
    "error=None": lambda op, body, rid: [frame(False, None, None, rid)],
    "name=5": lambda op, body, rid: [err(5, rid=rid)],
    "hint addr an int": lambda op, body, rid: [err("ForwardToLeader", "m", 2, 5, rid=rid)],
    "short range record": lambda op, body, rid: [frame(True, {"kvs": [[b"\x01a", b""]], "revision": 1, "count": 1,
                                                              "more": False}, None, rid)],
}


@pytest.mark.parametrize("node, args", [("error=None", ["get", "x"]), ("name=5", ["put", "x", "1"]),
                                        ("hint addr an int", ["get", "x"]),
                                        ("short range record", ["get", "a", "--prefix"]),
                                        ("error=None", ["--json", "get", "x"]),
                                        ("error=None", ["watch", "a", "--rev", "1"])])
def test_the_cli_reports_a_lying_node_in_one_line_and_exits_1(node, args):
    n = _lying(CLI_NODES[node])
    try:
        p = subprocess.run([PYRAFT_KV, *args, "--cluster", n.addr, "--timeout", "1"],
                           capture_output=True, text=True, timeout=30)
    finally:
        n.close()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
    if "--json" in args:
        assert p.stdout.strip().startswith("{"), p.stdout


def test_the_cli_lease_keepalive_ends_when_the_keepalives_stop_working():
    sent = itertools.count()
    n = _lying(lambda op, body, rid: [frame(True, 3.0, None, rid) if op != "kv.lease_keepalive" or next(sent) == 0
                                      else frame(False, None, None, rid)])
    try:
        p = subprocess.run([PYRAFT_KV, "lease", "keepalive", "7", "--cluster", n.addr, "--timeout", "1"],
                           capture_output=True, text=True, timeout=30)
    finally:
        n.close()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
