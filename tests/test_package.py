"""The package as a whole: no import cycles, and light imports for the command line."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "anomalib_adfa"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in ``tree`` (functions included), except under ``if TYPE_CHECKING``."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found.update(submodules or {node.module})
        stack.extend(ast.iter_child_nodes(node))
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: _imports(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in path:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in done:
                visit(target, [*path, target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [name])
    assert graph["anomalib_adfa.lightning_model"], "the import graph is empty: the parser found no imports"
    assert not cycles, cycles


def test_command_line_and_kernel_modules_stay_light() -> None:
    probe = (
        "import sys, anomalib_adfa, anomalib_adfa.cli; "
        "print(sorted(name for name in ('torch', 'anomalib', 'lightning') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# Imports every module of the package, builds a model, and names every anomalib class attribute whose code is ours.
UNTOUCHED = """
import importlib, pkgutil
import anomalib_adfa
from anomalib.cli import AnomalibCLI
from anomalib.data import AnomalibDataModule
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from lightning.pytorch import LightningModule, Trainer

for module in pkgutil.walk_packages(anomalib_adfa.__path__, "anomalib_adfa."):
    importlib.import_module(module.name)
anomalib_adfa.Adfa(backbone="tf_efficientnet_lite0", pre_trained=False)
classes = (AnomalibCLI, AnomalibDataModule, Engine, AnomalibModule, LightningModule, Trainer)
print([f"{cls.__name__}.{name}" for cls in classes for name, value in vars(cls).items()
       if "anomalib_adfa" in getattr(getattr(value, "__code__", None), "co_filename", "")])
"""


def test_importing_the_package_and_building_adfa_leave_anomalib_classes_alone() -> None:
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", UNTOUCHED], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
