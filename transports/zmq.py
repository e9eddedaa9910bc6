"""The ZeroMQ transport: DEALER connections to one ROUTER per node, optionally CURVE-secured.

Server side (:class:`ZmqTransport`)::

    peers' DEALERs ──tcp──► ROUTER ──pyraft-zmq-server-<id> thread──► handler(from_id, msg, reply)
                              ▲                                             │ reply.reply(m), any thread
                              └──── send ◄── outbox deque ◄── wake-up byte ◄┘

- The ROUTER is created and bound in the constructor, on the constructing
  thread, so a busy or invalid address fails at once with
  :class:`TransportError`.  ``start()`` then hands the socket to the server
  thread (a ZeroMQ socket may migrate between threads across a full memory
  barrier; ``Thread.start`` is one).  From then on only the server thread
  touches it.
- Replies may be sent from any thread, but a ZeroMQ socket (also an inproc
  PUSH) must stay with one thread.  So ``reply()`` encodes on the caller's
  thread, appends ``(routing id, bytes)`` to a ``collections.deque`` (atomic
  appends) and wakes the server thread by writing one byte to a
  ``socket.socketpair`` whose read end the server thread polls next to the
  ROUTER (``zmq.Poller`` takes plain file descriptors).  No ZeroMQ socket is
  ever used by two threads, and nothing is created per calling thread.
- Every incoming frame is size-checked (``MAXMSGSIZE`` on the socket too: a
  peer that sends more is disconnected by libzmq), decoded with
  :func:`pyraft.codec.decode_message` against the cluster name, and checked to
  be a request.  Anything else is dropped, counted in :attr:`ZmqTransport.stats`
  by reason, and logged (rate-limited) on the ``pyraft.transport`` logger.
- Replies go out with ``ROUTER_MANDATORY``: a reply to a peer that has gone
  (or whose queue is full) raises in libzmq; it is dropped and counted.

Client side (:class:`ZmqConnection`, made by ``transport.connect``): one
DEALER per call, owned by the calling thread, with bounded ``SNDHWM`` /
``RCVHWM``, ``IMMEDIATE=1`` (messages are only queued on a live connection, so
a dead peer costs no memory and ``send`` never blocks: it drops), reconnect
back-off, ZMTP heartbeats, ``LINGER=0``, and libzmq's own random routing
identity (no identity is set, so nothing needs to be unique across
reconnects).  Until the very first connection is up, a few messages (at most
:data:`CONNECT_BUFFER` of them, at most ``max_frame_size`` bytes) are held in
the connection and flushed by the next ``send``/``recv`` once it is writable:
otherwise the first request on a fresh connection (a vote, the first
heartbeat) would always be lost to the TCP handshake.

CURVE (:class:`CurveConfig`): every endpoint has a keypair in zmq.auth
certificate files (:func:`generate_keys`).  Key layout::

    keys/                      allowed_keys_dir: public halves only
        1.key  2.key  3.key    node N's public key is <allowed_keys_dir>/N.key
        admin.key  client.key  any other name: clients allowed to connect
    private/1.key_secret       node 1's secret file, only on node 1

A server accepts a client only when the client's public key is one of the
allowed keys (the ``*.key`` files in ``allowed_keys_dir``, re-read when files
are added or removed, or the files listed in ``allowed_key_files``); this is
enforced by a ZAP handler (:class:`zmq.auth.thread.ThreadAuthenticator`, one
per ``zmq.Context``, shared by all transports of the process, each using its
own ZAP domain).  A client learns the server key of node ``N`` from
``Node.data["curve_public_key"]`` (a Z85 string) when the node carries one,
else from the file ``N.key`` in ``allowed_keys_dir`` (or the file so named in
``allowed_key_files``).  :class:`ZmqClient` takes the server key explicitly.
Note: CURVE authenticates keys, not node ids: an allowed key may claim any
``from_id`` in its frames.

Fault injection (tests only, in-process only, never reachable from the
network): ``transport.set_fault_filter(f)`` with ``f(direction, peer_id,
message) -> bool``; True drops the message.  ``direction`` is ``"send"``
(a request leaving one of this transport's connections; peer = target id),
``"recv"`` (a reply arriving on one of them; peer = target id), ``"request"``
(a request arriving at the ROUTER; peer = sender id) or ``"reply"`` (a reply
leaving; peer = requester id).  It is called from the threads that do the
work, so it must be thread-safe and must not block.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import zmq
import zmq.auth
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from pyraft.codec import ClientRequest, decode_message, encode_message
from pyraft.errors import CodecError, RaftError, Timeout
from pyraft.messages import AppendEntriesRequest, InstallSnapshotRequest, TimeoutNowRequest, VoteRequest
from pyraft.network import RequestHandler
from pyraft.types import Node

__all__ = [
    "ZmqTransport", "ZmqConnection", "ZmqClient", "TransportError", "CurveConfig", "generate_keys",
    "FaultFilter", "DEFAULT_MAX_FRAME_SIZE", "CONNECT_BUFFER",
]

log = logging.getLogger("pyraft.transport")

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
#: Messages a connection holds while its first connection is being set up.
CONNECT_BUFFER = 64

#: ``f(direction, peer_id, message) -> bool``: True drops the message.
FaultFilter = Callable[[str, int, Any], bool]

_REQUEST_TYPES = (AppendEntriesRequest, VoteRequest, InstallSnapshotRequest, TimeoutNowRequest, ClientRequest)
_RECV_BATCH = 256  # frames taken off the ROUTER per poll, before replies are flushed


class TransportError(RaftError):
    """The transport cannot do what was asked: an address cannot be bound or used, a key is missing."""


# ---------------------------------------------------------------------------
# Small helpers

class _Stats:
    """Thread-safe counters (incremented from the server, connection and replying threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _c
        self._c: Counter[str] = Counter()

    def inc(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def drop(self, reason: str) -> None:
        with self._lock:
            self._c["frames_dropped"] += 1
            self._c["dropped_" + reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


class _RateLimitedLog:
    """Logs at most one line per key per ``interval`` seconds, then says how many were suppressed."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()  # guards _last and _suppressed
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def log(self, level: int, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] += 1
                return
            self._last[key] = now
            n = self._suppressed.pop(key, 0)
        if n:
            msg += " (%d similar messages suppressed)"
            args = args + (n,)
        log.log(level, msg, *args)


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000 + 0.999))


# ---------------------------------------------------------------------------
# CURVE

def _z85(key: bytes | str) -> bytes:
    k = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(k) != 40:
        raise TransportError(f"a CURVE key in Z85 is 40 characters, got {len(k)}")
    return k


def _load_public(path: str | os.PathLike) -> bytes:
    try:
        pub, _ = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as e:
        raise TransportError(f"cannot read CURVE key file {os.fspath(path)!r}: {e}") from None
    if pub is None:
        raise TransportError(f"no public key in {os.fspath(path)!r}")
    return pub


def generate_keys(directory: str | os.PathLike, name: str, *, overwrite: bool = False) -> tuple[str, str]:
    """Create a CURVE keypair as zmq.auth certificate files ``<name>.key`` and ``<name>.key_secret``.

    Returns ``(public_path, secret_path)``.  The secret file is made readable
    by its owner only.  Raises :class:`TransportError` if the files exist and
    ``overwrite`` is false.
    """
    directory = os.fspath(directory)
    pub_path = os.path.join(directory, f"{name}.key")
    sec_path = os.path.join(directory, f"{name}.key_secret")
    if not overwrite and (os.path.exists(pub_path) or os.path.exists(sec_path)):
        raise TransportError(f"key files for {name!r} already exist in {directory!r}")
    try:
        os.makedirs(directory, exist_ok=True)
        pub, sec = zmq.auth.create_certificates(directory, name)
        os.chmod(sec, 0o600)
    except OSError as e:
        raise TransportError(f"cannot write keys for {name!r} in {directory!r}: {e}") from None
    return os.fspath(pub), os.fspath(sec)


@dataclass(frozen=True)
class CurveConfig:
    """This endpoint's CURVE identity and whom it lets in.

    - ``secret_key_file``: this endpoint's ``*.key_secret`` file (it holds
      both halves of the keypair).
    - ``public_key_file``: optional; checked to match the secret file.
    - ``allowed_keys_dir``: a directory of public ``*.key`` files: the clients
      (nodes, admin tools, KV clients) a server accepts; also where a client
      finds node N's server key, as ``N.key``.
    - ``allowed_key_files``: public key files, instead of or besides the directory.

    A client-only user (``ZmqClient``) needs only ``secret_key_file``.
    """

    secret_key_file: str | os.PathLike
    public_key_file: str | os.PathLike | None = None
    allowed_keys_dir: str | os.PathLike | None = None
    allowed_key_files: Sequence[str | os.PathLike] = field(default_factory=tuple)

    def keypair(self) -> tuple[bytes, bytes]:
        """``(public, secret)`` in Z85."""
        path = os.fspath(self.secret_key_file)
        try:
            pub, sec = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise TransportError(f"cannot read CURVE secret key file {path!r}: {e}") from None
        if sec is None:
            raise TransportError(f"{path!r} holds no secret key (give the .key_secret file)")
        if self.public_key_file is not None and _load_public(self.public_key_file) != pub:
            raise TransportError(f"{os.fspath(self.public_key_file)!r} does not match {path!r}")
        return pub, sec

    def allowed_keys(self) -> set[bytes]:
        """The Z85 public keys allowed to connect (read now)."""
        keys = {_load_public(p) for p in self.allowed_key_files}
        if self.allowed_keys_dir is not None:
            d = os.fspath(self.allowed_keys_dir)
            try:
                names = sorted(os.listdir(d))
            except OSError as e:
                raise TransportError(f"cannot read allowed keys directory {d!r}: {e}") from None
            for n in names:
                if n.endswith(".key"):
                    keys.add(_load_public(os.path.join(d, n)))
        return keys

    def server_key_for(self, node_id: int, node: Node | None = None) -> bytes:
        """Node ``node_id``'s public key: ``node.data["curve_public_key"]``, else ``<node_id>.key``."""
        if node is not None and node.data and node.data.get("curve_public_key"):
            return _z85(node.data["curve_public_key"])
        name = f"{node_id}.key"
        for p in self.allowed_key_files:
            if os.path.basename(os.fspath(p)) == name:
                return _load_public(p)
        if self.allowed_keys_dir is not None:
            path = os.path.join(os.fspath(self.allowed_keys_dir), name)
            if os.path.exists(path):
                return _load_public(path)
        raise TransportError(
            f"no CURVE public key for node {node_id}: put {name} in the allowed keys directory "
            f"or 'curve_public_key' in its Node.data")


class _AllowList:
    """The ZAP credentials provider of one transport (called on the ZAP thread)."""

    def __init__(self, curve: CurveConfig, stats: _Stats, rlog: _RateLimitedLog, node_id: int):
        self._curve = curve
        self._stats = stats
        self._rlog = rlog
        self._node_id = node_id
        self._lock = threading.Lock()  # guards _keys and _stamp
        self._keys = curve.allowed_keys()
        self._stamp = self._dir_stamp()

    def _dir_stamp(self) -> int | None:
        if self._curve.allowed_keys_dir is None:
            return None
        try:
            return os.stat(self._curve.allowed_keys_dir).st_mtime_ns
        except OSError:
            return None

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            stamp = self._dir_stamp()
            if stamp != self._stamp:
                try:
                    self._keys = self._curve.allowed_keys()
                    self._stamp = stamp
                except TransportError as e:
                    self._rlog.log(logging.WARNING, "keys", "node %s: cannot reload allowed keys: %s",
                                   self._node_id, e)
            ok = key in self._keys
        if not ok:
            self._stats.inc("auth_rejected")
            self._rlog.log(logging.WARNING, "auth", "node %s: rejected a CURVE client with unknown key %s",
                           self._node_id, key.decode("ascii", "replace"))
        return ok


class _Zap:
    """One ThreadAuthenticator per zmq.Context, shared by the transports using it (one ZAP domain each)."""

    _lock = threading.Lock()  # guards _by_ctx and every authenticator's start/stop/configure
    _by_ctx: dict[int, tuple[zmq.Context, ThreadAuthenticator, set[str]]] = {}

    @classmethod
    def acquire(cls, ctx: zmq.Context, domain: str, provider: _AllowList) -> None:
        with cls._lock:
            entry = cls._by_ctx.get(id(ctx))
            if entry is None:
                auth = cls._start(ctx)
                if auth.thread is not None:
                    auth.thread.name = "pyraft-zap"
                entry = (ctx, auth, set())
                cls._by_ctx[id(ctx)] = entry
            _, auth, domains = entry
            auth.configure_curve_callback(domain, provider)
            domains.add(domain)

    @staticmethod
    def _start(ctx: zmq.Context) -> ThreadAuthenticator:
        # libzmq releases an inproc endpoint asynchronously when its socket closes, so
        # right after the previous authenticator of this context stopped, binding the
        # ZAP endpoint may still fail with EADDRINUSE for a moment: retry briefly.
        deadline = time.monotonic() + 2.0
        while True:
            auth = ThreadAuthenticator(ctx, log=logging.getLogger("pyraft.transport.zap"))
            try:
                auth.start()
                return auth
            except zmq.ZMQError as e:
                auth.stop()
                if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise TransportError(
                        f"cannot start the ZAP handler (is another one bound in this zmq.Context?): {e}"
                    ) from None
                time.sleep(0.01)

    @classmethod
    def release(cls, ctx: zmq.Context, domain: str) -> None:
        with cls._lock:
            entry = cls._by_ctx.get(id(ctx))
            if entry is None:
                return
            _, auth, domains = entry
            domains.discard(domain)
            auth.credentials_providers.pop(domain, None)
            if not domains:
                del cls._by_ctx[id(ctx)]
                auth.stop()


def _set_common(sock: zmq.Socket, *, hwm: int, max_frame_size: int, heartbeat: float, addr: str) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_size)
    if heartbeat > 0:
        sock.setsockopt(zmq.HEARTBEAT_IVL, _ms(heartbeat))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ms(heartbeat * 3))
        sock.setsockopt(zmq.HEARTBEAT_TTL, _ms(heartbeat * 3))
    if "[" in addr:
        sock.setsockopt(zmq.IPV6, 1)


# ---------------------------------------------------------------------------
# The transport

def check_address(addr: str) -> None:
    """Raise ValueError unless ``addr`` is an address a ZeroMQ DEALER can connect to.

    ``tcp://HOST:PORT`` (HOST a DNS name, an IPv4 address or ``[IPv6]``, PORT
    1-65535), ``ipc://PATH`` or ``inproc://NAME``.  Stricter than libzmq's own
    parsing, so that an address accepted here never makes ``connect`` fail:
    ``Raft.add_learner`` and ``initialize`` check a node's address with it
    before it goes into the log.  Whether the host resolves or listens is not
    checked (that may change; the replication worker retries).
    """
    import ipaddress
    import re

    if type(addr) is not str:
        raise TypeError(f"a ZeroMQ address is a str, got {type(addr).__name__}")
    scheme, sep, rest = addr.partition("://")
    if not sep or not rest or "\x00" in rest or len(addr) > 1024:
        raise ValueError(f"bad ZeroMQ address {addr!r:.80}: expected tcp://HOST:PORT")
    if scheme in ("ipc", "inproc"):
        return
    if scheme != "tcp":
        raise ValueError(f"bad ZeroMQ address {addr!r:.80}: the transport is tcp://, ipc:// or inproc://")
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"bad ZeroMQ address {addr!r:.80}: expected tcp://HOST:PORT with PORT in 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"bad ZeroMQ address {addr!r:.80}: {host} is not an IPv6 address") from None
        return
    label = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    if len(host) > 253 or not re.fullmatch(rf"{label}(?:\.{label})*\.?", host):
        raise ValueError(f"bad ZeroMQ address {addr!r:.80}: {host!r:.60} is not a host name or IP address")


class ZmqTransport:
    """A node's ZeroMQ endpoint: a ROUTER serving ``listen`` and DEALER connections to peers.

    - ``listen``: the ROUTER's address, bound in the constructor (a busy or bad
      address raises :class:`TransportError` naming it).  ``None`` makes a
      client-only transport.  ``"tcp://127.0.0.1:*"`` picks a free port; the
      bound address is :attr:`endpoint`.
    - ``cluster_name``: carried by every frame; frames of another cluster are dropped.
    - ``context``: default ``zmq.Context.instance()`` (one per process); never terminated here.
    - ``curve``: a :class:`CurveConfig` to encrypt and authenticate (server and connections).
    - ``max_frame_size``: bytes; larger frames are refused by the sender and
      dropped (libzmq ``MAXMSGSIZE``: the peer is disconnected) by the receiver.
    - ``hwm``: frames queued per socket and direction, at most (libzmq may
      refuse a write somewhat earlier); beyond it sends and replies drop.
    - ``reconnect_ivl``/``reconnect_ivl_max``: DEALER reconnect back-off, seconds.
    - ``heartbeat``: ZMTP heartbeat interval, seconds (a peer silent for 3
      intervals is disconnected); 0 disables.

    Threads: ``pyraft-zmq-server-<node_id>`` while started, and with CURVE one
    ``pyraft-zap`` per context while any CURVE transport is open.
    """

    def __init__(self, node_id: int, listen: str | None = "tcp://0.0.0.0:7001", *,
                 cluster_name: str = "pyraft", context: zmq.Context | None = None,
                 curve: CurveConfig | None = None, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 hwm: int = 1000, reconnect_ivl: float = 0.1, reconnect_ivl_max: float = 2.0,
                 heartbeat: float = 1.0):
        if type(node_id) is not int or node_id < 0:
            raise ValueError(f"node_id must be a non-negative int, got {node_id!r}")
        if max_frame_size <= 0 or hwm <= 0:
            raise ValueError("max_frame_size and hwm must be positive")
        self.node_id = node_id
        self.listen = listen
        self.cluster_name = cluster_name
        self.curve = curve
        self.max_frame_size = max_frame_size
        self.hwm = hwm
        self.reconnect_ivl = reconnect_ivl
        self.reconnect_ivl_max = reconnect_ivl_max
        self.heartbeat = heartbeat
        self._ctx = context or zmq.Context.instance()
        self._stats = _Stats()
        self._rlog = _RateLimitedLog()
        self._keypair = curve.keypair() if curve is not None else None
        self._fault_filter: FaultFilter | None = None
        self._handler: RequestHandler | None = None
        self._thread: threading.Thread | None = None
        self._close_lock = threading.Lock()  # guards _closed transitions and start()
        self._closed = False
        self._stopping = False
        # Replies from any thread: (routing id, frame) appended here, then a wake-up byte.
        self._outbox: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._wake_pending = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._router: zmq.Socket | None = None
        self._zap_domain: str | None = None
        self.endpoint: str | None = None
        if listen is not None:
            try:
                self._bind(listen)
            except BaseException:
                self._release_resources()
                raise

    def _bind(self, listen: str) -> None:
        if self.curve is not None:
            self._zap_domain = f"pyraft-{self.node_id}-{id(self):x}"
            _Zap.acquire(self._ctx, self._zap_domain, _AllowList(self.curve, self._stats, self._rlog, self.node_id))
        r = self._ctx.socket(zmq.ROUTER)
        try:
            _set_common(r, hwm=self.hwm, max_frame_size=self.max_frame_size, heartbeat=self.heartbeat, addr=listen)
            r.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if self._keypair is not None:
                r.setsockopt(zmq.ZAP_DOMAIN, self._zap_domain.encode())
                r.setsockopt(zmq.CURVE_SERVER, 1)
                r.setsockopt(zmq.CURVE_SECRETKEY, self._keypair[1])
            r.bind(listen)
        except zmq.ZMQError as e:
            r.close(0)
            raise TransportError(f"node {self.node_id} cannot listen on {listen}: {e.strerror}") from None
        self._router = r
        self.endpoint = r.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------ Transport

    #: the address check ``Raft`` applies to a node before it goes into the log
    check_address = staticmethod(check_address)

    def start(self, handler: RequestHandler) -> None:
        """Start the server thread; every valid incoming request goes to ``handler``."""
        with self._close_lock:
            if self._closed:
                raise TransportError(f"transport of node {self.node_id} is closed")
            if self._handler is not None:
                raise TransportError(f"transport of node {self.node_id} is already started")
            self._handler = handler
            if self._router is not None:
                self._thread = threading.Thread(target=self._serve, name=f"pyraft-zmq-server-{self.node_id}",
                                                daemon=True)
                self._thread.start()

    def connect(self, target_id: int, node: Node) -> "ZmqConnection":
        """A DEALER connection to ``node.addr``, owned by the calling thread."""
        if self._closed:
            raise TransportError(f"transport of node {self.node_id} is closed")
        server_key = self.curve.server_key_for(target_id, node) if self.curve is not None else None
        return ZmqConnection(self, target_id, node.addr, server_key)

    def close(self) -> None:
        """Stop the server thread and close its sockets.  Idempotent.

        Connections made by :meth:`connect` belong to their threads: each
        closes its own DEALER on its next use (``send`` then drops, ``recv``
        returns None), or when its owner calls ``close()``.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            th = self._thread
        if th is not None:
            self._wake()
            if th is not threading.current_thread():
                th.join(10.0)
                if th.is_alive():
                    log.error("node %s: transport server thread did not stop", self.node_id)
            return  # the server thread releases its resources on its way out
        self._release_resources()

    def _release_resources(self) -> None:
        if self._router is not None:
            self._close_router(self._router)
            self._router = None
        if self._zap_domain is not None:
            _Zap.release(self._ctx, self._zap_domain)
            self._zap_domain = None
        self._wake_r.close()
        self._wake_w.close()

    def _close_router(self, r: zmq.Socket) -> None:
        """Close the ROUTER and wait (up to 1 s) until its port is really free.

        ``zmq_close`` is asynchronous: without the wait, a node restarted in the
        same process could find its own port still bound.
        """
        mon = None
        try:
            mon = r.get_monitor_socket(zmq.EVENT_CLOSED)
            r.unbind(self.endpoint)
            deadline = time.monotonic() + 1.0
            while mon.poll(_ms(deadline - time.monotonic())):
                if zmq.utils.monitor.recv_monitor_message(mon)["event"] == zmq.EVENT_CLOSED:
                    break
        except zmq.ZMQError as e:
            log.debug("node %s: unbinding %s: %s", self.node_id, self.endpoint, e)
        finally:
            if mon is not None:
                try:
                    r.disable_monitor()
                except zmq.ZMQError:
                    pass
                mon.close(0)
            r.close(0)

    def __enter__(self) -> "ZmqTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------- extras

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``frames_in``, ``requests_in``, ``replies_out``, ``replies_dropped``,
        ``frames_dropped`` and ``dropped_<reason>`` (``envelope``, ``oversize``,
        ``decode``, ``not_request``, ``not_reply``, ``fault_filter``), ``sends``,
        ``sends_dropped``, ``replies_in``, ``handler_errors``, ``auth_rejected``."""
        return self._stats.snapshot()

    @property
    def public_key(self) -> bytes | None:
        """This node's CURVE public key (Z85), or None without CURVE."""
        return self._keypair[0] if self._keypair is not None else None

    def set_fault_filter(self, f: FaultFilter | None) -> None:
        """Install ``f(direction, peer_id, message) -> bool`` (True drops), or None.  Tests only."""
        self._fault_filter = f

    def _filtered(self, direction: str, peer: int, message: Any) -> bool:
        f = self._fault_filter
        return f is not None and bool(f(direction, peer, message))

    def __repr__(self) -> str:
        return f"ZmqTransport(node_id={self.node_id}, endpoint={self.endpoint!r}, closed={self._closed})"

    # ------------------------------------------------------- server thread

    def _wake(self) -> None:
        # Any thread.  The flag saves a syscall per reply; see _serve for why no wake-up is lost.
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the buffer is full (a wake-up is pending anyway) or we are closed
            pass

    def _serve(self) -> None:
        router = self._router
        assert router is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        try:
            while not self._stopping:
                events = dict(poller.poll(1000))
                if wake_fd in events:
                    # Read the wake-up bytes first, then clear the flag, then drain the
                    # outbox: a reply queued after the flag is cleared either is seen by
                    # the drain below or writes a new byte.  (Clearing the flag before
                    # reading could swallow the byte of a reply queued in between, leave
                    # the flag set with no byte pending, and stall every later reply
                    # until the 1 s poll timeout.)
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                    self._wake_pending = False
                if router in events:
                    for _ in range(_RECV_BATCH):
                        if self._stopping:  # a handler may close the transport
                            break
                        try:
                            parts = router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frame(parts)
                        if not router.get(zmq.EVENTS) & zmq.POLLIN:
                            break  # nothing more queued: no recv that fails (an exception costs)
                self._flush_replies(router)
        except Exception:
            log.exception("node %s: transport server thread failed", self.node_id)
        finally:
            self._stopping = True
            self._release_resources()

    def _on_frame(self, parts: list[bytes]) -> None:
        st = self._stats
        st.inc("frames_in")
        if len(parts) != 2:
            st.drop("envelope")
            self._rlog.log(logging.WARNING, "envelope", "node %s: dropped a message of %d parts (expected 1 frame)",
                           self.node_id, len(parts) - 1)
            return
        routing_id, data = parts
        if len(data) > self.max_frame_size:
            st.drop("oversize")
            self._rlog.log(logging.WARNING, "oversize", "node %s: dropped a frame of %d bytes (max %d)",
                           self.node_id, len(data), self.max_frame_size)
            return
        try:
            frame = decode_message(data, self.cluster_name)
        except CodecError as e:
            st.drop("decode")
            self._rlog.log(logging.WARNING, "decode", "node %s: dropped an invalid frame: %s", self.node_id, e)
            return
        msg = frame.message
        if not isinstance(msg, _REQUEST_TYPES):
            st.drop("not_request")
            self._rlog.log(logging.WARNING, "not_request", "node %s: dropped a %s sent as a request",
                           self.node_id, type(msg).__name__)
            return
        if self._filtered("request", frame.from_id, msg):
            st.drop("fault_filter")
            return
        st.inc("requests_in")
        try:
            self._handler(frame.from_id, msg, _ZmqReply(self, routing_id, frame.from_id, frame.request_id))
        except Exception:
            st.inc("handler_errors")
            log.exception("node %s: request handler failed on %s", self.node_id, type(msg).__name__)

    def _flush_replies(self, router: zmq.Socket) -> None:
        out = self._outbox
        while out:
            routing_id, data = out.popleft()
            try:
                router.send_multipart([routing_id, data], zmq.NOBLOCK)
                self._stats.inc("replies_out")
            except zmq.ZMQError as e:  # EHOSTUNREACH: the peer is gone; EAGAIN: its queue is full
                self._stats.inc("replies_dropped")
                self._rlog.log(logging.INFO, "reply", "node %s: reply dropped: %s", self.node_id, e.strerror)

    def _queue_reply(self, routing_id: bytes, data: bytes) -> None:
        if self._stopping:
            self._stats.inc("replies_dropped")
            return
        self._outbox.append((routing_id, data))
        self._wake()


class _ZmqReply:
    """The reply handle of one request: remembers the routing id and the request id."""

    __slots__ = ("_t", "_routing_id", "_requester", "_request_id", "_used")

    def __init__(self, transport: ZmqTransport, routing_id: bytes, requester: int, request_id: int):
        self._t = transport
        self._routing_id = routing_id
        self._requester = requester
        self._request_id = request_id
        self._used = False

    def reply(self, message: Any) -> None:
        """Encode on the calling thread, queue for the server thread.  Never blocks, never raises."""
        t = self._t
        try:
            if self._used:
                t._rlog.log(logging.WARNING, "twice", "node %s: a second reply to request %s was ignored",
                            t.node_id, self._request_id)
                return
            self._used = True
            if t._filtered("reply", self._requester, message):
                t._stats.inc("replies_dropped")
                return
            data = encode_message(message, t.cluster_name, t.node_id, self._request_id)
        except Exception:
            t._stats.inc("replies_dropped")
            log.exception("node %s: cannot send a reply", t.node_id)
            return
        t._queue_reply(self._routing_id, data)


# ---------------------------------------------------------------------------
# Client side

def _dealer(ctx: zmq.Context, addr: str, *, hwm: int, max_frame_size: int, heartbeat: float,
            reconnect_ivl: float, reconnect_ivl_max: float,
            keypair: tuple[bytes, bytes] | None, server_key: bytes | None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    try:
        _set_common(s, hwm=hwm, max_frame_size=max_frame_size, heartbeat=heartbeat, addr=addr)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.RECONNECT_IVL, _ms(reconnect_ivl))
        s.setsockopt(zmq.RECONNECT_IVL_MAX, _ms(reconnect_ivl_max))
        if server_key is not None:
            if keypair is None:
                raise TransportError("a CURVE server key needs a client keypair")
            s.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            s.setsockopt(zmq.CURVE_PUBLICKEY, keypair[0])
            s.setsockopt(zmq.CURVE_SECRETKEY, keypair[1])
        s.connect(addr)
    except zmq.ZMQError as e:
        s.close(0)
        raise TransportError(f"cannot connect to {addr!r}: {e.strerror}") from None
    except BaseException:
        s.close(0)
        raise
    return s


class ZmqConnection:
    """A DEALER to one peer, used by exactly one thread (the one that called ``connect``).

    ``send`` never blocks: with ``IMMEDIATE`` a frame for a peer that is not
    connected, or whose queue is full, is dropped (counted in ``sends_dropped``).
    The one exception is a fresh connection whose first TCP (and CURVE)
    handshake is still running: up to :data:`CONNECT_BUFFER` frames are held and
    go out on the owner's next ``send`` or ``recv`` once the connection is up
    (a request/reply user always calls ``recv``; one that only sends should know).

    ``wake()`` may be called from any other thread: it writes a byte to a
    ``socket.socketpair`` that ``recv`` polls next to the DEALER (the DEALER
    itself is never touched by the waking thread).
    """

    def __init__(self, transport: ZmqTransport, target_id: int, addr: str, server_key: bytes | None):
        self._t = transport
        self.target_id = target_id
        self.addr = addr
        self._sock: zmq.Socket | None = _dealer(
            transport._ctx, addr, hwm=transport.hwm, max_frame_size=transport.max_frame_size,
            heartbeat=transport.heartbeat, reconnect_ivl=transport.reconnect_ivl,
            reconnect_ivl_max=transport.reconnect_ivl_max, keypair=transport._keypair, server_key=server_key)
        self._ids = itertools.count(1)
        # Until the first send goes through: frames waiting for the first connection.
        self._pending: collections.deque[bytes] | None = collections.deque()
        self._pending_bytes = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False  # set by wake() (any thread), cleared by recv (owner)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)

    def _usable(self) -> bool:
        if self._sock is None:
            return False
        if self._t._closed:
            self.close()
            return False
        return True

    def send(self, message: Any) -> int:
        """Queue ``message``; never blocks.  Dropped (silently, counted) when the peer is unreachable.

        Raises :class:`~pyraft.errors.CodecError` for a message the wire format cannot carry.
        """
        rid = next(self._ids)
        if not self._usable():
            return rid
        t = self._t
        if t._filtered("send", self.target_id, message):
            t._stats.inc("sends_dropped")
            return rid
        data = encode_message(message, t.cluster_name, t.node_id, rid)
        if len(data) > t.max_frame_size:
            t._stats.inc("sends_dropped")
            t._rlog.log(logging.ERROR, "send_oversize",
                        "node %s: a %s of %d bytes to node %s exceeds max_frame_size (%d); dropped",
                        t.node_id, type(message).__name__, len(data), self.target_id, t.max_frame_size)
            return rid
        t._stats.inc("sends")
        if self._pending is not None:
            self._flush_pending()
        if self._pending is not None:  # the first connection is not up yet: hold the frame
            if len(self._pending) < CONNECT_BUFFER and self._pending_bytes + len(data) <= t.max_frame_size:
                self._pending.append(data)
                self._pending_bytes += len(data)
            else:
                t._stats.inc("sends_dropped")
            return rid
        try:
            self._sock.send(data, zmq.NOBLOCK)
        except zmq.Again:  # not connected, or the peer's queue is full: the network lost it
            t._stats.inc("sends_dropped")
        return rid

    def _flush_pending(self) -> None:
        p = self._pending
        assert p is not None and self._sock is not None
        while p:
            try:
                self._sock.send(p[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            self._pending_bytes -= len(p.popleft())
        # Everything held went out; once the socket is writable, the first connection is up.
        if self._sock.poll(0, zmq.POLLOUT):
            self._pending = None
            self._poller.modify(self._sock, zmq.POLLIN)

    def recv(self, timeout: float) -> tuple[int, Any] | None:
        """The next reply ``(request_id, message)``; None after ``timeout`` seconds or at once after ``wake()``."""
        deadline = time.monotonic() + max(0.0, timeout)
        wake_fd = self._wake_r.fileno()
        while self._usable():
            if self._woken:
                self._clear_wake()
                return None
            self._poller.modify(self._sock, zmq.POLLIN | zmq.POLLOUT if self._pending else zmq.POLLIN)
            events = dict(self._poller.poll(_ms(deadline - time.monotonic())))
            if wake_fd in events:
                self._clear_wake()
                return None
            ev = events.get(self._sock, 0)
            if ev & zmq.POLLOUT and self._pending is not None:
                self._flush_pending()
            if ev & zmq.POLLIN:
                try:
                    parts = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                got = self._decode(parts)
                if got is not None:
                    return got
                continue
            if time.monotonic() >= deadline:
                return None
        return None

    def _clear_wake(self) -> None:
        self._woken = False
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def wake(self) -> None:
        """Make a ``recv`` in progress, or the next one, return None at once.  Callable from any thread."""
        if self._woken:
            return
        self._woken = True
        try:
            self._wake_w.send(b"\0")
        except OSError:  # buffer full (a wake-up is pending) or closed
            pass

    def _decode(self, parts: list[bytes]) -> tuple[int, Any] | None:
        t = self._t
        if len(parts) != 1:
            t._stats.drop("envelope")
            return None
        try:
            frame = decode_message(parts[0], t.cluster_name)
        except CodecError as e:
            t._stats.drop("decode")
            t._rlog.log(logging.WARNING, "reply_decode", "node %s: dropped an invalid reply from node %s: %s",
                        t.node_id, self.target_id, e)
            return None
        if isinstance(frame.message, _REQUEST_TYPES):
            t._stats.drop("not_reply")
            return None
        if t._filtered("recv", self.target_id, frame.message):
            t._stats.drop("fault_filter")
            return None
        t._stats.inc("replies_in")
        return frame.request_id, frame.message

    def close(self) -> None:
        """Close the DEALER (call from the owning thread).  Idempotent."""
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
            self._pending = None
            self._wake_r.close()
            self._wake_w.close()

    def __enter__(self) -> "ZmqConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ZmqClient:
    """A blocking request/reply helper for tools and clients: one DEALER, one thread.

    ``call(message, timeout)`` sends and waits for the reply with the same
    request id, discarding stale replies to earlier calls that timed out.
    With ``curve``, ``server_key`` (Z85 key, or a path to the server's public
    ``.key`` file) is required.
    """

    def __init__(self, addr: str, cluster_name: str = "pyraft", *, curve: CurveConfig | None = None,
                 server_key: bytes | str | os.PathLike | None = None, timeout: float = 5.0,
                 context: zmq.Context | None = None, client_id: int = 0,
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, hwm: int = 1000):
        self.addr = addr
        self.cluster_name = cluster_name
        self.timeout = timeout
        self.client_id = client_id
        skey = None
        keypair = None
        if curve is not None:
            if server_key is None:
                raise TransportError(f"CURVE client for {addr}: server_key is required")
            keypair = curve.keypair()
            if isinstance(server_key, (bytes, str)) and len(server_key) == 40 and not os.path.exists(server_key):
                skey = _z85(server_key)
            else:
                skey = _load_public(server_key)
        self._sock: zmq.Socket | None = _dealer(
            context or zmq.Context.instance(), addr, hwm=hwm, max_frame_size=max_frame_size, heartbeat=1.0,
            reconnect_ivl=0.1, reconnect_ivl_max=1.0, keypair=keypair, server_key=skey)
        self._ids = itertools.count(1)

    def call(self, message: Any, timeout: float | None = None) -> Any:
        """Send ``message`` and return the reply's message; :class:`~pyraft.errors.Timeout` when none comes in time."""
        if self._sock is None:
            raise TransportError("client is closed")
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        rid = next(self._ids)
        data = encode_message(message, self.cluster_name, self.client_id, rid)
        sock = self._sock
        while True:  # with IMMEDIATE, wait until the connection is up
            if sock.poll(_ms(deadline - time.monotonic()), zmq.POLLOUT):
                try:
                    sock.send(data, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    pass
            if time.monotonic() >= deadline:
                raise Timeout(f"no connection to {self.addr} within {timeout}s")
        while True:
            if sock.poll(_ms(deadline - time.monotonic()), zmq.POLLIN):
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if len(parts) != 1:
                    continue
                try:
                    frame = decode_message(parts[0], self.cluster_name)
                except CodecError as e:
                    log.warning("client: dropped an invalid reply from %s: %s", self.addr, e)
                    continue
                if frame.request_id == rid and not isinstance(frame.message, _REQUEST_TYPES):
                    return frame.message
                continue  # a stale reply to an earlier call
            if time.monotonic() >= deadline:
                raise Timeout(f"no reply from {self.addr} within {timeout}s")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> "ZmqClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
