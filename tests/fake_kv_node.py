"""A fake KV node for client tests: a ROUTER that answers each ClientRequest as a handler says."""
from __future__ import annotations

import threading
import time

import zmq

from pyraft.codec import ClientResponse, decode_message, encode_message


class FakeNode:
    """``handler(op, body)`` -> ``("reply", body)`` | ``("drop", None)`` | ``("delay", seconds, body)``."""

    def __init__(self, handler, cluster_name="pyraft"):
        self.handler = handler
        self.cluster_name = cluster_name
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._delayed = []  # (when, ident, frame)
        self._t = threading.Thread(target=self._loop, name="fake-kv-node", daemon=True)
        self._t.start()

    def _loop(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            now = time.monotonic()
            due = [d for d in self._delayed if d[0] <= now]
            self._delayed = [d for d in self._delayed if d[0] > now]
            for _, ident, frame in due:
                self.sock.send_multipart([ident, frame])
            if not dict(poller.poll(10)):
                continue
            while True:
                try:
                    ident, data = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                f = decode_message(data, self.cluster_name)
                action = self.handler(f.message.op, f.message.body)
                if action[0] == "drop":
                    continue
                frame = encode_message(ClientResponse(True, action[-1]), self.cluster_name, 1, f.request_id)
                if action[0] == "delay":
                    self._delayed.append((time.monotonic() + action[1], ident, frame))
                else:
                    self.sock.send_multipart([ident, frame])

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
