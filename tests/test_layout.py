"""The layout's promises, checked on the source: trials/ (the trial side) imports neither MLflow nor the
driver, and Ray only in its one adapter, trainable.py; tuner/ (the driver side) imports neither torch nor
the model or trainer, so it never builds a model."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_trial_side_imports_ray_only_in_its_adapter_and_mlflow_nowhere():
    for path in sorted((ROOT / "trials").glob("*.py")):
        roots = {name.split(".")[0] for name in imported_modules(path)}
        assert "mlflow" not in roots, path.name
        assert "tuner" not in roots, path.name
        if path.name != "trainable.py":
            assert "ray" not in roots, path.name


def test_driver_side_never_builds_a_model():
    for path in sorted((ROOT / "tuner").glob("*.py")):
        modules = imported_modules(path)
        assert not {"trials.model", "trials.trainer", "torch"} & modules, path.name
