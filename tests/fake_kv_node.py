"""A fake KV node for client tests: a ROUTER that answers each ClientRequest as a handler says.

``FakeNode(handler)``: ``handler(op, body)`` -> ``("reply", body)`` | ``("drop", None)`` |
``("delay", seconds, body)``, a successful reply made by the real codec.  With ``raw=True``,
``handler(op, body, rid)`` returns the frames to send back as bytes: with :func:`frame` and
:func:`err`, a node that lies in any shape the wire allows (no check on what it sends).
"""
from __future__ import annotations

import threading
import time

import msgpack
import zmq

from pyraft.codec import FORMAT_VERSION, ClientResponse, decode_message, encode_message

#: The message tag of a ClientResponse (pyraft.codec).
_CLIENT_RESPONSE_TAG = 21


def frame(ok, body=None, error=None, rid=0, cluster="pyraft") -> bytes:
    """A ClientResponse frame with any ``ok``, ``body`` and ``error``, unchecked."""
    return msgpack.packb([FORMAT_VERSION, cluster, 1, rid, _CLIENT_RESPONSE_TAG, [ok, body, error]],
                         use_bin_type=True)


def err(name, message="m", leader_id=None, leader_addr=None, rid=0) -> bytes:
    """A failed ClientResponse frame: ``[name, message, leader_id, leader_addr]``, unchecked."""
    return frame(False, None, [name, message, leader_id, leader_addr], rid)


class FakeNode:
    def __init__(self, handler, cluster_name="pyraft", *, raw=False, bind="tcp://127.0.0.1"):
        self.handler = handler
        self.cluster_name = cluster_name
        self.raw = raw
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port(bind)
        self.addr = f"tcp://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._delayed = []  # (when, ident, frame)
        self._t = threading.Thread(target=self._loop, name="fake-kv-node", daemon=True)
        self._t.start()

    def _answer(self, f) -> list[bytes]:
        if self.raw:
            return list(self.handler(f.message.op, f.message.body, f.request_id) or ())
        action = self.handler(f.message.op, f.message.body)
        if action[0] == "drop":
            return []
        data = encode_message(ClientResponse(True, action[-1]), self.cluster_name, 1, f.request_id)
        if action[0] == "delay":
            return [(time.monotonic() + action[1], data)]
        return [data]

    def _loop(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            now = time.monotonic()
            due = [d for d in self._delayed if d[0] <= now]
            self._delayed = [d for d in self._delayed if d[0] > now]
            for _, ident, data in due:
                self.sock.send_multipart([ident, data])
            if not dict(poller.poll(10)):
                continue
            while True:
                try:
                    ident, data = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                for out in self._answer(decode_message(data, None)):
                    if isinstance(out, tuple):
                        self._delayed.append((out[0], ident, out[1]))
                    else:
                        self.sock.send_multipart([ident, out])

    def close(self):
        self._stop.set()
        self._t.join()
        self.sock.close(0)


def down_address():
    """An address nothing listens on."""
    s = zmq.Context.instance().socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(0)
    return f"tcp://127.0.0.1:{port}"
