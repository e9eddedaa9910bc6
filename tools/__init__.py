"""pyraft's command-line tools (installed as ``pyraft.tools``; the source lives in ``tools/``)."""
from __future__ import annotations

import sys

__all__ = ["module_argv"]

# ``python -m M`` puts the working directory first on sys.path.  Run from a checkout of
# this repository, the source ``pyraft/`` there (which has no ``tools``, ``stores`` or
# ``transports``: setup.py maps those in from the top level) would shadow the installed
# package and the child would fail with "No module named 'pyraft.tools'".  So a tool
# that starts Python children drops that entry first, then runs the module as -m would.
_BOOT = ("import runpy, sys\n"
         "if sys.path and sys.path[0] == '': del sys.path[0]\n"
         "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n")


def module_argv(module: str) -> list[str]:
    """The argv prefix that runs ``python -m module`` in a child, whatever its working directory.

    Append the module's own arguments.  Unlike ``[sys.executable, "-m", module]``,
    the child imports the installed pyraft even when started from the repository root.
    """
    return [sys.executable, "-c", _BOOT, module]
