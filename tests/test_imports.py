"""The project's imports run one way: scripts -> loop -> methods -> training components -> model -> dropbp.

Read from the source with `ast` (imports inside functions included), so a cycle hidden in a function body is found.
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("dropbp", "lit_gpt", "bench", "eval", "finetune", "scripts")

# The layer of each project module, lowest first; a module may import its own layer or the ones below.
COMPONENTS = {"loss", "schedule", "stream", "parallel", "train_state", "build", "flops"}
LOOP = {"args", "training"}


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] == "dropbp":
        return 0
    if parts[0] == "lit_gpt":
        if len(parts) > 1 and parts[1] == "methods":
            return 3
        if len(parts) > 1 and parts[1] in COMPONENTS:
            return 2
        if len(parts) > 1 and parts[1] in LOOP:
            return 4
        return 1
    return 5  # finetune/, scripts/, eval/, bench/: the entry points


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            if candidate in modules:  # `from pkg import module` names the module, else the package itself
                targets.add(candidate)
                break
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert "lit_gpt.training" in graph
    assert "lit_gpt.methods.dropbp" in graph["lit_gpt.training"] | graph["lit_gpt.methods"]
    assert "dropbp.handler" in graph["dropbp"]


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_module_imports_a_layer_above_it():
    upward = [(name, target) for name, targets in import_graph().items() for target in targets
              if layer(target) > layer(name)]
    assert upward == []


def test_dropbp_is_model_agnostic():
    graph = import_graph()
    assert not any(t.startswith("lit_gpt") for name, ts in graph.items() if name.startswith("dropbp") for t in ts)
