"""``pyraft-admin``: look at and change a live pyraft cluster over its ZeroMQ addresses.

::

    pyraft-admin --node ADDR [--cluster-name NAME] [--timeout S] [--json] [CURVE options] COMMAND
        status                          every member: role, term, log, commit, apply, lag, reachable
        health [--max-lag N]            exit 0 healthy, 1 not (no leader, lagging, Fatal), 2 unreachable
        add-learner ID ADDR [--no-wait] add a non-voting member (waits until it caught up)
        change-membership ID,ID,... [--retain]
                                        make exactly these nodes the voters (joint consensus)
        remove ID                       drop a member (a voter through a membership change)
        remove-learner ID               drop a learner
        transfer-leader ID              hand the leadership to voter ID
        snapshot                        build a snapshot on the contacted node now
        purge-log INDEX                 purge the contacted node's log up to INDEX
        backup FILE [--force] [--stale] an online, consistent backup of the contacted node
    pyraft-admin keygen DIR [--name NAME]   write a CURVE key pair (NAME.key, NAME.key_secret, the
                                            secret created readable by its owner only)

Global options go before or after the command.  Without ``--node``, the
addresses of ``--cluster`` (or ``$PYRAFT_CLUSTER``) are tried in order and
the first that answers is used (``health`` checks every one of them).

Every command but ``keygen`` first asks the node for its ``"metrics"``.
Membership changes and leadership transfers go to the leader: the tool
follows the contacted node's leader hint (and a ``ForwardToLeader`` reply)
by itself.  ``snapshot``, ``purge-log`` and ``backup`` act on the contacted
node.  The nodes answer these requests once
:func:`pyraft.admin_ops.serve_admin` is registered on them (``pyraft-kv
serve`` does).

Exit codes: :data:`pyraft.tools.cli.EXIT_CODES` (0 done; 1 the operation
failed: the node said no, or it timed out and its outcome is unknown, or the
node is unhealthy; 2 usage error, node unreachable, or bad CURVE key files).
With CURVE, ``status`` and ``health`` need a key with at least the reader
role and the other commands an admin key (``admins/`` in the nodes' allow
list); others fail with ``PermissionDenied``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import re
import sys
import time
from typing import Any, Sequence

from pyraft.backup import BackupError
from pyraft.codec import _MAX_INT, ClientRequest, ClientResponse
from pyraft.errors import CodecError, ForwardToLeader, RaftError, Timeout
from pyraft.raft import raise_error_response
from pyraft.tools.cli import (CLUSTER_ENV, EXIT_FAILED, EXIT_OK, EXIT_USAGE, Parser, UsageError, add_global,
                              add_version, check_output_file, cluster_from, emit_error, json_line, printable,
                              run_main)
from pyraft.transports.zmq import CurveConfig, TransportError, ZmqClient, check_address, generate_keys
from pyraft.types import ServerState

#: How long to wait for a node to answer a ``metrics`` request.
DEFAULT_CONNECT_TIMEOUT = 3.0
#: How long an operation may take (sent to the node, which enforces it).
DEFAULT_TIMEOUT = 30.0
#: Time the reply of an operation may take to travel back after the node's own deadline.
_REPLY_MARGIN = 3.0
#: The longest --timeout / --connect-timeout (seconds): a day (a node caps an operation at 600 s anyway).
MAX_TIMEOUT = 86400.0
#: What keygen --name may be: it becomes a file name in DIR (and, for a node, peers/NAME.key).
_KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


class Unreachable(Exception):
    """No reply from a node within the time given (it is down, or the address/CURVE keys are wrong)."""


class Admin:
    """Talks to the nodes of one cluster: one short-lived :class:`ZmqClient` per call."""

    def __init__(self, cluster_name: str, *, curve: CurveConfig | None = None,
                 server_key: str | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.cluster_name = cluster_name
        self.curve = curve
        self.server_key = server_key
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        #: node ids of addresses given as N=ADDR (to find their CURVE server keys)
        self.known_ids: dict[str, int] = {}

    def _key_for(self, addr: str, node_id: int | None, contacted: str | None) -> Any:
        if self.curve is None:
            return None
        if addr == contacted and self.server_key is not None:
            return self.server_key
        if node_id is None:
            node_id = self.known_ids.get(addr)
        if node_id is None:
            raise UsageError(f"no CURVE server key for {addr}: give --curve-server-key")
        try:
            return self.curve.server_key_for(node_id)
        except TransportError as e:
            raise UsageError(f"{e} (give --curve-keys-dir: the allow list, with peers/N.key for every node)") from None

    def call(self, addr: str, op: str, body: Any = None, *, timeout: float, node_id: int | None = None,
             contacted: str | None = None) -> Any:
        """Send one request; return the reply body, raise the node's error, or Unreachable."""
        key = self._key_for(addr, node_id, contacted)
        try:
            with ZmqClient(addr, self.cluster_name, curve=self.curve, server_key=key, timeout=timeout) as c:
                resp = c.call(ClientRequest(op, body), timeout)
        except Timeout as e:
            hint = "the node is down, or --cluster-name"
            hint += ", or the CURVE keys are wrong" if self.curve is not None else " is wrong"
            raise Unreachable(f"{e} ({hint}; this tool says cluster {self.cluster_name!r})") from None
        if not isinstance(resp, ClientResponse):
            raise RaftError(f"{addr} answered {op} with a {type(resp).__name__}")
        if not resp.ok:
            raise_error_response(resp)
        return resp.body

    def metrics(self, addr: str, node_id: int | None = None, contacted: str | None = None) -> dict:
        m = self.call(addr, "metrics", None, timeout=self.connect_timeout, node_id=node_id, contacted=contacted)
        try:
            check_metrics(m)
        except (TypeError, ValueError) as e:
            raise CodecError(f"{printable(addr)} answered metrics this tool cannot read: {printable(e)}") from None
        return m


#: Members a status shows at most (a node that listed thousands would keep the tool asking for long).
MAX_MEMBERS = 256
_STATES = frozenset(str(s) for s in ServerState)


def _nat(v: Any, what: str) -> None:
    if type(v) is not int or not 0 <= v <= _MAX_INT:
        raise ValueError(f"{what}: expected an integer >= 0, got {v!r:.40}")


def _opt_lid(v: Any, what: str) -> None:
    if v is not None:
        if type(v) is not list or len(v) != 2:
            raise ValueError(f"{what}: expected [term, index] or null, got {v!r:.40}")
        _nat(v[0], what)
        _nat(v[1], what)


def check_metrics(m: Any) -> None:
    """ValueError or TypeError unless ``m`` has the shape of ``RaftMetrics.to_dict()`` where the tools read it."""
    if type(m) is not dict:
        raise TypeError(f"expected a map, got {type(m).__name__}")
    _nat(m.get("id"), "id")
    if m.get("state") not in _STATES:
        raise ValueError(f"state: not a server state: {m.get('state')!r:.40}")
    _nat(m.get("current_term"), "current_term")
    _nat(m.get("last_log_index"), "last_log_index")
    for k in ("committed", "last_applied", "snapshot", "purged", "membership_log_id"):
        _opt_lid(m.get(k), k)
    if m.get("current_leader") is not None:
        _nat(m["current_leader"], "current_leader")
    if m.get("error") is not None and type(m["error"]) is not str:
        raise ValueError("error: expected a string or null")
    rep = m.get("replication", {})
    if type(rep) is not dict:
        raise ValueError("replication: expected a map")
    for k, v in rep.items():
        _nat(int(k), "replication target")
        _opt_lid(v, "replication")
    ms = m.get("membership")
    if ms is not None:
        if type(ms) is not dict or type(ms.get("nodes")) is not dict:
            raise ValueError("membership: expected a map with nodes")
        if len(ms["nodes"]) > MAX_MEMBERS:
            raise ValueError(f"membership: {len(ms['nodes'])} members, more than this tool shows ({MAX_MEMBERS})")
        for k, a in ms["nodes"].items():
            _nat(int(k), "member id")
            check_address(a)
        for k in ("voters", "learners"):
            if type(ms.get(k, [])) is not list:
                raise ValueError(f"membership {k}: expected a list")
            for n in ms.get(k, []):
                _nat(n, f"membership {k}")


# ---------------------------------------------------------------------------
# status

def _index(lid: Any) -> int | None:
    return lid[1] if isinstance(lid, list) and len(lid) == 2 else None


def _node_addrs(m: dict | None) -> dict[int, str]:
    if not m or not m.get("membership"):
        return {}
    return {int(k): v for k, v in m["membership"]["nodes"].items()}


def gather_status(admin: Admin, addr: str) -> dict:
    """The contacted node's metrics at top level plus ``members``: one entry per member, asked in parallel."""
    top = admin.metrics(addr, contacted=addr)
    addrs = _node_addrs(top)
    results: dict[int, dict] = {top["id"]: {"metrics": top}}

    def ask(nid: int, a: str) -> dict:
        try:
            return {"metrics": admin.metrics(a, nid, contacted=addr)}
        except (Unreachable, UsageError, RaftError, TransportError) as e:
            return {"error": str(e)}

    deadline = time.monotonic() + admin.timeout  # the whole status, however many members are listed

    def ask_all(todo: dict[int, str]) -> None:
        if not todo:
            return
        ex = concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(todo)),
                                                   thread_name_prefix="pyraft-admin-status")
        try:
            futs = {nid: ex.submit(ask, nid, a) for nid, a in todo.items()}
            for nid, f in futs.items():
                try:
                    results[nid] = f.result(timeout=max(0.0, deadline - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    results[nid] = {"error": f"not asked within --timeout {admin.timeout} s"}
        finally:
            ex.shutdown(wait=False, cancel_futures=True)  # (a member being asked ends within --connect-timeout)

    ask_all({n: a for n, a in addrs.items() if n not in results})
    # The leader's membership may be newer than the contacted node's: ask whom it adds.
    leader_m = _leader_metrics(results)
    if leader_m is not None:
        extra = {n: a for n, a in _node_addrs(leader_m).items() if n not in results}
        addrs.update(_node_addrs(leader_m))
        ask_all(extra)
        leader_m = _leader_metrics(results)
    membership = (leader_m or top).get("membership") or {}
    voters = set(membership.get("voters", []))
    learners = set(membership.get("learners", []))
    members = []
    for nid in sorted(set(addrs) | {top["id"]}):
        r = results.get(nid, {})
        m = r.get("metrics")
        entry: dict[str, Any] = {
            "id": nid,
            "address": addrs.get(nid, addr if nid == top["id"] else None),
            "voter": nid in voters,
            "learner": nid in learners,
            "reachable": m is not None,
        }
        if m is not None:
            for k in ("state", "current_term", "current_leader", "last_log_index", "committed", "last_applied",
                      "snapshot", "purged"):
                entry[k] = m.get(k)
        else:
            entry["error"] = r.get("error", "not asked")
        entry["matched"] = None
        entry["lag"] = None
        if leader_m is not None:
            if nid == leader_m["id"]:
                entry["matched"] = [leader_m["current_term"], leader_m["last_log_index"]]
                entry["lag"] = 0
            else:
                matched = leader_m.get("replication", {}).get(str(nid))
                entry["matched"] = matched
                if str(nid) in leader_m.get("replication", {}):
                    entry["lag"] = leader_m["last_log_index"] - (_index(matched) or 0)
        members.append(entry)
    out = dict(top)
    out["address"] = addr
    out["committed_index"] = _index(top.get("committed")) or 0
    out["last_applied_index"] = _index(top.get("last_applied")) or 0
    out["leader"] = None if leader_m is None else {"id": leader_m["id"], "term": leader_m["current_term"],
                                                     "address": addrs.get(leader_m["id"])}
    out["members"] = members
    return out


def _leader_metrics(results: dict[int, dict]) -> dict | None:
    leaders = [r["metrics"] for r in results.values()
               if r.get("metrics") and r["metrics"].get("state") == "Leader"]
    return max(leaders, key=lambda m: m["current_term"]) if leaders else None


def _fmt_index(v: Any) -> str:
    i = _index(v)
    return "-" if i is None else str(i)


def print_status(st: dict, out: Any = None) -> None:
    out = out or sys.stdout
    leader = st.get("leader")
    lead = (f"leader {leader['id']} (term {leader['term']})" if leader
            else "no leader reached")
    print(printable(f"contacted {st['address']}: node {st['id']}, {st['state']} in term {st['current_term']}; "
                    f"{lead}"), file=out)
    rows = [("ID", "ADDRESS", "ROLE", "STATE", "TERM", "LAST-LOG", "COMMITTED", "APPLIED", "LAG", "REACHABLE")]
    for m in st["members"]:
        role = "voter" if m["voter"] else "learner" if m["learner"] else "-"
        if m["reachable"]:
            rows.append((str(m["id"]), m["address"] or "?", role, m["state"], str(m["current_term"]),
                         str(m["last_log_index"]), _fmt_index(m["committed"]), _fmt_index(m["last_applied"]),
                         "-" if m["lag"] is None else str(m["lag"]), "yes"))
        else:
            rows.append((str(m["id"]), m["address"] or "?", role, "?", "-", "-", "-", "-",
                         "-" if m["lag"] is None else str(m["lag"]), "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(printable("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()), file=out)
    for m in st["members"]:
        if not m["reachable"]:
            print(printable(f"node {m['id']}: {m.get('error')}"), file=out)


# ---------------------------------------------------------------------------
# Operations that go to the leader

def call_leader(admin: Admin, addr: str, op: str, body: dict) -> tuple[str, Any]:
    """Send ``op`` to the leader, following hints; returns ``(address that answered, body)``.

    Only a ForwardToLeader reply is retried (the node did nothing); a
    Timeout or other error is final, as the operation may have happened.
    """
    deadline = time.monotonic() + admin.timeout + _REPLY_MARGIN
    m = admin.metrics(addr, contacted=addr)
    home = (addr, m["id"])
    target, target_id = home
    if m.get("state") != "Leader" and m.get("current_leader") is not None:
        hint = _node_addrs(m).get(m["current_leader"])
        if hint:
            target, target_id = hint, m["current_leader"]
    answered = {addr}  # addresses known to answer: the operation is only sent to those
    last_answer = "none"

    def pause() -> None:  # an election is on, or a hint is stale: ask again shortly
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    while True:
        if time.monotonic() >= deadline:
            raise Timeout(f"no leader accepted {op} within {admin.timeout:g} s (last answer: {last_answer})")
        if target not in answered:
            try:
                admin.metrics(target, target_id, contacted=addr)
                answered.add(target)
            except Unreachable as e:
                last_answer = str(e)
                target, target_id = home
                pause()
                continue
        left = deadline - time.monotonic()
        try:
            return target, admin.call(target, op, {**body, "timeout": max(1.0, left - _REPLY_MARGIN)},
                                      timeout=max(1.0, left), node_id=target_id, contacted=addr)
        except ForwardToLeader as e:
            last_answer = str(e)
            if e.leader_node is not None and e.leader_node.addr != target:
                target, target_id = e.leader_node.addr, e.leader_id
                continue
            if e.leader_node is None:
                target, target_id = home
            pause()


def _fmt_membership(ms: dict | None) -> str:
    if not ms:
        return "no membership"
    cfgs = " -> ".join(str(c) for c in ms["configs"])
    return f"voters {cfgs}; learners {ms['learners']}"


def _lid(v: Any) -> str:
    return "none" if v is None else f"{v[0]}-{v[1]}"


# ---------------------------------------------------------------------------
# CLI

def _split_addresses(text: str) -> list[tuple[int | None, str]]:
    """``ADDR,ADDR`` or ``N=ADDR,...`` -> [(N or None, ADDR)]."""
    out: list[tuple[int | None, str]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, a = part.partition("=")
        if sep and "://" not in k:
            try:
                out.append((int(k), a.strip()))
            except ValueError:
                raise UsageError(f"--cluster: expected ADDR or N=ADDR, got {part!r}") from None
        else:
            out.append((None, part))
    if not out:
        raise UsageError("--cluster: no addresses given")
    return out


def health(admin: Admin, addr: str, max_lag: int) -> tuple[int, dict]:
    """etcd's ``endpoint health`` for one node: (exit code, report with ``healthy`` and ``reason``)."""
    rep: dict[str, Any] = {"address": addr, "healthy": False, "reachable": False, "max_lag": max_lag}
    try:
        m = admin.metrics(addr, contacted=addr)
    except Unreachable as e:
        rep.update(error="Unreachable", message=str(e), reason=f"unreachable: {e}")
        return EXIT_USAGE, rep
    applied = _index(m.get("last_applied")) or 0
    rep.update(reachable=True, id=m["id"], state=m["state"], current_term=m["current_term"],
               current_leader=m.get("current_leader"), last_applied=applied,
               committed=_index(m.get("committed")) or 0)
    if m["state"] in ("Fatal", "Shutdown"):
        rep["reason"] = f"node {m['id']} is {m['state']}" + (f": {m['error']}" if m.get("error") else "")
        return EXIT_FAILED, rep
    leader = m.get("current_leader")
    if leader is None:
        rep["reason"] = f"node {m['id']} knows no leader ({m['state']} in term {m['current_term']})"
        return EXIT_FAILED, rep
    # The lag is measured against the leader's own commit index; when the leader cannot be
    # asked from here, against the one this node last heard of (it trails by a heartbeat).
    leader_commit, measured = rep["committed"], "this node's commit index"
    if leader != m["id"]:
        lm = _ask_leader(admin, addr, m)
        if lm is not None:
            leader_commit = max(leader_commit, _index(lm.get("committed")) or 0)
            measured = f"leader {leader}'s commit index"
    else:
        measured = "its own commit index (it leads)"
    lag = max(0, leader_commit - applied)
    rep.update(leader_committed=leader_commit, lag=lag, lag_measured_against=measured)
    if lag > max_lag:
        rep["reason"] = (f"node {m['id']} lags: applied {applied}, {measured} {leader_commit} "
                         f"({lag} entries behind, --max-lag {max_lag})")
        return EXIT_FAILED, rep
    rep["healthy"] = True
    rep["reason"] = (f"node {m['id']} is healthy: {m['state']} in term {m['current_term']}, leader {leader}, "
                     f"{lag} entries behind {measured}")
    return EXIT_OK, rep


def _ask_leader(admin: Admin, addr: str, m: dict) -> dict | None:
    """The metrics of the leader that ``m`` (node ``addr``'s metrics) names, if it answers as the leader."""
    leader = m.get("current_leader")
    la = _node_addrs(m).get(leader) if leader is not None else None
    if not la:
        return None
    try:
        lm = admin.metrics(la, leader, contacted=addr)
    except (Unreachable, UsageError, RaftError, TransportError):
        return None
    return lm if lm.get("state") == "Leader" else None


def _leader_commit_fence(admin: Admin, addr: str, m: dict, deadline: float) -> int | None:
    """The leader's commit index, once it has committed an entry of its term (then it covers every
    acknowledged write); None when no leader answers."""
    while True:
        lm = _ask_leader(admin, addr, m)
        if lm is not None:
            c = lm.get("committed")
            if isinstance(c, list) and c[0] == lm["current_term"]:
                return c[1]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)
        m = admin.metrics(addr, contacted=addr)


def backup(admin: Admin, addr: str, path: str, *, stale: bool = False, force: bool = False) -> dict:
    """Stream an online backup of node ``addr`` to ``path`` (atomically); returns the backup's summary."""
    from pyraft import __version__
    from pyraft.backup import BACKUP_VERSION, BackupHeader, BackupWriter

    check_output_file(path, force=force)  # a regular file, not in a data directory or LMDB environment
    m = admin.metrics(addr, contacted=addr)
    nid = m["id"]
    min_index = 0
    if m.get("state") != "Leader":
        fence = _leader_commit_fence(admin, addr, m, time.monotonic() + min(admin.timeout, 10.0))
        if fence is not None:
            min_index = fence
        elif not stale:
            raise RaftError(f"no leader answers: a backup of node {nid} now could miss acknowledged writes; "
                            f"add --stale to back up what node {nid} has applied")
    r = admin.call(addr, "admin.backup_begin", {"min_index": min_index, "timeout": admin.timeout},
                   timeout=admin.timeout + _REPLY_MARGIN, node_id=nid, contacted=addr)
    if type(r) is not dict or "backup" not in r:
        raise CodecError(f"node {nid} answered admin.backup_begin with {printable(repr(r)):.80}")
    bid = r["backup"]
    try:
        # The header a restore will check, checked now: a node's reply of the wrong shape fails the
        # backup here (before a byte is written), not the restore later.
        header = BackupHeader.from_wire({
            "version": BACKUP_VERSION, "cluster_name": r.get("cluster_name"), "node_id": r.get("node_id"),
            "created": time.time(), "pyraft_version": __version__, "snapshot_meta": r.get("snapshot_meta"),
            "snapshot_format": r.get("snapshot_format"), "snapshot_size": r.get("size"),
            "fence_index": r.get("fence_index")})
        if header.node_id != nid or header.cluster_name != admin.cluster_name:
            raise BackupError(f"node {nid} of cluster {admin.cluster_name!r} began a backup of node "
                              f"{header.node_id} of cluster {printable(repr(header.cluster_name))}")
        with BackupWriter(path, header) as w:
            while w.written < header.snapshot_size:
                c = admin.call(addr, "admin.backup_chunk", {"backup": bid, "offset": w.written},
                               timeout=admin.timeout, node_id=nid, contacted=addr)
                data = c.get("data") if isinstance(c, dict) else None
                if type(data) is not bytes or not data:
                    raise RaftError(f"node {nid} sent no data at offset {w.written} of {header.snapshot_size}")
                w.write(data)
            check_output_file(path, force=force)  # again: FILE may have changed meanwhile (aborts on error)
            w.commit()
    finally:
        try:
            admin.call(addr, "admin.backup_end", {"backup": bid}, timeout=admin.connect_timeout, node_id=nid,
                       contacted=addr)
        except (Unreachable, RaftError, TransportError):
            pass  # the node closes it when idle
    out = header.summary()
    out["file"] = os.path.abspath(path)
    out["file_size"] = os.path.getsize(path)
    return out


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="pyraft-admin",
               description="Look at and change a live pyraft cluster.  Global options may come before or "
                           "after the command.")
    add_version(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    subs: list[argparse.ArgumentParser] = []

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        subs.append(s)
        return s

    s = cmd("status", "every member's role, term, log, commit, apply, lag and reachability")
    s = cmd("health", "exit 0 when the node is up, knows a leader and is within --max-lag of its commit "
                      "(1 not healthy, 2 unreachable)")
    s.add_argument("--max-lag", type=int, default=DEFAULT_MAX_LAG, metavar="N",
                   help=f"entries the node may trail the leader's commit index by (default {DEFAULT_MAX_LAG})")
    s = cmd("add-learner", "add node ID at ADDR as a learner")
    s.add_argument("id", type=int, metavar="ID")
    s.add_argument("addr", metavar="ADDR")
    s.add_argument("--no-wait", action="store_true", help="return once the entry commits, before it caught up")
    s = cmd("change-membership", "make exactly ID,ID,... the voters")
    s.add_argument("voters", metavar="ID,ID,...")
    s.add_argument("--retain", action="store_true", help="keep removed voters as learners")
    s = cmd("remove", "remove member ID from the cluster (a voter through a membership change, or a learner)")
    s.add_argument("id", type=int, metavar="ID")
    s = cmd("remove-learner", "remove learner ID from the cluster")
    s.add_argument("id", type=int, metavar="ID")
    s = cmd("transfer-leader", "hand the leadership to voter ID")
    s.add_argument("id", type=int, metavar="ID")
    s = cmd("snapshot", "build a snapshot on the contacted node")
    s = cmd("purge-log", "purge the contacted node's log up to INDEX (bounded by its snapshot)")
    s.add_argument("index", type=int, metavar="INDEX")
    s = cmd("backup", "write an online, consistent backup of the contacted node to FILE (atomically)")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--force", action="store_true", help="replace FILE if it exists")
    s.add_argument("--stale", action="store_true",
                   help="when no leader answers (lost quorum), back up what the node has applied anyway")
    s = cmd("keygen", "write a CURVE key pair NAME.key and NAME.key_secret into DIR")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--name", default="admin", help="file name stem (default: admin)")
    s.add_argument("--force", action="store_true", help="overwrite existing key files")

    g = add_global
    g(p, subs, "--node", metavar="ADDR", help="address of the node to talk to, e.g. tcp://127.0.0.1:7101")
    g(p, subs, "--cluster", metavar="ADDR,ADDR,...",
      help=f"without --node: the cluster's addresses (default ${CLUSTER_ENV}); the first that answers is "
           f"used, and health checks them all")
    g(p, subs, "--cluster-name", default="pyraft", metavar="NAME", help="the cluster's name (default: pyraft)")
    g(p, subs, "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
      help=f"how long an operation may take (default {DEFAULT_TIMEOUT:g} s)")
    g(p, subs, "--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="S",
      help=f"how long to wait for a node to answer at all (default {DEFAULT_CONNECT_TIMEOUT:g} s)")
    g(p, subs, "--json", action="store_true", default=False, help="print one JSON object (errors too)")
    g(p, subs, "--curve-secret", metavar="FILE", help="CURVE: this tool's .key_secret file")
    g(p, subs, "--curve-public", metavar="FILE", help="CURVE: this tool's .key file (checked against the secret)")
    g(p, subs, "--curve-server-key", metavar="KEY", help="CURVE: the --node's public key (a .key file or Z85)")
    g(p, subs, "--curve-keys-dir", metavar="DIR",
      help="CURVE: the cluster's key directory (peers/N.key, or N.key), to reach the other members")
    return p


#: health's default --max-lag: a follower under a steady write load trails by a few batches.
DEFAULT_MAX_LAG = 1000


def _parse_voters(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"voters must be comma-separated node ids, got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise UsageError(f"voters must be a non-empty list of node ids, got {text!r}")
    return ids


def _check_timeouts(args: argparse.Namespace) -> None:
    """--timeout and --connect-timeout: finite seconds, > 0 and at most :data:`MAX_TIMEOUT`."""
    for flag, v in (("--timeout", args.timeout), ("--connect-timeout", args.connect_timeout)):
        if not (math.isfinite(v) and 0 < v <= MAX_TIMEOUT):
            raise UsageError(f"{flag} must be a number of seconds > 0 and at most {MAX_TIMEOUT:g}, got {v:g}")


def _check_keygen(directory: str, name: str) -> None:
    if not _KEY_NAME.fullmatch(name):
        raise UsageError(f"--name must be 1-64 letters, digits and '_.-', not starting with '.', got {name!r}")
    if not directory:
        raise UsageError("DIR must not be empty")
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise UsageError(f"{directory} is not a directory")


def _emit(args: argparse.Namespace, result: dict, text: str) -> None:
    if args.json:
        print(json_line(result))
    else:
        print(printable(text))


def _targets(args: argparse.Namespace) -> list[tuple[int | None, str]]:
    if args.node:
        return [(None, args.node)]
    cluster = cluster_from(args.cluster)
    if not cluster:
        raise UsageError(f"give --node ADDR (or --cluster ADDR,... or ${CLUSTER_ENV})")
    return _split_addresses(cluster)


def _first_answering(admin: Admin, targets: list[tuple[int | None, str]]) -> str:
    if len(targets) == 1:
        return targets[0][1]
    errors = []
    for nid, a in targets:
        try:
            admin.metrics(a, nid)
            return a
        except (Unreachable, RaftError) as e:
            errors.append(f"{a}: {e}")
    raise Unreachable("no node answered: " + "; ".join(errors))


def _run(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        _check_keygen(args.dir, args.name)
        try:
            pub, sec = generate_keys(args.dir, args.name, overwrite=args.force)
        except TransportError as e:  # the files exist (without --force), or cannot be written
            return emit_error("pyraft-admin", args.json, EXIT_FAILED, e)
        _emit(args, {"public_key_file": pub, "secret_key_file": sec}, f"public key: {pub}\nsecret key: {sec}")
        return EXIT_OK
    _check_timeouts(args)
    targets = _targets(args)
    curve = None
    if args.curve_secret:
        curve = CurveConfig(secret_key_file=args.curve_secret, public_key_file=args.curve_public,
                            allowed_keys_dir=args.curve_keys_dir)
        curve.keypair()  # fail now on an unreadable key file
        if not args.curve_server_key and not (args.curve_keys_dir and all(n is not None for n, _ in targets)):
            raise UsageError("--curve-secret needs --curve-server-key (the --node's public key), or "
                             "--cluster N=ADDR,... with --curve-keys-dir")
    elif args.curve_public or args.curve_server_key or args.curve_keys_dir:
        raise UsageError("the CURVE options need --curve-secret")
    admin = Admin(args.cluster_name, curve=curve, server_key=args.curve_server_key,
                  connect_timeout=args.connect_timeout, timeout=args.timeout)
    admin.known_ids = {a: n for n, a in targets if n is not None}
    cmd = args.command

    if cmd == "health":
        if args.max_lag < 0:
            raise UsageError("--max-lag must be >= 0")
        reports = [health(admin, a, args.max_lag) for _n, a in targets]
        for c, r in reports:
            r["exit_code"] = c
        code = max(c for c, _r in reports)
        if args.json:
            out = reports[0][1] if len(reports) == 1 else {"healthy": code == EXIT_OK,
                                                           "members": [r for _c, r in reports]}
            print(json_line(out))
        else:
            for c, r in reports:
                print(printable(f"{r['address']}: {r['reason']}"), file=sys.stdout if c == EXIT_OK else sys.stderr)
        return code

    node = _first_answering(admin, targets)
    if cmd == "status":
        st = gather_status(admin, node)
        if args.json:
            print(json_line(st))
        else:
            print_status(st)
        return EXIT_OK

    if cmd == "add-learner":
        _, r = call_leader(admin, node, "admin.add_learner",
                           {"id": args.id, "addr": args.addr, "blocking": not args.no_wait})
        state = "caught up" if not args.no_wait else "entry committed"
        _emit(args, r, f"node {args.id} ({args.addr}) is a learner (log entry {_lid(r['log_id'])}, {state}); "
                       f"{_fmt_membership(r['membership'])}")
        return EXIT_OK
    if cmd == "change-membership":
        voters = _parse_voters(args.voters)
        _, r = call_leader(admin, node, "admin.change_membership", {"voters": voters, "retain": args.retain})
        _emit(args, r, f"membership committed: {_fmt_membership(r['membership'])}")
        return EXIT_OK
    if cmd in ("remove", "remove-learner"):
        op = "admin.remove" if cmd == "remove" else "admin.remove_learner"
        _, r = call_leader(admin, node, op, {"id": args.id})
        _emit(args, r, f"node {args.id} removed; {_fmt_membership(r['membership'])}")
        return EXIT_OK
    if cmd == "transfer-leader":
        _, r = call_leader(admin, node, "admin.transfer_leader", {"id": args.id})
        _emit(args, r, f"node {r['leader']} leads in term {r['term']}")
        return EXIT_OK
    if cmd == "snapshot":
        m = admin.metrics(node, contacted=node)
        r = admin.call(node, "admin.snapshot", {"timeout": args.timeout},
                       timeout=args.timeout + _REPLY_MARGIN, node_id=m["id"], contacted=node)
        r["id"] = m["id"]
        _emit(args, r, f"node {m['id']}: snapshot at {_lid(r['snapshot'])} (applied {_lid(r['last_applied'])})")
        return EXIT_OK
    if cmd == "backup":
        r = backup(admin, node, args.file, stale=args.stale, force=args.force)
        _emit(args, r, f"node {r['node_id']}: backup written to {r['file']} ({r['file_size']} bytes): snapshot "
                       f"at {_lid(r['last_log_id'])} covering every write acknowledged up to index "
                       f"{r['fence_index']}; voters {r['voters']}, cluster {r['cluster_name']!r}")
        return EXIT_OK
    if cmd == "purge-log":
        if args.index < 0:
            raise UsageError("INDEX must be >= 0")
        m = admin.metrics(node, contacted=node)
        r = admin.call(node, "admin.purge_log", {"index": args.index, "timeout": args.timeout},
                       timeout=args.timeout + _REPLY_MARGIN, node_id=m["id"], contacted=node)
        r["id"] = m["id"]
        purged = _index(r["purged"]) or 0
        if r["purged_now"] is None and purged < args.index:
            msg = (f"node {m['id']}: nothing purged: the log is purged up to {_lid(r['purged'])}, and a "
                   f"purge cannot pass the snapshot ({_lid(r['snapshot'])}) or entries still being "
                   f"replicated; build a snapshot first")
            if args.json:
                print(json_line({**r, "error": "NothingPurged", "message": msg, "exit_code": EXIT_FAILED}))
            else:
                print(msg)
            return EXIT_FAILED
        note = "" if purged >= args.index else f" (not to {args.index}: limited by the snapshot at " \
                                                f"{_lid(r['snapshot'])} and replication)"
        _emit(args, r, f"node {m['id']}: log purged up to {_lid(r['purged'])}{note}")
        return EXIT_OK
    raise UsageError(f"unknown command {cmd!r}")


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    j = args.json
    try:
        return _run(args)
    except Unreachable as e:
        return emit_error("pyraft-admin", j, EXIT_USAGE, e, prefix="unreachable: ")
    except TransportError as e:
        return emit_error("pyraft-admin", j, EXIT_USAGE, e)
    except BackupError as e:
        return emit_error("pyraft-admin", j, EXIT_FAILED, e, prefix="backup failed: ")
    except ForwardToLeader as e:
        return emit_error("pyraft-admin", j, EXIT_FAILED, e, prefix="failed: no leader: ")
    except RaftError as e:
        return emit_error("pyraft-admin", j, EXIT_FAILED, e, prefix=f"failed: {type(e).__name__}: ")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # An operation's reply of the wrong shape (a node running other code, or one that lies):
        # metrics and backups are checked field by field; the rest ends here, in one line.
        return emit_error("pyraft-admin", j, EXIT_FAILED, f"a node's reply this tool cannot read "
                          f"({type(e).__name__}: {e})", kind="CodecError", prefix="failed: ")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("pyraft-admin", argv, _main)


if __name__ == "__main__":
    sys.exit(main())
