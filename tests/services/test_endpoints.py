"""services/endpoints.py: every task adapter is served, with training's geometry and its own outputs."""

from __future__ import annotations

import numpy as np

from pipelines.datasets import ITEMS_DATA
from pipelines.tasks import TASKS
from services.endpoints import ENDPOINTS, ROUTES, endpoint, label_masks, probabilities
from services.imaging import fit_square, letterbox
from services.schemas import PredictionResponse


def test_every_task_has_one_endpoint_and_one_route() -> None:
    assert set(ENDPOINTS) == {type(adapter) for adapter in TASKS.values()}
    assert ROUTES == {f"/{name}": name for name in TASKS}
    assert set(PredictionResponse.model_json_schema()["properties"]["task"]["enum"]) == set(TASKS)
    for name, adapter in TASKS.items():
        served = endpoint(name)
        # Classification items are resized and centre-cropped in training; scenes are letterboxed, and so are
        # the images reconstruct restores (its answer covers the whole input, at the input's size).
        image_out = served.result.__name__ == "reconstruct_result"
        assert served.fit is (fit_square if adapter.data == ITEMS_DATA and not image_out else letterbox)
        assert set(served.echoes) <= {"box_format", "mask_format"}


def test_the_service_makes_one_bentoml_api_per_task() -> None:
    from services.service import EXPLAIN_ROUTE, ConvForge

    assert {api.route: name for name, api in ConvForge.apis.items()} == {**ROUTES, EXPLAIN_ROUTE: "explain"}
    for name, api in ConvForge.apis.items():
        if name == "explain":  # one api for every explainable task, not from the task table
            assert api.doc and api.input_spec.multipart_fields == ["images", "targets"]  # the apis' one input model
            continue
        assert api.name == name and api.doc == endpoint(name).doc and api.doc  # what the clients and /docs.json show
        assert api.input_spec.multipart_fields == ["images", "targets"] and not api.batchable  # targets: reconstruct


def test_batch_outputs_per_image() -> None:
    logits = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]], np.float32)
    probs = probabilities(logits)
    assert len(probs) == 2 and probs[0].dtype == np.float32
    assert np.allclose(probs[0], np.exp(logits[0]) / np.exp(logits[0]).sum()) and np.allclose(probs[1], 1 / 3)
    masks = label_masks(np.stack([np.zeros((3, 2, 2)), np.ones((3, 2, 2)) * [[[0]], [[0]], [[1]]]]))
    assert [m.dtype for m in masks] == [np.uint8, np.uint8]
    assert masks[0].tolist() == [[0, 0], [0, 0]] and masks[1].tolist() == [[2, 2], [2, 2]]


def test_only_the_apis_that_score_targets_take_them() -> None:
    """`targets` sent elsewhere are a 400 naming the apis that take them, before anything decodes them."""
    from services.endpoints import TARGET_ROUTES, check_targets
    from services.errors import InputError

    assert TARGET_ROUTES == ("/reconstruct",)
    check_targets("/reconstruct", "reconstruct", {"targets": [b"png"]})
    for route, task in [*((route, task) for route, task in ROUTES.items() if route not in TARGET_ROUTES),
                        ("/explain", "classify")]:
        check_targets(route, task, {"targets": None})
        try:
            check_targets(route, task, {"targets": [b"png"]})
        except InputError as exc:
            assert exc.status == 400 and str(exc) == (
                f"targets: only /reconstruct takes targets (clean images to score its outputs against); "
                f"{route} does not")
        else:
            raise AssertionError(f"{route} took targets")
