"""The README and docs/ say what the code does: set-up commands, examples, links, the configuration reference."""
from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

pytestmark = pytest.mark.timeout(120)


def _section(path: pathlib.Path, heading: str) -> str:
    """The text under ``heading`` (a whole heading line, e.g. "## Quickstart") up to the next heading of its level."""
    text = path.read_text()
    level = heading.split(" ", 1)[0]
    parts = re.split(rf"^{re.escape(heading)}\n", text, maxsplit=1, flags=re.M)
    assert len(parts) == 2, f"{path.name} has no section {heading!r}"
    return re.split(rf"^{level} ", parts[1], maxsplit=1, flags=re.M)[0]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def _setup_commands() -> list[str]:
    section = _section(README, "## Quickstart")
    return [line.strip() for block in _blocks(section, "sh")
            for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_shows_exactly_two_setup_commands():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    assert "pyraft-kv demo" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _setup_commands()[1] in ci


def test_the_readme_never_sends_users_to_the_package_index():
    # The name pyraft on the public index belongs to an unrelated project.
    text = README.read_text()
    for m in re.finditer(r"pip install\s+pyraft\b", text):
        assert text[max(0, m.start() - 8):m.start()] == "do not `", text[m.start() - 80:m.end()]


# --- the README's Python examples ------------------------------------------------------------


def _run_example(heading: str) -> dict:
    """Execute the first Python block of a README section; return its names (and remove its data directory)."""
    code = _blocks(_section(README, heading), "python")[0]
    ns: dict = {}
    try:
        exec(compile(code, f"README.md ({heading})", "exec"), ns)
    finally:
        if isinstance(ns.get("data"), str):
            shutil.rmtree(ns["data"], ignore_errors=True)
    return ns


def test_the_readme_library_example_writes_and_reads_on_three_nodes():
    ns = _run_example("### Using the library")
    assert ns["node"].state_machine.get("a") == 1
    assert all(r.metrics().state is not None for r in ns["rafts"].values())


def test_the_readme_objects_example_runs_a_call_on_a_one_node_cluster():
    ns = _run_example("### Replicated objects")
    assert ns["inv"].count("bolt") == 10


# --- the own-state-machine guide (docs/library.md) --------------------------------------------


def _guide_namespace() -> dict:
    """Execute the guide's own-state-machine example and return its names."""
    code = _blocks(_section(DOCS / "library.md", "## Your own state machine in LMDB"), "python")[0]
    ns: dict = {}
    exec(compile(code, "docs/library.md (state machine guide)", "exec"), ns)
    return ns


def test_the_guide_lmdb_state_machine_runs_a_cluster_restarts_and_installs_a_snapshot(tmp_path):
    from pyraft import Config, Node, Raft, ServerState
    from pyraft.stores.lmdb import LmdbLogStore
    from pyraft.transports.memory import MemoryNetwork
    from memcluster import wait_until

    Tally = _guide_namespace()["TallyStateMachine"]
    cfg = Config(heartbeat_interval=0.03, election_timeout=(0.25, 0.5), snapshot_every=None,
                 max_in_snapshot_log_to_keep=0, snapshot_chunk_size=64)
    net = MemoryNetwork()
    nodes = {i: Node(f"mem://{i}") for i in (1, 2, 3, 4)}
    rafts: dict = {}

    def start(i):
        d = tmp_path / f"n{i}"
        rafts[i] = Raft(i, cfg, net.transport(i), LmdbLogStore(d), Tally(str(d)))
        return rafts[i]

    try:
        for i in (1, 2, 3):
            start(i)
        rafts[1].initialize({i: nodes[i] for i in (1, 2, 3)})
        leader = wait_until(lambda: next((r for r in rafts.values() if r.is_leader()), None), 10, "a leader")
        totals = [leader.client_write({"add": f"c{i % 3}", "n": i}, timeout=10).result for i in range(30)]
        assert totals[-1] == sum(i for i in range(30) if i % 3 == 2)
        with pytest.raises(ValueError):
            leader.client_write({"add": "x"}, timeout=10)  # a bad command is refused, the node goes on
        # Restart a follower over its directory: the counters and last_applied come back from LMDB.
        f = next(i for i in rafts if i != leader.node_id)
        applied = rafts[f].wait(10).applied_index_at_least(leader.metrics().last_log_index).last_applied
        rafts[f].shutdown()
        rafts[f].log_store.close()
        rafts[f].state_machine.close()
        r = start(f)
        assert r.state_machine.applied_state()[0] == applied
        assert r.state_machine.get("c2") == totals[-1]
        # Snapshot and purge on the leader; a new learner catches up through the snapshot.
        leader.trigger.snapshot()
        leader.wait(10).metrics(lambda m: m.snapshot is not None and m.snapshot.index >= applied.index, "a snapshot")
        wait_until(lambda: leader.trigger.purge_log(applied.index) or leader.metrics().purged, 10, "a purge")
        start(4)
        leader.add_learner(4, nodes[4], blocking=True, timeout=20)
        rafts[4].wait(10).applied_index_at_least(applied.index)
        assert rafts[4].metrics().state == ServerState.LEARNER
        assert rafts[4].state_machine.get("c2") == totals[-1]
        assert rafts[4].metrics().snapshot is not None
    finally:
        for r in rafts.values():
            r.shutdown()
            r.log_store.close()
            r.state_machine.close()
        net.close()


# --- links -----------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _outside_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(path: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", _outside_code(path.read_text()), re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _markdown_files() -> list[pathlib.Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_every_link_between_the_readme_and_docs_resolves():
    """Every relative link in README.md and docs/*.md names a file that exists, and a heading it has."""
    broken = []
    for md in _markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(md.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            where = f"{md.relative_to(ROOT)} -> {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no such heading")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_document_in_docs():
    readme = README.read_text()
    missing = [p.name for p in DOCS.glob("*.md") if f"(docs/{p.name})" not in readme]
    assert not missing, f"README.md's documentation index misses {missing}"


def test_every_docs_file_the_code_cites_exists():
    cited = []
    for top in ("pyraft", "stores", "transports", "tools", "tests"):
        for py in (ROOT / top).rglob("*.py"):
            for name in re.findall(r"\bdocs/([\w.-]+\.md)", py.read_text()):
                if not (DOCS / name).exists():
                    cited.append(f"{py.relative_to(ROOT)}: docs/{name}")
    assert not cited, "cited but missing:\n" + "\n".join(cited)


# --- docs/configuration.md -------------------------------------------------------------------


def _rows(section: str) -> dict[str, str]:
    """``| `name` | default | ... |`` rows of the tables in a section: name -> the default cell."""
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^\| `(\w+)` \| ([^|]*)\|", section, re.M)}


def _documented_default(value) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if callable(value):
        return f"`{value.__module__}.{value.__qualname__}`"
    return f"`{value!r}`"


def _parameters(cls) -> dict[str, object]:
    if dataclasses.is_dataclass(cls):
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = inspect.Parameter.empty
        return out
    return {p.name: p.default for p in inspect.signature(cls).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _configured_classes() -> dict[str, list]:
    from pyraft.kv import KVClient, KVStateMachine
    from pyraft.kv.server import serve_kv
    from pyraft.objects import ObjectStateMachine
    from pyraft.stores.lmdb import LmdbLogStore
    from pyraft.stores.memory import MemoryLogStore, MemoryStateMachine
    from pyraft.transports.memory import MemoryNetwork
    from pyraft.transports.zmq import CurveConfig, ZmqClient, ZmqTransport

    return {"LmdbLogStore": [LmdbLogStore], "KVStateMachine": [KVStateMachine],
            "ObjectStateMachine": [ObjectStateMachine],
            "MemoryLogStore": [MemoryLogStore, MemoryStateMachine], "ZmqTransport": [ZmqTransport],
            "CurveConfig": [CurveConfig], "ZmqClient": [ZmqClient], "MemoryNetwork": [MemoryNetwork],
            "KVClient": [KVClient], "serve_kv": [serve_kv]}


def test_the_configuration_reference_has_every_config_field_with_its_default():
    from pyraft import Config

    rows = _rows(_section(DOCS / "configuration.md", "## Config"))
    want = {name: _documented_default(default) for name, default in _parameters(Config).items()}
    assert set(rows) == set(want), "docs/configuration.md's Config table differs from pyraft/config.py"
    wrong = {name: (rows[name], want[name]) for name in want if rows[name] != want[name]}
    assert not wrong, f"documented vs actual defaults: {wrong}"


def test_the_configuration_reference_has_every_constructor_keyword_with_its_default():
    text = (DOCS / "configuration.md").read_text()
    for heading, classes in _configured_classes().items():
        m = re.search(rf"^### `{heading}`.*?$(.*?)(?=^#)", text, re.S | re.M)
        assert m, f"docs/configuration.md has no section for {heading}"
        rows = _rows(m.group(1))
        want = {}
        for cls in classes:
            want.update({name: _documented_default(default) for name, default in _parameters(cls).items()})
        assert set(rows) == set(want), f"{heading}: documented {sorted(rows)}, actual {sorted(want)}"
        wrong = {name: (rows[name], want[name]) for name in want if rows[name] != want[name]}
        assert not wrong, f"{heading}: documented vs actual defaults: {wrong}"
