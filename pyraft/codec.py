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

Decoding is bounded by the frame (see :func:`decode_message`):

- The envelope (version, cluster name, sender, request id, tag) is read by
  hand, field by field, with every length checked against the bytes that
  remain, before a single byte of the body is decoded: a frame of another
  cluster or version costs a few comparisons whatever its size, and a
  transport can refuse a tag (or a sender) before paying for the body
  (:func:`decode_envelope`, :func:`decode_body`).
- A decoded value costs far more than its encoding: an empty array is one
  byte on the wire and about 60 bytes as a Python list, so 16 MiB of nested
  empty arrays used to decode to 1.2 GB while holding the GIL for seconds.
  A frame of ``n`` bytes may therefore decode to at most
  :func:`container_budget` ``(n)`` arrays, maps and ext values.  Frames too
  small to exceed it decode at msgpack's full speed; larger ones decode with
  msgpack hooks that count containers as they are built (a cost per
  container, not per byte: nothing for a large value), which also lets
  other threads take the GIL during a long decode.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import msgpack

from .errors import CodecError
from .messages import (AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
                       InstallSnapshotResponse, TimeoutNowRequest, TimeoutNowResponse, VoteRequest,
                       VoteResponse)
from .types import (FAST_BUILD, Entry, EntryKind, LogId, Membership, Node, SnapshotMeta, StoredMembership, Vote,
                    new_object, set_index, set_kind, set_log_id, set_payload, set_term)

FORMAT_VERSION = 3

_MAX_INT = 2**63 - 1

def container_budget(frame_size: int) -> int:
    """Arrays, maps and ext values a frame of ``frame_size`` bytes may decode to, at most.

    One per three bytes (plus a floor for small frames): a list of pairs of
    small integers is about the densest real data gets (log entries and
    commands have one container per 15 bytes or more), while a list of
    one-byte empty arrays costs 70 times its size.  With this budget a frame
    decodes to at most about 40 times its size (as many containers as
    allowed, the rest 2-character strings, which cost 24 times their size
    by themselves), against 80 times without it.
    """
    return frame_size // 3 + 4096


_SMALL_FRAME = 6144  # frames up to this size cannot hold more containers than their budget


class _Budget:
    """msgpack hooks that count the containers a decode builds and stop it past the budget."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def _over(self) -> CodecError:
        return CodecError("frame: decodes to more arrays and maps than its size allows")

    def hook(self, value: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise self._over()
        return value

    def ext(self, code: int, data: bytes) -> msgpack.ExtType:
        self.left -= 1
        if self.left < 0:
            raise self._over()
        return msgpack.ExtType(code, data)

    def options(self) -> dict:
        return dict(_UNPACK, list_hook=self.hook, object_hook=self.hook, ext_hook=self.ext)


_UNPACK = {"raw": False, "strict_map_key": False, "use_list": True}


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


# decode_entries builds its LogId and Entry values without their frozen dataclass
# __init__ (types.FAST_BUILD): that pays for the frame's container budget on the
# AppendEntries path.


def decode_entries(first_index: int, datas: Sequence[bytes], *, unpack_options: dict | None = None) -> list[Entry]:
    """``[decode_entry(first_index + k, d) for k, d in enumerate(datas)]``, with less work per entry.

    Anything in ``datas`` that is not bytes-like is a CodecError too (msgpack
    refuses it).  ``unpack_options``: msgpack options (the frame's counting
    hooks when the entries came in a frame that needs them).
    """
    out: list[Entry] = []
    append = out.append
    unpackb = msgpack.unpackb
    kinds = _KINDS
    index = first_index
    options = _UNPACK if unpack_options is None else unpack_options
    new = new_object
    for data in datas:
        try:
            v = unpackb(data, **options)
        except CodecError:
            raise
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
        if kind is not _NORMAL:
            p = _entry_payload_from_wire(kind, p)
        if FAST_BUILD:
            lid = new(LogId)
            set_term(lid, t)
            set_index(lid, index)
            e = new(Entry)
            set_log_id(e, lid)
            set_kind(e, kind)
            set_payload(e, p)
            append(e)
        else:
            append(Entry(LogId(t, index), kind, p))
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


def key_index(key: bytes | memoryview) -> int:
    return int.from_bytes(key, "big")


def pack(value: Any) -> bytes:
    """msgpack with pyraft's settings, for metadata values."""
    return msgpack.packb(value, use_bin_type=True)


_local = threading.local()


#: pack_fast keeps its thread's Packer only after values up to this size: a Packer
#: keeps its buffer at the largest size it ever packed.
KEEP_PACKER_BELOW = 1 << 20


def pack_fast(value: Any) -> bytes:
    """:func:`pack`, with a Packer kept per thread: making one per call costs more than packing a small value.

    Raises what ``msgpack.packb`` raises (TypeError, ValueError, OverflowError)
    for a value msgpack cannot encode.  The thread's Packer is taken out while
    it packs: Python code that runs meanwhile on the same thread (a dict
    subclass's ``items``, a finalizer) and packs too gets a Packer of its own,
    never the one half-way through this value.
    """
    local = _local.__dict__  # this thread's attributes
    p = local.pop("packer", None)
    if p is None:
        p = msgpack.Packer(use_bin_type=True)
    out = p.pack(value)  # if it fails, the Packer is dropped: the next call makes a new one
    if len(out) < KEEP_PACKER_BELOW:
        local["packer"] = p
    return out


def thread_packer() -> Callable[[Any], bytes]:
    """For a loop that packs many small exact scalars: :func:`pack_fast` at the cost of one call, not two.

    This thread's Packer's ``pack``.  Only for exact str, bytes, int, float,
    bool and None of less than ``KEEP_PACKER_BELOW`` bytes packed (a Packer
    keeps its buffer at the largest size it packed): pack_fast takes its
    Packer out while it packs because Python code run meanwhile may pack too,
    and msgpack's C extension runs none for such values.  With msgpack's
    pure-Python fallback, which does, :func:`pack_fast` itself.  A value that
    fails to pack leaves the Packer as it was (msgpack resets it).
    """
    if msgpack.Packer.__module__ != "msgpack._cmsgpack":
        return pack_fast
    local = _local.__dict__
    p = local.get("packer")
    if p is None:
        p = local["packer"] = msgpack.Packer(use_bin_type=True)
    return p.pack


#: Immutable values msgpack decodes to themselves (exact types, no subclasses).
SCALAR_TYPES = frozenset((str, bytes, int, float, bool, type(None)))

#: The first bytes of msgpack arrays, maps and ext values.  A byte string holds at most as many
#: containers as bytes from this set (the bytes of strings and numbers may be among them too).
_CONTAINER_MARKERS = bytes(range(0x80, 0xA0)) + bytes((0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8,
                                                        0xDC, 0xDD, 0xDE, 0xDF))


def pack_command(command: Any) -> tuple[bytes, Any]:
    """``(encoding, command as every follower decodes it)`` of a command to propose.

    The leader applies a command it proposed from memory, the followers
    what they decode from the log: the two must be one value, or replicas
    would diverge.  So the value returned is the decoded encoding, never
    the caller's object (which the caller might change after proposing,
    and which may hold a tuple, an IntEnum or a bytearray where followers
    get a list, an int or bytes).  A scalar, or a map of scalars (str,
    bytes, int, float, bool, None: the common command), is copied rather
    than decoded: that is the same value, for less.  A bytearray or
    memoryview command becomes bytes.  The encoding returned is that of the
    decoded value, the one any re-encoding of the entry gives.

    Raises TypeError, ValueError or OverflowError for what msgpack cannot
    encode, and CodecError, before anything is proposed, for a command
    followers could not decode (a map with an array as a key) or whose
    encoding holds more arrays and maps than one per three bytes (plus two
    bytes): the density an AppendEntries frame may carry
    (:func:`container_budget`; an entry takes at least five bytes of a
    frame besides its payload and adds one container, its array).  Denser
    entries would make every frame that carries them undecodable, and
    replication would stop there.
    """
    t = type(command)
    if t is dict:
        packed = pack_fast(command)
        scalars = SCALAR_TYPES
        for k, v in command.items():
            if type(v) not in scalars or type(k) not in scalars:
                break
        else:
            return packed, dict(command)  # one map: within the density
    elif t in SCALAR_TYPES:
        return pack_fast(command), command
    elif t is bytearray or t is memoryview:
        command = bytes(command)
        return pack_fast(command), command
    else:
        packed = pack_fast(command)
    value = _decode_command(packed, None)
    canonical = pack_fast(value)  # (a map subclass may have packed a key twice: the value re-encodes shorter)
    if canonical != packed:
        packed, value = canonical, _decode_command(canonical, None)
    if len(packed) - len(packed.translate(None, _CONTAINER_MARKERS)) > (len(packed) + 2) // 3:
        _decode_command(packed, (len(packed) + 2) // 3)  # only an exact count tells; CodecError when too dense
    return packed, value


def _decode_command(packed: bytes, limit: int | None) -> Any:
    """``packed`` decoded as a follower decodes an entry; CodecError past ``limit`` containers."""
    try:
        return msgpack.unpackb(packed, **(_UNPACK if limit is None else _Budget(limit).options()))
    except CodecError:
        raise CodecError(f"the command nests arrays and maps too densely to replicate: more than {limit} "
                         f"in {len(packed)} bytes encoded (one per three bytes)") from None
    except Exception as ex:  # noqa: BLE001 - msgpack raises several unrelated types
        raise CodecError(f"the command's encoding cannot be decoded as followers would "
                         f"({ex.__class__.__name__}: {ex}); use plain values (maps with scalar keys, "
                         f"lists, str, bytes, numbers, bool, None)") from None


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


def _ae_req_from(b: list, unpack_options: dict | None = None) -> AppendEntriesRequest:
    t, lid, prev, ents, commit, seq = _list(b, "AppendEntries", 6)
    prev_id = log_id_from_wire(prev, "prev_log_id")
    datas = _list(ents, "entries")
    # An entry that is not bytes fails in decode_entries (msgpack refuses it):
    # no separate pass over the list here.
    entries = EncodedEntries(decode_entries((prev_id.index if prev_id else 0) + 1, datas,
                                            unpack_options=unpack_options), datas)
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
    if _bool(ok, "ok"):
        if err is not None:
            raise CodecError("ClientResponse: a success that carries an error")
    else:
        # [name, message, leader id or None, leader address or None], as error_response makes it:
        # a caller unpacks it and looks the name up, so its shape is checked here, once.
        name, message, leader_id, leader_addr = _list(err, "error", 4)
        _str(name, "error name")
        _str(message, "error message")
        _opt_int(leader_id, "error leader_id")
        if leader_addr is not None:
            _str(leader_addr, "error leader_addr")
    return ClientResponse(ok, body, err)


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

#: The tags of the Raft requests (AppendEntries, Vote, InstallSnapshot, TimeoutNow).
RAFT_REQUEST_TAGS = frozenset({1, 3, 5, 7})
#: The tag of a :class:`ClientRequest`.
CLIENT_REQUEST_TAG = 20
#: The tags of every request (what a server accepts; the rest are replies).
REQUEST_TAGS = RAFT_REQUEST_TAGS | {CLIENT_REQUEST_TAG}


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded wire frame."""

    from_id: int
    request_id: int
    message: Any


class Envelope(NamedTuple):
    """A frame's header, checked before its body is decoded (:func:`decode_envelope`).

    ``tag`` is a known message tag (see :data:`REQUEST_TAGS`); the body starts
    at byte ``body_offset``.  (A named tuple rather than a frozen dataclass:
    one is made per frame, and it costs a third.)
    """

    from_id: int
    request_id: int
    tag: int
    body_offset: int


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


#: msgpack integer markers -> payload width (unsigned, then signed: other encoders may pick those)
_UINT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_SINT_WIDTH = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}


def _env_int(data: bytes | bytearray, pos: int, what: str) -> tuple[int, int]:
    """A non-negative msgpack integer at ``pos``: ``(value, next position)``."""
    if pos >= len(data):
        raise CodecError(f"frame: truncated before {what}")
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    width = _UINT_WIDTH.get(b)
    signed = width is None
    if signed:
        width = _SINT_WIDTH.get(b)
    if width is None or pos + 1 + width > len(data):
        raise CodecError(f"{what}: expected an integer >= 0")
    v = int.from_bytes(data[pos + 1:pos + 1 + width], "big", signed=signed)
    if not 0 <= v <= _MAX_INT:
        raise CodecError(f"{what}: expected an integer >= 0")
    return v, pos + 1 + width


_prefixes: dict[str, bytes] = {}


def _prefix(cluster_name: str) -> bytes:
    """What every frame of ``cluster_name`` starts with: array of 6, the version, the name."""
    p = _prefixes.get(cluster_name)
    if p is None:
        p = b"\x96" + msgpack.packb(FORMAT_VERSION) + msgpack.packb(cluster_name)
        if len(_prefixes) < 64:  # a process knows a few cluster names; never grow without bound
            _prefixes[cluster_name] = p
    return p


def _cluster_end(data: bytes | bytearray, cluster_name: str | None) -> int:
    """Check the version and the cluster name field by field; return where the name ends."""
    if len(data) < 8 or data[0] != 0x96:  # fixarray of 6: the shortest frame has 8 bytes
        raise CodecError("frame: not a pyraft frame (expected an array of 6 items)")
    if data[1] != FORMAT_VERSION:
        v = data[1]
        raise CodecError(f"frame: unsupported format version {v if v < 0x80 else '(not a small integer)'} "
                         f"(this node speaks {FORMAT_VERSION})")
    b = data[2]
    if 0xA0 <= b <= 0xBF:
        n, pos = b - 0xA0, 3
    elif b in (0xD9, 0xDA, 0xDB):
        width = 1 << (b - 0xD9)
        n, pos = int.from_bytes(data[3:3 + width], "big"), 3 + width
    else:
        raise CodecError("frame.cluster: expected a string")
    if pos + n > len(data):
        raise CodecError("frame: truncated cluster name")
    try:
        cluster = data[pos:pos + n].decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("frame.cluster: not UTF-8") from None
    if cluster_name is not None and cluster != cluster_name:
        raise CodecError(f"frame: from cluster {cluster[:64]!r}, this is {cluster_name!r}")
    return pos + n


def _envelope(data: bytes | bytearray, cluster_name: str | None) -> tuple[int, int, int, int]:
    """``(from_id, request_id, tag, body offset)``; see :func:`decode_envelope`."""
    prefix = _prefixes.get(cluster_name) if cluster_name is not None else None
    if prefix is None and cluster_name is not None:
        prefix = _prefix(cluster_name)
    if prefix is not None and data.startswith(prefix):
        pos = len(prefix)  # the common case: one comparison checks the version and the name
    else:
        pos = _cluster_end(data, cluster_name)
    if pos < len(data) and data[pos] < 0x80:  # a node id is one byte: inline the common case
        from_id = data[pos]
        pos += 1
    else:
        from_id, pos = _env_int(data, pos, "frame.from_id")
    request_id, pos = _env_int(data, pos, "frame.request_id")
    if pos >= len(data) or data[pos] not in _BY_TAG:
        raise CodecError(f"frame: unknown message tag {data[pos] if pos < len(data) else None!r}")
    return from_id, request_id, data[pos], pos + 1


def _as_bytes(data: Any) -> bytes | bytearray:
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        return data.tobytes()
    raise CodecError("frame: expected bytes")


def decode_envelope(data: bytes | bytearray | memoryview, cluster_name: str | None) -> Envelope:
    """Read and check a frame's header without decoding its body.

    Checks that the frame is a 6-item array of this format version and
    ``cluster_name`` (None accepts any cluster) with a valid sender, request
    id and a known tag: field by field, each length against the bytes that
    remain, so it costs the same for a frame of 100 bytes or 16 MiB.
    Raises :class:`CodecError` and nothing else.
    """
    return Envelope._make(_envelope(_as_bytes(data), cluster_name))


def decode_body(data: bytes | bytearray | memoryview, envelope: Envelope) -> Any:
    """The message of a frame whose envelope :func:`decode_envelope` read.

    Bounded by the frame: at most :func:`container_budget` ``(len(data))``
    arrays, maps and ext values are built.  Raises :class:`CodecError` and
    nothing else.
    """
    return _body(_as_bytes(data), envelope.tag, envelope.body_offset)


def _body(data: bytes | bytearray, tag: int, offset: int) -> Any:
    dec = _BY_TAG[tag]
    try:
        if len(data) <= _SMALL_FRAME:
            # Too small to hold more containers than its budget: msgpack at full speed
            # (a slice of a small frame costs less than a memoryview of it).
            body = msgpack.unpackb(data[offset:], raw=False, strict_map_key=False, use_list=True)
            return dec(_list(body, "frame.body"))
        # Hooks count every array, map and ext value as msgpack builds it and stop
        # the decode past the budget; running Python code, they also let other
        # threads take the GIL during a long decode.
        options = _Budget(container_budget(len(data))).options()
        body = msgpack.unpackb(memoryview(data)[offset:], **options)
        if dec is _ae_req_from:
            return _ae_req_from(_list(body, "frame.body"), options)
        return dec(_list(body, "frame.body"))
    except CodecError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as ex:
        raise CodecError(f"frame: malformed body ({ex.__class__.__name__}: {ex})") from None
    except Exception as ex:  # msgpack raises ValueError, ExtraData, FormatError, StackError, ...
        raise CodecError(f"frame: body is not msgpack ({ex.__class__.__name__})") from None


def decode_message(data: bytes | bytearray | memoryview, cluster_name: str | None) -> Frame:
    """Decode and validate one frame: :func:`decode_envelope`, then :func:`decode_body`.

    ``cluster_name=None`` accepts any cluster (for tools that ask a node who it is).
    Raises :class:`CodecError` for anything but a valid frame of this cluster.
    """
    if type(data) is not bytes:
        data = _as_bytes(data)
    from_id, request_id, tag, offset = _envelope(data, cluster_name)
    return Frame(from_id, request_id, _body(data, tag, offset))
