"""The layering CI checks: the import-linter contracts in pyproject.toml hold, a planted
violation breaks them, and no edgederm module takes part in an import cycle."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")
pytest.importorskip("importlinter")

REPO = Path(__file__).resolve().parents[1]
RUNTIME_CONTRACT = "The runtime is self-contained: nothing torch-side, no torch or onnx"
MODELS_CONTRACT = "Models import no export, calibration or training code"


def module_cycles(graph, package: str) -> list[list[str]]:
    """Every group of ``package``'s modules that import each other in a circle (strongly
    connected components of more than one module; Tarjan's algorithm, iteratively)."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    inside = set(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & inside)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & inside))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(cycles)


def test_the_cycle_finder_finds_planted_cycles():
    graph = grimp.ImportGraph()
    for importer, imported in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"),
                               ("p.models", "p.models.registry"), ("p.models.registry", "p.models"),
                               ("p.d", "q.x"), ("q.x", "p.d")]:  # q is outside p: not p's cycle
        graph.add_import(importer=importer, imported=imported)
    assert module_cycles(graph, "p") == [["p.a", "p.b", "p.c"], ["p.models", "p.models.registry"]]
    graph.remove_import(importer="p.c", imported="p.a")
    graph.remove_import(importer="p.models.registry", imported="p.models")
    assert module_cycles(graph, "p") == []


def test_no_edgederm_module_is_in_an_import_cycle():
    """Lazy (function-level) imports count: they load the module all the same. Also a
    module and its own package (acyclic_siblings in pyproject.toml sees siblings only)."""
    graph = grimp.build_graph("edgederm", cache_dir=None, exclude_type_checking_imports=True)  # as pyproject.toml
    assert {"edgederm.runtime.model", "edgederm.calibration.graphs", "edgederm.export.tensorrt"} <= graph.modules
    assert module_cycles(graph, "edgederm") == []


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_the_layering_contracts_hold():
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " BROKEN" not in proc.stdout and ", 0 broken." in proc.stdout and f"{RUNTIME_CONTRACT} KEPT" in proc.stdout


def test_a_planted_violation_breaks_the_contracts(tmp_path):
    """A copy of the tree (the subpackages stay relative symbolic links) with the runtime
    importing torch and a model, a model importing the exporter, and a calibration cycle."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("edgederm", "runtime", "export", "calibration"):
        shutil.copytree(REPO / name, tmp_path / name, symlinks=True, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    assert (tmp_path / "edgederm" / "runtime").is_symlink()
    before = _lint_imports(tmp_path)
    assert f"{RUNTIME_CONTRACT} KEPT" in before.stdout and f"{MODELS_CONTRACT} KEPT" in before.stdout, before.stdout

    def plant(path: str, code: str) -> None:
        with open(tmp_path / path, "a") as f:
            f.write(f"\n\ndef _planted():\n    {code}\n")

    plant("runtime/result.py", "import torch")
    plant("runtime/tiling.py", "from edgederm.models import create_model")
    plant("edgederm/models/summary.py", "from edgederm.export import onnx")
    plant("calibration/fusions.py", "from .graphs import QUANTIZED_OPS")
    after = _lint_imports(tmp_path)
    assert after.returncode == 1, after.stdout + after.stderr
    out = after.stdout
    assert f"{RUNTIME_CONTRACT} BROKEN" in out and f"{MODELS_CONTRACT} BROKEN" in out
    assert "edgederm.runtime is not allowed to import torch" in out and "edgederm.runtime.result -> torch" in out
    assert "edgederm.runtime.tiling -> edgederm.models" in out
    assert "edgederm.models.summary -> edgederm.export" in out
    assert "No cycles are allowed in edgederm.calibration." in out  # fusions <-> graphs
