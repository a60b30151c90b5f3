"""The regress task: continuous targets from an image, with a classifier family's trunk and a linear head.

Default data (offline, deterministic): the prepared classification items (data/prepared/classify)
each rotated by an angle drawn uniformly from [-MAX_ANGLE, MAX_ANGLE] degrees, the target being
that angle (counter-clockwise positive). The angles are a pure function of the prepared data's
seed, the split and the item's position, so val and test are the same items at the same angles on
every run, and nothing new is written to disk. Geometric augmentation that would change the
target (horizontal flips negate an angle, rotations add to it) is off for this task; crops,
translations, erasing and colour jitter keep it.

Models are the registry's regressors (models/_registry.py `Regressor`): the head predicts
standardized targets, the model's output is in the targets' units (degrees), and the
standardisation (`target_mean`, `target_std`, from the train split) is recorded with the hparams
in config.json. Losses MSE or smooth L1 on the standardized targets (`train.regress.loss`);
metrics MAE, RMSE and R² (torchmetrics), R² being the validation metric the search maximizes
(scale-free, so several targets in different units average fairly).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.datasets import ITEMS_DATA, _ImageTensors, _subset_indices, _take, is_lazy, load_classify
from pipelines.errors import ConvForgeError
from pipelines.metrics import MetricReport
from pipelines.params import PolicyParams, TrainConfig

MAX_ANGLE = 45.0  # degrees either way
ANGLE = "angle"  # the default data's one target
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}  # each split draws its angles from its own seeded stream
SCATTER_POINTS = 2000  # items in the predicted-vs-true plot
SCATTER = "scatter"  # scatter.json (dvc plots) and scatter.png


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class RegressData(_ImageTensors):
    """Images uint8 [N, C, H, W], targets float32 [N, K] named `names`, image mean/std (in [0, 1] units)."""

    images: Tensor
    values: Tensor
    names: list[str]
    mean: list[float]
    std: list[float]

    @property
    def classes(self) -> list[str]:
        """The target names: the engine's `num_classes` is the number of outputs."""
        return self.names

    def subset(self, n: int | None, seed: int) -> "RegressData":
        """A random subset of `n` items (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = _subset_indices(len(self), n, seed)
        return replace(self, images=_take(self.images, idx), values=self.values[idx])

    def target_stats(self) -> dict[str, list[float]]:
        """The targets' standardisation, as the regressor's hparams (std 1 for a constant target)."""
        mean = self.values.double().mean(0)
        std = self.values.double().std(0, unbiased=False) if len(self) > 1 else torch.ones_like(mean)
        return {"target_mean": [round(float(v), 6) for v in mean],
                "target_std": [round(float(v), 6) if float(v) > 1e-6 else 1.0 for v in std]}


def item_angles(seed: int, split: str, count: int) -> np.ndarray:
    """The angle (degrees) of each item of a split: uniform in [-MAX_ANGLE, MAX_ANGLE], seeded per split."""
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split]])
    return rng.uniform(-MAX_ANGLE, MAX_ANGLE, count).astype(np.float32)


def rotate(images: Tensor, degrees: Tensor, chunk: int = 4096) -> Tensor:
    """uint8 images [N, C, H, W] each rotated counter-clockwise by its angle about the centre (bilinear,
    zero fill), as torchvision's `rotate` does one image at a time, in batched chunks."""
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].float()
        rad = torch.deg2rad(degrees[start:start + chunk].double()).float()
        cos, sin = torch.cos(rad), torch.sin(rad)
        # affine_grid maps output to input coordinates: the inverse rotation, in y-down image axes
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                             torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
        grid = F.affine_grid(theta, list(block.shape), align_corners=False)
        rotated = F.grid_sample(block, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[start:start + chunk] = rotated.round().clamp(0, 255).to(torch.uint8)
    return out


def load_regress(root: Path, split: str) -> RegressData:
    """A prepared split's items with their own targets (data.targets_csv) when it has them, else rotated."""
    folder = Path(root) / split
    if not (folder / "targets.npy").is_file():
        return load_rotated(root, split)
    items = load_classify(Path(root), split)
    names = list(json.loads((Path(root) / "meta.json").read_text())["target_names"])
    values = torch.from_numpy(np.load(folder / "targets.npy").astype(np.float32)).reshape(len(items), len(names))
    return RegressData(items.images, values, names, items.mean, items.std)


def load_rotated(root: Path, split: str) -> RegressData:
    """A prepared classification split (e.g. root = data/prepared/classify) as rotated items and their angles."""
    items = load_classify(Path(root), split)
    if is_lazy(items):
        raise ConvForgeError(f"{root}/{split}: {len(items)} items are too many to rotate in memory; "
                             "set data.max_train / data.max_test")
    seed = int(json.loads((Path(root) / "meta.json").read_text()).get("seed", 0))
    angles = torch.from_numpy(item_angles(seed, split, len(items)))
    return RegressData(rotate(items.images, angles), angles[:, None], [ANGLE], items.mean, items.std)


# ---------------------------------------------------------------- metrics


class RegressMeter:
    """MAE, RMSE and R² (torchmetrics) over every target, and MAE per target."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.predicted: list[Tensor] = []
        self.true: list[Tensor] = []

    def update(self, predicted: Tensor, true: Tensor) -> None:
        """Add a batch: predictions and targets [N, K] in the targets' units (any device)."""
        self.predicted.append(predicted.detach().float().cpu().reshape(len(predicted), -1))
        self.true.append(true.detach().float().cpu().reshape(len(true), -1))

    def compute(self) -> MetricReport:
        from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

        predicted = torch.cat(self.predicted) if self.predicted else torch.zeros((0, len(self.names)))
        true = torch.cat(self.true) if self.true else torch.zeros((0, len(self.names)))
        if len(true) < 2:
            return MetricReport({"mae": math.nan, "rmse": math.nan, "r2": math.nan})
        scalars = {"mae": float(mean_absolute_error(predicted, true)),
                   "rmse": float(mean_squared_error(predicted, true, squared=False)),
                   "r2": float(r2_score(predicted, true, multioutput="uniform_average"))}
        per_target = (predicted - true).abs().mean(0)
        shown = torch.linspace(0, len(true) - 1, min(len(true), SCATTER_POINTS)).round().long()  # evenly spread
        return MetricReport(scalars, {"mae": {name: float(v) for name, v in zip(self.names, per_target)}},
                            records={SCATTER: scatter_records(predicted[shown], true[shown], self.names)})


def scatter_records(predicted: Tensor, true: Tensor, names: Sequence[str]) -> list[dict[str, Any]]:
    """One {"true", "predicted", "target"} record per item and target (DVC's scatter template)."""
    return [{"true": round(float(true[i, k]), 4), "predicted": round(float(predicted[i, k]), 4), "target": name}
            for i in range(len(true)) for k, name in enumerate(names)]


# ---------------------------------------------------------------- the adapter


class TensorPredictions:
    """How the engine predicts in chunks for a task whose model answers one float tensor (regress: targets
    [N, K] in their units; reconstruct: restored images [N, C, H, W] in [0, 1]), the same for both."""

    def forward(self, model: nn.Module, images: Tensor) -> Any:
        return model(images)

    def cpu_predictions(self, outputs: Tensor) -> Tensor:
        """A chunk's predictions as float, on the CPU (the model already answers in the task's units)."""
        return outputs.float().cpu()

    def join(self, chunks: list[Any]) -> Tensor:
        return torch.cat(chunks) if chunks else torch.zeros((0,), dtype=torch.float32)


class RegressTask(TensorPredictions):
    name, metric = "regress", "r2"
    data = ITEMS_DATA  # reads the classification items and rotates them (no data of its own on disk)
    compiles = True
    exports_onnx = True
    onnx_per_image = False
    confusion = False
    whole_batch_augment = True
    pr_title = "no precision-recall curve (continuous targets)"
    headline = ("test_mae", "test_rmse", "test_r2")

    def load_split(self, root: Path, split: str) -> RegressData:
        """A split's items with their own targets (data.targets_csv), else rotated with their angles."""
        return load_regress(Path(root), split)

    def target_array(self, data: RegressData) -> Tensor:
        return data.values

    def gather(self, data: RegressData, idx: Tensor) -> Any:
        from pipelines.tasks import Batch

        return Batch(data.images[idx], data.values[idx.to(data.values.device)])

    def augmenter(self, data: RegressData, policy: PolicyParams | None, strength: float) -> Callable | None:
        """The classification policy without flips and rotations (they would change the angle)."""
        from pipelines.transforms import build_policy

        if policy is None or strength <= 0:
            return None
        kept = policy.model_copy(update={"hflip": 0.0, "rotation_deg": 0.0})
        return build_policy(kept, data.image_size, data.in_channels, strength)

    def item(self, data: RegressData, i: int, augment: Callable) -> tuple[Tensor, Tensor]:
        return augment(data.images[i]), data.values[i]

    def collate(self, items: Sequence[tuple[Tensor, Tensor]]) -> Any:
        from pipelines.tasks import Batch

        return Batch(torch.stack([image for image, _ in items]), torch.stack([value for _, value in items]))

    def mixer(self, cfg: TrainConfig, num_classes: int) -> None:
        return None  # MixUp/CutMix mix class labels, not regression targets

    def loss(self, model: nn.Module, images: Tensor, targets: Tensor, cfg: TrainConfig,
             mixer: Callable | None = None) -> Tensor:
        """MSE or smooth L1 (Huber, beta 1; Girshick 2015) of the standardized error."""
        std = getattr(model, "module", model).target_std  # DDP (Ray Train) holds the Regressor as .module
        error = (model(images).float() - targets.float()) / std
        if cfg.loss == "smooth_l1":
            return F.smooth_l1_loss(error, torch.zeros_like(error))
        return error.square().mean()

    def outputs(self, model: nn.Module, images: Tensor) -> Tensor:
        return model(images).float()

    def decode(self, outputs: Tensor) -> Tensor:
        """Predicted targets [N, K] (the model already answers in the targets' units)."""
        return outputs

    def meter(self, classes: Sequence[str]) -> RegressMeter:
        return RegressMeter(classes)

    def update(self, meter: RegressMeter, outputs: Tensor, batch: Any) -> None:
        meter.update(outputs, batch.targets)

    def visuals(self, model: nn.Module, data: RegressData, images: Tensor, predictions: Tensor,
                folder: Path) -> list[Path]:
        """Sample items titled with their predicted and true targets, and predicted-vs-true on up to
        SCATTER_POINTS items."""
        from pipelines.engine import EngineSettings, predict
        from pipelines.plots import plot_regress_samples, plot_regress_scatter

        shown = data.subset(SCATTER_POINTS, 0)
        predicted = predict(model, self.name, shown.images, data.mean, data.std,
                            EngineSettings(device="cpu", amp="off", channels_last=False))
        return [plot_regress_samples(images, predictions, data.values[:len(images)], data.names,
                                     Path(folder) / "sample_predictions.png"),
                plot_regress_scatter(predicted, shown.values, data.names, Path(folder) / f"{SCATTER}.png")]
