"""The package's floors: import-linter's contracts in pyproject.toml hold, and no import circle exists.

The circle scan reads every import of every module - at module level, inside functions (the lazy
imports that keep start-up fast) and under `if TYPE_CHECKING:` - so a circle cannot hide behind a
deferred import.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_the_import_contracts_hold():
    proc = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_a_broken_contract_fails(tmp_path):
    """The check is real: a contract the code breaks (the pipeline imports the phase kinds) is reported."""
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = dsdtune\n\n[importlinter:contract:1]\n"
                      "name = pipeline without kinds\ntype = forbidden\nsource_modules = dsdtune.pipeline\n"
                      "forbidden_modules = dsdtune.phases\n")
    proc = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "BROKEN" in proc.stdout, proc.stdout[-2000:]


def _circles(graph: grimp.ImportGraph, modules: list[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if not target.startswith("dsdtune"):
                    continue
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.find_modules_directly_imported_by(target)))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
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
                        found.append(sorted(component))
    return found


def test_no_import_circle_lazy_and_type_only_imports_included():
    graph = grimp.build_graph("dsdtune", exclude_type_checking_imports=False)
    modules = sorted(m for m in graph.modules if m.startswith("dsdtune"))
    assert len(modules) > 40
    assert _circles(graph, modules) == []
    # the scan sees lazy imports: the pipeline imports the Jacobian diagnostics inside a method only
    assert "dsdtune.diagnostics" in graph.find_modules_directly_imported_by("dsdtune.pipeline")


def test_the_scan_finds_a_circle():
    graph = grimp.ImportGraph()
    for module in ("dsdtune.a", "dsdtune.b", "dsdtune.c"):
        graph.add_module(module)
    graph.add_import(importer="dsdtune.a", imported="dsdtune.b")
    graph.add_import(importer="dsdtune.b", imported="dsdtune.c")
    graph.add_import(importer="dsdtune.c", imported="dsdtune.a")
    assert _circles(graph, ["dsdtune.a", "dsdtune.b", "dsdtune.c"]) == [["dsdtune.a", "dsdtune.b", "dsdtune.c"]]
