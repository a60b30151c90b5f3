"""Tiny real data for tests: prepared classify data and scenes built by the pipeline library.

From scikit-learn's digits (real data, bundled, offline), upscaled from 8x8 to 16x16 so
every family's pooling has room: 360 train / 40 val / 100 test items, 1 channel,
10 classes. Scenes: 40 train / 10 val / 10 test canvases of 40 px with 1-3 digits each.
Built once per test session through pipelines.preparation, the same code the augment stage runs.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pipelines.params import Params, SceneParams, load_params, validate

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_IMAGE_SIZE = 16


# Variables a test can set for the tests after it in the same process: MLflow's store (pointing MLflow at a store
# sets them for subprocesses, and `mlflow.set_registry_uri(None)` leaves its variable set) and Ray's auth mode
# (`pipelines.runtime.enable_token_auth` sets it; a Ray started later would then want a token).
PROCESS_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_AUTH_MODE")


@contextmanager
def process_left_as_found():
    """Restores PROCESS_VARIABLES, MLflow's store and active runs, torch's threads and deterministic kernels (with
    their fill of new tensors)."""
    env = {name: os.environ.get(name) for name in PROCESS_VARIABLES}
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        yield
    finally:  # also when the body raises
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
            mlflow.set_registry_uri(env["MLFLOW_REGISTRY_URI"])
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


# Each test, and each module with its module-scoped fixtures (set up after this one, torn down before it), leaves
# the process as it found it: under `pytest -n`, a worker runs its share of the modules in an order of its own.
@pytest.fixture(autouse=True, scope="module")
def each_module_leaves_process_as_found():
    with process_left_as_found():
        yield


@pytest.fixture(autouse=True)
def each_test_leaves_process_as_found():
    with process_left_as_found():
        yield


@pytest.fixture(scope="session")
def project_params() -> Params:
    """The repo's params.yaml, validated; build overrides with `pipelines.params.validate`."""
    return load_params(ROOT / "params.yaml")


def tiny_scene_params(params: Params, **overrides) -> SceneParams:
    """Small scene settings for tests (canvas 40, 40/10/10 scenes), with optional overrides."""
    values = {**params.scenes.model_dump(), "canvas_size": 40, "train_scenes": 40, "val_scenes": 10,
              "test_scenes": 10, **overrides}
    return validate(SceneParams, values, prefix="scenes")


def digits_splits(params: Params, max_train: int = 400, max_test: int = 100, size: int = FIXTURE_IMAGE_SIZE):
    """sklearn digits through the fetch reader, first N items per split, resized to size x size."""
    from pipelines.sources import read_digits

    data = params.data.model_copy(update={"dataset": "digits", "max_train": max_train, "max_test": max_test})
    raw = read_digits(data)

    def resize(images: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return np.ascontiguousarray(F.resize(tensor, [size, size], antialias=True).numpy().transpose(0, 2, 3, 1))

    return replace(raw, train_images=resize(raw.train_images), test_images=resize(raw.test_images))


def raw_data(splits, folder: Path):
    """In-memory splits written as data/raw (the fetch stage's layout) at `folder`, opened for augment."""
    from pipelines.raw import load_raw, write_raw

    write_raw(splits, folder)
    return load_raw(folder)


@pytest.fixture(scope="session")
def _prepared_digits(tmp_path_factory, project_params) -> Path:
    from pipelines.preparation import prepare_from_classify

    root = tmp_path_factory.mktemp("prepared")
    prepare_from_classify(raw_data(digits_splits(project_params), root / "data" / "raw"), root / "data" / "prepared",
                          root / "reports" / "augment", project_params.augment, tiny_scene_params(project_params),
                          project_params.seed)
    return root / "data" / "prepared"


@pytest.fixture(scope="session")
def prepared_classify(_prepared_digits) -> Path:
    """A data/prepared/classify-like folder (digits 16x16, 360/40/100): use with pipelines.datasets.load_classify."""
    return _prepared_digits / "classify"


@pytest.fixture(scope="session")
def prepared_scenes(_prepared_digits) -> Path:
    """A data/prepared/scenes-like folder (40/10/10 scenes, 40 px, 1-3 digits): use with load_scenes."""
    return _prepared_digits / "scenes"


def wait_ready(base: str, process, log: Path, timeout: float = 150) -> None:
    """Until the server at `base` answers /readyz with 200; fails with its log when it dies or times out."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, Path(log).read_text()[-3000:]
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{base} never became ready:\n{Path(log).read_text()[-3000:]}")


def stop(process) -> None:
    """SIGTERM to a server's process group when it leads one (BentoML's clean shutdown of its workers too),
    else to the process; SIGKILL when it has not exited within 30 s."""
    import os
    import signal
    import subprocess

    if process.poll() is not None:
        return
    group = os.getpgid(process.pid) == process.pid  # started with start_new_session=True

    def send(sig: int) -> None:
        os.killpg(process.pid, sig) if group else os.kill(process.pid, sig)

    send(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 image array [H, W] or [H, W, C] as PNG bytes (an upload)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def serving(models: Path, work: Path):
    """A real `python -m services.serve` of the model folders under `models`, ready, in a private BENTOML_HOME;
    yields it (a fixture body: `yield from serving(...)`) and stops it afterwards."""
    import os
    import sys

    from tests.integration.test_metrics_per_server import start

    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "PYTHONUNBUFFERED": "1"}
    running = start(sys.executable, models, work / "server.log", env)
    try:
        wait_ready(running.base, running.process, running.log)
        yield running
    finally:
        stop(running.process)


# Requests every prediction endpoint must refuse with a 4xx (and the same one as /classify)
BAD_REQUESTS = {
    "not an image": {"files": {"images": ("x.png", b"not an image", "image/png")}},
    "empty": {"content": b"", "headers": {"Content-Type": "application/json"}},
    "bad base64": {"json": {"image": "%%%"}},
    "no images": {"json": {"images": []}},
    "pickle": {"content": b"\x80\x04N.", "headers": {"Content-Type": "application/vnd.bentoml+pickle"}},
    "unknown option": {"json": {"image": "", "colour": "red"}},
}


def assert_same_4xx(base: str, task: str, other: str, case: str) -> None:
    """`BAD_REQUESTS[case]` gets a 4xx with a JSON error body from /<task>, the status /<other> answers."""
    import json

    import httpx

    answers = [httpx.post(f"{base}/{name}", timeout=60, **BAD_REQUESTS[case]) for name in (task, other)]
    assert 400 <= answers[0].status_code < 500, answers[0].text
    assert answers[0].status_code == answers[1].status_code, [a.text for a in answers]
    assert json.loads(answers[0].text)  # a JSON error body, as every endpoint gives


def saved_lenet5(folder: Path, prepared: Path):
    """An untrained LeNet-5 for the prepared classify data's test split, saved in `folder` as the train stage
    saves models; returns (model, that split, folder, the weights' sha256)."""
    from models import _checkpoint as checkpoint
    from models._registry import build
    from pipelines.datasets import load_classify

    data = load_classify(prepared, "test")
    torch.manual_seed(0)
    model = build("classify", "lenet5", len(data.classes), data.in_channels, data.image_size)
    config = {"task": "classify", "family": "lenet5", "hparams": {}, "num_classes": len(data.classes),
              "in_channels": data.in_channels, "image_size": data.image_size, "classes": data.classes,
              "mean": data.mean, "std": data.std}
    return model, data, folder, checkpoint.save(model, config, folder)


def stages_run(repro_stdout: str) -> set[str]:
    """The stages a `dvc repro` ran, by its `Running stage '...'` lines."""
    return set(re.findall(r"Running stage '([^']+)'", repro_stdout))


def assert_up_to_date(status_stdout: str) -> None:
    """`dvc status` found nothing to run, but for dvc.yaml's `source` stage: it lists the dataset's files on
    every repro (`always_changed`), so status always names it."""
    assert "up to date" in status_stdout.lower() or status_stdout.split() == ["source:", "always", "changed"], \
        status_stdout
