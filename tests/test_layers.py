"""The import graph of gig_dist: no circle, and no import from a lower layer to a higher one.

Every import counts, at the top of a module or inside a function (a lazy import is an arrow all
the same); only imports under ``if TYPE_CHECKING:`` (annotations) do not."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

PACKAGE = Path(__file__).resolve().parent.parent / "gig_dist"

#: Layers, lowest first. A module may import its own layer or lower ones. Inside ``stages`` the
#: order is: base, the shared helpers, the stages, the registry, the driver.
LAYERS: list[tuple[str, ...]] = [
    # the dictionaries' registry (``=``: that module alone) names its modules as strings, imported on use
    ("_version", "settings", "_failpoints", "formatting", "=kernels.dictionaries"),
    ("sections",),
    ("config", "kernels", "toy"),
    ("data",),
    ("models",),
    ("store.errors", "store.types", "store.location"),
    ("store.lease", "store.section"),
    ("store.fenced", "store.ownership", "store.meta", "store.samples", "store.concepts", "store.codes", "store.gig",
     "store.atlas"),
    ("store.evaluation",),
    ("store.core",),
    ("store",),
    ("stages.base",),
    ("stages.forward", "stages.coding"),
    ("stages.pairs",),
    ("stages.extract", "stages.sample", "stages.concepts", "stages.decompose", "stages.attribute", "stages.reduce",
     "stages.graphs", "stages.members", "stages.atlas", "stages.evaluate", "stages.sizes"),
    ("stages.registry",),
    ("stages.driver", "stages"),
    ("runtime.address", "runtime.local", "cost", "cluster"),
    ("runtime.ray_runtime",),
    ("runtime",),
    ("pipeline",),
    ("read", "sweep", "plan"),
    ("report",),
    ("cli",),
    ("",),  # the package's own __init__: the public facade
]


def module_names() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts).removesuffix("__init__").rstrip(".")] = path
    return found


def layer_of(module: str) -> int:
    best, rank = -1, None
    for number, names in enumerate(LAYERS):
        for name in names:
            if name.startswith("="):
                if module == name[1:]:
                    return number
                continue
            # the longest name that is the module or a package above it
            if (module == name or module.startswith(name + ".") or name == "") and len(name) > best:
                best, rank = len(name), number
    return rank


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from gig_dist.stages import registry`` imports a module; ``from gig_dist.store
            # import RunStore`` a name of a package
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            if target == "gig_dist" or target.startswith("gig_dist."):
                name = target.removeprefix("gig_dist").lstrip(".")
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: {t for t in imports(path, modules) if t != name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    missing = [name for name in module_names() if layer_of(name) is None]
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = [f"{a or 'gig_dist'} (layer {layer_of(a)}) imports {b or 'gig_dist'} (layer {layer_of(b)})"
              for a, targets in graph().items() for b in targets
              if layer_of(b) > layer_of(a) and not (a and b.startswith(a + "."))]  # a package its own modules
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle():
    edges = graph()
    # A package's __init__ that re-exports its modules is not a circle with them.
    edges = {a: {b for b in targets if not (a and b.startswith(a + "."))} for a, targets in edges.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_the_checks_see_a_circle_and_an_upward_import(monkeypatch):
    """The checks above can fail: a module of the kernels that imports the CLI is both."""
    fake = dict(graph())
    fake["kernels.gig"] = {*fake["kernels.gig"], "cli"}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: fake)
    with pytest.raises(AssertionError, match="kernels.gig .* imports cli"):
        test_no_import_runs_from_a_lower_layer_to_a_higher_one()
    with pytest.raises(AssertionError, match="kernels.gig"):
        test_the_import_graph_has_no_circle()
