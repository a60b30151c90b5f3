"""Task names are declared once: no string literal names a task outside the places that declare tasks.

The places: the task adapters (pipelines/tasks.py), the model registry (models/_registry.py, and
each family's own `register(...)` call), and the params schema (pipelines/params.py). Everywhere
else in pipelines/, services/ and models/ a task name comes from those, so adding a task is one
adapter plus its models. Literals are read with `ast`, so docstrings and comments may name tasks;
so may prose (a string with spaces: OpenAPI descriptions, messages). Identifier-like strings are
checked whole and as parts of f-strings: "classify", '/detect', f"{prefix}-segment.json".
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pipelines.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "services", "models")
# The adapters, the registry and the params schema declare tasks; the prepared-data layout names its
# item folder after the task it was made for (data/prepared/classify).
DECLARING = {"pipelines/tasks.py", "models/_registry.py", "pipelines/params.py", "pipelines/datasets.py",
             "pipelines/regression.py",
             "pipelines/reconstruction.py"}
NAMED = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, TASKS)) + r")(?![A-Za-z0-9])")


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of the module, its classes and its functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                found.add(id(first.value))
    return found


def registrations(tree: ast.AST) -> set[int]:
    """ids of every node inside a `register(...)` call: a family's own registration names its task."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name == "register":
                found.update(id(inner) for inner in ast.walk(node))
    return found


def names_a_task(text: str) -> bool:
    """An identifier-like string (no whitespace) with a task name as a word, or a task name alone."""
    return text.strip() in TASKS or (not re.search(r"\s", text) and NAMED.search(text) is not None)


def offenders(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line: 'literal'` for each string constant in `path` that names a task."""
    tree = ast.parse(path.read_text(), str(path))
    allowed = docstrings(tree) | registrations(tree)
    relative = path.relative_to(root).as_posix()
    return [f"{relative}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed
            and names_a_task(node.value)]


def test_the_check_sees_literals_and_skips_docstrings(tmp_path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('"""Docstrings may say classify."""\nA = "classify"\nB = f"/{A}/detect"\n'
                      'C = "segment: a description"\nregister("segment", "unet")\n\n\n'
                      'def f():\n    """segment"""\n    return \'detect\'\n')
    found = offenders(sample, tmp_path)
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in found] == ["2", "3", "10"], found


def test_no_task_name_literals_outside_the_declarations() -> None:
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
                   if p.relative_to(ROOT).as_posix() not in DECLARING)
    found = [line for path in files for line in offenders(path)]
    assert not found, ("task names as string literals (take them from pipelines/tasks.py TASKS or an adapter):\n"
                       + "\n".join(found))
