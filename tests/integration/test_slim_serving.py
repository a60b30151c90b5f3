"""The serving image's install: pyproject.toml's `serve` dependency group alone runs the service.

The Dockerfile's own venv and pip steps build a venv here (this machine's package index stands in
for the image's PyTorch index), the project goes in with --no-deps, and `python -m services.serve`
from that venv, in the image's /app layout, answers every task on tiny models; MLflow, Ray, DVC,
Optuna, matplotlib and scikit-learn are not even installed. The venv of a given serve group and
set of pip steps is built once (a few minutes, most of it unpacking torch's CUDA wheels) and kept
under CONVFORGE_TEST_CACHE (default ~/.cache/convforge); the project install runs every time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.tasks import TASKS, ClassifyTask, DetectTask, SegmentTask
from tests.integration.test_metrics_per_server import save_untrained, start, stop, wait_ready
from tests.integration.test_service import as_argv, dockerfile_instructions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TRAINING_STACK = ("mlflow", "ray", "dvc", "optuna", "matplotlib", "sklearn")
INDEX_OPTIONS = ("--index-url", "--extra-index-url")
CACHE = Path(os.environ.get("CONVFORGE_TEST_CACHE", Path.home() / ".cache" / "convforge"))


def serve_group() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["serve"]


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, one list per stage (FROM first)."""
    found: list[list[tuple[str, str]]] = []
    for instruction, argument in dockerfile_instructions():
        if instruction == "FROM":
            found.append([])
        if found:
            found[-1].append((instruction, argument))
    return found


def pip_steps() -> list[list[str]]:
    """Each `pip ...` command of the build stage's RUN lines, without the image's index options, its
    build arguments at their defaults (the CPU image's)."""
    steps = []
    defaults = dict(argument.split("=", 1) for instruction, argument in dockerfile_instructions()
                    if instruction == "ARG" and "=" in argument)
    for instruction, argument in stages()[0]:
        if instruction != "RUN" or "pip " not in argument:
            continue
        for command in argument.split("&&"):
            command = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), command)
            argv, kept = shlex.split(command), []
            while argv:
                word = argv.pop(0)
                if word in INDEX_OPTIONS:
                    argv.pop(0)
                elif not word.startswith(tuple(f"{option}=" for option in INDEX_OPTIONS)):
                    kept.append(word)
            assert kept[0] == "pip", command
            steps.append(kept)
    return steps


def copy_context(stage: list[tuple[str, str]], dest: Path) -> list[str]:
    """The stage's COPY instructions from the project root into `dest` (its WORKDIR); returns the
    sources that do not exist here."""
    missing = []
    for instruction, argument in stage:
        if instruction != "COPY" or "--from=" in argument:
            continue
        *sources, target = [word for word in shlex.split(argument) if not word.startswith("--")]
        for source in sources:
            origin = ROOT / source
            if not origin.exists():
                missing.append(source)
                continue
            to = dest / Path(target).name if target.startswith("/") else dest / target  # absolute: in WORKDIR
            to = to / origin.name if target.endswith("/") else to
            to.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, to, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, to)
    return missing


def pip(python: Path, argv: list[str], cwd: Path) -> None:
    done = subprocess.run([str(python), "-m", *argv], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@contextlib.contextmanager
def serve_venv(context: Path):
    """A venv made by the Dockerfile's steps up to (not including) the project install, built once per
    serve group and steps; a lock keeps two test runs from building or installing into it at once."""
    steps = [step for step in pip_steps() if "--no-deps" not in step]
    key = hashlib.sha256(json.dumps([sys.version_info[:2], serve_group(), steps]).encode()).hexdigest()[:16]
    venv = CACHE / f"serve-venv-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "serve-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "built.json").is_file():
            for old in CACHE.glob("serve-venv-*"):
                if old.is_dir():
                    shutil.rmtree(old)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)  # RUN python -m venv
            for step in steps:
                pip(venv / "bin" / "python", step, context)
            (venv / "built.json").write_text(json.dumps({"serve": serve_group(), "steps": steps}))
        yield venv / "bin" / "python"


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((width, height), 60).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_serve_group_alone_serves_every_task(tmp_path):
    from services.schemas import PredictionResponse

    context, app = tmp_path / "src", tmp_path / "app"
    assert copy_context(stages()[0], context) == []
    assert set(copy_context(stages()[-1], app)) <= {"artifacts/bento/convforge.bento"}  # --models-dir serves here
    with serve_venv(context) as python:
        pip(python, next(step for step in pip_steps() if "--no-deps" in step), context)
        probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
        found = subprocess.run([str(python), "-c", probe, *TRAINING_STACK], capture_output=True, text=True,
                               cwd=app, check=True)
        assert found.stdout.strip() == "[]", found.stdout

        models = save_untrained(tmp_path / "models", tuple(TASKS), size=40)
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        server = start(str(python), models, tmp_path / "server.log",
                       {**env, "BENTOML_HOME": str(tmp_path / "bentoml"), "PYTHONUNBUFFERED": "1"}, cwd=app)
        try:
            wait_ready(server)
            calls = [(ClassifyTask.name, {"top_k": "3"}), (DetectTask.name, {"score_threshold": "0"}),
                     (SegmentTask.name, {"mask_format": "png"}), (SegmentTask.name, {"mask_format": "rle"}),
                     (SegmentTask.name, {"mask_format": "polygon"})]
            for task, options in calls:
                reply = httpx.post(f"{server.base}/{task}", files={"images": ("noise.png", png(40, 40), "image/png")},
                                   data=options, timeout=60)
                assert reply.status_code == 200, (task, options, reply.text[-2000:])
                body = PredictionResponse.model_validate(reply.json())
                assert body.task == task and len(body.results) == 1
                if options.get("mask_format") in ("rle", "polygon"):  # pycocotools / contourpy did the encoding
                    assert body.results[0].class_masks, (options, reply.text[:500])
        finally:
            stop(server)
        assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]


def test_bentofile_packages_are_the_serve_group():
    bentofile = yaml.safe_load((ROOT / "services" / "bentofile.yaml").read_text())
    assert bentofile["python"]["packages"] == serve_group()


def test_the_image_installs_the_serve_group_then_the_project_alone():
    build, final = stages()[0], stages()[-1]
    args = dict(argument.split("=", 1) for instruction, argument in build if instruction == "ARG")
    assert args["TORCH_VARIANT"] == "cpu" and "${TORCH_VARIANT}" in args["TORCH_INDEX"]
    installs = [step for step in pip_steps() if step[1] == "install"]
    assert installs == [["pip", "install", "--upgrade", "pip>=25.1"], ["pip", "install", "--group", "serve"],
                        ["pip", "install", "--no-deps", "."]], installs
    names = {str(req).split("=")[0].lower() for req in serve_group()}
    assert not names & {"mlflow", "ray", "ray[tune]", "dvc", "optuna", "matplotlib", "scikit-learn"}
    users = [argument for instruction, argument in final if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = next(argument for instruction, argument in final if instruction == "HEALTHCHECK")
    assert as_argv(health.split("CMD", 1)[1].strip()) == ["python", "-m", "services.serve", "--check"]
    assert as_argv(next(argument for instruction, argument in final if instruction == "CMD")) == \
        ["python", "-m", "services.serve"]
