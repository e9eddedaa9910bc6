"""Helpers for the hostile-network tests (``test_hostile_*.py``): the attacker's side.

- :class:`HostileCluster`: ``pyraft-kv serve`` nodes as processes (a
  :class:`~pyraft.tools.kv.LocalCluster`) whose CURVE allow-list is the role
  layout of the contract::

      allow/peers/N.key  allow/admins/admin.key  allow/clients/client.key  allow/readers/reader.key

  or the old flat layout (``allow/N.key`` peers, every other ``allow/*.key``
  a client), or no CURVE at all.  Every key's secret half is in
  ``private/<name>/<name>.key_secret``; ``stranger`` is a key no node lists.
  Clients find the nodes' server keys in ``serverkeys/N.key`` (a plain
  client-side directory, so the harness does not depend on how a server
  reads its allow-list).
- :class:`RawSocket`: a ZeroMQ DEALER that speaks the wire format itself
  (one frame per message: ``[version, cluster_name, from_id, request_id, tag,
  body]``), to send what no honest node would.
- checks: every node serves and is not Fatal, terms are sane, the KV
  contents of every node are what the legitimate client wrote, and the
  counters show that something was refused.

``PYRAFT_HOSTILE_LAYOUT=flat`` runs the CURVE tests against the flat layout
instead of the role layout (a build that does not know roles loads it, so
the attacks then reach the engine: that is how to watch them land).
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import time
from typing import Any, Iterable

import pytest
import zmq

from pyraft.codec import ClientRequest, ClientResponse, decode_message, encode_message
from pyraft.errors import CodecError, RaftError
from pyraft.tools.kv import LocalCluster
from pyraft.transports.zmq import CurveConfig, ZmqClient, generate_keys

from procs import PROC_CONFIG, pid_alive, wait_for

#: The CURVE layout the CURVE tests run against: "roles" (the contract) or "flat" (the old layout).
CURVE_LAYOUT = os.environ.get("PYRAFT_HOSTILE_LAYOUT", "roles")

ROLE_DIRS = {"admin": "admins", "client": "clients", "reader": "readers"}

#: A term no test run reaches honestly: anything above it came from an attacker.
SANE_TERM = 2**32

#: Counter names that say a message was refused (dropped, rejected, denied, ...); the
#: contract fixes no names for the transport's drops, so they are recognised by these words.
_REFUSAL_WORDS = ("drop", "refus", "reject", "denied", "forg", "unauth", "not_peer", "wrong", "invalid")
#: Counters with such words that other things move: normal traffic, and the CURVE handshakes of
#: unlisted keys (refused before any of their messages arrives).
_NORMAL_COUNTERS = {"sends_dropped", "replies_dropped", "auth_rejected"}


def refusals(counters: dict | None) -> int:
    """The sum of the counters that count refused or dropped input."""
    if not counters:
        return 0
    return sum(v for k, v in counters.items()
               if k not in _NORMAL_COUNTERS and any(w in k for w in _REFUSAL_WORDS) and isinstance(v, int))


# ---------------------------------------------------------------------------
# The cluster

class HostileCluster(LocalCluster):
    """A LocalCluster with ``layout`` "roles", "flat" or "none" (no CURVE); see the module docstring."""

    def __init__(self, base_dir: Any, n: int = 3, *, layout: str = "roles", config: dict | None = None,
                 **kw: Any) -> None:
        if layout not in ("roles", "flat", "none"):
            raise ValueError(f"layout must be roles, flat or none, got {layout!r}")
        self.layout = layout
        super().__init__(base_dir, n, config=config or PROC_CONFIG, curve=layout != "none", **kw)

    def _make_keys(self) -> None:
        self.keys_dir = os.path.join(self.base_dir, "allow")
        self.private_dir = os.path.join(self.base_dir, "private")
        self.server_keys_dir = os.path.join(self.base_dir, "serverkeys")
        for d in (self.keys_dir, self.server_keys_dir):
            os.makedirs(d, exist_ok=True)
        for i in self.ids:
            self.make_role_key(str(i), "peer")
        for role in ROLE_DIRS:
            self.make_role_key(role, role)
        self.make_role_key("stranger", None)

    def make_role_key(self, name: str, role: str | None) -> str:
        """A new keypair ``name``, listed for ``role`` ("peer", "admin", "client", "reader"; None: unlisted)."""
        pub, sec = generate_keys(os.path.join(self.private_dir, name), name)
        if role == "peer":
            shutil.copy(pub, os.path.join(self.server_keys_dir, f"{name}.key"))
        if role is not None:
            sub = "" if self.layout == "flat" else ("peers" if role == "peer" else ROLE_DIRS[role])
            d = os.path.join(self.keys_dir, sub)
            os.makedirs(d, exist_ok=True)
            shutil.copy(pub, os.path.join(d, f"{name}.key"))
        return sec

    def secret(self, name: str) -> str:
        return os.path.join(self.private_dir, name, f"{name}.key_secret")

    def client_curve(self, secret_file: str | None = None) -> Any:
        """The harness's own calls (status, metrics) use the admin key."""
        if self.keys_dir is None:
            return None
        return CurveConfig(secret_key_file=secret_file or self.secret("admin"), allowed_keys_dir=self.server_keys_dir)

    def curve_of(self, name: str) -> CurveConfig | None:
        return None if self.keys_dir is None else self.client_curve(self.secret(name))

    def kv(self, key_name: str = "client", timeout: float = 10.0, **kw: Any) -> Any:
        """A KVClient with key ``key_name`` (no CURVE: a plain client)."""
        return self.client(timeout=timeout, curve=self.curve_of(key_name), **kw)

    def raw(self, i: int, key_name: str | None = "client") -> "RawSocket":
        """A raw DEALER to node ``i`` holding key ``key_name`` (ignored without CURVE)."""
        keypair = server_key = None
        if self.keys_dir is not None and key_name is not None:
            keypair = CurveConfig(self.secret(key_name)).keypair()
            server_key = self.client_curve().server_key_for(i)
        return RawSocket(self.addrs[i], self.cluster_name, keypair=keypair, server_key=server_key)

    def call(self, i: int, request: ClientRequest, key_name: str = "admin", timeout: float = 5.0) -> Any:
        """``request`` to node ``i`` with key ``key_name``; the reply, or None when none comes in time."""
        curve = self.curve_of(key_name)
        skey = curve.server_key_for(i) if curve is not None else None
        try:
            with ZmqClient(self.addrs[i], self.cluster_name, curve=curve, server_key=skey) as c:
                return c.call(request, timeout)
        except RaftError:
            return None

    def metrics(self, i: int, timeout: float = 2.0) -> dict | None:
        r = self.call(i, ClientRequest("metrics"), timeout=timeout)
        return r.body if isinstance(r, ClientResponse) and r.ok else None

    def kv_items(self, i: int) -> dict:
        """Node ``i``'s KV contents, read from its files (read-only, while it runs)."""
        from pyraft.kv import KVStateMachine
        r = KVStateMachine.open_readonly(self.data_dir(i))
        try:
            return dict(r.items())
        finally:
            r.close()


# ---------------------------------------------------------------------------
# The attacker's socket

class RawSocket:
    """A DEALER to one node that sends whatever it is given; used by one thread."""

    def __init__(self, addr: str, cluster_name: str, *, keypair: tuple[bytes, bytes] | None = None,
                 server_key: bytes | None = None, context: zmq.Context | None = None) -> None:
        self.addr = addr
        self.cluster_name = cluster_name
        self._ids = itertools.count(1)
        s = (context or zmq.Context.instance()).socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        if server_key is not None:
            s.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            s.setsockopt(zmq.CURVE_PUBLICKEY, keypair[0])
            s.setsockopt(zmq.CURVE_SECRETKEY, keypair[1])
        s.connect(addr)
        self.sock = s

    def next_id(self) -> int:
        return next(self._ids)

    def send_frame(self, data: bytes) -> bool:
        """Queue one frame; False when the socket's queue is full (the frame is lost)."""
        try:
            self.sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def send(self, message: Any, from_id: int, request_id: int | None = None) -> int:
        """Encode ``message`` with the codec, claiming to be ``from_id``; returns the request id."""
        rid = self.next_id() if request_id is None else request_id
        self.send_frame(encode_message(message, self.cluster_name, from_id, rid))
        return rid

    def replies(self, timeout: float) -> Iterable[tuple[int, Any]]:
        """Every reply that arrives within ``timeout`` seconds, as ``(request_id, message)``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                return
            parts = self.sock.recv_multipart()
            if len(parts) != 1:
                continue
            try:
                f = decode_message(parts[0], None)
            except CodecError:
                continue
            yield f.request_id, f.message

    def wait_reply(self, request_id: int, timeout: float) -> Any:
        """The reply to ``request_id``, or None when it does not come within ``timeout`` seconds."""
        for rid, msg in self.replies(timeout):
            if rid == request_id:
                return msg
        return None

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> "RawSocket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Checks

def assert_serving(c: HostileCluster, ids: Iterable[int] | None = None, timeout: float = 10.0) -> dict[int, dict]:
    """Every node of ``ids`` runs, answers its status and is not Fatal; returns the statuses."""
    out = {}
    for i in (c.ids if ids is None else ids):
        p = c.procs[i]
        st = None
        deadline = time.monotonic() + timeout
        while st is None:
            if p.poll() is not None:
                raise AssertionError(f"node {i} exited with code {p.returncode}:\n{c.log_tail(i)}")
            st = c.status(i, 0.5)
            if st is None and time.monotonic() > deadline:
                raise AssertionError(f"node {i} does not answer its status within {timeout} s:\n{c.log_tail(i)}")
        assert st["state"] != "Fatal", f"node {i} is Fatal:\n{c.log_tail(i)}"
        out[i] = st
    return out


def assert_terms_sane(statuses: dict[int, dict]) -> None:
    bad = {i: st["term"] for i, st in statuses.items() if not 0 <= st["term"] < SANE_TERM}
    assert not bad, f"terms an attacker set: {bad}"


def wait_applied_everywhere(c: HostileCluster, index: int, ids: Iterable[int] | None = None,
                            timeout: float = 20.0) -> None:
    for i in (c.ids if ids is None else ids):
        wait_for(lambda i=i: ((c.status(i) or {}).get("applied") or 0) >= index, timeout,
                 f"node {i} to apply index {index}")


def settle_and_compare(c: HostileCluster, acked: dict, attempted: dict | None = None,
                       timeout: float = 20.0) -> dict:
    """Write one more key, wait until every node applied it, and check every node's KV contents.

    Each node must hold every acknowledged write, nothing else than the writes
    attempted (a write that timed out may or may not be there), and the same
    contents as the others.  Returns the contents.
    """
    attempted = dict(attempted or {})
    with c.kv("client", timeout=timeout) as kv:
        kv.put("settle", "done")
        # The settle write's own index: a node's status may report its applied index a
        # moment after the write was applied (RaftCore publishes it at its next turn).
        target = kv.range("settle")[0].mod_revision
    acked = dict(acked, settle="done")
    attempted.update(acked)
    wait_applied_everywhere(c, target, timeout=timeout)
    contents = {i: c.kv_items(i) for i in c.ids}
    for i, items in contents.items():
        missing = {k: v for k, v in acked.items() if items.get(k) != v}
        assert not missing, f"node {i} lost acknowledged writes: {sorted(missing)[:10]}"
        foreign = {k: v for k, v in items.items() if k not in attempted or attempted[k] != v}
        assert not foreign, f"node {i} applied writes no client proposed: {foreign}"
    first = contents[c.ids[0]]
    for i, items in contents.items():
        assert items == first, f"node {i} disagrees with node {c.ids[0]}: {set(items) ^ set(first)}"
    return first


def wait_handled(c: HostileCluster, i: int, before: int, sock: RawSocket | None, request_id: int | None,
                 timeout: float = 10.0) -> str:
    """Wait until node ``i`` has dealt with an attack: it replied to ``request_id``, or its refusal
    counters rose above ``before``.  Returns "reply" or "refused"."""
    deadline = time.monotonic() + timeout
    while True:
        if sock is not None and request_id is not None:
            if sock.wait_reply(request_id, 0.1) is not None:
                return "reply"
        m = c.metrics(i, 1.0)
        if m is not None and refusals(m.get("counters")) > before:
            return "refused"
        if c.procs[i].poll() is not None:
            raise AssertionError(f"node {i} exited with code {c.procs[i].returncode} under attack:\n{c.log_tail(i)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"node {i} neither answered the attack nor counted it as refused "
                                 f"within {timeout} s (counters: {m and m.get('counters')})")


def refusals_of(c: HostileCluster, i: int) -> int:
    m = c.metrics(i)
    assert m is not None, f"node {i} does not answer metrics:\n{c.log_tail(i)}"
    return refusals(m.get("counters"))


# ---------------------------------------------------------------------------
# The fixture

@pytest.fixture
def hostile_cluster(request, tmp_path):
    """``hostile_cluster(layout="roles", config=None)`` -> a started 3-node HostileCluster with a leader.

    Every node process is stopped at teardown (SIGTERM, then SIGKILL); the
    nodes' log tails are printed when the test failed.
    """
    made: list[HostileCluster] = []

    def make(layout: str = "roles", config: dict | None = None) -> HostileCluster:
        c = HostileCluster(tmp_path / f"c{len(made)}", 3, layout=layout, config=config)
        made.append(c)
        c.start_all()
        c.wait_leader(20)
        return c

    failed_before = request.session.testsfailed
    yield make
    pids = []
    for c in made:
        pids += [p.pid for p in c.procs.values()]
        c.close()
    if request.session.testsfailed > failed_before:
        for c in made:
            for i in c.ids:
                print(f"\n----- node {i} log ({c.log_path(i)}) -----\n{c.log_tail(i, 40)}")
    left = [pid for pid in pids if pid_alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"node processes still running after the test: {left}"
