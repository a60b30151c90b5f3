"""What a search prints: one line per trial result, one progress line per finished trial, nothing twice."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

from pipelines.search_progress import SearchProgress


def trial(trial_id: str, family: str, status: str = "RUNNING", last: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"family": family}, status=status, last_result=last or {},
                           num_failures=0)


def test_one_line_per_result_and_a_progress_line_per_finished_trial():
    lines: list[str] = []
    progress = SearchProgress("classify", "val_accuracy", max_epochs=2, num_samples=3, log=lines.append)
    a, b = trial("a1", "resnet"), trial("b2", "lenet5")
    progress.on_trial_result(0, [a, b], a, {"epoch": 1, "val_accuracy": 0.5})
    progress.on_trial_result(0, [a, b], a, {"epoch": 2, "val_accuracy": 0.75})
    a.last_result, b.last_result = {"epoch": 2, "val_accuracy": 0.75}, {"epoch": 1, "val_accuracy": 0.25}
    progress.on_trial_complete(0, [a, b], a)
    b.status = "TERMINATED"
    progress.on_trial_complete(0, [a, b], b)

    assert lines[0].split() == ["trial", "a1", "resnet", "epoch", "1/2", "val_accuracy", "0.5000", "running"]
    assert lines[1].split()[-1] == "done"
    assert lines[2].startswith("search classify: trial a1 completed; 1/3 trials done, 1 running; "
                               "best val_accuracy 0.7500 (resnet a1)")
    assert lines[3].startswith("search classify: trial b2 stopped at epoch 1; 2/3 trials done, 0 running")
    assert len(lines) == len(set(lines)) == 4


def test_a_result_at_a_rung_of_a_pausing_scheduler_is_at_rung():
    lines: list[str] = []
    progress = SearchProgress("classify", "val_accuracy", max_epochs=9, num_samples=9, log=lines.append, rungs=[1, 3])
    a = trial("a1", "resnet")
    for epoch in (1, 2, 3, 9):
        progress.on_trial_result(0, [a], a, {"epoch": epoch, "val_accuracy": 0.5})
    assert [" ".join(line.split()[7:]) for line in lines] == ["at rung", "running", "at rung", "done"]


def test_a_restored_search_keeps_printing():
    progress = SearchProgress("detect", "val_map", 2, 1, log=lambda line: None)
    restored = pickle.loads(pickle.dumps(progress))  # Tune pickles its callbacks with the experiment
    assert restored.log is print and restored.task == "detect"
