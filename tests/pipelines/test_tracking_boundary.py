"""MLflow stays behind one door: only pipelines/tracking/ imports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipelines", "services", "models")
TRACKING = ROOT / "pipelines" / "tracking"


def mlflow_imports(path: Path) -> list[int]:
    """The lines of `path` that import mlflow or one of its modules."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name == "mlflow" or name.startswith("mlflow.") for name in names):
            lines.append(node.lineno)
    return lines


def test_only_the_tracking_package_imports_mlflow() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}" for package in PACKAGES
             for path in sorted((ROOT / package).rglob("*.py")) if TRACKING not in path.parents
             for line in mlflow_imports(path)]
    assert not found, "mlflow imported outside pipelines/tracking/:\n" + "\n".join(found)


def test_the_check_sees_every_form_of_import(tmp_path) -> None:
    module = tmp_path / "module.py"
    module.write_text("import os\nimport mlflow\nfrom mlflow.entities import Metric\n"
                      "def f():\n    import mlflow.pyfunc as pyfunc\n    from mlflowx import y\n")
    assert mlflow_imports(module) == [2, 3, 5]
