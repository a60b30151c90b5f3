"""Own data at real scale: fetch + augment speed and peak memory, and the training input pipeline.

Generates its own sets in a temp dir: N JPEG photos of 1-12 MP (a few hundred distinct ones, each with an
EXIF orientation tag, reused by copying to reach N) and a COCO set of 512 px images with objects of
20-300 px. For each N it runs the real `fetch` and `augment` stage processes and polls the peak RSS
summed over the whole process tree (psutil). Then it trains at 224 px from the prepared split (the
engine's DataLoader over the memory-mapped .npy) against a plain torchvision ImageFolder + DataLoader
loop over the same 224 px images written as JPEGs, same workers, batch and model.

    python bench/owndata.py --sizes 1000 10000          # writes bench/results/owndata.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pipelines, not an installed copy

import pipelines.runtime as runtime  # noqa: E402  (telemetry off first)
from bench.machine import Parser, positive, result_file  # noqa: E402

EXIF_ORIENTATION = 0x0112


def photo(rng: np.random.Generator, megapixels: float) -> Image.Image:
    """A smooth photo-like RGB image (gradients and a few shapes) of about `megapixels`."""
    aspect = float(rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0]))
    h = int(np.sqrt(megapixels * 1e6 / aspect))
    w = int(h * aspect)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # upsampled noise: a smooth scene
    image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(image).copy()
    for _ in range(3):
        cy, cx, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(h // 10, h // 3))
        pixels[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def make_imagefolder(root: Path, n: int, distinct: int, rng: np.random.Generator) -> None:
    """N JPEGs in 4 classes: `distinct` generated ones (1-12 MP, EXIF orientation 1/3/6/8), copied to reach N."""
    bases = []
    cache = root.parents[1] / "bases"  # shared by every N
    cache.mkdir(parents=True, exist_ok=True)
    for i in range(distinct):
        path = cache / f"{i:04d}.jpg"
        if not path.is_file():
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = (1, 3, 6, 8)[i % 4]
            photo(rng, float(rng.uniform(1, 12))).save(path, quality=88, exif=exif.tobytes())
        bases.append(path)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(bases[i % distinct], folder / f"{i:05d}.jpg")


def make_coco(root: Path, n: int, rng: np.random.Generator) -> None:
    """N 512 px JPEGs with 1-4 rectangles of 20-300 px each, as COCO instances."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        canvas = np.asarray(photo(rng, 0.26).resize((512, 512))).copy()
        for _ in range(int(rng.integers(1, 5))):
            side = int(rng.integers(20, 300))
            x, y = int(rng.integers(0, 512 - side)), int(rng.integers(0, 512 - side))
            canvas[y:y + side, x:x + side] = rng.integers(0, 256, 3)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1 + len(annotations) % 3,
                                "iscrowd": 0, "area": side * side, "bbox": [x, y, side, side],
                                "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]]})
        Image.fromarray(canvas).save(root / "images" / f"{i:05d}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i:05d}.jpg", "height": 512, "width": 512})
    categories = [{"id": c, "name": f"thing{c}"} for c in (1, 2, 3)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_stage(stage: str, cwd: Path) -> tuple[float, int]:
    """Seconds and peak process-tree RSS of `python -m pipelines.stages.<stage>` in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", f"pipelines.stages.{stage}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{out[-3000:]}")
    return time.perf_counter() - started, peak[0]


def project(work: Path, dataset: str, image_size: int) -> Path:
    """A folder with params.yaml for own data (small scene counts: the bench measures the data path)."""
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"dataset": dataset, "image_size": image_size})
    params["augment"].update({"preview_count": 16})
    params["scenes"].update({"train_scenes": 300, "val_scenes": 50, "test_scenes": 50})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def measure_data(kind: str, data_dir: Path, n: int, work: Path, image_size: int) -> dict:
    """fetch + augment of one dataset: seconds, images/s and peak RSS of each."""
    folder = project(work, f"{kind}:{data_dir}", image_size)
    fetch_s, fetch_rss = run_stage("fetch", folder)
    augment_s, augment_rss = run_stage("augment", folder)
    return {"set": kind, "n": n, "image_size": image_size, "fetch_s": round(fetch_s, 1),
            "augment_s": round(augment_s, 1), "images_per_s": round(n / (fetch_s + augment_s), 1),
            "peak_rss_mb": round(max(fetch_rss, augment_rss) / 2**20), "fetch_rss_mb": round(fetch_rss / 2**20),
            "augment_rss_mb": round(augment_rss / 2**20)}


def training_rates(prepared: Path, batches: int, batch_size: int, workers: int) -> dict:
    """Images/s of the engine's lazy DataLoader vs torchvision ImageFolder over the same 224 px images,
    with and without a training step of the same model."""
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    from models import build
    from pipelines.datasets import load_classify
    from pipelines.engine import EngineSettings, train_batches
    from pipelines.tasks import get_task

    data = load_classify(prepared / "classify", "train", in_memory_bytes=0)
    jpegs = prepared.parent / "baseline"
    if not jpegs.is_dir():  # the baseline reads the same prepared pixels, as JPEG files
        for i in range(min(len(data), batches * batch_size)):
            folder = jpegs / str(int(data.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg", quality=90)
    baseline = datasets.ImageFolder(str(jpegs), transform=v2.PILToTensor())
    settings = EngineSettings(num_workers=workers, deterministic=False)
    task = get_task("classify")
    rates = {}
    for step in (False, True):
        torch.manual_seed(0)
        model = build("classify", "resnet", len(data.classes), 3, 224, depth=10, width=16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def consume(images: torch.Tensor, labels: torch.Tensor) -> None:
            if step:
                loss = torch.nn.functional.cross_entropy(model(images.float() / 255), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        ours = train_batches(task, data, batch_size, torch.Generator().manual_seed(0), None, settings, pin=False)
        plain = torch.utils.data.DataLoader(baseline, batch_size=batch_size, shuffle=True, num_workers=workers)
        for name, loader, unpack in (("convforge", ours, lambda b: (b.images, b.targets)),
                                     ("imagefolder", plain, lambda b: (b[0], b[1]))):
            seen, started = 0, time.perf_counter()
            for b, batch in enumerate(loader):
                if b == batches:
                    break
                images, labels = unpack(batch)
                consume(images, labels)
                seen += len(images)
            rates[f"{name}_{'train' if step else 'input'}_images_per_s"] = round(
                seen / (time.perf_counter() - started), 1)
    rates["ratio_input"] = round(rates["convforge_input_images_per_s"] / rates["imagefolder_input_images_per_s"], 2)
    rates["ratio_train"] = round(rates["convforge_train_images_per_s"] / rates["imagefolder_train_images_per_s"], 2)
    return {"workers": workers, "batch_size": batch_size, "batches": batches, **rates}


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=positive, nargs="+", default=[1000, 10000])
    parser.add_argument("--distinct", type=positive, default=200, help="distinct generated photos (reused to reach N)")
    parser.add_argument("--coco", type=positive, default=1000, help="COCO images (512 px)")
    parser.add_argument("--image-size", type=positive, default=224)
    parser.add_argument("--batches", type=positive, default=15)
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--out", type=result_file, default=ROOT / "bench" / "results" / "owndata.json")
    args = parser.parse_args()
    from pipelines.engine import EngineSettings, loader_workers

    rng = np.random.default_rng(0)
    rows, training = [], None
    with tempfile.TemporaryDirectory(prefix="convforge-owndata-") as tmp:
        tmp_path = Path(tmp)
        for n in args.sizes:
            make_imagefolder(tmp_path / f"photos{n}" / "photos", n, min(args.distinct, n), rng)
            rows.append(measure_data("imagefolder", tmp_path / f"photos{n}" / "photos", n, tmp_path / f"work{n}",
                                     args.image_size))
            print(rows[-1], flush=True)
            shutil.rmtree(tmp_path / f"photos{n}" / "photos")
        make_coco(tmp_path / "coco", args.coco, rng)
        rows.append(measure_data("coco", tmp_path / "coco", args.coco, tmp_path / "work-coco", 512))
        print(rows[-1], flush=True)
        prepared = tmp_path / f"work{args.sizes[-1]}" / "data" / "prepared"
        workers = max(1, loader_workers(EngineSettings(num_workers="auto"), _lazy_marker()))
        training = training_rates(prepared, args.batches, args.batch_size, workers)
        print(training, flush=True)
    print(f"\n{'set':<12}{'N':>7}{'px':>5}{'fetch s':>9}{'augment s':>11}{'img/s':>8}{'peak RSS MB':>13}")
    for row in rows:
        print(f"{row['set']:<12}{row['n']:>7}{row['image_size']:>5}{row['fetch_s']:>9}{row['augment_s']:>11}"
              f"{row['images_per_s']:>8}{row['peak_rss_mb']:>13}")
    print(f"training input at {args.image_size} px, {training['workers']} worker(s), batch {args.batch_size}: "
          f"convforge {training['convforge_input_images_per_s']} vs ImageFolder "
          f"{training['imagefolder_input_images_per_s']} img/s ({training['ratio_input']}x); with a ResNet-10 step "
          f"{training['convforge_train_images_per_s']} vs {training['imagefolder_train_images_per_s']} img/s "
          f"({training['ratio_train']}x)")
    runtime.write_json(args.out, {"cpus": len(os.sched_getaffinity(0)), "data": rows, "training": training})
    print(f"wrote {args.out}")


def _lazy_marker():
    """Something `loader_workers` sees as a lazily read split (what the auto rule is for)."""
    from types import SimpleNamespace

    from pipelines.datasets import LazyRows

    return SimpleNamespace(images=LazyRows(0))


if __name__ == "__main__":
    main()
