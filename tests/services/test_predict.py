"""`python -m services.predict` (services/predict.py) on the example images, with tiny freshly built models.

The models are untrained (the numbers do not matter here): what matters is that the command
prints one line per file and task, that `--json` is byte for byte the response the service's
own functions give for the same file, that `--save` draws every file and task, and that a bad
file or a missing model is one line on stderr while the rest still runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import _checkpoint as checkpoint
from models._registry import build

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
IMAGES = ["photo.jpg", "scene.png", "shirt.png"]  # examples/* in the shell's order, less the script and README
SAVED_SIDE = {"photo.jpg": 256, "scene.png": 256, "shirt.png": 252}  # 28 px is enlarged 9x
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MODELS = {"classify": ("lenet5", 28, {}), "detect": ("fcos", 64, {}), "segment": ("unet", 64, {"depth": 2, "width": 8})}
LINE = {"classify": r"(\S[^,]* \d\.\d\d, ){4}\S[^,]* \d\.\d\d",
        "detect": r"(no detections|\d+ detections?: .+)",
        "segment": r"(mask classes: .+|mask: background only)"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """artifacts/models-like folders of untrained registry models sized like the examples' training data."""
    root = tmp_path_factory.mktemp("artifacts") / "models"
    for task, (family, size, hparams) in MODELS.items():
        torch.manual_seed(0)
        model = build(task, family, len(CLASSES), 1, size, **hparams)
        checkpoint.save(model, {"task": task, "family": family, "hparams": hparams, "num_classes": len(CLASSES),
                                "in_channels": 1, "image_size": size, "classes": CLASSES, "mean": [0.29],
                                "std": [0.35]}, root / task)
    return root


def predict(*args: str, shell: str | None = None) -> subprocess.CompletedProcess:
    command = shell or [sys.executable, "-m", "services.predict", *args]
    return subprocess.run(command, shell=shell is not None, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_the_acceptance_command_prints_one_line_per_image_and_task(models_dir):
    done = predict(shell=f"{sys.executable} -m services.predict examples/* --models-dir {models_dir}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(IMAGES) * len(MODELS), done.stdout
    for line, (name, task) in zip(lines, [(name, task) for name in IMAGES for task in MODELS]):
        head, _, tail = line.partition(" (out of domain: ")
        assert re.fullmatch(rf"examples/{re.escape(name)} {task}: {LINE[task]}", head), line
        assert (tail.startswith("colour image for a greyscale model") and tail.endswith(")")) == (name == "photo.jpg")
    # the script and this folder's README are not images: one note, no error
    assert done.stderr.splitlines() == ["note: skipped 2 files not named as images "
                                        "(examples/README.md, examples/make_examples.py)"]


def endpoint_response(path: Path, task: str, models_dir: Path, score_threshold: float) -> str:
    """The service's answer to one upload, from its own functions in-process: catalog, runner (through the
    batching queue), imaging.prepare, the endpoint's result and domain check, rendered by Starlette."""
    from fastapi.responses import JSONResponse

    from pipelines.params import load_params
    from services import catalog, imaging
    from services.endpoints import endpoint
    from services.runners import load_runner
    from services.schemas import Options, PredictionResponse

    serve = load_params(ROOT / "params.yaml").serve
    (source,) = [s for s in catalog.from_directory(models_dir) if s.task == task]
    runner = load_runner(task, source.directory, name=source.name, version=source.version, backend=serve.backend,
                         max_batch_size=serve.max_batch_size, max_latency_ms=serve.max_latency_ms,
                         expected_sha256=source.expected_sha256, scale=serve.scale, max_side=serve.max_side)
    options = runner.options(Options(score_threshold=score_threshold).model_dump(), serve.top_k)
    prepared = imaging.prepare(path.read_bytes(), imaging.DecodeLimits(serve.max_pixels, tuple(serve.formats)),
                               runner.fit, runner.in_channels)
    output = asyncio.run(runner.predict(prepared.array))
    result = endpoint(task).result(0, output.value, runner.classes, options, prepared.placement)
    broken = runner.domain.check(prepared.facts)
    result.in_domain, result.reason = not broken, "; ".join(reason for _, reason in broken) or None
    card = runner.card
    body = PredictionResponse(task=task, model={"task": task, "family": card.family, "name": card.name,
                                                "version": card.version},
                              **{key: getattr(options, key) for key in endpoint(task).echoes}, results=[result])
    return JSONResponse(body.model_dump(mode="json", exclude_none=True)).body.decode()


def test_json_is_the_service_response_and_save_draws_every_file_and_task(models_dir, tmp_path):
    files = [str(EXAMPLES / name) for name in IMAGES]
    # threshold 0: the untrained detector's low scores still give boxes to draw
    done = predict(*files, "--models-dir", str(models_dir), "--json", "--save", str(tmp_path / "out"),
                   "--score-threshold", "0")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    pairs = [(name, task) for name in IMAGES for task in MODELS]
    assert len(lines) == len(pairs)
    for line, (name, task) in zip(lines, pairs):
        assert line == endpoint_response(EXAMPLES / name, task, models_dir, 0.0), (name, task)
        if task == "detect":
            assert json.loads(line)["results"][0]["detections"], "nothing drawn: the test needs boxes"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{Path(name).stem}_{task}.png" for name, task in pairs)
    for name, task in pairs:
        saved = np.asarray(Image.open(tmp_path / "out" / f"{Path(name).stem}_{task}.png"))
        side = SAVED_SIDE[name]
        assert saved.shape == (side, side, 3), (name, task)
        plain = np.asarray(Image.open(EXAMPLES / name).convert("RGB").resize((side, side), Image.NEAREST))
        assert (saved != plain).any(axis=2).mean() > 0.002, f"{name} {task}: nothing drawn"


def test_bad_files_are_one_line_each_and_the_others_still_run(models_dir, tmp_path, capsys):
    from services.predict import main

    broken = tmp_path / "broken.png"
    broken.write_bytes((EXAMPLES / "shirt.png").read_bytes()[:120])  # a truncated PNG
    missing = tmp_path / "missing.jpg"
    with pytest.raises(SystemExit) as exit_info:
        main([str(broken), str(EXAMPLES / "shirt.png"), str(missing), "--models-dir", str(models_dir),
              "--task", "classify"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    assert out.startswith(f"{EXAMPLES / 'shirt.png'} classify: ") and len(out.splitlines()) == 1
    errors = err.splitlines()
    assert len(errors) == 2, err
    assert errors[0].startswith(f"error: {broken}: truncated or corrupt image")
    assert errors[1] == f"error: {missing}: No such file or directory"


def test_a_task_without_a_model_is_one_line_and_the_others_still_run(models_dir, tmp_path, capsys):
    from services.predict import main

    only = tmp_path / "models"
    only.mkdir()
    (only / "classify").symlink_to(models_dir / "classify", target_is_directory=True)
    with pytest.raises(SystemExit) as exit_info:
        main([str(EXAMPLES / "shirt.png"), "--models-dir", str(only), "--task", "classify", "--task", "segment"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    assert out.startswith(f"{EXAMPLES / 'shirt.png'} classify: ") and len(out.splitlines()) == 1
    assert err == f"error: segment: no model in {only} (packaged tasks: classify)\n"

    with pytest.raises(SystemExit) as exit_info:
        main([str(EXAMPLES / "shirt.png"), "--models-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.startswith(f"error: no packaged model in {tmp_path}: ") and len(err.splitlines()) == 1


def test_the_command_runs_where_the_service_would(models_dir, tmp_path, capsys, monkeypatch):
    """The command ignored serve.device and always ran on the CPU: on a GPU box its numbers were not the server's.
    It resolves serve.device as the service does, so `cuda` on a machine without one is the service's own error."""
    import yaml

    from services.predict import PARAMS_ENV, main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serve"]["device"] = "cuda"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv(PARAMS_ENV, str(tmp_path / "params.yaml"))
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: serve.device cuda is usable here")
    with pytest.raises(SystemExit) as exit_info:
        main([str(EXAMPLES / "shirt.png"), "--models-dir", str(models_dir), "--task", "classify"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err == "error: serve.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')\n"
