"""Typed loader for params.yaml: every stage reads its knobs through `load_params()`.

Unknown keys, wrong types and out-of-range values fail at once with the key's
path and what is allowed, e.g. `augment.copies: expected int >= 0, got 'two'`.

With `CONVFORGE_PARAMS_TRACE=<dir>` set, the sections `load_params()` returns record which keys the
stage reads, and the stage writes them to `<dir>/<stage>.json` when it exits: `python -m
pipelines.depcheck --traces <dir>` compares them with the `params:` that dvc.yaml declares.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.errors import ConvForgeError

TASKS = ("classify", "detect", "segment", "regress", "reconstruct")
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
    image_size: Annotated[int, Field(ge=8, le=4096)] | Literal["auto"]
    auto_size_max: Annotated[int, Field(ge=8, le=4096)]  # image_size auto: cap for classification images
    auto_canvas_max: Annotated[int, Field(ge=32, le=4096)]  # image_size auto: cap for detect/segment images
    on_corrupt: Literal["skip", "fail"]
    max_pixels: PosInt  # own data: images with more pixels are left out per on_corrupt (Pillow's own limit in fetch)
    max_train: PosInt | None
    max_test: PosInt | None
    # regress on own data: a CSV `file,target[,target2...]` (file relative to the imagefolder root)
    targets_csv: str | None = None

    @model_validator(mode="after")
    def _targets_with_imagefolder(self) -> "DataParams":
        if self.targets_csv is not None and self.kind != "imagefolder":
            raise ValueError("targets_csv: only for data.dataset imagefolder:PATH")
        return self

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
    # Scenes only: zoom by a factor drawn from [low, high] (multi-scale training); [1.0, 1.0] = off
    scale_jitter: Annotated[list[Annotated[float, Field(gt=0.0, le=4.0)]], Field(min_length=2, max_length=2)] = \
        [1.0, 1.0]

    @model_validator(mode="after")
    def _ordered_jitter(self) -> "PolicyParams":
        if self.scale_jitter[0] > self.scale_jitter[1]:
            raise ValueError(f"scale_jitter must be [low, high] with low <= high, got {list(self.scale_jitter)}")
        return self


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
    # Transfer learning as search dimensions (choices; absent = the train.<task> value)
    pretrained: list[str | None] | None = None
    freeze: list[Annotated[int, Field(ge=0)]] | None = None
    unfreeze_epoch: list[Annotated[int, Field(ge=0)]] | None = None

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
    # epochs: trial budgets in epochs and items, every decision independent of finishing order (time_budget_s
    # is a guard); time: time_budget_s is the budget, trials promoted and drawn as they finish (asynchronous)
    budget: Literal["epochs", "time"]
    scheduler: Literal["asha", "asha_promote", "sha", "hyperband", "pbt"]
    algorithm: Literal["optuna", "random"]
    reduction_factor: Annotated[int, Field(ge=2)]
    # auto: the machine shared by max_concurrent trials (pipelines/runtime.py `trial_resources`)
    cpus_per_trial: Annotated[float, Field(gt=0)] | Literal["auto"]
    gpus_per_trial: Annotated[float, Field(ge=0)] | Literal["auto"]
    max_concurrent: PosInt
    max_failures: NonNegInt
    ray_address: str | None
    storage: str | None
    max_latency_ms: Annotated[float, Field(gt=0)] | None
    classify: TaskSearchParams
    detect: TaskSearchParams
    segment: TaskSearchParams
    regress: TaskSearchParams
    reconstruct: TaskSearchParams

    @model_validator(mode="after")
    def _scheduler_fits(self) -> "SearchParams":
        if self.scheduler == "pbt" and self.algorithm != "random":
            raise ValueError("scheduler pbt mutates trials itself: set search.algorithm to random")
        if self.budget == "epochs" and self.scheduler not in ("asha", "sha"):
            raise ValueError(f"scheduler {self.scheduler} decides by which trial finishes first: with budget epochs "
                             "use asha (halving in trial order) or sha (synchronous halving), or set search.budget "
                             "to time")
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
    precise_bn: NonNegInt  # training items BatchNorm statistics are recomputed on before each validation; 0 = off
    aug_strength: Annotated[float, Field(ge=0, le=4)]
    dice_weight: Annotated[float, Field(ge=0)]  # segment: CE + dice_weight * soft Dice loss
    loss: Literal["mse", "smooth_l1"]  # regress: on the standardized targets
    # Transfer learning (Keras `trainable=False` semantics): where the trunk's weights come from, how
    # many of its first stages stay frozen (their BatchNorm statistics too), and from which epoch the
    # frozen stages fine-tune at lr x unfreeze_lr_scale (0 = never).
    pretrained: str | None
    freeze: NonNegInt
    unfreeze_epoch: NonNegInt
    unfreeze_lr_scale: Annotated[float, Field(gt=0, le=1)]

    def updated(self, **overrides: Any) -> "TrainConfig":
        """A validated copy with some keys replaced (e.g. by a search trial)."""
        return validate(TrainConfig, {**self.model_dump(), **overrides}, prefix="train")


class TrainParams(Section):
    device: Literal["auto", "cpu", "cuda"]
    amp: Literal["auto", "bf16", "fp16", "off"]
    channels_last: bool
    compile: bool
    num_threads: NonNegInt
    num_workers: NonNegInt | Literal["auto"]
    workers: PosInt  # Ray Train workers of the final training (DDP); 1: one process, no Ray
    use_gpu: bool | Literal["auto"]  # Ray Train workers on GPUs; auto: from train.device and the cluster's GPUs
    classify: TrainConfig
    detect: TrainConfig
    segment: TrainConfig
    regress: TrainConfig
    reconstruct: TrainConfig

    @field_validator("amp", mode="before")
    @classmethod
    def _unquoted_off(cls, value: Any) -> Any:
        """YAML 1.1 (params.yaml, `dvc exp run -S train.amp=off`) reads a bare `off` as false."""
        return "off" if value is False else value

    def task(self, task: str) -> TrainConfig:
        return getattr(self, task)


MetricBounds = dict[Annotated[str, Field(min_length=1)], float]


class PromoteGate(Section):
    """The promote stage's gate for one task's new model: bounds on its test metrics (the keys of
    reports/metrics/<task>.json without `test_`), and the margin by which `metric` (higher is better)
    must beat the champion's on the same test data."""

    metric: Annotated[str, Field(min_length=1)]
    margin: Annotated[float, Field(ge=0)]
    min: MetricBounds  # metric >= bound
    max: MetricBounds  # metric <= bound


class PromoteParams(Section):
    classify: PromoteGate
    detect: PromoteGate
    segment: PromoteGate
    regress: PromoteGate
    reconstruct: PromoteGate

    def task(self, task: str) -> PromoteGate:
        return getattr(self, task)


class CorruptionParams(Section):
    """How the reconstruct task corrupts its inputs (pipelines/reconstruction.py): Gaussian noise, then one
    erased rectangle per image with probability `erasing`, covering a fraction in `erasing_scale` of it."""

    noise_std: Annotated[float, Field(ge=0.0, le=1.0)]  # in [0, 1] pixel units
    erasing: Fraction
    erasing_scale: Annotated[list[Annotated[float, Field(gt=0.0, le=1.0)]], Field(min_length=2, max_length=2)]

    @model_validator(mode="after")
    def _ordered_scale(self) -> "CorruptionParams":
        if self.erasing_scale[0] > self.erasing_scale[1]:
            raise ValueError(f"erasing_scale must be [low, high] with low <= high, got {list(self.erasing_scale)}")
        return self


class MlflowParams(Section):
    tracking_uri: str
    experiment: Annotated[str, Field(min_length=1)]
    registered_model_prefix: Annotated[str, Field(min_length=1)]


class ServeParams(Section):
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    backend: Literal["torch", "onnx", "auto"]  # auto: per task, from bench/serve.py's committed figures
    scale: Literal["fit", "native"]  # detect/segment: squeeze every upload to the training canvas, or keep its pixels
    max_side: Annotated[int, Field(ge=32, le=8192)]  # native: larger uploads are fitted to this side
    max_body_bytes: PosInt
    max_pixels: PosInt
    max_pixels_in_flight: PosInt  # decoded pixels one worker holds for its requests at once (services/budget.py)
    max_images: PosInt
    formats: Annotated[list[str], Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0)]
    max_concurrency: PosInt
    max_batch_size: PosInt
    max_latency_ms: PosInt
    top_k: PosInt
    num_threads: NonNegInt
    workers: PosInt
    device: Literal["auto", "cpu", "cuda"]  # auto: the GPU when one is usable


class Params(Section):
    seed: NonNegInt
    deterministic: bool
    data: DataParams
    augment: AugmentParams
    scenes: SceneParams
    search: SearchParams
    train: TrainParams
    promote: PromoteParams
    corruption: CorruptionParams
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


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 (and DVC, which writes `-S` values) does: `1e-06`
    is a float, not the string PyYAML 1.1 rules make of an exponent without a dot."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=YamlLoader)
    except FileNotFoundError:
        raise ConvForgeError(f"{path}: no such params file (run from the project root)") from None
    except yaml.YAMLError as exc:
        raise ConvForgeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    params = validate(Params, raw)
    trace_dir = os.environ.get(TRACE_ENV)
    return _start_trace(params, Path(trace_dir)) if trace_dir else params


# Which keys a stage reads, recorded for `pipelines.depcheck`. Off unless TRACE_ENV is set; then
# load_params() returns traced subclasses of the sections, so the plain classes never pay for it.
# Rules: reading a leaf field records its dotted path (a dict or list value is one leaf); reading a
# sub-section records nothing by itself. Values that leave the traced objects count as reads of
# every leaf they carry: model_dump()/model_dump_json(), iteration, comparison, pickling (a section
# handed to a Ray trial arrives plain, so other processes never record). Copies stay traced:
# model_copy(update=...) and TrainConfig.updated(**changes) record nothing themselves, and the keys
# they replace no longer come from params.yaml, so reading those in the copy records nothing.
# Reads inside forked DataLoader workers stay in the worker: pass them values, not sections.
TRACE_ENV = "CONVFORGE_PARAMS_TRACE"
_reads: set[str] = set()
_trace_owner: list[int] = []  # the pid that started tracing: the only process that writes the reads
_traced_classes: dict[tuple[type, str, frozenset[str]], type] = {}


def stage_name(main_module: str | None, argv: list[str]) -> str | None:
    """`search@classify` for `python -m pipelines.stages.search classify`; None outside a stage."""
    package, _, stage = (main_module or "").rpartition(".")
    if package != "pipelines.stages":
        return None
    return f"{stage}@{argv[1]}" if len(argv) > 1 else stage


def params_reads() -> set[str]:
    """The dotted keys read so far through traced sections (a copy)."""
    return set(_reads)


def _start_trace(params: Params, trace_dir: Path) -> Params:
    if not _trace_owner:
        _trace_owner.append(os.getpid())
        atexit.register(_write_trace, trace_dir)
    return traced(params)


def _write_trace(trace_dir: Path) -> None:
    """At exit of the stage process (not of its forked workers): its reads as `<trace_dir>/<stage>.json`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    stage = stage_name(getattr(spec, "name", None), sys.argv)
    if stage is None or os.getpid() != _trace_owner[0]:
        return
    trace_dir.mkdir(parents=True, exist_ok=True)
    (trace_dir / f"{stage}.json").write_text(json.dumps(sorted(_reads), indent=1) + "\n")


def _trace_info(section: Section) -> tuple[type, str | None, frozenset[str]]:
    """(plain class, path, replaced keys) of a section; path None when it is not traced."""
    return getattr(type(section), "__convforge_trace__", (type(section), None, frozenset()))


def traced(section: Section, path: str = "", replaced: frozenset[str] = frozenset()) -> Any:
    """A copy of plain `section` (and its sub-sections) that records each leaf read as `path.key`."""
    values = {name: traced(value, f"{path}.{name}".lstrip(".")) if isinstance(value, Section) else value
              for name, value in section.__dict__.items()}
    return _traced_class(type(section), path, replaced).model_construct(section.model_fields_set, **values)


def plain(section: Section) -> Any:
    """An untraced copy of `section`, made without recording (what a pickled section becomes)."""
    cls, path, _ = _trace_info(section)
    if path is None:
        return section
    values = {name: plain(value) if isinstance(value, Section) else value
              for name, value in object.__getattribute__(section, "__dict__").items()}
    return cls.model_construct(section.model_fields_set, **values)


def _leaves(section: Section, include: Any = None, exclude: Any = None) -> Iterator[str]:
    """The params keys that `model_dump(include=..., exclude=...)` of `section` carries out."""
    _, path, replaced = _trace_info(section)
    for name, value in object.__getattribute__(section, "__dict__").items():
        inner_include = include.get(name) if isinstance(include, dict) else None
        inner_exclude = exclude.get(name) if isinstance(exclude, dict) else None
        if include is not None and name not in include:
            continue
        if exclude is not None and name in exclude and not isinstance(inner_exclude, (set, dict)):
            continue
        if isinstance(value, Section):
            yield from _leaves(value, inner_include if isinstance(inner_include, (set, dict)) else None,
                               inner_exclude if isinstance(inner_exclude, (set, dict)) else None)
        elif path is not None and name not in replaced:
            yield f"{path}.{name}".lstrip(".")


def _as_is(section: Section) -> Section:
    return section


def _traced_class(cls: type, path: str, replaced: frozenset[str]) -> type:
    """The subclass of section class `cls` whose instances record their reads under `path`."""
    key = (cls, path, replaced)
    if key not in _traced_classes:
        _traced_classes[key] = type(cls)(f"Traced{cls.__name__}", (cls,), _traced_methods(cls, path, replaced))
    return _traced_classes[key]


def _traced_methods(cls: type, path: str, replaced: frozenset[str]) -> dict[str, Any]:
    fields = frozenset(cls.model_fields)

    def __getattribute__(self: Section, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in fields and name not in replaced and not isinstance(value, Section):
            _reads.add(f"{path}.{name}".lstrip("."))
        return value

    def model_dump(self: Section, **kwargs: Any) -> dict[str, Any]:
        _reads.update(_leaves(self, kwargs.get("include"), kwargs.get("exclude")))
        return plain(self).model_dump(**kwargs)

    def model_dump_json(self: Section, **kwargs: Any) -> str:
        _reads.update(_leaves(self, kwargs.get("include"), kwargs.get("exclude")))
        return plain(self).model_dump_json(**kwargs)

    def model_copy(self: Section, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any:
        values = {**object.__getattribute__(self, "__dict__"), **(update or {})}
        copy = _traced_class(cls, path, replaced | frozenset(update or {})).model_construct(
            self.model_fields_set | set(update or {}), **values)
        return copy.__deepcopy__() if deep else copy

    def __iter__(self: Section) -> Iterator[tuple[str, Any]]:
        values = object.__getattribute__(self, "__dict__")
        _reads.update(_leaves(self, include={k for k, v in values.items() if not isinstance(v, Section)}))
        return iter(values.items())

    def __reduce_ex__(self: Section, protocol: Any) -> Any:
        _reads.update(_leaves(self))
        return _as_is, (plain(self),)  # unpickles as the plain section

    def __eq__(self: Section, other: Any) -> bool:
        _reads.update(_leaves(self))
        return plain(self) == (plain(other) if isinstance(other, Section) else other)

    def updated(self: Section, **changes: Any) -> Any:
        return traced(cls.updated(plain(self), **changes), path, replaced | frozenset(changes))

    methods = {"__convforge_trace__": (cls, path, replaced), "__module__": __name__,
               "__getattribute__": __getattribute__, "model_dump": model_dump, "model_dump_json": model_dump_json,
               "model_copy": model_copy, "__iter__": __iter__, "__reduce_ex__": __reduce_ex__, "__eq__": __eq__,
               "__hash__": cls.__hash__, "__repr_name__": lambda self: cls.__name__}
    if hasattr(cls, "updated"):
        methods["updated"] = updated
    return methods
