"""The package's layers only look down: read every import of caspl/ with `ast` (function-level imports included)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "caspl"
# lower number = lower layer; a module may import its own layer or below, never above
LEVELS = {
    "caspl": 0, "errors": 0, "artifacts": 0, "ray_env": 0, "startup": 0, "procfs": 0,
    "config": 1, "models": 1, "data": 1,
    "distill": 2,
    "methods": 3,
    "train": 4,
    "study": 5,
    "commands": 6, "cli": 6,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every caspl import in `module`."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "caspl"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "caspl":
            assert node.level == 0, f"{module}: use absolute imports"
            submodules = [n.name for n in node.names if f"{node.module}.{n.name}" in MODULES]
            out += [(f"{node.module}.{n}", []) for n in submodules]
            names = [n.name for n in node.names if n.name not in submodules]
            if names:
                out.append((node.module, names))
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    return LEVELS[parts[1] if len(parts) > 1 else parts[0]]


def test_every_module_has_a_layer():
    assert all(_layer(m) is not None for m in MODULES)


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{m} -> {target}" for m in MODULES for target, _ in _imports(m) if _layer(target) > _layer(m)]
    assert not upward, upward


def test_no_private_name_is_imported_from_another_module():
    private = [f"{m}: {name} from {target}" for m in MODULES for target, names in _imports(m) for name in names
               if name.startswith("_") and not name.startswith("__") and target != m]
    assert not private, private


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    circles, index, low, stack, on_stack, counter = [], {}, {}, [], set(), [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_no_import_circle():
    graph = {m: {t for t, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    assert not _circles(graph), _circles(graph)


def test_the_checks_see_a_violation_when_there_is_one(tmp_path, monkeypatch):
    """The reader itself works: a planted upward import, private import and circle are all found."""
    fake = {"caspl.models.x": tmp_path / "x.py", "caspl.train.y": tmp_path / "y.py"}
    fake["caspl.models.x"].write_text("from caspl.train.y import _helper\n")
    fake["caspl.train.y"].write_text("def f():\n    import caspl.models.x\n")
    monkeypatch.setattr(__import__(__name__), "MODULES", fake)
    assert _imports("caspl.models.x") == [("caspl.train.y", ["_helper"])]
    assert _layer("caspl.train.y") > _layer("caspl.models.x")
    assert _imports("caspl.train.y") == [("caspl.models.x", [])]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
