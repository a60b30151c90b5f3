"""The plot records the evaluate stage writes for DVC: one shape of record per file."""

from __future__ import annotations

from pipelines.evaluation import same_fields


def test_records_keep_only_the_fields_all_of_them_have():
    coco = [{"class": "COCO mAP@0.5", "precision": 1.0, "recall": 0.0}]
    served = [{"class": "served", "precision": 0.5, "recall": 0.7, "threshold": 0.4}]
    assert same_fields(coco + served) == [{"class": "COCO mAP@0.5", "precision": 1.0, "recall": 0.0},
                                          {"class": "served", "precision": 0.5, "recall": 0.7}]
    assert same_fields(served) == served and same_fields([]) == []
