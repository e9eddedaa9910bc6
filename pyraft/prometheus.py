"""A node's metrics in the Prometheus text exposition format, and a tiny HTTP server for them.

``pyraft-kv serve --metrics-listen HOST:PORT`` runs :class:`MetricsServer`;
Prometheus scrapes ``http://HOST:PORT/metrics``.  The format (version
0.0.4) is written out here by hand: no dependency.  Every family below has
HELP and TYPE lines; the names are a contract of docs/operations.md.

==========================================  =======  =============================================
name                                        type     value
==========================================  =======  =============================================
``pyraft_info{id,cluster,version}``         gauge    1 (the labels carry the facts)
``pyraft_state{state}``                     gauge    1 for the node's state, 0 for the others
``pyraft_is_leader``                        gauge    1 on the leader
``pyraft_has_leader``                       gauge    1 when the node knows a leader
``pyraft_leader_id``                        gauge    the leader's node id (absent when unknown)
``pyraft_current_term``                     gauge    the current term
``pyraft_last_log_index``                   gauge    the last log index
``pyraft_committed_index``                  gauge    the commit index
``pyraft_applied_index``                    gauge    the last index applied to the state machine
``pyraft_snapshot_index``                   gauge    the current snapshot's last index (0: none)
``pyraft_purged_index``                     gauge    the log is purged up to here (0: nothing)
``pyraft_voters``                           gauge    voters in the membership
``pyraft_learners``                         gauge    learners in the membership
``pyraft_membership_joint``                 gauge    1 while a membership change is in its joint phase
``pyraft_replication_matched_index{target}`` gauge   on the leader: each target's matched index
``pyraft_replication_lag{target}``          gauge    on the leader: last_log_index - matched index
``pyraft_replication_failing{target}``      gauge    on the leader: 1 while the target cannot be reached
``pyraft_fatal``                            gauge    1 once the node stopped on a fatal error
``pyraft_events_total{event}``              counter  ``RaftMetrics.counters``: transport drops,
                                                     refusals, overload, ...
==========================================  =======  =============================================

``extra`` gauges come from the embedding program (``pyraft-kv serve`` adds
``pyraft_kv_keys``, ``pyraft_kv_used_bytes`` and ``pyraft_kv_quota_bytes``).

Security: the endpoint answers anyone who can connect, with no
authentication; bind it to loopback (the docs' default) or a monitoring
network.  It serves ``GET /metrics`` only; other paths get 404 and other
methods 501.  One thread (``pyraft-metrics-<id>``) serves every connection
without blocking on any of them (a selector loop): idle or slow connections
cannot hold the endpoint.  Each connection has ``_REQUEST_TIMEOUT`` seconds
from its accept to its last reply byte and ``_MAX_REQUEST_BYTES`` for its
request line and headers; past ``_MAX_CONNECTIONS`` open at once the oldest is
closed, so a scraper that connects is answered even while others hold
connections open.
"""
from __future__ import annotations

import http
import logging
import math
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from ._version import __version__
from .metrics import RaftMetrics
from .types import ServerState, log_index

__all__ = ["Gauge", "exposition", "MetricsServer", "CONTENT_TYPE", "parse_listen"]

log = logging.getLogger("pyraft.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds one connection may stay open, from its accept to its reply's last byte.
_REQUEST_TIMEOUT = 5.0
#: The request line and headers of one request, at most (431 past it).
_MAX_REQUEST_BYTES = 16384
#: Connections open at once, at most: the oldest is closed to accept another.
_MAX_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class Gauge:
    """One extra gauge sample: ``name`` (a valid metric name), its HELP text, its value."""

    name: str
    help: str
    value: float


def _esc_label(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _esc_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str, samples: Iterable[tuple[Mapping[str, Any], float]]) -> None:
        self.lines.append(f"# HELP {name} {_esc_help(help)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                ls = ",".join(f'{k}="{_esc_label(v)}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{ls}}} {_num(value)}")
            else:
                self.lines.append(f"{name} {_num(value)}")

    def gauge(self, name: str, help: str, value: float) -> None:
        self.family(name, "gauge", help, [({}, value)])


def exposition(m: RaftMetrics, *, cluster_name: str = "", extra: Iterable[Gauge] = ()) -> str:
    """The Prometheus text exposition of ``m`` (and ``extra`` gauges), ending with a newline."""
    o = _Out()
    o.family("pyraft_info", "gauge", "Facts about this node, in labels; the value is always 1.",
             [({"id": m.id, "cluster": cluster_name, "version": __version__}, 1)])
    o.family("pyraft_state", "gauge", "1 for the node's current state, 0 for the others.",
             [({"state": s.value}, 1 if m.state == s else 0) for s in ServerState])
    o.gauge("pyraft_is_leader", "1 when this node is the leader.", m.state == ServerState.LEADER)
    o.gauge("pyraft_has_leader", "1 when this node knows a leader.", m.current_leader is not None)
    if m.current_leader is not None:
        o.gauge("pyraft_leader_id", "The node id of the leader this node knows.", m.current_leader)
    o.gauge("pyraft_current_term", "The current term.", m.current_term)
    o.gauge("pyraft_last_log_index", "The index of the last entry in the log.", m.last_log_index)
    o.gauge("pyraft_committed_index", "The commit index.", log_index(m.committed))
    o.gauge("pyraft_applied_index", "The last index applied to the state machine.", log_index(m.last_applied))
    o.gauge("pyraft_snapshot_index", "The last index the current snapshot covers (0: no snapshot).",
            log_index(m.snapshot))
    o.gauge("pyraft_purged_index", "The log is purged up to this index (0: nothing purged).", log_index(m.purged))
    ms = m.membership
    o.gauge("pyraft_voters", "Voters in the membership.", len(ms.voter_ids) if ms else 0)
    o.gauge("pyraft_learners", "Learners in the membership.", len(ms.learner_ids) if ms else 0)
    o.gauge("pyraft_membership_joint", "1 while a membership change is in its joint phase.",
            bool(ms and ms.is_joint))
    repl = sorted(m.replication.items())
    o.family("pyraft_replication_matched_index", "gauge",
             "On the leader: the last log index each target is known to hold.",
             [({"target": t}, log_index(lid)) for t, lid in repl])
    o.family("pyraft_replication_lag", "gauge",
             "On the leader: entries each target lacks (last_log_index - matched index).",
             [({"target": t}, max(0, m.last_log_index - log_index(lid))) for t, lid in repl])
    o.family("pyraft_replication_failing", "gauge",
             "On the leader: 1 while the connection to the target fails (the worker retries).",
             [({"target": t}, 1 if t in m.replication_errors else 0) for t, _lid in repl])
    o.gauge("pyraft_fatal", "1 once the node stopped on a fatal error (a failing disk or state machine).",
            m.state == ServerState.FATAL)
    o.family("pyraft_events_total", "counter",
             "Events counted since the node started (RaftMetrics.counters): dropped frames, refused "
             "messages, overload, connection failures.",
             [({"event": k}, v) for k, v in sorted(m.counters.items())])
    for g in extra:
        o.gauge(g.name, g.help, g.value)
    return "\n".join(o.lines) + "\n"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> ``(host, port)``; ValueError saying why not."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"the port of {text!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"the port of {text!r} is out of range")
    return host, p


class _Conn:
    """One accepted connection: what it has sent, what is left to write back, its deadline."""

    __slots__ = ("sock", "inbuf", "out", "draining", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out: memoryview | None = None
        #: the reply is sent and the write side shut: what the caller still sends is
        #: read and dropped until it closes (closing with unread bytes would reset the
        #: connection and could destroy the reply before the caller reads it)
        self.draining = False
        self.deadline = deadline


def _reply(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    reason = http.HTTPStatus(status).phrase
    head = (f"HTTP/1.1 {status} {reason}\r\nServer: pyraft/{__version__}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


def _answer(head: bytes, render: Callable[[], str], node_id: int) -> bytes:
    """The whole reply to one request, given its request line and headers."""
    line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _reply(400, b"bad request line\n")
    method, target = parts[0], parts[1]
    if method != b"GET":
        return _reply(501, b"only GET /metrics is served here\n")
    if target.split(b"?", 1)[0] != b"/metrics":
        return _reply(404, b"only /metrics is served here\n")
    try:
        body = render().encode("utf-8")
    except Exception as e:  # noqa: BLE001 - a scrape never takes the node down
        log.exception("node %s: rendering the metrics failed", node_id)
        return _reply(500, f"{type(e).__name__}\n".encode())
    return _reply(200, body, CONTENT_TYPE)


class MetricsServer:
    """Serves ``GET /metrics`` for one node on its own thread ``pyraft-metrics-<id>``.

    ``source()`` returns the node's :class:`RaftMetrics`; ``extra()`` the
    extra gauges (called at each scrape).  Port 0 picks a free port
    (:attr:`port`).  OSError when the address cannot be bound.
    :meth:`close` stops the thread and frees the port.
    """

    def __init__(self, node_id: int, source: Callable[[], RaftMetrics], host: str = "127.0.0.1", port: int = 0,
                 *, cluster_name: str = "", extra: Callable[[], Iterable[Gauge]] | None = None) -> None:
        self._render = lambda: exposition(source(), cluster_name=cluster_name,  # noqa: E731
                                          extra=extra() if extra is not None else ())
        self._node_id = node_id
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(128)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop = False
        self._conns: dict[socket.socket, _Conn] = {}  # insertion order: oldest first
        self._thread = threading.Thread(target=self._serve, name=f"pyraft-metrics-{node_id}", daemon=True)
        self._thread.start()
        self._closed = False
        self._lock = threading.Lock()  # guards _closed

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop:
                timeout = None
                if self._conns:
                    first = next(iter(self._conns.values()))  # the oldest has the nearest deadline
                    timeout = max(0.0, first.deadline - time.monotonic())
                for key, _events in sel.select(timeout):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept(sel)
                    elif sock is self._wake_r:
                        try:
                            self._wake_r.recv(64)
                        except OSError:
                            pass
                    elif sock in self._conns:
                        self._step(sel, self._conns[sock])
                now = time.monotonic()
                while self._conns:
                    first = next(iter(self._conns.values()))
                    if first.deadline > now:
                        break
                    self._drop(sel, first)
        except Exception:  # noqa: BLE001 - the endpoint's failure is logged, never the node's
            log.exception("node %s: the metrics endpoint stopped", self._node_id)
        finally:
            for c in list(self._conns.values()):
                self._drop(sel, c)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(_MAX_CONNECTIONS):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, a reset before accept: try again later
                log.warning("node %s: metrics endpoint cannot accept: %s", self._node_id, e)
                return
            if len(self._conns) >= _MAX_CONNECTIONS:
                self._drop(sel, next(iter(self._conns.values())))
            sock.setblocking(False)
            c = _Conn(sock, time.monotonic() + _REQUEST_TIMEOUT)
            self._conns[sock] = c
            sel.register(sock, selectors.EVENT_READ)

    def _step(self, sel: selectors.BaseSelector, c: _Conn) -> None:
        try:
            if c.draining:
                if not c.sock.recv(_MAX_REQUEST_BYTES):
                    self._drop(sel, c)
                return
            if c.out is None:
                data = c.sock.recv(_MAX_REQUEST_BYTES)
                if not data:
                    self._drop(sel, c)
                    return
                c.inbuf += data
                end = c.inbuf.find(b"\r\n\r\n")
                if end < 0:
                    end = c.inbuf.find(b"\n\n")
                if end < 0 and len(c.inbuf) < _MAX_REQUEST_BYTES:
                    return
                if end < 0 or end > _MAX_REQUEST_BYTES:
                    reply = _reply(431, b"request headers too large\n")
                else:
                    reply = _answer(bytes(c.inbuf[:end]), self._render, self._node_id)
                c.inbuf = bytearray()
                c.out = memoryview(reply)
                sel.modify(c.sock, selectors.EVENT_WRITE)
            sent = c.sock.send(c.out)
            c.out = c.out[sent:]
            if not c.out:
                c.sock.shutdown(socket.SHUT_WR)
                c.draining = True
                sel.modify(c.sock, selectors.EVENT_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sel, c)

    def _drop(self, sel: selectors.BaseSelector, c: _Conn) -> None:
        self._conns.pop(c.sock, None)
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port.  Idempotent; from any thread but the server's own."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
