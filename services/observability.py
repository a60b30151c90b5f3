"""ConvForge's Prometheus series, next to BentoML's own request series on /metrics.

Labels stay within a fixed budget: task, endpoint, model_version, status_class, plus
`class` on the per-class counter, whose values are the served model's class names
(bounded by the model, never by the client), and `reason_kind` on the out-of-domain counter
(the three rules of services.imaging.Domain). Latency buckets span sub-millisecond
preprocessing of a small image up to seconds for a 16 MP upload or a long queue (bench/serve.py
measures them). Each label is spelled one way in every series: `task` is the task name,
`endpoint` the route path (`/<task>`; convforge_requests and convforge_request_bytes also count
POST /explain, as task `explain`), `model_version` the bare version (the part after the
colon of a `name:version` tag such as the X-Model-Version header; `none` when no model answered).
Under `bentoml serve` these live in BentoML's multiprocess registry (PROMETHEUS_MULTIPROC_DIR,
a folder of each server's own: services/serve.py), so gauges say how to merge workers.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = (1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6)
PIXEL_BUCKETS = (1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
COUNT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
FRACTION_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

STAGE = ("task", "endpoint", "model_version")
MODEL = ("task", "model_version")

REQUESTS = Counter("convforge_requests", "Prediction (and explain) requests by outcome", (*STAGE, "status_class"))
QUEUE_SECONDS = Histogram("convforge_queue_seconds", "Time an image waits for its batch", STAGE,
                          buckets=LATENCY_BUCKETS)
PREPROCESS_SECONDS = Histogram("convforge_preprocess_seconds", "Parse, decode and resize of one request",
                               STAGE, buckets=LATENCY_BUCKETS)
INFERENCE_SECONDS = Histogram("convforge_inference_seconds", "Model forward of the batch an image rode in",
                              STAGE, buckets=LATENCY_BUCKETS)
POSTPROCESS_SECONDS = Histogram("convforge_postprocess_seconds", "Mapping back and encoding of one response",
                                STAGE, buckets=LATENCY_BUCKETS)
REQUEST_BYTES = Histogram("convforge_request_bytes", "Request body size", ("task", "endpoint"),
                          buckets=BYTES_BUCKETS)
IMAGE_PIXELS = Histogram("convforge_image_pixels", "Pixels per decoded input image", STAGE, buckets=PIXEL_BUCKETS)
PREDICTIONS = Counter("convforge_predictions", "Top-1 labels (classify) and detections (detect) per class",
                      (*MODEL, "class"))
SCORES = Histogram("convforge_score", "Top-1 probability (classify) or detection score (detect)", MODEL,
                   buckets=SCORE_BUCKETS)
DETECTIONS = Histogram("convforge_detections_per_image", "Detections returned per image", MODEL,
                       buckets=COUNT_BUCKETS)
MASK_AREA = Histogram("convforge_mask_area_fraction", "Fraction of an image's pixels segmented as foreground",
                      MODEL, buckets=FRACTION_BUCKETS)
# regress: each predicted value, by target name (the served model's names, bounded by the model)
VALUE_BUCKETS = (-90, -45, -30, -20, -10, -5, 0, 5, 10, 20, 30, 45, 90)
REGRESSION_VALUE = Histogram("convforge_regression_value", "Predicted value per image and target (regress)",
                             (*MODEL, "name"), buckets=VALUE_BUCKETS)
# reconstruct: PSNR (dB) of each restored image against the target the client sent with it
PSNR_BUCKETS = (5, 10, 15, 20, 25, 30, 35, 40, 50, 100)
RECONSTRUCTION_PSNR = Histogram("convforge_reconstruction_psnr_db", "PSNR of a restored image against the "
                                "request's target, in dB (reconstruct, when targets are sent)", MODEL,
                                buckets=PSNR_BUCKETS)
BATCH_SIZE = Histogram("convforge_batch_size", "Images per model forward (adaptive batching)", MODEL,
                       buckets=BATCH_BUCKETS)
LOAD_SECONDS = Gauge("convforge_model_load_seconds", "Seconds to load the model", MODEL, multiprocess_mode="max")
WARMUP_SECONDS = Gauge("convforge_model_warmup_seconds", "Seconds of warm-up inference before ready", MODEL,
                       multiprocess_mode="max")
OUT_OF_DOMAIN = Counter("convforge_out_of_domain", "Images outside the model's training domain, by rule "
                        "(channels, size, intensity; an image can break several)", (*MODEL, "reason_kind"))
EXPLAIN_SECONDS = Histogram("convforge_explain_seconds", "POST /explain: decode, Grad-CAM of every image and encode "
                            "of one request", MODEL, buckets=LATENCY_BUCKETS)
MODEL_INFO = Gauge("convforge_model_info", "Served model (value 1)", ("task", "family", "model_version", "backend"),
                   multiprocess_mode="max")


def status_class(status: int) -> str:
    """`2xx`, `4xx`, `5xx`...: the status label stays at five values."""
    return f"{status // 100}xx"
