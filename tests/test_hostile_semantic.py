"""Semantic fuzzing of a live CURVE cluster: well-formed messages with hostile values, from keys that may not send them.

The frame fuzzer (``test_zmq_fuzz.py``) damages bytes; this one speaks the
wire format correctly and lies: Raft RPCs built with the codec's own classes
carrying terms 0, current, current+1, 2**62 and 2**63-1, forged leader and
candidate ids, indexes past the log, entries whose terms go backwards,
membership changes, snapshots of garbage under lying metas, responses sent as
requests, admin operations and KV commands the store cannot hold, and frames
whose length headers declare far more than they carry.  They come from three
attackers at a 3-node ``pyraft-kv serve`` cluster with CURVE and the role
layout, while a legitimate client writes:

- a key no node lists (it must get nothing through),
- a KV client key (no Raft RPC of it may count; no admin operation may run:
  ``PermissionDenied``; no command of it that the store cannot hold may be proposed),
- node K's peer key claiming to be another node (its Raft RPCs must be dropped).

Afterwards every node serves (none Fatal, every process alive), terms are
sane, the forged traffic was counted, writes commit, every node holds exactly
what the legitimate client wrote (nothing an attacker sent was applied) and
the same as the others, and ``pyraft-inspect verify`` finds every log sound.

Reproduce with ``PYRAFT_FUZZ_SEED=<seed> python -m pytest tests/test_hostile_semantic.py``
(the seed is printed, and named in the failure); ``-m soak`` runs longer ones.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import threading
import time
from typing import Any, Callable

import msgpack
import pytest

from pyraft.codec import FORMAT_VERSION, ClientRequest, ClientResponse
from pyraft.errors import CodecError, Timeout
from pyraft.messages import (AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
                             InstallSnapshotResponse, TimeoutNowRequest, TimeoutNowResponse, VoteRequest,
                             VoteResponse)
from pyraft.tools.inspect import main as inspect_main
from pyraft.types import Entry, EntryKind, LogId, Membership, Node, SnapshotMeta, StoredMembership

from hostile import (CURVE_LAYOUT, assert_serving, assert_terms_sane, hostile_cluster,  # noqa: F401
                     refusals, settle_and_compare)

pytestmark = [pytest.mark.slow]

MAX = 2**63 - 1
SEEDS = [int(os.environ["PYRAFT_FUZZ_SEED"])] if "PYRAFT_FUZZ_SEED" in os.environ else None

#: Admin operations a client key may not run, with bodies that would be accepted from an admin.
ADMIN_OPS = ("admin.snapshot", "admin.purge_log", "admin.transfer_leader", "admin.change_membership",
             "admin.add_learner", "admin.remove")


class View:
    """What the attacker knows of the cluster: its term, leader and last index (refreshed now and then)."""

    def __init__(self, c) -> None:
        self.c = c
        self.term, self.leader, self.last = 1, c.ids[0], 1
        self.refresh()

    def refresh(self) -> None:
        lead = self.c.leader()
        m = self.c.metrics(lead) if lead is not None else None
        if m is not None:
            self.term, self.leader, self.last = m["current_term"], lead, max(1, m["last_log_index"])


class Attack:
    """Builds hostile messages from one rng; every choice is the rng's, so a seed replays the same attack."""

    def __init__(self, rng: random.Random, c, view: View) -> None:
        self.rng = rng
        self.c = c
        self.v = view
        self.n = 0

    # -- values

    def term(self) -> int:
        t = self.v.term
        return self.rng.choice([0, max(0, t - 1), t, t, t + 1, t + 1, 2**62, MAX])

    def node_id(self) -> int:
        return self.rng.choice(list(self.c.ids) * 2 + [0, 4, 99, MAX])

    def index(self) -> int:
        n = self.v.last
        return self.rng.choice([1, max(1, n - 1), n, n + 1, n + 2, n + 1000, 2**62, MAX])

    def log_id(self) -> LogId | None:
        if self.rng.random() < 0.1:
            return None
        return LogId(self.term(), self.index())

    def membership(self) -> Membership:
        r = self.rng.random()
        if r < 0.4:  # everyone replaced by a node that does not exist
            return Membership.of({99: Node("tcp://127.0.0.1:9")})
        if r < 0.7:  # one real node only
            i = self.rng.choice(self.c.ids)
            return Membership.of({i: Node(self.c.addrs[i])})
        return Membership.of({i: Node(self.c.addrs[i]) for i in self.c.ids} | {4: Node("tcp://127.0.0.1:9")})

    def command(self) -> dict:
        self.n += 1
        return {"op": "put", "key": f"evil-{self.n}", "value": self.rng.choice(["pwned", 0, None, b"\0" * 8])}

    def entries(self, first_term: int) -> tuple[Entry, ...]:
        out = []
        t = first_term
        for k in range(self.rng.randrange(4)):
            kind = self.rng.choice([EntryKind.NORMAL, EntryKind.NORMAL, EntryKind.BLANK, EntryKind.MEMBERSHIP])
            payload = {EntryKind.NORMAL: self.command, EntryKind.BLANK: lambda: None,
                       EntryKind.MEMBERSHIP: self.membership}[kind]()
            out.append(Entry(LogId(t, k + 1), kind, payload))
            t = self.rng.choice([t, t, max(0, t - 1), 0, t + 1])  # terms out of order, now and then
        return tuple(out)

    def garbage(self) -> bytes:
        r = self.rng.random()
        if r < 0.3:
            return b""
        if r < 0.6:
            return self.rng.randbytes(self.rng.randrange(1, 64 * 1024))
        if r < 0.8:  # starts like something, then lies
            return b"PYRAFT" + self.rng.randbytes(self.rng.randrange(100))
        return msgpack.packb({"version": 1, "meta": None, "data": self.rng.randbytes(32)})

    # -- messages

    def raft_message(self, claimed: int) -> Any:
        """A Raft RPC (or a response sent as a request) claiming to come from ``claimed``."""
        rng = self.rng
        lid = claimed if rng.random() < 0.7 else self.node_id()
        k = rng.randrange(10)
        if k <= 2:
            t = self.term()
            return AppendEntriesRequest(t, lid, self.log_id(), self.entries(t),
                                        rng.choice([0, self.v.last, self.v.last + 1, MAX]), rng.randrange(2**32))
        if k <= 4:
            return VoteRequest(self.term(), lid, self.log_id(), pre_vote=rng.random() < 0.3,
                               transfer=rng.random() < 0.5)
        if k <= 6:
            meta = SnapshotMeta(self.log_id() or LogId(self.term(), self.index()),
                                StoredMembership(self.log_id(), self.membership()) if rng.random() < 0.8 else None,
                                rng.choice(["evil", "", "x" * 200, "../../etc/passwd"]))
            return InstallSnapshotRequest(self.term(), lid, meta, rng.choice([0, 0, 1, 4096, 2**62, MAX]),
                                          self.garbage(), rng.random() < 0.6)
        if k == 7:
            return TimeoutNowRequest(self.term(), lid)
        return rng.choice([
            lambda: AppendEntriesResponse(self.term(), True, self.log_id(), 0, self.index(), self.term(), 1),
            lambda: VoteResponse(self.term(), True, rng.random() < 0.5),
            lambda: InstallSnapshotResponse(self.term(), True, self.log_id()),
            lambda: TimeoutNowResponse(self.term()),
        ])()

    def admin_request(self) -> ClientRequest:
        rng = self.rng
        op = rng.choice(ADMIN_OPS)
        body = {"admin.snapshot": {}, "admin.purge_log": {"index": self.index()},
                "admin.transfer_leader": {"id": self.node_id()},
                "admin.change_membership": {"voters": [self.v.leader]},
                "admin.add_learner": {"id": self.node_id(), "blocking": False,
                                      "addr": rng.choice(["tcp://127.0.0.1:9", "tcp://bad address:1"])},
                "admin.remove": {"id": self.node_id()}}[op]
        return ClientRequest(op, body)

    def bad_write(self) -> ClientRequest:
        """A KV command a client may send but the store cannot hold, or that is malformed: none may apply."""
        rng = self.rng
        self.n += 1
        return ClientRequest("kv.write", rng.choice([
            {"op": "put", "key": f"evil-{self.n}-" + "k" * 600, "value": 1},
            {"op": "put", "key": f"evil-{self.n}", "value": 1, "client": b"c" * 600, "seq": 1},
            {"op": "put", "key": f"evil-{self.n}", "value": 1, "client": "c" * 700, "seq": rng.choice([0, MAX])},
            {"op": "truncate", "key": f"evil-{self.n}"},
            {"op": "put", "key": {"a": 1}, "value": 1},
            {"op": "put"},
            [f"evil-{self.n}"],
        ]))

    def lying_frame(self, claimed: int) -> bytes:
        """A frame whose msgpack headers declare far more than the frame carries (or nest far too deep)."""
        huge = b"\xff\xff\xff\xff"

        def head(tag: int) -> bytes:  # the envelope up to its body: [version, cluster, from, request id, tag, ...
            return b"\x96" + b"".join(msgpack.packb(x) for x in (FORMAT_VERSION, self.c.cluster_name, claimed, 1, tag))

        t, who = msgpack.packb(self.v.term), msgpack.packb(claimed)
        meta = msgpack.packb([[self.v.term, self.v.last + 1], None, "evil"])
        return self.rng.choice([
            head(1) + b"\x96" + t + who + b"\xc0\xdd" + huge + b"\xc4\x01x",  # 2**32-1 entries, one there
            head(5) + b"\x96" + t + who + meta + b"\x00\xc6" + huge + b"xx",  # 4 GiB of snapshot data, 2 there
            b"\x96\x03\xdb" + huge + self.c.cluster_name.encode(),  # a cluster name of 4 GiB
            head(20) + b"\xdf" + huge,  # a body map of 2**32-1 pairs
            head(1) + b"\x91" * 100_000,  # a body nested 100,000 deep
        ])


@contextlib.contextmanager
def _legit_writer(c):
    """A legitimate client writing ``legit-N`` keys until the block ends; yields (acked, attempted, errors)."""
    acked: dict[str, int] = {}
    attempted: dict[str, int] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        with c.kv("client", timeout=30) as kv:
            n = 0
            while not stop.is_set():
                k = f"legit-{n}"
                attempted[k] = n
                try:
                    kv.put(k, n)
                except Timeout as e:  # its outcome is unknown: attempted, not acknowledged
                    errors.append(e)
                except BaseException as e:  # noqa: BLE001 - reported by the test
                    errors.append(e)
                    return
                else:
                    acked[k] = n
                n += 1

    t = threading.Thread(target=run, name="legit-writer", daemon=True)
    t.start()
    try:
        yield acked, attempted, errors
    finally:
        stop.set()
        t.join(60)


def _run(c, seed: int, messages: int, duration: float, log: Callable[[str], None]) -> None:
    rng = random.Random(seed)
    view = View(c)
    attack = Attack(rng, c, view)
    peer_key = rng.choice(c.ids)
    identities = {"stranger": "stranger", "client": "client", "peer": str(peer_key)}
    socks = {(who, i): c.raw(i, key) for who, key in identities.items() for i in c.ids}
    admin_rids: dict[tuple[str, int], set[int]] = {k: set() for k in socks}
    replies: dict[tuple[str, int], list[tuple[int, Any]]] = {k: [] for k in socks}
    counts: dict[str, int] = {}
    try:
        with _legit_writer(c) as (acked, attempted, errors):
            deadline = time.monotonic() + duration
            sent = 0
            while sent < messages and time.monotonic() < deadline:
                if sent % 50 == 0:
                    view.refresh()
                    for k, s in socks.items():
                        replies[k].extend(s.replies(0))
                who = rng.choice(["stranger", "client", "client", "peer", "peer"])
                target = view.leader if rng.random() < 0.4 else rng.choice(c.ids)
                s = socks[(who, target)]
                if who == "peer":
                    claimed = rng.choice([i for i in c.ids if i != peer_key] + [0, 99])
                else:
                    claimed = rng.choice(list(c.ids) + [0, 99])
                kind = rng.choice(["raft"] * 6 + ["frame"] + (["admin", "write"] if who != "peer" else []))
                if kind == "raft":
                    msg = attack.raft_message(claimed)
                    try:
                        s.send(msg, claimed)
                        kind = type(msg).__name__
                    except CodecError:  # a value even msgpack cannot carry: nothing to send
                        kind = "unencodable"
                elif kind == "frame":
                    s.send_frame(attack.lying_frame(claimed))
                elif kind == "admin":
                    rid = s.send(attack.admin_request(), claimed)
                    if who == "client":  # the stranger's are never answered at all
                        admin_rids[(who, target)].add(rid)
                else:
                    s.send(attack.bad_write(), claimed)
                counts[f"{who}:{kind}"] = counts.get(f"{who}:{kind}", 0) + 1
                sent += 1
                if sent % 10 == 0:
                    time.sleep(0.01)  # a steady stream, not one burst the queues drop
            log(f"sent {sent} hostile messages: {dict(sorted(counts.items()))}")
            # Every attacker connection that may talk gets a last status request: its reply means
            # everything sent before it on that connection has been handled.
            unanswered = []
            for (who, i), s in socks.items():
                if who == "stranger":
                    continue
                rid = s.send(ClientRequest("kv.status"), 0)
                got = None
                for r_id, m in s.replies(30.0):
                    replies[(who, i)].append((r_id, m))
                    if r_id == rid:
                        got = m
                        break
                if not (isinstance(got, ClientResponse) and got.ok):
                    unanswered.append((who, i, got))
            if unanswered:
                assert_serving(c)  # a dead or Fatal node says more than a missing reply
                raise AssertionError(f"nodes did not answer a status request after the attack: {unanswered}")
            for k, s in socks.items():
                replies[k].extend(s.replies(0.2))
            n_acked = len(acked)
            assert not [e for e in errors if not isinstance(e, Timeout)], errors
            assert n_acked > 0, "the legitimate client could not write during the attack"
            log(f"legitimate writes acknowledged during the attack: {n_acked}, timed out: {len(errors)}")
        statuses = assert_serving(c)
        assert_terms_sane(statuses)
        # The unlisted key got nothing through: not even one reply.
        for i in c.ids:
            assert not replies[("stranger", i)], f"node {i} answered an unlisted key: {replies[('stranger', i)][:3]}"
        # Every admin operation of the client key that was answered was denied.
        answered = 0
        for k, rids in admin_rids.items():
            for rid, m in replies[k]:
                if rid in rids:
                    answered += 1
                    assert isinstance(m, ClientResponse) and not m.ok and m.error[0] == "PermissionDenied", \
                        f"node {k[1]} let a client key run an admin operation: {m}"
        assert answered > 0 or not any(admin_rids.values()), "no admin operation of the client key was answered"
        refused = {i: refusals((c.metrics(i) or {}).get("counters")) for i in c.ids}
        assert sum(refused.values()) > 0, f"the forged Raft traffic was not counted anywhere: {refused}"
        contents = settle_and_compare(c, acked, attempted)
        log(f"every node holds the same {len(contents)} keys, all written by the legitimate client")
        for i in c.ids:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = inspect_main([c.data_dir(i), "verify"])
            assert code == 0, f"pyraft-inspect verify on node {i}: exit {code}\n{out.getvalue()[-2000:]}"
    finally:
        for s in socks.values():
            s.close()


def _fuzz(hostile_cluster, seed: int, messages: int, duration: float) -> None:
    print(f"semantic fuzz: PYRAFT_FUZZ_SEED={seed}, layout {CURVE_LAYOUT}, {messages} messages, {duration} s")
    c = hostile_cluster(CURVE_LAYOUT)
    try:
        _run(c, seed, messages, duration, print)
    except Exception as e:
        raise AssertionError(f"semantic fuzz failed; reproduce with PYRAFT_FUZZ_SEED={seed}: "
                             f"{type(e).__name__}: {e}") from e


@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", SEEDS or [1])
def test_semantic_fuzz_from_unlisted_client_and_forging_peer_keys(hostile_cluster, seed):
    _fuzz(hostile_cluster, seed, messages=3000, duration=30.0)


@pytest.mark.soak
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", SEEDS or list(range(100, 105)))
def test_soak_semantic_fuzz(hostile_cluster, seed):
    _fuzz(hostile_cluster, seed, messages=30000, duration=240.0)
