"""The package's shape: no import cycle (imports inside functions count), imports point one way down the layers,
no C++ inside Python files, and modules and functions of the engine's core stay small enough to read."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tokenloom"

# Top to bottom; a module may import from its own layer (no cycles) and from any layer below it.
LAYERS = [
    ("cli",),
    ("bench", "eval"),
    ("entrypoints", "ttc"),
    ("engine",),
    ("core",),
    ("worker",),
    ("spec_decode", "quant", "lora"),
    ("model_executor",),
    ("sample", "structured_output"),
    ("kernels", "loader", "gguf", "tokenizer", "distributed"),
    ("config", "sampling_params", "version"),
]
SMALL = ("engine", "core", "worker", "model_executor", "sample")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> tokenloom modules it imports anywhere in its body (top level, functions, methods)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package root (lazy public API) and __main__ sit above every layer
    for rank, names in enumerate(LAYERS):
        if parts[1] in names:
            return rank
    return None


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_subpackage_has_a_layer():
    unplaced = {m.split(".")[1] for m in _modules() if m.count(".") >= 1 and layer_of(m) is None}
    assert unplaced <= {"__main__"}, f"add these to LAYERS: {sorted(unplaced)}"


def test_imports_point_down_the_layers():
    upward = []
    for module, deps in import_graph().items():
        rank = layer_of(module)
        if rank is None:
            continue
        for dep in deps:
            dep_rank = layer_of(dep)
            if dep_rank is not None and dep_rank < rank:
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(sorted(upward))


def test_no_cpp_in_python_files():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "#include <" in p.read_text() or "PYBIND11_MODULE" in p.read_text()]
    assert not offenders, f"C++ belongs in tokenloom/csrc/*.cpp: {offenders}"


@pytest.mark.parametrize("package", SMALL)
def test_small_modules_and_functions(package):
    too_long = []
    for path in (PACKAGE / package).rglob("*.py"):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)
