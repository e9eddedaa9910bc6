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
methods 501.  One thread (``pyraft-metrics-<id>``) serves one request at a
time, each bounded by a socket timeout, so a slow scraper cannot pile up
threads.
"""
from __future__ import annotations

import http.server
import logging
import math
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from ._version import __version__
from .metrics import RaftMetrics
from .types import ServerState, log_index

__all__ = ["Gauge", "exposition", "MetricsServer", "CONTENT_TYPE", "parse_listen"]

log = logging.getLogger("pyraft.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds one scrape may take (reading the request, writing the reply).
_REQUEST_TIMEOUT = 5.0


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


class _HTTPServerV6(http.server.HTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``GET /metrics`` for one node on its own thread ``pyraft-metrics-<id>``.

    ``source()`` returns the node's :class:`RaftMetrics`; ``extra()`` the
    extra gauges (called at each scrape).  Port 0 picks a free port
    (:attr:`port`).  OSError when the address cannot be bound.
    :meth:`close` stops the thread and frees the port.
    """

    def __init__(self, node_id: int, source: Callable[[], RaftMetrics], host: str = "127.0.0.1", port: int = 0,
                 *, cluster_name: str = "", extra: Callable[[], Iterable[Gauge]] | None = None) -> None:
        render = lambda: exposition(source(), cluster_name=cluster_name,  # noqa: E731
                                    extra=extra() if extra is not None else ())

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = _REQUEST_TIMEOUT
            server_version = f"pyraft/{__version__}"

            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render().encode("utf-8")
                except Exception as e:  # noqa: BLE001 - a scrape never takes the node down
                    log.exception("node %s: rendering the metrics failed", node_id)
                    self.send_error(500, f"{type(e).__name__}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("node %s: metrics %s: " + fmt, node_id, self.address_string(), *args)

        server_cls = _HTTPServerV6 if ":" in host else http.server.HTTPServer
        self._server = server_cls((host, port), Handler)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"pyraft-metrics-{node_id}", daemon=True)
        self._thread.start()
        self._closed = False
        self._lock = threading.Lock()  # guards _closed

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
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
