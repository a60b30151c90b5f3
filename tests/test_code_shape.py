"""The code's shape, checked: short functions, public APIs, docs and comments that match the files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "services", "models")
MAX_FUNCTION_LINES = 60
MAX_FIT_LINES = 50
MAX_LINE = 120
# Private APIs of the stack; a private one that stays lives in exactly one module, with its own test.
PRIVATE = re.compile(r"_internal|_make_divisible|_DenseBlock|_Transition|AUTO_RESULT_KEYS|_compresslevel")
GUARDED = {"services/batching.py"}
FILE_MENTION = re.compile(r"\b((?:pipelines|services|models|bench|tests|docs)/[\w/]+\.(?:py|md|yaml))\b")


def modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), str(path))
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def length(node: ast.AST) -> int:
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return node.end_lineno - start + 1


def test_no_function_in_pipelines_or_services_is_longer_than_60_lines() -> None:
    long = [f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({length(f)} lines)"
            for p in modules("pipelines", "services") for f in functions(p) if length(f) > MAX_FUNCTION_LINES]
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_fit_reads_in_at_most_50_lines() -> None:
    (fit,) = [f for f in functions(ROOT / "pipelines" / "engine.py") if f.name == "fit"]
    assert length(fit) <= MAX_FIT_LINES, f"fit is {length(fit)} lines"


def test_no_line_in_a_python_file_is_longer_than_120_characters() -> None:
    wide = [f"{p.relative_to(ROOT)}:{n} ({len(line)})" for p in modules(*PACKAGES, "bench", "tests", "examples")
            if "__pycache__" not in p.parts
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not wide, f"lines over {MAX_LINE} characters:\n" + "\n".join(wide)


def test_private_apis_of_the_stack_stay_in_one_guarded_module() -> None:
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in modules(*PACKAGES)
            if p.relative_to(ROOT).as_posix() not in GUARDED
            for n, line in enumerate(p.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not hits, "private APIs outside the guarded module:\n" + "\n".join(hits)


@pytest.mark.parametrize("folder", [*PACKAGES, "bench", "tests", "docs"])
def test_files_named_in_code_and_docs_exist(folder: str) -> None:
    files = [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml")]
    missing = [f"{p.relative_to(ROOT)}:{n}: {name}" for p in files
               for n, line in enumerate(p.read_text().splitlines(), 1)
               for name in FILE_MENTION.findall(line) if not (ROOT / name).exists()]
    assert not missing, "names of files the project does not have:\n" + "\n".join(missing)


def project_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of each `from <project module> import name` in a file, function-level ones included."""
    return [(node.lineno, node.module, alias.name) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            and node.module.split(".")[0] in (*PACKAGES, "bench", "tests") for alias in node.names]


def test_every_name_imported_from_the_project_exists() -> None:
    """Imports inside functions run only when the function does: a bench script's could name a function another
    module no longer has and fail only when someone runs it (bench/upload.py did, after bench/serve.py changed)."""
    import importlib.util

    missing = []
    for path in modules(*PACKAGES, "bench", "tests"):
        for line, module, name in project_imports(path):
            found = importlib.import_module(module)
            if not hasattr(found, name) and importlib.util.find_spec(f"{module}.{name}") is None:
                missing.append(f"{path.relative_to(ROOT)}:{line}: from {module} import {name}")
    assert not missing, "names the project does not have:\n" + "\n".join(missing)


def test_architecture_doc_lists_every_module() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    absent = [p.relative_to(ROOT).as_posix() for p in modules(*PACKAGES)
              if p.name != "__init__.py" and f"`{p.relative_to(ROOT).as_posix()}`" not in doc]
    assert not absent, "modules docs/architecture.md does not list:\n" + "\n".join(absent)
