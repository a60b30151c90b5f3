"""`python -m services.predict FILES...`: the packaged models on image files, without a server.

Like `yolo predict`: every packaged task (or each `--task`) on every file, one line per file and
task on stdout, or with `--json` one response per file and task exactly as `curl -F images=@FILE
/<task>` returns it (JSON Lines, files in order, tasks in the order of pipelines/tasks.py).
`--save DIR` writes `<stem>_<task>.png` per file and task: top labels written on the image, boxes
with label and score, or the mask in class colours with a legend; images under 256 px are enlarged
by a whole factor so the text reads, images over 1280 px are shrunk. The numbers are the server's:
the same decoding limits (services/imaging.py), runners (services/runners.py), result functions
(services/endpoints.py) and params.yaml `serve` settings. Models come from where services/serve.py
takes them: `--models-dir DIR` / CONVFORGE_MODELS_DIR, `--bento TAG|FILE.bento` / CONVFORGE_BENTO,
else the Bento in artifacts/bento/bento.json. A folder stands for its image files; a file whose
suffix names no image format (`examples/*` also matches a script and a README) is skipped with a
note. A file that cannot be read, or a task without a model, is one line on stderr; the other
files still run, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pipelines.runtime  # first: telemetry off before the stack is imported

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from torchvision.transforms.v2 import functional as F

from pipelines.decode import to_array
from pipelines.drawing import class_colors, draw_caption, draw_detections, draw_semantic, save_png
from pipelines.errors import ConvForgeError, stage_entry
from pipelines.metrics import NMS_MODES
from pipelines.params import ServeParams, load_params
from pipelines.tasks import TASKS, ClassifyTask, DetectTask, ReconstructTask, SegmentTask, get_task
from services import catalog, imaging
from services.endpoints import checked_result, response
from services.errors import InputError
from services.runners import TaskRunner, load_runner
from services.schemas import ImageResult, Options, PredictionResponse, decode_mask

ROOT = Path(__file__).resolve().parents[1]
BENTO_ENV = "CONVFORGE_BENTO"
PARAMS_ENV = "CONVFORGE_PARAMS"
DISPLAY_MIN = 256  # saved images: a smaller image is enlarged by a whole factor towards this side
DISPLAY_MAX = 1280  # ... and a larger one shrunk to it
SHOWN = 5  # detections named on a text line


# ---------------------------------------------------------------- models


def bento_models(tag: str) -> dict[str, str]:
    """{task: model tag} of the models a Bento in the store was built with."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        bento = bentoml.bentos.get(tag)
    except BentoMLException as exc:
        raise ConvForgeError(f"Bento {tag}: {str(exc).splitlines()[0]}") from None
    by_name = {catalog.model_name(task): task for task in TASKS}
    return {by_name[m.tag.name]: str(m.tag) for m in bento.info.models if m.tag.name in by_name}


def model_sources(models_dir: str | None, bento: str | None) -> tuple[list[catalog.ModelSource], str]:
    """The packaged models (services.catalog.ModelSource) and where they were found, in services.serve's order."""
    models_dir = models_dir or os.environ.get(catalog.MODELS_DIR_ENV)
    if models_dir:
        if not Path(models_dir).is_dir():
            raise ConvForgeError(f"{models_dir}: no such models folder (the train stage writes artifacts/models)")
        return catalog.from_directory(Path(models_dir)), models_dir
    from services.serve import resolve_bento

    catalog.use_project_store(ROOT)  # before bentoml is imported
    tag = resolve_bento(bento or os.environ.get(BENTO_ENV))
    return catalog.from_store(bento_models(tag)), f"Bento {tag}"


def load_runners(sources: list[catalog.ModelSource], where: str, tasks: list[str],
                 serve: ServeParams) -> tuple[dict[str, TaskRunner], list[str]]:
    """A runner per wanted task as the service loads it, and one line per task that has no usable model."""
    from services.backends import serve_device

    # The service's thread count and device: float sums in the same order, the same numbers to the last bit.
    threads, device = pipelines.runtime.set_threads(serve.num_threads), serve_device(serve.device)
    found = {source.task: source for source in sources}
    runners, problems = {}, []
    for task in tasks:
        source = found.get(task)
        if source is None:
            problems.append(f"{task}: no model in {where} (packaged tasks: {', '.join(found) or 'none'})")
            continue
        try:
            runners[task] = load_runner(
                task, source.directory, name=source.name, version=source.version, backend=serve.backend,
                max_batch_size=1, max_latency_ms=serve.max_latency_ms, lineage=source.lineage,
                expected_sha256=source.expected_sha256, num_threads=threads, scale=serve.scale,
                max_side=serve.max_side, device=device)
        except ConvForgeError as exc:
            problems.append(f"{task}: {exc}")
    return runners, problems


# ---------------------------------------------------------------- one file


@dataclass(frozen=True)
class Prediction:
    """One file through one task's model: the response the endpoint would send, and the classes."""

    task: str
    response: PredictionResponse  # with one result
    classes: list[str]


def predict(blob: bytes, runner: TaskRunner, limits: imaging.DecodeLimits, options: Options) -> Prediction:
    """One upload through one runner, as the service's endpoint does it: prepare, run, result with its
    training-domain check, the versioned response; raises InputError for a bad image."""
    prepared = imaging.prepare(blob, limits, runner.fit, runner.in_channels)
    options = runner.options(options.model_dump(), options.top_k)
    (value,) = runner.run(prepared.array[None])
    result, _ = checked_result(runner.task, 0, value, runner.classes, options, prepared.placement, runner.domain,
                               prepared.facts)
    return Prediction(runner.task, response(runner.task, runner.card, options, [result]), runner.classes)


def response_json(prediction: Prediction) -> str:
    """The response body, byte for byte as the service's JSONResponse renders it."""
    body = prediction.response.model_dump(mode="json", exclude_none=True)
    return json.dumps(body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


# ---------------------------------------------------------------- text lines


def labels_line(result: ImageResult) -> str:
    """`Shirt 0.87, T-shirt/top 0.06, ...`: the top labels, highest first."""
    return ", ".join(f"{item.label} {item.score:.2f}" for item in result.labels or [])


def detections_line(result: ImageResult) -> str:
    """`3 detections: Sandal 0.91, ...` (the best few named), or `no detections`."""
    found = result.detections or []
    if not found:
        return "no detections"
    named = ", ".join(f"{det.label} {det.score:.2f}" for det in found[:SHOWN])
    more = f", +{len(found) - SHOWN} more" if len(found) > SHOWN else ""
    return f"{len(found)} detection{'s' * (len(found) != 1)}: {named}{more}"


def share(count: int, total: int) -> str:
    """`count` of `total` pixels as a percentage; a sliver shows as <1%, not 0%."""
    return "<1%" if 0 < count < total / 200 else f"{count / total:.0%}"


def mask_line(result: ImageResult) -> str:
    """`mask classes: Shirt 12%, ...`: the classes in the mask by their share of the image."""
    pixels = sorted((result.class_pixels or {}).items(), key=lambda item: -item[1])
    if not pixels:
        return "mask: background only"
    total = max(1, result.width * result.height)
    return "mask classes: " + ", ".join(f"{name} {share(count, total)}" for name, count in pixels)


# ---------------------------------------------------------------- annotated images


def display(image: np.ndarray) -> tuple[torch.Tensor, float, float]:
    """uint8 [3, H', W'] of an RGB [H, W, 3] image at display size, and the x, y factors from image to it."""
    height, width = image.shape[:2]
    longest = max(height, width)
    factor = float(max(1, DISPLAY_MIN // longest)) if longest < DISPLAY_MIN else min(1.0, DISPLAY_MAX / longest)
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if factor == 1.0:
        return tensor, 1.0, 1.0
    size = [max(1, round(height * factor)), max(1, round(width * factor))]
    mode = F.InterpolationMode.NEAREST_EXACT if factor > 1 else F.InterpolationMode.BILINEAR
    tensor = F.resize(tensor, size, interpolation=mode, antialias=factor < 1)
    return tensor, size[1] / width, size[0] / height


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 [H, W] mask at `size` (height, width), nearest neighbour."""
    tensor = torch.from_numpy(np.array(mask, dtype=np.uint8))[None]  # a copy: decoded masks are read-only
    return F.resize(tensor, list(size), interpolation=F.InterpolationMode.NEAREST_EXACT)[0]


def draw_labels(canvas: torch.Tensor, prediction: Prediction, fx: float, fy: float) -> torch.Tensor:
    """The top labels with their probabilities, written at the top left."""
    return draw_caption(canvas, [f"{item.label} {item.score:.2f}" for item in prediction.response.results[0].labels])


def draw_boxes(canvas: torch.Tensor, prediction: Prediction, fx: float, fy: float) -> torch.Tensor:
    """Each detection's box labelled `name score` in its class colour (and its instance mask, if any)."""
    found = prediction.response.results[0].detections or []
    boxes = torch.tensor([det.box for det in found], dtype=torch.float32).reshape(-1, 4) * torch.tensor([fx, fy] * 2)
    boxes = boxes.round()  # whole display pixels, at least one wide, so every box shows
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    masks = None
    if found and all(det.mask is not None for det in found):  # instance masks (Mask R-CNN)
        masks = torch.stack([resized_mask(decode_mask(det.mask), canvas.shape[1:]) > 0 for det in found])
    return draw_detections(canvas, boxes, [det.label for det in found], masks=masks,
                           scores=torch.tensor([det.score for det in found]), colors=class_colors(prediction.classes))


def draw_mask(canvas: torch.Tensor, prediction: Prediction, fx: float, fy: float) -> torch.Tensor:
    """The class mask in class colours, with a legend of the classes present and their share of the image."""
    result, classes = prediction.response.results[0], prediction.classes
    semantic = resized_mask(decode_mask(result.mask), canvas.shape[1:])
    palette = class_colors(classes)
    present = sorted((result.class_pixels or {}).items(), key=lambda item: -item[1])
    total = max(1, result.width * result.height)
    legend = [f"{name} {share(count, total)}" for name, count in present] or ["background only"]
    colours = [palette[name] for name, _ in present] or [None]
    return draw_caption(draw_semantic(canvas, semantic, classes), legend, colours)


def restored_line(result: ImageResult) -> str:
    """The restored image's size (and its PSNR when a target was scored)."""
    return (f"restored {result.width}x{result.height}"
            + (f", PSNR {result.psnr:.2f} dB" if result.psnr is not None else ""))


def draw_restored(canvas: torch.Tensor, prediction: Prediction, fx: float, fy: float) -> torch.Tensor:
    """The restored image at display size, in place of the upload."""
    import base64
    import io

    restored = Image.open(io.BytesIO(base64.b64decode(prediction.response.results[0].image or ""))).convert("RGB")
    tensor = torch.from_numpy(np.ascontiguousarray(np.asarray(restored).transpose(2, 0, 1)))
    return F.resize(tensor, list(canvas.shape[1:]), interpolation=F.InterpolationMode.NEAREST_EXACT)


@dataclass(frozen=True)
class View:
    """How one task's prediction reads: a text line, and drawn on the image."""

    line: Callable[[ImageResult], str]
    draw: Callable[[torch.Tensor, Prediction, float, float], torch.Tensor]


VIEWS: dict[type, View] = {
    ClassifyTask: View(labels_line, draw_labels),
    DetectTask: View(detections_line, draw_boxes),
    SegmentTask: View(mask_line, draw_mask),
    ReconstructTask: View(restored_line, draw_restored),
}


def text_line(path: str, prediction: Prediction) -> str:
    """`FILE TASK: what the model saw`, and why the file is out of the training domain when it is."""
    result = prediction.response.results[0]
    line = f"{path} {prediction.task}: {VIEWS[type(get_task(prediction.task))].line(result)}"
    return line if result.in_domain is not False else f"{line} (out of domain: {result.reason})"


def annotated(image: np.ndarray, prediction: Prediction) -> torch.Tensor:
    """uint8 [3, H', W']: the prediction drawn on the image (RGB [H, W, 3]) at display size."""
    canvas, fx, fy = display(image)
    return VIEWS[type(get_task(prediction.task))].draw(canvas, prediction, fx, fy)


# ---------------------------------------------------------------- the command


def save_names(paths: list[str]) -> list[str]:
    """A distinct file stem per input (`a`, `a-2`, ... when two inputs share a name)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def image_files(arguments: list[str], formats: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The files to run on, and the ones skipped. A folder stands for its image files (sorted); an existing
    file whose suffix is no image format of `formats` is skipped, as `yolo predict` skips it (a glob such
    as examples/* also names scripts and READMEs); any other name is tried, and reported if it fails."""
    suffixes = {ext for ext, name in Image.registered_extensions().items() if name in formats}
    files, skipped = [], []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files += sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        elif path.is_file() and path.suffix.lower() not in suffixes:
            skipped.append(argument)
        else:
            files.append(argument)
    return files, skipped


def read_file(path: str) -> bytes:
    """The file's bytes, or InputError with the reason in one line."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(400, exc.strerror or type(exc).__name__) from None


def run_file(path: str, name: str, runners: dict[str, TaskRunner], limits: imaging.DecodeLimits, options: Options,
             args: argparse.Namespace) -> None:
    """Every runner on one file: its lines on stdout, its images under --save; raises InputError."""
    blob = read_file(path)
    predictions = [predict(blob, runner, limits, options) for runner in runners.values()]
    for prediction in predictions:
        print(response_json(prediction) if args.json else text_line(path, prediction), flush=True)
    if args.save:
        image = to_array(imaging.decode(blob, limits), 3)
        for prediction in predictions:
            save_png(annotated(image, prediction), Path(args.save) / f"{name}_{prediction.task}.png")


def run_files(files: list[str], args: argparse.Namespace, runners: dict[str, TaskRunner],
              limits: imaging.DecodeLimits, options: Options) -> bool:
    """Each file in turn; a file that fails is one line on stderr. True when every file went through."""
    if args.save:
        try:
            Path(args.save).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConvForgeError(f"--save {args.save}: {exc.strerror or exc}") from None
    ok = True
    for path, name in zip(files, save_names(files)):
        try:
            run_file(path, name, runners, limits, options, args)
        except ConvForgeError as exc:  # InputError: this file only
            print(f"error: {path}: {exc}", file=sys.stderr, flush=True)
            ok = False
        except OSError as exc:  # writing its images
            print(f"error: {path}: cannot save under {args.save}: {exc.strerror or exc}", file=sys.stderr, flush=True)
            ok = False
    return ok


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m services.predict", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="image files, or folders of them (formats of serve.formats)")
    parser.add_argument("--task", action="append", choices=list(TASKS), help="only this task (repeatable)")
    parser.add_argument("--save", metavar="DIR", help="write annotated images <stem>_<task>.png here")
    parser.add_argument("--json", action="store_true", help="the endpoint's JSON response per file and task")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--models-dir", metavar="DIR", help="<dir>/<task>/ model folders (artifacts/models)")
    source.add_argument("--bento", metavar="TAG", help="Bento tag or .bento archive (default: bento.json's)")
    parser.add_argument("--top-k", type=int, metavar="N", help="labels per image (default serve.top_k)")
    parser.add_argument("--score-threshold", type=float, metavar="S",
                        help="drop detections scored below this (default: the model's, chosen on val)")
    parser.add_argument("--max-detections", type=int, metavar="N", help="keep at most this many detections (100)")
    parser.add_argument("--nms", choices=NMS_MODES,
                        help="agnostic: one label per box (default); per_class: a box per class found")
    return parser.parse_args(argv)


def request_options(args: argparse.Namespace, top_k: int) -> Options:
    """The request options the flags stand for, checked as the service checks a request's."""
    given = {"top_k": top_k if args.top_k is None else args.top_k, "score_threshold": args.score_threshold,
             "max_detections": args.max_detections, "nms": args.nms}
    try:
        return Options(**{key: value for key, value in given.items() if value is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConvForgeError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None


def main(argv: list[str] | None = None) -> None:
    """Run the packaged models on the files named in `argv`; exit 1 if any file or task failed."""
    args = parse(argv)

    @stage_entry
    def run() -> None:
        serve = load_params(os.environ.get(PARAMS_ENV, ROOT / "params.yaml")).serve
        options = request_options(args, serve.top_k)
        limits = imaging.DecodeLimits(serve.max_pixels, tuple(serve.formats))
        files, skipped = image_files(args.files, limits.formats)
        if skipped:
            print(f"note: skipped {len(skipped)} file{'s' * (len(skipped) != 1)} not named as images "
                  f"({', '.join(skipped)})", file=sys.stderr, flush=True)
        if not files:
            raise ConvForgeError(f"no image files in {' '.join(args.files)} (formats: {', '.join(limits.formats)})")
        sources, where = model_sources(args.models_dir, args.bento)
        if not sources:
            raise ConvForgeError(f"no packaged model in {where}: run `dvc repro` (or `python -m "
                                 "pipelines.stages.package`), or point --models-dir at artifacts/models")
        wanted = args.task or [source.task for source in sources]
        runners, problems = load_runners(sources, where, [task for task in TASKS if task in wanted], serve)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr, flush=True)
        if not runners:
            raise SystemExit(1)
        if not run_files(files, args, runners, limits, options) or problems:
            raise SystemExit(1)

    run()


if __name__ == "__main__":
    main()
