"""The MLflow pyfunc of a ConvForge model, logged as "models from code" (no pickled module).

Its artifact `model_dir` is a trained model's folder (model.safetensors + config.json), rebuilt
through `models._checkpoint.load`. Input: uint8 images [N, C, H, W] (numpy). Output per task:
classify probabilities [N, C]; segment class-index masks [N, H, W] (0 = background, c + 1 = class c);
detect a table of boxes with columns image, x1, y1, x2, y2, label, class, score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

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


class ConvForgeModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from models._checkpoint import load

        loaded = load(Path(context.artifacts["model_dir"]))
        self.model, self.config = loaded[0], loaded[1]
        self.model.eval()

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        import torch

        from pipelines.engine import EngineSettings, predict

        images = torch.from_numpy(np.ascontiguousarray(np.asarray(model_input, dtype=np.uint8)))
        config = self.config
        out = predict(self.model, config["task"], images, config["mean"], config["std"],
                      EngineSettings(device="cpu", amp="off", channels_last=False))
        return pyfunc_output(config["task"], out, list(config["classes"]))


def pyfunc_output(task: str, predictions: Any, classes: list[str]) -> Any:
    """The engine's predictions as the pyfunc returns them (numpy arrays, or a table for detect)."""
    if task == "detect":
        return detections_table(predictions, classes)
    return predictions.numpy()


mlflow.models.set_model(ConvForgeModel())
