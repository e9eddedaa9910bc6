"""``pyraft-inspect``: read a node's LMDB files, read-only, also while the node runs.

::

    pyraft-inspect DATA_DIR summary [--json]
    pyraft-inspect DATA_DIR log [--from I] [--to J] [--tail N] [--json]
    pyraft-inspect DATA_DIR verify [--json] [--quiet]
    pyraft-inspect DATA_DIR membership [--json]
    pyraft-inspect DATA_DIR vote [--json]
    pyraft-inspect DATA_DIR snapshot [--json] [--export FILE [--force]]

``DATA_DIR`` is what ``pyraft-kv serve --data-dir`` was given: it holds the
log store (``log.lmdb``, always) and, for the built-in KV service, the KV
state machine (``kv.lmdb``, ``snapshots/``); see :mod:`pyraft.stores.lmdb`.
Everything is read through the library's own readers and codec
(:meth:`LmdbLogStore.open_readonly`, :func:`pyraft.codec.decode_entry`,
:meth:`KVStateMachine.open_readonly`): no format is parsed here.
The environments are opened read-only without taking the node's lock files,
so this works on a running node (each command reads one consistent LMDB
transaction per environment) and on a copy of a dead node's directory.

Exit codes: 0 ok (``verify``: the log is sound); 1 a logical fault
(``verify`` names the first bad index and why; ``log`` met an entry that
does not decode; ``snapshot --export`` had nothing to export or the file was
damaged); 2 usage error, or the files cannot be read (not a pyraft data
directory, not LMDB, truncated).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import lmdb

from pyraft.codec import decode_entry, pack
from pyraft.errors import CodecError, StorageError
from pyraft.kv import KVReader, KVStateMachine, KVStatus
from pyraft.kv import commands as kv_commands
from pyraft.kv.statemachine import FORMAT_VERSION as KV_FORMAT_VERSION
from pyraft.stores.lmdb import (FORMAT_VERSION, KV_ENV_NAME, LOG_ENV_NAME, LmdbLogReader, LmdbLogStore, LogStoreMeta,
                                check_not_truncated, node_dir_layout)
from pyraft.types import Entry, EntryKind, LogId, Membership, StoredMembership, log_index

from pyraft.tools.cli import (EXIT_OK, Parser, UsageError, add_global, add_version, check_output_file, emit_error,
                              run_main)
from pyraft.tools.cli import EXIT_FAILED as EXIT_FAULT
from pyraft.tools.cli import EXIT_USAGE as EXIT_UNREADABLE

_HEX_PREFIX = 16      # bytes of an opaque payload shown in hex
_REPR_MAX = 60        # characters of a key or value shown in a log line
_PROGRESS_EVERY = 1.0  # seconds between progress lines of a long verify
_PROGRESS_MIN = 100_000  # entries from which verify reports progress
_LOG_CHUNK = 4096     # entries `log` reads per read transaction


class Unreadable(Exception):
    """The files cannot be read as a pyraft data directory (exit 2)."""


# ---------------------------------------------------------------------------
# Opening a data directory

def _check_lmdb_file(env_path: str, what: str) -> None:
    """Unreadable for a data.mdb shorter than its pages in use (stores.lmdb.check_not_truncated)."""
    try:
        check_not_truncated(env_path, what)
    except StorageError as e:
        raise Unreadable(str(e)) from None


class DataDir:
    """A node data directory opened read-only: the log store, and the KV state machine if there is one."""

    def __init__(self, path: str) -> None:
        self.layout = node_dir_layout(path)
        root = self.layout.root
        if not os.path.exists(root):
            raise Unreadable(f"{path}: no such directory")
        if not os.path.isdir(root):
            raise Unreadable(f"{path} is not a directory")
        if not os.path.isdir(self.layout.log_env):
            hint = ""
            if os.path.basename(root) in (LOG_ENV_NAME, KV_ENV_NAME) or os.path.exists(os.path.join(root, "data.mdb")):
                hint = f"; give the node data directory (the parent of {os.path.basename(root)})"
            raise Unreadable(f"{path} is not a pyraft data directory: it has no {LOG_ENV_NAME}/{hint}")
        _check_lmdb_file(self.layout.log_env, "log store")
        try:
            self.log: LmdbLogReader = LmdbLogStore.open_readonly(root)
        except StorageError as e:
            raise Unreadable(str(e)) from None
        self._kv: KVReader | None = None
        self._kv_opened = False

    @property
    def kv(self) -> KVReader | None:
        """The KV state machine's reader, opened on first use; None when the directory has none."""
        if not self._kv_opened:
            self._kv_opened = True
            if os.path.isdir(self.layout.kv_env):
                _check_lmdb_file(self.layout.kv_env, "KV state machine")
                try:
                    self._kv = KVStateMachine.open_readonly(self.layout.root)
                except StorageError as e:
                    raise Unreadable(str(e)) from None
        return self._kv

    def kv_state(self) -> KVStatus | None:
        kv = self.kv
        return None if kv is None else kv.status()

    def close(self) -> None:
        self.log.close()
        if self._kv is not None:
            self._kv.close()

    def __enter__(self) -> "DataDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Values to text and JSON

def lid_json(l: LogId | None) -> list | None:
    return None if l is None else [l.term, l.index]


def lid_text(l: LogId | None) -> str:
    return "none" if l is None else f"{l.term}-{l.index}"


def jsonable(v: Any) -> Any:
    """A payload value as JSON: bytes become ``{"hex": ...}``, map keys strings, tuples lists."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"hex": bytes(v).hex()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k if type(k) is str else json.dumps(jsonable(k)): jsonable(x) for k, x in v.items()}
    return repr(v)


def membership_json(m: Membership, log_id: LogId | None = None) -> dict:
    return {
        "log_id": lid_json(log_id),
        "configs": [sorted(c) for c in m.configs],
        "voters": sorted(m.voter_ids),
        "learners": sorted(m.learner_ids),
        "joint": m.is_joint,
        "leaving": sorted(m.leaving),
        "nodes": {str(k): {"addr": n.addr, "data": jsonable(n.data)} for k, n in sorted(m.nodes.items())},
    }


def membership_text(m: Membership) -> str:
    voters = " -> ".join(str(sorted(c)) for c in m.configs)
    s = f"voters {voters}"
    if m.is_joint:
        s += f" (joint; leaving {sorted(m.leaving)})"
    s += f"; learners {sorted(m.learner_ids)}"
    s += "; nodes " + ", ".join(f"{k}={n.addr}" for k, n in sorted(m.nodes.items()))
    return s


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= _REPR_MAX else r[:_REPR_MAX - 3] + "..."


def is_kv_command(p: Any) -> bool:
    return type(p) is dict and p.get("op") in kv_commands.OPS and "key" in p


def kv_command_text(p: dict) -> str:
    op = p["op"]
    s = f"{op} {_short(p['key'])}"
    if op in ("put", "cas") and "value" in p:
        if op == "cas":
            s += f" expected={_short(p.get('expected'))}"
        s += f" = {_short(p['value'])}"
    if "client" in p or "seq" in p:
        s += f"  (client {_short(p.get('client'))} seq {p.get('seq')!r})"
    return s


def _opaque(p: Any) -> tuple[int, str]:
    data = pack(p)
    return len(data), data[:_HEX_PREFIX].hex()


def entry_text(e: Entry) -> str:
    head = f"{e.index:>8} {e.term:>6} "
    if e.kind == EntryKind.BLANK:
        return head + "blank"
    if e.kind == EntryKind.MEMBERSHIP:
        return head + "membership " + membership_text(e.payload)
    if is_kv_command(e.payload):
        return head + "normal     " + kv_command_text(e.payload)
    n, hx = _opaque(e.payload)
    return head + f"normal     <{n} bytes> {hx}{'...' if n > _HEX_PREFIX else ''}"


def entry_json(e: Entry, size: int) -> dict:
    d: dict[str, Any] = {"index": e.index, "term": e.term, "kind": e.kind.name.lower(), "size": size}
    if e.kind == EntryKind.MEMBERSHIP:
        d["membership"] = membership_json(e.payload, e.log_id)
    elif e.kind == EntryKind.NORMAL:
        if is_kv_command(e.payload):
            d["command"] = jsonable(e.payload)
        else:
            n, hx = _opaque(e.payload)
            d["payload_size"] = n
            d["payload_hex"] = hx
    return d


def _human(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(n)


def _dir_size(path: str) -> int:
    total = 0
    try:
        for name in os.listdir(path):
            try:
                total += os.path.getsize(os.path.join(path, name))
            except OSError:
                pass  # removed meanwhile
    except OSError:
        return 0
    return total


# ---------------------------------------------------------------------------
# Gathering

def _scan_memberships(view: Any, start: int) -> list[StoredMembership]:
    """Membership entries from ``start``; undecodable entries are skipped here (``verify`` reports them)."""
    out = []
    for i, raw in view.iter_raw(start):
        try:
            e = decode_entry(i, raw)
        except CodecError:
            continue
        if e.kind == EntryKind.MEMBERSHIP:
            out.append(StoredMembership(e.log_id, e.payload))
    return out


@dataclass
class Memberships:
    effective: StoredMembership | None
    source: str | None
    committed: bool
    in_log: list[StoredMembership] = field(default_factory=list)


def effective_membership(kv: KVStatus | None, log_ms: list[StoredMembership],
                         committed: LogId | None) -> Memberships:
    """The membership the node would start with: the latest of the state machine's and the log's."""
    # (log index, preference on a tie, source, membership): the log's own entry is named first.
    cands: list[tuple[int, int, str, StoredMembership]] = []
    if kv is not None and kv.snapshot is not None and kv.snapshot.last_membership is not None:
        cands.append((log_index(kv.snapshot.last_membership.log_id), 0, "snapshot", kv.snapshot.last_membership))
    if kv is not None and kv.membership is not None:
        cands.append((log_index(kv.membership.log_id), 1, "state machine", kv.membership))
    for m in log_ms:
        cands.append((log_index(m.log_id), 2, "log", m))
    if not cands:
        return Memberships(None, None, False, log_ms)
    _, _, source, eff = max(cands, key=lambda c: (c[0], c[1]))
    return Memberships(eff, source, log_index(eff.log_id) <= log_index(committed), log_ms)


def gather_summary(dd: DataDir) -> dict:
    kv = dd.kv_state()
    with dd.log.view() as v:
        meta = v.meta
        state = v.log_state
        count = v.count()
        first = v.first_index()
        first_id = None
        if first is not None:
            raw = next(v.iter_raw(first), None)
            if raw is not None:
                try:
                    first_id = decode_entry(first, raw[1]).log_id
                except CodecError:
                    first_id = None
        # What the node reads at start-up: the state machine's membership plus the log after it.
        start = max(log_index(kv.last_applied) if kv is not None else 0, log_index(state.last_purged)) + 1
        log_ms = _scan_memberships(v, start)
    ms = effective_membership(kv, log_ms, meta.committed)
    layout = dd.layout
    sizes = {
        "log_data_bytes": dd.log.data_file_size(),
        "log_map_bytes": dd.log.map_size(),
        "kv_data_bytes": dd.kv.data_file_size() if dd.kv is not None else None,
        "kv_map_bytes": dd.kv.map_size() if dd.kv is not None else None,
        "snapshots_bytes": _dir_size(layout.snapshots) if os.path.isdir(layout.snapshots) else None,
    }
    on_disk = (sizes["log_data_bytes"], sizes["kv_data_bytes"], sizes["snapshots_bytes"])
    sizes["total_bytes"] = sum(x for x in on_disk if x is not None)
    out: dict[str, Any] = {
        "data_dir": layout.root,
        "node_id": meta.node_id,
        "cluster_name": meta.cluster_name,
        "format_version": meta.format_version,
        "current_term": meta.vote.term if meta.vote else 0,
        "vote": None if meta.vote is None else {"term": meta.vote.term, "node_id": meta.vote.node_id},
        "committed": lid_json(meta.committed),
        "first_log_id": lid_json(first_id),
        "last_log_id": lid_json(state.last_log_id),
        "last_log_index": log_index(state.last_log_id),
        "purged": lid_json(state.last_purged),
        "entries": count,
        "state_machine": None,
        "membership": None,
        "sizes": sizes,
        "consistent_read": dd.log.consistent,
    }
    if kv is not None:
        out["state_machine"] = {
            "kind": "kv",
            "format_version": KV_FORMAT_VERSION,
            "last_applied": lid_json(kv.last_applied),
            "keys": kv.keys,
            "membership_log_id": lid_json(kv.membership.log_id) if kv.membership else None,
            "snapshot": snapshot_json(kv),
        }
    if ms.effective is not None:
        mj = membership_json(ms.effective.membership, ms.effective.log_id)
        mj["source"] = ms.source
        mj["committed"] = ms.committed
        out["membership"] = mj
    return out


def snapshot_json(kv: KVStatus) -> dict | None:
    s = kv.snapshot
    if s is None:
        return None
    size = None
    if kv.snapshot_file is not None:
        try:
            size = os.path.getsize(kv.snapshot_file)
        except OSError:
            size = None
    return {
        "last_log_id": lid_json(s.last_log_id),
        "snapshot_id": s.snapshot_id,
        "membership": (membership_json(s.last_membership.membership, s.last_membership.log_id)
                       if s.last_membership else None),
        "file": kv.snapshot_file,
        "file_bytes": size,
    }


# ---------------------------------------------------------------------------
# Commands

def cmd_summary(dd: DataDir, args: argparse.Namespace) -> int:
    s = gather_summary(dd)
    if args.json:
        print(json.dumps(s, sort_keys=True))
        return EXIT_OK
    L = lambda l: lid_text(None if l is None else LogId(*l))  # noqa: E731
    vote = s["vote"]
    print(f"data dir       {s['data_dir']}")
    print(f"node           {s['node_id']} in cluster {s['cluster_name']!r} (format version {s['format_version']})")
    if vote is None:
        print("term / vote    term 0, no vote")
    else:
        print(f"term / vote    term {vote['term']}, voted for "
              f"{vote['node_id'] if vote['node_id'] is not None else 'nobody'}")
    print(f"log            {s['entries']} entries; first {L(s['first_log_id'])}, last {L(s['last_log_id'])}, "
          f"purged up to {L(s['purged'])}")
    print(f"committed      {L(s['committed'])}")
    sm = s["state_machine"]
    if sm is None:
        print("state machine  no KV state machine in this directory")
    else:
        print(f"state machine  KV, last applied {L(sm['last_applied'])}, {sm['keys']} keys")
        snap = sm["snapshot"]
        if snap is None:
            print("snapshot       none")
        else:
            fb = "file missing" if snap["file_bytes"] is None else _human(snap["file_bytes"])
            print(f"snapshot       up to {L(snap['last_log_id'])}, id {snap['snapshot_id']}, "
                  f"{os.path.basename(snap['file'] or '?')} ({fb})")
    m = s["membership"]
    if m is None:
        print("membership     none (an uninitialized node)")
    else:
        state = "committed" if m["committed"] else "NOT committed yet"
        print(f"membership     from {m['source']} entry {L(m['log_id'])}, {state}")
        print(f"  voters       {' -> '.join(str(c) for c in m['configs'])}"
              f"{'  (joint; leaving ' + str(m['leaving']) + ')' if m['joint'] else ''}")
        print(f"  learners     {m['learners']}")
        for nid, n in m["nodes"].items():
            print(f"  node {nid:<7} {n['addr']}")
    z = s["sizes"]
    parts = [f"log.lmdb {_human(z['log_data_bytes'])} (map {_human(z['log_map_bytes'])})"]
    if z["kv_data_bytes"] is not None:
        parts.append(f"kv.lmdb {_human(z['kv_data_bytes'])} (map {_human(z['kv_map_bytes'])})")
    if z["snapshots_bytes"] is not None:
        parts.append(f"snapshots {_human(z['snapshots_bytes'])}")
    print(f"on disk        {', '.join(parts)}; total {_human(z['total_bytes'])}")
    return EXIT_OK


def _iter_raw_chunked(dd: DataDir, lo: int, hi: int) -> Iterator[tuple[int, bytes]]:
    """Stored entries ``lo <= index <= hi``, read _LOG_CHUNK at a time: a slow reader of the
    output (a pager) does not hold one read transaction open, which would keep a running
    node from reusing pages."""
    start = lo
    while start <= hi:
        with dd.log.view() as v:
            batch = list(itertools.islice(v.iter_raw(start), _LOG_CHUNK))
        for i, raw in batch:
            if i > hi:
                return
            yield i, raw
        if len(batch) < _LOG_CHUNK:
            return
        start = batch[-1][0] + 1


def cmd_log(dd: DataDir, args: argparse.Namespace) -> int:
    state = dd.log.log_state()
    lo = args.from_ if args.from_ is not None else 1
    hi = args.to if args.to is not None else log_index(state.last_log_id)
    if args.tail is not None:
        lo = max(lo, hi - args.tail + 1)
    bad = 0
    out = sys.stdout
    first = True
    if args.json:
        out.write("[")
    for i, raw in _iter_raw_chunked(dd, lo, hi):
        try:
            e = decode_entry(i, raw)
        except CodecError as ex:
            bad += 1
            if args.json:
                d = {"index": i, "error": str(ex), "size": len(raw), "hex": raw[:_HEX_PREFIX].hex()}
                out.write(("" if first else ",") + "\n" + json.dumps(d, sort_keys=True))
            else:
                out.write(f"{i:>8} {'?':>6} UNDECODABLE <{len(raw)} bytes> {raw[:_HEX_PREFIX].hex()}: {ex}\n")
            first = False
            continue
        if args.json:
            out.write(("" if first else ",") + "\n" + json.dumps(entry_json(e, len(raw)), sort_keys=True))
        else:
            out.write(entry_text(e) + "\n")
        first = False
    if args.json:
        out.write("\n]\n")
    if bad:
        print(f"pyraft-inspect: {bad} entries do not decode (run verify)", file=sys.stderr)
        return EXIT_FAULT
    return EXIT_OK


@dataclass
class VerifyReport:
    faults: list[tuple[int | None, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    entries: int = 0
    first_index: int | None = None
    last_index: int = 0
    last_term: int = 0

    def fault(self, index: int | None, reason: str) -> None:
        self.faults.append((index, reason))

    def sorted_faults(self) -> list[tuple[int | None, str]]:
        return sorted(self.faults, key=lambda f: (f[0] is None, f[0] or 0))


def verify(dd: DataDir, progress: Any = None) -> VerifyReport:
    """Check the log (and the KV state machine against it); logical faults go into the report.

    On a running node the two environments cannot be read in one
    transaction, so the KV state is read before the log and again after it:
    checks that applied must not be ahead of the log use the first reading
    (applied then <= applied when the log was read), the check that the log
    is not purged past applied uses the second (purged then <= applied then).
    """
    r = VerifyReport()
    try:
        kv = dd.kv_state()
    except (CodecError, ValueError, TypeError) as e:
        kv = None
        r.fault(None, f"KV state machine meta does not decode: {e}")
    with dd.log.view() as v:
        try:
            meta: LogStoreMeta | None = v.meta
        except (CodecError, ValueError, TypeError) as e:
            meta = None
            r.fault(None, f"log meta does not decode: {e}")
        purged = meta.purged if meta else None
        committed = meta.committed if meta else None
        applied = kv.last_applied if kv else None
        # Terms at the indexes the metadata names, recorded during the one pass.
        want = {log_index(committed), log_index(applied)} - {0}
        term_at: dict[int, int] = {}
        total = v.count()
        report_progress = progress is not None and total >= _PROGRESS_MIN
        next_report = time.monotonic() + _PROGRESS_EVERY
        prev_index = log_index(purged)
        prev_term = purged.term if purged else 0
        for i, raw in v.iter_raw(0):
            r.entries += 1
            if report_progress and r.entries % 4096 == 0 and time.monotonic() >= next_report:
                progress(f"verify: {r.entries}/{total} entries ({100 * r.entries // max(total, 1)}%)")
                next_report = time.monotonic() + _PROGRESS_EVERY
            if r.first_index is None:
                r.first_index = i
                if i <= log_index(purged):
                    r.fault(i, f"entry {i} is still stored but the log is purged up to {lid_text(purged)}")
                elif i != prev_index + 1:
                    r.fault(prev_index + 1, f"the log starts at {i}, expected {prev_index + 1} "
                                            f"(purged up to {lid_text(purged)}): entries "
                                            f"{prev_index + 1}..{i - 1} are missing")
            elif i != prev_index + 1:
                r.fault(prev_index + 1, f"hole: entries {prev_index + 1}..{i - 1} are missing "
                                        f"(the log jumps from {prev_index} to {i})")
            prev_index = i
            try:
                ent = decode_entry(i, raw)
            except CodecError as ex:
                r.fault(i, f"does not decode: {ex}")
                continue
            if ent.term < prev_term:
                r.fault(i, f"term {ent.term} follows term {prev_term}: terms in the log never decrease")
            prev_term = max(prev_term, ent.term)
            if i in want:
                term_at[i] = ent.term
            if ent.kind == EntryKind.MEMBERSHIP:
                bad = [k for k, n in ent.payload.nodes.items() if not n.addr]
                if bad:
                    r.fault(i, f"membership entry: nodes {bad} have an empty address")
            elif ent.kind == EntryKind.NORMAL and ent.term == 0:
                r.fault(i, "a normal entry in term 0 (only the initial membership is written before any term)")
        r.last_index = max(prev_index, log_index(purged))
        r.last_term = prev_term
    if report_progress:
        progress(f"verify: {r.entries}/{total} entries (100%)")

    if meta is not None:
        if meta.format_version != FORMAT_VERSION:
            r.fault(None, f"log format version {meta.format_version!r}, expected {FORMAT_VERSION}")
        if meta.vote is not None and r.entries and r.last_term > meta.vote.term:
            r.fault(r.last_index, f"the log holds term {r.last_term} but the stored vote is only in term "
                                  f"{meta.vote.term}")
        if committed is not None:
            if committed.index > r.last_index:
                r.fault(committed.index, f"committed {lid_text(committed)} is past the last log index {r.last_index}")
            elif committed.index in term_at and term_at[committed.index] != committed.term:
                r.fault(committed.index, f"committed {lid_text(committed)} but the entry there is in term "
                                         f"{term_at[committed.index]}")
            elif committed.index == log_index(purged) and purged is not None and purged.term != committed.term:
                r.fault(committed.index, f"committed {lid_text(committed)} but purged {lid_text(purged)}")
    if kv is not None:
        try:
            kv_after = dd.kv_state()
        except (CodecError, ValueError, TypeError):
            kv_after = kv
        _verify_kv(r, kv, kv_after or kv, committed, purged, term_at)
    return r


def _verify_kv(r: VerifyReport, kv: KVStatus, kv_after: KVStatus, committed: LogId | None, purged: LogId | None,
               term_at: dict[int, int]) -> None:
    """``kv`` was read before the log, ``kv_after`` after it (see :func:`verify`)."""
    applied = kv.last_applied
    snap = kv.snapshot
    if log_index(kv_after.last_applied) < log_index(purged):
        r.fault(log_index(purged), f"the log is purged up to {lid_text(purged)} but the state machine has applied "
                                   f"only {lid_text(kv_after.last_applied)}: entries "
                                   f"{log_index(kv_after.last_applied) + 1}..{log_index(purged)} are lost")
    if applied is not None:
        installed = snap is not None and snap.last_log_id == applied
        if applied.index > r.last_index and not installed:
            r.fault(applied.index, f"applied {lid_text(applied)} is past the last log index {r.last_index} "
                                   f"(committed {lid_text(committed)}): the state machine holds entries the "
                                   f"log never had")
        elif applied.index > log_index(committed):
            # RaftCore saves the commit point lazily (a hint that rides with the next log
            # write), and a snapshot install moves applied before the log catches up.
            why = ("a snapshot was installed and the log not yet updated (the node repairs this at start-up)"
                   if installed else "the commit point is saved lazily, with the next log write")
            r.notes.append(f"applied {lid_text(applied)} is ahead of the stored commit point "
                           f"{lid_text(committed)}: {why}")
        if applied.index in term_at and term_at[applied.index] != applied.term:
            r.fault(applied.index, f"the state machine applied {lid_text(applied)} but the log entry there is "
                                   f"in term {term_at[applied.index]}")
    if kv.membership is not None and log_index(kv.membership.log_id) > log_index(applied):
        r.fault(log_index(kv.membership.log_id), f"the state machine's membership {lid_text(kv.membership.log_id)} "
                                                 f"is past its applied index {lid_text(applied)}")
    if snap is not None:
        if log_index(snap.last_log_id) > log_index(applied):
            r.fault(log_index(snap.last_log_id), f"the snapshot covers {lid_text(snap.last_log_id)}, past the "
                                                 f"applied index {lid_text(applied)}")
        problem = check_snapshot_file(kv)
        if problem is not None:
            r.fault(None, problem)


def check_snapshot_file(kv: KVStatus) -> str | None:
    """None when the current snapshot file reads back whole (magic, records, counts, CRC), else why not."""
    assert kv.snapshot is not None and kv.snapshot_file is not None, "a snapshot comes with its file"
    path = kv.snapshot_file
    try:
        KVReader.check_snapshot_file(path, kv.snapshot)
    except FileNotFoundError:
        return None  # replaced by a newer snapshot since the meta was read (the node ignores a missing file too)
    except (StorageError, OSError) as e:
        return f"snapshot file {path}: {e}"
    return None


def cmd_verify(dd: DataDir, args: argparse.Namespace) -> int:
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not dd.log.consistent:
        print("pyraft-inspect: warning: LMDB's lock file is not writable here; reads may be torn while the node "
              "writes", file=sys.stderr)
    r = verify(dd, progress)
    faults = r.sorted_faults()
    if args.json:
        print(json.dumps({
            "ok": not faults,
            "entries": r.entries,
            "first_index": r.first_index,
            "last_index": r.last_index,
            "faults": [{"index": i, "reason": why} for i, why in faults],
            "notes": r.notes,
        }, sort_keys=True))
    else:
        span = (f"no entries (purged up to {r.last_index})" if r.first_index is None
                else f"{r.entries} entries, {r.first_index}..{r.last_index}")
        if not faults:
            print(f"OK: {dd.layout.root}: {span}, terms up to {r.last_term}")
        else:
            i, why = faults[0]
            where = f"index {i}" if i is not None else "metadata"
            print(f"FAULT at {where}: {why}")
            for i, why in faults[1:20]:
                print(f"  also at {'index ' + str(i) if i is not None else 'metadata'}: {why}")
            if len(faults) > 20:
                print(f"  ... and {len(faults) - 20} more")
            print(f"{len(faults)} fault{'s' if len(faults) > 1 else ''} in {dd.layout.root} ({span})")
        for n in r.notes:
            print(f"note: {n}")
    return EXIT_FAULT if faults else EXIT_OK


def cmd_vote(dd: DataDir, args: argparse.Namespace) -> int:
    meta = dd.log.meta()
    v = meta.vote
    if args.json:
        print(json.dumps({"term": v.term if v else 0, "node_id": v.node_id if v else None,
                          "committed": lid_json(meta.committed)}, sort_keys=True))
    elif v is None:
        print("term 0, no vote")
    else:
        who = f"voted for node {v.node_id}" if v.node_id is not None else "no vote in this term"
        print(f"term {v.term}, {who}")
    return EXIT_OK


def cmd_membership(dd: DataDir, args: argparse.Namespace) -> int:
    kv = dd.kv_state()
    with dd.log.view() as v:
        meta = v.meta
        log_ms = _scan_memberships(v, 0)
    ms = effective_membership(kv, log_ms, meta.committed)
    if args.json:
        eff = None
        if ms.effective is not None:
            eff = membership_json(ms.effective.membership, ms.effective.log_id)
            eff["source"] = ms.source
            eff["committed"] = ms.committed
        print(json.dumps({
            "effective": eff,
            "state_machine": (membership_json(kv.membership.membership, kv.membership.log_id)
                              if kv is not None and kv.membership is not None else None),
            "log": [membership_json(m.membership, m.log_id) for m in log_ms],
            "committed": lid_json(meta.committed),
        }, sort_keys=True))
        return EXIT_OK
    if ms.effective is None:
        print("no membership (an uninitialized node)")
        return EXIT_OK
    e = ms.effective
    state = "committed" if ms.committed else "NOT committed yet"
    print(f"effective: {membership_text(e.membership)}")
    print(f"  from {ms.source} entry {lid_text(e.log_id)}, {state}")
    if kv is not None and kv.membership is not None:
        print(f"state machine (applied): entry {lid_text(kv.membership.log_id)}: {membership_text(kv.membership.membership)}")
    if log_ms:
        print("membership entries in the log:")
        for m in log_ms:
            print(f"  {lid_text(m.log_id):>10}  {membership_text(m.membership)}")
    return EXIT_OK


def cmd_snapshot(dd: DataDir, args: argparse.Namespace) -> int:
    if dd.kv is None:
        msg = f"{dd.layout.root} has no KV state machine ({KV_ENV_NAME}/): no snapshots to show"
        if args.export:
            return emit_error("pyraft-inspect", args.json, EXIT_FAULT, msg, kind="NoSnapshot")
        print(f"pyraft-inspect: {msg}", file=sys.stderr)
        return EXIT_OK
    kv = dd.kv.status()
    if kv.snapshot is None:
        if args.export:
            return emit_error("pyraft-inspect", args.json, EXIT_FAULT, "no snapshot to export", kind="NoSnapshot")
        print(json.dumps(None) if args.json else "no snapshot")
        return EXIT_OK
    if args.export:
        return _export_snapshot(dd, kv, args)
    info = snapshot_json(kv)
    assert info is not None, "kv.snapshot is not None"
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return EXIT_OK
    s = kv.snapshot
    print(f"snapshot {s.snapshot_id}")
    print(f"  up to      {lid_text(s.last_log_id)}")
    if s.last_membership is not None:
        print(f"  membership entry {lid_text(s.last_membership.log_id)}: {membership_text(s.last_membership.membership)}")
    fb = "missing (replaced meanwhile?)" if info["file_bytes"] is None else f"{info['file_bytes']} bytes"
    print(f"  file       {info['file']} ({fb})")
    return EXIT_OK


def _check_export(args: argparse.Namespace) -> str:
    """Where --export may write (see :func:`pyraft.tools.cli.check_output_file`): never into the data
    directory being read, an LMDB environment or over anything but a regular file (UsageError)."""
    return check_output_file(args.export, force=args.force, flag="--export FILE", protect=[args.data_dir])


def _export_snapshot(dd: DataDir, kv: KVStatus, args: argparse.Namespace) -> int:
    dest = _check_export(args)
    # The node deletes a superseded snapshot file: open it first (an open
    # file stays readable), and if it is gone already, read the pointer again.
    for _ in range(5):
        assert kv.snapshot is not None and kv.snapshot_file is not None
        try:
            src = open(kv.snapshot_file, "rb")
            break
        except FileNotFoundError:
            kv = dd.kv.status()  # type: ignore[union-attr]
            if kv.snapshot is None:
                return emit_error("pyraft-inspect", args.json, EXIT_FAULT, "no snapshot to export", kind="NoSnapshot")
    else:
        return emit_error("pyraft-inspect", args.json, EXIT_FAULT,
                          "the snapshot kept being replaced while exporting; retry", kind="SnapshotReplaced")
    # A new file of its own (O_EXCL): never through whatever DEST.tmp may be.
    tmp = f"{dest}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        # 0600: the snapshot holds all the data, as the node's own files do
        with src, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        counts = KVReader.check_snapshot_file(tmp, kv.snapshot)
        _check_export(args)  # again: DEST may have changed while the snapshot was copied
        os.replace(tmp, dest)
    except UsageError:
        _unlink(tmp)
        raise
    except StorageError as e:
        _unlink(tmp)
        return emit_error("pyraft-inspect", args.json, EXIT_FAULT, f"the snapshot file is damaged: {e}")
    except OSError as e:
        _unlink(tmp)
        return emit_error("pyraft-inspect", args.json, EXIT_UNREADABLE, f"cannot write {dest}: {e.strerror or e}",
                          kind=type(e).__name__)
    except BaseException:  # Ctrl-C mid-copy: no copy of the data left behind under a name nobody knows
        _unlink(tmp)
        raise
    info = snapshot_json(kv) or {}
    info.update({"exported_to": dest, "exported_bytes": os.path.getsize(dest), "keys": counts[0],
                 "sessions": counts[1]})
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(f"exported snapshot {kv.snapshot.snapshot_id} (up to {lid_text(kv.snapshot.last_log_id)}) to {dest}: "
              f"{info['exported_bytes']} bytes, {counts[0]} keys, {counts[1]} sessions, checksum OK")
    return EXIT_OK


def _unlink(path: str) -> None:
    """Remove a temporary file, if it is there: cleanup never raises (a failed open leaves none)."""
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# CLI

def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="pyraft-inspect",
               description="Read a pyraft node's data directory (read-only; safe while the node runs).  "
                           "--json may come before or after the command.")
    add_version(p)
    p.add_argument("data_dir", metavar="DATA_DIR", help="the node data directory (pyraft-kv serve --data-dir)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    subs = []
    s = sub.add_parser("summary", help="node, term and vote, log range, commit, apply, snapshot, membership, sizes")
    subs.append(s)
    s = sub.add_parser("log", help="one line per log entry (--json: a JSON array of entries)")
    s.add_argument("--from", dest="from_", type=_nonneg, metavar="I", help="first index (default: the first)")
    s.add_argument("--to", type=_nonneg, metavar="J", help="last index, inclusive (default: the last)")
    s.add_argument("--tail", type=_nonneg, metavar="N", help="only the last N entries of the range")
    subs.append(s)
    s = sub.add_parser("verify", help="check the log: exit 0 sound, 1 logical fault, 2 unreadable")
    s.add_argument("--quiet", action="store_true", help="no progress on stderr")
    subs.append(s)
    subs.append(sub.add_parser("membership", help="the effective membership and every membership entry"))
    subs.append(sub.add_parser("vote", help="the stored term and vote"))
    s = sub.add_parser("snapshot", help="the current KV snapshot's metadata")
    s.add_argument("--export", metavar="FILE", help="copy the snapshot file to FILE (checked as it is read)")
    s.add_argument("--force", action="store_true", help="overwrite FILE")
    subs.append(s)
    add_global(p, subs, "--json", action="store_true", default=False, help="print JSON (errors too)")
    return p


_COMMANDS = {"summary": cmd_summary, "log": cmd_log, "verify": cmd_verify, "membership": cmd_membership,
             "vote": cmd_vote, "snapshot": cmd_snapshot}


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    j = args.json
    if args.command == "snapshot" and args.export is not None:
        _check_export(args)  # up front: a bad FILE is a usage error before anything is read
    try:
        with DataDir(args.data_dir) as dd:
            return _COMMANDS[args.command](dd, args)
    except Unreadable as e:
        return emit_error("pyraft-inspect", j, EXIT_UNREADABLE, e)
    except (StorageError, lmdb.Error) as e:
        return emit_error("pyraft-inspect", j, EXIT_UNREADABLE, f"cannot read {args.data_dir}: {e}",
                          kind=type(e).__name__)
    except (CodecError, ValueError, TypeError) as e:
        return emit_error("pyraft-inspect", j, EXIT_FAULT,
                          f"{args.data_dir}: stored metadata does not decode: {e} (run verify)", kind="CodecError")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("pyraft-inspect", argv, _main)


if __name__ == "__main__":
    sys.exit(main())
