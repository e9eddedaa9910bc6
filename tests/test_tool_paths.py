"""Where pyraft-inspect and pyraft-admin may write, and the values they refuse up front.

One rule for ``pyraft-inspect DIR snapshot --export FILE`` and ``pyraft-admin backup FILE``
(:func:`pyraft.tools.cli.check_output_file`): FILE replaces only a regular file, only with --force,
and never lands in an LMDB environment or a node data directory, however it is spelled.  Also:
--export under a regular file, non-finite admin timeouts, and keygen --name / DIR checks.
Everything is a usage error (exit 2, one JSON object with --json) and leaves the files as they were.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_inspect import CFG, LmdbCluster, put  # noqa: E402

from pyraft.tools import admin as padmin  # noqa: E402
from pyraft.tools import inspect as pinspect  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def run(main, *argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def fingerprint(path) -> tuple:
    """What must not change: the inode, its type and size, and the bytes of a regular file."""
    st = os.lstat(path)
    digest = None
    if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return st.st_ino, st.st_mode, st.st_size if digest else None, digest


def start_with_snapshot(root) -> LmdbCluster:
    """One node (admin ops served) with some keys and a KV snapshot."""
    c = LmdbCluster(root, ids=(1,), admin=True)
    try:
        c.initialize([1])
        c.write([put(f"k{i}", i) for i in range(20)])
        r = c.rafts[1]
        last = r.metrics().last_log_index
        r.trigger.snapshot()
        r.wait(10).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= last)
    except BaseException:
        c.close()
        raise
    return c


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A running node with a snapshot, for pyraft-admin: (cluster, its data dir)."""
    c = start_with_snapshot(tmp_path_factory.mktemp("running"))
    try:
        yield c, c.dir(1)
    finally:
        c.close()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A stopped node's data dir with a snapshot, for pyraft-inspect in this process: (None, the dir)."""
    c = start_with_snapshot(tmp_path_factory.mktemp("stopped"))
    c.close()
    return None, c.dir(1)


def inspect(d, *argv):
    return run(pinspect.main, d, "snapshot", *argv)


def inspect_proc(d, *argv) -> tuple[int, str, str]:
    """pyraft-inspect in its own process (it may read a node this process runs)."""
    code = "import sys; from pyraft.tools.inspect import main; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", code, str(d), "snapshot", *[str(a) for a in argv]],
                       capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


def backup(c, *argv):
    return run(padmin.main, "--node", c.addrs[1], "--cluster-name", CFG.cluster_name, "backup", *argv)


def node_files(d: str) -> list[str]:
    """The node's own files an output must never replace."""
    out = []
    for env in ("log.lmdb", "kv.lmdb"):
        out += [os.path.join(d, env, "data.mdb"), os.path.join(d, env, "lock.mdb")]
    snaps = os.path.join(d, "snapshots")
    out += [os.path.join(snaps, n) for n in sorted(os.listdir(snaps))]
    return [p for p in out if os.path.exists(p)]


def specials(tmp_path) -> dict[str, str]:
    """A directory, a fifo, a socket, and symbolic links to them, in tmp_path."""
    d = tmp_path / "adir"
    d.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()  # the socket file stays
    out = {"directory": str(d), "fifo": str(fifo), "socket": str(sock)}
    for k in list(out):
        link = tmp_path / f"link-to-{k}"
        os.symlink(out[k], link)
        out[f"link to {k}"] = str(link)
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nothing-here", dangling)
    out["dangling link"] = str(dangling)
    return out


def assert_usage_error(rc, out, err, as_json: bool) -> dict | None:
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    if as_json:
        e = json.loads(out)
        assert e["error"] == "UsageError" and e["exit_code"] == 2
        return e
    assert out == "" and len(err.strip().splitlines()) == 1, err
    return None


# ---------------------------------------------------------------------------
# F5: pyraft-inspect snapshot --export

def test_export_never_replaces_the_nodes_own_files_even_with_force(stopped, tmp_path):
    _c, d = stopped
    files = node_files(d)
    assert any(p.endswith(os.path.join("kv.lmdb", "data.mdb")) for p in files)
    assert any(os.sep + "snapshots" + os.sep in p for p in files)
    before = {p: fingerprint(p) for p in files}
    for p in files:
        for as_json in (False, True):
            rc, out, err = inspect(d, "--export", p, "--force", *(["--json"] if as_json else []))
            assert_usage_error(rc, out, err, as_json)
    # the same file by another spelling: a relative path through a symlinked directory
    alias = tmp_path / "alias"
    os.symlink(d, alias)
    rc, out, err = inspect(d, "--export", os.path.join(str(alias), "kv.lmdb", "data.mdb"), "--force")
    assert_usage_error(rc, out, err, False)
    assert {p: fingerprint(p) for p in files} == before
    assert not [n for n in os.listdir(os.path.join(d, "kv.lmdb")) if n.endswith(".tmp")]


def test_export_from_a_running_node_never_replaces_its_lmdb_files(node):
    _c, d = node  # running in this process: the tool runs in its own
    files = [os.path.join(d, "kv.lmdb", "data.mdb"), os.path.join(d, "log.lmdb", "data.mdb")]
    before = {p: fingerprint(p) for p in files}
    for p in files:
        rc, out, err = inspect_proc(d, "--export", p, "--force")
        assert_usage_error(rc, out, err, False)
        assert "refusing to write there" in err
    rc, out, err = inspect_proc(d, "--json")  # it still reads the node's snapshot
    assert rc == 0 and json.loads(out)["file_bytes"] > 0, err
    assert {p: fingerprint(p) for p in files} == before


def test_export_refuses_a_new_file_inside_the_data_dir_or_an_lmdb_env(stopped, tmp_path):
    _c, d = stopped
    lone_env = tmp_path / "someenv"
    lone_env.mkdir()
    (lone_env / "lock.mdb").write_bytes(b"")  # an LMDB environment of another program
    for dest in (os.path.join(d, "export.kvsnap"), os.path.join(d, "snapshots", "new.kvsnap"),
                 os.path.join(d, "log.lmdb", "new"), str(lone_env / "x")):
        rc, out, err = inspect(d, "--export", dest)
        assert_usage_error(rc, out, err, False)
        assert "refusing to write there" in err
        assert not os.path.exists(dest)


def test_export_refuses_anything_but_a_regular_file(stopped, tmp_path):
    _c, d = stopped
    targets = specials(tmp_path)
    before = {k: fingerprint(p) for k, p in targets.items()}
    for kind, p in targets.items():
        for force in ((), ("--force",)):
            rc, out, err = inspect(d, "--export", p, *force)
            assert_usage_error(rc, out, err, False)
        e = assert_usage_error(*inspect(d, "--export", p, "--force", "--json"), True)
        assert "regular file" in e["message"] or "link" in e["message"], (kind, e)
    assert {k: fingerprint(p) for k, p in targets.items()} == before


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_export_and_backup_refuse_a_device_node(node, stopped, tmp_path):
    c, _ = node
    _, d = stopped
    dev = tmp_path / "null-twin"
    os.mknod(dev, 0o600 | 0o020000, os.makedev(1, 3))  # a /dev/null twin, in tmp_path
    before = fingerprint(dev)
    assert_usage_error(*inspect(d, "--export", dev, "--force"), False)
    assert_usage_error(*backup(c, dev, "--force"), False)
    assert fingerprint(dev) == before


def test_export_with_force_still_replaces_a_regular_file(stopped, tmp_path):
    _c, d = stopped
    dest = tmp_path / "out.kvsnap"
    dest.write_bytes(b"old")
    assert inspect(d, "--export", dest)[0] == 2  # exists, no --force
    rc, out, err = inspect(d, "--export", dest, "--force")
    assert rc == 0 and "checksum OK" in out, err
    assert dest.stat().st_size > 3
    assert sorted(os.listdir(tmp_path)) == ["out.kvsnap"]  # no temporary file left


# ---------------------------------------------------------------------------
# F4: --export under a regular file, or empty

def test_export_under_a_regular_file_is_a_usage_error(stopped, tmp_path):
    _c, d = stopped
    afile = tmp_path / "afile"
    afile.write_text("x")
    for dest in (afile / "x", afile / "sub" / "x", tmp_path / "missing" / "x", ""):
        assert_usage_error(*inspect(d, "--export", dest), False)
        assert_usage_error(*inspect(d, "--export", dest, "--json"), True)
    assert afile.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["afile"]


def test_unlink_cleanup_never_raises(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    pinspect._unlink(str(afile / "x.tmp"))  # NotADirectoryError: ignored
    pinspect._unlink(str(tmp_path / "none"))


def test_inspect_has_no_float_flags_that_take_nan(stopped):
    _c, d = stopped
    for flag in ("--from", "--to", "--tail"):
        for v in ("nan", "inf", "1e400", "-1"):
            assert run(pinspect.main, d, "log", flag, v)[0] == 2


# ---------------------------------------------------------------------------
# F6: pyraft-admin backup

def test_backup_never_replaces_the_nodes_own_files_even_with_force(node):
    c, d = node
    files = node_files(d)
    before = {p: fingerprint(p) for p in files}
    for p in files:
        assert_usage_error(*backup(c, p, "--force"), False)
    assert_usage_error(*backup(c, os.path.join(d, "log.lmdb", "data.mdb"), "--force", "--json"), True)
    for dest in (os.path.join(d, "new.pyraftbk"), os.path.join(d, "snapshots", "new.pyraftbk")):
        assert_usage_error(*backup(c, dest), False)
        assert not os.path.exists(dest)
    assert {p: fingerprint(p) for p in files} == before
    for env in ("log.lmdb", "kv.lmdb", "snapshots"):
        assert not [n for n in os.listdir(os.path.join(d, env)) if n.endswith(".tmp")]


def test_backup_refuses_anything_but_a_regular_file_and_an_empty_name(node, tmp_path):
    c, _d = node
    targets = specials(tmp_path)
    before = {k: fingerprint(p) for k, p in targets.items()}
    for kind, p in targets.items():
        assert_usage_error(*backup(c, p, "--force"), False)
    assert_usage_error(*backup(c, targets["fifo"], "--force", "--json"), True)
    assert_usage_error(*backup(c, ""), False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_usage_error(*backup(c, afile / "x"), False)
    assert {k: fingerprint(p) for k, p in targets.items()} == before


def test_backup_with_force_still_replaces_a_regular_file(node, tmp_path):
    c, _d = node
    dest = tmp_path / "bk.pyraftbk"
    dest.write_bytes(b"old")
    assert backup(c, dest)[0] == 2
    rc, out, err = backup(c, dest, "--force", "--json")
    assert rc == 0, (out, err)
    assert json.loads(out)["file_size"] == dest.stat().st_size > 3
    assert sorted(os.listdir(tmp_path)) == ["bk.pyraftbk"]


# ---------------------------------------------------------------------------
# F1: admin timeouts

@pytest.mark.parametrize("argv", [
    ["--connect-timeout", "nan", "status"],
    ["--connect-timeout", "inf", "status"],
    ["--timeout", "nan", "snapshot"],
    ["--timeout", "inf", "remove", "5"],
    ["--timeout", "nan", "status"],
    ["--timeout", "inf", "status"],
    ["--timeout", "1e308", "snapshot"],
    ["--connect-timeout", "-inf", "status"],
])
def test_admin_timeouts_must_be_finite_and_positive(node, argv):
    c, _d = node
    base = ["--node", c.addrs[1], "--cluster-name", CFG.cluster_name]
    rc, out, err = run(padmin.main, *base, *argv)
    assert_usage_error(rc, out, err, False)
    assert "--timeout" in err or "--connect-timeout" in err
    assert_usage_error(*run(padmin.main, *base, *argv, "--json"), True)


def test_admin_timeouts_in_range_still_work(node):
    c, _d = node
    rc, out, err = run(padmin.main, "--node", c.addrs[1], "--cluster-name", CFG.cluster_name,
                       "--timeout", "86400", "--connect-timeout", "5", "status", "--json")
    assert rc == 0, err
    assert json.loads(out)["id"] == 1


# ---------------------------------------------------------------------------
# F14: keygen --name and DIR

@pytest.mark.parametrize("name", ["../../escape", "", ".hidden", ".", "..", "a/b", "\udcff", "k\u00e9y",
                                  "a b", "x" * 65, "a\n"])
def test_keygen_refuses_a_bad_name(tmp_path, name):
    keys = tmp_path / "a" / "keys"
    rc, out, err = run(padmin.main, "keygen", keys, "--name", name)
    assert_usage_error(rc, out, err, False)
    assert_usage_error(*run(padmin.main, "keygen", keys, "--name", name, "--json"), True)
    assert not os.path.exists(tmp_path / "a")  # nothing written, not even DIR
    assert os.listdir(tmp_path) == []


def test_keygen_good_names_still_work(tmp_path):
    for name in ("admin", "x" * 64, "ops-2_b.c", "7"):
        rc, out, err = run(padmin.main, "keygen", tmp_path, "--name", name)
        assert rc == 0, err
        assert os.path.exists(tmp_path / f"{name}.key") and os.path.exists(tmp_path / f"{name}.key_secret")


def test_keygen_into_a_regular_file_says_it_is_not_a_directory(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, out, err = run(padmin.main, "keygen", afile, "--name", "x")
    assert_usage_error(rc, out, err, False)
    assert "not a directory" in err and "already exist" not in err
    e = assert_usage_error(*run(padmin.main, "keygen", afile, "--name", "x", "--json"), True)
    assert "not a directory" in e["message"]
    assert afile.read_text() == "x"


def test_outputs_beside_or_below_a_nodes_stores_are_fine(tmp_path):
    # /var/lib/pyraft/backups, with /var/lib/pyraft a node's data directory, is a place for backups;
    # a stray lock.mdb above the output's directory says nothing about that directory.
    from pyraft.tools.cli import check_output_file
    node = tmp_path / "var" / "lib" / "pyraft"
    (node / "log.lmdb").mkdir(parents=True)
    (node / "kv.lmdb").mkdir()
    (node / "backups").mkdir()
    assert check_output_file(str(node / "backups" / "x.bk"), force=False) == str(node / "backups" / "x.bk")
    home = tmp_path / "home"
    (home / "proj").mkdir(parents=True)
    (home / "lock.mdb").write_bytes(b"")
    assert check_output_file(str(home / "proj" / "x.bk"), force=False)
    for refused in (node / "x.bk", node / "kv.lmdb" / "x.bk", home / "x.bk"):
        with pytest.raises(pinspect.UsageError, match="refusing to write there"):
            check_output_file(str(refused), force=False)


def test_an_export_cut_short_leaves_no_copy_behind(stopped, tmp_path, monkeypatch):
    _c, d = stopped

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pinspect.shutil, "copyfileobj", interrupted)
    with contextlib.redirect_stderr(io.StringIO()):
        assert pinspect.main([d, "snapshot", "--export", str(tmp_path / "out.kvsnap")]) == 130  # Ctrl-C
    assert os.listdir(tmp_path) == []
