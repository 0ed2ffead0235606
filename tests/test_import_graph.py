"""The package's imports flow one way (docs/architecture.md): no cycle, and no module imports a higher layer.

Every ``import`` statement counts, including those inside functions (a function-level import that dodges a
cycle is still a cycle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import diffrl

PACKAGE = Path(diffrl.__file__).parent

# Lower number = lower layer. A module may import its own layer's other groups only where listed in PEERS.
LAYERS: dict[str, int] = {
    "_version": 0, "samplers": 0, "seeding": 0, "metrics": 0, "run_folder": 0, "checkpoint": 0, "registry": 0,
    "algorithms": 1, "config": 1, "digits": 1,
    "pipelines": 2, "rewards": 2, "prompts": 2, "presets": 2,
    "models": 3, "build": 3, "testing": 3,
    "recipes": 4, "evaluate": 4,
    "commands": 5,
    "cli": 6, "__init__": 6, "__main__": 7,
}
PEERS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("diffrl"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if not base.startswith("diffrl"):
                continue
            for alias in node.names:  # `from diffrl import checkpoint` imports the module diffrl.checkpoint
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _exists(candidate) else base)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        graph[module] = {m for m in _imports(path, module) if m != module and m != "diffrl"}
    return graph


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_group_has_a_layer():
    groups = {_group(m) for m in _graph()}
    assert groups <= set(LAYERS), f"modules outside the layer table: {sorted(groups - set(LAYERS))}"


def test_no_import_goes_up_a_layer():
    bad = []
    for module, targets in _graph().items():
        src = _group(module)
        for target in targets:
            dst = _group(target)
            if src == dst or (src, dst) in PEERS:
                continue
            if LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(sorted(bad))


def test_module_graph_has_no_cycle():
    graph = _graph()
    # Importing a package runs its __init__, so a module importing diffrl.x.y depends on diffrl.x too.
    for module in list(graph):
        for target in list(graph[module]):
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in graph and parent != module and not module.startswith(parent + "."):
                    graph[module].add(parent)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
