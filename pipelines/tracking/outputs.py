"""What the logged pyfunc returns: the engine's predictions as numpy arrays, or a table of boxes for detect."""

from __future__ import annotations

from typing import Any

DETECTION_COLUMNS = ["image", "x1", "y1", "x2", "y2", "label", "class", "score"]


def detections_table(detections: list[dict[str, Any]], classes: list[str]) -> Any:
    """Per-image detection dicts as one pandas table (one row per box)."""
    import pandas as pd

    rows = [{"image": i, "x1": float(box[0]), "y1": float(box[1]), "x2": float(box[2]), "y2": float(box[3]),
             "label": int(label), "class": classes[int(label)], "score": float(score)}
            for i, det in enumerate(detections)
            for box, label, score in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist())]
    table = pd.DataFrame(rows, columns=DETECTION_COLUMNS)
    return table.astype({"image": "int64", "label": "int64", "x1": "float64", "y1": "float64", "x2": "float64",
                         "y2": "float64", "score": "float64", "class": "object"})


def pyfunc_output(predictions: Any, classes: list[str]) -> Any:
    """The engine's predictions as the pyfunc returns them: tensors as numpy, per-image box dicts as a table."""
    if isinstance(predictions, list):
        return detections_table(predictions, classes)
    return predictions.numpy()
