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
import math
import os
import stat
import sys
from typing import Any, Callable, Sequence

from pyraft import __version__

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_CODES", "UsageError", "Parser",
           "add_global", "add_version", "check_output_file", "node_store_of", "cluster_from", "emit_error",
           "wants_json", "run_main", "CLUSTER_ENV"]

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
        print(f"{prog}: {prefix}{printable(message)}", file=sys.stderr)
    return code


#: Names that mark a directory no tool writes into: an LMDB environment's files, and the two
#: environments of a pyraft node data directory (pyraft.stores.lmdb LOG_ENV_NAME, KV_ENV_NAME).
_LMDB_FILES = ("data.mdb", "lock.mdb")
_NODE_DIR_MARKS = ("log.lmdb", "kv.lmdb")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def node_store_of(directory: str) -> str | None:
    """Why ``directory`` belongs to a node's stores (a sentence), or None.

    It does when it is an LMDB environment (holds ``data.mdb`` or ``lock.mdb``), a node's data
    directory (holds ``log.lmdb/`` or ``kv.lmdb/``), or one of the stores directly inside one
    (``log.lmdb``, ``kv.lmdb``, ``snapshots``).  Directories further down, or beside, are not:
    ``/var/lib/pyraft/backups`` is a place for backups.
    """
    d = os.path.abspath(directory)
    for n in _LMDB_FILES:
        if os.path.lexists(os.path.join(d, n)):
            return f"{d} holds {n}: it is an LMDB environment"
    for n in _NODE_DIR_MARKS:
        if os.path.isdir(os.path.join(d, n)):
            return f"{d} holds {n}: it is a node's data directory"
    parent = os.path.dirname(d)
    if os.path.basename(d) in _NODE_DIR_MARKS + ("snapshots",) and parent != d:
        for n in _NODE_DIR_MARKS:
            if os.path.isdir(os.path.join(parent, n)):
                return f"{d} is one of the stores of the node data directory {parent}"
    return None


def check_output_file(path: str, *, force: bool, flag: str = "FILE", protect: Sequence[str] = ()) -> str:
    """The absolute path a tool may write its output file to (``pyraft-inspect snapshot --export``,
    ``pyraft-admin backup``), or a :class:`UsageError`.

    The file's directory must exist.  An existing ``path`` is replaced only with ``force``, and only
    when it is a regular file (or a symbolic link to one): never a directory, device, fifo or socket.
    Never, even a new file, in a directory of a node's stores (:func:`node_store_of`), or inside one
    of the ``protect`` directories (the data directory being read).  Called again just before the
    rename, it also catches what changed meanwhile.
    """
    if not path:
        raise UsageError(f"{flag} must not be empty")
    dest = os.path.abspath(path)
    parent = os.path.dirname(dest)
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        raise UsageError(f"the directory of {path} does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"the directory of {path} is not a directory") from None
    except OSError as e:
        raise UsageError(f"cannot use the directory of {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise UsageError(f"the directory of {path} ({parent}) is not a directory")
    where = [os.path.realpath(parent)]
    try:
        lst = os.lstat(dest)
    except FileNotFoundError:
        lst = None
    except OSError as e:
        raise UsageError(f"cannot use {path}: {e.strerror or e}") from None
    if lst is not None:
        try:
            st = os.stat(dest)
        except OSError:
            raise UsageError(f"{path} is a symbolic link to nothing usable: refusing to replace it") from None
        if not stat.S_ISREG(st.st_mode):
            link = "a symbolic link to " if stat.S_ISLNK(lst.st_mode) else ""
            raise UsageError(f"{path} is {link}a {_file_kind(st.st_mode)}, not a regular file: refusing to "
                             f"replace it")
        if stat.S_ISLNK(lst.st_mode):
            where.append(os.path.dirname(os.path.realpath(dest)))
    guarded = [os.path.realpath(p) for p in protect if p]
    for d in where:
        for g in guarded:
            if d == g or d.startswith(g.rstrip(os.sep) + os.sep):
                raise UsageError(f"{path} is inside the node data directory {g}: refusing to write there")
        store = node_store_of(d)
        if store:
            raise UsageError(f"{path}: {store}: refusing to write there")
    if lst is not None and not force:
        raise UsageError(f"{path} exists (add --force to replace it)")
    return dest


def run_main(prog: str, argv: Sequence[str] | None, body: Callable[[list[str]], int]) -> int:
    """Run ``body(argv)``, turning a UsageError and Ctrl-C into their exit codes (JSON with ``--json``).

    A reader that closes stdout (``| head -3``) ends the command with exit 0: what it did not
    read is not an error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = wants_json(args)
    try:
        rc = body(args)
        sys.stdout.flush()  # here, where a reader gone is seen: not in the interpreter's last flush
        return rc
    except UsageError as e:
        return emit_error(prog, as_json, EXIT_USAGE, e, kind="UsageError", prefix="error: ")
    except KeyboardInterrupt:
        return emit_error(prog, as_json, EXIT_INTERRUPTED, "interrupted", kind="Interrupted")
    except BrokenPipeError:
        # Point stdout at /dev/null: the interpreter flushes it once more on the way out.
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
        return EXIT_OK



# ---------------------------------------------------------------------------
# Output of what came from outside (a node's reply): valid JSON, and no terminal control

def _non_finite(f: float) -> str:
    """How ``--json`` writes the floats JSON has no number for (RFC 8259): as strings."""
    return "NaN" if f != f else ("Infinity" if f > 0 else "-Infinity")


def _json_key(k: Any) -> str:
    """A map key as a JSON object's member name (what ``json.dumps`` makes of it, and bytes in hex)."""
    if isinstance(k, str):
        return k
    if isinstance(k, bool) or k is None:
        return json.dumps(k)
    if isinstance(k, float):
        return repr(k) if math.isfinite(k) else _non_finite(k)
    if isinstance(k, int):
        return str(k)
    if isinstance(k, bytes):
        return k.hex()
    return repr(k)


def json_safe(v: Any) -> Any:
    """``v`` made fit for ``json.dumps(allow_nan=False)``: NaN and the infinities as the strings ``"NaN"``,
    ``"Infinity"`` and ``"-Infinity"``, bytes in hex, tuples as lists, every map key a string (a map
    whose keys would print alike: a list of ``[key, value]`` pairs), anything else as its ``repr``."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else _non_finite(v)
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, dict):
        out = {_json_key(k): json_safe(x) for k, x in v.items()}
        if len(out) == len(v):
            return out
        # Keys that print alike (1 and "1"; b"ab" and "6162"): [key, value] pairs, nothing dropped.
        return [[json_safe(k), json_safe(x)] for k, x in v.items()]
    if isinstance(v, bytes):
        return v.hex()
    return repr(v)


def json_line(result: Any) -> str:
    """What ``--json`` prints for ``result``: valid JSON (RFC 8259) whatever values it holds."""
    return json.dumps(json_safe(result), sort_keys=True, allow_nan=False)


#: Control characters (C0, DEL, C1): a string a node sent is printed with these escaped, so that it
#: cannot move the cursor, retitle the terminal or hide what is printed after it.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)] if chr(c) not in "\t\n"}


def printable(s: Any) -> str:
    """``str(s)`` with its control characters but tab and newline written as ``\\xNN``: safe for a terminal."""
    return str(s).translate(_CONTROL)


if __name__ == "__main__":  # python -m pyraft.tools.cli [--help]: what the tools share
    print(__doc__.strip() + "\n\n" + EXIT_CODES)
