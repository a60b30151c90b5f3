"""Search space conversion (Optuna define-by-run and Ray random), starting points, schedulers, searchers,
the winner and families table, and the search key."""

from __future__ import annotations

import pickle

import optuna
import pytest
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.sample import Categorical, Float, Integer
from ray.tune.search.variant_generator import generate_variants

from models._registry import Choice, FloatRange, IntRange, family as family_of
from pipelines.errors import ConvForgeError
from pipelines.params import TrainSpaceParams, validate
from pipelines.search import (families_table, pareto_front, pick_winner, pretrained_sources, search_key,
                              trial_config)
from pipelines.search_space import TRANSFER_KEYS, SearchSpace, ray_domain
from pipelines.tracking import code_hash, data_hash
from pipelines.tuner import InOrder, OrderedHalving, PromotingHalving, make_scheduler, make_search_alg, trial_base

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture()
def space() -> SearchSpace:
    """Two made-up families (one with a tuple-valued choice) and the classify training space."""
    return SearchSpace(
        families={
            "wide": {"width": Choice([16, 32]), "dropout": FloatRange(0.0, 0.5), "stages": Choice([(1, 1), (2, 2)])},
            "deep": {"depth": IntRange(2, 8, log=True)},
        },
        optimizers={"sgd": {"lr": FloatRange(0.01, 0.2, log=True)}, "adamw": {"lr": FloatRange(5e-4, 5e-3, log=True)}},
        train={"weight_decay": FloatRange(1e-5, 1e-3, log=True), "batch_size": Choice([64, 128]),
               "aug_strength": FloatRange(0.0, 1.5)},
        defaults={"wide": {"width": 16, "dropout": 0.1, "stages": (2, 2)}, "deep": {"depth": 4}},
    )


def test_optuna_space_samples_only_the_chosen_branches(space):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        config = space(trial)
        family, optimizer = config["family"], config["optimizer"]
        seen.add((family, optimizer))
        expected = {"family", "optimizer", f"{optimizer}.lr", "weight_decay", "batch_size", "aug_strength",
                    *(f"{family}.{k}" for k in space.families[family])}
        assert set(config) == expected
        assert set(trial.params) == expected  # Optuna itself saw no key of another branch
        chosen = space.choice(config)
        assert chosen.family == family and set(chosen.hparams) == set(space.families[family])
        assert set(chosen.train) == {"optimizer", "lr", "weight_decay", "batch_size", "aug_strength"}
        low, high = space.optimizers[optimizer]["lr"].low, space.optimizers[optimizer]["lr"].high
        assert low <= chosen.train["lr"] <= high
        if family == "wide":
            assert chosen.hparams["stages"] in [(1, 1), (2, 2)]  # tuple choices come back as values
            assert isinstance(trial.params["wide.stages"], int)  # Optuna stores their index
        else:
            assert isinstance(chosen.hparams["depth"], int) and 2 <= chosen.hparams["depth"] <= 8
        study.tell(trial, 0.5)
    assert len(seen) == 4


def test_space_pickles_for_a_restored_search(space):
    again = pickle.loads(pickle.dumps(space))
    assert again == space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    assert again(study.ask())["family"] in space.families


def test_ray_space_has_every_key_and_the_trial_reads_its_branch(space):
    ray_space = space.ray_space()
    assert isinstance(ray_space["family"], Categorical) and ray_space["family"].categories == ["wide", "deep"]
    assert isinstance(ray_space["deep.depth"], Integer) and ray_space["deep.depth"].upper == 9  # exclusive
    assert isinstance(ray_space["sgd.lr"], Float) and isinstance(ray_space["adamw.lr"], Float)
    families = set()
    for index in range(12):  # how Ray's random search resolves a sample, seeded
        _, config = next(generate_variants(ray_space, random_state=index))
        chosen = space.choice(config)
        families.add(chosen.family)
        assert set(chosen.hparams) == set(space.families[chosen.family])
        assert chosen.train["batch_size"] in (64, 128) and 0.0 <= chosen.train["aug_strength"] <= 1.5
    assert families == {"wide", "deep"}


def test_ray_domain_conversions():
    assert ray_domain(FloatRange(0.3, 0.3)) == 0.3
    assert ray_domain(FloatRange(1e-3, 1e-1, log=True)).sampler.__class__.__name__ == "_LogUniform"
    assert ray_domain(IntRange(1, 4)).lower == 1 and ray_domain(IntRange(1, 4)).upper == 5
    assert ray_domain(Choice(["a", "b"])).categories == ["a", "b"]


def test_points_start_each_family_at_its_defaults(space, project_params):
    base = project_params.train.classify.updated(lr=0.5, batch_size=100, optimizer="sgd")
    points = space.points(base)
    assert [p["family"] for p in points] == ["wide", "deep"]
    wide = points[0]
    assert wide["wide.width"] == 16 and wide["wide.stages"] == (2, 2) and wide["optimizer"] == "sgd"
    assert wide["sgd.lr"] == 0.2  # clamped into the range
    assert "batch_size" not in wide  # 100 is no choice: left to the searcher
    assert space.optuna_point(wide)["wide.stages"] == 1
    # Optuna replays an enqueued point exactly, tuple-valued choices included.
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(space.optuna_point(wide))
    config = space(study.ask())
    assert config["family"] == "wide" and config["wide.stages"] == (2, 2) and config["sgd.lr"] == 0.2


def test_build_reads_params_and_rejects_unknown_families(project_params):
    train_space = project_params.search.classify.space
    with pytest.raises(ConvForgeError, match="search.classify.families"):
        SearchSpace.build("classify", ["no_such_family"], train_space)


def test_model_space_narrows_registry_spaces(project_params):
    train_space = project_params.search.classify.space
    space = SearchSpace.build("classify", ["resnet", "lenet5"], train_space, {"resnet": {"depth": [10, 14]}})
    assert space.families["resnet"]["depth"] == Choice([10, 14])
    assert space.families["lenet5"] == dict(family_of("classify", "lenet5").space)  # not narrowed: registry's
    # Narrowing a family the search leaves out is ignored, so `-S search.classify.families=[...]` alone works.
    assert set(SearchSpace.build("classify", ["resnet"], train_space, {"vgg": {"depth": [11]}}).families) == {"resnet"}
    with pytest.raises(ConvForgeError, match="model_space.resnet.colour: not a searched hyperparameter"):
        SearchSpace.build("classify", ["resnet"], train_space, {"resnet": {"colour": [1]}})


def test_transfer_keys_are_search_dimensions_when_listed(project_params):
    """`pretrained`, `freeze`, `unfreeze_epoch` are searched when listed; a trial's choice reaches its TrainConfig."""
    train_space = project_params.search.classify.space
    assert not set(TRANSFER_KEYS) & set(SearchSpace.build("classify", ["lenet5"], train_space).train)  # absent
    listed = validate(TrainSpaceParams, {**train_space.model_dump(), "pretrained": [None, "detect"],
                                         "freeze": [0, 2], "unfreeze_epoch": [0, 3]})
    space = SearchSpace.build("classify", ["lenet5"], listed)
    assert space.train["pretrained"] == Choice([None, "detect"]) and space.train["freeze"] == Choice([0, 2])
    assert "freeze" not in space.mutations()  # PBT never changes what the model's stages are
    base = trial_config(project_params, "classify")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        config = space(study.ask())
        cfg = base.updated(**space.choice(config).train)
        assert (cfg.pretrained, cfg.freeze, cfg.unfreeze_epoch) == tuple(config[k] for k in TRANSFER_KEYS)
        seen.add(cfg.pretrained)
    assert seen == {None, "detect"}
    _, ray_config = next(generate_variants(space.ray_space(), random_state=0))
    assert set(TRANSFER_KEYS) <= set(space.choice(ray_config).train)
    # The starting point keeps train.<task>'s values, None included, and Optuna replays it.
    (point,) = space.points(base)
    assert (point["pretrained"], point["freeze"], point["unfreeze_epoch"]) == (None, 0, 0)
    study.enqueue_trial(space.optuna_point(point))
    assert space(study.ask())["pretrained"] is None


def test_a_family_without_a_trunk_trains_from_scratch_whatever_the_transfer_keys_say(project_params):
    space = project_params.search.reconstruct.space
    listed = validate(TrainSpaceParams, {**space.model_dump(), "pretrained": ["classify"], "freeze": [2],
                                         "unfreeze_epoch": [3]})
    searched = SearchSpace.build("reconstruct", ["unet", "autoencoder"], listed)
    assert searched.trunkless == {"unet"}  # the autoencoder's encoder is a classifier's trunk
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(10):
        chosen = searched.choice(searched(study.ask()))
        seen[chosen.family] = tuple(chosen.train[key] for key in TRANSFER_KEYS)
    assert seen == {"unet": (None, 0, 0), "autoencoder": ("classify", 2, 3)}


def test_train_space_params_validate():
    good = {"optimizer": ["sgd"], "lr": {"sgd": [0.01, 0.1]}, "weight_decay": [1e-5, 1e-3],
            "batch_size": [32], "aug_strength": [0.0, 1.0]}
    assert validate(TrainSpaceParams, good).lr == {"sgd": [0.01, 0.1]}
    with pytest.raises(ConvForgeError, match="no range for optimizer"):
        validate(TrainSpaceParams, {**good, "optimizer": ["sgd", "adamw"]})
    with pytest.raises(ConvForgeError, match="low <= high"):
        validate(TrainSpaceParams, {**good, "weight_decay": [1e-3, 1e-5]})
    with pytest.raises(ConvForgeError, match="weight_decay"):
        validate(TrainSpaceParams, {**good, "weight_decay": [0.0, 1e-3]})  # log range needs low > 0


def test_scheduler_factory(space):
    asha = make_scheduler("asha", max_epochs=3, grace_period=5, reduction_factor=2, space=space)
    assert isinstance(asha, ASHAScheduler)
    assert asha._max_t == 3 and asha._reduction_factor == 2  # grace period capped at max_epochs
    ordered = make_scheduler("asha", 9, 1, 3, space, window=2)  # budget epochs: halving in trial order
    assert isinstance(ordered, OrderedHalving) and ordered.rung_epochs == [1, 3] and ordered.window == 2
    assert isinstance(make_scheduler("hyperband", 9, 1, 3, space), HyperBandScheduler)
    promoting = make_scheduler("asha_promote", 9, 1, 3, space, num_samples=24)  # ASHA with promotions
    assert isinstance(promoting, PromotingHalving) and promoting.rung_epochs == [1, 3]
    assert promoting.num_samples == 24 and not promoting.synchronous
    synchronous = make_scheduler("sha", 9, 1, 3, space, num_samples=24)  # successive halving, rung by rung
    assert isinstance(synchronous, PromotingHalving) and synchronous.synchronous and synchronous.rung_epochs == [1, 3]
    for kind in ("asha_promote", "sha"):  # they stop the paused trials once all are drawn
        with pytest.raises(ConvForgeError, match="num_samples"):
            make_scheduler(kind, 9, 1, 3, space)
    pbt = make_scheduler("pbt", 4, 1, 2, space)
    assert isinstance(pbt, PopulationBasedTraining)
    assert set(pbt._hyperparam_mutations) == {"sgd.lr", "adamw.lr", "weight_decay", "aug_strength"}
    with pytest.raises(ConvForgeError):
        make_scheduler("median", 3, 1, 2, space)


def test_search_alg_factory(space, project_params):
    points = space.points(project_params.train.classify)
    optuna_alg = make_search_alg("optuna", space, "val_accuracy", points, max_concurrent=2, seed=0)
    assert isinstance(optuna_alg, ConcurrencyLimiter) and optuna_alg.max_concurrent == 2
    # The first suggestions are the families' starting points, in order.
    assert optuna_alg.suggest("t1")["family"] == "wide" and optuna_alg.suggest("t2")["family"] == "deep"
    random_alg = make_search_alg("random", space, "val_accuracy", points, max_concurrent=2, seed=0)
    assert isinstance(random_alg, BasicVariantGenerator)
    for algorithm in ("optuna", "random"):  # budget epochs: in trial order, each drawn by its own seeded sampler
        ordered = make_search_alg(algorithm, space, "val_accuracy", points, max_concurrent=2, seed=0, in_order=True)
        assert isinstance(ordered, ConcurrencyLimiter) and ordered.max_concurrent == 2
        assert isinstance(ordered.searcher, InOrder) and ordered.searcher.window == 2
        assert ordered.suggest("t1")["family"] == "wide" and ordered.suggest("t2")["family"] == "deep"
    with pytest.raises(ConvForgeError):
        make_search_alg("grid", space, "val_accuracy", points, 1, 0)


def test_pbt_needs_random_search(project_params):
    from pipelines.params import SearchParams

    raw = {**project_params.search.model_dump(), "scheduler": "pbt", "algorithm": "optuna", "budget": "time"}
    with pytest.raises(ConvForgeError, match="pbt"):
        validate(SearchParams, raw, prefix="search")


@pytest.mark.parametrize("scheduler", ["hyperband", "pbt", "asha_promote"])
def test_budget_epochs_takes_the_order_independent_scheduler_only(project_params, scheduler):
    from pipelines.params import SearchParams

    assert project_params.search.budget == "epochs"  # the default
    raw = {**project_params.search.model_dump(), "scheduler": scheduler, "algorithm": "random"}
    with pytest.raises(ConvForgeError, match="decides by which trial finishes first"):
        validate(SearchParams, raw, prefix="search")
    assert validate(SearchParams, {**raw, "budget": "time"}).scheduler == scheduler
    # synchronous halving decides each rung on all its trials: no finishing order to depend on
    assert validate(SearchParams, {**raw, "scheduler": "sha"}).scheduler == "sha"


def test_pareto_front_and_winner_under_latency():
    points = [(1.0, 0.80), (2.0, 0.90), (3.0, 0.85), (0.5, 0.70), (4.0, 0.95)]
    assert pareto_front(points) == [3, 0, 1, 4]
    rows = [{"trial_id": str(i), "family": "f", "score": s, "latency_ms": lat, "status": "completed"}
            for i, (lat, s) in enumerate(points)]
    rows.append({"trial_id": "x", "family": "g", "score": None, "latency_ms": None, "status": "error"})
    assert pick_winner(rows, None)["trial_id"] == "4"
    assert pick_winner(rows, 2.5)["trial_id"] == "1"
    with pytest.raises(ConvForgeError, match="fastest takes 0.5 ms"):
        pick_winner(rows, 0.1)
    # A tie never goes by a latency measured on this machine: fewer MACs, then the earlier trial.
    tied = [{"trial_id": t, "index": i, "score": 0.9, "macs": m, "latency_ms": lat}
            for t, i, m, lat in (("a", 0, 200, 1.0), ("b", 1, 100, 9.0), ("c", 2, 100, 0.5))]
    assert pick_winner(tied, None)["trial_id"] == "b"


def test_families_table_keeps_failed_families():
    rows = [
        {"trial_id": "a", "family": "f", "score": 0.8, "params": 10, "macs": 100, "latency_ms": 1.0,
         "hparams": {"w": 1}, "status": "completed"},
        {"trial_id": "b", "family": "f", "score": 0.9, "params": 20, "macs": 200, "latency_ms": 2.0,
         "hparams": {"w": 2}, "status": "stopped"},
        {"trial_id": "c", "family": "g", "score": None, "params": None, "macs": None, "latency_ms": None,
         "hparams": {}, "status": "error"},
    ]
    table = families_table(["g", "f"], rows)
    assert [row["family"] for row in table] == ["f", "g"]
    assert table[0]["score"] == 0.9 and table[0]["trial_id"] == "b" and table[0]["trials"] == 2
    assert table[1]["score"] is None and table[1]["errors"] == 1


def test_search_key_changes_with_what_shapes_the_trials_only(project_params, space, prepared_classify):
    from pipelines.params import Params

    def with_search(**changes) -> Params:
        raw = project_params.model_dump()
        raw["search"].update(changes)
        return validate(Params, raw)

    data = data_hash(prepared_classify)
    key = search_key(project_params, "classify", space, data)
    assert key == search_key(project_params, "classify", space, data)
    # Picking among finished trials, or where Ray runs, is no new search: the finished one is reused. (Resources
    # given: at `auto` the key would count the cluster's, joining it.)
    given = search_key(with_search(cpus_per_trial=1, gpus_per_trial=0.0), "classify", space, data)
    assert search_key(with_search(cpus_per_trial=1, gpus_per_trial=0.0, max_latency_ms=5.0,
                                  ray_address="10.0.0.1:6379"), "classify", space, data) == given
    assert search_key(with_search(max_latency_ms=5.0), "classify", space, data) == key
    assert search_key(with_search(max_concurrent=7), "classify", space, data) != key
    assert search_key(with_search(budget="time"), "classify", space, data) != key
    raw = project_params.model_dump()
    raw["search"]["detect"]["num_samples"] = 99  # another task's budget
    assert search_key(validate(Params, raw), "classify", space, data) == key
    raw["search"]["classify"]["num_samples"] = 99
    assert search_key(validate(Params, raw), "classify", space, data) != key
    assert search_key(project_params, "classify", space, "other data") != key


def test_settings_that_change_what_trials_compute_are_another_search(project_params, space):
    """`dvc exp run -S train.amp=bf16 search@classify` read the float32 trials back as the bf16 search ('already
    complete'): the key left the engine out. The resolved device, AMP, memory format and compilation are in it."""
    from pipelines.params import Params

    def with_train(**changes) -> Params:
        raw = project_params.model_dump()
        raw["train"].update(changes)
        return validate(Params, raw)

    key = search_key(project_params, "classify", space, "data")
    assert project_params.train.amp == "auto"  # float32 on this CPU
    assert search_key(with_train(amp="off"), "classify", space, "data") == key  # what auto resolves to here
    for changed in ({"amp": "bf16"}, {"channels_last": False}, {"compile": True}):
        assert search_key(with_train(**changed), "classify", space, "data") != key, changed
    assert search_key(with_train(num_workers=3), "classify", space, "data") == key  # how batches arrive: the same


def test_changed_code_is_another_search(project_params, space, tmp_path):
    """`dvc repro` after an upgrade or an edit of the engine or a model reruns the search stage; finished trials of
    the old code must not stand in for new ones (Tune restores any experiment found under the same key)."""
    models, pipelines, services = (tmp_path / name for name in ("models", "pipelines", "services"))
    for folder, name, text in ((models, "net.py", "WIDTH = 16\n"), (pipelines, "engine.py", "LR = 0.1\n"),
                               (services, "app.py", "PORT = 3000\n")):
        folder.mkdir()
        (folder / name).write_text(text)
    before = code_hash(tmp_path)
    (pipelines / "__pycache__").mkdir()
    (pipelines / "__pycache__" / "engine.cpython-311.pyc").write_bytes(b"\0compiled")
    (models / "notes.txt").write_text("not code")
    (services / "app.py").write_text("PORT = 3001\n")  # no package the trials run
    assert code_hash(tmp_path) == before
    (pipelines / "engine.py").write_text("LR = 0.2\n")
    edited = code_hash(tmp_path)
    assert edited != before
    (pipelines / "engine.py").rename(pipelines / "engine2.py")  # a move is a change too
    assert code_hash(tmp_path) not in (before, edited)

    key = search_key(project_params, "classify", space, "data")
    assert key == search_key(project_params, "classify", space, "data", code=code_hash())  # the project's code
    assert search_key(project_params, "classify", space, "data", code=before) != search_key(
        project_params, "classify", space, "data", code=edited)


def test_final_training_epochs_are_no_part_of_the_search(project_params, space):
    from pipelines.params import Params

    def with_train(**changes) -> Params:
        raw = project_params.model_dump()
        raw["train"]["classify"].update(changes)
        return validate(Params, raw)

    key = search_key(project_params, "classify", space, "data")
    # `dvc exp run -S train.classify.epochs=20` lengthens the final training only.
    assert search_key(with_train(epochs=20), "classify", space, "data") == key
    assert search_key(with_train(lr=0.01), "classify", space, "data") != key
    budget = project_params.search.classify.max_epochs
    assert trial_config(with_train(epochs=20), "classify").epochs == budget


def test_trial_base_runs_the_budget_and_fits_the_warmup_into_it(project_params):
    cfg = project_params.train.classify.updated(epochs=30, warmup_epochs=5)
    base = trial_base(cfg, 3)
    assert base.epochs == 3 and base.warmup_epochs == 2
    assert base.model_dump(exclude={"epochs", "warmup_epochs"}) == cfg.model_dump(exclude={"epochs", "warmup_epochs"})
    assert trial_base(cfg, 1).warmup_epochs == 0


def test_a_retrained_pretrained_model_is_another_search(project_params, space, tmp_path):
    import json

    model = tmp_path / "classifier"
    model.mkdir()
    config = {"task": "classify", "family": "resnet", "num_classes": 2, "in_channels": 1, "image_size": 28,
              "hparams": {}}
    (model / "config.json").write_text(json.dumps({**config, "weights_sha256": "a" * 64}))
    key = search_key(project_params, "detect", space, "data", {str(model): str(model)})
    assert key != search_key(project_params, "detect", space, "data")
    (model / "config.json").write_text(json.dumps({**config, "weights_sha256": "b" * 64}))
    assert search_key(project_params, "detect", space, "data", {str(model): str(model)}) != key


def test_a_missing_pretrained_model_stops_the_search_before_any_trial(project_params, space, tmp_path, monkeypatch):
    import pipelines.search as search_module
    from pipelines import transfer

    # A project whose classifier is not trained (whatever this workspace's artifacts/models holds).
    monkeypatch.setattr(search_module, "pretrained_source",
                        lambda spec, task: transfer.pretrained_source(spec, task, tmp_path))
    raw = project_params.model_dump()
    raw["train"]["detect"]["pretrained"] = str(tmp_path / "nowhere")
    sources = pretrained_sources(validate(type(project_params), raw), "detect", space)
    assert sources == {str(tmp_path / "nowhere"): str(tmp_path / "nowhere")}
    raw["train"]["detect"]["pretrained"] = "classify"  # this pipeline's classifier, not trained here
    with pytest.raises(ConvForgeError, match="run `dvc repro train@classify` first"):
        pretrained_sources(validate(type(project_params), raw), "detect", space)


def test_trials_get_their_share_of_this_machine(project_params):
    from pipelines.runtime import probe
    from pipelines.search import trial_resources, trial_settings

    if probe().gpus:
        pytest.skip("this machine has a GPU")
    search = project_params.search.model_copy(update={"cpus_per_trial": "auto", "gpus_per_trial": "auto"})
    params = project_params.model_copy(update={"search": search})
    cores = probe().cores
    assert trial_resources(params) == (float(max(1, cores // search.max_concurrent)), 0.0)
    settings = trial_settings(params)
    assert settings.device == "cpu" and settings.num_threads == max(1, cores // search.max_concurrent)
    on_cuda = params.model_copy(update={"train": params.train.model_copy(update={"device": "cuda"})})
    with pytest.raises(ConvForgeError, match="train.device is cuda but search.gpus_per_trial is 0"):
        trial_settings(on_cuda)


def test_a_search_is_reproducible_only_on_deterministic_kernels(project_params):
    """A search on CUDA said `reproducible: true` in best.json and MLflow: there only cuDNN's convolutions are
    deterministic (max-pool, bilinear upsampling and RoIAlign backward add with atomics), so its trial scores,
    and with them TPE's draws and the halving, vary from run to run."""
    from pipelines.search import is_reproducible, trial_determinism

    search = project_params.search
    assert search.budget == "epochs" and trial_determinism(project_params) == "kernels"  # this CPU, the defaults
    assert is_reproducible(search, None, "kernels")
    assert not is_reproducible(search, None, "cudnn") and not is_reproducible(search, None, "off")
    assert not is_reproducible(search, "the time guard fired", "kernels")
    assert not is_reproducible(search.model_copy(update={"max_latency_ms": 5.0}), None, "kernels")
    assert not is_reproducible(search.model_copy(update={"budget": "time"}), None, "kernels")


def test_auto_shares_a_clusters_nodes_not_the_head_nodes_machine():
    """On a Ray cluster `auto` took the driver's machine: from a head node without GPUs every trial trained on the
    CPU. It shares the live nodes' CPUs and GPUs, a trial's CPUs within the largest node."""
    from pipelines.runtime import cluster_hardware, trial_resources

    nodes = [{"Alive": True, "Resources": {"CPU": 4.0}},                   # the head: no GPU
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]     # gone
    hardware, node_cpus = cluster_hardware(nodes)
    assert (hardware.cores, hardware.gpus, node_cpus) == (20, 4, 8)
    assert trial_resources("auto", "auto", 8, hardware) == (2.0, 0.5)
    assert trial_resources("auto", "auto", 2, hardware) == (10.0, 1.0)  # capped at node_cpus by the search


def test_profiling_the_trials_gives_the_process_its_threads_back(monkeypatch):
    """Profiling measures each trial's latency on one thread; it left the whole process on one, so a final training
    run after it in the same process (bench/gpu_check.py) trained its CPU work on a single thread."""
    import torch

    from pipelines import search

    def one_thread_inside(*args, **kwargs):
        assert torch.get_num_threads() == 1
        raise RuntimeError("stop")

    before = torch.get_num_threads()
    monkeypatch.setattr(search, "run_model", one_thread_inside)
    record = search.TrialRecord("t1", 0, "lenet5", {}, {}, "completed", 0.5, 1, None, None)
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="stop"):
            search.profile_trials("classify", [record], data=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
