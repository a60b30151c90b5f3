"""Does dvc.yaml declare what each stage really uses? Deps from the import graph, params from traces.

    python -m pipelines.depcheck [--dvc-yaml dvc.yaml] [--traces DIR] [--list]

Files: each stage's entry module (`cmd: python -m pipelines.stages.train classify`) and every project
module it imports, transitively (imports inside functions too), must be covered by its `deps` (a
directory covers its files). A package's `__init__.py` counts once it holds more than a docstring.
Params: the keys a stage read in a run with `CONVFORGE_PARAMS_TRACE=DIR` (`DIR/<stage>.json`, written
by pipelines/params.py) must be declared in its `params`, and each declared key must be read; a
declared section (`train.classify`) must have every leaf read, else its read keys belong in the list.
Prints one line per problem; exit status 1 when there is any.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import BaseModel

PACKAGES = ("pipelines", "models", "services")
PARAMS_FILE = "params.yaml"
PRETRAINED_MODELS = "artifacts/models"  # where `pretrained: <task>` reads the task's trained model


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml, `foreach` expanded (`train@classify`)."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]


def _interpolate(value: Any, key: str, item: Any) -> Any:
    """`${key}` and `${item.x}` substituted in every string of a `do:` body."""
    if isinstance(value, dict):
        return {_interpolate(k, key, item): _interpolate(v, key, item) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, key, item) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> str:
        head, *path = match.group(1).split(".")
        found = key if head == "key" else item
        for part in path:
            found = found[part]
        return str(found)

    return re.sub(r"\$\{\s*((?:key|item)(?:\.\w+)*)\s*\}", lookup, value)


def _param_keys(entries: list[Any]) -> tuple[str, ...]:
    """The params.yaml keys of a stage's `params:` ("" for the whole file)."""
    keys: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            for file, file_keys in entry.items():
                if os.path.normpath(file) == PARAMS_FILE:
                    keys.extend(file_keys or [""])
    return tuple(keys)


def _deps(entries: list[Any]) -> tuple[str, ...]:
    return tuple(os.path.normpath(next(iter(d)) if isinstance(d, dict) else d) for d in entries or [])


def stages(dvc_yaml: dict) -> list[Stage]:
    """Every stage of a parsed dvc.yaml, each `foreach` item its own `stage@key`."""
    found = []
    for name, body in (dvc_yaml.get("stages") or {}).items():
        items = body.get("foreach")
        if items is None:
            expanded = [(name, body)]
        else:
            pairs = items.items() if isinstance(items, dict) else ((str(i), i) for i in items)
            expanded = [(f"{name}@{key}", _interpolate(body["do"], key, item)) for key, item in pairs]
        for stage_name, stage in expanded:
            found.append(Stage(stage_name, str(stage.get("cmd", "")), _deps(stage.get("deps")),
                               _param_keys(stage.get("params"))))
    return found


def entry_module(cmd: str) -> tuple[str, list[str]] | None:
    """(module, args) of `python -m module args...`, or None for another command."""
    words = shlex.split(cmd)
    if len(words) < 3 or not Path(words[0]).name.startswith("python") or words[1] != "-m":
        return None
    return words[2], words[3:]


def module_file(root: Path, module: str) -> Path | None:
    """The file of project module `module` (a package's `__init__.py`), or None outside the project."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _is_lazy_loader(node: ast.AST) -> bool:
    """A package's module-level `__getattr__` (PEP 562): what it imports loads when a name is asked for."""
    return isinstance(node, ast.FunctionDef) and node.name == "__getattr__"


def _nodes(tree: ast.AST, lazy: bool = False) -> Iterator[ast.AST]:
    """Every node of `tree` that runs at some point: `if TYPE_CHECKING:` bodies left out; a package's
    lazy loader only with `lazy` (then only the loader's nodes)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for node in child.orelse:
                yield node
                yield from _nodes(node)
            continue
        if lazy or _is_lazy_loader(child):
            if lazy and _is_lazy_loader(child):
                yield from _nodes(child)
            continue
        yield child
        yield from _nodes(child)


def lazy_imports(root: Path, package: str) -> set[str]:
    """What a package's `__getattr__` imports: loaded by `import package` or `from package import name`
    (a name that is not a submodule), not by importing one of its submodules."""
    path = module_file(root, package)
    if path is None or path.name != "__init__.py":
        return set()
    found = set()
    for node in _nodes(ast.parse(path.read_text(), str(path)), lazy=True):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if module_file(root, f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imported_modules(root: Path, module: str, path: Path) -> set[str]:
    """The modules one file imports (`from a import b` names `a.b` when b is a submodule), plus the
    modules of a project package it lists with `pkgutil.iter_modules(package.__path__)`."""
    return set(_imported_modules(root, module, path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=None)
def _imported_modules(root: Path, module: str, path: Path, mtime: int) -> frozenset[str]:
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            for alias in node.names:
                found.update(lazy_imports(root, alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module, path).split(".")
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(root, f"{base}.{alias.name}"))
            if any(not module_file(root, f"{base}.{alias.name}") for alias in node.names):
                found.update(lazy_imports(root, base))
        elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("iter_modules") and node.args
              and ast.unparse(node.args[0]).endswith(".__path__")):
            package = ast.unparse(node.args[0]).removesuffix(".__path__")
            if module_file(root, package):
                found.update(f"{package}.{p.stem}" for p in (root / package.replace(".", "/")).glob("*.py")
                             if p.name != "__init__.py")
    return frozenset(found)


def _with_parents(module: str) -> list[str]:
    """`a.b.c` -> a, a.b, a.b.c: importing a module runs its packages' `__init__` first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _holds_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    docstring = body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    return len(body) > (1 if docstring else 0)


def import_closure(root: Path, module: str) -> set[Path]:
    """The project files `python -m module` runs: the module and everything it imports, transitively."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        for name in _with_parents(todo.pop()):
            path = module_file(root, name)
            if name in seen or path is None:
                continue
            seen.add(name)
            if path.name != "__init__.py" or name == module or _holds_code(path):
                files.add(path)
            todo.extend(imported_modules(root, name, path))
    return files


def covered(path: str, deps: tuple[str, ...]) -> bool:
    """Whether a dep names `path` or a directory above it."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def file_problems(stage: Stage, root: Path) -> list[str]:
    """Imported project files the stage's deps miss, and .py deps it no longer imports."""
    entry = entry_module(stage.cmd)
    if entry is None or module_file(root, entry[0]) is None:
        return [f"{stage.name}: cmd `{stage.cmd}` does not run a project module (`python -m pipelines...`)"]
    files = sorted(p.relative_to(root).as_posix() for p in import_closure(root, entry[0]))
    problems = [f"{stage.name}: {path} is imported but not a dep" for path in files if not covered(path, stage.deps)]
    problems += [f"{stage.name}: {dep} is a dep but not imported" for dep in stage.deps
                 if dep.endswith(".py") and dep.split("/")[0] in PACKAGES and dep not in files]
    return problems


def leaf_keys(model: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """Every leaf key of params.yaml as the typed loader sees it (a dict or list value is one leaf)."""
    if model is None:
        from pipelines.params import Params as model  # the checker's only tie to the project's code
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= leaf_keys(annotation, f"{key}.")
        else:
            keys.add(key)
    return keys


def _under(key: str, declared: str) -> bool:
    return declared == "" or key == declared or key.startswith(f"{declared}.")


def param_problems(stage: Stage, reads: set[str], leaves: set[str]) -> list[str]:
    """Keys read but not declared; keys (or leaves of a declared section) declared but never read."""
    problems = [f"{stage.name}: param {key} is read but not declared"
                for key in sorted(reads) if not any(_under(key, d) for d in stage.params)]
    for declared in stage.params:
        below = {leaf for leaf in leaves if _under(leaf, declared)}
        if not below:
            problems.append(f"{stage.name}: param {declared} is declared but not a key of {PARAMS_FILE}")
        elif not any(_under(key, declared) for key in reads):
            problems.append(f"{stage.name}: param {declared or PARAMS_FILE} is declared but never read")
        elif declared not in leaves:  # a section some of whose leaves are read: the rest must be too
            problems += [f"{stage.name}: param {leaf} is declared but never read (in section {declared})"
                         for leaf in sorted(below - reads)]
    return problems


def trunk_problems(stage: Stage, params: dict[str, Any]) -> list[str]:
    """A stage whose `<...>.pretrained` param names a task (`classify`) reads that task's trained model
    folder, which must then be one of its deps (`artifacts/models/classify`)."""
    problems = []
    for key in stage.params:
        if not key.endswith(".pretrained"):
            continue
        value: Any = params
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and value.isidentifier():  # a task name, not a folder or torchvision:...
            folder = f"{PRETRAINED_MODELS}/{value}"
            if not covered(folder, stage.deps):
                problems.append(f"{stage.name}: {key} is {value}, so {folder} must be a dep")
    return problems


def check(dvc_yaml: Path, traces: Path | None = None) -> list[str]:
    """Every problem of every stage of `dvc_yaml` (params only when `traces` is given)."""
    dvc_yaml = Path(dvc_yaml).resolve()
    root = dvc_yaml.parent
    problems: list[str] = []
    leaves = leaf_keys() if traces is not None else set()
    params = yaml.safe_load((root / PARAMS_FILE).read_text()) if (root / PARAMS_FILE).is_file() else {}
    for stage in stages(yaml.safe_load(dvc_yaml.read_text())):
        problems += file_problems(stage, root) + trunk_problems(stage, params)
        if traces is None:
            continue
        trace = Path(traces) / f"{stage.name}.json"
        if not trace.is_file():
            problems.append(f"{stage.name}: no params trace {trace} (run the stage with CONVFORGE_PARAMS_TRACE set)")
            continue
        problems += param_problems(stage, set(json.loads(trace.read_text())), leaves)
    return problems


def imported_files(dvc_yaml: Path) -> dict[str, list[str]]:
    """Each stage's project files, as its `deps` could list them."""
    root = Path(dvc_yaml).resolve().parent
    found = {}
    for stage in stages(yaml.safe_load(Path(dvc_yaml).read_text())):
        entry = entry_module(stage.cmd)
        files = import_closure(root, entry[0]) if entry else set()
        found[stage.name] = sorted(p.relative_to(root).as_posix() for p in files)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.depcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"), help="the pipeline file (default dvc.yaml)")
    parser.add_argument("--traces", type=Path, help="the CONVFORGE_PARAMS_TRACE directory of a run, to check params")
    parser.add_argument("--list", action="store_true", help="print each stage's imported files and exit")
    args = parser.parse_args(argv)
    if args.list:
        for stage, files in imported_files(args.dvc_yaml).items():
            print(f"{stage}: {' '.join(files)}")
        return 0
    if args.traces is None:
        print("depcheck: files only (params need --traces DIR from a run with CONVFORGE_PARAMS_TRACE=DIR)",
              file=sys.stderr)
    problems = check(args.dvc_yaml, args.traces)
    print("\n".join(problems) if problems else f"depcheck: {args.dvc_yaml} declares what its stages use")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
