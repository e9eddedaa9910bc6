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
  peer that sends more is disconnected by libzmq); its envelope is read with
  :func:`pyraft.codec.decode_envelope` (cluster name, version, sender, tag)
  and the sender's right to send it checked before its body is decoded,
  within the codec's container budget.  Anything else is dropped, counted in
  :attr:`ZmqTransport.stats` by reason, and logged (rate-limited) on the
  ``pyraft.transport`` logger.  Nothing a frame holds can stop the server
  thread; if libzmq fails it, ``start(handler, on_failure)`` tells the owner.
- Receive queues are bounded in bytes: the ``RCVHWM`` of the ROUTER and of
  the node's connections is ``recv_queue_bytes // max_frame_size`` (libzmq
  counts messages).
- Send queues too: the ROUTER's ``SNDHWM`` is ``send_queue_bytes //
  max_frame_size``, at least 64, and a reply that finds its connection's
  queue full waits, in order, in that connection's backlog (at most
  ``send_queue_bytes``), retried by the server thread as libzmq makes room:
  a burst of small replies is delayed, never dropped; a client that never
  reads costs at most ``SNDHWM`` replies in libzmq plus ``send_queue_bytes``
  (with the KV service's replies of at most 4 MiB: 320 MiB; it was 1000
  replies, 4 GiB).
- A connection may have ``max_client_requests_per_connection`` client
  requests in flight (handed to the handler, reply not yet queued); past it
  a request is answered ``Overloaded`` before its body is decoded.  Raft
  RPCs are not counted.  ``reply.connection`` names the connection.
- Replies go out with ``ROUTER_MANDATORY``: a reply to a peer that has gone
  raises in libzmq; it is dropped and counted.

Client side (:class:`ZmqConnection`, made by ``transport.connect``): one
DEALER per call, owned by the calling thread, with bounded ``SNDHWM`` /
``RCVHWM``, ``IMMEDIATE=1`` (messages are only queued on a live connection, so
a dead peer costs no memory and ``send`` never blocks: it drops), reconnect
back-off, a TCP user timeout, ``LINGER=0``, and libzmq's own random routing
identity (no identity is set, so nothing needs to be unique across
reconnects).  Until the very first connection is up, a few messages (at most
:data:`CONNECT_BUFFER` of them, at most ``max_frame_size`` bytes) are held in
the connection and flushed by the next ``send``/``recv`` once it is writable:
otherwise the first request on a fresh connection (a vote, the first
heartbeat) would always be lost to the TCP handshake.

No socket sends ZMTP heartbeats.  libzmq 4.3.5 aborts the whole process
(``Assertion failed: !_io_error (src/stream_engine_base.cpp:310)``) when a
heartbeat timer fires on a connection whose peer hung up while its receive
queue was full, which a peer's crash at the wrong moment (or a server
answering faster than its client reads, then closing) arranges.  A dead
peer is found by the kernel instead: every DEALER sets ``ZMQ_TCP_MAXRT``
(``TCP_USER_TIMEOUT`` on Linux), so a connection whose data the peer's host
has not acknowledged for ``peer_timeout`` seconds fails, and libzmq
reconnects.  That depends only on the peer's kernel, never on how fast its
Python code answers.  (libzmq also answers a received PING on the same path:
a peer that sends PINGs itself can still abort a process through that bug;
see docs/security.md.)

CURVE (:class:`CurveConfig`): every endpoint has a keypair in zmq.auth
certificate files (:func:`generate_keys`).  Key layout, with roles::

    keys/                      allowed_keys_dir: public halves only
        peers/1.key 2.key ...  node N's key: Raft RPCs as node N, client rights;
                               clients find node N's server key here
        admins/ops.key         admin: client rights plus admin operations
        clients/app.key        client: read and write data
        readers/dash.key       reader: KV reads, status, metrics
    private/1.key_secret       node 1's secret file, only on node 1

(The old flat layout, ``keys/N.key`` for node N and any other ``keys/*.key``
for a client, still loads with a warning.)  A server accepts a connection
only when the client's public key is one of the allowed keys (the ``*.key``
files of ``allowed_keys_dir`` and its role directories, re-read when files
are added or removed, or the files listed in ``allowed_key_files``); this is
enforced by a ZAP handler (:class:`zmq.auth.thread.ThreadAuthenticator`, one
per ``zmq.Context``, shared by all transports of the process, each using its
own ZAP domain).  libzmq stamps every frame with the key its connection
authenticated as (the ZAP User-Id, the Z85 key), which gives the request's
:class:`~pyraft.network.Principal`: a Raft RPC passes only from node N's key
claiming to be node N, and a client op only with the role it needs (checked
by the :class:`~pyraft.Raft` handle).  A client learns the server key of
node ``N`` from ``Node.data["curve_public_key"]`` (a Z85 string) when the
node carries one, else from ``peers/N.key`` (or the flat ``N.key``) in
``allowed_keys_dir``, or the file so named in ``allowed_key_files``.
:class:`ZmqClient` takes the server key explicitly.

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
import contextlib
import ipaddress
import itertools
import logging
import os
import socket
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import zmq
import zmq.auth
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from pyraft.codec import (RAFT_REQUEST_TAGS, REQUEST_TAGS, ClientRequest, ClientResponse, decode_body,
                          decode_envelope, decode_message, encode_message)
from pyraft.errors import CodecError, Overloaded, RaftError, RequestTooLarge, Timeout
from pyraft.messages import AppendEntriesRequest, InstallSnapshotRequest, TimeoutNowRequest, VoteRequest
from pyraft.network import TRUSTED, FailureHandler, Principal, RequestHandler, raft_sender_refusal
from pyraft.types import Node

__all__ = [
    "ZmqTransport", "ZmqConnection", "ZmqClient", "TransportError", "CurveConfig", "generate_keys",
    "FaultFilter", "DEFAULT_MAX_FRAME_SIZE", "DEFAULT_MAX_CLIENT_FRAME_SIZE", "DEFAULT_RECV_QUEUE_BYTES",
    "DEFAULT_SEND_QUEUE_BYTES", "DEFAULT_MAX_CLIENT_REQUESTS_PER_CONNECTION",
    "DEFAULT_LISTEN", "CONNECT_BUFFER", "ROLE_DIRS", "is_loopback", "default_context", "ZmqChannel",
]

log = logging.getLogger("pyraft.transport")

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
#: A client request's frame, at most (etcd's --max-request-bytes is 1.5 MiB too): a
#: client's value costs up to ~30 times its size once decoded, a peer's log entries
#: come only from nodes.
DEFAULT_MAX_CLIENT_FRAME_SIZE = 3 * 512 * 1024
#: Bytes one connection may have waiting in the ROUTER's receive queue, at most;
#: libzmq counts messages, so RCVHWM = this // max_frame_size (at least 1).
DEFAULT_RECV_QUEUE_BYTES = 64 * 1024 * 1024
#: Bytes of replies one connection may have waiting to be sent, in libzmq's queue and again
#: in the transport's backlog behind it: SNDHWM = this // max_frame_size (at least
#: _MIN_SEND_HWM).  A client that sends requests and never reads its replies parks at most
#: SNDHWM replies and this many bytes more in the node, instead of 1000 x a 4 MiB range reply.
DEFAULT_SEND_QUEUE_BYTES = 64 * 1024 * 1024
#: The ROUTER's SNDHWM, at least: how many replies go to libzmq at once before the rest of a
#: burst waits in the backlog (never dropped for that: see _flush_replies).  libzmq's I/O
#: thread drains its queue more slowly than a burst fills it: with 8, a fifth of the
#: replies to 64 client threads waited in the backlog and an echo server answered 25 % fewer
#: calls; with 64, about a tenth waited, and the difference was within the benchmark's noise.
_MIN_SEND_HWM = 64
#: Client requests one connection may have in flight (handed to the handler, not yet
#: answered), by default.  KVClient keeps one per calling thread on its one connection
#: per node (plus the odd attempt it gave up on), so only a client of hundreds of
#: threads comes near it; past it a request is answered Overloaded at once.
DEFAULT_MAX_CLIENT_REQUESTS_PER_CONNECTION = 1024
#: How long the server thread waits before it retries a backlog: at least the shortest, doubling
#: up to the longest while nothing moves.
_BACKLOG_RETRY_MIN = 0.001
_BACKLOG_RETRY_MAX = 0.1
#: All the backlogs of a node together hold at most this many times send_queue_bytes: many
#: connections that never read cost the node a bounded amount, not one backlog each.
_BACKLOG_NODE_SHARE = 4
#: Loopback: a node listens on other interfaces only when told to.
DEFAULT_LISTEN = "tcp://127.0.0.1:7001"
#: Seconds a new connection has to finish its handshake (libzmq's default is 30):
#: a connection that never speaks holds a file descriptor and a timer until then.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
#: TCP keepalive of the ROUTER's connections (seconds idle, between probes, probes):
#: a client that vanished without closing is dropped after about a minute.
_KEEPALIVE_IDLE, _KEEPALIVE_INTVL, _KEEPALIVE_CNT = 30, 10, 3
#: Seconds a DEALER's unacknowledged data may wait before its connection fails and is
#: made anew (TCP_USER_TIMEOUT through ZMQ_TCP_MAXRT): finds a peer whose host vanished.
DEFAULT_PEER_TIMEOUT = 3.0
#: The longest time option a transport takes, in seconds (libzmq's are int milliseconds).
_MAX_SECONDS = 86_400
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
    """Thread-safe counters (incremented from the server, connection and replying threads).

    The three that move with every request are plain ints written by the
    server thread alone (one writer: no lock, no lost count), so that
    counting costs no lock per frame.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _c
        self._c: Counter[str] = Counter()
        #: the server thread's own counters (it alone writes them)
        self.frames_in = self.requests_in = self.replies_out = 0

    def inc(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def drop(self, reason: str) -> None:
        with self._lock:
            self._c["frames_dropped"] += 1
            self._c["dropped_" + reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._c)
        for k in ("frames_in", "requests_in", "replies_out"):
            v = getattr(self, k)
            if v:
                out[k] = v
        return out


class _Backlog:
    """Replies to one connection that libzmq's queue had no room for, in order.  Server thread only."""

    __slots__ = ("frames", "nbytes")

    def __init__(self) -> None:
        self.frames: collections.deque[bytes] = collections.deque()
        self.nbytes = 0  # invariant: nbytes == sum(map(len, frames))


class _HeldReplies(threading.local):
    """Per thread: how deep in :meth:`ZmqTransport.replies_held` it is, and whether it queued a reply."""

    depth = 0
    queued = False


class _RateLimitedLog:
    """Logs at most one line per key per ``interval`` seconds, then says how many were suppressed."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()  # guards _last and _suppressed
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def log(self, level: int, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
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
        log.log(level, msg, *args, exc_info=exc_info)


def is_loopback(addr: str) -> bool:
    """Whether a ZeroMQ address can only be reached from this host.

    True for ``tcp://`` on 127.0.0.0/8, ``::1`` or ``localhost``, and for
    ``ipc://`` and ``inproc://``; False for ``tcp://*``, ``0.0.0.0``, ``::``,
    any other host or interface name, and anything unparsable.
    """
    scheme, sep, rest = addr.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    rest = rest.rsplit(";", 1)[-1]  # "tcp://source;dest": the destination (or bind) part
    host = rest[1:rest.find("]")] if rest.startswith("[") else rest.rpartition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000 + 0.999))


# ---------------------------------------------------------------------------
# CURVE

#: The allow list's subdirectories and the role of the keys in each.
ROLE_DIRS = {"peers": "peer", "admins": "admin", "clients": "client", "readers": "reader"}

_CERT_BANNER = ("#   ****  Generated on {now} by pyraft  ****\n"
                "#   ZeroMQ CURVE {kind} Certificate\n"
                "#   {note}\n\n")


def _z85(key: bytes | str) -> bytes:
    k = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(k) != 40:
        raise TransportError(f"a CURVE key in Z85 is 40 characters, got {len(k)}")
    return k


def _load_public(path: str | bytes | os.PathLike) -> bytes:
    path = os.fsdecode(path)
    try:
        pub, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise TransportError(f"cannot read CURVE key file {path!r}: {e}") from None
    if pub is None or len(pub) != 40:
        raise TransportError(f"no CURVE public key in {path!r}")
    return pub


def _write_private(path: str, text: str, mode: int, *, replace: bool) -> None:
    """Write ``text`` to ``path``, created with ``mode`` (never wider, whatever was there before).

    The file is created with its final mode by ``os.open`` (not chmod-ed after
    writing): a secret is never readable by others, not even for a moment.
    With ``replace``, a temporary file takes its place atomically; without,
    an existing file is an error (FileExistsError).
    """
    target = path
    if replace:
        path = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(path, target)
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def generate_keys(directory: str | os.PathLike, name: str, *, overwrite: bool = False) -> tuple[str, str]:
    """Create a CURVE keypair as zmq.auth certificate files ``<name>.key`` and ``<name>.key_secret``.

    Returns ``(public_path, secret_path)``.  The secret file is created
    readable by its owner only (mode 0600, from its first byte: never
    chmod-ed afterwards); ``directory`` is created 0700 if missing.  Raises
    :class:`TransportError` if the files exist and ``overwrite`` is false.
    """
    directory = os.fspath(directory)
    pub_path = os.path.join(directory, f"{name}.key")
    sec_path = os.path.join(directory, f"{name}.key_secret")
    if not overwrite and (os.path.exists(pub_path) or os.path.exists(sec_path)):
        raise TransportError(f"key files for {name!r} already exist in {directory!r}")
    pub, sec = zmq.curve_keypair()
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    public_text = (_CERT_BANNER.format(now=now, kind="Public", note="This file may be shared.")
                   + f'metadata\ncurve\n    public-key = "{pub.decode()}"\n')
    secret_text = (_CERT_BANNER.format(now=now, kind="**Secret**",
                                       note="DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.")
                   + f'metadata\ncurve\n    public-key = "{pub.decode()}"\n    secret-key = "{sec.decode()}"\n')
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _write_private(sec_path, secret_text, 0o600, replace=overwrite)
        _write_private(pub_path, public_text, 0o644, replace=overwrite)
    except FileExistsError:
        raise TransportError(f"key files for {name!r} already exist in {directory!r}") from None
    except OSError as e:
        raise TransportError(f"cannot write keys for {name!r} in {directory!r}: {e}") from None
    return pub_path, sec_path


def _node_id_of(stem: str) -> int | None:
    return int(stem) if stem.isdigit() and stem.isascii() else None


_warned_flat: set[tuple[str, frozenset[str]]] = set()  # guarded by _warned_lock
_warned_lock = threading.Lock()


def _warn_flat(directory: str, names: list[str]) -> None:
    key = (directory, frozenset(names))
    with _warned_lock:
        if key in _warned_flat:
            return
        _warned_flat.add(key)
    log.warning("allowed keys directory %r uses the old flat layout (%s): N.key is node N's key and any other "
                "*.key a client's.  Move node keys to peers/, client keys to clients/, admin keys to admins/ "
                "and read-only keys to readers/ (in the flat layout an admin key has only client rights)",
                directory, ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else ""))


@dataclass(frozen=True)
class CurveConfig:
    """This endpoint's CURVE identity and whom it lets in, with which role.

    - ``secret_key_file``: this endpoint's ``*.key_secret`` file (it holds
      both halves of the keypair).  A file that other users may read is
      used, with a warning.
    - ``public_key_file``: optional; checked to match the secret file.
    - ``allowed_keys_dir``: the allow list, public ``*.key`` files by role::

          peers/N.key     node N: Raft RPCs as node N only, plus client rights;
                          also where anyone finds node N's server key
          admins/*.key    client rights plus admin operations (membership,
                          leadership transfer, snapshot, log purge)
          clients/*.key   read and write data (KV, replicated objects)
          readers/*.key   KV reads, status and metrics only

      The old flat layout still loads, with a warning: ``N.key`` is peer N,
      any other ``*.key`` a client.  The directories are re-read when their
      contents change.
    - ``allowed_key_files``: public key files, instead of or besides the
      directory; each file's role is its parent directory's (``peers/``,
      ``admins/``, ...), else the flat rule by its name.

    A client-only user (``ZmqClient``, ``KVClient``) needs ``secret_key_file``
    and, to find the nodes' keys, ``allowed_keys_dir``.
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
            mode = os.stat(path).st_mode
        except (OSError, ValueError) as e:
            raise TransportError(f"cannot read CURVE secret key file {path!r}: {e}") from None
        if sec is None:
            raise TransportError(f"{path!r} holds no secret key (give the .key_secret file)")
        if mode & 0o077:
            log.warning("CURVE secret key file %r can be read by other users (mode %04o): chmod 600 it",
                        path, stat.S_IMODE(mode))
        if self.public_key_file is not None and _load_public(self.public_key_file) != pub:
            raise TransportError(f"{os.fspath(self.public_key_file)!r} does not match {path!r}")
        return pub, sec

    def principals(self) -> dict[str, Principal]:
        """Every allowed public key (Z85 text) and who it is, read now.

        Raises :class:`TransportError` for an unreadable file, a file in
        ``peers/`` not named by a node id, or a key listed with two roles.
        """
        found: dict[str, tuple[Principal, str]] = {}

        def add(path: str, role: str, stem: str) -> None:
            node_id = _node_id_of(stem) if role == "peer" else None
            if role == "peer" and node_id is None:
                raise TransportError(f"{path!r}: a node's key file is named by its node id (N.key)")
            key = _load_public(path).decode("ascii")
            p = Principal(role, node_id, key)
            old = found.get(key)
            if old is not None and old[0] != p:
                raise TransportError(f"the same CURVE key is {old[1]!r} and {path!r}: one key, one role")
            found[key] = (p, path)

        def flat(path: str, stem: str) -> None:
            add(path, "peer" if _node_id_of(stem) is not None else "client", stem)

        for f in self.allowed_key_files:
            path = os.fspath(f)
            stem = os.path.splitext(os.path.basename(path))[0]
            role = ROLE_DIRS.get(os.path.basename(os.path.dirname(os.path.abspath(path))))
            if role is not None:
                add(path, role, stem)
            else:
                flat(path, stem)
        if self.allowed_keys_dir is not None:
            d = os.fspath(self.allowed_keys_dir)
            flat_names = []
            for n in _key_files(d, required=True):
                flat_names.append(n)
                flat(os.path.join(d, n), n[:-4])
            if flat_names:
                _warn_flat(d, flat_names)
            for sub, role in ROLE_DIRS.items():
                sd = os.path.join(d, sub)
                for n in _key_files(sd, required=False):
                    add(os.path.join(sd, n), role, n[:-4])
        return {k: p for k, (p, _path) in found.items()}

    def allowed_keys(self) -> set[bytes]:
        """The Z85 public keys allowed to connect (read now)."""
        return {k.encode("ascii") for k in self.principals()}

    def server_key_for(self, node_id: int, node: Node | None = None) -> bytes:
        """Node ``node_id``'s public key: ``node.data["curve_public_key"]``, else the allow list's
        ``peers/<node_id>.key`` (or the flat layout's ``<node_id>.key``)."""
        if node is not None and node.data and node.data.get("curve_public_key"):
            return _z85(node.data["curve_public_key"])
        name = f"{node_id}.key"
        if self.allowed_keys_dir is not None:
            d = os.fspath(self.allowed_keys_dir)
            for path in (os.path.join(d, "peers", name), os.path.join(d, name)):
                if os.path.exists(path):
                    return _load_public(path)
        files = [os.fspath(p) for p in self.allowed_key_files if os.path.basename(os.fspath(p)) == name]
        files.sort(key=lambda p: os.path.basename(os.path.dirname(os.path.abspath(p))) != "peers")
        if files:
            return _load_public(files[0])
        raise TransportError(
            f"no CURVE public key for node {node_id}: put it in peers/{name} of the allowed keys directory "
            f"or 'curve_public_key' in its Node.data")

    def _stamp(self) -> tuple | None:
        """Changes when a file is added to or removed from the allow list's directories."""
        if self.allowed_keys_dir is None:
            return None
        d = os.fspath(self.allowed_keys_dir)
        out: list[int | None] = []
        for p in (d, *(os.path.join(d, s) for s in ROLE_DIRS)):
            try:
                out.append(os.stat(p).st_mtime_ns)
            except OSError:
                out.append(None)
        return tuple(out)


def _key_files(d: str, *, required: bool) -> list[str]:
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        if required:
            raise TransportError(f"cannot read allowed keys directory {d!r}: it does not exist") from None
        return []
    except OSError as e:
        raise TransportError(f"cannot read allowed keys directory {d!r}: {e}") from None
    return [n for n in names if n.endswith(".key") and os.path.isfile(os.path.join(d, n))]


class _KeyTable:
    """The keys a CURVE server accepts and who each is: the ZAP credentials provider of one transport.

    The table is replaced whole on a reload (readers take the current one
    without a lock): the ZAP thread reloads it when a new connection arrives
    after the directories changed, the server thread checks about once a
    second, so a removed key stops being served on open connections too.
    """

    #: seconds between the server thread's checks of the directories
    CHECK_EVERY = 1.0

    def __init__(self, curve: CurveConfig, stats: _Stats, rlog: _RateLimitedLog, node_id: int):
        self._curve = curve
        self._stats = stats
        self._rlog = rlog
        self._node_id = node_id
        self._lock = threading.Lock()  # guards reloads (_stamp and the replacement of _table)
        self._stamp = curve._stamp()
        self._table: dict[str, Principal] = curve.principals()

    def maybe_reload(self) -> None:
        with self._lock:
            stamp = self._curve._stamp()
            if stamp == self._stamp:
                return
            try:
                self._table = self._curve.principals()
                self._stamp = stamp
            except TransportError as e:
                self._rlog.log(logging.WARNING, "keys", "node %s: cannot reload allowed keys (the old list "
                               "stays): %s", self._node_id, e)

    def principal(self, key: str | None) -> Principal | None:
        """Who holds ``key`` (Z85 text), None when it is not (or no longer) allowed."""
        return self._table.get(key) if key is not None else None

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: may this CURVE client key connect?  (Called on the ZAP thread.)"""
        self.maybe_reload()
        ok = key.decode("ascii", "replace") in self._table
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
    def acquire(cls, ctx: zmq.Context, domain: str, provider: _KeyTable) -> None:
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


#: libzmq I/O thread masks (ZMQ_AFFINITY) when the context has two or more: the
#: ROUTER's connections on the first, this node's own connections on the second.
_SERVE_IO, _CONNECT_IO = 1, 2


def default_context() -> zmq.Context:
    """The process's ``zmq.Context.instance()``, made with two I/O threads if pyraft makes it.

    With two I/O threads a transport serves its ROUTER's connections on one
    and its own outgoing connections (replication, votes) on the other, so
    that a flood of incoming connections cannot delay the heartbeats a
    leader sends.  A context made elsewhere with one I/O thread still works,
    without that separation.
    """
    return zmq.Context.instance(io_threads=2)


def _io_affinity(ctx: zmq.Context, mask: int) -> int:
    """``mask`` if ``ctx`` has the I/O threads to honour it, else 0 (any thread)."""
    try:
        return mask if ctx.get(zmq.IO_THREADS) >= 2 else 0
    except zmq.ZMQError:
        return 0


def _set_common(sock: zmq.Socket, *, hwm: int, max_frame_size: int, addr: str) -> None:
    # Never ZMTP heartbeats (HEARTBEAT_IVL): libzmq 4.3.5 can abort on them (module docstring).
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_size)
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
    - ``context``: default :func:`default_context` (one per process, two I/O
      threads: see there); never terminated here.
    - ``curve``: a :class:`CurveConfig` to encrypt and authenticate (server and connections).
    - ``max_frame_size``: bytes; larger frames are refused by the sender and
      dropped (libzmq ``MAXMSGSIZE``: the peer is disconnected) by the receiver.
    - ``max_client_frame_size``: bytes; a :class:`~pyraft.codec.ClientRequest`
      larger than this is answered with :class:`~pyraft.errors.RequestTooLarge`
      without decoding its body (Raft RPCs may use up to ``max_frame_size``).
    - ``recv_queue_bytes``: bytes one connection may have waiting in a
      receive queue (the ROUTER's, and this node's own connections' for
      their replies): libzmq counts messages, so ``RCVHWM`` is
      ``recv_queue_bytes // max_frame_size`` (at least 1; :attr:`recv_hwm`).
      A connection holds at most ``(recv_hwm + 1) * max_frame_size`` bytes in
      libzmq (the queue, plus the frame being received) besides the kernel's
      socket buffer; past it libzmq stops reading that connection.
    - ``send_queue_bytes``: bytes of replies one connection may have waiting
      to be sent.  libzmq counts messages, so the ROUTER's ``SNDHWM`` is
      ``send_queue_bytes // max_frame_size`` (the largest reply a client
      accepts), at least 64 (:attr:`send_hwm`); the replies of a burst that
      do not fit wait, in order, in a backlog of at most ``send_queue_bytes``
      per connection, and go out as libzmq makes room (so a burst of small
      replies, such as a leader's AppendEntries acks or a many-threaded
      client's answers, is delayed, never dropped).  Past the backlog's
      bound replies to that connection are dropped (``replies_dropped``,
      ``dropped_reply_backlog``): a client that never reads its replies
      makes the node hold at most ``send_hwm`` replies and
      ``send_queue_bytes`` more for it.
    - ``max_client_requests_per_connection``: client requests one connection
      (one DEALER) may have in flight, counted from when one is handed to
      ``handler`` until its reply is queued (or its reply handle is dropped
      unanswered); a request past it is answered
      :class:`~pyraft.errors.Overloaded` at once, without decoding its body
      (``client_requests_overloaded``).  Raft RPCs are not counted (their
      lane is ``Config.max_queued_rpcs``).
    - ``hwm``: frames queued for sending per connection of this node, at
      most (libzmq may refuse a write somewhat earlier); beyond it sends drop.
    - ``reconnect_ivl``/``reconnect_ivl_max``: DEALER reconnect back-off, seconds.
    - ``peer_timeout``: seconds; a connection of this node's whose data the
      peer's host has not acknowledged for this long fails and is made anew
      (``TCP_USER_TIMEOUT``, through libzmq's ``ZMQ_TCP_MAXRT``): it finds a
      peer whose host vanished without closing the connection.  0 leaves the
      kernel's default (about 15 minutes of retransmissions).  No ZMTP
      heartbeats are sent (see the module's docstring); the ROUTER's TCP
      keepalive finds clients that vanished.
    - ``handshake_timeout``: seconds a new connection may take to complete its
      ZMTP (and CURVE) handshake before the ROUTER drops it.

    Every request reaches the handler with ``reply.principal``
    (:class:`~pyraft.network.Principal`): with CURVE, the role its key has in
    the allow list; without, :data:`~pyraft.network.TRUSTED`.  With CURVE a
    Raft RPC passes only from ``peers/N.key`` claiming to be node N; others
    are dropped before their body is decoded (``dropped_rpc_not_peer``,
    ``dropped_rpc_wrong_id``).

    Threads: ``pyraft-zmq-server-<node_id>`` while started, and with CURVE one
    ``pyraft-zap`` per context while any CURVE transport is open.
    """

    def __init__(self, node_id: int, listen: str | None = DEFAULT_LISTEN, *,
                 cluster_name: str = "pyraft", context: zmq.Context | None = None,
                 curve: CurveConfig | None = None, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 max_client_frame_size: int = DEFAULT_MAX_CLIENT_FRAME_SIZE,
                 recv_queue_bytes: int = DEFAULT_RECV_QUEUE_BYTES,
                 send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
                 max_client_requests_per_connection: int = DEFAULT_MAX_CLIENT_REQUESTS_PER_CONNECTION,
                 hwm: int = 1000, reconnect_ivl: float = 0.1, reconnect_ivl_max: float = 2.0,
                 peer_timeout: float = DEFAULT_PEER_TIMEOUT, handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT):
        if type(node_id) is not int or node_id < 0:
            raise ValueError(f"node_id must be a non-negative int, got {node_id!r}")
        for name, v in (("max_frame_size", max_frame_size), ("max_client_frame_size", max_client_frame_size),
                        ("recv_queue_bytes", recv_queue_bytes), ("send_queue_bytes", send_queue_bytes),
                        ("max_client_requests_per_connection", max_client_requests_per_connection), ("hwm", hwm)):
            if type(v) is not int or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        # Seconds, checked here: libzmq takes them as int milliseconds, on the connecting worker's thread.
        for name, secs, least in (("handshake_timeout", handshake_timeout, 0.001), ("peer_timeout", peer_timeout, 0),
                                  ("reconnect_ivl", reconnect_ivl, 0), ("reconnect_ivl_max", reconnect_ivl_max, 0)):
            if type(secs) not in (int, float) or not least <= secs <= _MAX_SECONDS:
                raise ValueError(f"{name} must be a number of seconds from {least} to {_MAX_SECONDS}, got {secs!r}")
        self.node_id = node_id
        self.listen = listen
        self.cluster_name = cluster_name
        self.curve = curve
        self.max_frame_size = max_frame_size
        self.max_client_frame_size = min(max_client_frame_size, max_frame_size)
        self.recv_queue_bytes = recv_queue_bytes
        #: the ROUTER's RCVHWM: how many frames one connection may have waiting
        self.recv_hwm = max(1, recv_queue_bytes // max_frame_size)
        self.send_queue_bytes = send_queue_bytes
        #: the ROUTER's SNDHWM: how many replies to one connection libzmq holds (max_frame_size
        #: bounds a reply: a client's DEALER takes no larger frame)
        self.send_hwm = max(_MIN_SEND_HWM, send_queue_bytes // max_frame_size)
        self.max_client_requests_per_connection = max_client_requests_per_connection
        self.hwm = hwm
        self.reconnect_ivl = reconnect_ivl
        self.reconnect_ivl_max = reconnect_ivl_max
        self.peer_timeout = peer_timeout
        self.handshake_timeout = handshake_timeout
        self._ctx = context or default_context()
        self._stats = _Stats()
        self._rlog = _RateLimitedLog()
        self._keypair = curve.keypair() if curve is not None else None
        self._keys: _KeyTable | None = None  # with CURVE: who each client key is
        self._fault_filter: FaultFilter | None = None
        self._handler: RequestHandler | None = None
        self._on_failure: FailureHandler | None = None
        self._on_burst_end: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self._close_lock = threading.Lock()  # guards _closed transitions and start()
        self._closed = False
        self._stopping = False
        # Replies from any thread: (routing id, frame) appended here, then a wake-up byte.
        # Frame None: a client request's handle was dropped unanswered (its slot comes back
        # on the server thread: a finalizer must not take _in_flight_lock, see _ZmqReply).
        self._outbox: collections.deque[tuple[bytes, bytes | None]] = collections.deque()
        self._in_flight_lock = threading.Lock()  # guards _in_flight
        #: client requests in flight per routing id; an entry goes when it reaches 0
        self._in_flight: dict[bytes, int] = {}
        # The server thread's alone: replies waiting for room in libzmq's queue.
        self._backlog: dict[bytes, _Backlog] = {}
        self._backlog_bytes = 0  # invariant: sum of the backlogs' nbytes
        self._backlog_wait = 0.0  # seconds between retries of the backlog (doubling while nothing moves)
        self._backlog_due = 0.0  # when the next retry is due (monotonic)
        self._wake_pending = False
        self._held = _HeldReplies()  # per thread: see replies_held
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
            self._keys = _KeyTable(self.curve, self._stats, self._rlog, self.node_id)
            self._zap_domain = f"pyraft-{self.node_id}-{id(self):x}"
            _Zap.acquire(self._ctx, self._zap_domain, self._keys)
        r = self._ctx.socket(zmq.ROUTER)
        try:
            # No ZMTP heartbeats on the ROUTER: libzmq keeps each connection's heartbeat
            # timers in one list per I/O thread and cancels them by a linear scan, so
            # heartbeating N idle connections costs O(N^2) a second; at about 5,000 the
            # I/O thread spends all its time there (and a leader sharing it lost its
            # followers).  Connections that go silent are found by TCP keepalive, in the
            # kernel; the DEALERs' TCP user timeout detects a dead server.
            _set_common(r, hwm=self.hwm, max_frame_size=self.max_frame_size, addr=listen)
            r.setsockopt(zmq.TCP_KEEPALIVE, 1)
            r.setsockopt(zmq.TCP_KEEPALIVE_IDLE, _KEEPALIVE_IDLE)
            r.setsockopt(zmq.TCP_KEEPALIVE_INTVL, _KEEPALIVE_INTVL)
            r.setsockopt(zmq.TCP_KEEPALIVE_CNT, _KEEPALIVE_CNT)
            r.setsockopt(zmq.AFFINITY, _io_affinity(self._ctx, _SERVE_IO))
            r.setsockopt(zmq.RCVHWM, self.recv_hwm)
            r.setsockopt(zmq.SNDHWM, self.send_hwm)
            r.setsockopt(zmq.HANDSHAKE_IVL, _ms(self.handshake_timeout))
            r.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if self._keypair is not None:
                assert self._zap_domain is not None, "a keypair comes with curve, which set the ZAP domain above"
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

    def start(self, handler: RequestHandler, on_failure: FailureHandler | None = None,
              on_burst_end: Callable[[], None] | None = None) -> None:
        """Start the server thread; every valid incoming request goes to ``handler``.

        ``on_failure(reason)`` is called (once, on the server thread) if that
        thread fails: a libzmq error or a bug, never a frame (bad frames are
        dropped and counted), so that the owner stops visibly instead of
        running on deaf.

        ``on_burst_end()`` is called on the server thread after each burst of
        requests: the frames that were waiting when it woke (at most 256)
        have all gone to ``handler``.  An owner may hold what the handler
        gave it until then and pass it on in one piece (the Raft handle
        proposes a burst's client writes as one batch).
        """
        with self._close_lock:
            if self._closed:
                raise TransportError(f"transport of node {self.node_id} is closed")
            if self._handler is not None:
                raise TransportError(f"transport of node {self.node_id} is already started")
            self._handler = handler
            self._on_failure = on_failure
            self._on_burst_end = on_burst_end
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
            if self.endpoint is not None:  # None: the ROUTER never got to listen
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
        ``decode``, ``not_request``, ``not_reply``, ``fault_filter``,
        ``unknown_key``, ``rpc_not_peer``, ``rpc_wrong_id``, ``wrong_peer``: a reply
        from another node than the one connected to), ``sends``,
        ``sends_dropped``, ``replies_in``, ``handler_errors``, ``frame_errors``,
        ``auth_rejected``, ``client_requests_too_large``, ``client_requests_overloaded``,
        ``replies_deferred`` (waited in the backlog for room in libzmq's queue),
        ``dropped_reply_backlog`` (also in ``replies_dropped``)."""
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
        keys = self._keys
        # With CURVE each frame is read as a zmq.Frame, whose "User-Id" property is the
        # key the ZAP handler authenticated; without, plain bytes are cheaper.
        copy = keys is None
        next_key_check = time.monotonic() + _KeyTable.CHECK_EVERY
        try:
            while not self._stopping:
                events = dict(poller.poll(
                    1000 if not self._backlog else _ms(max(0.0, self._backlog_due - time.monotonic()))))
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
                            # Until Again: one exception per burst costs less than asking libzmq
                            # for EVENTS after every frame (a few microseconds each, GIL held),
                            # which was the server thread's largest item under client load.
                            parts = router.recv_multipart(zmq.NOBLOCK, copy=copy)
                        except zmq.Again:
                            break
                        try:
                            self._on_frame(parts)
                        except Exception:  # a bug in handling one frame costs that frame, not the node's hearing
                            self._stats.inc("frame_errors")
                            self._rlog.log(logging.ERROR, "frame_error", "node %s: failed on an incoming frame",
                                           self.node_id, exc_info=True)
                    if self._on_burst_end is not None:
                        try:
                            self._on_burst_end()
                        except Exception:  # noqa: BLE001 - the owner's bug must not make this node deaf
                            self._stats.inc("handler_errors")
                            log.exception("node %s: the end-of-burst handler failed", self.node_id)
                self._flush_replies(router)
                if keys is not None and time.monotonic() >= next_key_check:
                    keys.maybe_reload()
                    next_key_check = time.monotonic() + _KeyTable.CHECK_EVERY
        except Exception as e:  # libzmq failed (or a bug outside frame handling): this node no longer hears
            log.exception("node %s: transport server thread failed", self.node_id)
            self._report_failure(f"transport server thread failed: {type(e).__name__}: {e}")
        finally:
            self._stopping = True
            self._release_resources()

    def _report_failure(self, reason: str) -> None:
        cb = self._on_failure
        if cb is None or self._closed:
            return
        try:
            cb(reason)
        except Exception:  # noqa: BLE001 - the owner's callback must not hide the failure
            log.exception("node %s: the transport failure callback failed", self.node_id)

    def _on_frame(self, parts: list) -> None:
        st = self._stats
        st.frames_in += 1
        if len(parts) != 2:
            st.drop("envelope")
            self._rlog.log(logging.WARNING, "envelope", "node %s: dropped a message of %d parts (expected 1 frame)",
                           self.node_id, len(parts) - 1)
            return
        routing_id, data = parts
        principal = TRUSTED
        if self._keys is not None:  # zmq.Frame objects (see _serve)
            key = data.get("User-Id")
            routing_id, data = routing_id.bytes, data.bytes
            p = self._keys.principal(key)
            if p is None:  # allowed at the handshake, removed from the allow list since
                st.drop("unknown_key")
                self._rlog.log(logging.WARNING, "unknown_key", "node %s: dropped a frame from key %s, which is no "
                               "longer allowed", self.node_id, key)
                return
            principal = p
        if len(data) > self.max_frame_size:
            st.drop("oversize")
            self._rlog.log(logging.WARNING, "oversize", "node %s: dropped a frame of %d bytes (max %d)",
                           self.node_id, len(data), self.max_frame_size)
            return
        # The envelope first: version, cluster, sender, request id and tag are checked
        # before a byte of the body is decoded (or the body's size is held against it).
        try:
            env = decode_envelope(data, self.cluster_name)
        except CodecError as e:
            st.drop("decode")
            self._rlog.log(logging.WARNING, "decode", "node %s: dropped an invalid frame: %s", self.node_id, e)
            return
        if env.tag not in REQUEST_TAGS:
            st.drop("not_request")
            self._rlog.log(logging.WARNING, "not_request", "node %s: dropped a reply (tag %d) sent as a request",
                           self.node_id, env.tag)
            return
        if env.tag in RAFT_REQUEST_TAGS:
            refusal = None if self._keys is None else raft_sender_refusal(principal, env.from_id)
            if refusal is not None:
                st.drop(refusal)
                self._rlog.log(logging.WARNING, refusal,
                               "node %s: dropped a Raft RPC claiming to be from node %s, sent with the key of %s",
                               self.node_id, env.from_id, _describe(principal))
                return
        elif len(data) > self.max_client_frame_size:
            st.inc("client_requests_too_large")
            self._rlog.log(logging.WARNING, "client_too_large", "node %s: refused a client request of %d bytes "
                           "(max_client_frame_size %d)", self.node_id, len(data), self.max_client_frame_size)
            err = RequestTooLarge(f"a request of {len(data)} bytes is larger than node {self.node_id} accepts "
                                  f"({self.max_client_frame_size} bytes)")
            _ZmqReply(self, routing_id, env.from_id, env.request_id, principal).reply(
                ClientResponse(False, None, [type(err).__name__, str(err), None, None]))
            return
        elif self._in_flight.get(routing_id, 0) >= self.max_client_requests_per_connection:
            # Before its body is decoded: a connection that pipelines past the cap costs
            # the node an envelope read and a short error per extra request.
            st.inc("client_requests_overloaded")
            self._rlog.log(logging.WARNING, "client_overloaded", "node %s: refused a client request: its "
                           "connection has %d in flight already (max_client_requests_per_connection)",
                           self.node_id, self.max_client_requests_per_connection)
            over = Overloaded(f"this connection has {self.max_client_requests_per_connection} requests in "
                              f"flight at node {self.node_id} already; wait for their replies")
            _ZmqReply(self, routing_id, env.from_id, env.request_id, principal).reply(
                ClientResponse(False, None, [type(over).__name__, str(over), None, None]))
            return
        try:
            msg = decode_body(data, env)
        except CodecError as e:
            st.drop("decode")
            self._rlog.log(logging.WARNING, "decode", "node %s: dropped an invalid frame: %s", self.node_id, e)
            return
        if self._filtered("request", env.from_id, msg):
            st.drop("fault_filter")
            return
        st.requests_in += 1
        handler = self._handler
        assert handler is not None, "the server thread starts after start() set the handler"
        counted = env.tag not in RAFT_REQUEST_TAGS
        if counted:  # released as its reply is queued, or its handle dropped (_ZmqReply)
            with self._in_flight_lock:
                self._in_flight[routing_id] = self._in_flight.get(routing_id, 0) + 1
        try:
            handler(env.from_id, msg, _ZmqReply(self, routing_id, env.from_id, env.request_id, principal, counted))
        except Exception:
            st.inc("handler_errors")
            log.exception("node %s: request handler failed on %s", self.node_id, type(msg).__name__)

    def _flush_replies(self, router: zmq.Socket) -> None:
        """Hand the queued replies to libzmq; end the client requests they answer.

        A reply that finds its connection's queue full (``SNDHWM``) waits in that
        connection's backlog, behind which every later reply to it queues, so
        they leave in order; a backlog is bounded by ``send_queue_bytes``, past
        which replies to that connection are dropped, and all of them together
        by ``_BACKLOG_NODE_SHARE * send_queue_bytes``.  Backlogs are retried
        first, when due: ``_BACKLOG_RETRY_MIN`` after a retry that moved
        something, else after a wait that doubles up to ``_BACKLOG_RETRY_MAX``
        (a client that never reads costs a few retries a second, not a busy
        loop).
        """
        now = time.monotonic()
        retried = bool(self._backlog) and now >= self._backlog_due
        moved = self._retry_backlog(router) if retried else False
        out = self._outbox
        st = self._stats
        backlog = self._backlog
        while out:
            routing_id, data = out.popleft()
            if data is None:  # a client request's handle, dropped unanswered
                self._release(routing_id)
                continue
            b = backlog.get(routing_id) if backlog else None
            if b is None:
                try:
                    router.send_multipart([routing_id, data], zmq.NOBLOCK)
                    st.replies_out += 1
                    continue
                except zmq.Again:  # its queue is full: wait for room
                    if not backlog:
                        self._backlog_wait = _BACKLOG_RETRY_MIN
                        self._backlog_due = now + _BACKLOG_RETRY_MIN
                    b = backlog[routing_id] = _Backlog()
                except zmq.ZMQError as e:  # EHOSTUNREACH: the peer is gone
                    self._drop_reply(e.strerror)
                    continue
            if b.nbytes and b.nbytes + len(data) > self.send_queue_bytes:
                st.inc("dropped_reply_backlog")
                self._drop_reply("the connection's backlog is full (send_queue_bytes)")
                continue
            if self._backlog_bytes + len(data) > _BACKLOG_NODE_SHARE * self.send_queue_bytes:
                st.inc("dropped_reply_backlog")
                self._drop_reply("the node's backlogs are full")
                continue
            b.frames.append(data)
            b.nbytes += len(data)
            self._backlog_bytes += len(data)
            st.inc("replies_deferred")
        if not backlog:
            self._backlog_wait = 0.0
        elif retried:
            # libzmq's I/O thread needs a moment even while backlogs move: no busy loop.
            self._backlog_wait = (_BACKLOG_RETRY_MIN if moved else
                                  min(_BACKLOG_RETRY_MAX, max(_BACKLOG_RETRY_MIN, 2 * self._backlog_wait)))
            self._backlog_due = now + self._backlog_wait

    def _retry_backlog(self, router: zmq.Socket) -> bool:
        """Send what libzmq now has room for; whether any reply went."""
        moved = False
        st = self._stats
        for routing_id, b in list(self._backlog.items()):
            frames = b.frames
            while frames:
                try:
                    router.send_multipart([routing_id, frames[0]], zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as e:  # the peer is gone: so is all that waited for it
                    for _ in frames:
                        self._drop_reply(e.strerror)
                    frames.clear()
                    self._backlog_bytes -= b.nbytes
                    b.nbytes = 0
                    break
                n = len(frames.popleft())
                b.nbytes -= n
                self._backlog_bytes -= n
                st.replies_out += 1
                moved = True
            if not frames:
                del self._backlog[routing_id]
        return moved

    def _release(self, routing_id: bytes) -> None:
        """One client request of this connection is no longer in flight.  Any thread."""
        with self._in_flight_lock:
            n = self._in_flight.get(routing_id, 0) - 1
            if n > 0:
                self._in_flight[routing_id] = n
            else:
                self._in_flight.pop(routing_id, None)

    def _drop_reply(self, why: str | None) -> None:
        self._stats.inc("replies_dropped")
        self._rlog.log(logging.INFO, "reply", "node %s: reply dropped: %s", self.node_id, why)

    def _queue_reply(self, routing_id: bytes, data: bytes | None) -> None:
        if self._stopping:
            if data is not None:
                self._stats.inc("replies_dropped")
            return
        self._outbox.append((routing_id, data))
        held = self._held
        if held.depth:
            held.queued = True  # the server thread is woken once, as the hold ends
            return
        self._wake()

    @contextlib.contextmanager
    def replies_held(self) -> Iterator[None]:
        """Replies made by this thread inside the block leave together: one wake-up of the server thread.

        For threads that complete many requests in a row (the state-machine
        worker finishing a batch of writes, RaftCore releasing reads): without
        it, the first reply's wake-up hands the GIL to the server thread,
        which sends that reply alone while the rest wait their turn, and the
        requests that come back trickle in one by one instead of together.
        Nests; any thread.
        """
        held = self._held
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if not held.depth and held.queued:
                held.queued = False
                self._wake()


def _describe(p: Principal) -> str:
    who = f"node {p.node_id}" if p.role == "peer" else f"a {p.role}"
    return f"{who} ({p.key})" if p.key else who


class _ZmqReply:
    """The reply handle of one request: remembers the routing id, the request id and who sent it.

    A client request's handle (``counted``) holds one of its connection's
    ``max_client_requests_per_connection`` until it replies, or until it is
    dropped unanswered (``__del__``), so a request the service forgets does not
    hold a slot for ever.
    """

    __slots__ = ("_t", "_routing_id", "_requester", "_request_id", "_used", "_counted", "principal")

    def __init__(self, transport: ZmqTransport, routing_id: bytes, requester: int, request_id: int,
                 principal: Principal = TRUSTED, counted: bool = False):
        self._t = transport
        self._routing_id = routing_id
        self._requester = requester
        self._request_id = request_id
        self._used = False
        self._counted = counted
        #: who sent the request (see pyraft.network.Principal)
        self.principal = principal

    @property
    def connection(self) -> bytes:
        """The connection the request came on: the ROUTER's routing id (opaque, hashable).

        Requests that share it came on one client connection; libzmq never
        gives a routing id to two connections of one ROUTER at once.
        """
        return self._routing_id

    def reply(self, message: Any) -> None:
        """Encode on the calling thread, queue for the server thread.  Never blocks, never raises."""
        t = self._t
        data: bytes | None = None
        try:
            if self._used:
                t._rlog.log(logging.WARNING, "twice", "node %s: a second reply to request %s was ignored",
                            t.node_id, self._request_id)
                return
            self._used = True
            if t._filtered("reply", self._requester, message):
                t._stats.inc("replies_dropped")
            else:
                data = encode_message(message, t.cluster_name, t.node_id, self._request_id)
        except Exception:
            t._stats.inc("replies_dropped")
            log.exception("node %s: cannot send a reply", t.node_id)
        try:
            if data is not None:
                t._queue_reply(self._routing_id, data)
        finally:
            if self._counted:
                t._release(self._routing_id)

    def __del__(self) -> None:
        # Unanswered: the server thread gives the request's slot back.  Only a deque append
        # and a wake-up byte here, no lock: the collector may run this on a thread that
        # holds _in_flight_lock already.
        if self._counted and not self._used:
            self._used = True
            try:
                self._t._queue_reply(self._routing_id, None)
            except Exception:  # noqa: BLE001 - a finalizer must not raise (interpreter shutdown)
                pass


# ---------------------------------------------------------------------------
# Client side

def _dealer(ctx: zmq.Context, addr: str, *, hwm: int, max_frame_size: int,
            reconnect_ivl: float, reconnect_ivl_max: float, peer_timeout: float = DEFAULT_PEER_TIMEOUT,
            keypair: tuple[bytes, bytes] | None, server_key: bytes | None, affinity: int = 0,
            recv_hwm: int | None = None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    try:
        _set_common(s, hwm=hwm, max_frame_size=max_frame_size, addr=addr)
        if peer_timeout > 0:
            s.setsockopt(zmq.TCP_MAXRT, _ms(peer_timeout))
        if recv_hwm is not None:
            s.setsockopt(zmq.RCVHWM, recv_hwm)
        s.setsockopt(zmq.AFFINITY, affinity)
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
            peer_timeout=transport.peer_timeout, reconnect_ivl=transport.reconnect_ivl,
            reconnect_ivl_max=transport.reconnect_ivl_max, keypair=transport._keypair, server_key=server_key,
            affinity=_io_affinity(transport._ctx, _CONNECT_IO), recv_hwm=transport.recv_hwm)
        self._ids = itertools.count(1)
        #: why this connection's replies are being dropped, while they are (see ``_decode``); None otherwise
        self.problem: str | None = None
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
        sock = self._sock  # the owner's thread alone closes it: it stays while this runs
        if sock is None or not self._usable():
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
            sock.send(data, zmq.NOBLOCK)
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
        while (sock := self._sock) is not None and self._usable():
            if self._woken:
                self._clear_wake()
                return None
            self._poller.modify(sock, zmq.POLLIN | zmq.POLLOUT if self._pending else zmq.POLLIN)
            events = dict(self._poller.poll(_ms(deadline - time.monotonic())))
            if wake_fd in events:
                self._clear_wake()
                return None
            ev = events.get(sock, 0)
            if ev & zmq.POLLOUT and self._pending is not None:
                self._flush_pending()
            if ev & zmq.POLLIN:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
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
        if frame.from_id != self.target_id:
            # Another member answers at this address: two members' addresses name one process
            # (localhost and 127.0.0.1, a DNS alias), or a node was replaced by one with another
            # id.  Counting its replies would count one process as two members.
            t._stats.drop("wrong_peer")
            self.problem = (f"the process at {self.addr!r} answers as node {frame.from_id}, not node "
                            f"{self.target_id}: two members' addresses name one process? its replies "
                            f"are dropped; give node {self.target_id} its own address")
            t._rlog.log(logging.WARNING, f"wrong_peer {self.target_id}", "node %s: %s", t.node_id, self.problem)
            return None
        self.problem = None
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


def _client_reply(parts: list[bytes], cluster_name: str, addr: Any) -> tuple[int, Any] | None:
    """``(request id, message)`` of a reply a client's DEALER received; None (logged) for anything else."""
    if len(parts) != 1:
        return None
    try:
        frame = decode_message(parts[0], cluster_name)
    except CodecError as e:
        log.warning("client: dropped an invalid reply from %s: %s", addr, e)
        return None
    if isinstance(frame.message, _REQUEST_TYPES):
        return None
    return frame.request_id, frame.message


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
            context or default_context(), addr, hwm=hwm, max_frame_size=max_frame_size,
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
                got = _client_reply(parts, self.cluster_name, self.addr)
                if got is not None and got[0] == rid:
                    return got[1]
                continue  # a stale reply to an earlier call, or not a reply
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


#: Poll flags as plain ints: ``int & zmq.POLLIN`` goes through enum.Flag in Python, per frame.
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
#: Frames a ZmqChannel holds per address while it is not connected, at most (and max_frame_size bytes).
_CHANNEL_HELD = 1024
#: Connections a ZmqChannel keeps open, at most: opening one more closes the least recently used
#: (a call waiting on it then times out and is retried).  A cluster has a handful of nodes.
_CHANNEL_SOCKETS = 64


class _Call:
    """One request in flight on a :class:`ZmqChannel`: its id and where its caller waits."""

    __slots__ = ("rid", "waiter", "reply", "done", "callback")

    def __init__(self, rid: int, callback: Callable[[Any, BaseException | None], None] | None = None) -> None:
        self.rid = rid
        #: made (held) by a caller that will wait; released once, by whoever completes the call or
        #: hands it the I/O role.  None for the I/O thread's own call: nobody ever releases it.
        self.waiter: Any = None
        self.reply: Any = None
        self.done = False
        #: for a call made with :meth:`ZmqChannel.start`: called on the pumping thread with
        #: ``(reply, None)`` or ``(None, error)``; nobody waits on it.
        self.callback = callback


class _Failed:
    """The reply of a call that could not be sent: the error it raises."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ZmqChannel:
    """A thread-safe request/reply channel: one DEALER per address, shared by every calling thread.

    ``call(addr, message, timeout)`` sends one request and waits for its
    reply (matched by request id), with any number of other calls in flight
    on the same connection from other threads: requests are pipelined, and
    a burst of them leaves in one go.  A reply that comes after its call
    gave up is dropped.

    No thread of its own (the leader/followers pattern): the sockets are
    driven by one of the calling threads at a time, the *I/O thread*,
    which sends what the others queued, polls, and hands each reply to its
    caller.  When its own reply has come, it passes the role to a thread
    still waiting (by releasing that thread's waiter, the one wake-up it
    would get anyway) or, when none is waiting, drops it.  A lone caller
    thus sends and receives on its own thread, as :class:`ZmqClient` does:
    no hand-off to a background thread and back.  The others queue their
    request and write one byte to a ``socketpair`` the I/O thread polls
    (one byte per batch: a flag says one is already on its way).  A socket
    only ever passes between threads under ``_lock`` (a full memory
    barrier, as ZeroMQ requires).

    The other way to use a channel: one thread of the caller's own drives
    it, starting calls with :meth:`start` (each reply goes to a callback)
    and running :meth:`pump` in a loop; other threads only :meth:`wake`
    it.  KVClient's futures (``put_async`` ...) work so.  A channel is
    used one way or the other, never both.
    """

    def __init__(self, cluster_name: str = "pyraft", *, curve: CurveConfig | None = None,
                 server_key: Callable[[str], bytes | None] | None = None,
                 context: zmq.Context | None = None, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 hwm: int = 10_000):
        self.cluster_name = cluster_name
        self._keypair = curve.keypair() if curve is not None else None
        #: ``server_key(addr)``: the CURVE public key of the server at ``addr`` (with ``curve``)
        self._server_key = server_key
        self._ctx = context or default_context()
        self._max_frame_size = max_frame_size
        self._hwm = hwm
        self._ids = itertools.count(1)
        # _lock guards _calls, _outbox, _io, _wake_pending and _closed; a socket is used only by
        # the thread holding the I/O role (_io), which it takes and leaves under _lock.
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._outbox: list[tuple[int, str, bytes]] = []
        self._io: _Call | None = None  # the call whose thread holds the I/O role
        self._wake_pending = False
        self._closed = False
        self._pumped = False  # start() was used: one thread drives the channel with pump()
        # Owned by the I/O role: address -> DEALER (and back), frames held while it is not connected.
        self._socks: dict[str, zmq.Socket] = {}
        self._by_sock: dict[zmq.Socket, str] = {}
        self._held: dict[str, collections.deque[bytes]] = {}
        self._held_bytes: dict[str, int] = {}
        self._poller = zmq.Poller()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)

    def call(self, addr: str, message: Any, timeout: float) -> Any:
        """Send ``message`` to ``addr``; its reply, or :class:`~pyraft.errors.Timeout` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        rid = next(self._ids)
        data = encode_message(message, self.cluster_name, 0, rid)
        c = _Call(rid)
        wake = False
        with self._lock:
            if self._closed:
                raise TransportError("channel is closed")
            if self._pumped:
                raise TransportError("call() on a channel driven by pump()")
            self._calls[rid] = c
            self._outbox.append((rid, addr, data))
            io = self._io is None
            if io:
                self._io = c
            else:
                c.waiter = threading.Lock()
                c.waiter.acquire()
                if not self._wake_pending:
                    self._wake_pending = wake = True
        if not io:
            if wake:
                self._wake()
            try:
                c.waiter.acquire(timeout=max(0.0, deadline - time.monotonic()))
            except BaseException:  # KeyboardInterrupt in the wait: never strand the I/O role with us
                with self._lock:
                    self._calls.pop(rid, None)
                    promoted = self._io is c
                if promoted:
                    self._pass_role(c)
                raise
            with self._lock:
                if not c.done and self._io is not c:
                    # Timed out, or cut short by close(): either way, no longer waited for.
                    self._calls.pop(rid, None)
                    if self._closed:
                        raise TransportError("channel is closed")
                    raise Timeout(f"no reply from {addr} within {timeout}s")
            if c.done:
                return self._result(c)
            # Promoted: this thread now holds the I/O role.
        self._drive(c, deadline)
        if c.done:
            return self._result(c)
        if self._closed:
            raise TransportError("channel is closed")
        raise Timeout(f"no reply from {addr} within {timeout}s")

    @staticmethod
    def _result(c: _Call) -> Any:
        if type(c.reply) is _Failed:
            raise c.reply.error
        return c.reply

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the buffer is full (a byte is pending anyway) or closed
            pass

    # -- driven by a thread of the caller's own ------------------------------------------

    def start(self, addr: str, message: Any,
              callback: Callable[[Any, BaseException | None], None]) -> int:
        """Queue ``message`` for ``addr``; ``callback(reply, None)`` (or ``(None, error)``) from :meth:`pump`.

        Only on the thread that pumps the channel.  Returns the call's id,
        for :meth:`cancel`.  Nothing times out by itself: the pumping thread
        cancels a call it no longer waits for.
        """
        rid = next(self._ids)
        data = encode_message(message, self.cluster_name, 0, rid)
        with self._lock:
            if self._closed:
                raise TransportError("channel is closed")
            if self._io is not None:
                raise TransportError("start() on a channel driven by its callers")
            self._pumped = True
            self._calls[rid] = _Call(rid, callback)
            self._outbox.append((rid, addr, data))
        return rid

    def cancel(self, rid: int) -> None:
        """Forget call ``rid``: a reply that comes later is dropped, its callback never called."""
        with self._lock:
            self._calls.pop(rid, None)

    def pump(self, timeout: float) -> None:
        """Send what :meth:`start` queued, wait up to ``timeout`` s for replies (or :meth:`wake`), hand them out.

        The callbacks run here, on the pumping thread.  Returns after one
        round: when something came, when woken, or after ``timeout``.
        """
        with self._lock:
            closed = self._closed
        if closed:
            self._close_sockets()
            raise TransportError("channel is closed")
        self._round(timeout)

    def wake(self) -> None:
        """Make the pumping thread's :meth:`pump` return now (from any thread; one byte per batch)."""
        with self._lock:
            if self._wake_pending or self._closed:
                return
            self._wake_pending = True
        self._wake()

    # -- the I/O role ------------------------------------------------------------------

    def _drive(self, mine: _Call, deadline: float) -> None:
        """Hold the I/O role until ``mine`` has its reply or its deadline passes; then pass the role on."""
        try:
            while not mine.done:
                with self._lock:
                    closed = self._closed
                if closed:
                    self._close_sockets()
                    return
                left = deadline - time.monotonic()
                self._round(left)
                if left <= 0:
                    return
        finally:
            self._pass_role(mine)

    def _round(self, left: float) -> None:
        """Send the outbox, poll up to ``left`` s, read what came and complete its calls."""
        with self._lock:
            out, self._outbox = self._outbox, []
        failed = []
        for rid, addr, data in out:
            try:
                self._send(addr, data)
            except TransportError as e:  # no socket for addr (a CURVE key missing): that call fails
                failed.append((rid, _Failed(e)))
        if failed:
            self._complete(failed)
        events = dict(self._poller.poll(_ms(left) if left > 0 else 0))
        if self._wake_r.fileno() in events:
            # Read the bytes, then clear the flag (under the lock), then take the outbox
            # at the next round: a request queued after the flag was cleared either
            # is in that outbox or wrote a new byte.
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass
            with self._lock:
                self._wake_pending = False
        got: list[tuple[int, Any]] = []
        for sock, ev in events.items():
            if isinstance(sock, zmq.Socket):
                if ev & _POLLOUT:
                    self._flush_held(self._by_sock[sock])
                if ev & _POLLIN:
                    self._recv_all(sock, got)
        if got:
            self._complete(got)

    def _send(self, addr: str, data: bytes) -> None:
        sock = self._socks.pop(addr, None)
        if sock is None:
            sock = self._open(addr)  # TransportError: the caller is told (see _round)
        else:
            self._socks[addr] = sock  # (the dict's order: least recently used first)
        held = self._held.get(addr)
        if held:  # the first connection is not up yet: keep the order
            held.append(data)
            return
        try:
            sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            # Not connected (IMMEDIATE) or the queue is full: hold frames until the socket is
            # writable, up to a bound; beyond it the request is lost (its call times out).
            if held is None:
                held = self._held[addr] = collections.deque()
                self._held_bytes[addr] = 0
            if len(held) < _CHANNEL_HELD and self._held_bytes[addr] + len(data) <= self._max_frame_size:
                held.append(data)
                self._held_bytes[addr] += len(data)
            self._poller.modify(sock, _POLLIN | _POLLOUT)

    def _flush_held(self, addr: str) -> None:
        sock, held = self._socks[addr], self._held.get(addr)
        while held:
            try:
                sock.send(held[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            self._held_bytes[addr] -= len(held.popleft())
        self._held.pop(addr, None)
        self._poller.modify(sock, zmq.POLLIN)

    def _open(self, addr: str) -> zmq.Socket:
        key = self._server_key(addr) if self._server_key is not None else None
        if len(self._socks) >= _CHANNEL_SOCKETS:
            self._close_socket(next(iter(self._socks)))  # the least recently used
        try:
            sock = _dealer(self._ctx, addr, hwm=self._hwm, max_frame_size=self._max_frame_size,
                           reconnect_ivl=0.1, reconnect_ivl_max=1.0, keypair=self._keypair, server_key=key)
        except (zmq.ZMQError, TypeError, ValueError) as e:  # out of sockets or files, or an address libzmq refuses
            raise TransportError(f"cannot open a connection to {addr!r:.100}: {e}") from None
        self._socks[addr] = sock
        self._by_sock[sock] = addr
        self._poller.register(sock, zmq.POLLIN)
        return sock

    def _recv_all(self, sock: zmq.Socket, got: list) -> None:
        name = self.cluster_name
        for _ in range(4096):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = _client_reply(parts, name, self._by_sock.get(sock))
            if reply is not None:
                got.append(reply)
                if len(self._calls) <= 1:
                    return  # a lone caller's reply: nothing else is awaited (the poll is level-triggered)
            # Asking EVENTS costs less than the exception of a recv that finds nothing.
            if not sock.get(zmq.EVENTS) & _POLLIN:  # type: ignore[operator]  # EVENTS is an int option
                return

    def _complete(self, got: list[tuple[int, Any]]) -> None:
        me = self._io
        callbacks = []
        with self._lock:
            pop = self._calls.pop
            for rid, msg in got:
                c = pop(rid, None)
                if c is None:
                    continue  # its call gave up
                if c.callback is not None:
                    callbacks.append((c.callback, msg))
                    continue
                c.reply = msg
                c.done = True
                if c is not me:
                    c.waiter.release()
        for cb, msg in callbacks:
            if type(msg) is _Failed:
                cb(None, msg.error)
            else:
                cb(msg, None)

    def _pass_role(self, mine: _Call) -> None:
        with self._lock:
            self._calls.pop(mine.rid, None)
            nxt = next(iter(self._calls.values()), None)
            self._io = nxt
            if nxt is not None:
                nxt.waiter.release()  # it wakes holding the role (see call)
                return
            closed = self._closed
        if closed:
            self._close_sockets()

    def _close_socket(self, addr: str) -> None:
        sock = self._socks.pop(addr)
        del self._by_sock[sock]
        self._poller.unregister(sock)
        sock.close(0)
        self._held.pop(addr, None)
        self._held_bytes.pop(addr, None)

    def _close_sockets(self) -> None:
        for sock in self._socks.values():
            self._poller.unregister(sock)
            sock.close(0)
        self._socks.clear()
        self._by_sock.clear()
        self._held.clear()
        self._held_bytes.clear()

    def close(self) -> None:
        """Fail the calls in flight and close the sockets (now, or as the I/O thread leaves).  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for c in self._calls.values():
                if c is not self._io and c.waiter is not None:
                    c.reply, c.done = _Failed(TransportError("channel is closed")), True
                    c.waiter.release()
            # (A started call is dropped: the thread that pumps the channel fails its own.)
            self._calls = {c.rid: c for c in self._calls.values() if c is self._io}
            idle = self._io is None
            if idle:
                self._close_sockets()
        if not idle:
            self._wake()
        # The socketpair stays open until the object goes: a late wake() must not hit a reused fd.

    def __enter__(self) -> "ZmqChannel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
