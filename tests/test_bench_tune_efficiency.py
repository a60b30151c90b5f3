"""bench/tune_efficiency.py's verdicts: the rank target, like the ASHA ones, holds only when every seed meets it;
each ASHA variant is judged against FIFO on its own."""

from __future__ import annotations

import pytest

from bench import tune_efficiency as bench


def seeds(*rhos: float | None) -> list[dict]:
    return [{"seed": 42 + i, "spearman_rho": rho} for i, rho in enumerate(rhos)]


def search(ratio: float, equal_best: bool) -> dict:
    """One seed's ASHA (stopping rule) against FIFO, as the results hold it."""
    return {"asha": {"trial_epochs": round(216 / ratio)}, "epochs_ratio": ratio, "test_gap": 0.0,
            "equal_best": equal_best}


def test_the_rank_target_needs_every_seed_at_or_above_it():
    assert bench.targets_met(seeds(0.85, 0.80, 0.93), [], 0.1)["spearman_rho"]
    assert not bench.targets_met(seeds(0.85, 0.79, 0.93), [], 0.1)["spearman_rho"]
    assert not bench.targets_met(seeds(0.85, None), [], 0.1)["spearman_rho"]  # too few trials to rank
    assert not bench.targets_met([], [], 0.1)["spearman_rho"]


def test_the_asha_target_needs_the_ratio_and_an_equal_best_on_every_seed():
    met = bench.targets_met(seeds(0.9), [search(3.2, True), search(3.0, True)], 0.1)
    assert met["asha_epochs_ratio"] and met["reuse_overhead_s"]
    assert not bench.targets_met(seeds(0.9), [search(3.2, True), search(2.9, True)], 0.1)["asha_epochs_ratio"]
    assert not bench.targets_met(seeds(0.9), [search(4.0, False)], 0.1)["asha_epochs_ratio"]
    assert not bench.targets_met(seeds(0.9), [], 0.3)["reuse_overhead_s"]


def test_each_asha_variant_is_judged_on_its_own():
    stopping, promoting = search(2.3, True), search(3.7, True)
    met = bench.targets_met(seeds(0.9), [{**stopping, "asha_promote": promoting}], 0.1)
    assert met["asha_promote_epochs_ratio"] and not met["asha_epochs_ratio"]
    one_seed_short = [{**stopping, "asha_promote": promoting}, {**stopping, "asha_promote": search(3.5, False)}]
    assert not bench.targets_met(seeds(0.9), one_seed_short, 0.1)["asha_promote_epochs_ratio"]
    assert not bench.targets_met(seeds(0.9), [stopping], 0.1)["asha_promote_epochs_ratio"]  # a run without it
    both = bench.targets_met(seeds(0.9), [{**stopping, "asha_promote": search(2.6, True), "sha": search(4.1, True)}],
                             0.1)
    assert both["sha_epochs_ratio"] and not both["asha_promote_epochs_ratio"]


def test_an_asha_search_against_fifo():
    full = {"trial_epochs": 216, "best_test": 0.900}
    assert bench.against({"trial_epochs": 54, "best_test": 0.8952}, full) == pytest.approx(
        {"epochs_ratio": 4.0, "test_gap": 0.0048, "equal_best": True})
    assert not bench.against({"trial_epochs": 54, "best_test": 0.8949}, full)["equal_best"]  # 0.0051 apart
    assert bench.against({"trial_epochs": 54, "best_test": None}, full)["equal_best"] is False  # no pick


def test_a_seed_with_a_rank_for_every_epoch():
    rows = [{"family": "resnet", "trial_score": s, "val_scores": [s, s + 0.05], "final_test_score": t}
            for s, t in ((0.70, 0.88), (0.60, 0.85), (0.50, 0.86), (0.40, 0.80))]
    rank = bench.rank_of(43, rows, 2)
    assert rank["seed"] == 43 and rank["spearman_rho"] == pytest.approx(0.8)  # one pair out of order among four
    assert [r["epochs"] for r in rank["by_rung"]] == [1, 2] and rank["by_rung"][1]["spearman_rho"] == pytest.approx(0.8)


def test_the_page_shows_each_seeds_trial_count_when_a_trial_failed():
    from bench import report

    assert report._counts([24, 24, 24]) == "24"
    assert report._counts([24, 23, 24]) == "24 / 23 / 24"


def test_a_run_that_did_not_record_its_warm_up_warmed_up_for_one_epoch():
    earlier = {"trials": 24, "precise_bn": 1024}  # written before warmup_epochs was recorded
    assert bench.differing(earlier, {"trials": 24, "precise_bn": 1024, "warmup_epochs": 1}) == []
    assert bench.differing(earlier, {"trials": 24, "precise_bn": 1024, "warmup_epochs": 0}) == ["warmup_epochs"]
    assert bench.differing({**earlier, "warmup_epochs": 0}, {"trials": 12, "warmup_epochs": 0}) == ["trials"]


def test_a_baseline_names_the_setting_it_changed():
    from bench import report

    assert report._setting({"train_items": 8000, "precise_bn": 1024, "warmup_epochs": 0}) == \
        "8,000 training items, no warm-up"
    assert report._setting({"train_items": 2000, "precise_bn": 0}) == "2,000 training items, running averages"
    assert report._setting({"train_items": 2000, "precise_bn": 1024}) == "2,000 training items"
