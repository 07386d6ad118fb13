"""The data layer's imports: ``ctr_ensemble.data`` depends on nothing else of the package but ``errors`` and
``files``, and its modules import each other without a cycle (read from the source with ``ast``, lazy imports
included)."""

import ast
from pathlib import Path

import ctr_ensemble

ROOT = Path(ctr_ensemble.__file__).parent
ALLOWED_OUTSIDE = {"ctr_ensemble.errors", "ctr_ensemble.files"}  # the base layer below data


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    p = ROOT.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The ctr_ensemble modules a file imports (``from pkg import sub`` counts as ``pkg.sub`` when it is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ctr_ensemble")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ctr_ensemble"):
            subs = {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
            out |= subs or {node.module}
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted((ROOT / "data").rglob("*.py"))}


def test_data_imports_only_errors_from_the_rest_of_the_package():
    outside = {(m, dep) for m, deps in _graph().items() for dep in deps
               if not dep.startswith("ctr_ensemble.data") and dep not in ALLOWED_OUTSIDE}
    assert not outside, f"ctr_ensemble.data imports from outside the data layer: {sorted(outside)}"


def test_data_modules_import_each_other_without_a_cycle():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph.get(m, ())):
            if dep not in graph:
                continue
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path[path.index(dep):] + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
