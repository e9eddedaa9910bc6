"""``pyraft-kv``: the replicated key-value service (ZeroMQ + LMDB) and its command-line client.

::

    pyraft-kv serve --id N --listen tcp://HOST:PORT --peers 1=tcp://...,2=tcp://...,3=tcp://...
                    --data-dir DIR [--init | --force-new-cluster] [--config FILE] [--log-level LEVEL]
                    [--metrics-listen HOST:PORT]
                    [--curve-secret FILE [--curve-public FILE] --curve-allow DIR | --insecure]
    pyraft-kv put    --cluster ADDR,ADDR,... KEY VALUE [--type T] [--lease ID]
    pyraft-kv get    --cluster ADDR,ADDR,... KEY [--prefix | --end KEY2] [--limit N]
                     [--keys-only | --count-only] [--stale]
    pyraft-kv delete --cluster ADDR,ADDR,... KEY
    pyraft-kv cas    --cluster ADDR,ADDR,... KEY VALUE [EXPECTED] [--type T]
    pyraft-kv watch  --cluster ADDR,ADDR,... KEY [--prefix | --end KEY2] [--rev N] [--count N]
    pyraft-kv lease  --cluster ADDR,ADDR,... grant TTL | keepalive ID [--once] | revoke ID
    pyraft-kv txn    --cluster ADDR,ADDR,... [JSON | -]
    pyraft-kv restore FILE --data-dir DIR --id N --peers 1=tcp://...,2=tcp://... [--cluster-name NAME]
    pyraft-kv demo   [--keys N] [--threads N] [--dir DIR]

Global options (``--json``, ``--cluster``, ``--cluster-name``, ``--timeout``
and the CURVE ones) go before or after the command.  ``--json`` prints one
JSON object per command, errors included.

``serve`` runs one node until SIGTERM or SIGINT (then it stops cleanly and
exits 0).  ``--peers`` lists every initial member; ``--init`` is given on one
node's first start only, and a restart is the same command without it.
``--config`` is a JSON object of :class:`pyraft.Config` fields.
``--force-new-cluster`` restarts the survivor of a lost quorum as a
one-member cluster keeping its data (:func:`pyraft.recovery.force_new_cluster`;
docs/operations.md); give it once, then remove it.  ``--metrics-listen``
serves the node's metrics in the Prometheus text format at
``http://HOST:PORT/metrics`` (:mod:`pyraft.prometheus`).
``--fault-control FILE`` is for fault-injection tests only (off by default):
the node then drops peers' traffic and slows its log writes as the local
JSON file FILE says (:mod:`pyraft.tools.faults`).  Start-up
problems (a busy port, a data directory locked by another process or
belonging to another node or cluster, bad arguments or key files) print one
line and exit 2; a node that stops on a fatal error exits 1.  Without CURVE
``serve`` listens only on loopback addresses (127.0.0.0/8, ``::1``,
``localhost``) unless ``--insecure`` says the network is trusted: anyone who
reaches a node without CURVE can read, write and reconfigure the cluster
(see docs/security.md).

The client commands take values as strings, or as ``--type`` says (``int``,
``float``, ``json``, ``bytes-hex``); ``get`` prints the value (JSON for
anything but a string, hex for bytes).  ``cas`` sets KEY to VALUE if its
current value is EXPECTED, or, without EXPECTED, if KEY is absent.  Exit
codes (:data:`pyraft.tools.cli.EXIT_CODES`): 0 done; 1 the operation failed
(``get``: no such key; ``cas``: the value differed; a refused command; no
answer within ``--timeout``, when the outcome of a write is unknown); 2
usage error or unreadable key files.  ``--cluster`` defaults to
``$PYRAFT_CLUSTER`` (or the older ``$PYRAFT_KV_CLUSTER``).

The coordination commands mirror ``KVClient`` (and etcdctl): ``get`` with
``--prefix``, ``--end``, ``--limit``, ``--keys-only`` or ``--count-only``
reads a range (one ``KEY<TAB>VALUE`` line per key; exit 0 also when it is
empty); ``watch`` prints one line per event (``REVISION<TAB>put|delete<TAB>
KEY[<TAB>VALUE]``, or one JSON object per line) until Ctrl-C (exit 130) or
``--count`` events (exit 0); ``lease grant`` prints the new lease's id,
``lease keepalive`` its ttl (once, or after every keepalive until Ctrl-C);
``put --lease`` attaches the key to a lease; ``txn`` reads
``{"compare": [...], "success": [...], "failure": [...]}`` (the maps of
``KVClient.txn``) as JSON from its argument or stdin, prints ``succeeded``
or ``failed`` and a line per response, and exits 1 when the compares did
not hold (the failure ops did run).  docs/kv.md shows them all.

``restore`` prepares a new, empty data directory from a backup written by
``pyraft-admin backup``: run it for every member of the new cluster with the
same FILE and ``--peers``, then start each with ``serve`` (no ``--init``).
With CURVE, give the addresses as ``N=tcp://...``, ``--curve-secret`` (this
client's secret key file) and ``--curve-keys-dir`` (the allow list, where
``peers/N.key`` is node N's public key).

``demo`` starts a local three-node cluster as separate processes, writes,
kills the leader, shows the failover, checks that every acknowledged write is
still there, and stops everything.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence


from pyraft.raft import _MAX_NODE_ID as MAX_NODE_ID  # node ids: what the wire format carries
from pyraft.tools.cli import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Parser, UsageError, add_global,
                              add_version, cluster_from, emit_error, json_line, json_safe, node_store_of,
                              run_main)

log = logging.getLogger("pyraft.kv.serve")

#: The value types ``put`` and ``cas`` take (``--type``).
VALUE_TYPES = ("str", "int", "float", "json", "bytes-hex")


def parse_value(text: str, kind: str) -> Any:
    """A command-line VALUE as ``--type`` says; UsageError when it is not one."""
    try:
        if kind == "str":
            return text
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "json":
            return json.loads(text)
        if kind == "bytes-hex":
            return bytes.fromhex(text)
    except ValueError as e:
        raise UsageError(f"{text[:40]!r} is not a {kind} value: {e}") from None
    except RecursionError:
        raise UsageError(f"{text[:40]!r}...: nests arrays or objects too deep to read") from None
    raise UsageError(f"unknown --type {kind!r}")


def value_to_json(v: Any) -> tuple[Any, str]:
    """A stored value as ``(JSON-able value, its --type)``; bytes become hex."""
    if isinstance(v, bytes):
        return v.hex(), "bytes-hex"
    if isinstance(v, str):
        return v, "str"
    if isinstance(v, bool) or v is None or isinstance(v, (list, dict)):
        return v, "json"
    if isinstance(v, int):
        return v, "int"
    if isinstance(v, float):
        return v, "float"
    return repr(v), "str"


# ---------------------------------------------------------------------------
# Argument helpers

def _int_arg(minimum: int, note: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, else a usage error (with ``note`` after the rule)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}{note}, got {text!r}")
        return n
    return parse


_positive_int = _int_arg(1)
_lease_arg = _int_arg(0, " (a lease id, as lease grant prints it)")


def _node_id_arg(text: str) -> int:
    """An argparse ``type``: a node id, an integer in [0, 2**63 - 1]."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_NODE_ID:
        raise argparse.ArgumentTypeError(f"a node id is an integer in [0, 2**63 - 1], got {text!r}")
    return n


def _ttl_arg(text: str) -> float:
    try:
        ttl = float(text)
    except ValueError:
        ttl = 0.0
    if not 0 < ttl < float("inf"):
        raise argparse.ArgumentTypeError(f"a ttl is a positive number of seconds, got {text!r}")
    return ttl


def parse_peers(text: str) -> dict[int, str]:
    """``"1=tcp://a:1,2=tcp://b:2"`` -> ``{1: "tcp://a:1", 2: "tcp://b:2"}``."""
    peers: dict[int, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, addr = part.partition("=")
        try:
            node_id = int(k)
        except ValueError:
            node_id = -1
        if not sep or node_id < 0 or "://" not in addr:
            raise UsageError(f"--peers: expected ID=tcp://HOST:PORT, got {part!r}")
        if node_id > MAX_NODE_ID:
            raise UsageError(f"--peers: a node id is an integer in [0, 2**63 - 1], got {k.strip()!r}")
        if node_id in peers:
            raise UsageError(f"--peers: node {node_id} is listed twice")
        peers[node_id] = addr.strip()
    if not peers:
        raise UsageError("--peers: no members given")
    return peers


#: A node data directory's stores: a --data-dir holding them is a node's own (see check_data_dir).
_NODE_STORES = ("log.lmdb", "kv.lmdb")


def check_data_dir(data_dir: str) -> None:
    """UsageError for a data directory that is an LMDB environment or one of a node's stores.

    ``serve --data-dir n3/kv.lmdb`` (or ``n3/snapshots``) would otherwise make a second node
    inside node 3's data directory.  (A node's own data directory, which holds ``log.lmdb``, is
    what ``--data-dir`` names: that one is fine.)
    """
    root = os.path.abspath(data_dir)
    why = node_store_of(root)
    if why and not any(os.path.isdir(os.path.join(root, n)) for n in _NODE_STORES):
        raise UsageError(f"--data-dir {data_dir}: {why}; a node there would mix with that node's files: "
                         f"give a node's data directory itself, or a new one")


def raise_fd_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit.

    Every connection to a node holds a file descriptor: under the usual soft
    limit of 1,024, a few hundred idle connections leave the node without
    descriptors for its peers, its clients and its files (and libzmq retries
    failing accepts in a loop).  The hard limit is what the administrator
    allows; Go programs raise to it at start-up the same way.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open files limit from %s to %s: %s", soft, target, e)


def _refuse_constant(name: str) -> Any:
    """``json.load``'s ``parse_constant``: NaN, Infinity and -Infinity are not JSON (RFC 8259)."""
    raise ValueError(f"{name} is not a JSON number")


def load_config(path: str | None, cluster_name: str | None = None) -> Any:
    from pyraft import Config
    d: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f, parse_constant=_refuse_constant)
        except OSError as e:
            raise UsageError(f"--config: cannot read {path}: {e.strerror}") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting past the stack
            raise UsageError(f"--config: {path} is not valid JSON: {e or type(e).__name__}") from None
        if not isinstance(d, dict):
            raise UsageError(f"--config: {path} must hold a JSON object of Config fields")
    if cluster_name:
        d["cluster_name"] = cluster_name
    try:
        return Config.from_dict(d)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--config: {e}") from None


# ---------------------------------------------------------------------------
# serve

def _serve(args: argparse.Namespace) -> int:
    from pyraft import Node, Raft, ServerState, tune_gc
    from pyraft.errors import InitializeError, RaftError, StorageError
    from pyraft.kv import KVStateMachine
    from pyraft.kv.server import serve_kv
    from pyraft.stores.lmdb import LmdbLogStore, node_dir_layout
    from pyraft.transports.zmq import CurveConfig, TransportError, ZmqTransport, is_loopback

    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)-7s node-{args.id} %(name)s: %(message)s")
    peers = parse_peers(args.peers)
    if args.id not in peers:
        raise UsageError(f"--id {args.id} is not one of the --peers ({', '.join(map(str, sorted(peers)))})")
    if args.init and args.force_new_cluster:
        raise UsageError("--init starts a new cluster on an empty node and --force-new-cluster rewrites an "
                         "existing node's membership: give one of them")
    metrics_at = None
    if args.metrics_listen:
        from pyraft.prometheus import parse_listen
        try:
            metrics_at = parse_listen(args.metrics_listen)
        except ValueError as e:
            raise UsageError(f"--metrics-listen: {e}") from None
    config = load_config(args.config, args.cluster_name)
    curve = None
    if args.curve_secret or args.curve_allow or args.curve_public:
        if not (args.curve_secret and args.curve_allow):
            raise UsageError("CURVE needs both --curve-secret and --curve-allow")
        curve = CurveConfig(secret_key_file=args.curve_secret, public_key_file=args.curve_public,
                            allowed_keys_dir=args.curve_allow)
        try:
            curve.keypair()
            curve.allowed_keys()
            for i in peers:
                curve.server_key_for(i)
        except TransportError as e:
            raise UsageError(str(e)) from None
    elif not is_loopback(args.listen) and not args.insecure:
        raise UsageError(f"--listen {args.listen} is reachable from other hosts, and without CURVE anyone who "
                         f"reaches it can read, write and reconfigure the cluster: give --curve-secret and "
                         f"--curve-allow, or --insecure if the network itself is trusted")
    check_data_dir(args.data_dir)
    raise_fd_limit()

    layout = node_dir_layout(args.data_dir)
    log_store = sm = transport = None
    stop = StopSignals()
    try:
        try:
            # The port first: a busy one is refused before the data directory is made.
            transport = ZmqTransport(args.id, args.listen, cluster_name=config.cluster_name, curve=curve)
            log_store = LmdbLogStore(layout.root, node_id=args.id, cluster_name=config.cluster_name)
            sm = KVStateMachine(layout.root)
        except (StorageError, TransportError) as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"data directory {layout.root}: {e}") from None
        if args.force_new_cluster:
            _force_new_cluster(log_store, sm, args.id, Node(peers[args.id]))
        if args.fault_control:  # test-only: see pyraft.tools.faults
            from pyraft.tools.faults import FaultControl
            FaultControl(args.fault_control, transport, log_store, args.id).start()
        try:
            raft = Raft(args.id, config, transport, log_store, sm)
        except RaftError as e:  # the stores hold something this node cannot start from
            raise UsageError(f"node {args.id} cannot start: {type(e).__name__}: {e}") from None
    except BaseException:
        for r in (transport, sm, log_store):
            if r is not None:
                r.close()
        raise
    code = EXIT_OK
    metrics_server = None
    try:
        if metrics_at is not None:
            metrics_server = _start_metrics(raft, sm, metrics_at, config.cluster_name)
        serve_kv(raft, sm)
        try:
            from pyraft.admin_ops import serve_admin
        except ImportError:  # the admin ops are optional
            pass
        else:
            serve_admin(raft)
        # What start-up built is frozen, and young collections run every 50,000
        # allocations instead of 700 (pyraft.gctune): a tenth of a busy node's CPU.
        tune_gc()
        if args.init:
            try:
                raft.initialize({i: Node(a) for i, a in peers.items()})
                log.info("initialized the cluster with members %s", peers)
            except InitializeError as e:
                log.warning("--init ignored: %s", e)
        log.info("node %s serving on %s (data in %s, cluster %r)", args.id, transport.endpoint, layout.root,
                 config.cluster_name)
        parent = args.parent_pid
        while not stop.wait(0.2):
            m = raft.metrics()
            if m.state == ServerState.FATAL:
                log.error("node %s stopped: %s", args.id, m.error)
                code = EXIT_FAILED
                break
            if parent and os.getppid() != parent:
                log.warning("parent process %s is gone: stopping", parent)
                break
        log.info("node %s shutting down", args.id)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        try:
            raft.shutdown(timeout=30)
        except RaftError as e:
            log.error("shutdown: %s", e)
            code = EXIT_FAILED
        sm.close()
        log_store.close()
    log.info("node %s stopped", args.id)
    return code


def _force_new_cluster(log_store: Any, sm: Any, node_id: int, node: Any) -> None:
    from pyraft.recovery import RecoveryError, force_new_cluster
    try:
        forced = force_new_cluster(log_store, sm, node_id, node)
    except RecoveryError as e:
        raise UsageError(f"--force-new-cluster: {e}") from None
    if forced is None:
        log.warning("--force-new-cluster: node %s already is a one-member cluster of itself; nothing changed "
                    "(remove the flag from its command line)", node_id)
        return
    log.warning("--force-new-cluster: node %s is now the only member of its cluster (membership entry %s, "
                "at %s); its %d entries past the commit point it knew (%s) are committed now. Remove "
                "--force-new-cluster from this node's command line, then grow the cluster again with "
                "pyraft-admin add-learner and change-membership (docs/operations.md)", node_id, forced.entry,
                node.addr, forced.newly_committed, forced.committed_before)


def _start_metrics(raft: Any, sm: Any, at: tuple[str, int], cluster_name: str) -> Any:
    from pyraft.prometheus import Gauge, MetricsServer

    def kv_gauges() -> list[Gauge]:
        return [Gauge("pyraft_kv_keys", "Keys in the KV store.", len(sm)),
                Gauge("pyraft_kv_used_bytes", "Bytes of the KV store's pages (what the quota measures).",
                      sm.used_bytes),
                Gauge("pyraft_kv_quota_bytes", "The KV store's size quota: past it, writes fail with NoSpace.",
                      sm.quota_bytes)]

    try:
        server = MetricsServer(raft.node_id, raft.metrics, at[0], at[1], cluster_name=cluster_name,
                               extra=kv_gauges)
    except OSError as e:
        raise UsageError(f"--metrics-listen: cannot listen on {at[0]}:{at[1]}: {e.strerror or e}") from None
    log.info("node %s: metrics at %s", raft.node_id, server.url)
    return server


# ---------------------------------------------------------------------------
# restore

def _restore(args: argparse.Namespace) -> int:
    from pyraft import Node
    from pyraft.backup import BackupError, copy_snapshot, read_backup_header
    from pyraft.errors import CodecError, StorageError
    from pyraft.kv import KVStateMachine
    from pyraft.kv.statemachine import SNAPSHOT_MAGIC
    from pyraft.recovery import RecoveryError, restore_snapshot
    from pyraft.stores.lmdb import LmdbLogStore, sync_dir

    peers = parse_peers(args.peers)
    if args.id not in peers:
        raise UsageError(f"--id {args.id} is not one of the --peers ({', '.join(map(str, sorted(peers)))})")
    dest = os.path.abspath(args.data_dir)
    check_data_dir(args.data_dir)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise UsageError(f"--data-dir {dest} is not empty: restore only into a new (or empty) directory")
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise UsageError(f"the parent directory {parent} does not exist")
    try:
        f = open(args.file, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {args.file}: {e.strerror or e}") from None
    with f:
        try:
            header, offset = read_backup_header(f)
        except BackupError as e:
            return emit_error("pyraft-kv restore", args.json, EXIT_FAILED, e, prefix=f"{args.file}: ")
        if header.snapshot_format != SNAPSHOT_MAGIC.decode():
            return emit_error("pyraft-kv restore", args.json, EXIT_FAILED,
                              BackupError(f"{args.file} holds a {header.snapshot_format!r} snapshot, not a KV "
                                          f"store's: restore it with the program that wrote it"))
        cluster_name = args.cluster_name or header.cluster_name
        # Built beside DIR and renamed onto it at the end: DIR is the restored node or absent/empty,
        # never half a restore that serve would start from.
        tmp = os.path.join(parent, f".{os.path.basename(dest)}.restoring-{os.getpid()}")
        os.mkdir(tmp, 0o700)  # a data directory: private, as the stores make them
        try:
            log_store = LmdbLogStore(tmp, node_id=args.id, cluster_name=cluster_name)
            try:
                sm = KVStateMachine(tmp)
                try:
                    meta = restore_snapshot(log_store, sm, header.meta, copy_snapshot(f, header, offset),
                                            {i: Node(a) for i, a in peers.items()})
                    keys = len(sm)
                finally:
                    sm.close()
            finally:
                log_store.close()
            os.rename(tmp, dest)
            sync_dir(parent, "pyraft-kv restore")
        except (BackupError, CodecError, RecoveryError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            return emit_error("pyraft-kv restore", args.json, EXIT_FAILED, e, prefix=f"{args.file}: ")
        except (StorageError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UsageError(f"{dest}: {e}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    lid = meta.last_log_id
    result = {"data_dir": dest, "id": args.id, "cluster_name": cluster_name, "keys": keys,
              "last_log_id": None if lid is None else [lid.term, lid.index],
              "members": {str(i): a for i, a in sorted(peers.items())},
              "backup_node_id": header.node_id, "backup_created": header.created}
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        # Nodes, clients and tools of the new cluster all need its name unless it is the default.
        from pyraft import Config
        named = "" if cluster_name == Config().cluster_name else f" --cluster-name {shlex.quote(cluster_name)}"
        print(f"restored {keys} keys into {dest} as node {args.id} of cluster {cluster_name!r} (snapshot at "
              f"{lid}; members {', '.join(f'{i}={a}' for i, a in sorted(peers.items()))}); start it with "
              f"pyraft-kv serve --id {args.id} --data-dir {args.data_dir}{named} ... (without --init)")
    return EXIT_OK


# ---------------------------------------------------------------------------
# client commands

def _client(args: argparse.Namespace) -> Any:
    from pyraft.kv import KVClient
    from pyraft.transports.zmq import CurveConfig, TransportError
    cluster = cluster_from(args.cluster, "PYRAFT_KV_CLUSTER")
    if not cluster:
        raise UsageError("--cluster ADDR,ADDR,... is required (or set PYRAFT_CLUSTER)")
    curve = None
    if args.curve_secret:
        if not args.curve_keys_dir:
            raise UsageError("--curve-secret needs --curve-keys-dir (the allow list, with peers/N.key for every node)")
        curve = CurveConfig(secret_key_file=args.curve_secret, public_key_file=args.curve_public,
                            allowed_keys_dir=args.curve_keys_dir)
    elif args.curve_keys_dir or args.curve_public:
        raise UsageError("CURVE options need --curve-secret")
    if not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    try:
        return KVClient(cluster, timeout=args.timeout, cluster_name=args.cluster_name, curve=curve)
    except (ValueError, TransportError) as e:
        raise UsageError(str(e)) from None


def _json_default(o: Any) -> Any:
    return o.hex() if isinstance(o, bytes) else repr(o)


def text_value(v: Any) -> str:
    """A value as ``get`` prints it: a str as it is, bytes in hex, anything else as JSON."""
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return v.hex()
    try:
        return json.dumps(v, default=_json_default)
    except (TypeError, ValueError):  # map keys JSON has no form for (bytes, tuples), or mixed to sort
        return json.dumps(json_safe(v))


def text_field(v: Any) -> str:
    """A key or value as one field of a tab-separated line: :func:`text_value`, but a str holding a tab
    or a line break is JSON-quoted, so that a line stays one key or one event."""
    if isinstance(v, str) and ("\t" in v or "\n" in v or "\r" in v):
        return json.dumps(v)
    return text_value(v)


def kv_to_json(kv: Any, keys_only: bool = False) -> dict:
    """A :class:`~pyraft.kv.reads.KeyValue` as ``--json`` prints it (``value`` and its ``type`` as ``get``'s)."""
    d = {"key": kv.key, "create_revision": kv.create_revision, "mod_revision": kv.mod_revision,
         "version": kv.version, "lease": kv.lease}
    if not keys_only:
        d["value"], d["type"] = value_to_json(kv.value)
    return d


def parse_txn(text: str) -> tuple[list, list, list]:
    """``txn``'s JSON, ``{"compare": [...], "success": [...], "failure": [...]}`` (each optional), as lists of maps.

    Only the shape is checked here; what the maps say is the state machine's
    to judge (KVClient.txn: a malformed one is refused, nothing changes).
    """
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"the txn is not valid JSON: {e}") from None
    except RecursionError:
        raise UsageError("the txn nests arrays or objects too deep to read") from None
    if not isinstance(d, dict):
        raise UsageError('a txn is a JSON object: {"compare": [...], "success": [...], "failure": [...]}')
    unknown = sorted(set(d) - {"compare", "success", "failure"})
    if unknown:
        raise UsageError(f"the txn has {unknown[0]!r}: only 'compare', 'success' and 'failure' are known")
    parts = []
    for name in ("compare", "success", "failure"):
        items = d.get(name, [])
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise UsageError(f"the txn's {name!r} must be a list of JSON objects")
        parts.append(items)
    return parts[0], parts[1], parts[2]


class _Output:
    """What a client command prints: results and errors, as text or ``--json``, and streams of lines."""

    def __init__(self, prog: str, as_json: bool) -> None:
        self.prog = prog
        self.json = as_json

    def done(self, result: dict, text: str | None = None, note: str | None = None, code: int = EXIT_OK) -> int:
        """Print one result (``text``, if any, without ``--json``; ``note`` on stderr) and return ``code``."""
        if self.json:
            print(json_line(result))
        else:
            if text is not None:
                print(text)
            if note is not None:
                self.note(note)
        return code

    def line(self, result: dict, text: str) -> None:
        """One line of a stream (an event, a keepalive), flushed at once for a reader on a pipe."""
        print(json_line(result) if self.json else text, flush=True)

    def note(self, text: str) -> None:
        print(f"{self.prog}: {text}", file=sys.stderr, flush=True)

    def fail(self, kind: str, message: str) -> int:
        return emit_error(self.prog, self.json, EXIT_FAILED, message, kind=kind)


def _check_client_args(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Usage errors of a client command, found before any connection: ``(value, expected, txn)``."""
    value = expected = txn = None
    if args.cmd in ("put", "cas"):
        value = parse_value(args.value, args.type)
        if args.cmd == "cas" and args.expected is not None:
            expected = parse_value(args.expected, args.type)
    if args.cmd == "get" and args.limit is not None:
        if args.count_only:
            raise UsageError("--count-only counts every key of the range: --limit does not apply")
        if not (args.prefix or args.end is not None):
            raise UsageError("--limit needs a range: --prefix or --end KEY2")
    if args.cmd == "watch":
        _check_watch_args(args)
    if args.cmd == "compact":
        from pyraft.kv.watch import MAX_WATCH_REVISION
        if args.revision > MAX_WATCH_REVISION:
            raise UsageError(f"REVISION must be an integer in [1, {MAX_WATCH_REVISION}], got {args.revision}")
    if args.cmd == "txn":
        if args.json_text in (None, "-"):
            if sys.stdin.isatty():
                print("pyraft-kv txn: reading the txn as JSON from stdin (end with Ctrl-D)", file=sys.stderr)
            text = sys.stdin.read()
        else:
            text = args.json_text
        txn = parse_txn(text)
    return value, expected, txn


def _check_watch_args(args: argparse.Namespace) -> None:
    """``watch``: a --rev the wire format carries, and a range with keys in it (an empty one waits for ever)."""
    from pyraft.kv import KVCommandError
    from pyraft.kv.encoding import range_bounds
    from pyraft.kv.watch import MAX_WATCH_REVISION
    if args.rev is not None and args.rev > MAX_WATCH_REVISION:
        raise UsageError(f"--rev must be an integer in [1, {MAX_WATCH_REVISION}], got {args.rev}")
    if args.end is not None:
        try:
            start, stop = range_bounds(args.key, args.end)
        except KVCommandError:
            return  # a key the store cannot hold: the watch refuses it ("refused: ...", exit 1)
        if stop <= start:
            raise UsageError(f"--end {args.end!r} is not after KEY {args.key!r}: the range [KEY, KEY2) is "
                             f"empty, and a watch of it would wait for ever")


def _client_command(args: argparse.Namespace) -> int:
    from pyraft.errors import RaftError, Timeout
    from pyraft.kv import KVCommandError
    action = getattr(args, "lease_cmd", None)
    prog = f"pyraft-kv {args.cmd}" + (f" {action}" if action else "")
    out = _Output(prog, args.json)
    value, expected, txn = _check_client_args(args)
    kv = _client(args)
    try:
        if args.cmd == "put":
            kv.put(args.key, value, lease=args.lease)
            return out.done({"key": args.key, "put": True, **({"lease": args.lease} if args.lease is not None else {})})
        if args.cmd == "get":
            if args.prefix or args.end is not None or args.limit or args.keys_only or args.count_only:
                return _get_range(kv, args, out)
            v = kv.get(args.key, stale=args.stale)
            if v is None:
                return out.fail("NotFound", f"{args.key!r}: not found")
            jv, kind = value_to_json(v)
            return out.done({"key": args.key, "value": jv, "type": kind}, text_value(v))
        if args.cmd == "delete":
            existed = kv.delete(args.key)
            return out.done({"key": args.key, "deleted": bool(existed)},
                            note=None if existed else f"{args.key!r}: not found (nothing deleted)")
        if args.cmd == "cas":
            if kv.cas(args.key, expected, value):
                return out.done({"key": args.key, "swapped": True})
            want = "absent" if args.expected is None else f"{expected!r}"
            return out.fail("CasFailed", f"{args.key!r} not set: its value is not {want}")
        if args.cmd == "watch":
            return _watch(kv, args, out)
        if args.cmd == "lease":
            return _lease(kv, args, out)
        if args.cmd == "txn":
            compare, success, failure = txn
            return _txn(kv, compare, success, failure, out)
        if args.cmd == "compact":
            kv.compact(args.revision)
            return out.done({"compacted": args.revision})
        raise UsageError(f"unknown command {args.cmd}")
    except KVCommandError as e:
        return emit_error(prog, out.json, EXIT_FAILED, e, prefix="refused: ")
    except Timeout as e:
        return emit_error(prog, out.json, EXIT_FAILED, f"no answer from the cluster within {args.timeout} s: {e} "
                                                       f"(check the addresses, --cluster-name and the CURVE keys)",
                          kind="Timeout")
    except RaftError as e:
        return emit_error(prog, out.json, EXIT_FAILED, e, prefix=f"{type(e).__name__}: ")
    except _ReaderGone:
        # The reader of a stream went away (``watch ... | head -3``): a normal end.  Later
        # writes to stdout, the interpreter's last flush included, go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        kv.close()


class _ReaderGone(Exception):
    """stdout's reader closed the pipe."""


def _stream_line(out: _Output, result: dict, text: str) -> None:
    try:
        out.line(result, text)
    except BrokenPipeError:
        raise _ReaderGone() from None


def _get_range(kv: Any, args: argparse.Namespace, out: _Output) -> int:
    """``get`` of a range: a line per key (``KEY<TAB>VALUE``, or ``KEY``), or the count; exit 0 when empty too."""
    if args.count_only:
        n = kv.count(args.key, args.end, prefix=args.prefix, stale=args.stale)
        return out.done({"count": n}, str(n))
    r = kv.range(args.key, args.end, prefix=args.prefix, limit=args.limit, keys_only=args.keys_only,
                 stale=args.stale)
    result = {"revision": r.revision, "count": r.count, "more": r.more,
              "kvs": [kv_to_json(x, args.keys_only) for x in r]}
    lines = [text_field(x.key) if args.keys_only else f"{text_field(x.key)}\t{text_field(x.value)}" for x in r]
    note = f"{len(r)} of {r.count} keys shown" if r.more else None
    return out.done(result, "\n".join(lines) if lines else None, note)


def _event_to_json(ev: Any) -> dict:
    """A WatchEvent for ``--json``: ``event`` is put or delete (``type`` is the value's, as in ``get``)."""
    d = {"event": ev.type, "key": ev.key, "revision": ev.revision, "value": None}
    if ev.type == "put":
        d["value"], d["type"] = value_to_json(ev.value)
    return d


class _CtrlC:
    """Ctrl-C ends a stream where it stands instead of raising KeyboardInterrupt wherever the main thread is.

    A KeyboardInterrupt raised at an arbitrary point can leave a lock held
    (between a lock's acquire and the ``with`` that releases it) and the
    clean-up after it waiting on that lock for ever.  Inside ``with
    _CtrlC(stop) as c``, SIGINT only sets ``c.hit`` and calls ``stop`` (which
    must neither block nor take a lock the main thread may hold); the loop
    sees it and ends, and leaving the ``with`` raises KeyboardInterrupt there
    (run_main: exit 130).
    """

    def __init__(self, stop: Callable[[], None] = lambda: None) -> None:
        self.hit = False
        self._stop = stop
        self._old: Any = None

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        self.hit = True
        self._stop()

    def __enter__(self) -> "_CtrlC":
        self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._old)
        if self.hit and exc_type is None:
            raise KeyboardInterrupt


def _watch(kv: Any, args: argparse.Namespace, out: _Output) -> int:
    """Print events as they come, until ``--count`` of them (exit 0) or Ctrl-C (run_main: exit 130)."""
    try:
        w = kv.watch(args.key, prefix=args.prefix, end=args.end, start_revision=args.rev)
    except ValueError as e:  # an argument KVClient refuses before sending anything
        raise UsageError(str(e)) from None
    # Ctrl-C closes the watch (Watch.close: no blocking lock), and next() ends within about a second.
    with _CtrlC(w.close) as ctrl_c:
        return _watch_events(w, args, out, ctrl_c)


def _watch_events(w: Any, args: argparse.Namespace, out: _Output, ctrl_c: _CtrlC) -> int:
    from pyraft.errors import Timeout
    try:
        seen = 0
        while (args.count is None or seen < args.count) and not ctrl_c.hit:
            try:
                ev = next(w)
            except StopIteration:  # closed by Ctrl-C
                break
            except Timeout as e:
                # The watch goes on where it stood once a member answers again (as etcdctl's does).
                out.note(f"{e}; still trying")
                continue
            fields = [str(ev.revision), ev.type, text_field(ev.key)]
            if ev.type == "put":
                fields.append(text_field(ev.value))
            _stream_line(out, _event_to_json(ev), "\t".join(fields))
            seen += 1
        return EXIT_OK
    finally:
        w.close()


def _lease(kv: Any, args: argparse.Namespace, out: _Output) -> int:
    if args.lease_cmd == "grant":
        lease_id = kv.lease_grant(args.ttl)
        return out.done({"id": lease_id, "ttl": args.ttl}, str(lease_id))
    if args.lease_cmd == "revoke":
        existed = kv.lease_revoke(args.id)
        return out.done({"id": args.id, "revoked": existed},
                        note=None if existed else f"lease {args.id}: not found (nothing revoked)")
    if args.once:
        ttl = kv.lease_keepalive(args.id)
        return out.done({"id": args.id, "ttl": ttl}, f"{ttl:g}")
    # Until Ctrl-C: the library's helper keeps it alive (retrying failed keepalives while the
    # lease may still live); a line for each keepalive that got through.
    ka = kv.keep_alive(args.id)  # the first keepalive, now: LeaseNotFound at once
    try:
        with _CtrlC() as ctrl_c:
            expires = ka.expires
            _stream_line(out, {"id": args.id, "ttl": ka.ttl}, f"{ka.ttl:g}")
            while not ka.lost.wait(0.1):
                if ctrl_c.hit:
                    break  # leaving the with raises KeyboardInterrupt
                if ka.expires != expires:
                    expires = ka.expires
                    _stream_line(out, {"id": args.id, "ttl": ka.ttl}, f"{ka.ttl:g}")
        return out.fail("LeaseLost", f"lease {args.id} is lost: it expired or was revoked, or no keepalive got "
                                     f"through within its ttl of {ka.ttl:g} s")
    finally:
        ka.stop()  # not revoked: Ctrl-C leaves the lease to its ttl, as etcdctl keep-alive does


def _txn_response(op: dict, r: Any) -> tuple[dict, list[str]]:
    """One txn response for ``--json`` and as text lines (``OP<TAB>KEY...``)."""
    kind, key = op.get("op"), op.get("key")
    d: dict = {"op": kind, "key": key}
    head = [str(kind), text_field(key)]
    rows: list[str] = []
    if kind == "delete":
        d["deleted"] = bool(r)
        head.append("deleted" if r else "not found")
    elif kind == "get":
        d["kv"] = None if r is None else kv_to_json(r)
        head.append("(not found)" if r is None else text_field(r.value))
    elif kind == "range":
        keys_only = bool(op.get("keys_only"))
        d.update(more=r.more, kvs=[kv_to_json(x, keys_only) for x in r])
        head.append(f"{len(r)} key(s)" + (" (more left out)" if r.more else ""))
        rows = [f"\t{text_field(x.key)}" + ("" if keys_only else f"\t{text_field(x.value)}") for x in r]
    return d, ["\t".join(head), *rows]


def _txn(kv: Any, compare: list, success: list, failure: list, out: _Output) -> int:
    """Apply the txn; print ``succeeded`` or ``failed`` and the responses; exit 1 when the compares failed."""
    r = kv.txn(compare, success, failure)
    ran = success if r.succeeded else failure
    responses = [_txn_response(op, x) for op, x in zip(ran, r.responses)]
    lines = ["succeeded" if r.succeeded else "failed"] + [ln for _, rows in responses for ln in rows]
    return out.done({"succeeded": r.succeeded, "revision": r.revision, "responses": [d for d, _ in responses]},
                    "\n".join(lines), code=EXIT_OK if r.succeeded else EXIT_FAILED)


# ---------------------------------------------------------------------------
# Local clusters of node processes (the demo; the tests build on it)

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now on ``host`` (the OS picks it)."""
    return free_ports([host])[0]


def free_ports(hosts: Sequence[str]) -> list[int]:
    """A TCP port nothing listens on right now for each of ``hosts``, distinct on each host.

    Every socket stays bound until all are picked: ports picked one at a time
    and released may come back equal (it made two nodes of one test share
    an address, once in a few thousand clusters).
    """
    socks: list[socket.socket] = []
    try:
        for host in hosts:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NodeFailed(RuntimeError):
    """A node process exited or did not come up; the message ends with its log's tail."""


class StopSignals:
    """SIGTERM and SIGINT ask a process's main loop to stop: ``while not stop.wait(0.2): ...``.

    A signal handler runs in the main thread between two of its bytecodes,
    maybe while that thread holds a lock: a ``threading.Event``'s own lock, say,
    in the instant after its ``wait`` took it back.  A handler that takes a
    lock, as ``Event.set()`` does, then waits for its own thread forever (a
    ``pyraft-kv serve`` node once went on running after SIGTERM that way, until
    SIGKILL).  This handler takes none: it only records the signal.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        #: the signals received, in order (list.append takes no lock)
        self.received: list[int] = []
        for s in signals:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)

    def wait(self, timeout: float) -> bool:
        """Sleep ``timeout`` seconds unless a signal came already; whether one came."""
        if not self.received:
            time.sleep(timeout)
        return bool(self.received)


class LocalCluster:
    """Nodes ``1..n`` of ``pyraft-kv serve`` as child processes, on loopback addresses.

    Each node ``i`` gets ``base_dir/node<i>/`` (its data directory) and
    ``base_dir/node<i>.log`` (its stderr).  Children are started with
    ``--parent-pid``, so a node stops by itself if this process dies without
    stopping it.  ``close()`` stops every node (SIGTERM, then SIGKILL).
    """

    def __init__(self, base_dir: str | os.PathLike, n: int = 3, *, hosts: Sequence[str] | None = None,
                 config: dict | None = None, log_level: str = "INFO", curve: bool = False,
                 cluster_name: str | None = None) -> None:
        self.base_dir = os.fspath(base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        self.ids = list(range(1, n + 1))
        hosts = list(hosts) if hosts else ["127.0.0.1"] * n
        ports = free_ports(hosts[:n])
        self.addrs = {i: f"tcp://{hosts[i - 1]}:{ports[i - 1]}" for i in self.ids}
        self.config = dict(config or {})
        if cluster_name:
            self.config["cluster_name"] = cluster_name
        self.cluster_name = self.config.get("cluster_name", "pyraft")
        self.log_level = log_level
        self.procs: dict[int, subprocess.Popen] = {}
        self._logs: dict[int, Any] = {}
        self.config_file = None
        if self.config:
            self.config_file = os.path.join(self.base_dir, "config.json")
            with open(self.config_file, "w", encoding="utf-8") as f:
                json.dump(self.config, f)
        self.keys_dir: str | None = None  # with curve: the allow list, and each name's secret key
        self.private_dir: str | None = None
        if curve:
            self._make_keys()

    # -- CURVE keys: the allow list keys/ by role (peers/N.key, clients/, admins/),
    #    and each secret in private/NAME/NAME.key_secret

    def _make_keys(self) -> None:
        self.keys_dir = os.path.join(self.base_dir, "keys")
        self.private_dir = os.path.join(self.base_dir, "private")
        os.makedirs(self.keys_dir, exist_ok=True)
        for i in self.ids:
            self.make_keypair(str(i), role="peer")
        self.make_keypair("client", role="client")
        self.make_keypair("admin", role="admin")

    def make_keypair(self, name: str, allowed: bool = True, role: str = "client") -> str:
        """A new CURVE keypair; returns its secret file.

        With ``allowed``, its public key goes into the allow list with ``role``
        (``"peer"``: ``name`` must be the node id; ``"admin"``, ``"client"`` or
        ``"reader"``).
        """
        from pyraft.transports.zmq import ROLE_DIRS, generate_keys
        if self.private_dir is None or self.keys_dir is None:
            raise ValueError("this cluster was made without curve: it has no keys")
        d = os.path.join(self.private_dir, name)
        pub, sec = generate_keys(d, name)
        if allowed:
            sub = {r: s for s, r in ROLE_DIRS.items()}[role]
            os.makedirs(os.path.join(self.keys_dir, sub), exist_ok=True)
            shutil.copy(pub, os.path.join(self.keys_dir, sub, f"{name}.key"))
        return sec

    def secret_file(self, name: str) -> str:
        """The secret key file of ``name`` (a node id, ``"client"``, ``"admin"``, or a ``make_keypair`` name)."""
        if self.private_dir is None:
            raise ValueError("this cluster was made without curve: it has no keys")
        return os.path.join(self.private_dir, name, f"{name}.key_secret")

    def client_curve(self, secret_file: str | None = None) -> Any:
        """A CurveConfig for a client of this cluster: the client key by default, or ``secret_file``'s."""
        from pyraft.transports.zmq import CurveConfig
        if self.keys_dir is None:
            return None
        return CurveConfig(secret_key_file=secret_file or self.secret_file("client"), allowed_keys_dir=self.keys_dir)

    # -- processes

    def data_dir(self, i: int) -> str:
        return os.path.join(self.base_dir, f"node{i}")

    def log_path(self, i: int) -> str:
        return os.path.join(self.base_dir, f"node{i}.log")

    def add_node(self, i: int, host: str = "127.0.0.1") -> str:
        """Give a new node ``i`` an address and a data directory (start it with :meth:`start`); its address."""
        if i in self.addrs:
            raise ValueError(f"node {i} exists already")
        self.addrs[i] = f"tcp://{host}:{free_port(host)}"
        self.ids.append(i)
        if self.keys_dir:
            self.make_keypair(str(i), role="peer")
        return self.addrs[i]

    def argv(self, i: int, init: bool = False, extra: Sequence[str] = ()) -> list[str]:
        a = [sys.executable, "-m", "pyraft.tools.kv", "serve", "--id", str(i), "--listen", self.addrs[i],
             "--peers", ",".join(f"{j}={self.addrs[j]}" for j in self.ids), "--data-dir", self.data_dir(i),
             "--log-level", self.log_level, "--parent-pid", str(os.getpid())]
        if self.config_file:
            a += ["--config", self.config_file]
        if init:
            a.append("--init")
        if self.keys_dir:
            a += ["--curve-secret", self.secret_file(str(i)), "--curve-allow", self.keys_dir]
        return a + list(extra)

    def start(self, i: int, init: bool = False, wait: bool = True, timeout: float = 20.0,
              extra: Sequence[str] = ()) -> subprocess.Popen:
        """Start node ``i`` (its previous process must have exited); with ``wait``, until it answers.

        ``extra``: more ``serve`` arguments (``--force-new-cluster``, ``--metrics-listen ...``).
        """
        old = self.procs.get(i)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"node {i} is running (pid {old.pid})")
        logf = open(self.log_path(i), "ab")
        if i in self._logs:
            self._logs[i].close()
        self._logs[i] = logf
        p = subprocess.Popen(self.argv(i, init, extra), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[i] = p
        if wait:
            self.wait_ready(i, timeout)
        return p

    def start_all(self, timeout: float = 20.0) -> None:
        for i in self.ids:
            self.start(i, init=(i == self.ids[0]), wait=False)
        for i in self.ids:
            self.wait_ready(i, timeout)

    def running(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.poll() is None]

    def signal(self, i: int, sig: int) -> None:
        p = self.procs[i]
        if p.poll() is None:
            p.send_signal(sig)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` and reap it."""
        p = self.procs[i]
        if p.poll() is None:
            p.kill()
        p.wait(10)

    def stop(self, i: int, timeout: float = 15.0) -> int:
        """SIGTERM node ``i``, wait for it (SIGKILL after ``timeout``); its exit code."""
        p = self.procs[i]
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGCONT)  # a paused node cannot handle SIGTERM
            except ProcessLookupError:
                pass
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        return p.returncode

    def close(self) -> None:
        """Stop every node: SIGTERM all, then SIGKILL what is left after a grace period."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            try:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for f in self._logs.values():
            f.close()
        self._logs.clear()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def log_tail(self, i: int, lines: int = 20) -> str:
        try:
            with open(self.log_path(i), "rb") as f:
                data = f.read()[-16384:].decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(data.splitlines()[-lines:])

    # -- asking the nodes

    def status(self, i: int, timeout: float = 0.5) -> dict | None:
        """Node ``i``'s ``kv.status``, or None when it does not answer in time."""
        from pyraft.codec import ClientResponse
        from pyraft.errors import RaftError
        from pyraft.transports.zmq import ZmqClient
        curve = self.client_curve()
        key = curve.server_key_for(i) if curve is not None else None
        try:
            with ZmqClient(self.addrs[i], self.cluster_name, curve=curve, server_key=key) as c:
                from pyraft.codec import ClientRequest
                r = c.call(ClientRequest("kv.status"), timeout)
        except RaftError:
            return None
        return r.body if isinstance(r, ClientResponse) and r.ok else None

    def wait_ready(self, i: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            p = self.procs[i]
            if p.poll() is not None:
                raise NodeFailed(f"node {i} exited with code {p.returncode}:\n{self.log_tail(i)}")
            if self.status(i, 0.3) is not None:
                return
            if time.monotonic() > deadline:
                raise NodeFailed(f"node {i} did not answer within {timeout} s:\n{self.log_tail(i)}")
            time.sleep(0.05)

    def leader(self, among: Sequence[int] | None = None) -> int | None:
        """The node that leads, if exactly one of ``among`` (default: running nodes) says it does
        and every other one that answers follows it (or knows no leader yet)."""
        ids = list(among) if among is not None else self.running()
        st = {i: self.status(i, 0.3) for i in ids}
        leaders = [(i, s) for i, s in st.items() if s and s["is_leader"]]
        if len(leaders) != 1:
            return None
        lead, lead_status = leaders[0]
        term = lead_status["term"]
        if any(s and s["term"] > term for s in st.values()):
            return None
        return lead

    def wait_leader(self, timeout: float = 20.0, among: Sequence[int] | None = None,
                    not_id: int | None = None) -> int:
        deadline = time.monotonic() + timeout
        while True:
            lead = self.leader(among)
            if lead is not None and lead != not_id:
                return lead
            if time.monotonic() > deadline:
                raise NodeFailed(f"no leader among {among or self.running()} within {timeout} s")
            time.sleep(0.02)

    def client(self, timeout: float = 10.0, ids: Sequence[int] | None = None, **kw: Any) -> Any:
        from pyraft.kv import KVClient
        ids = list(ids) if ids is not None else self.ids
        kw.setdefault("curve", self.client_curve())
        return KVClient({i: self.addrs[i] for i in ids}, timeout=timeout, cluster_name=self.cluster_name, **kw)


# ---------------------------------------------------------------------------
# demo

class _Progress:
    """A one-line progress display (``\\r`` on a terminal, a line every quarter otherwise)."""

    def __init__(self, total: int, label: str, quiet: bool = False) -> None:
        self.total = total
        self.label = label
        self.quiet = quiet
        self.tty = sys.stdout.isatty()
        self._shown_q = -1
        self._last = 0.0
        self.t0 = time.monotonic()

    def show(self, done: int, extra: str = "") -> None:
        if self.quiet:
            return
        now = time.monotonic()
        rate = done / max(1e-6, now - self.t0)
        line = f"  {self.label}: {done:5d}/{self.total} ({rate:6.0f}/s){extra}"
        if self.tty:
            if now - self._last >= 0.1 or done == self.total:
                self._last = now
                sys.stdout.write("\r" + line.ljust(78))
                sys.stdout.flush()
        else:
            q = done * 4 // max(1, self.total)
            if q != self._shown_q or now - self._last >= 1.0:
                self._shown_q = q
                self._last = now
                print(line, flush=True)

    def end(self) -> None:
        if self.tty and not self.quiet:
            sys.stdout.write("\n")
            sys.stdout.flush()


class _Interrupted(Exception):
    pass


def _demo(args: argparse.Namespace) -> int:
    from pyraft.errors import RaftError

    if args.dir:
        try:
            os.makedirs(args.dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--dir {args.dir}: cannot make it a directory: {e.strerror or e}") from None
    base = args.dir or tempfile.mkdtemp(prefix="pyraft-kv-demo-")
    keep = bool(args.dir) or args.keep
    total, nthreads = args.keys, args.threads
    kill_at = total // 2
    quiet = args.json  # then one JSON object at the end, nothing else on stdout
    out = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))  # noqa: E731

    def on_signal(signum: int, _frame: Any) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = None
    kv = None
    stop_writers = threading.Event()
    threads: list[threading.Thread] = []
    try:
        t_start = time.monotonic()
        out(f"pyraft-kv demo: a three-node cluster of separate processes on 127.0.0.1 (data in {base})")
        cluster = LocalCluster(base, 3, config={"heartbeat_interval": 0.05, "election_timeout": [0.3, 0.6]},
                               log_level="INFO")
        for i in cluster.ids:
            cluster.start(i, init=(i == 1), wait=False)
        for i in cluster.ids:
            cluster.wait_ready(i)
            out(f"  node {i}: pid {cluster.procs[i].pid}, {cluster.addrs[i]}")
        lead = cluster.wait_leader(20)
        out(f"  leader elected: node {lead} ({time.monotonic() - t_start:.2f} s after start)")

        kv = cluster.client(timeout=10)
        acked: dict[str, str] = {}
        acked_lock = threading.Lock()
        errors: list[str] = []
        next_key = iter(range(total))
        key_lock = threading.Lock()
        done = [0]
        finished = [0, 0]  # writes acknowledged or failed; writes begun
        progress = _Progress(total, "writing", quiet)
        killed = threading.Event()

        def until_killed() -> None:
            while not (killed.is_set() or stop_writers.is_set()):
                killed.wait(0.05)

        def writer() -> None:
            while not stop_writers.is_set():
                with key_lock:
                    n = next(next_key, None)
                if n is None:
                    until_killed()  # the kill comes while writers run, however few the keys
                    return
                k, v = f"key-{n:05d}", f"value-{n}"
                with acked_lock:
                    finished[1] += 1
                try:
                    kv.put(k, v)
                except RaftError as e:
                    with acked_lock:
                        errors.append(f"{k}: {type(e).__name__}: {e}")
                        finished[0] += 1
                        if len(errors) >= 20:  # the cluster is not serving: give up
                            stop_writers.set()
                    continue
                with acked_lock:
                    acked[k] = v
                    done[0] += 1
                    finished[0] += 1

        t_write = time.monotonic()
        for _ in range(nthreads):
            t = threading.Thread(target=writer, name="demo-writer", daemon=True)
            t.start()
            threads.append(t)
        t_kill = t_elected = None
        new_lead = None
        old_lead = lead
        while any(t.is_alive() for t in threads):
            with acked_lock:
                n, f, busy = done[0], finished[0], finished[1] - finished[0]
            progress.show(n, "" if not killed.is_set() else "  (after failover)")
            if not killed.is_set() and f >= kill_at:
                progress.end()
                old_lead = cluster.leader() or lead
                out(f"  SIGKILL the leader, node {old_lead} (pid {cluster.procs[old_lead].pid}), "
                    f"with {n} writes acknowledged and {busy} in flight")
                t_kill = time.monotonic()
                cluster.kill(old_lead)
                killed.set()
                survivors = [i for i in cluster.ids if i != old_lead]
                new_lead = cluster.wait_leader(20, among=survivors)
                t_elected = time.monotonic()
                out(f"  new leader: node {new_lead}, elected {t_elected - t_kill:.2f} s after the kill")
                progress = _Progress(total, "writing", quiet)
                progress.t0 = t_write
            time.sleep(0.05)
        progress.show(done[0])
        progress.end()
        write_time = time.monotonic() - t_write
        for t in threads:
            t.join()
        n_acked = len(acked)
        out(f"  {n_acked} writes acknowledged in {write_time:.2f} s ({n_acked / write_time:.0f}/s); "
            f"{len(errors)} failed (timeouts: their outcome is unknown)")
        for line in errors[:5]:
            out(f"    {line}")

        # Restart the killed node: it catches up from the new leader.
        t_restart = time.monotonic()
        if t_kill is None:  # the writers gave up (20 errors) before half the writes were done
            out("  no SIGKILL: the writes failed before half of them were done (see above)")
        else:
            out(f"  restarting node {old_lead} (same command, without --init)")
            cluster.start(old_lead)

        # Every acknowledged write must be readable: linearizable gets through the new leader.
        t_verify = time.monotonic()
        missing: list[str] = []
        verify_q = sorted(acked)
        vprog = _Progress(len(verify_q), "verifying", quiet)
        checked = [0]
        vlock = threading.Lock()
        it = iter(verify_q)

        def verifier() -> None:
            while True:
                with vlock:
                    k = next(it, None)
                if k is None:
                    return
                try:
                    v = kv.get(k)
                except RaftError as e:
                    v = f"<{type(e).__name__}>"
                with vlock:
                    if v != acked[k]:
                        missing.append(k)
                    checked[0] += 1

        vthreads = [threading.Thread(target=verifier, name="demo-verifier", daemon=True) for _ in range(nthreads)]
        for t in vthreads:
            t.start()
        while any(t.is_alive() for t in vthreads):
            vprog.show(checked[0])
            time.sleep(0.05)
        for t in vthreads:
            t.join()
        vprog.show(checked[0])
        vprog.end()
        verify_time = time.monotonic() - t_verify

        # The restarted node has caught up: same applied index as the leader.
        lead_now = cluster.wait_leader(20)
        target = (cluster.status(lead_now) or {}).get("applied") or 0
        deadline = time.monotonic() + 20 if t_kill is not None else 0.0
        caught_up = False
        while time.monotonic() < deadline:
            st = cluster.status(old_lead)
            if st and (st.get("applied") or 0) >= target:
                caught_up = True
                break
            time.sleep(0.05)
        st = cluster.status(old_lead) or {}
        if caught_up:
            out(f"  node {old_lead} is back as a {st.get('state', '?').lower()} and caught up to index {target} "
                f"in {time.monotonic() - t_restart:.2f} s ({st.get('keys')} keys)")
        elif t_kill is not None:
            out(f"  node {old_lead} did not catch up to index {target} within 20 s")

        out("")
        out("summary")
        out(f"  writes acknowledged       {n_acked} of {total} in {write_time:.2f} s, {nthreads} client threads")
        if t_kill is not None and t_elected is not None:
            out(f"  failover                  node {old_lead} killed -> node {new_lead} leading in "
                f"{t_elected - t_kill:.2f} s")
        out(f"  linearizable reads        {len(verify_q)} in {verify_time:.2f} s")
        out(f"  acknowledged writes lost  {len(missing)}")
        out(f"  total time                {time.monotonic() - t_start:.2f} s")
        ok = not missing and caught_up and n_acked > 0
        out("PASS: every acknowledged write survived the leader's SIGKILL" if ok else
            f"FAIL: {len(missing)} acknowledged writes missing: {missing[:10]}" if missing else
            "FAIL: see above")
        if quiet:
            print(json.dumps({"passed": ok, "writes_acknowledged": n_acked, "writes_attempted": total,
                              "writes_failed": len(errors), "write_seconds": round(write_time, 3),
                              "killed_leader": old_lead, "new_leader": new_lead,
                              "failover_seconds": None if t_kill is None or t_elected is None
                              else round(t_elected - t_kill, 3),
                              "reads_verified": len(verify_q), "acknowledged_writes_lost": len(missing),
                              "restarted_node_caught_up": caught_up,
                              "total_seconds": round(time.monotonic() - t_start, 3)}, sort_keys=True), flush=True)
        return EXIT_OK if ok else EXIT_FAILED
    except _Interrupted as e:
        if not quiet:
            print(file=sys.stderr)
        return emit_error("pyraft-kv demo", quiet, EXIT_INTERRUPTED, f"interrupted ({e}); stopping the nodes",
                          kind="Interrupted")
    except NodeFailed as e:
        return emit_error("pyraft-kv demo", quiet, EXIT_FAILED, e)
    finally:
        # Ignore further Ctrl-C while cleaning up: nothing may be left running.
        for s in old_handlers:
            signal.signal(s, signal.SIG_IGN)
        stop_writers.set()
        if kv is not None:
            kv.close()
        if cluster is not None:
            cluster.close()
            left = cluster.running()
            if left:
                print(f"pyraft-kv demo: nodes {left} still running!", file=sys.stderr)
            elif not quiet:
                print("  all node processes stopped", flush=True)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
        for s, h in old_handlers.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------
# main

def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="pyraft-kv", description="The pyraft replicated key-value service.  Global options may come "
                                             "before or after the command.")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    subs: list[argparse.ArgumentParser] = []
    clients: list[argparse.ArgumentParser] = []

    def cmd(name: str, help: str, client: bool = False) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        subs.append(s)
        if client:
            clients.append(s)
        return s

    s = cmd("serve", "run one node of the KV service")
    s.add_argument("--id", type=_node_id_arg, required=True, help="this node's id (one of --peers)")
    s.add_argument("--listen", required=True, metavar="tcp://HOST:PORT", help="address to bind; clients use it")
    s.add_argument("--peers", required=True, metavar="1=tcp://...,2=...", help="every initial member")
    s.add_argument("--data-dir", required=True, metavar="DIR", help="the node's data directory (LMDB)")
    s.add_argument("--init", action="store_true", help="initialize the cluster (one node, first start only)")
    s.add_argument("--force-new-cluster", action="store_true",
                   help="lost quorum: restart this node as the only member of its cluster, keeping its data "
                        "(once; then remove the flag and grow the cluster again; see docs/operations.md)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (keep HOST on loopback or a "
                        "monitoring network: there is no authentication)")
    s.add_argument("--config", metavar="FILE", help="JSON object of Config fields")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info",
                                                           "warning", "error"])
    s.add_argument("--curve-allow", metavar="DIR",
                   help="the allow list of public keys by role: peers/N.key (node N), admins/, clients/, readers/")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --listen without CURVE: anyone who reaches the port can read, write "
                        "and reconfigure the cluster (use only on a network you trust entirely)")
    s.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--fault-control", metavar="FILE",
                   help="TEST ONLY, off by default: inject faults (dropped peers, a slow disk) as the local JSON "
                        "file FILE says; see pyraft.tools.faults.  Never use in production")

    def key_range(c: argparse.ArgumentParser, what: str) -> None:
        g = c.add_mutually_exclusive_group()
        g.add_argument("--prefix", action="store_true", help=f"{what} every key that starts with KEY")
        g.add_argument("--end", metavar="KEY2", help=f"{what} the keys from KEY up to KEY2 (excluded)")

    c = cmd("put", "set KEY to VALUE", client=True)
    c.add_argument("key", metavar="KEY")
    c.add_argument("value", metavar="VALUE")
    c.add_argument("--type", choices=VALUE_TYPES, default="str", help="how to read VALUE (default: str)")
    c.add_argument("--lease", type=_lease_arg, metavar="ID",
                   help="attach KEY to lease ID: it is deleted when the lease expires or is revoked")
    c = cmd("get", "print KEY's value, or the keys of a range (linearizable)", client=True)
    c.add_argument("key", metavar="KEY")
    key_range(c, "read")
    c.add_argument("--limit", type=_positive_int, metavar="N", help="at most N keys of the range")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--keys-only", action="store_true", help="the keys without their values")
    g.add_argument("--count-only", action="store_true", help="only how many keys there are")
    c.add_argument("--stale", action="store_true", help="read any node's copy (may be stale)")
    c = cmd("delete", "remove KEY", client=True)
    c.add_argument("key", metavar="KEY")
    c = cmd("cas", "set KEY to VALUE if its value is EXPECTED (or, without EXPECTED, absent)", client=True)
    c.add_argument("key", metavar="KEY")
    c.add_argument("value", metavar="VALUE")
    c.add_argument("expected", metavar="EXPECTED", nargs="?", default=None)
    c.add_argument("--type", choices=VALUE_TYPES, default="str",
                   help="how to read VALUE and EXPECTED (default: str)")

    c = cmd("watch", "print the changes of KEY (or a range) as they come, until Ctrl-C or --count events",
            client=True)
    c.add_argument("key", metavar="KEY")
    key_range(c, "watch")
    c.add_argument("--rev", type=_positive_int, metavar="N",
                   help="from revision N on (default: the changes after the command starts)")
    c.add_argument("--count", type=_positive_int, metavar="N", help="exit 0 after N events")
    c = cmd("lease", "grant, keep alive or revoke a lease (its keys are deleted with it)", client=True)
    lease = c.add_subparsers(dest="lease_cmd", metavar="ACTION", parser_class=Parser)
    lease.required = True
    la = lease.add_parser("grant", help="grant a lease of TTL seconds; prints its id",
                          description="grant a lease of TTL seconds; prints its id")
    la.add_argument("ttl", type=_ttl_arg, metavar="TTL", help="seconds (at least three election timeouts)")
    lk = lease.add_parser("keepalive", help="restart the lease's ttl; prints it (until Ctrl-C, or --once)",
                          description="restart the lease's ttl and print it: every third of the ttl until "
                                      "Ctrl-C (the lease then expires after its ttl), or --once")
    lk.add_argument("id", type=_lease_arg, metavar="ID")
    lk.add_argument("--once", action="store_true", help="one keepalive, then exit")
    lr = lease.add_parser("revoke", help="revoke the lease: its keys are deleted",
                          description="revoke the lease: its keys are deleted")
    lr.add_argument("id", type=_lease_arg, metavar="ID")
    subs += [la, lk, lr]
    clients += [la, lk, lr]
    c = cmd("txn", "if every compare holds apply the success ops, else the failure ops, atomically", client=True)
    c.add_argument("json_text", metavar="JSON", nargs="?",
                   help='{"compare": [...], "success": [...], "failure": [...]} (default, or -: read it from '
                        'stdin); compares {"key", "target": "value"|"version"|"create_revision"|"mod_revision"'
                        '|"lease", "op": "=="|"!="|"<"|">", "value"}; ops {"op": "put", "key", "value"[, "lease"]}, '
                        '{"op": "delete", "key"}, {"op": "get", "key"}, {"op": "range", "key"[, "end", "prefix", '
                        '"limit", "keys_only"]}')

    c = cmd("compact", "drop the watch history before REVISION on every member (watches from before it get "
                       "Compacted; the keys stay)", client=True)
    c.add_argument("revision", type=_positive_int, metavar="REVISION",
                   help="at most the current revision (get --prefix --json prints it)")

    r = cmd("restore", "prepare a new, empty data directory as a member of a new cluster holding a backup's data")
    r.add_argument("file", metavar="FILE", help="a backup written by pyraft-admin backup")
    r.add_argument("--data-dir", required=True, metavar="DIR", help="the new node's data directory (empty)")
    r.add_argument("--id", type=_node_id_arg, required=True, help="the new node's id (one of --peers)")
    r.add_argument("--peers", required=True, metavar="1=tcp://...,2=...",
                   help="every member of the new cluster (the same on every member)")

    d = cmd("demo", "local three-process cluster: write, kill the leader, verify")
    d.add_argument("--keys", type=int, default=3000, help="keys to write (default 3000)")
    d.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    d.add_argument("--dir", help="keep the nodes' data and logs here (default: a temporary directory)")
    d.add_argument("--keep", action="store_true", help="keep the temporary directory")

    add_global(p, subs, "--json", action="store_true", default=False,
               help="print one JSON object (errors too; watch and lease keepalive: one per line); serve: start-up "
                    "errors only")
    add_global(p, subs, "--cluster-name", default=None, metavar="NAME",
               help="the cluster's name (clients: default pyraft; serve: overrides the config's; restore: "
                    "default the backup's)")
    add_global(p, subs, "--curve-secret", metavar="FILE", help="CURVE: this process's .key_secret file")
    add_global(p, subs, "--curve-public", metavar="FILE",
               help="CURVE: this process's .key file (checked against the secret)")
    add_global(p, [*clients], "--cluster", metavar="ADDR,ADDR,...",
               help="client commands: the nodes' --listen addresses (N=ADDR with CURVE; default $PYRAFT_CLUSTER)")
    add_global(p, [*clients], "--timeout", type=float, default=5.0, metavar="S",
               help="client commands: seconds (default 5)")
    add_global(p, [*clients], "--curve-keys-dir", metavar="DIR",
               help="client commands, CURVE: directory with N.key for every node N")
    return p


#: The commands that talk to a cluster as a KVClient.
CLIENT_COMMANDS = ("put", "get", "delete", "cas", "watch", "lease", "txn", "compact")
#: Options given before the command that only the client commands use.
_CLIENT_ONLY = {"cluster": None, "timeout": 5.0, "curve_keys_dir": None}


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.cmd not in CLIENT_COMMANDS:
        given = [k for k, default in _CLIENT_ONLY.items() if getattr(args, k) != default]
        if given:
            raise UsageError(f"{args.cmd} takes no --{given[0].replace('_', '-')} (only the client commands do)")
    if args.cmd in ("restore", "demo") and (args.curve_secret or args.curve_public):
        raise UsageError(f"{args.cmd} takes no CURVE options")
    if args.cmd == "serve":
        return _serve(args)
    if args.cmd == "restore":
        return _restore(args)
    if args.cmd == "demo":
        if args.keys < 2 or args.threads < 1:
            raise UsageError("--keys must be at least 2 and --threads at least 1")
        return _demo(args)
    if args.cluster_name is None:
        args.cluster_name = "pyraft"
    return _client_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("pyraft-kv", argv, _main)


if __name__ == "__main__":
    sys.exit(main())
