"""The files a fresh clone of this repository has, for the tests that install or build from one."""
from __future__ import annotations

import fnmatch
import os
import subprocess

#: What a clone never has: git's own directory and what .gitignore leaves out (and the caches tools leave).
NOT_IN_A_CLONE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
                  ".mypy_cache")


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in NOT_IN_A_CLONE)


def clone_files(root: str | os.PathLike) -> list[str]:
    """The relative paths of the files a clone of ``root`` has.

    In a git checkout, what ``git ls-files`` lists (a tracked file deleted in
    the work tree is left out). Elsewhere (``.ci/run`` tests a copy of a
    clone's files, which is no git repository): every file under ``root``
    but what :data:`NOT_IN_A_CLONE` names.
    """
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = []
        for here, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not _ignored(d))
            rel = os.path.relpath(here, root)
            out += [os.path.normpath(os.path.join(rel, f)) for f in sorted(files) if not _ignored(f)]
        return out
    return [n for n in listed.decode().split("\0") if n and os.path.isfile(os.path.join(root, n))]
