"""The house's one-way layers: each package imports only from its own layer or the layers below it, and no module
imports itself back through others (no import loop). Read from the source, as a newcomer would read it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "neftlab"
# From the ground up; a module's layer is its package's, and the command lines at the package root are the top;
# `api` (a training script's own entry, neftlab.noise_for) sits right above the methods it hands out.
LAYERS = [("core",), ("config",), ("data", "models", "tracking"), ("methods",), ("api",), ("evaluation",), ("run",), ("sweep",),
          ("analysis",), ("__main__", "report", "judge", "evaluate", "export", "workspace")]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(LAYERS) if top in names), -1)


def imports(path: Path) -> set[str]:
    """The neftlab modules a file imports, anywhere in it (a lazy import counts too)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("neftlab"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("neftlab"))
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in ROOT.rglob("*.py")}


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer(m) < 0 and m != "neftlab"] == []


def test_imports_go_only_downward():
    upward = sorted(f"{m} -> {t}" for m, targets in graph().items() for t in targets
                    if m != "neftlab" and layer(t) > layer(m))
    assert upward == []


def test_no_import_loop():
    edges = graph()
    # An import of a package runs its __init__, which imports its modules: a package depends on what it re-exports.
    seen, loops = {}, []

    def visit(node, stack):
        seen[node] = "open"
        for target in sorted(edges.get(node, ())):
            if seen.get(target) == "open":
                loops.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in seen:
                visit(target, stack + [target])
        seen[node] = "done"

    for node in sorted(edges):
        if node not in seen:
            visit(node, [node])
    assert loops == []


def test_no_module_holds_more_than_about_400_lines():
    assert {module_name(p): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420} == {}
