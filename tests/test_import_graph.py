"""The import graph follows the data flow, and the entrance of the data path never loads torch.

`LAYERS` lists esperd's modules from the bottom (the wire contract, then config) to the top (the
service wiring, then the command line), in the order a health packet flows through them. A module
may import only modules of its own layer or of a lower one; the graph has no cycles. The graph is
read from the source (every import statement, also those inside functions and under
TYPE_CHECKING), so a lazy import cannot hide an edge.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Import name -> source directory (contracts/ installs as esperd_contracts: pyproject.toml).
PACKAGES = {"esperd_contracts": "contracts", "esperd": "esperd"}

#: Bottom to top. A name covers the module and everything under it, unless a longer name
#: listed elsewhere claims a part (esperd.policy.config sits with the config, the rest of
#: esperd.policy above the analyzer).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("wire contract", ("esperd_contracts",)),
    ("host side", ("esperd.client",)),
    ("foundation", ("esperd", "esperd.section", "esperd.lazy", "esperd.logs")),
    (
        "config",
        (
            "esperd.config",
            "esperd.analyzer.config",
            "esperd.policy.config",
            "esperd.learn.config",
            "esperd.sim.config",
        ),
    ),
    ("intake", ("esperd.bus", "esperd.intake", "esperd.runs")),
    ("analyzer", ("esperd.analyzer",)),
    ("scheduler", ("esperd.scheduler", "esperd.rails")),
    ("policy", ("esperd.policy",)),
    ("decisions", ("esperd.decisions",)),
    ("learner (side path)", ("esperd.learn",)),
    ("operations", ("esperd.ops",)),
    ("offline tools", ("esperd.sim", "esperd.train")),
    ("service", ("esperd.service",)),
    ("command line", ("esperd.cli",)),
]

#: Modules whose import must not load torch (nor the policy networks): the entrance of the data
#: path and what every process reads first.
TORCH_FREE = (
    "esperd_contracts",
    "esperd.config",
    "esperd.intake",
    "esperd.bus",
    "esperd.runs",
    "esperd.scheduler",
    "esperd.rails",
    "esperd.analyzer",
    "esperd.policy.config",
    "esperd.learn.config",
    "esperd.learn.rewards",
    "esperd.sim.config",
)


def module_name(package: str, path: Path) -> str:
    parts = [package, *path.relative_to(ROOT / PACKAGES[package]).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name."""
    return {
        module_name(package, path): path
        for package, directory in PACKAGES.items()
        for path in sorted((ROOT / directory).rglob("*.py"))
    }


def imported_names(tree: ast.AST) -> Iterator[tuple[str, str | None]]:
    """(module, name imported from it or None) for every import statement anywhere in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.module, alias.name


def resolve(module: str, name: str | None, modules: dict[str, Path]) -> str | None:
    """The esperd/esperd_contracts module an import really reaches (None: outside them).

    `from pkg import sub` reaches the submodule; `from pkg import Name` of a lazy package
    (esperd.lazy) reaches the submodule its export map names."""
    if module.split(".")[0] not in PACKAGES:
        return None
    if name is not None and f"{module}.{name}" in modules:
        return f"{module}.{name}"
    if name is not None and modules.get(module, Path()).name == "__init__.py":
        exports = getattr(importlib.import_module(module), "_EXPORTS", {})
        if name in exports:
            return f"{module}.{exports[name]}"
    return module


def import_graph() -> nx.DiGraph:
    modules = source_modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for source, path in modules.items():
        for module, name in imported_names(ast.parse(path.read_text(encoding="utf-8"))):
            target = resolve(module, name, modules)
            if target is not None and target != source:
                graph.add_edge(source, target)
    return graph


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest listed name that covers `module`; -1 if none does."""
    best, best_len = -1, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in source_modules() if layer_of(m) < 0)
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_no_module_imports_one_later_in_the_flow() -> None:
    upward = []
    for source, target in import_graph().edges:
        if layer_of(target) > layer_of(source):
            upward.append(
                f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
            )
    assert not upward, "imports against the data flow:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_layer_check_sees_an_upward_import() -> None:
    """The check itself: an edge from the config up to the service would be reported."""
    assert layer_of("esperd.service") > layer_of("esperd.config")
    assert layer_of("esperd.policy.config") < layer_of("esperd.policy.gnn")
    tree = ast.parse("def f():\n    from esperd.service import Service\n")
    assert list(imported_names(tree)) == [("esperd.service", "Service")]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_importing_leaves_torch_unloaded(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in ('torch', 'torch_geometric', 'esperd.learn.learner', 'esperd.policy.gnn') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", f"importing {module} loaded {out.stdout.strip()}"


def documented_layers() -> list[tuple[str, tuple[str, ...]]]:
    """The layer table of docs/ARCHITECTURE.md (between its `layers` markers), as LAYERS spells it."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("<!-- layers:", 1)[1].split("<!-- /layers -->", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # skip the header row
    layers = []
    for row in rows:
        layer, modules = (cell.strip() for cell in row.strip("|").split("|"))
        layers.append((layer, tuple(name.strip().strip("`") for name in modules.split(","))))
    return layers


def test_the_architecture_doc_shows_these_layers() -> None:
    """docs/ARCHITECTURE.md is the map a newcomer reads: it must be the graph this test enforces."""
    assert documented_layers() == LAYERS
