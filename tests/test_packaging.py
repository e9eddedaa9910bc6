"""Packaging: setup.py installs every package of the source tree (an editable install hides a missing one),
one version, the licence, and what the sdist and the wheel carry."""
import ast
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
from clonefiles import clone_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(30)


def _setup_kwargs() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("packages", "package_dir")}


def _source_packages(top: str, name: str) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if "__init__.py" in filenames:
            rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
            out.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return out


def test_every_source_package_is_installed():
    kw = _setup_kwargs()
    want = _source_packages("pyraft", "pyraft")
    for pkg, src in kw["package_dir"].items():
        want |= _source_packages(src, pkg)
    assert want - set(kw["packages"]) == set(), "setup.py misses these packages"
    assert set(kw["packages"]) - want == set(), "setup.py names packages that do not exist"


# --- the version, the licence, the distributions ---------------------------------------------


def _setup_version() -> str:
    """What setup.py's _version() returns, run without running setup()."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign, ast.FunctionDef))
            and not (isinstance(n, ast.ImportFrom) and n.module == "setuptools")]
    ns = {"__file__": os.path.join(ROOT, "setup.py")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), ns)
    return ns["_version"]()


def test_the_version_has_one_source():
    import pyraft

    assert _setup_version() == pyraft.__version__
    setup_py = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert pyraft.__version__ not in setup_py, "setup.py reads the version from pyraft/_version.py"


def test_the_licence_file_is_the_licence_the_classifier_names():
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a notice
    setup_py = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert "License :: OSI Approved :: Apache Software License" in setup_py
    assert 'license="Apache-2.0"' in setup_py


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_sdist_carries_the_package_and_docs_but_no_tests_and_the_wheel_builds_from_it(tmp_path):
    """``python -m build`` on a clone's files, as a packager runs it: an sdist, then a wheel built from that sdist."""
    tracked = clone_files(ROOT)
    src = tmp_path / "src"
    for name in tracked:
        os.makedirs(os.path.dirname(src / name), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    subprocess.run([py, "-m", "pip", "install", "-q", "build"], check=True, timeout=300, env=env)
    p = subprocess.run([py, "-m", "build", "--outdir", str(tmp_path / "dist"), str(src)], capture_output=True,
                       text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    import pyraft

    version = pyraft.__version__
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert sdist.name == f"pyraft-{version}.tar.gz" and wheel.name == f"pyraft-{version}-py3-none-any.whl"

    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    code = {n for n in tracked if n.endswith(".py") and n.split("/")[0] in ("pyraft", "stores", "transports", "tools")}
    want = code | {n for n in tracked if n.startswith("docs/")} | {
        "LICENSE", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in", "pyraft/py.typed"}
    assert want - in_sdist == set(), "missing from the sdist"
    assert not [n for n in in_sdist if n.startswith(("tests/", ".ci/"))], "the sdist holds no tests"

    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
        metadata = whl.read(f"pyraft-{version}.dist-info/METADATA").decode()
        entry_points = whl.read(f"pyraft-{version}.dist-info/entry_points.txt").decode()
    mapped = {"stores": "pyraft/stores", "transports": "pyraft/transports", "tools": "pyraft/tools"}
    want = {mapped.get(n.split("/")[0], n.split("/")[0]) + "/" + n.split("/", 1)[1] for n in code}
    want |= {"pyraft/py.typed", f"pyraft-{version}.dist-info/licenses/LICENSE"}
    assert want - in_wheel == set(), "missing from the wheel"
    assert not [n for n in in_wheel if not n.startswith(("pyraft/", f"pyraft-{version}.dist-info/"))], \
        "the wheel installs pyraft and nothing else"
    assert f"Version: {version}" in metadata and "License-File: LICENSE" in metadata
    for script in ("pyraft-kv", "pyraft-admin", "pyraft-inspect", "pyraft-bench"):
        assert f"{script} = " in entry_points
