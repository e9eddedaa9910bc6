"""Plain values shared by the engine, the runtime, the stores and the codec.

Every type here is a frozen, slotted dataclass (or an enum): values, never
handles.  None of them does I/O.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True, slots=True, order=True)
class LogId:
    """The identity of a log entry: the term it was created in and its index.

    Indexes start at 1; "no entry" is ``None`` rather than a zero LogId.
    Ordering is by (term, index), which is the Raft "more up-to-date" order.
    """

    term: int
    index: int

    def __str__(self) -> str:
        return f"{self.term}-{self.index}"


def log_index(log_id: LogId | None) -> int:
    """The index of ``log_id``, 0 for ``None``."""
    return 0 if log_id is None else log_id.index


@dataclass(frozen=True, slots=True)
class Vote:
    """The durable election state: the current term and whom this node voted for in it."""

    term: int
    node_id: int | None = None


class ServerState(str, enum.Enum):
    FOLLOWER = "Follower"
    CANDIDATE = "Candidate"
    LEADER = "Leader"
    LEARNER = "Learner"
    SHUTDOWN = "Shutdown"
    FATAL = "Fatal"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Node:
    """How to reach a node: ``addr`` is whatever its transport understands."""

    addr: str
    data: Mapping[str, Any] | None = field(default=None, compare=True)

    def __hash__(self) -> int:
        return hash(self.addr)


class EntryKind(enum.IntEnum):
    BLANK = 0       # appended by every new leader at the start of its term
    NORMAL = 1      # a client command; payload is any msgpack-encodable value
    MEMBERSHIP = 2  # payload is a Membership


@dataclass(frozen=True, slots=True)
class Entry:
    log_id: LogId
    kind: EntryKind = EntryKind.NORMAL
    payload: Any = None

    @property
    def index(self) -> int:
        return self.log_id.index

    @property
    def term(self) -> int:
        return self.log_id.term


# Building many LogIds and Entries at once (a proposed batch, a decoded AppendEntries)
# without their frozen dataclass __init__, which sets each field through
# object.__setattr__ and costs about as much again as the rest of a write's work on
# RaftCore: the slot descriptors set the same fields directly, to the same values.
# It holds only while neither class checks anything on construction.
FAST_BUILD = not hasattr(LogId, "__post_init__") and not hasattr(Entry, "__post_init__")
new_object = object.__new__


def slot_setter(cls: type, field: str) -> Callable[[Any, Any], None]:
    """The function that sets ``field`` of a slotted ``cls`` instance directly (frozen or not)."""
    # Through the class's namespace: a type checker knows the field only as an instance attribute.
    return vars(cls)[field].__set__


set_term, set_index = slot_setter(LogId, "term"), slot_setter(LogId, "index")
set_log_id, set_kind, set_payload = (slot_setter(Entry, "log_id"), slot_setter(Entry, "kind"),
                                     slot_setter(Entry, "payload"))


def log_id_run(term: int, first: int, n: int) -> list[LogId]:
    """``[LogId(term, i) for i in range(first, first + n)]``, built faster."""
    if not FAST_BUILD:
        return [LogId(term, i) for i in range(first, first + n)]
    out: list[LogId] = []
    append = out.append
    for i in range(first, first + n):
        lid = new_object(LogId)
        set_term(lid, term)
        set_index(lid, i)
        append(lid)
    return out


def normal_entries(log_ids: list[LogId], payloads: Any) -> list[Entry]:
    """``[Entry(lid, EntryKind.NORMAL, p) for lid, p in zip(log_ids, payloads)]``, built faster."""
    kind = EntryKind.NORMAL
    if not FAST_BUILD:
        return [Entry(lid, kind, p) for lid, p in zip(log_ids, payloads)]
    out: list[Entry] = []
    append = out.append
    for lid, p in zip(log_ids, payloads):
        e = new_object(Entry)
        set_log_id(e, lid)
        set_kind(e, kind)
        set_payload(e, p)
        append(e)
    return out


def _majority_index(indexes: list[int], size: int) -> int:
    """The greatest index that at least a majority of ``size`` members have reached."""
    if size == 0:
        return 0
    indexes = sorted(indexes, reverse=True)
    need = size // 2 + 1
    if len(indexes) < need:
        return 0
    return indexes[need - 1]


@dataclass(frozen=True, slots=True)
class Membership:
    """A cluster configuration, possibly joint.

    ``configs`` holds one voter set, or two during a joint-consensus change
    (old, new).  ``nodes`` maps every member (voters and learners) to its
    ``Node``.  ``leaving`` lists the nodes that a joint configuration drops
    when it is finalized (removed voters, unless the change kept them as
    learners); it is empty for a non-joint configuration.

    Invariants (checked at construction): at least one non-empty voter set,
    at most two; every voter is in ``nodes``; ``leaving`` only in a joint
    configuration and only of nodes that are not voters of the new set.
    """

    configs: tuple[frozenset[int], ...]
    nodes: Mapping[int, Node]
    leaving: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not 1 <= len(self.configs) <= 2:
            raise ValueError("a membership has one voter set, or two while joint")
        if any(not c for c in self.configs):
            raise ValueError("a voter set cannot be empty")
        missing = self.voter_ids - set(self.nodes)
        if missing:
            raise ValueError(f"voters {sorted(missing)} have no Node")
        if self.leaving and not self.is_joint:
            raise ValueError("only a joint membership can have leaving nodes")
        if self.leaving & self.configs[-1]:
            raise ValueError("a leaving node cannot be a voter of the new configuration")

    @classmethod
    def of(cls, nodes: Mapping[int, Node], voters: set[int] | None = None) -> "Membership":
        voters = set(nodes) if voters is None else set(voters)
        return cls(configs=(frozenset(voters),), nodes=dict(nodes))

    @property
    def voter_ids(self) -> set[int]:
        out: set[int] = set()
        for c in self.configs:
            out |= c
        return out

    @property
    def learner_ids(self) -> set[int]:
        return set(self.nodes) - self.voter_ids

    @property
    def is_joint(self) -> bool:
        return len(self.configs) > 1

    def is_voter(self, node_id: int) -> bool:
        for c in self.configs:  # (a loop, not any(): called for nearly every message)
            if node_id in c:
                return True
        return False

    def is_quorum(self, ids: set[int] | frozenset[int]) -> bool:
        """True when ``ids`` holds a majority of every voter set."""
        for c in self.configs:  # (a loop, not all(): called for nearly every message)
            if len(c & ids) * 2 <= len(c):
                return False
        return True

    def quorum_index(self, matched: Mapping[int, int]) -> int:
        """The greatest index reached by a majority of every voter set.

        ``matched`` maps node id to the index it has durably matched; absent
        nodes count as 0.
        """
        get = matched.get
        configs = self.configs
        out = _majority_index([get(n, 0) for n in configs[0]], len(configs[0]))
        for c in configs[1:]:  # (a loop, not min() of a generator: a leader runs this on every ack)
            out = min(out, _majority_index([get(n, 0) for n in c], len(c)))
        return out

    def finalized(self) -> "Membership":
        """The configuration a joint membership settles into (its new voter set)."""
        new = self.configs[-1]
        nodes = {k: v for k, v in self.nodes.items() if k not in self.leaving}
        return Membership(configs=(new,), nodes=nodes)


@dataclass(frozen=True, slots=True)
class StoredMembership:
    """A membership and the log id of the entry that carried it (None for the initial one)."""

    log_id: LogId | None
    membership: Membership


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """What a snapshot covers: the last log id applied into it and the membership then."""

    last_log_id: LogId | None
    last_membership: StoredMembership | None
    snapshot_id: str


def fast_init(*classes: type) -> None:
    """Give each frozen, slotted dataclass of ``classes`` a faster ``__init__`` that does the same.

    A frozen dataclass's generated ``__init__`` sets each field through
    ``object.__setattr__`` (its own ``__setattr__`` refuses): about three
    times the cost of setting the slot through its descriptor, as
    :func:`slot_setter` does.  The replacement takes the same parameters,
    with the same defaults, and sets the same fields to the same values.
    A class that checks anything on construction (``__post_init__``), or has a
    field with a ``default_factory`` or outside ``__init__``, keeps its own.
    Messages, commands and log ids are built several times per message
    handled, which makes this worth its few lines.
    """
    for cls in classes:
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        fs = dataclasses.fields(cls)
        if not (params.frozen and "__slots__" in vars(cls)) or hasattr(cls, "__post_init__") or any(
                not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING for f in fs):
            continue
        env: dict[str, Any] = {}
        args, body = [], []
        for f in fs:
            env[f"_set_{f.name}"] = slot_setter(cls, f.name)
            if f.default is dataclasses.MISSING:
                args.append(f.name)
            else:
                env[f"_dflt_{f.name}"] = f.default
                args.append(f"{f.name}=_dflt_{f.name}")
            body.append(f"    _set_{f.name}(self, {f.name})")
        src = f"def __init__(self, {', '.join(args)}):\n" + ("\n".join(body) or "    pass") + "\n"
        exec(src, env)
        init = env["__init__"]
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        init.__module__ = cls.__module__
        generated = vars(cls)["__init__"]
        init.__doc__ = generated.__doc__
        init.__annotations__ = dict(generated.__annotations__)
        type.__setattr__(cls, "__init__", init)


fast_init(LogId, Vote, Node, Entry, StoredMembership, SnapshotMeta)
