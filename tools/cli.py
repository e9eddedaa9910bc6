"""What ``pyraft-kv``, ``pyraft-admin`` and ``pyraft-inspect`` share on the command line.

- Exit codes, one table for the three (:data:`EXIT_CODES`, shown in every
  ``--help`` and in docs/tools.md).
- Global flags accepted before or after the subcommand: :func:`add_global`
  puts a flag on the top parser with its default and on each subcommand's
  parser with no default, so a value given after the subcommand overrides
  one given before it, and none given keeps the top default.
- Cluster addresses: ``--cluster ADDR,ADDR,...`` or ``$PYRAFT_CLUSTER``
  (``$PYRAFT_KV_CLUSTER``, the older name, still works for ``pyraft-kv``).
- ``--json``: the command's result as one JSON object on stdout, and an
  error as one JSON object too (:func:`emit_error`), with the same exit code.
- ``--version``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

from pyraft import __version__

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_CODES", "UsageError", "Parser",
           "add_global", "add_version", "cluster_from", "emit_error", "wants_json", "run_main", "CLUSTER_ENV"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EXIT_CODES = """\
exit codes (pyraft-kv, pyraft-admin and pyraft-inspect alike):
  0    done; health: healthy; verify: the log is sound
  1    the operation failed or the answer is no: the node refused it, it timed out
       (a write's outcome is then unknown), the key or lease is absent, the cas or
       a txn's compares did not match, the node is unhealthy, verify found a logical fault
  2    usage error, a node that does not answer, files or key files that cannot be read
  130  interrupted (Ctrl-C; how pyraft-kv watch and lease keepalive usually end)
with --json, errors too are one JSON object on stdout: {"error": TYPE, "message": TEXT, "exit_code": N}"""

#: The environment variable every tool reads cluster addresses from when --cluster is not given.
CLUSTER_ENV = "PYRAFT_CLUSTER"


class UsageError(Exception):
    """A bad argument or an unusable file: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` (so ``--json`` can report them) and whose
    help ends with the exit-code table."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kw.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kw)

    def error(self, message: str) -> Any:  # argparse's signature; it never returns
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_global(top: argparse.ArgumentParser, subs: Sequence[argparse.ArgumentParser],
               *flags: str, **kw: Any) -> None:
    """Add one flag to ``top`` (with ``kw``'s default) and to every parser of ``subs`` (no default)."""
    top.add_argument(*flags, **kw)
    sub_kw = dict(kw, default=argparse.SUPPRESS)
    sub_kw.pop("required", None)
    for s in subs:
        s.add_argument(*flags, **sub_kw)


def cluster_from(flag: str | None, *legacy_env: str) -> str | None:
    """Cluster addresses from ``--cluster``, else ``$PYRAFT_CLUSTER``, else the ``legacy_env`` variables."""
    if flag:
        return flag
    for name in (CLUSTER_ENV, *legacy_env):
        v = os.environ.get(name)
        if v:
            return v
    return None


def wants_json(argv: Sequence[str]) -> bool:
    """``--json`` among the arguments (looked at before parsing, so parse errors can be JSON too)."""
    return "--json" in argv


def emit_error(prog: str, as_json: bool, code: int, error: BaseException | str, *,
               kind: str | None = None, prefix: str = "") -> int:
    """Report an error: one JSON object on stdout with ``as_json``, else one line on stderr; return ``code``."""
    name = kind or (type(error).__name__ if isinstance(error, BaseException) else "Error")
    message = str(error)
    if as_json:
        print(json.dumps({"error": name, "message": message, "exit_code": code}, sort_keys=True))
    else:
        print(f"{prog}: {prefix}{message}", file=sys.stderr)
    return code


def run_main(prog: str, argv: Sequence[str] | None, body: Callable[[list[str]], int]) -> int:
    """Run ``body(argv)``, turning a UsageError and Ctrl-C into their exit codes (JSON with ``--json``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = wants_json(args)
    try:
        return body(args)
    except UsageError as e:
        return emit_error(prog, as_json, EXIT_USAGE, e, kind="UsageError", prefix="error: ")
    except KeyboardInterrupt:
        return emit_error(prog, as_json, EXIT_INTERRUPTED, "interrupted", kind="Interrupted")


if __name__ == "__main__":  # python -m pyraft.tools.cli [--help]: what the tools share
    print(__doc__.strip() + "\n\n" + EXIT_CODES)
