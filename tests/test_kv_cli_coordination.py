"""``pyraft-kv`` get ranges, watch, lease, put --lease and txn on a cluster of ``pyraft-kv serve`` processes.

Most commands run in this process (``pyraft.tools.kv.main``, as the console
script calls it) against one cluster for the module; the two that run until
Ctrl-C (``watch`` and ``lease keepalive``) run as the console script and get
a real SIGINT.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from procs import PROC_CONFIG, LocalCluster, pid_alive, wait_for
from pyraft.tools import kv as pkv
from test_kv_cli import kv_cmd

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

#: The shortest lease these clusters grant: three of PROC_CONFIG's longest election timeouts.
MIN_TTL = 3 * PROC_CONFIG["election_timeout"][1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("kvcli"), 3, config=PROC_CONFIG)
    pids = []
    try:
        c.start_all()
        pids = [p.pid for p in c.procs.values()]
        c.wait_leader(20)
        yield c
    finally:
        c.close()
        left = [pid for pid in pids if pid_alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"node processes still running: {left}"


@pytest.fixture
def cli(cluster, monkeypatch):
    """``cli(*argv, stdin=None) -> (exit code, stdout, stderr)``: pyraft-kv in this process, on the cluster."""
    monkeypatch.setenv("PYRAFT_CLUSTER", ",".join(cluster.addrs.values()))

    def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = pkv.main(["--timeout", "10", *argv])
        return rc, out.getvalue(), err.getvalue()

    return run


def jlines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------------- get ranges

def _run_with_reader(argv: list[str], env: dict, read_first_line: bool) -> tuple[bytes, int, str]:
    """Run pyraft-kv with stdout on a pipe whose reader reads one line (or none) and closes it."""
    p = subprocess.Popen(kv_cmd() + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        first = p.stdout.readline() if read_first_line else b""
        p.stdout.close()
        err = p.stderr.read().decode()
        rc = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return first, rc, err


def test_a_range_whose_reader_closes_the_pipe_ends_with_exit_0(cluster):
    # `pyraft-kv get --prefix big/ | head -1`: before, a BrokenPipeError traceback and exit 1.
    with cluster.client(timeout=10) as kv:
        for t in range(8):
            kv.txn([], [{"op": "put", "key": f"big/{t:02}-{i:03}", "value": "v" * 500} for i in range(128)])
    env = dict(os.environ, PYRAFT_CLUSTER=",".join(cluster.addrs.values()))
    first, rc, err = _run_with_reader(["get", "big/", "--prefix"], env, True)  # 500 KB: more than a pipe holds
    assert first.startswith(b"big/00-000"), first[:80]
    assert rc == 0 and "Traceback" not in err, (rc, err)
    # A reader gone before anything was written, stdout buffered: the write fails in the last flush.
    env.pop("PYTHONUNBUFFERED", None)
    _, rc, err = _run_with_reader(["get", "big/", "--prefix", "--count-only"], env, False)
    assert rc == 0 and "BrokenPipeError" not in err, (rc, err)


def test_get_prefix_end_limit_keys_only_count_only(cli):
    for argv in (["r/a", "1"], ["r/b", "two words"], ["r/c", '{"x": [1, 2]}', "--type", "json"],
                 ["r/d", "tab\there"], ["r0", "outside"]):
        assert cli("put", *argv)[0] == 0
    rc, out, err = cli("get", "r/", "--prefix")
    assert (rc, err) == (0, "")
    # one key per line; a str with a tab or a line break is JSON-quoted so that it stays one line
    assert out == 'r/a\t1\nr/b\ttwo words\nr/c\t{"x": [1, 2]}\nr/d\t"tab\\there"\n'
    rc, out, err = cli("get", "r/", "--prefix", "--keys-only", "--limit", "2")
    assert (rc, out) == (0, "r/a\nr/b\n") and "2 of 4 keys" in err
    assert cli("get", "r/", "--prefix", "--count-only") == (0, "4\n", "")
    assert cli("get", "r/", "--prefix", "--count-only", "--stale", "--json")[:2] == (0, '{"count": 4}\n')
    assert cli("get", "r/b", "--end", "r/d", "--keys-only") == (0, "r/b\nr/c\n", "")
    assert cli("get", "nothing/", "--prefix") == (0, "", "")        # an empty range is an answer: exit 0

    rc, out, _ = cli("get", "r/", "--prefix", "--limit", "3", "--json")
    r = json.loads(out)
    assert rc == 0 and (r["count"], r["more"]) == (4, True) and r["revision"] >= r["kvs"][-1]["mod_revision"]
    a, b, c = r["kvs"]
    assert a == {"key": "r/a", "value": "1", "type": "str", "create_revision": a["mod_revision"],
                 "mod_revision": a["mod_revision"], "version": 1, "lease": 0}
    assert (c["value"], c["type"]) == ({"x": [1, 2]}, "json")
    assert a["mod_revision"] < b["mod_revision"] < c["mod_revision"]
    rc, out, _ = cli("get", "r/a", "--keys-only", "--json")          # one key, with its revisions
    assert rc == 0 and json.loads(out)["kvs"] == [{k: v for k, v in a.items() if k not in ("value", "type")}]

    # a plain get keeps its output and exit codes
    assert cli("get", "r/b") == (0, "two words\n", "")
    assert cli("get", "r/b", "--json")[1] == '{"key": "r/b", "type": "str", "value": "two words"}\n'
    rc, out, _ = cli("get", "r/zz", "--json")
    assert rc == 1 and json.loads(out)["error"] == "NotFound"

    for bad in (["--limit", "2"], ["--prefix", "--end", "r/z"], ["--prefix", "--limit", "0"],
                ["--prefix", "--keys-only", "--count-only"], ["--prefix", "--count-only", "--limit", "2"]):
        rc, out, _ = cli("get", "r/", *bad, "--json")
        assert rc == 2 and json.loads(out)["error"] == "UsageError", bad


# ---------------------------------------------------------------------------------- leases

def test_lease_grant_put_lease_keepalive_once_revoke(cli):
    rc, out, err = cli("lease", "grant", "30")
    assert rc == 0 and err == "" and out.strip().isdigit()
    lease = int(out)
    assert cli("put", "l/a", "1", "--lease", str(lease)) == (0, "", "")
    rc, out, _ = cli("--json", "put", "l/b", "2", "--lease", str(lease))
    assert (rc, json.loads(out)) == (0, {"key": "l/b", "put": True, "lease": lease})
    assert cli("put", "l/c", "3")[0] == 0                           # no lease: stays
    rc, out, _ = cli("get", "l/", "--prefix", "--json")
    assert [(kv["key"], kv["lease"]) for kv in json.loads(out)["kvs"]] == [("l/a", lease), ("l/b", lease),
                                                                          ("l/c", 0)]
    assert cli("lease", "keepalive", str(lease), "--once") == (0, "30\n", "")
    rc, out, _ = cli("lease", "keepalive", "--once", "--json", str(lease))
    assert (rc, json.loads(out)) == (0, {"id": lease, "ttl": 30.0})

    assert cli("lease", "revoke", str(lease)) == (0, "", "")
    assert cli("get", "l/", "--prefix", "--keys-only") == (0, "l/c\n", "")   # its keys are gone with it
    rc, out, err = cli("lease", "revoke", str(lease))                         # as delete: done, with a note
    assert (rc, out) == (0, "") and "not found" in err
    assert json.loads(cli("lease", "revoke", str(lease), "--json")[1]) == {"id": lease, "revoked": False}

    for argv in (["lease", "keepalive", str(lease), "--once"], ["put", "l/d", "4", "--lease", str(lease)]):
        rc, out, err = cli(*argv)
        assert rc == 1 and out == "" and "LeaseNotFound" in err, argv
        rc, out, err = cli(*argv, "--json")
        assert (rc, err) == (1, "") and json.loads(out) == {"error": "LeaseNotFound", "exit_code": 1,
                                                            "message": json.loads(out)["message"]}, argv
    rc, out, _ = cli("lease", "grant", str(MIN_TTL / 2), "--json")          # too short for this cluster
    assert rc == 1 and "too short" in json.loads(out)["message"]
    for bad in (["grant", "0"], ["grant", "soon"], ["revoke", "-1"], ["keepalive"], ["frob"]):
        rc, out, _ = cli("lease", *bad, "--json")
        assert rc == 2 and json.loads(out)["error"] == "UsageError", bad


# ---------------------------------------------------------------------------------- txn

CREATE_CFG = {"compare": [{"key": "t/cfg", "target": "version", "op": "==", "value": 0}],
              "success": [{"op": "put", "key": "t/cfg", "value": {"v": 1}}, {"op": "get", "key": "t/cfg"}],
              "failure": [{"op": "get", "key": "t/cfg"}, {"op": "delete", "key": "t/gone"},
                          {"op": "range", "key": "t/", "prefix": True, "keys_only": True}]}


def test_txn_success_then_failure_text_json_and_stdin(cli):
    rc, out, err = cli("txn", json.dumps(CREATE_CFG))
    assert (rc, out, err) == (0, 'succeeded\nput\tt/cfg\nget\tt/cfg\t{"v": 1}\n', "")
    # the compare no longer holds: the failure ops run, and the exit code says no (as cas's)
    rc, out, err = cli("txn", json.dumps(CREATE_CFG))
    assert (rc, err) == (1, "")
    assert out == 'failed\nget\tt/cfg\t{"v": 1}\ndelete\tt/gone\tnot found\nrange\tt/\t1 key(s)\n\tt/cfg\n'
    rc, out, err = cli("txn", "--json", stdin=json.dumps(CREATE_CFG))    # from stdin
    r = json.loads(out)
    assert (rc, err, r["succeeded"]) == (1, "", False)
    get, delete, rng = r["responses"]
    assert get["op"] == "get" and get["kv"]["value"] == {"v": 1} and get["kv"]["version"] == 1
    assert get["kv"]["mod_revision"] < r["revision"]
    assert delete == {"op": "delete", "key": "t/gone", "deleted": False}
    assert rng["op"] == "range" and [kv["key"] for kv in rng["kvs"]] == ["t/cfg"] and rng["more"] is False
    rc, out, _ = cli("txn", "-", "--json", stdin=json.dumps({"success": [{"op": "delete", "key": "t/cfg"}]}))
    assert rc == 0 and json.loads(out)["responses"] == [{"op": "delete", "key": "t/cfg", "deleted": True}]

    for bad in ("not json", "[]", '{"sucess": []}', '{"compare": {}}', '{"success": [1]}'):
        rc, out, _ = cli("txn", bad, "--json")
        assert rc == 2 and json.loads(out)["error"] == "UsageError", bad
    rc, out, err = cli("txn", '{"success": [{"op": "frob", "key": "x"}]}')   # the state machine refuses it
    assert rc == 1 and out == "" and "refused" in err


# ---------------------------------------------------------------------------------- watch

def test_watch_from_a_revision_with_count_across_put_and_delete(cli, cluster):
    with cluster.client() as kv:
        rev = kv.range("w/", prefix=True).revision
        kv.put("w/a", 1)
        kv.put("other", 1)
        kv.put("w/b", b"\x00\xff")
        kv.delete("w/a")
    rc, out, err = cli("watch", "w/", "--prefix", "--rev", str(rev + 1), "--count", "3")
    assert (rc, err) == (0, "")
    lines = [line.split("\t") for line in out.splitlines()]
    assert [x[1:] for x in lines] == [["put", "w/a", "1"], ["put", "w/b", "00ff"], ["delete", "w/a"]]
    revs = [int(x[0]) for x in lines]
    assert rev < revs[0] < revs[1] < revs[2]
    rc, out, _ = cli("watch", "w/a", "--rev", str(rev + 1), "--count", "2", "--json")
    assert rc == 0 and jlines(out) == [
        {"event": "put", "key": "w/a", "value": 1, "type": "int", "revision": revs[0]},
        {"event": "delete", "key": "w/a", "value": None, "revision": revs[2]}]
    rc, out, _ = cli("watch", "w/", "--count", "0", "--json")
    assert rc == 2 and json.loads(out)["error"] == "UsageError"


def test_compact_then_a_watch_from_before_it_exits_1_with_compacted(cli, cluster):
    with cluster.client() as kv:
        kv.put("cp/a", 1)
        kv.put("cp/a", 2)
        rev = kv.range("cp/a")[0].mod_revision
    rc, out, err = cli("compact", str(rev + 10**6), "--json")
    assert rc == 1 and json.loads(out)["error"] == "KVCommandError" and "in the future" in out, (out, err)
    for bad in ("0", "x", str(2**63)):
        rc, out, _ = cli("compact", bad, "--json")
        assert rc == 2 and json.loads(out)["error"] == "UsageError", bad
    rc, out, err = cli("compact", str(rev), "--json")
    assert (rc, json.loads(out), err) == (0, {"compacted": rev}, "")
    rc, out, err = cli("compact", str(rev))
    assert (rc, out, err) == (0, "", "")
    rc, out, err = cli("watch", "cp/a", "--rev", str(rev - 1), "--count", "1")
    assert rc == 1 and "Compacted" in err, (out, err)
    rc, out, err = cli("watch", "cp/a", "--rev", str(rev), "--count", "1")
    assert rc == 0 and out.split("\t")[1:] == ["put", "cp/a", "2\n"], (out, err)


@pytest.mark.timeout(60)
def test_watch_and_keepalive_stream_until_ctrl_c(cluster):
    """Both run as the console script: lines come as events and keepalives happen, SIGINT exits 130."""
    # stdout is a pipe, block-buffered as in a user's shell (not PYTHONUNBUFFERED): each line must be flushed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYRAFT_CLUSTER"] = ",".join(cluster.addrs.values())
    procs: list[subprocess.Popen] = []

    def start(*argv: str) -> subprocess.Popen:
        p = subprocess.Popen(kv_cmd() + ["--timeout", "10", *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    def read_lines(p: subprocess.Popen, n: int) -> list[str]:
        lines = []
        for _ in range(n):
            line = p.stdout.readline()  # the test's timeout bounds a reader that gets nothing
            assert line, f"exit {p.poll()}: {p.stderr.read()}"
            lines.append(line)
        return lines

    try:
        with cluster.client() as kv:
            rev = kv.range("s/", prefix=True).revision
            lease = kv.lease_grant(MIN_TTL)
            kv.put("s/kept", "v", lease=lease)
            ours = kv.keep_alive(lease)                    # until the command's first keepalive (it starts slowly)
            watch = start("watch", "s/", "--prefix", "--rev", str(rev + 1), "--json")
            keep = start("lease", "keepalive", str(lease))
            assert read_lines(keep, 1) == [f"{MIN_TTL:g}\n"]
            ours.stop()
            assert json.loads(read_lines(watch, 1)[0])["key"] == "s/kept"
            kv.put("s/next", 2)                            # while the watch runs: its line comes
            assert json.loads(read_lines(watch, 1)[0]) == {"event": "put", "key": "s/next", "value": 2,
                                                          "type": "int", "revision": kv.range("s/next")[0]
                                                          .mod_revision}
            # a line per keepalive, every third of the ttl: five more span more than its ttl
            assert read_lines(keep, 5) == [f"{MIN_TTL:g}\n"] * 5
            assert kv.get("s/kept") == "v"                 # kept alive by the command alone
            for p in (watch, keep):
                p.send_signal(signal.SIGINT)
            # watch's stdout through its file object (communicate() would lose read_lines' read-ahead)
            wout = watch.stdout.read()
            watch.wait(30)
            werr = watch.stderr.read()
            _, kerr = keep.communicate(timeout=30)
            assert watch.returncode == 130 and werr == "", werr
            assert jlines(wout)[-1] == {"error": "Interrupted", "message": "interrupted", "exit_code": 130}
            assert keep.returncode == 130 and "interrupted" in kerr, kerr
            # Ctrl-C stopped the keepalives without revoking: the lease expires after its ttl
            wait_for(lambda: kv.get("s/kept") is None, 10 * MIN_TTL, "the lease to expire")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.timeout(120)
def test_ctrl_c_at_any_moment_ends_a_watch_with_130(cluster):
    """SIGINT wherever the watch stands (connecting, long-polling, printing) ends it at once, never hangs it.

    A KeyboardInterrupt raised at an arbitrary point could leave a lock held and the
    clean-up waiting on it for ever (seen once in a full run): Ctrl-C now only closes
    the watch, which ends where it stands.
    """
    env = dict(os.environ, PYRAFT_CLUSTER=",".join(cluster.addrs.values()))
    with cluster.client() as kv:
        start = kv.range("c/", prefix=True).revision + 1  # (not 1: another test compacts the history)
        for i in range(20):
            kv.put(f"c/{i}", i)
        p = None
        for delay in (0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.8, 1.2):
            p = subprocess.Popen(kv_cmd() + ["--timeout", "10", "watch", "c/", "--prefix", "--rev", str(start), "--json"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                kv.put("c/x", delay)
                first = p.stdout.readline()  # the watch runs (the test's timeout bounds a silent one)
                assert first, p.stderr.read()
                threading.Event().wait(delay)  # a moment somewhere in its loop
                p.send_signal(signal.SIGINT)
                # The rest through the same file object: communicate() reads the pipe itself and
                # would lose what readline() read ahead into p.stdout's buffer (once, half a line).
                out = first + p.stdout.read()  # until the watch exits (the test's timeout bounds it)
                p.wait(15)
                err = p.stderr.read()
                assert p.returncode == 130, (delay, p.returncode, err, out[-300:])
                assert jlines(out)[-1]["error"] == "Interrupted", out[-300:]
                assert [e["revision"] for e in jlines(out)[:-1]] == sorted(set(e["revision"] for e in jlines(out)[:-1]))
            finally:
                if p.poll() is None:
                    p.kill()
                    p.communicate()

