"""One command-line style for pyraft-kv, pyraft-admin and pyraft-inspect (issue 17): global flags in
either position, PYRAFT_CLUSTER, --json errors, --version, one exit-code table, and ``python -m
pyraft.tools.<module> --help`` printing help for every module of tools/."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import free_port  # noqa: E402

import pyraft  # noqa: E402
from pyraft.tools import admin as padmin  # noqa: E402
from pyraft.tools import inspect as pinspect  # noqa: E402
from pyraft.tools import kv as pkv  # noqa: E402
from pyraft.tools.cli import EXIT_CODES  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TOOLS_DIR = os.path.dirname(pkv.__file__)
SCRIPTS = ("pyraft-kv", "pyraft-admin", "pyraft-inspect", "pyraft-bench")


def run(main, *argv, env: dict | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # --help and --version
                rc = e.code
    finally:
        os.environ.clear()
        os.environ.update(old)
    return rc, out.getvalue(), err.getvalue()


def _script(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_version(script):
    p = subprocess.run([_script(script), "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"{script} {pyraft.__version__}", p.stdout + p.stderr


def _tool_modules() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(TOOLS_DIR) if f.endswith(".py") and f != "__init__.py")


@pytest.mark.parametrize("module", _tool_modules())
def test_python_m_help_of_every_tools_module_prints_help(module, tmp_path):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", f"pyraft.tools.{module}", "--help"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip(), "nothing on stdout"
    assert not p.stdout.lstrip().startswith("{"), f"{module} --help ran instead: {p.stdout[:200]}"  # stages did
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("main", [pkv.main, padmin.main, pinspect.main], ids=["kv", "admin", "inspect"])
def test_help_ends_with_the_one_exit_code_table(main):
    rc, out, _ = run(main, "--help")
    assert rc == 0 and EXIT_CODES.splitlines()[0] in out and "130  interrupted" in out


def test_the_docs_show_the_same_exit_codes():
    with open(os.path.join(os.path.dirname(TOOLS_DIR), "docs", "tools.md"), encoding="utf-8") as f:
        text = f.read()
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 130 |"):
        assert code in text


def test_admin_global_flags_in_either_position_and_json_errors():
    dead = f"tcp://127.0.0.1:{free_port()}"
    a = run(padmin.main, "--node", dead, "--connect-timeout", "0.3", "--json", "health")
    b = run(padmin.main, "health", "--json", "--connect-timeout", "0.3", "--node", dead)
    for rc, out, _ in (a, b):
        rep = json.loads(out)
        assert rc == 2 and rep["error"] == "Unreachable" and rep["exit_code"] == 2 and rep["healthy"] is False
    rc, out, err = run(padmin.main, "--json", "status", "--node", dead, "--connect-timeout", "0.3")
    assert rc == 2 and json.loads(out)["error"] == "Unreachable" and err == ""
    rc, out, err = run(padmin.main, "--json", "no-such-command")
    assert rc == 2 and json.loads(out)["error"] == "UsageError" and err == ""
    rc, out, err = run(padmin.main, "remove-learner", "x", "--node", dead, "--json")
    assert rc == 2 and json.loads(out)["error"] == "UsageError"
    # PYRAFT_CLUSTER stands in for --node
    rc, out, _ = run(padmin.main, "status", "--json", "--connect-timeout", "0.3",
                     env={**os.environ, "PYRAFT_CLUSTER": dead})
    assert rc == 2 and dead in json.loads(out)["message"]
    rc, out, err = run(padmin.main, "status", env={k: v for k, v in os.environ.items() if k != "PYRAFT_CLUSTER"})
    assert rc == 2 and "--node" in err and err.count("\n") == 1


def test_kv_global_flags_in_either_position_and_json_errors():
    dead = f"tcp://127.0.0.1:{free_port()}"
    a = run(pkv.main, "--cluster", dead, "--timeout", "0.5", "--json", "get", "k")
    b = run(pkv.main, "get", "k", "--json", "--timeout", "0.5", "--cluster", dead)
    c = run(pkv.main, "get", "k", "--json", "--timeout", "0.5", env={**os.environ, "PYRAFT_CLUSTER": dead})
    for rc, out, err in (a, b, c):
        assert rc == 1 and json.loads(out)["error"] == "Timeout" and err == "", (out, err)
    rc, out, _ = run(pkv.main, "put", "k", "--json")  # VALUE missing
    assert rc == 2 and json.loads(out)["error"] == "UsageError"
    rc, out, err = run(pkv.main, "--cluster", dead, "demo")  # a client option on a command that has none
    assert rc == 2 and "--cluster" in err
    env = {k: v for k, v in os.environ.items() if k not in ("PYRAFT_CLUSTER", "PYRAFT_KV_CLUSTER")}
    rc, out, _ = run(pkv.main, "get", "k", "--json", env=env)
    assert rc == 2 and "PYRAFT_CLUSTER" in json.loads(out)["message"]


def test_inspect_json_in_either_position_and_json_errors(tmp_path):
    from pyraft.kv import KVStateMachine
    from pyraft.stores.lmdb import LmdbLogStore
    d = tmp_path / "n1"
    LmdbLogStore(d, node_id=1).close()
    KVStateMachine(d).close()
    a = run(pinspect.main, d, "--json", "vote")
    b = run(pinspect.main, "--json", d, "vote")
    assert a == b and a[0] == 0 and json.loads(a[1]) is not None
    rc, out, err = run(pinspect.main, tmp_path / "missing", "summary", "--json")
    assert rc == 2 and json.loads(out)["exit_code"] == 2 and err == ""
    rc, out, err = run(pinspect.main, d, "snapshot", "--export", tmp_path / "s", "--json")
    assert rc == 1 and json.loads(out)["error"] == "NoSnapshot"
