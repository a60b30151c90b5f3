"""The promotion gate's rules: bounds, the champion comparison on the same test data, the verdict, the summary."""

from __future__ import annotations

import pytest

from pipelines.errors import ConvForgeError
from pipelines.params import PromoteGate, load_params, validate
from pipelines.promotion import Candidate, bound_checks, champion_check, check_names, decide, verdict
from pipelines.reporting import promotion_lines
from pipelines.tasks import TASKS, ClassifyTask
from pipelines.tracking import RegisteredVersion
from pipelines.tracking.tags import VERSION_TEST_DATA_HASH

NAME = "convforge-x"
METRICS = {"test_accuracy": 0.91, "test_ece": 0.03, "test_items": 100.0}


def gate(**overrides) -> PromoteGate:
    values = {"metric": "accuracy", "margin": 0.0, "min": {"accuracy": 0.9}, "max": {"ece": 0.05}, **overrides}
    return validate(PromoteGate, values, prefix="promote.x")


def version(number: int, tested_on: str | None = None, **metrics: str) -> RegisteredVersion:
    tags = {**metrics, **({VERSION_TEST_DATA_HASH: tested_on} if tested_on else {})}
    return RegisteredVersion(NAME, number, f"run{number}", tags)


def candidate(metrics: dict | None = None, test_hash: str = "h1", number: int = 2) -> Candidate:
    return Candidate(version(number), "sha", test_hash, dict(METRICS if metrics is None else metrics))


def test_bounds_hold_or_fail_with_value_and_bound():
    passed = bound_checks(gate(), METRICS)
    assert [(c.name, c.metric, c.value, c.op, c.bound, c.passed) for c in passed] == [
        ("min accuracy", "test_accuracy", 0.91, ">=", 0.9, True), ("max ece", "test_ece", 0.03, "<=", 0.05, True)]
    failed = bound_checks(gate(), {**METRICS, "test_accuracy": 0.89, "test_ece": 0.06})
    assert [c.passed for c in failed] == [False, False]
    assert all(c.passed for c in bound_checks(gate(min={"accuracy": 0.91}, max={"ece": 0.03}), METRICS))  # inclusive


def test_the_champion_is_beaten_only_on_the_same_test_data_and_by_the_margin():
    champion = version(1, tested_on="h1", test_accuracy="0.9", test_items="100")
    assert champion.test_metrics() == {"test_accuracy": 0.9, "test_items": 100.0}
    check = champion_check(gate(), candidate(), champion)
    assert (check.name, check.value, check.op, check.bound, check.passed) == (
        "beats champion v1 on accuracy", 0.91, ">", 0.9, True)
    assert not champion_check(gate(), candidate({**METRICS, "test_accuracy": 0.9}), champion).passed  # a tie keeps it
    assert not champion_check(gate(margin=0.02), candidate(), champion).passed
    met = champion_check(gate(margin=0.01), candidate(), champion)
    assert met.passed and met.op == ">=" and met.bound == pytest.approx(0.91)  # exactly the margin is enough
    # Nothing to compare: other test data, no recorded metric, the champion is the candidate itself, no champion.
    assert champion_check(gate(), candidate(test_hash="h2"), champion) is None
    assert champion_check(gate(), candidate(), version(1, tested_on="h1")) is None
    assert champion_check(gate(), candidate(number=1), champion) is None
    assert champion_check(gate(), candidate(), None) is None


def test_a_failed_gate_keeps_the_previous_champion():
    champion = version(1, tested_on="h1", test_accuracy="0.95")
    checks, passed, now = decide(gate(), candidate(), champion)
    assert not passed and now is champion
    assert [c.name for c in checks if not c.passed] == ["beats champion v1 on accuracy"]
    checks, passed, now = decide(gate(), candidate(test_hash="h2"), champion)  # tested on other data: replaced
    assert passed and now.version == 2 and len(checks) == 2
    checks, passed, now = decide(gate(), candidate({**METRICS, "test_accuracy": 0.5}), None)
    assert not passed and now is None


def test_the_verdict_names_the_failed_checks_and_the_champion():
    checks, passed, _ = decide(gate(), candidate({**METRICS, "test_accuracy": 0.5}), version(1))
    failed = [c for c in checks if not c.passed]
    assert not passed
    assert verdict(NAME, 2, False, failed, 1) == \
        f"{NAME} v2 not promoted (min accuracy: 0.5 < 0.9); the champion stays v1"
    assert verdict(NAME, 2, False, failed, None).endswith("; no champion: nothing to serve")
    assert verdict(NAME, 2, True, [], 2) == f"{NAME} v2 promoted to champion"
    assert verdict(NAME, 2, False, [], 2) == f"{NAME} v2 is the champion"  # promote@task run again
    assert verdict(NAME, 2, False, failed, 2).endswith("but fails the gate now (min accuracy: 0.5 < 0.9)")


def test_a_metric_the_evaluation_did_not_write_is_a_one_line_error():
    known = r"\(it has accuracy, ece, items\)"
    with pytest.raises(ConvForgeError, match=rf"^promote.x.min: no test metric 'acc' in m.json {known}$"):
        check_names(gate(min={"acc": 0.9}), METRICS, "x", "m.json")
    check_names(gate(), METRICS, "x", "m.json")
    with pytest.raises(ConvForgeError, match=r"^promote.x.margin: expected number >= 0(\.0)?, got -0.1$"):
        gate(margin=-0.1)


def test_the_repo_gates_compare_each_task_on_its_primary_metric():
    params = load_params()
    assert {task: params.promote.task(task).metric for task in TASKS} == {t: a.metric for t, a in TASKS.items()}
    assert params.promote.task(ClassifyTask.name).margin >= 0


def test_the_summary_says_when_the_newest_run_was_not_promoted():
    report = {"verdict": f"{NAME} v2 not promoted (min accuracy: 0.5 < 0.9); the champion stays v1",
              "promoted": False, "candidate": {"version": 2}, "champion": {"version": 1}}
    lines = promotion_lines(report)
    assert "promotion: " + report["verdict"] in lines[0]
    assert lines[1].strip() == "the newest run was not promoted: the service keeps serving v1"
    assert "there is no champion" in promotion_lines({**report, "champion": None})[1]
    assert len(promotion_lines({**report, "promoted": True, "champion": {"version": 2}})) == 1
    assert promotion_lines(None) == []


def test_reconstruct_test_inputs_made_from_other_params_are_other_test_data(tmp_path, project_params):
    """reconstruct corrupts its clean test split as it loads, by params.yaml's `corruption`: the gate hashed the clean
    folder alone, so a champion tested at noise 0.05 counted as tested on the same data as a candidate at 0.3 (the
    review: a model 8.7 dB worse than its own noisy input became champion on an easier test). The params that make
    the inputs are part of the test data's identity; tasks that make nothing keep the folder's hash."""
    from pipelines import tracking
    from pipelines.promotion import test_data_hash

    folder = tmp_path / "test"
    folder.mkdir()
    (folder / "images.npy").write_bytes(b"clean test items")
    easier = project_params.model_copy(update={"corruption": project_params.corruption.model_copy(
        update={"noise_std": 0.05})})
    assert project_params.corruption.noise_std != 0.05
    assert test_data_hash(project_params, "reconstruct", folder, tmp_path) != \
        test_data_hash(easier, "reconstruct", folder, tmp_path)
    assert test_data_hash(project_params, "reconstruct", folder, tmp_path) == \
        test_data_hash(project_params.model_copy(), "reconstruct", folder, tmp_path)
    assert test_data_hash(project_params, "classify", folder, tmp_path) == \
        test_data_hash(easier, "classify", folder, tmp_path) == tracking.data_hash(folder, tmp_path)
