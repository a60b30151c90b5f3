"""Per-task adapters for the one training engine: batches, loss, predictions and metric meters.

Every task's batch is `Batch(images uint8 [B, C, H, W], targets)` on the CPU; the engine moves it,
normalizes the images and hands them back to the adapter. Targets are labels int64 [B] (classify),
a list of {"boxes" xyxy, "labels" 0..C-1, "masks" [k, H, W]} (detect) or semantic masks [B, H, W]
(segment, 0 = background, c + 1 = class c).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.datasets import ITEMS_DATA, SCENES_DATA
from pipelines.errors import ConvForgeError
from pipelines.metrics import ClassifyMeter, DetectMeter, SegmentMeter
from pipelines.scenes import IGNORE
from pipelines.params import PolicyParams, TrainConfig
from pipelines.regression import RegressTask  # imports Batch from here only inside its methods
from pipelines.reconstruction import ReconstructTask  # imports Batch from here only inside its methods

if TYPE_CHECKING:
    from pipelines.transforms import ScenePolicy

AUX_WEIGHT = 0.3  # GoogLeNet's auxiliary classifiers (Szegedy et al. 2015, Sec. 5)
SAMPLES_PNG = "sample_predictions.png"


@dataclass
class Batch:
    """Images uint8 [B, C, H, W] (float and normalized once on the device) and the task's targets."""

    images: Tensor
    targets: Any

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking), _to(self.targets, device, non_blocking))

    def pin_memory(self) -> "Batch":
        return Batch(self.images.pin_memory(), _pin(self.targets))


def _to(value: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: _to(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to(v, device, non_blocking) for v in value]
    return value


def _pin(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {k: _pin(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pin(v) for v in value]
    return value


def main_logits(output: Any) -> Tensor:
    """The main logits of a classifier's output (AuxLogits in train mode, a tensor in eval mode)."""
    return output.logits if hasattr(output, "logits") else output


class ClassifyTask:
    name, metric = "classify", "accuracy"
    data = ITEMS_DATA  # the prepared-data folder it reads (data/prepared/<data>)
    compiles = True  # torch.compile works on its models
    exports_onnx = True  # its models run on ONNX Runtime when serve.backend chooses onnx (services/backends.py)
    onnx_per_image = False  # its graph takes a batch of any size (a dynamic batch axis)
    confusion = True  # its evaluation has a confusion matrix
    whole_batch_augment = True  # an item is its augmented image beside its label: a batch may be augmented at once
    pr_title = "precision-recall (one vs rest)"
    headline = ("test_accuracy", "test_top5", "test_f1_macro", "test_ece")  # what a person reads first

    def load_split(self, root: Path, split: str) -> Any:
        """A prepared split as in-memory tensors. One class (regress images without class folders) is one line
        here: torchmetrics' multiclass metrics would stop training with a traceback."""
        from pipelines.datasets import load_classify

        data = load_classify(Path(root), split)
        if len(data.classes) < 2:
            raise ConvForgeError(f"{root}: classify needs at least 2 classes, this data has {data.classes}: run "
                                 f"the stages of the tasks it has alone (e.g. dvc repro evaluate@regress)")
        return data

    def target_array(self, data: Any) -> Tensor:
        """What a split's targets are, as one tensor (recorded with the dataset in MLflow)."""
        return data.labels

    def forward(self, model: nn.Module, images: Tensor) -> Any:
        """The model's raw forward pass on a normalized batch."""
        return model(images)

    def cpu_predictions(self, outputs: Tensor) -> Tensor:
        """A chunk's predictions on the CPU: class probabilities [N, C]."""
        return self.decode(outputs.float()).cpu()

    def join(self, chunks: list[Any]) -> Any:
        """The chunks of `cpu_predictions` as one prediction for the whole input."""
        return torch.cat(chunks) if chunks else torch.zeros((0,), dtype=torch.float32)

    def gather(self, data: Any, idx: Tensor) -> Batch:
        return Batch(data.images[idx], data.labels[idx])

    def augmenter(self, data: Any, policy: PolicyParams | None, strength: float) -> Callable | None:
        from pipelines.transforms import build_policy

        if policy is None or strength <= 0:
            return None
        return build_policy(policy, data.image_size, data.in_channels, strength)

    def item(self, data: Any, i: int, augment: Callable) -> tuple[Tensor, Any]:
        return augment(data.images[i]), data.labels[i]

    def collate(self, items: Sequence[tuple[Tensor, Any]]) -> Batch:
        return Batch(torch.stack([image for image, _ in items]), torch.stack([label for _, label in items]))

    def mixer(self, cfg: TrainConfig, num_classes: int) -> Callable | None:
        """MixUp (Zhang et al. 2018) / CutMix (Yun et al. 2019) on a normalized batch, or None."""
        from torchvision.transforms import v2

        choices = []
        if cfg.mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
        if cfg.cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
        if not choices:
            return None
        return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def loss(self, model: nn.Module, images: Tensor, targets: Tensor, cfg: TrainConfig,
             mixer: Callable | None = None) -> Tensor:
        if mixer is not None:
            images, targets = mixer(images, targets)  # targets become soft labels [B, C]
        output = model(images)
        loss = F.cross_entropy(main_logits(output).float(), targets, label_smoothing=cfg.label_smoothing)
        for aux in getattr(output, "aux", None) or []:
            loss = loss + AUX_WEIGHT * F.cross_entropy(aux.float(), targets, label_smoothing=cfg.label_smoothing)
        return loss

    def outputs(self, model: nn.Module, images: Tensor) -> Tensor:
        return main_logits(model(images)).float()

    def decode(self, outputs: Tensor) -> Tensor:
        """Class probabilities [N, C]."""
        return outputs.softmax(1)

    def meter(self, classes: Sequence[str]) -> ClassifyMeter:
        return ClassifyMeter(classes)

    def update(self, meter: ClassifyMeter, outputs: Tensor, batch: Batch) -> None:
        meter.update(outputs, batch.targets)

    def visuals(self, model: nn.Module, data: Any, images: Tensor, predictions: Tensor, folder: Path) -> list[Path]:
        """Sample predictions titled with their probability, and Grad-CAM (Selvaraju et al. 2017) of the same images."""
        from pipelines.engine import inputs_of
        from pipelines.plots import grad_cam, plot_classify_samples, plot_grad_cam

        labels = data.labels[:len(images)].cpu()
        paths = [plot_classify_samples(images, predictions, labels, data.classes, folder / SAMPLES_PNG)]
        heat, top = grad_cam(model, inputs_of(images, data.mean, data.std))
        return paths + [plot_grad_cam(images, heat, top, data.classes, folder / "grad_cam.png")]


class SceneTask:
    """What detection and segmentation share: they read the composed scenes, augment image and
    targets jointly, and do not mix samples."""

    data = SCENES_DATA
    whole_batch_augment = False  # image and targets are augmented jointly, item by item

    def load_split(self, root: Path, split: str) -> Any:
        """A prepared split of scenes (tensors, or lazy readers when large)."""
        from pipelines.datasets import load_scenes

        return load_scenes(Path(root), split)

    def target_array(self, data: Any) -> Tensor:
        """The semantic masks (recorded with the dataset in MLflow)."""
        return data.masks

    def augmenter(self, data: Any, policy: PolicyParams | None, strength: float) -> Callable | None:
        """Joint image + target augmentation of scenes, or None when off."""
        from pipelines.transforms import build_scene_policy

        if policy is None or strength <= 0:
            return None
        return build_scene_policy(policy, data.image_size, data.in_channels, strength)

    def mixer(self, cfg: TrainConfig, num_classes: int) -> None:
        return None


class DetectTask(SceneTask):
    name, metric = "detect", "map"
    compiles = False  # torchvision's detection models do not compile cleanly
    exports_onnx = True
    # torchvision's post-processing loops over the images in Python, which tracing unrolls for the traced
    # batch, and each image keeps its own number of detections: the graph takes one image at a time.
    onnx_per_image = True
    confusion = False
    pr_title = "precision-recall at IoU 0.5"
    headline = ("test_map", "test_map_50", "test_mask_map")

    def forward(self, model: nn.Module, images: Tensor) -> Any:
        return model(list(images))

    def cpu_predictions(self, outputs: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Per image {"boxes" xyxy, "scores", "labels" 0..C-1[, "masks"]} on the CPU."""
        return [{k: v.cpu() for k, v in item.items()} for item in outputs]

    def join(self, chunks: list[Any]) -> list[dict[str, Tensor]]:
        return [item for chunk in chunks for item in chunk]

    def gather(self, data: Any, idx: Tensor) -> Batch:
        return Batch(data.images[idx], [data.targets[i] for i in idx.tolist()])

    def item(self, data: Any, i: int, augment: Callable) -> tuple[Tensor, Any]:
        image, target = augment(data.images[i], data.targets[i])
        return image, {k: target[k] for k in ("boxes", "labels", "masks")}

    def collate(self, items: Sequence[tuple[Tensor, Any]]) -> Batch:
        return Batch(torch.stack([image for image, _ in items]), [target for _, target in items])

    def loss(self, model: nn.Module, images: Tensor, targets: list[dict[str, Tensor]], cfg: TrainConfig,
             mixer: Callable | None = None) -> Tensor:
        # torchvision keeps label 0 for the background: class c is label c + 1
        shifted = [{"boxes": t["boxes"].float(), "labels": t["labels"] + 1, "masks": t["masks"]} for t in targets]
        losses = model(list(images), shifted)
        return sum(value.float() for value in losses.values())

    def outputs(self, model: nn.Module, images: Tensor) -> list[dict[str, Tensor]]:
        return self.decode(model(list(images)))

    def decode(self, outputs: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Per image {"boxes" xyxy, "scores", "labels" 0..C-1[, "masks" bool [k, H, W]]}."""
        decoded = []
        for out in outputs:
            item = {"boxes": out["boxes"].float(), "scores": out["scores"].float(), "labels": out["labels"] - 1}
            if "masks" in out:  # Mask R-CNN: soft masks [k, 1, H, W], thresholded at 0.5 as in He et al. 2017
                item["masks"] = out["masks"].reshape(len(out["boxes"]), *out["masks"].shape[-2:]) > 0.5
            decoded.append(item)
        return decoded

    def meter(self, classes: Sequence[str], score_threshold: float | None = None) -> DetectMeter:
        """mAP, and precision/recall at `score_threshold` (None: chosen at max F1, as on val in training)."""
        return DetectMeter(classes, score_threshold)

    def update(self, meter: DetectMeter, outputs: list[dict[str, Tensor]], batch: Batch) -> None:
        meter.update(outputs, batch.targets)

    def visuals(self, model: nn.Module, data: Any, images: Tensor, predictions: list[dict[str, Tensor]],
                folder: Path) -> list[Path]:
        """Truth and predicted boxes (and masks) side by side."""
        from pipelines.plots import draw_detect_samples

        targets = data.targets[:len(images)]
        return [draw_detect_samples(images, predictions, targets, data.classes, folder / SAMPLES_PNG)]


class SegmentTask(SceneTask):
    name, metric = "segment", "miou"
    compiles = True
    exports_onnx = True
    onnx_per_image = False
    confusion = False
    pr_title = "precision-recall (one vs rest)"
    headline = ("test_miou", "test_pixel_accuracy", "test_dice")

    def forward(self, model: nn.Module, images: Tensor) -> Any:
        return model(images)

    def cpu_predictions(self, outputs: Tensor) -> Tensor:
        """Class-index masks [N, H, W] on the CPU."""
        return outputs.cpu()

    def join(self, chunks: list[Any]) -> Any:
        return torch.cat(chunks) if chunks else torch.zeros((0,), dtype=torch.int64)

    def gather(self, data: Any, idx: Tensor) -> Batch:
        return Batch(data.images[idx], data.masks[idx])

    def item(self, data: Any, i: int, augment: ScenePolicy) -> tuple[Tensor, Any]:
        return augment.semantic(data.images[i], data.masks[i])

    def collate(self, items: Sequence[tuple[Tensor, Any]]) -> Batch:
        return Batch(torch.stack([image for image, _ in items]), torch.stack([mask for _, mask in items]))

    def loss(self, model: nn.Module, images: Tensor, targets: Tensor, cfg: TrainConfig,
             mixer: Callable | None = None) -> Tensor:
        logits = model(images).float()
        target = targets.long()
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=cfg.label_smoothing)
        if cfg.dice_weight > 0:
            loss = loss + cfg.dice_weight * soft_dice_loss(logits, target)
        return loss

    def outputs(self, model: nn.Module, images: Tensor) -> Tensor:
        return self.decode(model(images))

    def decode(self, outputs: Tensor) -> Tensor:
        """Class-index masks [N, H, W] (0 = background, c + 1 = class c)."""
        return outputs.argmax(1)

    def meter(self, classes: Sequence[str]) -> SegmentMeter:
        return SegmentMeter(classes)

    def update(self, meter: SegmentMeter, outputs: Tensor, batch: Batch) -> None:
        meter.update(outputs, batch.targets)

    def visuals(self, model: nn.Module, data: Any, images: Tensor, predictions: Tensor, folder: Path) -> list[Path]:
        """True and predicted masks side by side."""
        from pipelines.plots import draw_segment_samples

        truth = data.masks[:len(images)].cpu()
        return [draw_segment_samples(images, predictions, truth, data.classes, folder / SAMPLES_PNG)]


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 - mean soft Dice over classes (Milletari et al. 2016, V-Net), from logits [N, K, H, W]; pixels of
    `target` at IGNORE count for no class."""
    valid = (target != IGNORE).unsqueeze(1)
    probs = logits.softmax(1) * valid
    one_hot = F.one_hot(target.masked_fill(~valid[:, 0], 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    one_hot = one_hot.to(probs.dtype)
    intersection = (probs * one_hot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3))
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()


Task = ClassifyTask | DetectTask | SegmentTask | RegressTask | ReconstructTask
# The one declaration of the tasks: everything task-specific hangs off these adapters.
TASKS: dict[str, Task] = {task.name: task for task in (
    ClassifyTask(),
    DetectTask(),
    SegmentTask(),
    RegressTask(),
    ReconstructTask(),
)}
# The primary validation metric of each task, as the engine reports it (maximized).
PRIMARY = {name: f"val_{task.metric}" for name, task in TASKS.items()}


def get_task(name: str) -> Task:
    """The adapter of task `name`."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}")
    return TASKS[name]
