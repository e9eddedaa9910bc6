"""The package type-checks: mypy over every module of ``pyraft`` as installed, with the
configuration in pyproject.toml ([tool.mypy]); any error fails the test and is printed.

setup.py installs the top-level ``transports/``, ``stores/`` and ``tools/`` directories as
``pyraft.transports``, ``pyraft.stores`` and ``pyraft.tools``; mypy has no such mapping (and
does not follow an editable install's import hook), so the test builds the installed layout
from symbolic links to the checkout's files and checks that: errors name the installed
paths (``pyraft/transports/zmq.py``), which are the checkout's ``transports/zmq.py``.

Run it alone with ``python -m pytest tests/test_typing.py``, or ``python tests/test_typing.py``
for mypy's own output.
"""
import os
import subprocess
import sys
import tempfile

import pytest

from test_packaging import ROOT, _setup_kwargs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def installed_layout(dest: str) -> str:
    """Make ``dest/pyraft`` the package as setup.py installs it, from links; return ``dest``."""
    pkg = os.path.join(dest, "pyraft")
    os.mkdir(pkg)
    for name in os.listdir(os.path.join(ROOT, "pyraft")):
        if name != "__pycache__":
            os.symlink(os.path.join(ROOT, "pyraft", name), os.path.join(pkg, name))
    for dotted, src in _setup_kwargs()["package_dir"].items():
        os.symlink(os.path.join(ROOT, src), os.path.join(dest, *dotted.split(".")))
    return dest


def run_mypy(dest: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
         "--cache-dir", os.path.join(dest, ".mypy_cache"), "-p", "pyraft"],
        cwd=installed_layout(dest), capture_output=True, text=True)


def test_the_package_type_checks(tmp_path):
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    done = run_mypy(str(tmp_path))
    out = done.stdout + done.stderr
    assert done.returncode == 0, "mypy found errors:\n" + out
    # mypy read every module of the layout, the mapped directories' too.
    assert f"Success: no issues found in {_count_modules(str(tmp_path))} source files" in out, out


def _count_modules(dest: str) -> int:
    return sum(name.endswith(".py") for _dirpath, _dirs, names in os.walk(os.path.join(dest, "pyraft"), followlinks=True)
               for name in names)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        r = run_mypy(d)
        sys.stdout.write(r.stdout + r.stderr)
        sys.exit(r.returncode)
