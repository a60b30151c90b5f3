"""serve.backend (services/backends.py): auto from bench/serve.py's figures, and the package stage's record of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipelines.tasks import ClassifyTask, DetectTask, SegmentTask
from services.backends import choose, read_figures

ROOT = Path(__file__).resolve().parents[2]
CLASSIFY, DETECT, SEGMENT = ClassifyTask.name, DetectTask.name, SegmentTask.name


def figures_file(tmp_path: Path) -> Path:
    """What bench/serve.py writes: onnx faster for classify, slower for segment, not measured for detect."""
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"rows": [], "backends": {
        CLASSIFY: {"torch": {"rps_1": 150.0, "rps_peak": 400.0}, "onnx": {"rps_1": 300.0, "rps_peak": 900.0}},
        SEGMENT: {"torch": {"rps_1": 40.0, "rps_peak": 60.0}, "onnx": {"rps_1": 45.0, "rps_peak": 55.0}},
        DETECT: {"torch": {"rps_1": 30.0, "rps_peak": 50.0}, "onnx": None}}}))
    return path


def test_auto_takes_the_backend_the_figures_say_serves_more_at_peak(tmp_path):
    figures = read_figures(figures_file(tmp_path))
    backend, reason = choose(CLASSIFY, "auto", True, True, figures)
    assert backend == "onnx" and "900" in reason and "400" in reason
    backend, reason = choose(SEGMENT, "auto", True, True, figures)
    assert backend == "torch" and "60" in reason and "55" in reason


def test_auto_stays_on_torch_without_figures_or_an_onnx_figure(tmp_path):
    backend, reason = choose(CLASSIFY, "auto", True, True, read_figures(tmp_path / "absent.json"))
    assert backend == "torch" and "no serving figures" in reason
    (tmp_path / "old.json").write_text(json.dumps({"rows": []}))  # a result file from before `backends`
    assert read_figures(tmp_path / "old.json") is None
    backend, reason = choose(DETECT, "auto", True, True, read_figures(figures_file(tmp_path)))
    assert backend == "torch" and f"no {DETECT} figure for onnx" in reason


def test_onnx_needs_an_exported_graph_of_a_fixed_size(tmp_path):
    figures = read_figures(figures_file(tmp_path))
    for asked in ("onnx", "auto"):
        assert choose(CLASSIFY, asked, False, True, figures) == (
            "torch", "no model.onnx beside the weights (exported by the package stage)")
        backend, reason = choose(SEGMENT, asked, True, False, figures)
        assert backend == "torch" and "native" in reason
    assert choose(SEGMENT, "onnx", True, True, figures) == ("onnx", "serve.backend: onnx")
    assert choose(CLASSIFY, "torch", True, True, figures) == ("torch", "serve.backend: torch")


PACKAGE_AND_SERVE = """
import json, sys
from pathlib import Path
import pipelines.runtime
import torch
from models import _checkpoint as checkpoint
from models._registry import build
from pipelines.packaging import import_model, serving_choice
from pipelines.params import load_params
from services import catalog
from services.runners import load_runner

work, figures = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
config = {"task": "classify", "family": "lenet5", "hparams": {}, "num_classes": 3, "in_channels": 1,
          "image_size": 16, "classes": ["a", "b", "c"], "mean": [0.3], "std": [0.2]}
checkpoint.save(build("classify", "lenet5", 3, 1, 16), config, work / "model")
serve = load_params(Path("params.yaml")).serve.model_copy(update={"backend": "auto", "scale": "fit"})
tag, report, choice = import_model("classify", work / "model", None, backend_of=serving_choice(serve, figures))
again = import_model("classify", work / "model", None, backend_of=serving_choice(serve, figures))
(source,) = catalog.from_store()
runner = load_runner("classify", source.directory, name=source.name, version=source.version, backend="auto",
                     max_batch_size=2, max_latency_ms=1000, lineage=source.lineage)
import bentoml
labels = dict(bentoml.models.get(tag).info.labels)
print(json.dumps({"choice": choice, "same_tag": again[0] == tag, "label": labels["backend"],
                  "card": runner.card.backend, "reason": runner.card.lineage["backend_reason"]}))
"""


def test_the_package_stage_records_the_choice_and_the_service_serves_it(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    env.pop("CONVFORGE_MODELS_DIR", None)
    run = subprocess.run([sys.executable, "-c", PACKAGE_AND_SERVE, str(tmp_path), str(figures_file(tmp_path))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["choice"][0] == found["label"] == found["card"] == "onnx" and found["same_tag"]
    assert found["reason"] == found["choice"][1] and "900" in found["reason"]


# ---------------------------------------------------------------- serve.device


def test_serve_device_auto_is_the_cpu_here_and_cuda_without_a_gpu_is_a_user_error():
    import pytest

    from pipelines.errors import ConvForgeError
    from pipelines.runtime import probe
    from services.backends import on_device, onnx_providers, serve_device

    if probe().gpus:
        pytest.skip("this machine has a GPU")
    assert serve_device("auto") == "cpu" and serve_device("cpu") == "cpu"
    with pytest.raises(ConvForgeError, match=r"^serve\.device is 'cuda' but no CUDA device is available"):
        serve_device("cuda")
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    assert on_device("onnx", "serve.backend: onnx", "cpu") == ("onnx", "serve.backend: onnx")
    assert on_device("torch", "why", "cuda") == ("torch", "why")


def test_serve_device_cuda_without_a_gpu_stops_the_server_in_one_line(tmp_path, monkeypatch, capsys):
    import pytest
    import yaml

    from pipelines.runtime import probe
    from services import serve
    from services.catalog import MODELS_DIR_ENV

    if probe().gpus:
        pytest.skip("this machine has a GPU")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"]["device"] = "cuda"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {"CONVFORGE_PARAMS": params, "BENTOML_HOME": tmp_path / "bentoml", MODELS_DIR_ENV: tmp_path}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))  # restored afterwards, also where serve.main changes them
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        serve.main(["--models-dir", str(tmp_path)])  # stops before it would start (exec) the server
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ("error: serve.device is 'cuda' but no CUDA device is available "
                                       "(use 'auto' or 'cpu')\n")
