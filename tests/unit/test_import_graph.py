"""The import graph of dfr_core, pipeline and jobs: no circles, and arrows only one way.

Data flows cli -> job -> stages -> core: `dfr_core` imports nothing of `pipeline` or `jobs`, and
nothing imports `jobs` (thin scheduled entry points). Every import statement counts, including
function-local ones and those under ``if TYPE_CHECKING:``: a "local import to break a cycle" is
still a cycle in what a reader has to hold in their head.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dfr_core", "pipeline", "jobs")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {
        _module_name(p, root): p
        for package in packages
        for p in (root / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def _imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name an import statement of the module can refer to (absolute)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                up = parts[: len(parts) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's own __init__ excluded)."""
    modules = _modules(root, packages)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {resolve(n) for n in _imported_names(module, path)} - {None, module}
        # a submodule importing its own package's __init__ is not an arrow back
        graph[module] = {t for t in targets if not module.startswith(f"{t}.")}
    return graph


def test_the_walker_sees_the_modules_and_their_imports():
    graph = import_graph()
    assert "dfr_core.model" in graph and "pipeline.score_job" in graph
    assert "jobs.nightly" in graph
    assert "dfr_core.config" in graph["dfr_core.model"]


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of the graph, or [] when there is none."""
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return []


def test_no_import_circles():
    circle = find_circle(import_graph())
    assert not circle, f"import circle: {' -> '.join(circle)}"


def test_imports_run_one_way():
    wrong = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            if target.startswith("jobs") and not module.startswith("jobs"):
                wrong.append(f"{module} imports {target} (nothing imports jobs/)")
            if module.startswith("dfr_core") and not target.startswith("dfr_core"):
                wrong.append(f"{module} imports {target} (dfr_core imports only itself)")
    assert not wrong, wrong


def test_a_local_import_circle_is_caught(tmp_path):
    """The check can fail: a circle closed by a function-local, relative import is reported."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    for init in ("pkg/__init__.py", "pkg/sub/__init__.py"):
        (tmp_path / init).write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.sub import b\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert "pkg.sub.b" in graph["pkg.a"] and graph["pkg.sub.b"] == {"pkg.a"}
    assert set(find_circle(graph)) == {"pkg.a", "pkg.sub.b"}


def test_every_package_folder_has_an_init():
    """A folder of modules without __init__.py becomes a namespace package: its names do not
    import ("unknown location") and a package build may leave it out."""
    missing = [
        str(folder.relative_to(ROOT))
        for package in PACKAGES
        for folder in [ROOT / package, *(ROOT / package).rglob("*")]
        if folder.is_dir() and any(folder.glob("*.py")) and not (folder / "__init__.py").exists()
    ]
    assert not missing, missing
