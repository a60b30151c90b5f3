"""The pieces that keep a `budget: epochs` search independent of finishing order: ASHA's rungs and rule applied
against earlier batches only, trial indices from Tune's count, per-trial seeded sampling, and the time guard."""

from __future__ import annotations

import pickle
from functools import partial

import optuna
import pytest

from models._registry import Choice, FloatRange
from pipelines.search import guard_fired
from pipelines.search_space import SearchSpace
from pipelines.tuner import InOrder, PerTrialSeed, TrialRecord, halving_stops, rungs, tpe_sampler, trial_index

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_rungs_are_ashas_below_the_last_epoch():
    assert rungs(3, 1, 2) == [1, 2]
    assert rungs(9, 1, 3) == [1, 3]
    assert rungs(2, 1, 2) == [1]  # halving at the last epoch would save nothing
    assert rungs(3, 5, 2) == []  # the grace period is capped at max_epochs


def test_halving_applies_ashas_rule_against_the_earlier_trials_that_reached_the_rung():
    earlier = [[0.5, 0.6], [0.7], [0.3, 0.4, 0.45]]  # the second was stopped at epoch 1
    # Rung 1 (rf 2: the median of 0.3, 0.5, 0.7 is 0.5): below it stops, at or above it goes on.
    assert halving_stops([0.45], earlier, [1, 2], 2)
    assert not halving_stops([0.5], earlier, [1, 2], 2)
    # Rung 2: only the two trials that reached it count (median 0.5).
    assert halving_stops([0.9, 0.45], earlier, [1, 2], 2) and not halving_stops([0.1, 0.55], earlier, [1, 2], 2)
    assert not halving_stops([0.0, 0.0, 0.0], earlier, [1, 2], 2)  # epoch 3 is no rung
    assert not halving_stops([0.0], [], [1, 2], 2)  # the first batch has nothing to be judged against
    # Which earlier trial finished first plays no part: any order of them decides alike.
    assert all(halving_stops([0.45], order, [1, 2], 2) for order in (earlier[::-1], earlier[1:] + earlier[:1]))


def test_trial_index_is_tunes_count_of_the_trial():
    from ray.tune.experiment import Trial
    from ray.tune.registry import register_trainable

    register_trainable("order_probe", lambda config: None)
    trials = [Trial("order_probe", config={}, experiment_tag=tag, trial_id=f"t{n}")
              for n, tag in enumerate(["1_family=lenet5", "12_family=resnet,lr=0.1", "3"])]
    assert [trial_index(trial) for trial in trials] == [0, 11, 2]


@pytest.fixture()
def space() -> SearchSpace:
    return SearchSpace(families={"a": {"w": Choice([8, 16, 32])}, "b": {"p": FloatRange(0.0, 0.5)}},
                       optimizers={"sgd": {"lr": FloatRange(0.01, 0.2, log=True)}},
                       train={"weight_decay": FloatRange(1e-5, 1e-3, log=True)}, defaults={})


def second_trial(sampler: optuna.samplers.BaseSampler, space: SearchSpace, first: optuna.trial.FrozenTrial | None):
    """Trial 1's values after trial 0 finished: drawn in this study (first=None), or added as already finished."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    if first is None:
        trial = study.ask()
        space(trial)
        study.tell(trial, 0.5)
    else:
        study.add_trial(first)
    return space(study.ask()), study.trials[0]


def test_a_trials_values_depend_on_its_index_and_the_finished_trials_not_on_earlier_draws(space):
    """As after a resumed search: trial 1 sees the same finished trial 0, drawn or not by this sampler."""
    per_trial = partial(tpe_sampler, n_startup_trials=2)
    drawn, first = second_trial(PerTrialSeed(per_trial, 7), space, None)
    assert second_trial(PerTrialSeed(per_trial, 7), space, first)[0] == drawn
    assert second_trial(PerTrialSeed(per_trial, 8), space, first)[0] != drawn  # the seed matters
    # One seeded sampler for the whole study is not enough: its draws for trial 0 move what trial 1 gets.
    assert second_trial(tpe_sampler(7, 2), space, first)[0] != second_trial(tpe_sampler(7, 2), space, None)[0]
    again = pickle.loads(pickle.dumps(PerTrialSeed(per_trial, 7)))  # Tune saves the searcher with its sampler
    assert second_trial(again, space, first)[0] == drawn


def in_order_draws(space: SearchSpace, finishing: list[int]) -> list[dict]:
    """Four trials drawn InOrder (window 2) by a seeded TPE, trial 2 as soon as it may be: the first two trials
    finish in the order `finishing`, reporting scores 0.1 and 0.2. Returns the configs drawn."""
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=space, metric="score", mode="max",
                            sampler=PerTrialSeed(partial(tpe_sampler, n_startup_trials=1), 3))
    ordered = InOrder(searcher, window=2)
    configs = [ordered.suggest("t0"), ordered.suggest("t1")]
    third = None
    for index in finishing:
        ordered.on_trial_complete(f"t{index}", {"score": 0.1 * (index + 1)})
        third = third or ordered.suggest("t2")  # None while trial 0 runs
    return [*configs, third, ordered.suggest("t3")]


def test_in_order_draws_the_same_trials_whichever_finishes_first(space):
    """Drawn after trial 0 alone finished, or after both: trial 2 is drawn from trial 0's result either way."""
    first, second = in_order_draws(space, [0, 1]), in_order_draws(space, [1, 0])
    assert None not in first and first == second


def record(index: int, status: str) -> TrialRecord:
    return TrialRecord(f"t{index}", index, "lenet5", {}, {}, status, 0.5, 1, None, None)


def test_the_time_guard_says_when_it_made_the_search_depend_on_the_machine(project_params):
    budget = project_params.search.classify.model_copy(update={"num_samples": 3, "time_budget_s": 60.0})
    assert guard_fired(budget, [record(0, "completed"), record(1, "stopped"), record(2, "error")]) is None
    assert "1 trial(s) never drawn, 0 stopped" in guard_fired(budget, [record(0, "completed"), record(1, "stopped")])
    fired = guard_fired(budget, [record(0, "completed"), record(1, "timed_out"), record(2, "timed_out")])
    assert "time_budget_s = 60 s" in fired and "2 stopped" in fired
