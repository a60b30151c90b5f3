"""The whole chain in a temp clone: `dvc repro` on digits, a second repro that runs only its source listing,
MLflow, the Bento served.

One module-scoped pipeline run (tiny params: digits, two families, two trials, one
epoch) is shared by the checks below; it takes a few minutes on 2 cores. It records the params
each stage reads (CONVFORGE_PARAMS_TRACE), so dvc.yaml's deps and params are checked against it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.tasks import TASKS
from tests.fixtures import assert_up_to_date, stages_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

TINY = {
    "data.dataset": "digits",
    "augment.preview_count": 16,
    "scenes.canvas_size": 32,
    "scenes.max_items": 2,
    "scenes.train_scenes": 48,
    "scenes.val_scenes": 12,
    "scenes.test_scenes": 12,
    "search.max_concurrent": 2,
    "search.classify.families": ["lenet5", "resnet"],
    "search.classify.num_samples": 2,
    "search.classify.max_epochs": 1,
    "search.classify.time_budget_s": 120,
    "search.classify.train_subset": 400,
    "search.detect.families": ["fcos"],
    "search.detect.num_samples": 1,
    "search.detect.max_epochs": 1,
    "search.detect.train_subset": 48,
    "search.segment.families": ["unet"],
    "search.segment.num_samples": 1,
    "search.segment.max_epochs": 1,
    "search.segment.train_subset": 48,
    "search.regress.families": ["lenet5"],
    "search.regress.num_samples": 1,
    "search.regress.max_epochs": 1,
    "search.regress.train_subset": 400,
    "search.reconstruct.families": ["unet"],
    "search.reconstruct.num_samples": 1,
    "search.reconstruct.max_epochs": 1,
    "search.reconstruct.train_subset": 400,
    "train.classify.epochs": 1,
    "train.detect.epochs": 1,
    "train.segment.epochs": 1,
    "train.regress.epochs": 1,
    "train.reconstruct.epochs": 1,
    # One epoch on tiny data cannot reach the default bounds: the gate here only compares with the champion.
    "promote.classify.min": {},
    "promote.classify.max": {},
    "promote.detect.min": {},
    "promote.segment.min": {},
    "promote.regress.max": {},
    "promote.reconstruct.min": {},
}


def set_params(path: Path, overrides: dict) -> None:
    """Apply dotted-key overrides to a params.yaml."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        assert leaf in node, f"{dotted} is not a key of params.yaml"
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 1500) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def clone(dest: Path) -> None:
    """A git clone of the working tree as it is now (tracked and untracked-not-ignored files)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, check=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A temp clone where the tiny pipeline has run once."""
    root = tmp_path_factory.mktemp("clone")
    clone(root)
    port = free_port()
    set_params(root / "params.yaml", {**TINY, "serve.port": port})
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "tiny params"],
                   cwd=root, check=True)
    traces = tmp_path_factory.mktemp("params-traces")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "BENTOML_HOME": str(root / ".bentoml"),
           "PYTHONUNBUFFERED": "1", "CONVFORGE_PARAMS_TRACE": str(traces)}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    first = run(["dvc", "repro"], root, env)
    print(f"first dvc repro: {time.monotonic() - started:.0f} s")
    return {"root": root, "env": env, "port": port, "first": first, "traces": traces}


@pytest.mark.timeout(1800)  # its fixture runs the whole tiny pipeline, five tasks
def test_every_stage_ran_and_status_is_clean(project):
    root, env = project["root"], project["env"]
    for stage in ("source", "fetch", "augment", "search@classify", "train@detect", "evaluate@segment",
                  "promote@classify", "package"):
        assert f"Running stage '{stage}'" in project["first"].stdout
    for task in TASKS:
        best = json.loads((root / f"artifacts/search/{task}/best.json").read_text())
        assert best["family"] in TINY[f"search.{task}.families"]
        metrics = json.loads((root / f"reports/metrics/{task}.json").read_text())
        assert metrics and all(isinstance(v, (int, float)) for v in metrics.values())
    assert_up_to_date(run(["dvc", "status"], root, env).stdout)
    started = time.monotonic()
    second = run(["dvc", "repro"], root, env)
    assert stages_run(second.stdout) == {"source"}, second.stdout
    assert time.monotonic() - started < 30


def test_dvc_yaml_declares_the_files_each_stage_imports_and_the_params_it_reads(project):
    root, env = project["root"], project["env"]
    checked = subprocess.run([sys.executable, "-m", "pipelines.depcheck", "--traces", str(project["traces"])],
                             cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_new_epoch_count_outdates_train_but_not_search(project):
    """`dvc exp run -S train.classify.epochs=...` must not rerun the search: it only declares the keys it reads."""
    root, env = project["root"], project["env"]
    params = root / "params.yaml"
    before = params.read_text()
    try:
        set_params(params, {"train.classify.epochs": 3})
        status = run(["dvc", "status"], root, env).stdout
        changed = {line.split(":")[0].strip() for line in status.splitlines() if line and not line[0].isspace()}
        assert "train@classify" in changed, status
        assert not {stage for stage in changed if stage.startswith("search@")}, status
        dry = run(["dvc", "repro", "--dry"], root, env).stdout
        assert "Running stage 'train@classify'" in dry and "Running stage 'search@classify'" not in dry, dry
    finally:
        params.write_text(before)


def test_mlflow_holds_the_search_and_the_champions(project):
    import mlflow
    from mlflow import MlflowClient

    store = f"sqlite:///{project['root'] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name("convforge")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    parents = {r.info.run_id for r in runs} & {r.data.tags["mlflow.parentRunId"] for r in children}
    assert len(parents) >= 3 and len(children) >= 4  # one search per task, every trial a child
    for task in TASKS:
        version = client.get_model_version_by_alias(f"convforge-{task}", "champion")
        assert version.run_id
    del mlflow


def test_changing_one_param_reruns_only_its_stages_and_metrics_repeat(project):
    root, env = project["root"], project["env"]
    before = json.loads((root / "reports/metrics/regress.json").read_text())
    # Same params and seed, forced: deterministic mode gives the same metrics. (Regress: nothing starts from its
    # model, while a retrained classifier, a new MLflow run in its config, is new input to detect and segment.)
    run(["dvc", "repro", "--force", "--single-item", "train@regress", "evaluate@regress"], root, env)
    assert json.loads((root / "reports/metrics/regress.json").read_text()) == before
    set_params(root / "params.yaml", {"train.segment.epochs": 2})
    changed = run(["dvc", "repro"], root, env).stdout
    assert "Running stage 'train@segment'" in changed and "Running stage 'evaluate@segment'" in changed
    for untouched in ("fetch", "augment", "search@classify", "train@classify", "train@detect"):
        assert f"Running stage '{untouched}'" not in changed


def _png_bytes(size: int = 28, mode: str = "L") -> bytes:
    from PIL import Image

    image = Image.new(mode, (size, size))
    for x in range(6, size - 6):
        image.putpixel((x, size // 2), 255 if mode == "L" else (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert response.headers.get("X-Model-Version")
        return json.loads(response.read())


def test_the_built_bento_serves_every_endpoint(project):
    root, env, port = project["root"], project["env"], project["port"]
    server = subprocess.Popen([sys.executable, "-m", "services.serve"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert server.poll() is None, server.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("service never became ready")
        image = base64.b64encode(_png_bytes()).decode()
        classify = _post_json(f"{base}/classify", {"images": [image]})
        assert classify["results"][0]["labels"]
        detect = _post_json(f"{base}/detect", {"image": base64.b64encode(_png_bytes(32)).decode()})
        assert "detections" in detect["results"][0]
        segment = _post_json(f"{base}/segment", {"image": base64.b64encode(_png_bytes(32)).decode()})
        assert segment["results"][0]["mask"]
        regress = _post_json(f"{base}/regress", {"image": image})
        assert regress["results"][0]["names"] == ["angle"] and len(regress["results"][0]["values"]) == 1
    finally:
        server.terminate()
        server.wait(timeout=30)
