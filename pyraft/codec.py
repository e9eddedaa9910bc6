"""The one place where pyraft's wire and disk formats are defined: msgpack, versioned.

Wire frame (one ZeroMQ message part, or one in-memory delivery)::

    [FORMAT_VERSION, cluster_name, from_id, request_id, tag, body]

``tag`` names the message type; ``body`` is a list of its fields in
declaration order, with values converted as below.  Log entries on disk are
``[term, kind, payload]`` under an 8-byte big-endian index key; a membership
is ``[[voter ids per config], {id: [addr, data]}, [leaving ids]]``.  In an
AppendEntries the entries are a list of those same stored encodings, each a
msgpack bin, their indexes following ``prev_log_id`` (format version 2; version
1 sent ``[term, index, kind, payload]`` lists).  Format version 3 added the
voter's last log id to a VoteResponse (``[term, granted, pre_vote, last_log_id]``).

Decoding never trusts its input: anything malformed, truncated, of the wrong
type or version, or from another cluster raises :class:`CodecError` and
nothing else.  msgpack is used with ``strict_map_key=False`` only where int
keys are expected, and never with ext types: no pickle, no code.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import msgpack

from .errors import CodecError
from .messages import (AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
                       InstallSnapshotResponse, TimeoutNowRequest, TimeoutNowResponse, VoteRequest,
                       VoteResponse)
from .types import Entry, EntryKind, LogId, Membership, Node, SnapshotMeta, StoredMembership, Vote

FORMAT_VERSION = 3

_MAX_INT = 2**63 - 1


# ---------------------------------------------------------------------------
# Application-level messages carried on the same sockets (clients and admin tools).

@dataclass(frozen=True, slots=True)
class ClientRequest:
    """A request from a client or an admin tool: ``op`` names it, ``body`` is any msgpack value."""

    op: str
    body: Any = None


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """``ok`` with a ``body``, or an error: ``error`` is ``[type name, message, leader_id, leader_addr]``."""

    ok: bool
    body: Any = None
    error: Any = None


# ---------------------------------------------------------------------------
# Checked accessors

def _int(v: Any, what: str, lo: int = 0) -> int:
    if type(v) is not int or not lo <= v <= _MAX_INT:
        raise CodecError(f"{what}: expected an integer >= {lo}, got {type(v).__name__}")
    return v


def _opt_int(v: Any, what: str) -> int | None:
    return None if v is None else _int(v, what)


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise CodecError(f"{what}: expected a boolean, got {type(v).__name__}")
    return v


def _str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise CodecError(f"{what}: expected a string, got {type(v).__name__}")
    return v


def _bytes(v: Any, what: str) -> bytes:
    if type(v) is not bytes:
        raise CodecError(f"{what}: expected bytes, got {type(v).__name__}")
    return v


def _list(v: Any, what: str, n: int | None = None) -> list:
    if type(v) is not list:
        raise CodecError(f"{what}: expected a list, got {type(v).__name__}")
    if n is not None and len(v) != n:
        raise CodecError(f"{what}: expected {n} items, got {len(v)}")
    return v


# ---------------------------------------------------------------------------
# Values

def log_id_to_wire(l: LogId | None) -> list | None:
    return None if l is None else [l.term, l.index]


def log_id_from_wire(v: Any, what: str = "log id") -> LogId | None:
    if v is None:
        return None
    t, i = _list(v, what, 2)
    return LogId(_int(t, what + ".term"), _int(i, what + ".index", 1))


def vote_to_wire(v: Vote) -> list:
    return [v.term, v.node_id]


def vote_from_wire(v: Any) -> Vote:
    t, n = _list(v, "vote", 2)
    return Vote(_int(t, "vote.term"), _opt_int(n, "vote.node_id"))


def membership_to_wire(m: Membership) -> list:
    return [
        [sorted(c) for c in m.configs],
        {k: [n.addr, dict(n.data) if n.data is not None else None] for k, n in m.nodes.items()},
        sorted(m.leaving),
    ]


def membership_from_wire(v: Any) -> Membership:
    configs, nodes, leaving = _list(v, "membership", 3)
    cfgs = tuple(frozenset(_int(x, "voter id") for x in _list(c, "voter set")) for c in _list(configs, "configs"))
    if type(nodes) is not dict:
        raise CodecError("membership.nodes: expected a map")
    ns = {}
    for k, nv in nodes.items():
        addr, data = _list(nv, "node", 2)
        if data is not None and type(data) is not dict:
            raise CodecError("node.data: expected a map or nil")
        ns[_int(k, "node id")] = Node(_str(addr, "node.addr"), data)
    try:
        return Membership(configs=cfgs, nodes=ns, leaving=frozenset(_int(x, "leaving id") for x in _list(leaving, "leaving")))
    except ValueError as e:
        raise CodecError(f"membership: {e}") from None


def stored_membership_to_wire(sm: StoredMembership | None) -> list | None:
    return None if sm is None else [log_id_to_wire(sm.log_id), membership_to_wire(sm.membership)]


def stored_membership_from_wire(v: Any) -> StoredMembership | None:
    if v is None:
        return None
    lid, m = _list(v, "stored membership", 2)
    return StoredMembership(log_id_from_wire(lid), membership_from_wire(m))


def snapshot_meta_to_wire(m: SnapshotMeta | None) -> list | None:
    if m is None:
        return None
    return [log_id_to_wire(m.last_log_id), stored_membership_to_wire(m.last_membership), m.snapshot_id]


def snapshot_meta_from_wire(v: Any) -> SnapshotMeta | None:
    if v is None:
        return None
    lid, sm, sid = _list(v, "snapshot meta", 3)
    return SnapshotMeta(log_id_from_wire(lid), stored_membership_from_wire(sm), _str(sid, "snapshot id"))


def _entry_payload_to_wire(e: Entry) -> Any:
    if e.kind == EntryKind.MEMBERSHIP:
        return membership_to_wire(e.payload)
    return e.payload


def _entry_payload_from_wire(kind: EntryKind, payload: Any) -> Any:
    if kind == EntryKind.MEMBERSHIP:
        return membership_from_wire(payload)
    if kind == EntryKind.BLANK and payload is not None:
        raise CodecError("blank entry with a payload")
    return payload


def entry_to_wire(e: Entry) -> list:
    return [e.log_id.term, e.log_id.index, int(e.kind), _entry_payload_to_wire(e)]


def entry_from_wire(v: Any) -> Entry:
    t, i, k, p = _list(v, "entry", 4)
    try:
        kind = EntryKind(_int(k, "entry.kind"))
    except ValueError:
        raise CodecError(f"entry.kind: unknown kind {k}") from None
    return Entry(LogId(_int(t, "entry.term"), _int(i, "entry.index", 1)), kind, _entry_payload_from_wire(kind, p))


# ---------------------------------------------------------------------------
# Disk: log entries (the index is the key, so it is not repeated in the value)

def encode_entry(e: Entry) -> bytes:
    """The stored value of a log entry: ``[term, kind, payload]``."""
    try:
        return msgpack.packb([e.log_id.term, int(e.kind), _entry_payload_to_wire(e)], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as ex:
        raise CodecError(f"entry {e.log_id} cannot be encoded: {ex}") from None


def decode_entry(index: int, data: bytes) -> Entry:
    """Decode a stored log entry found under ``index``."""
    try:
        v = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as ex:  # msgpack raises several unrelated types
        raise CodecError(f"entry {index}: not msgpack ({ex.__class__.__name__})") from None
    t, k, p = _list(v, f"entry {index}", 3)
    try:
        kind = EntryKind(_int(k, "entry.kind"))
    except ValueError:
        raise CodecError(f"entry {index}: unknown kind {k}") from None
    return Entry(LogId(_int(t, "entry.term"), index), kind, _entry_payload_from_wire(kind, p))


_KINDS = tuple(EntryKind)  # by value: EntryKind values are 0, 1, 2
_NORMAL = EntryKind.NORMAL


def encode_entries(entries: Sequence[Entry]) -> list[bytes]:
    """``[encode_entry(e) for e in entries]``, with the per-entry work of the common case hoisted out.

    A normal entry is ``[term, 1, payload]``: the array header, term and kind
    are encoded once per run of equal terms and only the payload per entry.
    The bytes are identical to :func:`encode_entry`'s.
    """
    out: list[bytes] = []
    append = out.append
    packer = msgpack.Packer(use_bin_type=True)
    pack_payload = packer.pack
    prefix_term, prefix = -1, b""
    for e in entries:
        if e.kind is _NORMAL:
            t = e.log_id.term
            if t != prefix_term:
                prefix_term, prefix = t, b"\x93" + msgpack.packb(t) + b"\x01"
            try:
                append(prefix + pack_payload(e.payload))
            except (TypeError, ValueError, OverflowError) as ex:
                raise CodecError(f"entry {e.log_id} cannot be encoded: {ex}") from None
        else:
            append(encode_entry(e))
    return out


def normal_entry_prefix(term: int) -> bytes:
    """What :func:`encode_entries` puts before a normal entry's msgpack payload in term ``term``.

    ``normal_entry_prefix(t) + msgpack.packb(payload, use_bin_type=True)`` is
    ``encode_entry(Entry(LogId(t, i), EntryKind.NORMAL, payload))``.
    """
    return b"\x93" + msgpack.packb(term) + b"\x01"


def decode_entries(first_index: int, datas: Sequence[bytes]) -> list[Entry]:
    """``[decode_entry(first_index + k, d) for k, d in enumerate(datas)]``, with less work per entry."""
    out: list[Entry] = []
    append = out.append
    unpackb = msgpack.unpackb
    kinds = _KINDS
    index = first_index
    term_id: tuple[int, int] = (-1, -1)
    for data in datas:
        try:
            v = unpackb(data, raw=False, strict_map_key=False, use_list=True)
        except Exception as ex:  # msgpack raises several unrelated types
            raise CodecError(f"entry {index}: not msgpack ({ex.__class__.__name__})") from None
        if type(v) is not list or len(v) != 3:
            raise CodecError(f"entry {index}: expected a list of 3 items")
        t, k, p = v
        if type(t) is not int or not 0 <= t <= _MAX_INT:
            raise CodecError("entry.term: expected an integer >= 0")
        if type(k) is not int or not 0 <= k < len(kinds):
            raise CodecError(f"entry {index}: unknown kind {k!r}")
        kind = kinds[k]
        append(Entry(LogId(t, index), kind, p if kind is _NORMAL else _entry_payload_from_wire(kind, p)))
        index += 1
    return out


class EncodedEntries(tuple):
    """A tuple of :class:`Entry` that also carries each entry's stored encoding in ``encoded``.

    ``encoded[k] == encode_entry(self[k])``.  An AppendEntriesRequest whose
    ``entries`` is one goes on the wire without encoding its entries again
    (the leader keeps the encodings it wrote to its log).
    """

    encoded: Sequence[bytes]

    def __new__(cls, entries: Sequence[Entry], encoded: Sequence[bytes]) -> "EncodedEntries":
        self = super().__new__(cls, entries)
        if len(encoded) != len(self):
            raise ValueError("one encoding per entry")
        self.encoded = encoded
        return self


def index_key(index: int) -> bytes:
    """Log keys: 8-byte big-endian, so LMDB's byte order is index order."""
    return index.to_bytes(8, "big")


def key_index(key: bytes) -> int:
    return int.from_bytes(key, "big")


def pack(value: Any) -> bytes:
    """msgpack with pyraft's settings, for metadata values."""
    return msgpack.packb(value, use_bin_type=True)


_local = threading.local()


def pack_fast(value: Any) -> bytes:
    """:func:`pack`, with a Packer kept per thread: making one per call costs more than packing a small value.

    Raises what ``msgpack.packb`` raises (TypeError, ValueError, OverflowError)
    for a value msgpack cannot encode.
    """
    p = getattr(_local, "packer", None)
    if p is None:
        p = _local.packer = msgpack.Packer(use_bin_type=True)
    return p.pack(value)  # the Packer resets itself when packing fails


def unpack(data: bytes, what: str = "value") -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as ex:
        raise CodecError(f"{what}: not msgpack ({ex.__class__.__name__})") from None


# ---------------------------------------------------------------------------
# Wire messages

def _ae_req_to(m: AppendEntriesRequest) -> list:
    # The entries travel as their stored encodings (bin each), their indexes
    # implied by prev_log_id: the leader sends what it wrote to its log and the
    # follower writes what it received, with no re-encoding on either side.
    ents = m.entries
    encoded = getattr(ents, "encoded", None)
    if encoded is None:
        encoded = encode_entries(ents)
    return [m.term, m.leader_id, log_id_to_wire(m.prev_log_id), encoded, m.leader_commit, m.seq]


def _ae_req_from(b: list) -> AppendEntriesRequest:
    t, lid, prev, ents, commit, seq = _list(b, "AppendEntries", 6)
    prev_id = log_id_from_wire(prev, "prev_log_id")
    datas = _list(ents, "entries")
    for d in datas:
        if type(d) is not bytes:
            raise CodecError("AppendEntries: an entry is not bytes")
    entries = EncodedEntries(decode_entries((prev_id.index if prev_id else 0) + 1, datas), datas)
    return AppendEntriesRequest(_int(t, "term"), _int(lid, "leader_id"), prev_id, entries,
                                _int(commit, "leader_commit"), _int(seq, "seq"))


def _ae_resp_to(m: AppendEntriesResponse) -> list:
    return [m.term, m.success, log_id_to_wire(m.matched), m.rejected, m.hint_index, m.hint_term, m.seq]


def _ae_resp_from(b: list) -> AppendEntriesResponse:
    t, ok, matched, rej, hi, ht, seq = _list(b, "AppendEntriesResponse", 7)
    return AppendEntriesResponse(_int(t, "term"), _bool(ok, "success"), log_id_from_wire(matched, "matched"),
                                 _int(rej, "rejected"), _int(hi, "hint_index"), _int(ht, "hint_term"),
                                 _int(seq, "seq"))


def _vote_req_to(m: VoteRequest) -> list:
    return [m.term, m.candidate_id, log_id_to_wire(m.last_log_id), m.pre_vote, m.transfer]


def _vote_req_from(b: list) -> VoteRequest:
    t, c, last, pre, tr = _list(b, "VoteRequest", 5)
    return VoteRequest(_int(t, "term"), _int(c, "candidate_id"), log_id_from_wire(last, "last_log_id"),
                       _bool(pre, "pre_vote"), _bool(tr, "transfer"))


def _vote_resp_to(m: VoteResponse) -> list:
    return [m.term, m.granted, m.pre_vote, log_id_to_wire(m.last_log_id)]


def _vote_resp_from(b: list) -> VoteResponse:
    t, g, pre, last = _list(b, "VoteResponse", 4)
    return VoteResponse(_int(t, "term"), _bool(g, "granted"), _bool(pre, "pre_vote"),
                        log_id_from_wire(last, "last_log_id"))


def _snap_req_to(m: InstallSnapshotRequest) -> list:
    return [m.term, m.leader_id, snapshot_meta_to_wire(m.meta), m.offset, m.data, m.done]


def _snap_req_from(b: list) -> InstallSnapshotRequest:
    t, lid, meta, off, data, done = _list(b, "InstallSnapshot", 6)
    m = snapshot_meta_from_wire(meta)
    if m is None:
        raise CodecError("InstallSnapshot: missing meta")
    return InstallSnapshotRequest(_int(t, "term"), _int(lid, "leader_id"), m, _int(off, "offset"),
                                  _bytes(data, "data"), _bool(done, "done"))


def _snap_resp_to(m: InstallSnapshotResponse) -> list:
    return [m.term, m.done, log_id_to_wire(m.last_log_id)]


def _snap_resp_from(b: list) -> InstallSnapshotResponse:
    t, done, last = _list(b, "InstallSnapshotResponse", 3)
    return InstallSnapshotResponse(_int(t, "term"), _bool(done, "done"), log_id_from_wire(last, "last_log_id"))


def _tn_req_from(b: list) -> TimeoutNowRequest:
    t, lid = _list(b, "TimeoutNow", 2)
    return TimeoutNowRequest(_int(t, "term"), _int(lid, "leader_id"))


def _tn_resp_from(b: list) -> TimeoutNowResponse:
    (t,) = _list(b, "TimeoutNowResponse", 1)
    return TimeoutNowResponse(_int(t, "term"))


def _client_req_from(b: list) -> ClientRequest:
    op, body = _list(b, "ClientRequest", 2)
    return ClientRequest(_str(op, "op"), body)


def _client_resp_from(b: list) -> ClientResponse:
    ok, body, err = _list(b, "ClientResponse", 3)
    if err is not None:
        _list(err, "error", 4)
    return ClientResponse(_bool(ok, "ok"), body, err)


_Codec = tuple[int, Callable[[Any], list], Callable[[list], Any]]

_BY_TYPE: dict[type, _Codec] = {
    AppendEntriesRequest: (1, _ae_req_to, _ae_req_from),
    AppendEntriesResponse: (2, _ae_resp_to, _ae_resp_from),
    VoteRequest: (3, _vote_req_to, _vote_req_from),
    VoteResponse: (4, _vote_resp_to, _vote_resp_from),
    InstallSnapshotRequest: (5, _snap_req_to, _snap_req_from),
    InstallSnapshotResponse: (6, _snap_resp_to, _snap_resp_from),
    TimeoutNowRequest: (7, lambda m: [m.term, m.leader_id], _tn_req_from),
    TimeoutNowResponse: (8, lambda m: [m.term], _tn_resp_from),
    ClientRequest: (20, lambda m: [m.op, m.body], _client_req_from),
    ClientResponse: (21, lambda m: [m.ok, m.body, m.error], _client_resp_from),
}
_BY_TAG = {tag: dec for (tag, _enc, dec) in _BY_TYPE.values()}


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded wire frame."""

    from_id: int
    request_id: int
    message: Any


def encode_message(message: Any, cluster_name: str, from_id: int, request_id: int = 0) -> bytes:
    """Encode ``message`` as one frame.  Raises CodecError for a value msgpack cannot carry."""
    try:
        tag, enc, _ = _BY_TYPE[type(message)]
    except KeyError:
        raise CodecError(f"no wire format for {type(message).__name__}") from None
    try:
        return msgpack.packb([FORMAT_VERSION, cluster_name, from_id, request_id, tag, enc(message)],
                             use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as ex:
        raise CodecError(f"{type(message).__name__} cannot be encoded: {ex}") from None


def decode_message(data: bytes, cluster_name: str | None) -> Frame:
    """Decode and validate one frame.

    ``cluster_name=None`` accepts any cluster (for tools that ask a node who it is).
    Raises :class:`CodecError` for anything but a valid frame of this cluster.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError("frame: expected bytes")
    try:
        v = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as ex:  # msgpack raises ValueError, ExtraData, FormatError, StackError, ...
        raise CodecError(f"frame: not msgpack ({ex.__class__.__name__})") from None
    version, cluster, from_id, request_id, tag, body = _list(v, "frame", 6)
    if version != FORMAT_VERSION:
        raise CodecError(f"frame: unsupported format version {version!r} (this node speaks {FORMAT_VERSION})")
    _str(cluster, "frame.cluster")
    if cluster_name is not None and cluster != cluster_name:
        raise CodecError(f"frame: from cluster {cluster!r}, this is {cluster_name!r}")
    dec = _BY_TAG.get(tag) if type(tag) is int else None
    if dec is None:
        raise CodecError(f"frame: unknown message tag {tag!r}")
    try:
        msg = dec(_list(body, "frame.body"))
    except CodecError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as ex:
        raise CodecError(f"frame: malformed body ({ex.__class__.__name__}: {ex})") from None
    return Frame(_int(from_id, "frame.from_id"), _int(request_id, "frame.request_id"), msg)
