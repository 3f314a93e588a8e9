"""The house rules, read from the code's own imports (every import, function-level ones included).

* no import circles between modules of ``task/``;
* shared code never imports a method's package (``models/<method>/``), except the method list ``models/available.py``;
* a method never reaches back up: it imports only ``task.common``, the method interface and registry, the shared
  records, the data readers and the scoring settings builder;
* nothing private (a leading underscore) is imported across files;
* no file outside ``models/dmad_video/`` names DMAD-PDM's model attributes or presets.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import REPO

TASK = REPO / "task"
U = "task.anomaly.unsupervised"
METHOD_ALLOWED = (
    "task.common.",
    f"{U}.method",
    f"{U}.models.registry",
    f"{U}.records",
    f"{U}.data.",
    f"{U}.scoring.settings",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names imported from it) for every import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # ``if TYPE_CHECKING:`` imports are for annotations only: they never run
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


MODULES = {module_name(p): p for p in sorted(TASK.rglob("*.py"))}


def resolve(target: str, names: list[str]) -> list[str]:
    """The task modules an import reaches (``from pkg import module`` reaches the module)."""
    reached = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    if target in MODULES and len(reached) < len(names):
        reached.append(target)
    return reached


GRAPH = {
    name: {dep for target, names in imports_of(path) if target.startswith("task") for dep in resolve(target, names)}
    - {name}
    for name, path in MODULES.items()
}


def method_package(module: str) -> str | None:
    match = re.match(rf"{re.escape(U)}\.models\.(\w+)\.", module + ".")
    return match.group(1) if match and match.group(1) not in ("registry", "available") else None


def test_no_import_circles() -> None:
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in GRAPH.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert circles == []


def test_shared_code_never_imports_a_method() -> None:
    wrong = [
        (module, dep)
        for module, deps in GRAPH.items()
        for dep in deps
        if method_package(dep) and method_package(module) != method_package(dep) and module != f"{U}.models.available"
    ]
    assert wrong == []


def test_methods_never_reach_back_up() -> None:
    wrong = [
        (module, dep)
        for module, deps in GRAPH.items()
        if method_package(module)
        for dep in deps
        if method_package(dep) != method_package(module) and not dep.startswith(METHOD_ALLOWED)
    ]
    assert wrong == []


def test_nothing_private_is_imported_across_files() -> None:
    wrong = [
        (module_name(path), target, name)
        for path in MODULES.values()
        for target, names in imports_of(path)
        for name in names
        if target.startswith("task") and name.startswith("_") and name != "__version__"
    ]
    assert wrong == []


def test_only_dmad_pdm_knows_its_model() -> None:
    # its presets, its template store and its DATASET key, named in code outside its package
    needles = re.compile(r"PAPER_PRESETS|\.background\b|DATASET\.background|RAW_SCORES|object_score")
    wrong = []
    for module, path in MODULES.items():
        if method_package(module) == "dmad_video":
            continue
        code = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
        wrong += [(module, line.strip()) for line in code if needles.search(line)]
    assert wrong == []
