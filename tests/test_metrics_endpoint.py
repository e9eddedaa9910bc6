"""The metrics endpoint against callers that hold it open, trickle, or send nonsense.

One thread serves every connection without blocking on any of them, so a
scrape is answered while many other connections sit idle or send a byte at a
time; each connection is closed at its deadline, and past the cap the oldest
is closed to make room.
"""
from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyraft import prometheus
from pyraft.prometheus import MetricsServer
from memcluster import MemCluster

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def node():
    with MemCluster(1) as c:
        yield c.leader()


@pytest.fixture
def server(node):
    with MetricsServer(node.node_id, node.metrics, "127.0.0.1", 0) as srv:
        yield srv


def _connect(srv: MetricsServer) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), timeout=10)
    return s


def _exchange(srv: MetricsServer, request: bytes) -> bytes:
    """Send ``request`` whole, read the reply until the server closes."""
    with _connect(srv) as s:
        s.sendall(request)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
    return bytes(out)


def _scrape(srv: MetricsServer, timeout: float) -> dict:
    with urllib.request.urlopen(srv.url, timeout=timeout) as r:
        assert r.status == 200
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _closed_by_server(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_scrape_is_answered_while_many_connections_idle_or_trickle(server):
    idle = [_connect(server) for _ in range(40)]
    trickling = [_connect(server) for _ in range(10)]
    try:
        for s in trickling:
            s.sendall(b"GET /metr")  # a request line that never ends
        t0 = time.monotonic()
        for _ in range(5):
            fams = _scrape(server, timeout=3)
            assert "pyraft_is_leader" in fams
        # Five scrapes behind 50 connections that hold a 5 s deadline each: one thread
        # blocking on them in turn would need minutes.
        assert time.monotonic() - t0 < 3
    finally:
        for s in idle + trickling:
            s.close()


def test_past_the_cap_the_oldest_connection_is_closed(server):
    conns = [_connect(server) for _ in range(prometheus._MAX_CONNECTIONS + 1)]
    try:
        assert _closed_by_server(conns[0], timeout=3), "the oldest connection should have been closed"
        assert "pyraft_voters" in _scrape(server, timeout=3)
        assert not _closed_by_server(conns[-1], timeout=0.2)
    finally:
        for s in conns:
            s.close()


def test_an_idle_connection_is_closed_at_its_deadline(node, monkeypatch):
    monkeypatch.setattr(prometheus, "_REQUEST_TIMEOUT", 0.3)
    with MetricsServer(node.node_id, node.metrics, "127.0.0.1", 0) as srv:
        with _connect(srv) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # headers that never end
            assert _closed_by_server(s, timeout=5)
            assert 0.2 < time.monotonic() - t0 < 3


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
    (b"GET /metrics?x=1 HTTP/1.0\n\n", b"200"),
    (b"GET /other HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"501"),
    (b"HEAD /metrics HTTP/1.1\r\n\r\n", b"501"),
    (b"GET /metrics\r\n\r\n", b"400"),
    (b"\x00\xff\xfe garbage \x80\r\n\r\n", b"400"),
    (b"GET /metrics SPDY/3\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (prometheus._MAX_REQUEST_BYTES + 10) + b"\r\n\r\n", b"431"),
])
def test_each_request_gets_one_reply_and_the_connection_closes(server, request_bytes, status):
    reply = _exchange(server, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status + b" "), reply[:200]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head
    length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
    assert len(body) == length


def test_a_failing_source_is_a_500_and_the_endpoint_stays(node):
    calls = []

    def source():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return node.metrics()

    with MetricsServer(node.node_id, source, "127.0.0.1", 0) as srv:
        assert _exchange(srv, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500 ")
        assert "pyraft_is_leader" in _scrape(srv, timeout=3)


def test_close_with_connections_open_frees_the_port_and_the_thread(node):
    srv = MetricsServer(node.node_id, node.metrics, "127.0.0.1", 0)
    conns = [_connect(srv) for _ in range(5)]
    conns[0].sendall(b"GET /metr")
    name = f"pyraft-metrics-{node.node_id}"
    assert name in [t.name for t in threading.enumerate()]
    srv.close()
    srv.close()  # idempotent
    assert name not in [t.name for t in threading.enumerate()]
    for s in conns:
        assert _closed_by_server(s, timeout=3)
        s.close()
    with MetricsServer(node.node_id, node.metrics, "127.0.0.1", srv.port) as again:  # the port is free again
        assert "pyraft_is_leader" in _scrape(again, timeout=3)
