"""Pictures and plot data people look at: learning curves, confusion matrix, PR curve, sample
predictions (boxes/masks via pipelines/drawing.py), feature maps and Grad-CAM.

Which sample pictures a task gets is its adapter's `visuals` (pipelines/tasks.py); the confusion
matrix is for tasks whose adapter has `confusion`.

PNG writers take a path and return it; `*_records` functions give the JSON rows DVC plots read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from pipelines.drawing import class_colors, draw_detections, draw_semantic, grid, save_png, upscale
from pipelines.tasks import get_task


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


# ---------------------------------------------------------------- curves and tables


def learning_curve_records(history: Sequence[Any]) -> list[dict[str, float]]:
    """One record per epoch: epoch, train_loss, every val_* metric and lr (for DVC's linear plots)."""
    return [{"epoch": r.epoch, **{k: round(v, 6) for k, v in r.metrics.items()
                                  if k == "train_loss" or k == "lr" or k.startswith("val_")}} for r in history]


def plot_learning_curves(records: Sequence[dict[str, float]], path: Path) -> Path:
    """Training loss (left) and the validation metrics in [0, 1] (right) per epoch, from `learning_curve_records`."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(epochs, [r["train_loss"] for r in records], marker="o")
    left.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for key in [k for k in records[0] if k.startswith("val_") and k != "val_nll"] if records else []:
        right.plot(epochs, [r[key] for r in records], marker=".", label=key)
    right.set(xlabel="epoch", title="validation")
    if records:
        right.legend(fontsize=7)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    return _save(fig, path)


def confusion_records(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> list[dict[str, str]]:
    """One {"actual", "predicted"} record per item, the shape DVC's confusion template counts."""
    return [{"actual": classes[a], "predicted": classes[p]}
            for a, row in enumerate(confusion) for p, count in enumerate(row) for _ in range(int(count))]


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> Path:
    """Row-normalized confusion matrix (recall per class on the diagonal) with counts."""
    plt = _pyplot()
    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.55 * len(classes) + 2)
    fig, axis = plt.subplots(figsize=(size, size))
    axis.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="actual", title="confusion matrix (row-normalized)")
    if len(classes) <= 20:
        for a in range(len(classes)):
            for p in range(len(classes)):
                axis.text(p, a, int(counts[a, p]), ha="center", va="center", fontsize=7,
                          color="white" if rates[a, p] > 0.5 else "black")
    return _save(fig, path)


def plot_pr_curve(records: Sequence[dict[str, Any]], path: Path, title: str = "precision-recall") -> Path:
    """PR curves from records {"recall", "precision"[, "class"]}: one line per class, or one line."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(5, 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(str(record.get("class", "all")), []).append(record)
    for name, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["recall"])
        axis.plot([r["recall"] for r in rows], [r["precision"] for r in rows], label=name, linewidth=1)
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    axis.grid(alpha=0.3)
    if 1 < len(groups) <= 20:
        axis.legend(fontsize=6, loc="lower left")
    return _save(fig, path)


# ---------------------------------------------------------------- predictions drawn


def _scale(image_size: int) -> int:
    """Upscale small images so class names stay readable (tiles of about 192 px)."""
    return max(1, 192 // max(1, image_size))


def _image_grid(images: Sequence[Tensor], columns: int, cell_height: float, **shown: Any) -> tuple[Any, list[Any]]:
    """A figure of `images` ([C, H, W], grey or RGB) in rows of `columns` cells 1.6 wide and `cell_height` high,
    every axis off, and each image's axis in order (for its titles and overlays); `shown` goes to imshow."""
    plt = _pyplot()
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, cell_height * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image in zip(axes.flat, images):
        grey = image.shape[0] == 1
        axis.imshow((image[0] if grey else image.permute(1, 2, 0)).numpy(), cmap="gray" if grey else None, **shown)
    return fig, list(axes.flat[:len(images)])


def plot_classify_samples(images: Tensor, probs: Tensor, labels: Tensor, classes: Sequence[str],
                          path: Path, columns: int = 8) -> Path:
    """A grid of images titled `predicted (p)`, green when right and red when wrong, true class below."""
    fig, axes = _image_grid(images, columns, 1.9)
    for axis, prob, label in zip(axes, probs, labels):
        pred = int(prob.argmax())
        axis.set_title(f"{classes[pred]} ({float(prob[pred]):.2f})", fontsize=7,
                       color="tab:green" if pred == int(label) else "tab:red")
        axis.text(0.5, -0.08, f"true: {classes[int(label)]}", transform=axis.transAxes, ha="center", va="top",
                  fontsize=6)
    return _save(fig, path)


def plot_regress_samples(images: Tensor, predicted: Tensor, true: Tensor, names: Sequence[str], path: Path,
                         columns: int = 8) -> Path:
    """A grid of images titled with their predicted targets, the true ones below."""
    fig, axes = _image_grid(images, columns, 1.9)
    for axis, pred, value in zip(axes, predicted, true):
        axis.set_title(" ".join(f"{float(v):.1f}" for v in pred.reshape(-1)), fontsize=7)
        axis.text(0.5, -0.08, "true: " + " ".join(f"{float(v):.1f}" for v in value.reshape(-1)),
                  transform=axis.transAxes, ha="center", va="top", fontsize=6)
    fig.suptitle("predicted (" + ", ".join(names) + ")", fontsize=8)
    return _save(fig, path)


def plot_regress_scatter(predicted: Tensor, true: Tensor, names: Sequence[str], path: Path) -> Path:
    """Predicted against true values, one panel per target, with the identity line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for k, (axis, name) in enumerate(zip(axes.flat, names)):
        x, y = true[:, k].numpy(), predicted[:, k].numpy()
        low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        axis.scatter(x, y, s=3, alpha=0.4)
        axis.plot([low, high], [low, high], color="tab:red", linewidth=1)
        mae = float(abs(y - x).mean())
        axis.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{name}: MAE {mae:.2f}")
        axis.grid(alpha=0.3)
    return _save(fig, path)


def plot_triplets(inputs: Tensor, outputs: Tensor, targets: Tensor, path: Path, rows: int = 8) -> Path:
    """Rows of corrupted input | restored output | clean target (uint8, float in [0, 1], uint8 [N, C, H, W]),
    each output titled with its PSNR gain over the input (dB)."""
    from pipelines.reconstruction import image_psnr

    count = min(rows, len(inputs))
    corrupted, restored, clean = inputs[:count].float() / 255, outputs[:count].float(), targets[:count].float() / 255
    gains = image_psnr(restored, clean) - image_psnr(corrupted, clean)
    cells = [image.clamp(0, 1) for triplet in zip(corrupted, restored, clean) for image in triplet]
    fig, axes = _image_grid(cells, 3, 1.7, vmin=0, vmax=1)
    for row, gain in enumerate(gains):
        titles = ("input", f"output (+{float(gain):.1f} dB)", "target")
        for axis, title in zip(axes[3 * row:3 * row + 3], titles):
            axis.set_title(title, fontsize=7)
    return _save(fig, path)


def draw_detect_samples(images: Tensor, detections: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]],
                        classes: Sequence[str], path: Path, min_score: float = 0.3) -> Path:
    """Pairs (truth | prediction) per image: boxes labelled with class (and score), masks filled when present."""
    colors = class_colors(classes)
    scale = _scale(images.shape[-1])
    tiles = []
    for image, det, target in zip(images, detections, targets):
        tiles.append(draw_detections(image, target["boxes"], [classes[int(c)] for c in target["labels"]],
                                     masks=target.get("masks"), scale=scale, colors=colors))
        keep = det["scores"] >= min_score
        tiles.append(draw_detections(image, det["boxes"][keep], [classes[int(c)] for c in det["labels"][keep]],
                                     masks=det["masks"][keep] if "masks" in det else None,
                                     scores=det["scores"][keep], scale=scale, colors=colors))
    return save_png(grid(tiles, nrow=8), path)


def draw_segment_samples(images: Tensor, predicted: Tensor, truth: Tensor, classes: Sequence[str],
                         path: Path) -> Path:
    """Pairs (true mask | predicted mask) per image, classes coloured consistently."""
    scale = _scale(images.shape[-1])
    tiles = []
    for image, pred, true in zip(images, predicted, truth):
        tiles += [draw_semantic(image, true, classes, scale=scale), draw_semantic(image, pred, classes, scale=scale)]
    return save_png(grid(tiles, nrow=8), path)


# ---------------------------------------------------------------- inside the network


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every Conv2d in the order the modules are declared."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def feature_maps(model: nn.Module, task: str, inputs: Tensor) -> dict[str, Tensor]:
    """Outputs [N, C, h, w] of the first, a middle and the last conv layer to run (execution order,
    which differs from declaration order e.g. for ResNet's shortcut convs) for normalized `inputs`."""
    captured: dict[str, Tensor] = {}

    def keeper(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if name not in captured:  # a head shared across pyramid levels: keep its first (finest) call
                captured[name] = output.detach().float().cpu()
        return hook

    handles = [module.register_forward_hook(keeper(name)) for name, module in conv_layers(model)]
    try:
        with torch.inference_mode():
            model.eval()
            get_task(task).forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    order = list(captured)  # dicts keep insertion order: the order the convs ran
    if not order:
        return {}
    picked = dict.fromkeys([order[0], order[len(order) // 2], order[-1]])
    return {name: captured[name] for name in picked}


def save_feature_maps(maps: dict[str, Tensor], folder: Path, channels: int = 16) -> list[Path]:
    """One PNG per layer: the first `channels` maps of the first image, each min-max scaled to 0..255."""
    paths = []
    for index, (name, tensor) in enumerate(maps.items()):
        chosen = tensor[0, :channels]
        low = chosen.amin((1, 2), keepdim=True)
        high = chosen.amax((1, 2), keepdim=True)
        tiles = ((chosen - low) / (high - low).clamp(min=1e-8) * 255).round().to(torch.uint8)[:, None]
        scale = max(1, 48 // max(1, tensor.shape[-1]))
        which = ("first", "middle", "last")[min(index, 2)] if len(maps) == 3 else str(index)
        paths.append(save_png(grid([upscale(t, scale) for t in tiles], nrow=8),
                              Path(folder) / f"feature_maps_{which}_{name.replace('.', '_')}.png"))
    return paths


def grad_cam(model: nn.Module, inputs: Tensor, layer: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """Grad-CAM (Selvaraju et al. 2017) of a classifier for its top class: heatmaps [N, H, W] in [0, 1], classes [N].

    At `layer` (default: the model's conv trunk `features`, else its last conv), upsampled to the input
    size; pipelines.explain.class_cams, which POST /explain uses too.
    """
    from pipelines.explain import class_cams

    heatmaps, classes, _ = class_cams(model, inputs, layer=layer)
    return heatmaps, classes


def plot_grad_cam(images: Tensor, heatmaps: Tensor, predicted: Tensor, classes: Sequence[str], path: Path,
                  columns: int = 8) -> Path:
    """Images with their Grad-CAM heatmap overlaid (jet, alpha 0.45), titled with the explained class."""
    fig, axes = _image_grid(images, columns, 1.7)
    for axis, heat, pred in zip(axes, heatmaps, predicted):
        axis.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axis.set_title(classes[int(pred)], fontsize=7)
    return _save(fig, path)


def write_visuals(model: nn.Module, task: str, data: Any, folder: Path, count: int = 16) -> list[Path]:
    """The task's sample visuals (pipelines/tasks.py `visuals`) and feature maps (first/middle/last conv)
    of the first `count` items of `data`, as PNGs in `folder` (computed on the CPU)."""
    from pipelines.engine import EngineSettings, inputs_of, predict

    folder = Path(folder)
    model = model.to("cpu").eval()
    images = data.images[:count].cpu()
    predictions = predict(model, task, images, data.mean, data.std,
                          EngineSettings(device="cpu", amp="off", channels_last=False))
    paths = get_task(task).visuals(model, data, images, predictions, folder)
    maps = feature_maps(model, task, inputs_of(images[:4], data.mean, data.std))
    return paths + save_feature_maps(maps, folder)
