"""The import graph of `ldm`, `autoencoder` and `conditioning`: no cycle, no import upward, a light diffusion core.

The graph is read from the source with `ast`, never by importing anything. Every `import x` and `from x import y`
anywhere in a file counts: at module level, inside functions (a deferred import still runs) and under
`if TYPE_CHECKING:`.

Nodes. Each .py file is one module, named as Python names it: ldm/generation/request.py is `ldm.generation.request`,
a package's __init__.py is the package (ldm/generation/__init__.py is `ldm.generation`).

Edges. Relative imports are resolved against the importing module's package. `import a.b.c` is an edge to `a.b.c`.
`from a.b import c` is an edge to the submodule `a.b.c` when that module exists, else to `a.b` (a name defined in,
or re-exported by, a/b/__init__.py). A package's __init__ is a node like any other, with its explicit edges only:
importing `ldm.generation.request` also runs ldm/__init__.py and ldm/generation/__init__.py first, but those
implicit parent imports are not edges (with them, every package whose __init__ imports a submodule would be a
cycle by construction). Python initialises a parent before its child, so a package's __init__ can only take part in
a real cycle through an import it or a module makes explicitly, and those are edges: `from ldm.generation import X`
in a submodule is an edge to the package, a cycle as soon as the package's __init__ imports that submodule at run
time. Today's lazy PEP 562 exporters add no such cycle: ldm/generation/__init__.py imports its submodules under
TYPE_CHECKING only (at run time through `importlib.import_module`, which is no import statement), and
ldm/__init__.py's `import ldm.generation` inside `__getattr__` is an edge, but no ldm.generation module imports
`ldm`. A module importing itself (`from . import name` in an __init__) is not an edge. Imports of anything outside
the three packages are kept apart, for the third check.

1. No cycle among modules. TYPE_CHECKING-only imports are left out of this check, and only of this one: they
   never run (`typing.TYPE_CHECKING` is False at run time, and with `from __future__ import annotations` the
   annotations that use them are never evaluated), so they cannot leave a module partially initialised, and
   they are the standard way for a module to name in its annotations the type of the module that imports it
   (ldm/generation/run.py names `LatentDiffusionPipeline`, whose module imports run.py). With them counted the
   graph has exactly that cycle, ldm.generation.pipeline -> ldm.generation.run -> ldm.generation.pipeline
   (ldm/generation/run.py:30). Imports inside functions do run, so they count.
2. Layers (`LAYERS`, lowest first): a module may import its own layer and lower layers only, TYPE_CHECKING imports
   included (an annotation naming a higher layer's type is still a dependency on it).
3. ldm/diffusion imports only the standard library, torch, numpy, einops, tqdm and ldm.diffusion itself.

The graph is built by plain functions over a folder, so the last tests run the same checks on small fake packages
written under tmp_path and show that a cycle and an upward import are caught.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "autoencoder", "conditioning")

# Lowest first: a module may import only its own layer and the layers listed before it. "pkg.*" is the package
# pkg (its __init__) and every module under it; a name without ".*" is that one module (the most specific wins).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stage 1 and the text side", ("conditioning.*", "autoencoder.*")),  # import no ldm module at all
    ("the diffusion math", ("ldm.diffusion.*",)),  # imports no other ldm package
    ("building blocks", ("ldm.config", "ldm.images", "ldm.toy", "ldm.unet", "ldm.data.*")),
    # `ldm` is ldm/__init__.py alone: a lazy re-export of ldm.generation's names (ldm.serve imports it for
    # __version__).
    ("generation", ("ldm.generation.*", "ldm")),
    # One layer, because each imports the other (and no module cycle results): ldm/evaluation/heldout.py
    # imports the two stages' configs (ldm.training.autoencoder_config, .diffusion_config) inside a function,
    # and ldm/training/diffusion_stage.py imports ldm.evaluation.text_pathway for its validation logs.
    ("evaluation and training", ("ldm.evaluation.*", "ldm.training.*")),
    ("serving", ("ldm.serve.*",)),
    ("the command line", ("ldm.commands.*", "ldm.cli", "ldm.__main__")),
)

# What ldm/diffusion may import besides the standard library and itself (the README says the same).
DIFFUSION_THIRD_PARTY = frozenset({"torch", "numpy", "einops", "tqdm"})


@dataclass(frozen=True)
class Edge:
    source: str  # the importing module
    target: str  # the imported module (one of the graph's modules)
    path: Path  # the importing file
    line: int
    type_checking: bool  # under `if TYPE_CHECKING:`

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


@dataclass(frozen=True)
class External:
    source: str
    name: str  # the top-level name of what is imported (e.g. "torch" for `from torch.nn import functional`)
    path: Path
    line: int


@dataclass(frozen=True)
class Graph:
    modules: Mapping[str, Path]  # module name -> file
    edges: tuple[Edge, ...]
    externals: tuple[External, ...]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement in the tree, anywhere, with whether it sits under `if TYPE_CHECKING:`."""

    def visit(node: ast.AST, type_checking: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, type_checking
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, type_checking)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, type_checking)

    return visit(tree, False)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level - 1 >= len(package):
        raise ValueError(f"{importer}: relative import beyond the top-level package (level {node.level})")
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _existing(name: str, modules: Mapping[str, Path]) -> str:
    """`name`, or its longest prefix that is a module (`import a.b.c` of a missing a.b.c still runs a.b)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def build_graph(root: Path, packages: Sequence[str]) -> Graph:
    """The import graph of the packages (folders directly under root), read with ast."""
    files = sorted(path for package in packages for path in (root / package).rglob("*.py"))
    modules = {module_name(path, root): path for path in files}
    edges: list[Edge] = []
    externals: list[External] = []
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, type_checking in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _absolute(node, source, is_package)
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            for target in targets:
                if target.split(".")[0] not in packages:
                    externals.append(External(source, target.split(".")[0], path, node.lineno))
                    continue
                resolved = _existing(target, modules)
                if resolved and resolved != source:
                    edges.append(Edge(source, resolved, path, node.lineno, type_checking))
    # `from a import b, c` of two names of one module is one edge; a set would lose the files' order.
    return Graph(modules, tuple(dict.fromkeys(edges)), tuple(dict.fromkeys(externals)))


def find_cycles(edges: Iterable[Edge]) -> list[list[Edge]]:
    """One cycle (as the edges along it) per strongly connected component that has one (Tarjan, then BFS)."""
    out: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        out.setdefault(edge.source, {}).setdefault(edge.target, edge)
    nodes = sorted(set(out) | {target for targets in out.values() for target in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # recursive Tarjan; the graphs here are a few hundred nodes
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(out.get(node, {})):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in nodes:
        if node not in index:
            connect(node)

    cycles = []
    for component in components:
        start = min(component)
        previous: dict[str, Edge] = {}
        frontier = [start]
        while frontier and start not in previous:  # shortest way back to start inside the component
            following = []
            for node in frontier:
                for target in sorted(out.get(node, {})):
                    if target in component and target not in previous:
                        previous[target] = out[node][target]
                        following.append(target)
            frontier = following
        path, node = [], start
        while True:
            path.append(previous[node])
            node = previous[node].source
            if node == start:
                break
        cycles.append(path[::-1])
    return sorted(cycles, key=lambda cycle: cycle[0].source)


def describe_cycle(cycle: Sequence[Edge], root: Path) -> str:
    steps = " -> ".join(f"{edge.source} ({edge.where(root)})" for edge in cycle)
    return f"{steps} -> {cycle[0].source}"


def layer_of(module: str, layers: Sequence[tuple[str, Sequence[str]]]) -> int | None:
    """The index of the layer whose entry names module ("pkg.*" or the exact name), the most specific entry winning."""
    best: tuple[int, int] | None = None  # (length of the entry, layer)
    for number, (_, entries) in enumerate(layers):
        for entry in entries:
            package = entry.removesuffix(".*")
            covers = module == package or (entry.endswith(".*") and module.startswith(package + "."))
            if covers and (best is None or len(package) > best[0]):
                best = (len(package), number)
    return None if best is None else best[1]


def unlayered(graph: Graph, layers: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    return sorted(module for module in graph.modules if layer_of(module, layers) is None)


def layer_violations(graph: Graph, layers: Sequence[tuple[str, Sequence[str]]], root: Path) -> list[str]:
    problems = []
    for edge in graph.edges:
        source, target = layer_of(edge.source, layers), layer_of(edge.target, layers)
        if source is not None and target is not None and target > source:
            kind = " (under TYPE_CHECKING)" if edge.type_checking else ""
            problems.append(
                f"{edge.where(root)}: {edge.source} ({layers[source][0]}) imports {edge.target} "
                f"({layers[target][0]}), a higher layer{kind}"
            )
    return sorted(problems)


def runtime_edges(graph: Graph) -> list[Edge]:
    return [edge for edge in graph.edges if not edge.type_checking]


GRAPH = build_graph(ROOT, PACKAGES)


def test_the_graph_sees_the_packages():
    # Guards the reader itself: the modules are found and known imports of each kind are edges.
    assert {"ldm", "ldm.generation", "ldm.generation.request", "ldm.diffusion", "conditioning"} <= set(GRAPH.modules)
    pairs = {(edge.source, edge.target, edge.type_checking) for edge in GRAPH.edges}
    assert ("ldm.generation.pipeline", "ldm.generation.run", False) in pairs  # module level
    assert ("ldm.generation.run", "ldm.generation.pipeline", True) in pairs  # under TYPE_CHECKING
    assert ("ldm", "ldm.generation", False) in pairs  # `import ldm.generation` inside __getattr__
    assert ("ldm.evaluation.heldout", "ldm.training.diffusion_config", False) in pairs  # inside a function


def test_no_import_cycle():
    cycles = find_cycles(runtime_edges(GRAPH))
    assert not cycles, "import cycles (each edge's file:line):\n" + "\n".join(
        describe_cycle(cycle, ROOT) for cycle in cycles
    )


def test_every_module_is_in_a_layer():
    missing = unlayered(GRAPH, LAYERS)
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    problems = layer_violations(GRAPH, LAYERS, ROOT)
    assert not problems, "\n".join(problems)


def test_only_the_command_line_imports_ldm_commands():
    command_line = ("ldm.cli", "ldm.__main__")
    problems = [
        f"{edge.where(ROOT)}: {edge.source} imports {edge.target}"
        for edge in GRAPH.edges
        if (edge.target == "ldm.commands" or edge.target.startswith("ldm.commands."))
        and not (
            edge.source in command_line or edge.source == "ldm.commands" or edge.source.startswith("ldm.commands.")
        )
    ]
    assert not problems, "\n".join(problems)


def test_diffusion_imports_only_the_standard_library_torch_numpy_einops_tqdm_and_itself():
    inside = [edge for edge in GRAPH.edges if edge.source.split(".")[:2] == ["ldm", "diffusion"]]
    problems = [
        f"{edge.where(ROOT)}: {edge.source} imports {edge.target}"
        for edge in inside
        if edge.target.split(".")[:2] != ["ldm", "diffusion"]
    ]
    allowed = set(sys.stdlib_module_names) | DIFFUSION_THIRD_PARTY
    problems += [
        f"{external.path.relative_to(ROOT)}:{external.line}: {external.source} imports {external.name}"
        for external in GRAPH.externals
        if external.source.split(".")[:2] == ["ldm", "diffusion"] and external.name not in allowed
    ]
    assert not problems, "\n".join(sorted(problems))


# The checks on fake packages: they must catch what they exist to catch.


def write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


FAKE_LAYERS = (("low", ("low.*",)), ("high", ("high.*",)))


def test_a_fake_cycle_and_a_fake_upward_import_are_caught(tmp_path):
    write(
        tmp_path,
        {
            "low/__init__.py": "",
            "low/base.py": "def f():\n    from high.a import A  # upward, inside a function\n",
            "high/__init__.py": "",
            "high/a.py": "from .b import B\nA = 1\n",  # relative
            "high/b.py": "from high import a\nB = 2\n",  # `from pkg import submodule`
        },
    )
    graph = build_graph(tmp_path, ("low", "high"))
    cycles = find_cycles(runtime_edges(graph))
    assert [describe_cycle(cycle, tmp_path) for cycle in cycles] == [
        "high.a (high/a.py:1) -> high.b (high/b.py:1) -> high.a"
    ]
    assert layer_violations(graph, FAKE_LAYERS, tmp_path) == [
        "low/base.py:2: low.base (low) imports high.a (high), a higher layer"
    ]


def test_type_checking_imports_count_for_layers_but_not_for_cycles(tmp_path):
    write(
        tmp_path,
        {
            "low/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from high import H\n",
            "high/__init__.py": "from low import L\nH = 1\n",
        },
    )
    graph = build_graph(tmp_path, ("low", "high"))
    assert not find_cycles(runtime_edges(graph))
    assert [describe_cycle(cycle, tmp_path) for cycle in find_cycles(graph.edges)] == [
        "high (high/__init__.py:1) -> low (low/__init__.py:3) -> high"
    ]
    assert layer_violations(graph, FAKE_LAYERS, tmp_path) == [
        "low/__init__.py:3: low (low) imports high (high), a higher layer (under TYPE_CHECKING)"
    ]


def test_a_package_init_and_its_submodule_form_a_cycle_only_through_explicit_imports(tmp_path):
    write(
        tmp_path,
        {
            # A lazy exporter by name (as ldm/generation/__init__.py): no import statement, so no edge to its
            # submodules, and they may import the package's names.
            "lazy/__init__.py": "import importlib\ndef __getattr__(name):\n    return importlib.import_module(name)\n",
            "lazy/a.py": "from lazy import something\nimport lazy.b\n",  # edges to `lazy` and `lazy.b`, no parents
            "lazy/b.py": "",
            # An exporter importing inside a function (as ldm/__init__.py): that import runs, so it is an edge.
            "deferred/__init__.py": "def __getattr__(name):\n    import deferred.a\n\n    return deferred.a\n",
            "deferred/a.py": "import deferred\n",
            # An eager exporter whose submodule imports the package.
            "eager/__init__.py": "from .a import A\nfrom . import helper\n",  # `from . import` a non-module: no edge
            "eager/a.py": "from eager import B\nA = 1\n",
        },
    )
    graph = build_graph(tmp_path, ("lazy", "deferred", "eager"))
    assert {(edge.source, edge.target) for edge in graph.edges} == {
        ("lazy.a", "lazy"),
        ("lazy.a", "lazy.b"),
        ("deferred", "deferred.a"),
        ("deferred.a", "deferred"),
        ("eager", "eager.a"),
        ("eager.a", "eager"),
    }
    assert [describe_cycle(cycle, tmp_path) for cycle in find_cycles(graph.edges)] == [
        "deferred (deferred/__init__.py:2) -> deferred.a (deferred/a.py:1) -> deferred",
        "eager (eager/__init__.py:1) -> eager.a (eager/a.py:1) -> eager",
    ]
    assert unlayered(graph, FAKE_LAYERS) == sorted(graph.modules)
