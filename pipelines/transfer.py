"""Transfer learning's source: what `train.<task>.pretrained` names, resolved and loaded into a model's trunk.

A task name is that task's trained model folder of this pipeline (`artifacts/models/<task>`, a DVC dep
of the stage that reads it), `torchvision:<Weights>` comes from the local torch cache only, and
anything else is a saved ConvForge model's folder. Weights match by name below `features.` and by
shape (Yosinski et al. 2014: early layers transfer best).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from models import _checkpoint as checkpoint
from models._registry import BACKBONE_TASK
from pipelines.errors import ConvForgeError
from pipelines.tasks import TASKS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS = Path("artifacts") / "models"  # below the project root: where train@<task> writes its model folder
TORCHVISION = "torchvision:"  # `pretrained: torchvision:<Weights>`, read from the local torch cache only


def pretrained_source(spec: str | None, task: str, root: Path = PROJECT_ROOT) -> str | None:
    """What `train.<task>.pretrained` names: a task is its trained model folder (`artifacts/models/<task>`,
    a DVC dep of the stage), `torchvision:<Weights>` stays as it is, anything else is a folder (below `root`)."""
    if not spec or spec.startswith(TORCHVISION):
        return spec
    if spec not in TASKS:
        path = Path(spec).expanduser()
        return str(path if path.is_absolute() else Path(root) / path)
    if spec == task:
        raise ConvForgeError(f"train.{task}.pretrained: {spec} is this stage's own model; name another task's, "
                             f"a saved model's folder or {TORCHVISION}<Weights>")
    folder = Path(root) / MODELS / spec
    if not (folder / checkpoint.CONFIG).is_file():
        raise ConvForgeError(f"train.{task}.pretrained: {spec} means {folder}, which holds no trained model: "
                             f"run `dvc repro train@{spec}` first")
    return str(folder)


def trunk_hparams(family: Any, source: str | None) -> dict[str, Any]:
    """The trunk `family` (a registry Family) builds when `source` is a saved classifier: that classifier's
    family and hyperparameters as its `backbone`/`encoder` (so every trunk tensor fits), with the stride plan
    of its image size (so its stages see objects at the scale they learned); {} otherwise."""
    if not source or source.startswith(TORCHVISION) or family.trunk_key is None:
        return {}
    config = checkpoint.read_config(Path(source))
    if config.get("task") != BACKBONE_TASK:
        return {}
    return {family.trunk_key: config["family"],
            f"{family.trunk_key}_hparams": {**config["hparams"], "image_size": config["image_size"]}}


def load_pretrained(model: nn.Module, spec: str | None, task: str, root: Path = PROJECT_ROOT,
                    log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Load the trunk weights `spec` names into `model` by name below `features.` and shape (a line says how
    many tensors matched; none is an error); returns the report, None without `spec`."""
    source = pretrained_source(spec, task, root)
    return checkpoint.apply_transfer(model, pretrained=source, log=log) if source else None
