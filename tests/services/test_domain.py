"""The training-domain check behind each result's `in_domain` (services/imaging.py Domain), on real uploads:
a colour photo sent to a small grey classifier is flagged; the model's own test items almost never are."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import _checkpoint as checkpoint
from models._registry import build
from pipelines.tasks import ClassifyTask
from services import imaging
from services.endpoints import input_fit
from services.runners import load_runner

SIZE = 28
LIMITS = imaging.DecodeLimits(16_777_216, ("PNG", "JPEG"))


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits upscaled to 28x28 (bilinear), split 80/20: (train, test) uint8 [N, 28, 28]."""
    from sklearn.datasets import load_digits

    images = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    upscaled = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in images])
    cut = len(upscaled) * 4 // 5
    return upscaled[:cut], upscaled[cut:]


def colour_photo() -> np.ndarray:
    """A real 512 px colour photo: scikit-image's astronaut (Eileen Collins, NASA, public domain)."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def grey_classifier(tmp_path_factory):
    """A tiny grey 28 px classifier whose config carries its training data's mean and std."""
    train, test = digits_28()
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = {"task": ClassifyTask.name, "family": "lenet5", "hparams": {}, "num_classes": 10, "in_channels": 1,
              "image_size": SIZE, "classes": [str(d) for d in range(10)],
              "mean": [float(train.mean() / 255)], "std": [float(train.std() / 255)]}
    checkpoint.save(build(ClassifyTask.name, "lenet5", 10, 1, SIZE), config, directory)
    runner = load_runner(ClassifyTask.name, Path(directory), name="tiny", version="v1", backend="torch",
                         max_batch_size=4, max_latency_ms=1000)
    return runner, test


def check(runner, blob: bytes) -> list[tuple[str, str]]:
    """The service's own path: upload bytes -> prepare (decode, fit, facts) -> the runner's domain check."""
    return runner.domain.check(imaging.prepare(blob, LIMITS, runner.fit, runner.in_channels).facts)


def test_colour_photo_to_a_grey_28px_classifier_is_flagged(grey_classifier):
    runner, _ = grey_classifier
    reasons = dict(check(runner, png(colour_photo())))
    assert reasons["channels"] == "colour image for a greyscale model"
    assert reasons["size"] == "18.3x larger than the training images (28 px)"


def test_at_most_one_percent_of_the_test_split_is_flagged(grey_classifier):
    runner, test = grey_classifier
    flagged = [i for i, item in enumerate(test[:300]) if check(runner, png(item))]
    assert len(flagged) <= 3, flagged


def test_white_background_items_are_flagged_by_intensity(grey_classifier):
    runner, test = grey_classifier
    kinds = [[kind for kind, _ in check(runner, png(255 - item))] for item in test[:50]]  # dark on white
    assert sum(found == ["intensity"] for found in kinds) >= 45, kinds


def test_input_fit_follows_serve_scale():
    from pipelines.tasks import DetectTask, SegmentTask

    assert input_fit(ClassifyTask.name, 28, "native", 1024).resize is imaging.fit_square  # classify: always fit
    for task in (DetectTask.name, SegmentTask.name):
        assert input_fit(task, 128, "fit", 1024).resize is imaging.letterbox
        native = input_fit(task, 128, "native", 1024)
        assert native.resize is imaging.native and native.size == 1024 and native.side == "long"


def test_explain_answers_say_in_domain_and_why_as_every_answer_does(grey_classifier):
    """POST /explain's results carry `in_domain` and `reason` like the prediction apis' (they used to lack them)."""
    from services.explain import explain_image
    from services.schemas import Options

    runner, test = grey_classifier
    answers = [explain_image(runner, 0, imaging.prepare(blob, LIMITS, runner.fit, runner.in_channels),
                             Options(top_k=1), None) for blob in (png(colour_photo()), png(test[0]))]
    assert [(a.in_domain, a.explanation is not None) for a in answers] == [(False, True), (True, True)]
    assert "colour image for a greyscale model" in answers[0].reason and answers[1].reason is None


def test_a_1x1000_strip_is_out_of_domain_and_says_why(grey_classifier):
    """Its 1,000 pixels are a 32 px square's: the size rule alone let it pass as in domain."""
    runner, _ = grey_classifier
    strip = np.full((1000, 1), round(runner.domain.mean * 255), np.uint8)
    reasons = dict(check(runner, png(strip)))
    assert list(reasons) == ["aspect"] and reasons["aspect"].startswith("1x1000 is 1000.0x taller"), reasons


def test_own_photos_are_compared_with_the_training_photos_not_the_working_size():
    """A model trained on 12 MP photos resized to 224 px (image_size auto) flagged every 12 MP upload, its own
    training photos included, as '15.6x larger than the training images (224 px)': the domain compared uploads
    with the model input. config.json now carries the photos' own size (source_size), and the check uses it."""
    config = {"in_channels": 3, "image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    phone = imaging.ImageFacts(4032, 3024, True, 0.5)
    before = imaging.Domain.from_config(config).check(phone)
    assert [kind for kind, _ in before] == ["size"] and "larger than the training images (224 px)" in before[0][1]
    own = imaging.Domain.from_config({**config, "source_size": {"side": 3492, "aspect": 1.3333}})
    assert own.check(phone) == []
    assert own.check(imaging.ImageFacts(640, 480, True, 0.5)) == [("size", "6.3x smaller than the training images "
                                                                          "(3492 px)")]
    assert own.check(imaging.ImageFacts(3024, 4032, True, 0.5)) == []  # portrait: within the aspect factor


def test_native_scale_is_flagged_when_training_resized_the_photos_far():
    """The README's COCO recipe served at native scale: with 12 MP photos on a 640 px canvas the detector met objects
    6x larger than it trained on (the review: no detection, or boxes on fragments). The package stage warns."""
    from pipelines.packaging import native_scale_warning

    phones = {"image_size": 640, "source_size": {"side": 3492, "aspect": 1.3333}}
    warning = native_scale_warning("detect", phones)
    assert warning.startswith("detect: serve.scale native serves uploads at their own pixels, but the model trained "
                              "on its photos at about 0.16x (their longer side ~4032 px on a 640 px canvas)")
    assert "6.3x larger" in warning
    assert native_scale_warning("segment", {"image_size": [640, 640], "source_size": {"side": 420, "aspect": 1.5}}) \
        is None  # 514 px photos on a 640 px canvas: 1.25x
    assert native_scale_warning("classify", phones) is None  # classify is always fitted
    assert native_scale_warning("detect", {"image_size": 64}) is None  # built-in data: no source size
