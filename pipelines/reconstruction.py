"""The reconstruct task: restore an image from a corrupted copy (denoising and inpainting) with an encoder-decoder.

Default data (offline, deterministic): the prepared classification items (data/prepared/classify) are the clean
targets, and their inputs are corrupted by Gaussian noise and random erasing (Vincent et al. 2008, denoising
autoencoders; Zhong et al. 2020, random erasing), as params.yaml's `corruption` section says. Training draws a
fresh corruption for every batch (from the engine's per-epoch seed, so a resumed run repeats itself); the
val and test inputs are corrupted once, by a generator seeded from the prepared data's seed and the split, so
every run, trial and evaluation sees the same corrupted items. Nothing new is written to disk.

Models (models/autoencoder.py, models/unet.py) map the normalized corrupted image to the clean one in [0, 1]
units; the loss is the mean squared error, which is what PSNR measures. Metrics (torchmetrics): PSNR and SSIM
of the output and of the corrupted input against the clean image, and their differences `psnr_gain` and
`ssim_gain`; the search maximizes the validation PSNR.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.datasets import ITEMS_DATA, _ImageTensors, _subset_indices, is_lazy, load_classify
from pipelines.errors import ConvForgeError
from pipelines.metrics import MetricReport
from pipelines.params import CorruptionParams, PolicyParams, TrainConfig, load_params
from pipelines.regression import TensorPredictions

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}  # each split corrupts from its own seeded stream
ERASING_RATIO = (0.3, 3.3)  # aspect ratios of erased rectangles (torchvision's RandomErasing default)
MAX_PSNR = 100.0  # dB: an output equal to its target (MSE 0) counts as this, not infinity
CHUNK = 4096  # items corrupted at a time when a split is loaded
TRIPLETS_PNG = "sample_predictions.png"


# ---------------------------------------------------------------- corruption


def corrupt(clean: Tensor, corruption: CorruptionParams, generator: torch.Generator) -> Tensor:
    """uint8 images [N, C, H, W] plus Gaussian noise (sd `noise_std` in [0, 1] units), then, with probability
    `erasing` per image, one rectangle of `erasing_scale` of the area set to 0; uint8 again. Pure: all
    randomness comes from `generator`."""
    n, _, h, w = clean.shape
    x = clean.float() / 255
    if corruption.noise_std > 0:
        x = x + corruption.noise_std * torch.randn(x.shape, generator=generator)
    if corruption.erasing > 0:
        x = x.masked_fill(erased(n, h, w, corruption, generator)[:, None], 0.0)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def erased(n: int, h: int, w: int, corruption: CorruptionParams, generator: torch.Generator) -> Tensor:
    """bool [N, H, W]: one random rectangle per image (none with probability 1 - erasing)."""
    low, high = corruption.erasing_scale
    chosen = torch.rand(n, generator=generator) < corruption.erasing
    area = (low + (high - low) * torch.rand(n, generator=generator)) * h * w
    log_ratio = math.log(ERASING_RATIO[0]) + (math.log(ERASING_RATIO[1] / ERASING_RATIO[0])
                                              * torch.rand(n, generator=generator))
    eh = (area * log_ratio.exp()).sqrt().round().clamp(1, h)
    ew = (area / log_ratio.exp()).sqrt().round().clamp(1, w)
    top = (torch.rand(n, generator=generator) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=generator) * (w - ew + 1)).floor()
    rows, cols = torch.arange(h)[None], torch.arange(w)[None]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]


def corrupt_split(clean: Tensor, corruption: CorruptionParams, seed: int, split: str) -> Tensor:
    """The fixed corrupted inputs of a split: one generator seeded by (seed, split), chunk by chunk."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + SPLIT_STREAMS[split])
    return torch.cat([corrupt(clean[i:i + CHUNK], corruption, generator) for i in range(0, len(clean), CHUNK)]) \
        if len(clean) else clean.clone()


def draw_generator() -> torch.Generator:
    """A generator seeded from torch's global RNG, which the engine seeds per epoch (resumable runs)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class ReconstructData(_ImageTensors):
    """Corrupted inputs uint8 [N, C, H, W] (`images`), the clean targets (`clean`), the items' labels and class
    names, image mean/std (in [0, 1] units); `fresh`: training batches draw a new corruption of `clean`."""

    images: Tensor
    clean: Tensor
    labels: Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    corruption: CorruptionParams
    fresh: bool = False

    def subset(self, n: int | None, seed: int) -> "ReconstructData":
        """A random subset of `n` items (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = _subset_indices(len(self), n, seed)
        return replace(self, images=self.images[idx], clean=self.clean[idx], labels=self.labels[idx])


def project_corruption(root: Path) -> CorruptionParams:
    """params.yaml's `corruption` of the project whose prepared data `root` is (<project>/data/prepared/<data>),
    or of the working directory's params.yaml."""
    folder = Path(root).absolute()  # not resolved: a linked data folder belongs to the project that links it
    beside = folder.parents[2] / "params.yaml" if len(folder.parents) > 2 else None
    return load_params(beside if beside is not None and beside.is_file() else "params.yaml").corruption


def load_corrupted(root: Path, split: str, corruption: CorruptionParams | None = None) -> ReconstructData:
    """A prepared classification split (e.g. root = data/prepared/classify) as corrupted inputs and clean targets."""
    items = load_classify(Path(root), split)
    if is_lazy(items):
        raise ConvForgeError(f"{root}/{split}: {len(items)} items are too many to corrupt in memory; "
                             "set data.max_train / data.max_test")
    corruption = corruption or project_corruption(Path(root))
    seed = int(json.loads((Path(root) / "meta.json").read_text()).get("seed", 0))
    return ReconstructData(corrupt_split(items.images, corruption, seed, split), items.images, items.labels,
                           items.classes, items.mean, items.std, corruption, fresh=split == "train")


# ---------------------------------------------------------------- metrics


def ssim_kernel(size: int) -> int:
    """SSIM's Gaussian window (11, Wang et al. 2004), narrowed to an odd size that fits smaller images."""
    return max(3, min(11, size - (1 - size % 2)))


class ReconstructMeter:
    """Mean per-image PSNR and SSIM (torchmetrics) of the restored images and of the corrupted inputs."""

    def __init__(self) -> None:
        self.sums = {"psnr": 0.0, "ssim": 0.0, "input_psnr": 0.0, "input_ssim": 0.0}
        self.count = 0

    def update(self, restored: Tensor, inputs: Tensor, targets: Tensor) -> None:
        """Add a batch: restored images float [N, C, H, W] in [0, 1], corrupted inputs and clean targets uint8."""
        target = targets.float().cpu() / 255
        for prefix, image in (("", restored.detach().float().cpu().clamp(0, 1)),
                              ("input_", inputs.float().cpu() / 255)):
            psnr, ssim = image_quality(image, target)
            self.sums[f"{prefix}psnr"] += float(psnr.sum())
            self.sums[f"{prefix}ssim"] += float(ssim.sum())
        self.count += len(target)

    def compute(self) -> MetricReport:
        scalars = {key: value / self.count if self.count else math.nan for key, value in self.sums.items()}
        scalars["psnr_gain"] = scalars["psnr"] - scalars["input_psnr"]
        scalars["ssim_gain"] = scalars["ssim"] - scalars["input_ssim"]
        return MetricReport(scalars)


def image_quality(image: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR (dB, at most MAX_PSNR) and SSIM of float images [N, C, H, W] in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    kernel = ssim_kernel(min(image.shape[-2:]))
    ssim = structural_similarity_index_measure(image, target, data_range=1.0, reduction="none",
                                               kernel_size=kernel, sigma=1.5 * kernel / 11)
    return image_psnr(image, target), ssim


def image_psnr(image: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR (dB, at most MAX_PSNR) of float images [N, C, H, W] in [0, 1]: alone, it fits images of
    any size (SSIM's window needs more than a pixel) and costs no SSIM where only PSNR is shown."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    value = peak_signal_noise_ratio(image, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return value.nan_to_num(posinf=MAX_PSNR).clamp(max=MAX_PSNR)


# ---------------------------------------------------------------- the adapter


class ReconstructTask(TensorPredictions):
    name, metric = "reconstruct", "psnr"
    data = ITEMS_DATA  # reads the classification items and corrupts them (no data of its own on disk)
    compiles = True
    exports_onnx = True
    onnx_per_image = False
    confusion = False
    whole_batch_augment = False  # each item is corrupted after its augmentation, drawing in between
    pr_title = "precision-recall (none: restoration scores no classes)"  # never drawn: the meter gives no curves
    headline = ("test_psnr_gain", "test_psnr", "test_ssim", "test_input_psnr")

    def load_split(self, root: Path, split: str) -> ReconstructData:
        """A split of corrupted inputs and clean targets (params.yaml's `corruption`)."""
        return load_corrupted(Path(root), split)

    def made_by(self, params: Any) -> dict[str, Any]:
        """The params that shape this task's data beyond the prepared folder: a search's key includes them."""
        return params.corruption.model_dump()

    def target_array(self, data: ReconstructData) -> Tensor:
        return data.clean

    def gather(self, data: ReconstructData, idx: Tensor) -> Any:
        """Corrupted inputs and clean targets; training batches are corrupted afresh."""
        from pipelines.tasks import Batch

        clean = data.clean[idx]
        images = corrupt(clean, data.corruption, draw_generator()) if data.fresh else data.images[idx]
        return Batch(images, clean)

    def augmenter(self, data: ReconstructData, policy: PolicyParams | None, strength: float) -> Callable | None:
        """The classification policy on the clean image; the corruption follows it (`item`)."""
        from pipelines.transforms import build_policy

        if policy is None or strength <= 0:
            return None
        return build_policy(policy.model_copy(update={"erasing": 0.0}), data.image_size, data.in_channels, strength)

    def item(self, data: ReconstructData, i: int, augment: Callable) -> tuple[Tensor, Tensor]:
        clean = augment(data.clean[i])
        return corrupt(clean[None], data.corruption, draw_generator())[0], clean

    def collate(self, items: Sequence[tuple[Tensor, Tensor]]) -> Any:
        from pipelines.tasks import Batch

        return Batch(torch.stack([image for image, _ in items]), torch.stack([clean for _, clean in items]))

    def mixer(self, cfg: TrainConfig, num_classes: int) -> None:
        return None  # MixUp/CutMix mix class labels, not images with their own targets

    def loss(self, model: nn.Module, images: Tensor, targets: Tensor, cfg: TrainConfig,
             mixer: Callable | None = None) -> Tensor:
        """Mean squared error against the clean image in [0, 1] units (PSNR is -10 log10 of it)."""
        return F.mse_loss(model(images).float(), targets.float() / 255)

    def outputs(self, model: nn.Module, images: Tensor) -> Tensor:
        return self.decode(model(images).float())

    def decode(self, outputs: Tensor) -> Tensor:
        """Restored images in [0, 1]."""
        return outputs.clamp(0, 1)

    def meter(self, classes: Sequence[str]) -> ReconstructMeter:
        return ReconstructMeter()

    def update(self, meter: ReconstructMeter, outputs: Tensor, batch: Any) -> None:
        meter.update(outputs, batch.images, batch.targets)

    def visuals(self, model: nn.Module, data: ReconstructData, images: Tensor, predictions: Tensor,
                folder: Path) -> list[Path]:
        """Input / output / target triplets of the first items."""
        from pipelines.plots import plot_triplets

        return [plot_triplets(images, predictions, data.clean[:len(images)], Path(folder) / TRIPLETS_PNG)]
