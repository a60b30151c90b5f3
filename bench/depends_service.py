"""The BentoML-native shape of batching, for bench/serve.py to measure against ConvForge's in-process dispatcher.

A `ClassifyModel` service owns the classify model behind `@bentoml.api(batchable=True)`; a `Front`
service answers POST /classify (JSON, base64 images, as ConvForge's own route) by decoding with
services.imaging and calling the model service through `bentoml.depends`. BentoML runs the two as
separate processes joined by a Unix socket, so each request pays one serialization and one hop
that the in-process dispatcher (services/batching.py) does not.

    CONVFORGE_MODELS_DIR=<dir> CONVFORGE_PARAMS=params.yaml python -m bentoml serve bench.depends_service:Front
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipelines.runtime  # noqa: E402,F401  (telemetry off before bentoml is imported)

import bentoml  # noqa: E402
import numpy as np  # noqa: E402

from pipelines.params import load_params  # noqa: E402
from pipelines.tasks import ClassifyTask  # noqa: E402

TASK = ClassifyTask.name
PARAMS = load_params(os.environ.get("CONVFORGE_PARAMS", ROOT / "params.yaml")).serve


def load_classifier() -> Any:
    """The classify runner of CONVFORGE_MODELS_DIR (its dispatcher unused: BentoML batches here)."""
    from pipelines.runtime import set_threads
    from services.runners import load_runner

    threads = set_threads(PARAMS.num_threads)
    return load_runner(TASK, Path(os.environ["CONVFORGE_MODELS_DIR"]) / TASK, name=TASK, version="bench",
                       backend=PARAMS.backend, max_batch_size=1, max_latency_ms=PARAMS.max_latency_ms,
                       num_threads=threads)


@bentoml.service(workers=1)
class ClassifyModel:
    """The model alone: uint8 [N, H, W, C] batches in, probabilities [N, C] out."""

    def __init__(self) -> None:
        self.runner = load_classifier()

    @bentoml.api(batchable=True, max_batch_size=PARAMS.max_batch_size, max_latency_ms=PARAMS.max_latency_ms)
    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.stack(self.runner.run(images))


@bentoml.service(workers=1, traffic={"timeout": PARAMS.timeout_s, "max_concurrency": PARAMS.max_concurrency})
class Front:
    """POST /classify: decode as ConvForge does, one batched call to the model service, top-k labels."""

    model = bentoml.depends(ClassifyModel)

    def __init__(self) -> None:
        from services.imaging import DecodeLimits

        self.runner = load_classifier()  # only its input geometry and classes are used here
        self.limits = DecodeLimits(PARAMS.max_pixels, tuple(PARAMS.formats))

    @bentoml.api(route=f"/{TASK}")
    async def classify(self, images: list[str]) -> dict[str, Any]:
        from services.imaging import prepare

        prepared = [prepare(base64.b64decode(text), self.limits, self.runner.fit, self.runner.in_channels)
                    for text in images]
        probs = await self.model.to_async.predict(np.stack([item.array for item in prepared]))
        classes = self.runner.classes
        return {"results": [[{"class_index": int(i), "label": classes[int(i)], "score": float(row[i])}
                             for i in np.argsort(-row)[:PARAMS.top_k]] for row in probs]}
