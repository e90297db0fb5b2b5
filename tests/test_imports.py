"""The package's modules import one another without a cycle, counting imports inside functions: an import put inside
a function hides a cycle from Python's loader but leaves the modules just as tangled."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"


def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, for its __init__)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside `if TYPE_CHECKING:` (never run, so no import at run time)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its code. `from . import x` imports the
    submodule x, or the package itself where x is a name defined in its __init__."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (the first one again at its end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions_and_relative_imports():
    graph = import_graph()
    assert "pipeline.analysis" in graph["pipeline"]  # `from . import analysis` at the top
    assert "pipeline.cli" in graph["pipeline"]  # `from .cli import ...` inside a function
    assert (
        "pipeline.checkpoints.keymaps" in graph["pipeline.checkpoints.keymaps.nanogpt"]
    )  # `from . import ...` in a subpackage


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.slow
def test_the_public_api_resolves_without_loading_torch():
    code = (
        "import sys, importlib, pipeline\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'dask.distributed') if m in sys.modules)\n"
        "missing = [n for n in pipeline.__all__ if not hasattr(pipeline, n) and n != 'replay']\n"
        "print(heavy, missing)\n"
        "replay = importlib.import_module('pipeline.replay')\n"
        "print(callable(replay.replay), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[] []", "True True"]
    import xarray as xr

    import pipeline
    from pipeline import analysis

    assert set(analysis.__all__) <= set(pipeline.__all__)
    ds = xr.Dataset({"sink_mass": ("step", [0.1])})
    assert isinstance(ds.sinks, pipeline.SinkAccessor)  # the accessor is registered by importing the package


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_cube_schema_is_one_leaf_that_writers_and_readers_share_and_writers_never_reach_analysis():
    graph = import_graph()
    assert graph["pipeline.store.schema"] == set() and graph["pipeline.choices"] == set()
    readers_and_writers = ("pipeline.replay.measure", "pipeline.replay.step", "pipeline.store.cube")
    for module in (*readers_and_writers, "pipeline.analysis.selection", "pipeline.report.page"):
        assert "pipeline.store.schema" in graph[module], module
    for writer in (*readers_and_writers, "pipeline.driver", "pipeline.cluster.dispatch"):
        assert not {m for m in reachable(graph, writer) if m.startswith("pipeline.analysis")}, writer


# The subpackages mirror conf/'s groups, and each may import only the ones below it (and the leaves)
BELOW = {
    "pipeline.checkpoints": set(),  # reading checkpoints: no replay, no store, no cluster, no run
    "pipeline.store": set(),
    "pipeline.replay": {"pipeline.checkpoints", "pipeline.store", "pipeline.settings"},
    "pipeline.cluster": {"pipeline.replay", "pipeline.checkpoints", "pipeline.store", "pipeline.settings"},
    "pipeline.probe": {"pipeline.checkpoints", "pipeline.store"},
    "pipeline.report": {"pipeline.store", "pipeline.analysis", "pipeline.settings"},
}
UPPER = {"pipeline.checkpoints", "pipeline.store", "pipeline.replay", "pipeline.cluster", "pipeline.settings"}
UPPER |= {"pipeline.probe", "pipeline.compare", "pipeline.runs"}
UPPER |= {"pipeline.driver", "pipeline.cli", "pipeline.check", "pipeline.demo", "pipeline.analysis", "pipeline.report"}


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_subpackages_import_only_downwards():
    graph = import_graph()
    for module, targets in graph.items():
        here = package_of(module)
        if here not in BELOW:
            continue
        for target in targets:
            there = package_of(target)
            if there != here and there in UPPER:
                assert there in BELOW[here], f"{module} imports {target}: {here} may import only {BELOW[here]}"


def test_reading_a_cube_and_checking_the_settings_load_no_torch():
    code = (
        "import sys\n"
        "import pipeline.analysis, pipeline.report, pipeline.store.schema, pipeline.choices, pipeline.settings\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
