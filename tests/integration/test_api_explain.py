"""POST /explain on a real server: Grad-CAM heatmaps of a trained tiny detector sit in their boxes.

One `python -m services.serve --models-dir` server on 127.0.0.1 (a free port, its own BENTOML_HOME)
serves a LeNet-5 and an FCOS trained here for a few seconds on scenes of two or three digits.
"""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.tasks import ClassifyTask, DetectTask, SegmentTask
from tests.fixtures import digits_splits, raw_data, stop, tiny_scene_params, wait_ready

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UPSCALE = 2  # scenes go out at twice their pixels: the heatmaps must come back at the client's size
DETECT_EPOCHS = 15


def train(task: str, family: str, prepared: Path, directory: Path, params, epochs: int) -> None:
    """`epochs` of `family` with the real engine on all of `prepared`, saved as the train stage does."""
    import torch

    from models import _checkpoint as checkpoint
    from models._registry import build
    from pipelines.engine import EngineSettings, fit
    from pipelines.tasks import get_task

    train_split, val = get_task(task).load_split(prepared, "train"), get_task(task).load_split(prepared, "val")
    size, channels = int(train_split.images.shape[-1]), int(train_split.images.shape[1])
    torch.manual_seed(0)
    model = build(task, family, len(train_split.classes), channels, size)
    cfg = params.train.task(task).updated(epochs=epochs, batch_size=16, warmup_epochs=0, lr=0.003)
    result = fit(model, task, train_split, val, cfg, EngineSettings(device="cpu", channels_last=False, seed=0),
                 log=None)
    checkpoint.save(result.model, {"task": task, "family": family, "hparams": {}, "image_size": size,
                                   "num_classes": len(train_split.classes), "in_channels": channels,
                                   "classes": train_split.classes, "mean": train_split.mean, "std": train_split.std},
                    directory)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, project_params) -> Path:
    """Digits and 200 training scenes of two or three digits on a 40 px canvas."""
    from pipelines.preparation import prepare_from_classify

    root = tmp_path_factory.mktemp("explain")
    scenes = tiny_scene_params(project_params, train_scenes=200, min_items=2)
    prepare_from_classify(raw_data(digits_splits(project_params), root / "raw"), root / "prepared",
                          root / "reports", project_params.augment, scenes, project_params.seed)
    return root / "prepared"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(prepared, project_params, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    train(ClassifyTask.name, "lenet5", prepared / "classify", models / ClassifyTask.name, project_params, 8)
    train(DetectTask.name, "fcos", prepared / "scenes", models / DetectTask.name, project_params, DETECT_EPOCHS)
    port, log = free_port(), tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "services.serve", "--models-dir", str(models),
                                    "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log)
        yield base
    finally:
        stop(process)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(heatmap: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(heatmap["heatmap_png"]))), dtype=np.float64)


def test_each_detections_heatmap_sits_in_its_box(server, prepared):
    from pipelines.datasets import load_scenes

    test = load_scenes(prepared / "scenes", "test")
    checked = 0
    for index in range(4):  # scenes of two or three digits
        image = test.images[index, 0].numpy()
        height, width = image.shape[0] * UPSCALE, image.shape[1] * UPSCALE
        truth = test.targets[index]["boxes"].float().numpy()
        assert len(truth) >= 2 and np.all(np.prod(truth[:, 2:] - truth[:, :2], 1) <= 0.25 * image.size)
        upload = png(np.kron(image, np.ones((UPSCALE, UPSCALE), np.uint8)))
        reply = httpx.post(f"{server}/explain", files={"images": ("scene.png", upload, "image/png")},
                           data={"task": DetectTask.name, "score_threshold": "0.3"}, timeout=60)
        assert reply.status_code == 200, reply.text
        result = reply.json()["results"][0]
        detections, heatmaps = result["detections"], result["explanation"]["heatmaps"]
        assert len(detections) >= 2 and len(heatmaps) == len(detections)
        for detection, heatmap in zip(detections, heatmaps):
            assert heatmap["box"] == detection["box"] and heatmap["score"] == detection["score"]
            x0, y0, x1, y1 = (round(v) for v in detection["box"])
            assert (x1 - x0) * (y1 - y0) <= 0.25 * width * height
            heat = decoded(heatmap)
            assert heat.shape == (height, width)
            inside = heat[y0:y1, x0:x1].sum() / heat.sum()
            assert inside > 0.5, (index, detection, round(float(inside), 3))
            checked += 1
    assert checked >= 8


def test_classify_heatmap_at_the_client_size_and_low_res_in_0_1(server, prepared):
    from pipelines.datasets import load_classify

    digit = load_classify(prepared / "classify", "test").images[0, 0].numpy()
    wide = np.asarray(Image.fromarray(digit).resize((30, 20)))
    reply = httpx.post(f"{server}/explain", files={"images": ("digit.png", png(wide), "image/png")}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["task"] == ClassifyTask.name and reply.headers["X-Model-Version"]
    result = body["results"][0]
    (heatmap,) = result["explanation"]["heatmaps"]
    assert heatmap["class_index"] == result["labels"][0]["class_index"]  # the top class by default
    assert decoded(heatmap).shape == (20, 30) and decoded(heatmap).max() == 255
    low = np.asarray(heatmap["heatmap"])
    assert low.ndim == 2 and max(low.shape) <= 32 and low.min() >= 0 and low.max() <= 1
    asked = httpx.post(f"{server}/explain", json={"image": base64.b64encode(png(digit)).decode(), "class_name": "7"})
    assert asked.status_code == 200 and asked.json()["results"][0]["explanation"]["heatmaps"][0]["label"] == "7"


def test_explain_answers_bad_requests_with_a_4xx(server):
    image = {"images": ("digit.png", png(np.zeros((16, 16), np.uint8)), "image/png")}
    for data, status, message in (({"task": SegmentTask.name}, 422, "cannot be explained"),
                                  ({"class_name": "cow"}, 422, "unknown class"),
                                  ({"class_index": "10"}, 422, "not in 0..9"),
                                  ({"task": DetectTask.name, "class_index": "1"}, 422, "apply to"),
                                  ({"task": "nonsense"}, 422, "task")):
        reply = httpx.post(f"{server}/explain", files=image, data=data, timeout=30)
        assert reply.status_code == status and message in reply.json()["error"], (data, reply.text)
    broken = httpx.post(f"{server}/explain", files={"images": ("x.png", b"not an image", "image/png")}, timeout=30)
    assert broken.status_code == 400, broken.text


def test_bentoml_client_and_latency_series(server, prepared, tmp_path):
    import bentoml
    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.datasets import load_scenes

    path = tmp_path / "scene.png"
    path.write_bytes(png(load_scenes(prepared / "scenes", "test").images[0, 0].numpy()))
    with bentoml.SyncHTTPClient(server) as client:
        answer = client.explain(images=[path], task=DetectTask.name)
    assert answer["task"] == DetectTask.name and answer["results"][0]["explanation"]["heatmaps"]
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}
    counts = {s.labels["task"]: s.value for s in families["convforge_explain_seconds"].samples
              if s.name.endswith("_count")}
    assert counts[DetectTask.name] >= 5 and counts[ClassifyTask.name] >= 2
