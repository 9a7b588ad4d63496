"""The import graph's promises, checked on what Python really loads and on the source.

* A module that does not need Ray does not import it, directly or through a neighbour: reading an experiment
  folder, sending an outbox and writing a report work on a laptop without a cluster. Each group below is
  imported in a fresh interpreter that records who first imports a forbidden package; importing a group
  loads at least what importing any one of its modules does, so a clean group means every module is clean.
* tuner/ and trials/ have no import circle. The graph counts every import statement, also those inside
  functions and under `if TYPE_CHECKING:`: a deferred import is how a circle is usually hidden, and the
  rule is about which side depends on which, not only about what runs at import time.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tuner", "trials")

# The driver side that needs no cluster: the command's options, the space, its tables and the CPU estimate, the
# export (its table and winner rule too), the outbox and `python -m tuner.sync`. No Ray, no Optuna (only the
# searcher asks Optuna), no torch (tuner/ builds no model).
DRIVER_WITHOUT_CLUSTER = (
    "tuner.options",
    "tuner.space",
    "tuner.search_space",
    "tuner.search_tables",
    "tuner.cpu_only",
    "tuner.export",
    "tuner.trials_table",
    "tuner.winner",
    "tuner.mlflow_runs",
    "tuner.journal",
    "tuner.mlflow_ops",
    "tuner.outbox",
    "tuner.sync",
    "tuner.full_run_report",
    "tuner.mlflow_model",  # its torch-needing parts import inside the functions train.py and sample.py call
)
# The report: Optuna computes its importance figure, so only Ray and torch are ruled out.
REPORT = ("tuner.report",)
# The trial side outside its Ray adapter: plain PyTorch, and neither MLflow nor the search's Optuna.
TRIAL_SIDE = tuple(
    sorted(f"trials.{p.stem}" for p in (ROOT / "trials").glob("*.py") if p.stem not in ("__init__", "trainable"))
)

# Run in a fresh interpreter: note the project file and line that first imports each forbidden package, run
# the code under test, then print which forbidden packages got loaded and from where.
WATCH = textwrap.dedent("""
    import json, sys, traceback
    FORBIDDEN, ROOT, first = set({forbidden!r}), {root!r}, {{}}

    class Watch:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in FORBIDDEN and top not in first:
                first[top] = [f"{{f.filename[len(ROOT) + 1:]}}:{{f.lineno}}" for f in traceback.extract_stack()
                              if f.filename.startswith(ROOT) and "/.venv/" not in f.filename]
            return None

    sys.meta_path.insert(0, Watch())
    code = 0
    try:
        {body}
    except SystemExit as exc:
        code = exc.code
    print("WATCH " + json.dumps({{"code": code, "loaded": {{k: v for k, v in first.items() if k in sys.modules}}}}))
""")


def loaded_in_fresh_interpreter(body: str, forbidden: set[str]) -> tuple[int, dict[str, list[str]]]:
    script = WATCH.format(forbidden=sorted(forbidden), root=str(ROOT), body=body)
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("WATCH ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1][len("WATCH ") :])
    return result["code"], result["loaded"]


def describe(loaded: dict[str, list[str]]) -> str:
    return "; ".join(f"{name} imported via {' -> '.join(chain) or '?'}" for name, chain in loaded.items())


@pytest.mark.parametrize(
    "modules, forbidden",
    [
        (DRIVER_WITHOUT_CLUSTER, {"ray", "optuna", "torch"}),
        (REPORT, {"ray", "torch"}),
        (TRIAL_SIDE, {"ray", "optuna", "mlflow"}),
    ],
    ids=["driver-without-cluster", "report", "trial-side"],
)
def test_modules_import_without_what_they_do_not_need(modules, forbidden):
    body = f"import importlib; [importlib.import_module(m) for m in {modules!r}]"
    _, loaded = loaded_in_fresh_interpreter(body, forbidden)
    assert not loaded, describe(loaded)


def test_sync_command_runs_without_ray(tmp_path):
    """`python -m tuner.sync` on a full run's folder with nothing kept: sends nothing, loads no Ray or torch."""
    body = f"import runpy; sys.argv = ['tuner.sync', {str(tmp_path)!r}]; runpy.run_module('tuner.sync', run_name='__main__')"
    code, loaded = loaded_in_fresh_interpreter(body, {"ray", "optuna", "torch"})
    assert code == 0
    assert not loaded, describe(loaded)


def test_report_command_runs_without_ray(tmp_path):
    """`python -m tuner.report` rebuilds a recorded experiment's report (no samples) without Ray or torch."""
    folder = tmp_path / "recorded"
    shutil.copytree(ROOT / "tests" / "fixtures" / "recorded", folder)
    body = (
        f"import runpy; sys.argv = ['tuner.report', {str(folder)!r}, '--no-samples']; "
        "runpy.run_module('tuner.report', run_name='__main__')"
    )
    code, loaded = loaded_in_fresh_interpreter(body, {"ray", "torch"})
    assert code == 0 and (folder / "report" / "report.html").exists()
    assert not loaded, describe(loaded)


# ---- the static graph ------------------------------------------------------------------------------------------
def module_files() -> dict[str, Path]:
    """Every module of the packages by dotted name; a package's __init__.py is the package itself."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file, relative imports resolved. `from a import b`
    counts as importing a.b when that is a module, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t in modules and t != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_circle():
    modules = module_files()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["tuner.searcher"] >= {"tuner.search_tables"}  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_circle_finder_finds_circles_through_relative_and_deferred_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    modules = {f"pkg.{n}": pkg / f"{n}.py" for n in "abc"} | {"pkg": pkg / "__init__.py"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import json\n")
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert find_cycle(graph) is None
