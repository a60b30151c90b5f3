"""Typed loader for params.yaml: every stage reads its knobs through `load_params()`.

Unknown keys, wrong types and out-of-range values fail at once with the key's
path and what is allowed, e.g. `augment.copies: expected int >= 0, got 'two'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.errors import ConvForgeError

TASKS = ("classify", "detect", "segment")
BUILTIN_DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "digits")
OWN_DATA_KINDS = ("imagefolder", "coco", "masks")

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    dataset: str
    cache_dir: str | None
    download: bool
    image_size: Annotated[int, Field(ge=8, le=4096)]
    on_corrupt: Literal["skip", "fail"]
    max_train: PosInt | None
    max_test: PosInt | None

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        kind, sep, path = value.partition(":")
        if value in BUILTIN_DATASETS or (kind in OWN_DATA_KINDS and sep and path):
            return value
        allowed = ", ".join([*BUILTIN_DATASETS, *(f"{k}:PATH" for k in OWN_DATA_KINDS)])
        raise ValueError(f"expected one of {allowed}, got {value!r}")

    @property
    def kind(self) -> str:
        """`fashion-mnist`, ..., or `imagefolder`/`coco`/`masks` for own data."""
        return self.dataset.partition(":")[0]

    @property
    def path(self) -> Path | None:
        """The folder of the user's own data, None for built-in datasets."""
        _, sep, path = self.dataset.partition(":")
        return Path(path).expanduser() if sep else None


class PolicyParams(Section):
    crop_padding: NonNegInt
    hflip: Fraction
    rotation_deg: Annotated[float, Field(ge=0.0, le=180.0)]
    translate: Annotated[float, Field(ge=0.0, le=0.5)]
    erasing: Fraction
    color_jitter: Annotated[float, Field(ge=0.0, le=1.0)]


class AugmentParams(Section):
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)]
    copies: NonNegInt
    preview_count: Annotated[int, Field(ge=1, le=256)]
    crop_size: Annotated[int, Field(ge=8, le=1024)]
    policy: PolicyParams


class SceneParams(Section):
    canvas_size: Annotated[int, Field(ge=32, le=1024)]
    min_items: PosInt
    max_items: PosInt
    scale_range: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=2, max_length=2)]
    max_overlap: Fraction
    min_visible: Fraction
    foreground_threshold: Annotated[int, Field(ge=0, le=254)]
    train_scenes: PosInt
    val_scenes: PosInt
    test_scenes: PosInt

    @model_validator(mode="after")
    def _ordered(self) -> "SceneParams":
        if self.min_items > self.max_items:
            raise ValueError(f"min_items ({self.min_items}) must be <= max_items ({self.max_items})")
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError(f"scale_range must be [low, high] with low <= high, got {list(self.scale_range)}")
        return self


Optimizer = Literal["sgd", "adamw"]
PosRange = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)]
NonNegRange = Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=2, max_length=2)]


class TrainSpaceParams(Section):
    """The training hyperparameters a search tunes: [low, high] ranges and lists of choices."""

    optimizer: Annotated[list[Optimizer], Field(min_length=1)]
    lr: dict[Optimizer, PosRange]  # log-uniform, one range per optimizer
    weight_decay: PosRange  # log-uniform
    batch_size: Annotated[list[Annotated[int, Field(ge=1, le=8192)]], Field(min_length=1)]
    aug_strength: Annotated[list[Annotated[float, Field(ge=0, le=4)]], Field(min_length=2, max_length=2)]

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSpaceParams":
        missing = [name for name in self.optimizer if name not in self.lr]
        if missing:
            raise ValueError(f"lr: no range for optimizer(s) {missing}")
        ranges = {f"lr.{k}": v for k, v in self.lr.items()}
        ranges.update(weight_decay=self.weight_decay, aug_strength=self.aug_strength)
        for name, (low, high) in ranges.items():
            if low > high:
                raise ValueError(f"{name} must be [low, high] with low <= high, got {[low, high]}")
        return self


class TaskSearchParams(Section):
    families: Annotated[list[str], Field(min_length=1)]
    num_samples: PosInt
    max_epochs: PosInt
    grace_period: PosInt
    time_budget_s: Annotated[float, Field(gt=0)]
    train_subset: PosInt | None
    space: TrainSpaceParams
    # Narrows a family's registry space for this budget: {family: {hparam: [choices]}}.
    model_space: dict[str, dict[str, Annotated[list[Any], Field(min_length=1)]]]


class SearchParams(Section):
    scheduler: Literal["asha", "hyperband", "pbt"]
    algorithm: Literal["optuna", "random"]
    reduction_factor: Annotated[int, Field(ge=2)]
    cpus_per_trial: Annotated[float, Field(gt=0)]
    gpus_per_trial: Annotated[float, Field(ge=0)]
    max_concurrent: PosInt
    max_failures: NonNegInt
    ray_address: str | None
    storage: str | None
    max_latency_ms: Annotated[float, Field(gt=0)] | None
    classify: TaskSearchParams
    detect: TaskSearchParams
    segment: TaskSearchParams

    @model_validator(mode="after")
    def _pbt_needs_random(self) -> "SearchParams":
        if self.scheduler == "pbt" and self.algorithm != "random":
            raise ValueError("scheduler pbt mutates trials itself: set search.algorithm to random")
        return self

    def task(self, task: str) -> TaskSearchParams:
        return getattr(self, task)


class TrainConfig(Section):
    """The hyperparameters of one training run (a search trial overrides some of them)."""

    epochs: PosInt
    batch_size: Annotated[int, Field(ge=1, le=8192)]
    optimizer: Literal["sgd", "adamw"]
    lr: Annotated[float, Field(gt=0, le=10)]
    momentum: Annotated[float, Field(ge=0, lt=1)]
    weight_decay: Annotated[float, Field(ge=0, le=1)]
    schedule: Literal["cosine", "onecycle", "constant"]
    warmup_epochs: NonNegInt
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    mixup_alpha: Annotated[float, Field(ge=0)]
    cutmix_alpha: Annotated[float, Field(ge=0)]
    ema_decay: Annotated[float, Field(ge=0, lt=1)]
    grad_clip: Annotated[float, Field(ge=0)]
    early_stop_patience: NonNegInt
    aug_strength: Annotated[float, Field(ge=0, le=4)]
    dice_weight: Annotated[float, Field(ge=0)]  # segment: CE + dice_weight * soft Dice loss

    def updated(self, **overrides: Any) -> "TrainConfig":
        """A validated copy with some keys replaced (e.g. by a search trial)."""
        return validate(TrainConfig, {**self.model_dump(), **overrides}, prefix="train")


class TrainParams(Section):
    device: Literal["auto", "cpu", "cuda"]
    amp: Literal["auto", "bf16", "fp16", "off"]
    channels_last: bool
    compile: bool
    num_threads: NonNegInt
    num_workers: NonNegInt
    classify: TrainConfig
    detect: TrainConfig
    segment: TrainConfig

    def task(self, task: str) -> TrainConfig:
        return getattr(self, task)


class MlflowParams(Section):
    tracking_uri: str
    experiment: Annotated[str, Field(min_length=1)]
    registered_model_prefix: Annotated[str, Field(min_length=1)]


class ServeParams(Section):
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    backend: Literal["torch", "onnx"]
    max_body_bytes: PosInt
    max_pixels: PosInt
    max_images: PosInt
    formats: Annotated[list[str], Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0)]
    max_concurrency: PosInt
    max_batch_size: PosInt
    max_latency_ms: PosInt
    top_k: PosInt
    num_threads: NonNegInt
    workers: PosInt


class Params(Section):
    seed: NonNegInt
    deterministic: bool
    data: DataParams
    augment: AugmentParams
    scenes: SceneParams
    search: SearchParams
    train: TrainParams
    mlflow: MlflowParams
    serve: ServeParams


def _field_bounds(model: type[BaseModel], loc: tuple[Any, ...]) -> dict[str, Any]:
    """The ge/gt/le/lt constraints declared on the field at `loc`, for messages."""
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return {}
        info = fields[part]
        model = info.annotation
    bounds: dict[str, Any] = {}
    for meta in getattr(info, "metadata", []):
        for key in ("ge", "gt", "le", "lt"):
            if getattr(meta, key, None) is not None:
                bounds[key] = getattr(meta, key)
    return bounds


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    """One pydantic error as `expected ..., got ...` in the user's words."""
    kind, value = error["type"], error.get("input")
    ctx = {**_field_bounds(model, error["loc"]), **error.get("ctx", {})}
    bounds = " and ".join(
        f"{op} {ctx[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if key in ctx
    )
    expected = {
        "int_type": "int", "int_parsing": "int", "int_from_float": "int",
        "float_type": "float", "float_parsing": "float",
        "bool_type": "bool", "bool_parsing": "bool",
        "string_type": "string", "list_type": "list",
        "dict_type": "mapping", "model_type": "mapping",
    }.get(kind)
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing key"
    if kind in ("too_short", "too_long"):
        sizes = sorted({ctx.get("min_length"), ctx.get("max_length")} - {None})
        return f"expected a list of {' to '.join(map(str, sizes))} item(s), got {value!r}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {value!r}"
    if kind.endswith(("_than", "_than_equal")):
        limits = [ctx[k] for k in ("ge", "gt", "le", "lt") if k in ctx]
        number = "int" if all(isinstance(v, int) for v in limits) else "number"
        return f"expected {number} {bounds}, got {value!r}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if expected:
        return f"expected {' '.join(p for p in (expected, bounds) if p)}, got {value!r}"
    return f"{error['msg']}, got {value!r}"


def _path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "constrained-")))


def validate(model: type[Section], raw: Any, prefix: str = "") -> Any:
    """Validate `raw` as `model`; the first problem becomes a one-line ConvForgeError."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = ".".join(p for p in (prefix, _path(first["loc"])) if p) or "params"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConvForgeError(f"{where}: {_describe(first, model)}{more}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConvForgeError(f"{path}: no such params file (run from the project root)") from None
    except yaml.YAMLError as exc:
        raise ConvForgeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return validate(Params, raw)
