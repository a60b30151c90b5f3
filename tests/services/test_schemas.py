"""Response schema conversions (services/schemas.py, services/results.py): boxes, PNG/RLE/polygon masks."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from services.errors import InputError
from services.imaging import Placement
from services.results import classify_result, detect_result, segment_result
from services.schemas import (ImageResult, Mask, Options, PredictionResponse, convert_boxes, decode_base64, decode_mask,
                              encode_mask, polygons, rle_counts)


def test_box_formats():
    boxes = np.array([[10.0, 20.0, 30.0, 60.0]])
    assert convert_boxes(boxes, "xyxy", 100, 200).tolist() == [[10, 20, 30, 60]]
    assert convert_boxes(boxes, "xywh", 100, 200).tolist() == [[10, 20, 20, 40]]
    assert convert_boxes(boxes, "normalized", 100, 200).tolist() == [[0.1, 0.1, 0.3, 0.3]]


def test_png_mask_round_trip_keeps_classes():
    mask = np.zeros((7, 9), np.uint8)
    mask[1:4, 2:5] = 3
    mask[5, 8] = 10
    encoded = encode_mask(mask, "png")
    assert encoded.format == "png" and encoded.size == [7, 9]
    assert np.array_equal(decode_mask(encoded), mask)


def test_rle_matches_pycocotools_and_round_trips():
    binary = np.zeros((6, 5), np.uint8)
    binary[2:5, 1:3] = 1
    counts = rle_counts(binary)
    assert mask_utils.area({"size": [6, 5], "counts": counts.encode()}) == 6
    assert np.array_equal(decode_mask(Mask(format="rle", size=[6, 5], counts=counts)), binary)


def test_polygon_outlines_the_shape():
    binary = np.zeros((10, 10), np.uint8)
    binary[2:6, 3:8] = 1  # columns 3..7, rows 2..5
    (outline,) = polygons(binary)
    xs, ys = outline[0::2], outline[1::2]
    assert min(xs) == pytest.approx(2.5) and max(xs) == pytest.approx(7.5)
    assert min(ys) == pytest.approx(1.5) and max(ys) == pytest.approx(5.5)
    binary[8:, 0] = 1  # a second part touching the border still closes
    assert len(polygons(binary)) == 2


def test_none_mask_format():
    assert encode_mask(np.ones((2, 2), np.uint8), "none") is None


def test_base64_with_and_without_data_uri():
    raw = b"\x89PNG..."
    text = base64.b64encode(raw).decode()
    assert decode_base64(text, 0) == raw
    assert decode_base64("data:image/png;base64," + text, 0) == raw
    with pytest.raises(InputError) as info:
        decode_base64("not base64 at all!", 3)
    assert info.value.status == 400 and "images[3]" in str(info.value)


def test_base64_wrapped_by_the_base64_tool_or_with_a_trailing_newline_decodes():
    """`base64 FILE` wraps at 76 characters and ends with a newline; other stray characters stay refused."""
    raw = bytes(range(256)) * 3
    text = base64.b64encode(raw).decode()
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"
    assert decode_base64(wrapped, 0) == raw
    assert decode_base64("data:image/png;base64,\r\n" + wrapped.replace("\n", "\r\n"), 0) == raw
    assert decode_base64(f" \t{text}\n", 0) == raw
    for bad in (text[:-4] + "*" + text[-4:], text + "\u00a0", text[:-1]):  # a symbol, non-ASCII space, bad padding
        with pytest.raises(InputError) as info:
            decode_base64(bad, 1, "targets")
        assert info.value.status == 400 and str(info.value) == "targets[1]: not valid base64"


def test_options_reject_unknown_fields_and_bad_values():
    with pytest.raises(ValueError):
        Options(top_kk=3)
    with pytest.raises(ValueError):
        Options(score_threshold=2)
    with pytest.raises(ValueError):
        Options(box_format="yxyx")


def test_classify_result_top_k_order():
    probs = np.array([0.1, 0.6, 0.3], np.float32)
    result = classify_result(0, probs, ["a", "b", "c"], Options(top_k=2), Placement(5, 5, 1, 1))
    assert [(label.label, round(label.score, 2)) for label in result.labels] == [("b", 0.6), ("c", 0.3)]


def test_detect_result_threshold_order_mapping_and_masks():
    output = {"boxes": np.array([[0, 0, 20, 10], [4, 4, 8, 8], [0, 0, 1, 1]], np.float32),
              "labels": np.array([2, 1, 1]), "scores": np.array([0.5, 0.9, 0.1], np.float32),
              "masks": np.zeros((3, 1, 40, 40), np.float32)}
    output["masks"][1, 0, 4:8, 4:8] = 0.9
    placement = Placement(100, 50, 0.4, 0.4)
    options = Options(score_threshold=0.3, max_detections=5, box_format="xyxy", mask_format="rle")
    result = detect_result(0, output, ["zero", "one"], options, placement)
    assert [d.label for d in result.detections] == ["zero", "one"]  # best first, 0.1 dropped
    assert result.detections[0].box == [10.0, 10.0, 20.0, 20.0]
    first = decode_mask(result.detections[0].mask)
    assert first.shape == (50, 100) and first[10:20, 10:20].all() and first.sum() == 100
    capped = detect_result(0, output, ["zero", "one"], Options(score_threshold=0.0, max_detections=1), placement)
    assert len(capped.detections) == 1


def test_segment_result_counts_and_formats():
    label_mask = np.zeros((40, 40), np.uint8)
    label_mask[0:8, 0:8] = 1
    label_mask[10:12, 10:14] = 2
    placement = Placement(20, 20, 2.0, 2.0)  # upscaled input: back to 20x20
    png = segment_result(0, label_mask, ["a", "b"], Options(mask_format="png"), placement)
    assert png.class_pixels == {"a": 16, "b": 2}
    assert decode_mask(png.mask).shape == (20, 20)
    rle = segment_result(0, label_mask, ["a", "b"], Options(mask_format="rle"), placement)
    assert set(rle.class_masks) == {"a", "b"} and rle.mask is None
    assert decode_mask(rle.class_masks["a"]).sum() == 16
    poly = segment_result(0, label_mask, ["a", "b"], Options(mask_format="polygon"), placement)
    assert poly.class_masks["b"].polygons
    none = segment_result(0, label_mask, ["a", "b"], Options(mask_format="none"), placement)
    assert none.mask is None and none.class_masks is None and none.class_pixels == {"a": 16, "b": 2}


def test_response_schema_is_versioned():
    response = PredictionResponse(task="classify", model={"task": "classify", "family": "lenet5", "name": "m",
                                                          "version": "1"}, results=[])
    assert response.model_dump()["schema_version"] == "1.3"
    # 1.1 only adds fields: a 1.0 result (no in_domain/reason) still validates, and they stay out when unset.
    old = ImageResult(index=0, width=2, height=2, labels=[])
    assert old.in_domain is None and "reason" not in old.model_dump(exclude_none=True)
