"""The real service: tiny models trained here, packaged into a Bento, served by the Dockerfile's commands.

One module-scoped server on 127.0.0.1 (a free port), started exactly as the Docker image
starts it (its RUN import step, its CMD, its HEALTHCHECK), answers real PNG/JPEG/grey/RGBA/
16-bit/large images over multipart and base64 JSON; answers are checked against the same
models run directly through the training engine; every bad input gets its 4xx.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.datasets import ITEMS_DATA
from pipelines.tasks import get_task
from tests.fixtures import stop

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
FAMILIES = {"classify": ("lenet5", {}), "detect": ("fcos", {}), "segment": ("unet", {"depth": 2, "width": 8}),
            "regress": ("lenet5", {}), "reconstruct": ("unet", {"depth": 2, "width": 8})}


# ---------------------------------------------------------------- the Dockerfile, parsed


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, argument) pairs of the Dockerfile, continuation lines joined."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line[:-1].strip()}" if line.endswith("\\") else f"{current} {line}"
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def as_argv(argument: str) -> list[str]:
    """A CMD/RUN argument in exec (JSON) or shell form as argv."""
    return json.loads(argument) if argument.startswith("[") else shlex.split(argument)


def runtime_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage (PATH aside)."""
    env, stage = {}, 0
    for instruction, argument in dockerfile_instructions():
        if instruction == "FROM":
            stage += 1
            env = {}
        elif instruction == "ENV":
            for pair in shlex.split(argument):
                key, _, value = pair.partition("=")
                if key != "PATH":
                    env[key] = value
    return env


# ---------------------------------------------------------------- fixtures


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_tiny(task: str, prepared: Path, directory: Path, params) -> None:
    """A few optimizer steps of a small family with the real engine, saved as the train stage does."""
    from models import _checkpoint as checkpoint
    from models._registry import build, families
    from pipelines.engine import EngineSettings, fit

    family, hparams = FAMILIES[task]
    family = family if family in families(task) else families(task)[0]
    load = get_task(task).load_split
    train, val = load(prepared, "train").subset(64, 0), load(prepared, "val").subset(8, 0)
    size, channels = int(train.images.shape[-1]), int(train.images.shape[1])
    model = build(task, family, len(train.classes), channels, size, **hparams)
    cfg = params.train.task(task).updated(epochs=1, batch_size=16, warmup_epochs=0)
    result = fit(model, task, train, val, cfg, EngineSettings(device="cpu", channels_last=False, seed=0), log=None)
    served = {"score_threshold": median_score(result.model, prepared)} if task == "detect" else {}
    checkpoint.save(result.model, {**served,
        "task": task, "family": family, "hparams": hparams, "num_classes": len(train.classes),
        "in_channels": channels, "image_size": size, "classes": train.classes, "mean": train.mean,
        "std": train.std, "mlflow_run_id": f"run-{task}", "registered_model": f"convforge-{task}",
        "registered_version": "3", "search_trial_id": f"trial-{task}", "data_hash": "md5-test",
        "git_commit": "0123abc"}, directory)


def median_score(model, prepared: Path) -> float:
    """The median score of the detector's detections on test scene 0: a stored threshold the served default shows."""
    from pipelines.datasets import load_scenes
    from pipelines.engine import EngineSettings, predict

    data = load_scenes(prepared, "test")
    (out,) = predict(model, "detect", data.images[:1], data.mean, data.std, EngineSettings(device="cpu"))
    return round(float(out["scores"].median()), 6)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, prepared_classify, prepared_scenes, project_params) -> Path:
    root = tmp_path_factory.mktemp("artifacts") / "models"
    for task in FAMILIES:
        items = get_task(task).data == ITEMS_DATA  # classify, regress and reconstruct read the classify items
        train_tiny(task, prepared_classify if items else prepared_scenes, root / task, project_params)
    return root


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    """package -> .bento archive -> the Dockerfile's RUN import, CMD and HEALTHCHECK, on 127.0.0.1."""
    work = tmp_path_factory.mktemp("serving")
    home, out, port = work / "bentoml", work / "bento", free_port()
    base_env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    promotion = work / "promotion"  # the promote stage's report: the champion's hash and test metrics
    promotion.mkdir()
    weights = models_dir / "classify" / "model.safetensors"
    (promotion / "classify.json").write_text(json.dumps({"champion": {
        "version": 1, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "metrics": {"test_accuracy": 0.5}}}))
    code = ("import pipelines.runtime; from pathlib import Path; from pipelines.stages.package import package; "
            f"package(Path({str(models_dir)!r}), Path({str(promotion)!r}), Path({str(out)!r}))")
    packaged = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=base_env, capture_output=True,
                              text=True, timeout=300)
    assert packaged.returncode == 0, packaged.stderr[-3000:]
    summary = json.loads((out / "bento.json").read_text())

    env = {**base_env, **runtime_env(), "BENTOML_HOME": str(home), "CONVFORGE_BENTO": str(out / summary["archive"]),
           "CONVFORGE_HOST": "127.0.0.1", "CONVFORGE_PORT": str(port)}
    steps = dockerfile_instructions()
    for instruction, argument in steps:
        if instruction == "RUN" and "services.serve" in argument:
            argv = as_argv(argument)
            step = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=120)
            assert step.returncode == 0, step.stderr[-2000:]
    cmd = as_argv(next(arg for ins, arg in steps if ins == "CMD"))
    health = as_argv(next(arg for ins, arg in steps if ins == "HEALTHCHECK").split("CMD", 1)[1].strip())
    log = open(work / "server.log", "w")
    process = subprocess.Popen([sys.executable, *cmd[1:]], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    seen = []
    try:
        deadline = time.monotonic() + 150
        with httpx.Client(base_url=base, timeout=5) as client:
            while time.monotonic() < deadline:
                assert process.poll() is None, (work / "server.log").read_text()[-3000:]
                try:
                    live, ready = client.get("/livez").status_code, client.get("/readyz").status_code
                except httpx.TransportError:
                    time.sleep(0.1)
                    continue
                seen.append((live, ready))
                if ready == 200:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("service never became ready:\n" + (work / "server.log").read_text()[-3000:])
            metrics_at_ready = client.get("/metrics").text
        healthy = subprocess.run([sys.executable, *health[1:]], cwd=ROOT, env=env, timeout=30).returncode
        with httpx.Client(base_url=base, timeout=60) as client:
            yield {"client": client, "base": base, "seen": seen, "summary": summary, "healthy": healthy,
                   "metrics_at_ready": metrics_at_ready, "env": env, "log": work / "server.log"}
    finally:
        stop(process)
        log.close()


# ---------------------------------------------------------------- images


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scene(prepared_scenes: Path, index: int = 0) -> tuple[np.ndarray, Image.Image]:
    from pipelines.datasets import load_scenes

    data = load_scenes(prepared_scenes, "test")
    array = data.images[index].numpy()  # [C, H, W]
    return array, Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))


def direct(models_dir: Path, task: str, images: np.ndarray):
    """The model run directly through the engine on uint8 [N, C, H, W] images."""
    from models import _checkpoint as checkpoint
    from pipelines.engine import EngineSettings, predict

    model, config = checkpoint.load(models_dir / task)
    settings = EngineSettings(device="cpu", channels_last=False)
    return predict(model, task, torch.from_numpy(images), config["mean"], config["std"], settings), config


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------- lifecycle, lineage, Docker


def test_ready_only_after_warm_up_and_healthcheck_passes(server):
    from prometheus_client.parser import text_string_to_metric_families

    assert server["seen"][0] == (200, 503), server["seen"][:3]  # alive, not ready, before warm-up
    assert server["healthy"] == 0
    at_ready = {f.name: f for f in text_string_to_metric_families(server["metrics_at_ready"])}
    warmed = {s.labels["task"] for s in at_ready["convforge_model_warmup_seconds"].samples if s.value > 0}
    assert warmed == set(FAMILIES)  # every model had run its warm-up when /readyz first said 200


def test_version_lineage_and_header(server):
    from pipelines.runtime import probe

    client, summary = server["client"], server["summary"]
    version = client.get("/version").json()
    assert version["bento"] == summary["bento"]
    device = "cuda" if probe().gpus else "cpu"  # serve.device: auto
    assert version["device"] == device and all(model["device"] == device for model in version["models"].values())
    for task in FAMILIES:
        model = version["models"][task]
        assert model["tag"] == summary["models"][task]
        assert model["mlflow_run_id"] == f"run-{task}" and model["search_trial_id"] == f"trial-{task}"
        assert model["git_commit"] == "0123abc" and model["data_hash"] == "md5-test"
        assert model["registered_version"] == "3"
    assert version["models"]["classify"]["metrics"] == {"test_accuracy": 0.5}
    reply = client.post("/classify", json={"image": b64(encode(Image.new("L", (16, 16))))})
    assert reply.headers["X-Model-Version"] == summary["models"]["classify"]


def test_every_dockerfile_run_command_is_exercised():
    """A RUN step the test does not run must be OS set-up or the same pyproject install CI runs."""
    for instruction, argument in dockerfile_instructions():
        if instruction != "RUN":
            continue
        assert ("services.serve" in argument or argument.startswith(("python -m venv", "useradd"))
                or (argument.startswith("pip install") and argument.rstrip().endswith(" ."))), argument
    instructions = [i for i, _ in dockerfile_instructions()]
    assert instructions.count("FROM") >= 2 and "USER" in instructions and "HEALTHCHECK" in instructions


# ---------------------------------------------------------------- answers vs the model run directly


def test_classify_matches_the_model_multipart_and_json(server, models_dir, prepared_classify):
    from pipelines.datasets import load_classify

    data = load_classify(prepared_classify, "test")
    images = data.images[:3].numpy()
    expected, config = direct(models_dir, "classify", images)
    files = [("images", (f"{i}.png", encode(Image.fromarray(im[0])), "image/png")) for i, im in enumerate(images)]
    reply = server["client"].post("/classify", files=files, data={"top_k": "3"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["schema_version"] == "1.3" and body["task"] == "classify" and len(body["results"]) == 3
    for result, probs in zip(body["results"], expected.numpy()):
        assert result["in_domain"] is True and "reason" not in result  # its own test items
        top = result["labels"]
        assert len(top) == 3 and top[0]["class_index"] == int(probs.argmax())
        assert top[0]["label"] == config["classes"][int(probs.argmax())]
        assert top[0]["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    as_json = server["client"].post("/classify", json={"images": [b64(encode(Image.fromarray(images[0][0])))],
                                                       "top_k": 3}).json()
    assert as_json["results"][0]["labels"] == body["results"][0]["labels"]


def test_detect_matches_the_model_with_boxes_in_input_pixels(server, models_dir, prepared_scenes):
    array, image = scene(prepared_scenes)
    expected, config = direct(models_dir, "detect", array[None])
    reply = server["client"].post("/detect", json={"image": b64(encode(image)), "score_threshold": 0.0,
                                                   "max_detections": 5, "nms": "per_class"})
    assert reply.status_code == 200, reply.text
    detections = reply.json()["results"][0]["detections"]
    scores = expected[0]["scores"].numpy()
    order = np.argsort(-scores)[:5]
    assert len(detections) == len(order)
    for det, i in zip(detections, order):
        assert det["score"] == pytest.approx(float(scores[i]), abs=1e-4)
        assert det["box"] == pytest.approx(expected[0]["boxes"][i].tolist(), abs=1e-2)
        assert det["class_index"] == int(expected[0]["labels"][i])
    # Twice the size: the same objects, boxes in the bigger image's pixels (xywh here).
    big = image.resize((image.width * 2, image.height * 2), Image.NEAREST)
    scaled = server["client"].post("/detect", files={"images": ("big.png", encode(big), "image/png")},
                                   data={"score_threshold": "0", "max_detections": "5", "box_format": "xywh",
                                         "nms": "per_class"})
    assert scaled.status_code == 200, scaled.text
    result = scaled.json()["results"][0]
    assert (result["width"], result["height"]) == (big.width, big.height)
    for det in result["detections"]:
        x, y, w, h = det["box"]
        assert 0 <= x <= x + w <= big.width + 1e-6 and 0 <= y <= y + h <= big.height + 1e-6


def test_detect_defaults_to_the_models_threshold_and_one_label_per_box(server, models_dir, prepared_scenes):
    from pipelines.metrics import one_label_per_box

    array, image = scene(prepared_scenes)
    (expected,), config = direct(models_dir, "detect", array[None])
    stored = config["score_threshold"]  # chosen on val by training; here scene 0's median score
    above = expected["scores"] >= stored
    kept = one_label_per_box(expected["boxes"][above], expected["scores"][above])
    served = server["client"].post("/detect", json={"image": b64(encode(image))}).json()["results"][0]["detections"]
    assert [d["score"] for d in served] == pytest.approx(expected["scores"][above][kept].tolist(), abs=1e-4)
    assert 0 < len(served) < len(expected["scores"])  # the default threshold drops some, keeps some
    assert min(d["score"] for d in served) >= stored
    every = server["client"].post("/detect", json={"image": b64(encode(image)), "score_threshold": 0.0,
                                                   "nms": "per_class"}).json()["results"][0]["detections"]
    assert len(every) == len(expected["scores"])


def test_segment_matches_the_model_at_input_size(server, models_dir, prepared_scenes):
    from services.schemas import Mask, decode_mask

    array, image = scene(prepared_scenes, 1)
    expected, config = direct(models_dir, "segment", array[None])
    reply = server["client"].post("/segment", files={"images": ("s.png", encode(image), "image/png")})
    assert reply.status_code == 200, reply.text
    result = reply.json()["results"][0]
    mask = decode_mask(Mask(**result["mask"]))
    assert mask.shape == (image.height, image.width)
    assert (mask == expected[0].numpy()).mean() > 0.999
    counts = np.bincount(mask.reshape(-1), minlength=len(config["classes"]) + 1)
    assert result["class_pixels"] == {config["classes"][c]: int(counts[c + 1])
                                      for c in range(len(config["classes"])) if counts[c + 1]}
    rle = server["client"].post("/segment", json={"image": b64(encode(image)), "mask_format": "rle"}).json()
    for label, encoded in rle["results"][0].get("class_masks", {}).items():
        assert decode_mask(Mask(**encoded)).sum() == result["class_pixels"][label]
    wide = image.resize((image.width * 3, image.height), Image.NEAREST)  # letterboxed, then mapped back
    reply = server["client"].post("/segment", json={"image": b64(encode(wide, "JPEG")), "mask_format": "png"})
    assert decode_mask(Mask(**reply.json()["results"][0]["mask"])).shape == (wide.height, wide.width)


@pytest.mark.parametrize("name, data", [
    ("grey png", lambda: encode(Image.new("L", (30, 20), 128))),
    ("rgb jpeg", lambda: encode(Image.new("RGB", (33, 17), (10, 200, 30)), "JPEG")),
    ("rgba png", lambda: encode(Image.new("RGBA", (16, 16), (255, 0, 0, 100)))),
    ("16-bit png", lambda: encode(Image.fromarray(np.full((20, 24), 40000, np.uint16)))),
    ("large jpeg", lambda: encode(Image.new("RGB", (2400, 1600), (90, 90, 90)), "JPEG", quality=60)),
])
def test_any_mode_and_size_on_every_endpoint(server, name, data):
    payload = data()
    width, height = Image.open(io.BytesIO(payload)).size
    for endpoint in FAMILIES:
        reply = server["client"].post(f"/{endpoint}", json={"images": [b64(payload)]})
        assert reply.status_code == 200, (name, endpoint, reply.text)
        result = reply.json()["results"][0]
        assert (result["width"], result["height"]) == (width, height)


def test_out_of_domain_uploads_say_why(server):
    y, x = np.mgrid[0:512, 0:512] / 512
    photo = (np.stack([0.5 + 0.4 * np.sin(6 * x), 0.4 + 0.3 * y, 0.6 - 0.4 * x * y], axis=2) * 255).astype(np.uint8)
    reply = server["client"].post("/classify", json={"image": b64(encode(Image.fromarray(photo), "JPEG"))})
    assert reply.status_code == 200, reply.text
    result = reply.json()["results"][0]
    assert result["in_domain"] is False
    assert "colour image for a greyscale model" in result["reason"] and "larger than the training" in result["reason"]
    metrics = server["client"].get("/metrics").text
    assert 'convforge_out_of_domain_total{' in metrics and 'reason_kind="channels"' in metrics


# ---------------------------------------------------------------- bad input: 4xx, one line


BAD = [
    ("non-image bytes", dict(files={"images": ("x.png", b"hello, not an image", "image/png")}), 400),
    ("truncated png", dict(files={"images": ("t.png", encode(Image.new("L", (300, 300), 9))[:200], "image/png")}),
     400),
    ("empty body", dict(content=b"", headers={"Content-Type": "application/json"}), 400),
    ("empty file", dict(files={"images": ("e.png", b"", "image/png")}), 400),
    ("zero-size image", dict(json={"image": b64(bomb_png(0, 5))}), 400),
    ("decompression bomb", dict(json={"image": b64(bomb_png(30000, 30000))}), 413),
    ("over the pixel cap", dict(json={"image": b64(bomb_png(5000, 5000))}), 413),
    ("too many images", dict(json={"images": [b64(encode(Image.new("L", (4, 4))))] * 33}), 413),
    ("wrong field name", dict(json={"imagez": ["x"]}), 422),
    ("wrong multipart field", dict(files={"picture": ("a.png", b"x", "image/png")}), 422),
    ("wrong type", dict(json={"images": "not-a-list"}), 422),
    ("wrong option type", dict(json={"image": "aGk=", "top_k": "many"}), 422),
    ("option out of range", dict(json={"image": "aGk=", "score_threshold": 7}), 422),
    ("bad base64", dict(json={"images": ["%%%not base64%%%"]}), 400),
    ("invalid json", dict(content=b"{images: [", headers={"Content-Type": "application/json"}), 400),
    ("over-size upload", dict(content=b"0" * (10 * 2**20 + 1), headers={"Content-Type": "application/json"}), 413),
    ("pickle content type", dict(content=b"\x80\x04K\x01.", headers={"Content-Type": "application/vnd.bentoml+pickle"}),
     415),
    ("other content type", dict(content=b"abc", headers={"Content-Type": "text/plain"}), 415),
]


@pytest.mark.parametrize("name, request_kw, status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_4xx_with_one_line(server, name, request_kw, status):
    for endpoint in ("/classify", "/segment") if name in ("non-image bytes", "pickle content type") else ("/detect",):
        reply = server["client"].post(endpoint, **request_kw)
        assert reply.status_code == status, (name, reply.status_code, reply.text)
        message = reply.json()["error"]
        assert message and "\n" not in message and "Traceback" not in message


def test_pickle_is_refused_on_every_route(server):
    for method, path in (("POST", "/version"), ("POST", "/readyz"), ("POST", "/metrics"), ("POST", "/nowhere"),
                         ("GET", "/version")):
        reply = server["client"].request(method, path, content=b"\x80\x04K\x01.",
                                         headers={"Content-Type": "application/vnd.bentoml+pickle"})
        assert reply.status_code == 415, (method, path, reply.status_code)


# ---------------------------------------------------------------- OpenAPI fuzzing, metrics


def prediction_requests(client: httpx.Client) -> dict[str, float]:
    """convforge_requests_total per task, every outcome, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples if family.name == "convforge_requests" else ():
            if sample.name.endswith("_total"):
                counts[sample.labels["task"]] = counts.get(sample.labels["task"], 0.0) + sample.value
    return counts


def test_schemathesis_finds_no_server_error(server, tmp_path):
    spec = server["client"].get("/docs.json").json()
    for path in ("/classify", "/detect", "/segment"):
        # BentoML documents one content type per api: the multipart upload (JSON with base64 is in the description)
        body = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        assert body["schema"]["properties"]["images"]["items"] == {"type": "string", "format": "binary"}
        assert "base64" in body["schema"]["properties"]["images"]["description"]
    assert "get" in spec["paths"]["/version"]
    before = prediction_requests(server["client"])
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server['base']}/docs.json",
         "--checks", "not_a_server_error", "--max-examples", "6", "--seed", "7", "--request-timeout", "30",
         "--workers", "1", "--suppress-health-check", "all"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**os.environ, "NO_COLOR": "1"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"Tested: {len(spec['paths'])}" in run.stdout, run.stdout[-2000:]
    after = prediction_requests(server["client"])
    assert all(after.get(task, 0) > before.get(task, 0) for task in FAMILIES), (before, after)  # it reached them


def test_metrics_parse_and_hold_the_series(server):
    from prometheus_client.parser import text_string_to_metric_families

    client = server["client"]
    client.post("/classify", json={"image": b64(encode(Image.new("L", (16, 16), 3)))})
    client.post("/detect", json={"image": b64(encode(Image.new("L", (40, 40), 3))), "score_threshold": 0})
    client.post("/segment", json={"image": b64(encode(Image.new("L", (40, 40), 3)))})
    client.post("/classify", content=b"junk", headers={"Content-Type": "application/json"})
    families = {family.name: family for family in text_string_to_metric_families(client.get("/metrics").text)}
    for name in ("convforge_requests", "convforge_queue_seconds", "convforge_preprocess_seconds",
                 "convforge_inference_seconds", "convforge_postprocess_seconds", "convforge_request_bytes",
                 "convforge_image_pixels", "convforge_predictions", "convforge_score",
                 "convforge_detections_per_image", "convforge_mask_area_fraction", "convforge_batch_size",
                 "convforge_model_load_seconds", "convforge_model_warmup_seconds", "convforge_model_info"):
        assert name in families and families[name].samples, name
    assert any(name.startswith("bentoml_service_request") for name in families)
    outcomes = {(s.labels["task"], s.labels["status_class"]) for s in families["convforge_requests"].samples
                if s.name.endswith("_total")}
    assert {("classify", "2xx"), ("classify", "4xx"), ("detect", "2xx"), ("segment", "2xx")} <= outcomes
    info = {(s.labels["task"], s.labels["family"]) for s in families["convforge_model_info"].samples}
    assert {task for task, _ in info} == set(FAMILIES)
    served = {s.labels["model_version"] for s in families["convforge_model_info"].samples}
    counted = {s.labels["model_version"] for s in families["convforge_requests"].samples}
    assert counted <= served | {"none"}, (counted, served)  # the bare version, as every other series spells it
    allowed = {"task", "endpoint", "model_version", "status_class", "class", "family", "backend", "le",
               "reason_kind", "name"}  # name: a regress model's target names, fixed by the model
    for name, family in families.items():
        if name.startswith("convforge_"):
            for sample in family.samples:
                assert set(sample.labels) <= allowed, (name, sample.labels)


# ---------------------------------------------------------------- BentoML's clients, /schema.json, the README


def test_bentoml_clients_call_every_task_by_name(server, tmp_path):
    import bentoml

    shirt, scene_file = tmp_path / "shirt.png", tmp_path / "scene.png"
    shirt.write_bytes(encode(Image.new("L", (28, 28), 90)))
    scene_file.write_bytes(encode(Image.new("RGB", (64, 48), (20, 120, 60))))
    routes = {route["name"]: route for route in server["client"].get("/schema.json").json()["routes"]}
    assert {name: route["route"] for name, route in routes.items()} == {
        **{task: f"/{task}" for task in FAMILIES}, "explain": "/explain"}
    curl_style = server["client"].post("/classify", files={"images": ("shirt.png", shirt.read_bytes(), "image/png")},
                                       data={"top_k": "3"}).json()
    with bentoml.SyncHTTPClient(server["base"]) as client:
        by_path = client.classify(images=[shirt], top_k=3)
        assert by_path["results"][0]["labels"] == curl_style["results"][0]["labels"]
        as_pil = client.classify(images=[Image.open(shirt)], top_k=3)  # a PIL image opened from a file
        assert as_pil["results"][0]["labels"] == curl_style["results"][0]["labels"]
        detected = client.detect(images=[scene_file, str(scene_file)], score_threshold=0.0, box_format="xywh")
        assert [r["width"] for r in detected["results"]] == [64, 64] and detected["box_format"] == "xywh"
        segmented = client.segment(images=[scene_file], mask_format="rle")
        assert segmented["mask_format"] == "rle" and "class_pixels" in segmented["results"][0]
    paths = server["client"].get("/docs.json").json()["paths"]
    assert {f"/{task}" for task in FAMILIES} | {"/explain"} <= {path for path, item in paths.items() if "post" in item}


def test_bentoml_async_client(server, tmp_path):
    """One call with a path, and 16 at once with opened images, as the README does (its client closes the files
    it opened from paths whenever any call ends, so concurrent calls with paths fail with 'read of closed file')."""
    import asyncio

    import bentoml

    image = tmp_path / "scene.png"
    image.write_bytes(encode(Image.new("L", (40, 40), 30)))
    sides = range(24, 40)

    async def main():
        async with bentoml.AsyncHTTPClient(server["base"]) as client:
            one = await client.segment(images=[image], mask_format="none")
            many = await asyncio.gather(*(client.classify(images=[Image.open(io.BytesIO(encode(
                Image.new("L", (side, side), side))))]) for side in sides))
            return one, many

    body, answers = asyncio.run(main())
    assert body["task"] == "segment" and (body["results"][0]["width"], body["results"][0]["height"]) == (40, 40)
    assert [answer["results"][0]["width"] for answer in answers] == list(sides)


def test_a_text_images_field_is_422_and_never_fetched(server):
    with socket.socket() as listener:  # where a URL-following reader would connect
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
        for text in (url, "not a url", "http://127.0.0.1:1/x"):
            reply = server["client"].post("/classify", files={"images": (None, text)})
            assert reply.status_code == 422, (text, reply.status_code, reply.text)
            assert "file upload" in reply.json()["error"]
        import bentoml
        from bentoml.exceptions import UnprocessableEntity

        with bentoml.SyncHTTPClient(server["base"]) as client, pytest.raises(UnprocessableEntity, match="file upload"):
            client.classify(images=[url])  # BentoML's client sends a URL as a form text field
        with pytest.raises(socket.timeout):
            listener.accept()


def readme_serving() -> tuple[list[str], str]:
    """The README's Serving section: its `curl` lines and its Python snippet."""
    section = (ROOT / "README.md").read_text().split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")
    curls = [line for block in blocks[1::2] if block.startswith("bash")
             for line in block.splitlines() if line.startswith("curl ")]
    (python,) = [block.removeprefix("python\n") for block in blocks[1::2] if block.startswith("python\n")]
    return curls, python


def check_documented_fields(line: str, answer: dict) -> None:
    """A README prediction line's answer: its task, the `-F` options it sends, what its comment promises."""
    command, _, comment = line.partition("#")
    fields = dict(arg.split("=", 1) for arg in shlex.split(command) if "=" in arg and not arg.startswith("http"))
    assert answer["schema_version"] == "1.3" and answer["task"] == command.split()[-1].rsplit("/", 1)[1]
    for result in answer["results"]:
        if "top_k" in fields:
            assert len(result["labels"]) == int(fields["top_k"])
        if '"in_domain": false' in comment:
            assert result["in_domain"] is False and result["reason"]
    for echoed in ("box_format", "mask_format"):
        if echoed in fields:
            assert answer[echoed] == fields[echoed]


def test_readme_serving_commands_run_verbatim(server, tmp_path):
    """Every `curl` line and the client snippet of README.md's Serving section, on the test server's port."""
    curls, python = readme_serving()
    port = server["base"].rsplit(":", 1)[1]
    (tmp_path / ".curlrc").write_text('silent\nshow-error\nwrite-out = "\\n%{http_code}"\n')  # status after body
    env = {**os.environ, "CURL_HOME": str(tmp_path)}
    seen = set()
    for line in curls:
        run = subprocess.run(["bash", "-c", line.replace(":3000", f":{port}")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        body, _, status = run.stdout.rpartition("\n")
        assert run.returncode == 0 and status == "200", (line, run.stderr, run.stdout[-500:])
        route = line.partition("#")[0].split()[-1].rsplit("/", 1)[1]
        seen.add(route)
        if route in FAMILIES:
            check_documented_fields(line, json.loads(body))
        elif route == "version":
            assert set(json.loads(body)["models"]) == set(FAMILIES)
        elif route == "metrics":
            assert "convforge_requests_total" in body
    assert seen >= {*FAMILIES, "version", "readyz", "metrics"}, seen
    run = subprocess.run([sys.executable, "-c", python.replace(":3000", f":{port}")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.splitlines()
    assert printed and all("'schema_version': '1.3'" in line for line in printed), run.stdout[-2000:]
