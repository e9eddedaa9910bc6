"""Commands a client or a caller can send that the cluster must refuse, or apply without harm.

Found by attacking the client path with the wire format in hand:

- a command whose encoding nests arrays and maps densely (``[[]] * 5900`` in
  a frame of 6 KiB) was proposed, and every AppendEntries frame carrying two
  of them exceeded the decoder's container budget: followers dropped the
  frames and replication stopped;
- a map with an array as a key (``{(1, 2): 3}`` from the Python API) packs,
  but no follower can decode it: the same stop;
- the leader applied the caller's own object (a tuple, an IntEnum) and the
  followers what msgpack decodes (a list, an int): replicas could diverge;
- a KV command nesting a field about 1,000 lists deep passed the checks and
  made ``KVStateMachine.apply`` raise RecursionError on every replica (a
  state machine that raises is Fatal: one such write took the cluster down);
- a txn of 128 gets of one 1 MB value built a 128 MB result on every
  replica, kept in its session.
"""
from __future__ import annotations

import enum
import threading

import msgpack
import pytest

from pyraft import Node, ServerState
from pyraft.codec import ClientRequest, decode_message, encode_message, pack_command, pack_fast
from pyraft.errors import CodecError, ResultNotKept
from pyraft.kv import KVStateMachine
from pyraft.kv.commands import MAX_DEPTH, MAX_REMEMBERED_RESULT, MAX_TXN_READ_BYTES, check_command
from pyraft.kv.encoding import KVCommandError
from pyraft.messages import AppendEntriesRequest
from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
from pyraft.transports.zmq import ZmqClient
from pyraft.types import Entry, EntryKind, LogId

from memcluster import MemCluster
from test_kv_client import ZmqCluster

pytestmark = pytest.mark.timeout(120)


def nest(depth: int, leaf=1):
    v = leaf
    for _ in range(depth):
        v = [v]
    return v


def nest_sparse(depth: int) -> list:
    """``depth`` nested arrays with a few bytes at each level: not too dense to propose."""
    v: list = []
    for _ in range(depth - 1):
        v = [v, "pad"]
    return v


class Color(enum.IntEnum):
    RED = 1


def _all_applied_and_serving(c: ZmqCluster, lead) -> None:
    last = lead.metrics().last_log_index
    for r in c.rafts.values():
        r.wait(10).applied_index_at_least(last)
        assert r.metrics().state in (ServerState.LEADER, ServerState.FOLLOWER)


# ---------------------------------------------------------------------------------------------
# The Raft layer: what is proposed is what every follower decodes, and fits any frame

def test_plain_commands_are_proposed_as_they_are_and_others_as_followers_decode_them():
    plain = {"op": "put", "key": "k", "value": b"v", "n": [1, 2.5, None, True, {"x": [b""]}]}
    packed, cmd = pack_command(plain)
    assert cmd == plain and packed == pack_fast(plain)
    plain["n"][4]["x"].append(b"changed after proposing")  # the caller's object is not what is applied
    assert cmd["n"][4]["x"] == [b""]
    flat = {"op": "put", "key": "k", "value": b"v"}
    packed, cmd = pack_command(flat)
    flat["value"] = b"changed"
    assert cmd == {"op": "put", "key": "k", "value": b"v"} and packed == pack_fast(cmd)
    for given, decoded in (((1, (2, Color.RED)), [1, [2, 1]]), ({"k": (1,)}, {"k": [1]}),
                           (bytearray(b"ab"), b"ab"), (memoryview(b"ab"), b"ab"),
                           ({"v": memoryview(b"b")}, {"v": b"b"}), ([bytearray(b"x")], [b"x"])):
        packed, cmd = pack_command(given)
        assert cmd == decoded and type(cmd) is type(decoded)
        assert msgpack.unpackb(packed, raw=False, strict_map_key=False) == decoded
    _, cmd = pack_command([Color.RED])
    assert type(cmd[0]) is int


@pytest.mark.parametrize("command", [{(1, 2): 3}, {"a": {("x",): 1}}], ids=["array-key", "nested-array-key"])
def test_a_command_followers_could_not_decode_is_refused(command):
    with pytest.raises(CodecError, match="cannot be decoded as followers would"):
        pack_command(command)


class _LyingMap(dict):
    """Packs key "a" twice: first with padding, then dense; it decodes to the dense value alone."""

    def items(self):
        return [("a", "x" * 300), ("a", [[]] * 150)]

    def __len__(self) -> int:
        return 2


@pytest.mark.parametrize("command", [[[]] * 100, {"op": "put", "key": "k", "value": [[]] * 5900},
                                     {"v": [[1]] * 1000}, _LyingMap()],
                         ids=["empty-arrays", "kv-put", "singletons", "lying-map"])
def test_a_command_denser_than_a_frame_may_carry_is_refused(command):
    # (the lying map: its own encoding is sparse; the one every re-encoding gives, from the
    # decoded value, is not, and that is the one checked, and proposed)
    with pytest.raises(CodecError, match="too densely to replicate"):
        pack_command(command)


def _densest(size: int) -> list:
    """A command of about ``size`` bytes with as many containers as pack_command accepts."""
    for n in range(size // 3, 0, -1):
        cmd = ["x" * (size - 3 * n)] + [[]] * n
        try:
            pack_command(cmd)
            return cmd
        except CodecError:
            continue
    raise AssertionError("nothing accepted")


@pytest.mark.parametrize("size", [6, 40, 700, 5000])
def test_any_number_of_the_densest_accepted_commands_fits_an_append_entries_frame(size):
    cmd = _densest(size)
    packed, _ = pack_command(cmd)
    assert len(packed) - len(packed.translate(None, bytes(range(0x90, 0xA0)))) >= (len(packed) - 1) // 3
    for count in (1, 2, 50, 1024, 4096):
        # term 1: the fewest bytes an entry adds to the frame, the least budget
        entries = tuple(Entry(LogId(1, i), EntryKind.NORMAL, cmd) for i in range(1, count + 1))
        msg = AppendEntriesRequest(1, 1, None, entries, 0, 1)
        frame = encode_message(msg, "pyraft", 1, 7)
        got = decode_message(frame, "pyraft").message  # CodecError if past the container budget
        assert len(got.entries) == count and got.entries[-1].payload == cmd


class _Recorder(MemoryStateMachine):
    """The commands each node applies, exactly as its state machine saw them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def check_command(self, command):  # any command: this test is about the Raft layer
        pass

    def apply(self, entries):
        self.seen.extend(e.payload for e in entries if e.kind == EntryKind.NORMAL)
        return super().apply(entries)  # KV semantics: a command that is not a map is an error result


def test_the_leader_applies_what_the_followers_decode_and_a_refused_write_stops_nothing():
    c = MemCluster(3, init=False)
    try:
        for i in list(c.rafts):
            c.stop(i)
            c.start(i, MemoryLogStore(), _Recorder())
        c.rafts[1].initialize({i: c.node(i) for i in c.rafts})
        lead = c.leader()
        with pytest.raises(CodecError):
            lead.client_write({(1, 2): 3}, timeout=10)
        with pytest.raises(CodecError):
            lead.client_write([[]] * 3000, timeout=10)
        lead.client_write({"op": "put", "key": "t", "value": (1, Color.RED, {"t": (2,)})}, timeout=10)
        last = lead.client_write({"op": "put", "key": "after", "value": 1}, timeout=10).log_id.index
        c.wait_applied(last)
        for i in c.rafts:
            sm = c.stores[i][1]
            values = [cmd["value"] for cmd in sm.seen]
            assert values == [[1, 1, {"t": [2]}], 1], (i, sm.seen)
            assert type(values[0][1]) is int, (i, sm.seen)
            assert sm.get("t") == [1, 1, {"t": [2]}]
    finally:
        c.close()


def test_dense_kv_writes_over_zeromq_are_refused_and_the_cluster_keeps_replicating(tmp_path):
    c = ZmqCluster(sm_factory=lambda i: KVStateMachine(tmp_path / f"n{i}"))
    try:
        lead = c.leader()
        c.follower()
        addr = c.addrs[lead.node_id]
        dense = {"op": "put", "key": "k", "value": [[]] * 5900}
        assert len(encode_message(ClientRequest("kv.write", dense), "pyraft", 0, 1)) <= 6144
        replies = []

        def write() -> None:
            with ZmqClient(addr) as z:
                replies.append(z.call(ClientRequest("kv.write", dense), 15))

        threads = [threading.Thread(target=write) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(replies) == 8
        assert all(not r.ok and r.error[0] == "CodecError" for r in replies), replies[:2]
        with c.client() as kv:
            for i in range(20):
                kv.put(f"after-{i}", [[1, 2]] * 100)
        _all_applied_and_serving(c, lead)
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# The KV state machine: nothing a client sends makes apply raise

DEEP = nest(1000)

_DEEP_FIELDS = {
    "txn-op-not-a-map": {"op": "txn", "success": [DEEP]},
    "txn-compare-not-a-map": {"op": "txn", "compare": [DEEP]},
    "txn-compare-version": {"op": "txn", "compare": [{"key": "k", "target": "version", "op": "<", "value": DEEP}]},
    "txn-compare-value": {"op": "txn", "compare": [{"key": "k", "target": "value", "op": "<", "value": DEEP}]},
    "txn-range-limit": {"op": "txn", "success": [{"op": "range", "key": "a", "limit": DEEP}]},
    "txn-range-prefix": {"op": "txn", "success": [{"op": "range", "key": "a", "prefix": DEEP}]},
    "txn-put-value": {"op": "txn", "success": [{"op": "put", "key": "a", "value": DEEP}]},
    "lease-grant-ttl": {"op": "lease_grant", "ttl": DEEP},
    "lease-revoke-id": {"op": "lease_revoke", "id": DEEP},
    "put-lease": {"op": "put", "key": "k", "value": 1, "lease": DEEP},
    "put-value": {"op": "put", "key": "k", "value": DEEP},
    "cas-expected": {"op": "cas", "key": "k", "expected": DEEP, "value": 1},
    "key": {"op": "put", "key": DEEP, "value": 1},
    "op": {"op": DEEP, "key": "k"},
    "session-client": {"op": "put", "key": "k", "value": 1, "client": DEEP, "seq": 1},
    "session-seq": {"op": "put", "key": "k", "value": 1, "client": "c", "seq": DEEP},
}


@pytest.fixture
def kvsm(tmp_path):
    sm = KVStateMachine(tmp_path / "kv")
    yield sm
    sm.close()


def _apply(sm, *cmds):
    first = (sm.applied_state()[0].index if sm.applied_state()[0] else 0) + 1
    return sm.apply([Entry(LogId(1, first + k), EntryKind.NORMAL, c) for k, c in enumerate(cmds)])


@pytest.mark.parametrize("name", sorted(_DEEP_FIELDS))
def test_a_deeply_nested_field_is_an_error_result_never_an_exception_out_of_apply(kvsm, name):
    cmd = _DEEP_FIELDS[name]
    _apply(kvsm, {"op": "put", "key": "k", "value": nest(MAX_DEPTH - 1)})
    try:
        kvsm.check_command(cmd)
    except KVCommandError:
        pass  # refused before proposing: and applied all the same (an entry in a log), still no exception
    [r] = _apply(kvsm, cmd)
    assert isinstance(r, KVCommandError), r
    assert len(str(r)) < 300, str(r)[:300]
    assert kvsm.get("k") == nest(MAX_DEPTH - 1)


def test_values_and_txns_nested_deeper_than_max_depth_are_refused_before_proposing(kvsm):
    for cmd in (_DEEP_FIELDS["put-value"], _DEEP_FIELDS["cas-expected"], _DEEP_FIELDS["txn-put-value"],
                _DEEP_FIELDS["txn-compare-value"], {"op": "put", "key": "k", "value": nest(MAX_DEPTH)}):
        with pytest.raises(KVCommandError, match=f"at most {MAX_DEPTH} deep"):
            check_command(cmd)
    deepest = {"op": "put", "key": "k", "value": nest(MAX_DEPTH - 1), "client": "c", "seq": 1}
    check_command(deepest)
    assert _apply(kvsm, deepest) == [None]
    # a txn reading it back remembers a result nested deeper still, in its session
    txn = {"op": "txn", "success": [{"op": "get", "key": "k"}], "client": "c", "seq": 2}
    check_command(txn)
    [r] = _apply(kvsm, txn)
    assert r[1][0][0] == nest(MAX_DEPTH - 1)
    assert _apply(kvsm, txn) == [r]  # the remembered result, decoded from the session


def test_ordering_values_as_deep_as_allowed_is_a_result(kvsm):
    # a compare's value sits at level 4 of its txn (command, compare list, compare map, value)
    _apply(kvsm, {"op": "put", "key": "d", "value": nest(MAX_DEPTH - 3)})
    cmd = {"op": "txn", "compare": [{"key": "d", "target": "value", "op": "<", "value": nest(MAX_DEPTH - 3, 2)}]}
    check_command(cmd)
    [r] = _apply(kvsm, cmd)
    assert r[0] is True


def test_error_messages_quote_little_of_what_the_client_sent(kvsm):
    big = "x" * 1_000_000
    for seq, cmd in enumerate(({"op": "lease_grant", "ttl": big}, {"op": "lease_revoke", "id": big},
                               {"op": "txn", "success": [big]}, {"op": "txn", "compare": [[big] * 1000]},
                               {"op": "put", "key": 2**100000, "value": 1}), 1):
        [r] = _apply(kvsm, dict(cmd, client="c", seq=seq))  # the error is remembered in the session too
        assert isinstance(r, KVCommandError) and len(str(r)) < 300, str(r)[:300]


def test_one_deep_kv_write_over_zeromq_leaves_every_node_serving(tmp_path):
    c = ZmqCluster(sm_factory=lambda i: KVStateMachine(tmp_path / f"n{i}"))
    try:
        lead = c.leader()
        c.follower()
        with ZmqClient(c.addrs[lead.node_id]) as z:
            deep = nest_sparse(1000)
            for cmd in ({"op": "lease_grant", "ttl": deep}, {"op": "put", "key": "k", "value": deep},
                        {"op": "txn", "success": [deep]}, {"op": "put", "key": "k", "value": 1, "lease": deep}):
                r = z.call(ClientRequest("kv.write", cmd), 15)
                assert not r.ok and r.error[0] == "KVCommandError", r
            # a retry of a write whose result was too large to keep: a typed answer, not the result
            big = {"op": "put", "key": "big", "value": b"x" * 100_000}
            assert z.call(ClientRequest("kv.write", big), 15).ok
            get = {"op": "txn", "success": [{"op": "get", "key": "big"}], "client": "c", "seq": 1}
            first = z.call(ClientRequest("kv.write", get), 15)
            assert first.ok and first.body[1][0][0] == b"x" * 100_000, first
            again = z.call(ClientRequest("kv.write", get), 15)
            assert not again.ok and again.error[0] == "ResultNotKept", again
        with c.client() as kv:
            kv.put("after", 1)
        _all_applied_and_serving(c, lead)
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# What one txn reads is bounded

BIG = b"x" * 1_000_000


def test_a_txn_whose_gets_would_return_too_much_is_refused_and_changes_nothing(kvsm):
    _apply(kvsm, {"op": "put", "key": "big", "value": BIG})
    gets = [{"op": "get", "key": "big"}] * 5  # 5 MB > MAX_TXN_READ_BYTES
    txn = {"op": "txn", "success": [{"op": "put", "key": "side", "value": 1}, *gets], "client": "c", "seq": 1}
    [r] = _apply(kvsm, txn)
    assert isinstance(r, KVCommandError) and "more than" in str(r), r
    assert kvsm.get("side") is None
    # as many as fit: answered in full
    fit = MAX_TXN_READ_BYTES // (len(BIG) + 64)
    [r] = _apply(kvsm, {"op": "txn", "success": [{"op": "get", "key": "big"}] * fit})
    assert r[0] is True and len(r[1]) == fit and all(g[0] == BIG for g in r[1])


def test_a_txns_gets_count_the_values_its_own_puts_leave(kvsm):
    _apply(kvsm, {"op": "put", "key": "big", "value": BIG})
    shrink = {"op": "txn", "success": [{"op": "put", "key": "big", "value": b"small"},
                                       *[{"op": "get", "key": "big"}] * 20]}
    [r] = _apply(kvsm, shrink)
    assert r[0] is True and r[1][1][0] == b"small"
    grow = {"op": "txn", "success": [{"op": "put", "key": "new", "value": BIG}, *[{"op": "get", "key": "new"}] * 5]}
    [r] = _apply(kvsm, grow)
    assert isinstance(r, KVCommandError) and kvsm.get("new") is None


def test_a_txns_ranges_stop_early_with_more_once_it_read_enough(kvsm):
    _apply(kvsm, *[{"op": "put", "key": f"r{i:02}", "value": BIG} for i in range(10)])
    txn = {"op": "txn", "success": [{"op": "range", "key": "r", "prefix": True}] * 3}
    [r] = _apply(kvsm, txn)
    rows = [len(rng[0]) for rng in r[1]]
    assert rows[0] == 5 and rows[1:] == [0, 0], rows  # 4 MB: the fifth row passes it
    assert all(rng[1] is True for rng in r[1])
    size = len(pack_fast(r))
    assert size < MAX_TXN_READ_BYTES + 2 * len(BIG), size


def test_node_data_goes_into_the_membership_as_followers_decode_it():
    c = MemCluster(3)
    try:
        lead = c.leader()
        with pytest.raises(ValueError, match="cannot be decoded as followers would"):
            lead.add_learner(4, Node("mem://4", data={(1, 2): 3}), blocking=False)
        with pytest.raises(ValueError, match="too densely"):
            lead.add_learner(4, Node("mem://4", data={"k": [[]] * 1000}), blocking=False)
        lid = lead.add_learner(4, Node("mem://4", data={"zone": ("eu", Color.RED)}), blocking=False)
        c.wait_applied(lid.index)
        for i, r in c.rafts.items():
            node = r.metrics().membership.nodes[4]
            assert node.data == {"zone": ["eu", 1]} and type(node.data["zone"]) is list, (i, node)
    finally:
        c.close()


def test_many_clients_reading_a_large_value_in_small_txns_leave_small_sessions(kvsm):
    """Each fresh client id keeps a session on every replica for session_ttl entries, and no delete
    frees it: what it keeps must be small, or small requests fill the store's quota for good."""
    _apply(kvsm, {"op": "put", "key": "big", "value": b"x" * 60_000})
    n = 200
    for i in range(n):
        [r] = _apply(kvsm, {"op": "txn", "success": [{"op": "get", "key": "big"}], "client": f"c{i}", "seq": 1})
        assert r[0] is True and r[1][0][0] == b"x" * 60_000  # the answer itself is whole
    with kvsm.view() as v:
        sessions = sum(len(rec) for _k, rec in v.txn.cursor(db=v.dbs.sessions))
    assert sessions < n * 1200, f"{sessions / n:.0f} bytes of session per client"


def test_a_session_keeps_a_large_result_only_as_a_note_of_where_it_was_applied(kvsm):
    _apply(kvsm, {"op": "put", "key": "big", "value": BIG})
    get = {"op": "get", "key": "big", "client": "c", "seq": 1}
    [r] = _apply(kvsm, get)
    assert r == BIG  # the first answer is whole
    [again] = _apply(kvsm, get)  # a retry: the session did not keep a megabyte for it
    assert isinstance(again, ResultNotKept) and "applied at revision 2" in str(again), again
    txn = {"op": "txn", "compare": [{"key": "big", "target": "version", "op": "==", "value": 1}],
           "success": [{"op": "get", "key": "big"}], "client": "c", "seq": 2}
    [r] = _apply(kvsm, txn)
    [again] = _apply(kvsm, txn)
    assert r[0] is True and "its compares held" in str(again), again
    ext = {"op": "get", "key": "ext", "client": "c", "seq": 3}  # any type of value counts
    _apply(kvsm, {"op": "put", "key": "ext", "value": msgpack.ExtType(5, BIG)})
    assert _apply(kvsm, ext)[0] == msgpack.ExtType(5, BIG)
    assert isinstance(_apply(kvsm, ext)[0], ResultNotKept)
    small = {"op": "get", "key": "big2", "client": "c", "seq": 4}
    _apply(kvsm, {"op": "put", "key": "big2", "value": b"x" * (MAX_REMEMBERED_RESULT - 100)})
    assert _apply(kvsm, small) == _apply(kvsm, small) == [b"x" * (MAX_REMEMBERED_RESULT - 100)]
    with kvsm.view() as v:  # what the sessions hold, on every replica
        sessions = sum(len(rec) for _k, rec in v.txn.cursor(db=v.dbs.sessions))
    assert sessions < 2 * MAX_REMEMBERED_RESULT, sessions
