"""setup.py installs every package of the source tree (an editable install hides a missing one)."""
import ast
import os

import pytest

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
