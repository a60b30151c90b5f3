"""The search space: each family's registry space, the optimizers' own keys, the shared training keys.

A trial's config is flat: `family`, then that family's `<family>.<hparam>` keys; `optimizer`,
then `<optimizer>.lr`; then `weight_decay`, `batch_size`, `aug_strength`, and the transfer keys
`pretrained`, `freeze`, `unfreeze_epoch` when `search.<task>.space` lists choices for them (else
the trial keeps `train.<task>`'s value). Optuna (TPE) walks this
space define-by-run, so only the chosen branch's keys are sampled; Ray's random search samples
every key and the trial reads the chosen branch's (`SearchSpace.choice`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ray import tune

from models import Choice, FloatRange, IntRange, family as registry_family
from pipelines.errors import ConvForgeError
from pipelines.params import TrainConfig, TrainSpaceParams

Domain = Choice | IntRange | FloatRange
Space = dict[str, Domain]
# TrainConfig keys searched only when `search.<task>.space` gives their choices (Yosinski et al. 2014:
# how much of a pretrained trunk to transfer and freeze is an empirical question, so search it).
TRANSFER_KEYS = ("pretrained", "freeze", "unfreeze_epoch")
NO_TRANSFER = {"pretrained": None, "freeze": 0, "unfreeze_epoch": 0}  # what a family without a trunk trains with
_ABSENT = object()  # a starting point's value that its domain does not offer (None is a valid choice)


def _is_plain(values: Iterable[Any]) -> bool:
    """Optuna's categorical choices must be None, bool, int, float or str."""
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values)


def _suggest(trial: Any, key: str, domain: Domain) -> Any:
    """One Optuna suggestion for `domain` under `key`; other choices (tuples, lists) go by index."""
    if isinstance(domain, Choice):
        values = list(domain.values)
        if _is_plain(values):
            return trial.suggest_categorical(key, values)
        return values[trial.suggest_categorical(key, list(range(len(values))))]
    if isinstance(domain, IntRange):
        return trial.suggest_int(key, domain.low, domain.high, log=domain.log)
    return trial.suggest_float(key, domain.low, domain.high, log=domain.log)


def ray_domain(domain: Domain) -> Any:
    """A registry domain as a Ray Tune sampler."""
    if isinstance(domain, Choice):
        return tune.choice(list(domain.values))
    if isinstance(domain, IntRange):  # Ray's integer upper bounds are exclusive
        return (tune.lograndint if domain.log else tune.randint)(domain.low, domain.high + 1)
    if domain.low == domain.high:
        return domain.low
    return (tune.loguniform if domain.log else tune.uniform)(domain.low, domain.high)


def _cast(domain: Domain, value: Any) -> Any:
    """Plain Python values (TrainConfig is strict: an int field refuses 64.0)."""
    if isinstance(domain, IntRange):
        return int(value)
    if isinstance(domain, FloatRange):
        return float(value)
    return value


def _clamp(domain: Domain, value: Any) -> Any:
    """`value` moved into `domain`, or `_ABSENT` when a choice does not offer it."""
    if isinstance(domain, Choice):
        return value if value in list(domain.values) else _ABSENT
    return type(value)(min(max(value, domain.low), domain.high))


@dataclass(frozen=True)
class TrialChoice:
    """What one trial trains: a family with its hyperparameters, and TrainConfig overrides."""

    family: str
    hparams: dict[str, Any]
    train: dict[str, Any]


@dataclass(frozen=True)
class SearchSpace:
    """Families with their registry spaces, optimizers with their own keys (lr), shared training keys.

    Called with an Optuna trial it is Optuna's define-by-run space (picklable, so a restored
    search gets it back).
    """

    families: dict[str, Space]
    optimizers: dict[str, Space]
    train: Space
    defaults: dict[str, dict[str, Any]]  # each family's registry defaults, its starting point
    trunkless: frozenset[str] = frozenset()  # families no classifier trunk can start (U-Net): always from scratch

    @classmethod
    def build(cls, task: str, family_names: list[str], space: TrainSpaceParams,
              model_space: dict[str, dict[str, list[Any]]] | None = None) -> "SearchSpace":
        """The space of `search.<task>`: each family's registry space (narrowed by `model_space`)
        plus the training space."""
        # Entries for families this search leaves out are ignored, so narrowing
        # `families` alone (e.g. `dvc exp run -S search.classify.families=[lenet5]`) stays valid.
        model_space = model_space or {}
        families, defaults, trunkless = {}, {}, set()
        for name in family_names:
            try:
                registered = registry_family(task, name)
            except KeyError as exc:
                raise ConvForgeError(f"search.{task}.families: {exc.args[0]}") from None
            if not registered.takes_trunk:
                trunkless.add(name)
            families[name], defaults[name] = dict(registered.space), dict(registered.defaults)
            for key, values in model_space.get(name, {}).items():
                if key not in registered.space:
                    raise ConvForgeError(f"search.{task}.model_space.{name}.{key}: not a searched hyperparameter "
                                         f"of {name}; known: {', '.join(sorted(registered.space))}")
                families[name][key] = Choice(list(values))
        optimizers = {name: {"lr": FloatRange(*space.lr[name], log=True)} for name in space.optimizer}
        train = {
            "weight_decay": FloatRange(*space.weight_decay, log=True),
            "batch_size": Choice(list(space.batch_size)),
            "aug_strength": FloatRange(*space.aug_strength),
        }
        train.update({key: Choice(list(getattr(space, key))) for key in TRANSFER_KEYS if getattr(space, key)})
        return cls(families, optimizers, train, defaults, frozenset(trunkless))

    def branches(self) -> list[tuple[str, dict[str, Space]]]:
        """The categorical keys whose value decides which `<value>.<hparam>` keys exist."""
        return [("family", self.families), ("optimizer", self.optimizers)]

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: a branch value first, then only that branch's keys."""
        chosen: dict[str, Any] = {}
        for parent, options in self.branches():
            value = trial.suggest_categorical(parent, list(options))
            chosen[parent] = value
            for name, domain in options[value].items():
                chosen[f"{value}.{name}"] = _suggest(trial, f"{value}.{name}", domain)
        for name, domain in self.train.items():
            chosen[name] = _suggest(trial, name, domain)
        return chosen

    def ray_space(self) -> dict[str, Any]:
        """Ray Tune random space: every key of every branch (a trial reads its own branch's)."""
        space: dict[str, Any] = {}
        for parent, options in self.branches():
            space[parent] = tune.choice(list(options))
            for value, hparams in options.items():
                space.update({f"{value}.{name}": ray_domain(d) for name, d in hparams.items()})
        space.update({name: ray_domain(d) for name, d in self.train.items()})
        return space

    def mutations(self) -> dict[str, Any]:
        """PBT's mutable keys: the continuous training hyperparameters (the model stays fixed)."""
        keys = {f"{opt}.{name}": d for opt, hp in self.optimizers.items() for name, d in hp.items()}
        keys.update(self.train)
        return {key: ray_domain(d) for key, d in keys.items()
                if isinstance(d, FloatRange) and d.low < d.high}

    def choice(self, config: dict[str, Any]) -> TrialChoice:
        """The active part of a trial's config."""
        family, optimizer = config["family"], config["optimizer"]
        fam_space, opt_space = self.families[family], self.optimizers[optimizer]
        hparams = {name: _cast(d, config[f"{family}.{name}"]) for name, d in fam_space.items()}
        train = {"optimizer": optimizer}
        train.update({name: _cast(d, config[f"{optimizer}.{name}"]) for name, d in opt_space.items()})
        train.update({name: _cast(d, config[name]) for name, d in self.train.items()})
        if family in self.trunkless:  # whatever train.<task> or the draw says about transfer
            train.update(NO_TRANSFER)
        return TrialChoice(family, hparams, train)

    def points(self, base: TrainConfig) -> list[dict[str, Any]]:
        """One starting point per family: its registry defaults with the task's TrainConfig values."""
        base_values = base.model_dump()
        optimizer = base.optimizer if base.optimizer in self.optimizers else next(iter(self.optimizers))
        common: dict[str, Any] = {"optimizer": optimizer}
        for name, domain in self.optimizers[optimizer].items():
            common[f"{optimizer}.{name}"] = _clamp(domain, base_values[name])
        for name, domain in self.train.items():
            common[name] = _clamp(domain, base_values[name])
        points = []
        for name, space in self.families.items():
            defaults = self.defaults.get(name, {})
            point = {"family": name}
            point.update({f"{name}.{k}": _clamp(d, defaults[k]) for k, d in space.items() if k in defaults})
            point.update(common)
            points.append({k: v for k, v in point.items() if v is not _ABSENT})
        return points

    def optuna_point(self, point: dict[str, Any]) -> dict[str, Any]:
        """`point` as Optuna stores it: choices that are not plain values by index."""
        domains = {"family": Choice(list(self.families)), "optimizer": Choice(list(self.optimizers))}
        for _, options in self.branches():
            for value, hparams in options.items():
                domains.update({f"{value}.{name}": d for name, d in hparams.items()})
        domains.update(self.train)
        out = {}
        for key, value in point.items():
            domain = domains[key]
            plain = not isinstance(domain, Choice) or _is_plain(domain.values)
            out[key] = value if plain else list(domain.values).index(value)
        return out
