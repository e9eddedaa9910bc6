"""CURVE: encrypted, authenticated transports; unknown keys get nothing through."""
from __future__ import annotations

import os
import shutil
import stat
import threading
import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from pyraft.codec import ClientRequest, ClientResponse, encode_message
from pyraft.errors import Timeout
from pyraft.transports.zmq import CurveConfig, TransportError, ZmqClient, ZmqTransport, generate_keys
from pyraft.types import Node

pytestmark = pytest.mark.timeout(60)

ANY = "tcp://127.0.0.1:*"
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def wait_until(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def pyraft_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("pyraft-")]


def call(conn, message, timeout=5.0):
    """Send once and wait for the reply with the same id.

    No resend is needed on a fresh connection: a frame sent before it is up
    is held and flushed by ``recv``.
    """
    rid = conn.send(message)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = conn.recv(deadline - time.monotonic())
        if r is not None and r[0] == rid:
            return r[1]
    return None


class Keys:
    """The documented layout: public keys in allowed/, each secret file kept apart."""

    def __init__(self, root):
        self.allowed = root / "allowed"
        self.private = root / "private"
        self.allowed.mkdir()
        for name in ("1", "2", "3", "client"):
            self.add(name)
        self.intruder_pub, self.intruder_sec = generate_keys(root / "intruder", "intruder")

    def add(self, name):
        pub, sec = generate_keys(self.private, name)
        shutil.move(pub, self.allowed / f"{name}.key")
        return sec

    def config(self, name):
        return CurveConfig(self.private / f"{name}.key_secret", allowed_keys_dir=self.allowed)


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path)


@pytest.fixture
def hits():
    return []


@pytest.fixture
def node(keys, hits):
    made = []

    def make(node_id, curve=None, listen=ANY):
        t = ZmqTransport(node_id, listen, curve=curve or keys.config(str(node_id)))

        def handler(from_id, msg, reply):
            hits.append((node_id, from_id, msg))
            reply.reply(ClientResponse(True, [node_id, from_id]))

        if listen is not None:
            t.start(handler)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()
    assert pyraft_threads() == []


def test_two_transports_with_keys_talk_both_ways(keys, node, hits):
    a, b = node(1), node(2)
    ab = a.connect(2, Node(b.endpoint))  # finds allowed/2.key
    ba = b.connect(1, Node(a.endpoint))
    assert call(ab, ClientRequest("x")) == ClientResponse(True, [2, 1])
    assert call(ba, ClientRequest("y")) == ClientResponse(True, [1, 2])
    assert a.public_key == zmq.auth.load_certificate(str(keys.allowed / "1.key"))[0]
    assert "pyraft-zap" in pyraft_threads()
    ab.close()
    ba.close()


def test_a_client_with_an_unlisted_key_gets_nothing_through(keys, node, hits):
    srv = node(1)
    intruder = ZmqTransport(99, None, curve=CurveConfig(keys.intruder_sec, allowed_keys_dir=keys.allowed))
    try:
        c = intruder.connect(1, Node(srv.endpoint))  # knows the server key, but is not allowed
        for _ in range(5):
            c.send(ClientRequest("let me in"))
        assert c.recv(0.05) is None
        wait_until(lambda: srv.stats.get("auth_rejected", 0) >= 1, what="the ZAP handler to refuse the key")
        # a listed client still gets in, and only its request reached the handler
        friend = node(2, listen=None).connect(1, Node(srv.endpoint))
        assert call(friend, ClientRequest("hello")) == ClientResponse(True, [1, 2])
        assert [h[1] for h in hits] == [2]
        assert srv.stats.get("frames_in", 0) == len(hits) == 1
        c.close()
        friend.close()
    finally:
        intruder.close()


def test_plaintext_and_wrong_server_key_clients_get_nothing_through(keys, node, hits):
    srv = node(1)
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    wrong = ctx.socket(zmq.DEALER)
    wrong.setsockopt(zmq.LINGER, 0)
    cpub, csec = zmq.auth.load_certificate(str(keys.private / "client.key_secret"))
    wrong.curve_serverkey = zmq.curve_keypair()[0]  # not node 1's key
    wrong.curve_publickey, wrong.curve_secretkey = cpub, csec
    try:
        for s in (plain, wrong):
            mon = s.get_monitor_socket(HANDSHAKE_FAILED)
            s.connect(srv.endpoint)
            s.send(encode_message(ClientRequest("x"), "pyraft", 5, 1), zmq.NOBLOCK)
            assert mon.poll(5000), "no handshake failure reported"
            assert recv_monitor_message(mon)["event"] & HANDSHAKE_FAILED
            s.disable_monitor()
            mon.close(0)
        friend = node(3, listen=None).connect(1, Node(srv.endpoint))
        assert call(friend, ClientRequest("hello")) == ClientResponse(True, [1, 3])
        assert [h[1] for h in hits] == [3]
        friend.close()
    finally:
        plain.close(0)
        wrong.close(0)


def test_server_key_from_node_data(keys, node, tmp_path):
    other = tmp_path / "elsewhere"
    pub, sec = generate_keys(other, "srv")
    shutil.copy(pub, keys.allowed / "srv.key")  # allowed as a client, but not named by node id
    srv = node(5, curve=CurveConfig(sec, public_key_file=pub, allowed_keys_dir=keys.allowed))
    cli = node(2, listen=None)
    with pytest.raises(TransportError, match="no CURVE public key for node 5"):
        cli.connect(5, Node(srv.endpoint))
    c = cli.connect(5, Node(srv.endpoint, {"curve_public_key": srv.public_key.decode()}))
    assert call(c, ClientRequest("x")) == ClientResponse(True, [5, 2])
    c.close()


def test_allowed_key_files_list_and_zmq_client(keys, node, tmp_path):
    srv = node(1, curve=CurveConfig(keys.private / "1.key_secret",
                                    allowed_key_files=[keys.allowed / "client.key"]))
    client_cfg = CurveConfig(keys.private / "client.key_secret")
    with ZmqClient(srv.endpoint, curve=client_cfg, server_key=keys.allowed / "1.key") as zc:
        assert zc.call(ClientRequest("x"), timeout=5) == ClientResponse(True, [1, 0])
    with ZmqClient(srv.endpoint, curve=client_cfg, server_key=srv.public_key) as zc:
        assert zc.call(ClientRequest("x"), timeout=5) == ClientResponse(True, [1, 0])
    # node 2's key is in the directory but not in this server's list
    with ZmqClient(srv.endpoint, curve=keys.config("2"), server_key=srv.public_key) as zc:
        with pytest.raises(Timeout):
            zc.call(ClientRequest("x"), timeout=0.3)
    with pytest.raises(TransportError, match="server_key"):
        ZmqClient(srv.endpoint, curve=client_cfg)


def test_a_key_added_to_the_directory_is_accepted_without_restart(keys, node, hits):
    srv = node(1)
    sec = keys.private / "late.key_secret"
    assert not sec.exists()
    time.sleep(0.01)  # let the directory's mtime tick over on coarse filesystems
    keys.add("late")
    with ZmqClient(srv.endpoint, curve=CurveConfig(sec), server_key=srv.public_key) as zc:
        assert zc.call(ClientRequest("x"), timeout=5) == ClientResponse(True, [1, 0])


def test_generate_keys_layout(tmp_path):
    pub, sec = generate_keys(tmp_path / "k", "7")
    assert pub == str(tmp_path / "k" / "7.key") and sec == str(tmp_path / "k" / "7.key_secret")
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    with pytest.raises(TransportError, match="already exist"):
        generate_keys(tmp_path / "k", "7")
    generate_keys(tmp_path / "k", "7", overwrite=True)
    cfg = CurveConfig(sec, public_key_file=pub)
    assert cfg.keypair()[0] == zmq.auth.load_certificate(pub)[0]
    with pytest.raises(TransportError, match="holds no secret key"):
        CurveConfig(pub).keypair()
    with pytest.raises(TransportError, match="cannot read"):
        ZmqTransport(1, ANY, curve=CurveConfig(tmp_path / "missing.key_secret"))
    assert pyraft_threads() == []


def test_curve_and_plain_transports_coexist_in_one_process(keys, node, hits):
    secure = node(1)
    plain = ZmqTransport(8, ANY)
    plain.start(lambda f, m, r: r.reply(ClientResponse(True, "plain")))
    plain_client = ZmqTransport(9, None)
    try:
        c = plain_client.connect(8, Node(plain.endpoint))
        assert call(c, ClientRequest("x")) == ClientResponse(True, "plain")
        s = node(2, listen=None).connect(1, Node(secure.endpoint))
        assert call(s, ClientRequest("x")) == ClientResponse(True, [1, 2])
        c.close()
        s.close()
    finally:
        plain.close()
        plain_client.close()
