"""The README as a newcomer meets it: a fresh copy of a clone, the Quickstart verbatim, then the other commands.

The copy holds the tracked files only (``git ls-files``: what a clone has; a file
not yet added to git is missing here as it would be there); outside a git
checkout, as in the copy .ci/run tests, the tree without what .gitignore leaves out.  The README's first
Quickstart block runs verbatim with bash from the copy's root: it makes its own
``.venv`` and does a plain ``pip install .`` (pyzmq, lmdb and msgpack come from
the package index, or pip's cache).  Then, from the same root and in that
environment, the README's other shell blocks run as written, with one change:
paths under ``/tmp/`` are moved into this test's temporary directory.  Python
examples run as a newcomer's own program file would, from another directory.

The second Quickstart block (the test suite) is what .ci/run runs, verbatim
(tests/test_readme.py checks that it is the same line).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from clonefiles import clone_files
from procs import free_port
from test_readme import README, ROOT, _blocks, _section

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CLUSTER = "### A cluster by hand, on one machine"
KV_PYTHON = "### The key-value store in Python"
TOOLS = "### Operator tools"
#: Every shell block of the README, by section, and what checks it.
CHECKED_SH_BLOCKS = {
    "## Quickstart": 2,  # the first here, verbatim; the second by .ci/run, verbatim
    CLUSTER: 2,          # test_the_readme_cluster_client_and_tools_commands_from_the_root
    TOOLS: 1,            # the same
}


@dataclass(frozen=True)
class Clone:
    root: pathlib.Path
    env: dict[str, str]          # a newcomer's shell with .venv activated
    quickstart: subprocess.CompletedProcess
    seconds: float


#: What .gitignore leaves out of a clone (and what running the tests makes in a work tree).
def _tracked_copy(dest: pathlib.Path) -> None:
    for name in clone_files(ROOT):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)


def _newcomer_env() -> dict[str, str]:
    """This process's environment without its virtual environment: a fresh shell's."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    if sys.prefix != sys.base_prefix:
        venv_bin = os.path.join(sys.prefix, "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Clone:
    root = tmp_path_factory.mktemp("clone")
    _tracked_copy(root)
    block = _blocks(_section(README, "## Quickstart"), "sh")[0]
    env = _newcomer_env()
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", block], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - t0
    venv = root / ".venv"
    active = dict(env, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return Clone(root, active, proc, seconds)


def test_every_readme_shell_block_is_checked():
    for heading, n in CHECKED_SH_BLOCKS.items():
        assert len(_blocks(_section(README, heading), "sh")) == n, heading
    total = len(_blocks(README.read_text(), "sh"))
    assert total == sum(CHECKED_SH_BLOCKS.values()), \
        "a new shell block in README.md: run it in tests/test_quickstart.py and count it in CHECKED_SH_BLOCKS"


def test_the_first_quickstart_block_verbatim_in_a_fresh_copy(clone):
    out = clone.quickstart.stdout + clone.quickstart.stderr
    assert clone.quickstart.returncode == 0, out[-4000:]
    assert "PASS: every acknowledged write survived the leader's SIGKILL" in clone.quickstart.stdout, out[-4000:]
    print(f"the Quickstart's first block took {clone.seconds:.1f} s (a fresh venv, pip install ., the demo)")


def _python(clone: Clone, code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(clone.root / ".venv" / "bin" / "python"), "-c", code], cwd=cwd, env=clone.env,
                          capture_output=True, text=True, timeout=120)


def test_the_plain_install_is_whole_and_points_at_no_checkout_file(clone, tmp_path):
    assert clone.quickstart.returncode == 0
    p = _python(clone, "\n".join([
        "import importlib.metadata as md, json, os, pyraft, pyraft.stores.lmdb, pyraft.transports.zmq, pyraft.tools.kv",
        "pkg = os.path.dirname(pyraft.__file__)",
        "dist = md.distribution('pyraft')",
        "print(json.dumps({'file': pyraft.__file__, 'version': pyraft.__version__, 'meta': dist.version,",
        "    'typed': os.path.isfile(os.path.join(pkg, 'py.typed')),",
        "    'files': sorted(str(f) for f in dist.files)}))",
    ]), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert str(clone.root / ".venv") in got["file"] and "site-packages" in got["file"]
    assert got["version"] == got["meta"]
    assert got["typed"]
    assert any(f.endswith("licenses/LICENSE") or f.endswith(".dist-info/LICENSE") for f in got["files"])
    assert not [f for f in got["files"] if f.split("/")[0] in ("tests", "tools", "stores", "transports", "docs")]
    # The long fault runs are test code: the installed module says what it is, and names no checkout path.
    p = subprocess.run([str(clone.root / ".venv" / "bin" / "python"), "-m", "pyraft.tools.faults"],
                       cwd=tmp_path, env=clone.env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "pydoc pyraft.tools.faults" in p.stderr, p.stderr
    assert "tests/" not in p.stderr and "docs/" not in p.stderr, p.stderr


def _ports_free(ports) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _wait_for_leader(clone: Clone, node: str, procs, deadline: float) -> None:
    while time.monotonic() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, f"a node exited with {dead[0].returncode}"
        p = subprocess.run(["pyraft-admin", "--node", node, "--timeout", "2", "status", "--json"], cwd=clone.root,
                           env=clone.env, capture_output=True, text=True, timeout=30)
        if p.returncode == 0 and json.loads(p.stdout).get("current_leader") is not None:
            return
        time.sleep(0.3)
    raise AssertionError("the README's cluster elected no leader in time")


def test_the_readme_cluster_client_and_tools_commands_from_the_root(clone, tmp_path):
    """The cluster by hand, its client commands, the Python client and the tools: as the README shows them."""
    assert clone.quickstart.returncode == 0
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    readme_ports = (7101, 7102, 7103)
    ports = readme_ports
    while not _ports_free(ports):  # taken on this machine: the same commands on free ports
        ports = tuple({free_port(): None for _ in range(3)})
        ports = ports if len(ports) == 3 else readme_ports

    def here(text: str) -> str:
        for old, new in zip(readme_ports, ports):
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        return text.replace("/tmp/", f"{tmp}/")

    serve_block, client_block = _blocks(_section(README, CLUSTER), "sh")
    first, *serve_lines = [line for line in serve_block.splitlines() if line.strip()]
    assert first.startswith("PEERS=") and all(line.startswith("pyraft-kv serve ") for line in serve_lines)
    procs = []
    try:
        for i, line in enumerate(serve_lines, 1):  # each in its own terminal: bash runs it, then is it
            log = open(tmp / f"serve{i}.log", "w")
            procs.append(subprocess.Popen(["bash", "-c", f"{here(first)}\nexec {here(line)}"], cwd=clone.root,
                                          env=clone.env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        _wait_for_leader(clone, here("tcp://127.0.0.1:7101"), procs, time.monotonic() + 60)

        p = subprocess.run(["bash", "-c", "set -ex\n" + here(client_block)], cwd=clone.root, env=clone.env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.splitlines()[:1] == ["hello"], p.stdout  # `get greeting` prints hello

        program = tmp / "kv_example.py"  # a newcomer's own program, outside the clone
        program.write_text(here(_blocks(_section(README, KV_PYTHON), "python")[0]))
        p = subprocess.run([str(clone.root / ".venv" / "bin" / "python"), str(program)], cwd=tmp, env=clone.env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["{'name':", "'Ada',", "'langs':", "['en',", "'fr']}", "True", "True"], p.stdout

        tools_block = _blocks(_section(README, TOOLS), "sh")[0]
        p = subprocess.run(["bash", "-c", "set -ex\n" + here(tools_block)], cwd=clone.root, env=clone.env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "Leader" in p.stdout and "OK:" in p.stdout, p.stdout
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(f"still running 30 s after SIGTERM: {proc.wait()}")
    assert codes == [0, 0, 0], [(tmp / f"serve{i}.log").read_text()[-2000:] for i in (1, 2, 3)]
