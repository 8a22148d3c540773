"""The package's import rules, as a test (REDESIGN.md, "Import rules").

An AST scan of every module of ``python/mlx_robust/``: no source is imported or run. Imports under
``if TYPE_CHECKING:`` are ignored (they never run); imports inside functions are counted like any
other, so a circle cannot hide behind them. Today's violations are listed below as exceptions;
each restructuring step deletes the ones it fixes, and a listed exception that no longer occurs
fails the test, so the lists only shrink.
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "python" / "mlx_robust"
ROOT = "mlx_robust"

# Layer of each module, lowest first; a module may import its own layer and the ones below it.
# The engine bridge and the leaf helpers form the bottom layer.
BOTTOM = {"_core", "_functional", "_engines", "_checks", "_compat", "_files", "validation", "models", "datasets", "graph"}
LAYERS = {
    "bottom": 0,
    "attacks": 1,
    "defences": 1,
    "robust_model": 2,
    "training": 3,
    "evaluation": 3,
    "cli": 4,
    "root": 5,
}
# Top-level module or package -> layer (old flat modules sit in the layer of the package they move to).
GROUP = {
    "attacks": "attacks",
    "defences": "defences",
    "smoothing": "defences",
    "distillation": "defences",
    "model": "robust_model",
    "robust_model": "robust_model",
    "adversarial": "training",
    "trainer": "training",
    "training": "training",
    "distributed": "training",
    "evaluate": "evaluation",
    "evaluation": "evaluation",
    "cli": "cli",
}
# RobustModel's private attributes and methods: only model.py may touch them.
ROBUST_MODEL_PRIVATES = {
    "_fn", "_smooth_fn", "_num_classes", "_logits", "_defended_logits", "_base_predict", "_attack",
    "_low_precision_result",
}

# ---- today's violations; each step deletes the ones it fixes -------------------------------------
# (importer, imported) pairs that break a layer rule.
LAYER_EXCEPTIONS: set[tuple[str, str]] = set()
# module -> number of mlx_robust imports inside its functions.
FUNCTION_IMPORT_EXCEPTIONS: dict[str, int] = {}
# module -> number of reads of RobustModel's private attributes.
PRIVATE_READ_EXCEPTIONS: dict[str, int] = {}
# (importer, module, name) imports of another module's private name.
PRIVATE_NAME_EXCEPTIONS: set[tuple[str, str, str]] = set()
# Edges ignored by the circle check (each is also a listed exception above).
CYCLE_EXCEPTIONS: set[tuple[str, str]] = set()
# -------------------------------------------------------------------------------------------------


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


class _Import:
    def __init__(self, importer: str, target: str, name: str | None, in_function: bool, line: int):
        self.importer, self.target, self.name, self.in_function, self.line = importer, target, name, in_function, line


def _imports(module: str, tree: ast.AST, is_package: bool) -> list[_Import]:
    """Every import of an ``mlx_robust`` module, with its resolved target module."""
    found: list[_Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_one(sub, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(child: ast.AST, in_function: bool) -> None:
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.Import):
            for alias in child.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    found.append(_Import(module, alias.name, None, in_function, child.lineno))
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (child.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == ROOT or base.startswith(ROOT + "."):
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if _exists(sub):  # `from mlx_robust import attacks` imports the submodule
                        found.append(_Import(module, sub, None, in_function, child.lineno))
                    else:
                        found.append(_Import(module, base, alias.name, in_function, child.lineno))
        visit(child, inner)

    visit(tree, False)
    return found


def _exists(module: str) -> bool:
    rel = pathlib.Path(*module.split(".")[1:])
    if module.split(".")[1:] == ["_core"]:
        return True  # the compiled extension
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _scan():
    imports: list[_Import] = []
    private_reads: dict[str, int] = defaultdict(int)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imports += _imports(module, tree, path.name == "__init__.py")
        if module not in ("mlx_robust.model", "mlx_robust.robust_model"):
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr in ROBUST_MODEL_PRIVATES:
                    if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                        private_reads[module] += 1
    return imports, dict(private_reads)


IMPORTS, PRIVATE_READS = _scan()


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    top = parts[1]
    if top in BOTTOM:
        return "bottom"
    return GROUP[top]


def _layer_violations() -> set[tuple[str, str]]:
    bad = set()
    for imp in IMPORTS:
        src, dst = _layer(imp.importer), _layer(imp.target)
        if dst == "root":
            if src != "root" and src != "cli":  # only the CLI imports the package face
                bad.add((imp.importer, imp.target))
            continue
        if imp.target.endswith("._core") and imp.importer not in (ROOT, "mlx_robust._functional",
                                                                  "mlx_robust._engines"):
            bad.add((imp.importer, imp.target))  # the package face may, for the version check
            continue
        if LAYERS[dst] > LAYERS[src] or (src != dst and LAYERS[dst] == LAYERS[src] and src != "defences"):
            # defences may use the attacks' helpers today (finite32); attacks never import defences
            bad.add((imp.importer, imp.target))
    return bad


def test_every_module_has_a_layer():
    for imp in IMPORTS:
        _layer(imp.importer)
        _layer(imp.target)


def test_layer_rules():
    bad = _layer_violations()
    assert bad - LAYER_EXCEPTIONS == set(), "new imports across the layers (see REDESIGN.md)"
    assert LAYER_EXCEPTIONS - bad == set(), "fixed: delete these from LAYER_EXCEPTIONS"


def test_no_library_module_imports_the_cli():
    bad = {(i.importer, i.target) for i in IMPORTS
           if _layer(i.target) == "cli" and _layer(i.importer) not in ("cli", "root")}
    assert bad <= LAYER_EXCEPTIONS


def test_imports_inside_functions_are_counted():
    counts: dict[str, int] = defaultdict(int)
    for imp in IMPORTS:
        if imp.in_function:
            counts[imp.importer] += 1
    assert dict(counts) == FUNCTION_IMPORT_EXCEPTIONS, (
        "import mlx_robust modules at the top of the module (a function-level import hides a circle)"
    )


def test_no_module_reads_robust_model_privates():
    assert PRIVATE_READS == PRIVATE_READ_EXCEPTIONS, "use RobustModel's public interface"


def test_no_private_names_imported_across_modules():
    """A private name may be shared inside one package (cli/), never across packages."""
    bad = {(i.importer, i.target, i.name) for i in IMPORTS
           if i.name is not None and i.name.startswith("_") and not i.name.startswith("__")
           and i.importer.split(".")[:2] != i.target.split(".")[:2]}
    assert bad == PRIVATE_NAME_EXCEPTIONS


def test_dynamic_imports_only_for_moved_names_and_user_models():
    """``importlib.import_module`` would hide an import from this scan: only the deprecation
    forwards (``_compat.moved``) and the CLI's ``--model module:factory`` loader use it."""
    users = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("import_module", "__import__"):
                users.add(_module_name(path))
            if isinstance(node, ast.Name) and node.id == "__import__":
                users.add(_module_name(path))
    assert users == {"mlx_robust._compat", "mlx_robust.cli.commands"}


def test_no_import_circle():
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in IMPORTS:
        if imp.importer != imp.target and (imp.importer, imp.target) not in CYCLE_EXCEPTIONS:
            graph[imp.importer].add(imp.target)
    assert CYCLE_EXCEPTIONS <= LAYER_EXCEPTIONS
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_scan_sees_the_known_imports():
    """The scanner itself: it finds a top-level, a function-level and a TYPE_CHECKING-only import."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "from mlx_robust import validation\n"
        "if TYPE_CHECKING:\n    from mlx_robust.model import RobustModel\n"
        "def f():\n    import mlx_robust as mr\n"
    )
    found = _imports("mlx_robust.attacks.pgd", ast.parse(src), False)
    assert [(i.target, i.in_function) for i in found] == [
        ("mlx_robust.validation", False), ("mlx_robust", True)]


def test_old_attribute_paths_work_in_a_fresh_interpreter():
    # 0.1 made these submodules attributes of the package as a side effect of its import circle;
    # code written against it (mr.smoothing.certify, mr.model.RobustModel, ...) keeps working.
    import subprocess
    import sys

    code = ("import mlx_robust as mr; "
            "print(mr.smoothing.certify.__module__, mr.model.RobustModel.__name__, "
            "mr.adversarial.adversarial_value_and_grad.__name__, mr.trainer.train.__name__, mr.cli.main.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["mlx_robust.defences.smoothing", "RobustModel", "adversarial_value_and_grad",
                                  "train", "main"]
