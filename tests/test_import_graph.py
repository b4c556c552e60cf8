"""The modules of src/ssmkit import each other one way: the import graph has no cycles.

Every ``import`` and ``from ... import`` is read with ast, at module level and inside functions alike (an
import hidden in a function to dodge a cycle is still a cycle), except those under ``if TYPE_CHECKING:``.
``from package import name`` points at the submodule when ``name`` is one, else at the package.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import ssmkit

SRC = Path(ssmkit.__file__).resolve().parents[1]

#: cycles known to exist in code owned by other work, to be removed by the lead when fixed:
#: frozenset of module names -> the issue that fixes them. Empty: none found when this test was written.
KNOWN_CYCLES: Dict[frozenset, str] = {}


def _modules() -> Dict[str, Path]:
    found = {}
    for path in (SRC / "ssmkit").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes anywhere in ``tree`` except inside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                targets.add(submodule if submodule in modules else origin)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "ssmkit.models.io" in graph["ssmkit.models.pretrained"]
    assert "ssmkit.compare" in graph["ssmkit.cli"]  # cli imports its commands lazily, inside functions


def test_src_ssmkit_has_no_import_cycles():
    graph = import_graph()
    unexpected = []
    for component in cycles(graph):
        if frozenset(component) in KNOWN_CYCLES:
            continue
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
        unexpected.append("cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(edges))
    assert not unexpected, "\n".join(unexpected)


def test_models_depend_one_way():
    """config -> io -> formats -> pretrained -> model -> checkpoints -> interop: nothing earlier in the chain
    imports a later module. Issue 14 put interop last: the checkpoint formats depend on the model and its
    checkpoints, never the reverse (the format table, models.formats, sits below the model)."""
    graph = import_graph()
    chain = ["ssmkit.models.config", "ssmkit.models.io", "ssmkit.models.formats", "ssmkit.models.pretrained",
             "ssmkit.models.model", "ssmkit.models.checkpoints", "ssmkit.models.interop"]
    for position, module in enumerate(chain):
        later = set(chain[position + 1:])
        members = [m for m in graph if m == module or m.startswith(module + ".")]
        for member in members:
            reached = {t for t in graph[member] if t in later or any(t.startswith(x + ".") for x in later)}
            assert not reached, f"{member} imports {sorted(reached)}, later in the models/ chain"


# --------------------------------------------------------------------------------------------------
# ops/ is the bottom layer, and its functions never hide its modules
# --------------------------------------------------------------------------------------------------
#: what ops/ must never import: the layers and models built on top of it
ABOVE_OPS = ("ssmkit.layers", "ssmkit.models")


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    """``"importer -> imported"`` for every module of ssmkit.ops that imports one of :data:`ABOVE_OPS`."""
    found = []
    for module in sorted(graph):
        if module != "ssmkit.ops" and not module.startswith("ssmkit.ops."):
            continue
        for target in sorted(graph[module]):
            if any(target == above or target.startswith(above + ".") for above in ABOVE_OPS):
                found.append(f"{module} -> {target}")
    return found


def shadowed_modules() -> List[str]:
    """Modules of ssmkit.ops (and of its subpackages) hidden by another object bound to the same name in
    their package, e.g. a function ``ssmkit.ops.hippo`` over the module ``ssmkit/ops/hippo.py``: then
    ``import ssmkit.ops.hippo as h`` and ``ssmkit.ops.hippo.x`` reach the function, not the module."""
    import importlib
    import types

    modules = _modules()
    found = []
    for name in sorted(modules):
        if not name.startswith("ssmkit.ops."):
            continue
        parent_name, child = name.rsplit(".", 1)
        parent = importlib.import_module(parent_name)
        bound = getattr(parent, child, None)  # kernel modules not imported yet are simply absent
        if bound is not None and not (isinstance(bound, types.ModuleType) and bound.__name__ == name):
            found.append(f"{name} is hidden by {parent_name}.{child} = {bound!r}")
    return found


def test_upward_import_finder_finds_one():
    graph = {"ssmkit.ops.a": {"ssmkit.layers.mamba", "ssmkit._checks"}, "ssmkit.layers.mamba": {"ssmkit.ops.a"},
             "ssmkit.ops": {"ssmkit.models"}}
    assert upward_imports(graph) == ["ssmkit.ops -> ssmkit.models", "ssmkit.ops.a -> ssmkit.layers.mamba"]


def test_ops_import_nothing_from_layers_or_models():
    found = upward_imports(import_graph())
    assert not found, "ops/ is the bottom layer; these imports point up:\n    " + "\n    ".join(found)


def test_no_module_of_ops_is_shadowed_by_a_function():
    found = shadowed_modules()
    assert not found, ("name the op packages apart from the functions they export (see ssmkit/ops/__init__.py):"
                       "\n    " + "\n    ".join(found))
