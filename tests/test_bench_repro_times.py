"""bench/repro_times.py: which stages of a `dvc repro` log restored a stored search instead of training."""

from __future__ import annotations

from bench.repro_times import always_run, resumed_stages
from pipelines.tuner import RESUMING


def test_a_restored_search_is_named_and_a_fresh_one_is_not():
    log = ["Running stage 'augment':\n",
           "> python -m pipelines.stages.augment\n",
           "Running stage 'search@classify':\n",
           "search classify: 4 families, 8 trials x <= 3 epochs on 8000 items; experiment ray_results/search-c\n",
           f"{RESUMING}/work/ray_results/search-classify-5638bdd81f90\n",
           "search classify: winner resnet val_accuracy=0.8643 (trial 5b188dca) in 4 s\n",
           "Running stage 'search@detect':\n",
           "trial 50d76c74 fcos         epoch 1/2  val_map 0.0203  running\n",
           "Running stage 'search@segment':\n",
           f"{RESUMING}/work/ray_results/search-segment-6d2d9e80824a\n",
           f"{RESUMING}/work/ray_results/search-segment-6d2d9e80824a\n",
           "Running stage 'train@classify':\n"]
    assert resumed_stages(log) == ["search@classify", "search@segment"]
    assert resumed_stages(log[:4] + log[6:9]) == []


def test_the_source_listing_alone_is_no_run():
    assert always_run() == {"source"}
