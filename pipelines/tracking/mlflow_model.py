"""The MLflow pyfunc of a ConvForge model, logged as "model from code" (no pickled module).

MLflow runs this file on its own when it loads the model, so it imports the project by absolute names only.
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


class ConvForgeModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from models._checkpoint import load

        loaded = load(Path(context.artifacts["model_dir"]))
        self.model, self.config = loaded[0], loaded[1]
        self.model.eval()

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        import torch

        from pipelines.engine import EngineSettings, predict
        from pipelines.tracking.outputs import pyfunc_output

        images = torch.from_numpy(np.ascontiguousarray(np.asarray(model_input, dtype=np.uint8)))
        config = self.config
        out = predict(self.model, config["task"], images, config["mean"], config["std"],
                      EngineSettings(device="cpu", amp="off", channels_last=False))
        return pyfunc_output(out, list(config["classes"]))


mlflow.models.set_model(ConvForgeModel())
