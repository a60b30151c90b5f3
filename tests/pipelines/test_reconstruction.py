"""pipelines.reconstruction: the corruption (pure and seeded), the corrupted splits, the PSNR/SSIM meter."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.params import CorruptionParams
from pipelines.reconstruction import (MAX_PSNR, ReconstructMeter, corrupt, corrupt_split, erased, image_psnr,
                                      image_quality, load_corrupted, ssim_kernel)
from pipelines.tasks import get_task
from tests.fixtures import _prepared_digits, prepared_classify, project_params  # noqa: F401  (fixtures)

NOISY = CorruptionParams(noise_std=0.3, erasing=0.5, erasing_scale=[0.02, 0.12])


def clean_images(n: int = 64, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_corruption_is_a_pure_function_of_the_generator() -> None:
    clean = clean_images()
    first = corrupt(clean, NOISY, torch.Generator().manual_seed(7))
    again = corrupt(clean, NOISY, torch.Generator().manual_seed(7))
    other = corrupt(clean, NOISY, torch.Generator().manual_seed(8))
    assert first.dtype == torch.uint8 and first.shape == clean.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(corrupt(clean, CorruptionParams(noise_std=0.0, erasing=0.0, erasing_scale=[0.1, 0.2]),
                               torch.Generator().manual_seed(7)), clean)


def test_erasing_covers_one_rectangle_of_the_asked_area_in_the_asked_share_of_images() -> None:
    always = CorruptionParams(noise_std=0.0, erasing=1.0, erasing_scale=[0.1, 0.2])
    masks = erased(400, 32, 32, always, torch.Generator().manual_seed(0))
    share = masks.float().mean((1, 2))
    assert bool((share > 0.05).all()) and bool((share < 0.3).all())  # rounding of the sides moves the area a little
    half = erased(2000, 32, 32, NOISY, torch.Generator().manual_seed(0))
    assert 0.45 < float(half.any(2).any(1).float().mean()) < 0.55


def test_val_and_test_are_corrupted_the_same_on_every_load_and_differently_per_split(prepared_classify) -> None:
    val, again = load_corrupted(prepared_classify, "val", NOISY), load_corrupted(prepared_classify, "val", NOISY)
    assert torch.equal(val.images, again.images) and not torch.equal(val.images, val.clean)
    assert not val.fresh and load_corrupted(prepared_classify, "train", NOISY).fresh
    clean = val.clean[:8]
    assert not torch.equal(corrupt_split(clean, NOISY, 0, "val"), corrupt_split(clean, NOISY, 0, "test"))


def test_training_batches_are_corrupted_afresh_from_the_global_seed(prepared_classify) -> None:
    adapter, train = get_task("reconstruct"), load_corrupted(prepared_classify, "train", NOISY)
    idx = torch.arange(16)
    torch.manual_seed(3)
    first = adapter.gather(train, idx)
    torch.manual_seed(3)
    assert torch.equal(first.images, adapter.gather(train, idx).images)  # resumable: same seed, same batch
    assert (torch.equal(first.targets, train.clean[:16])
            and not torch.equal(first.images, adapter.gather(train, idx).images))


def test_meter_reports_psnr_ssim_of_output_and_input_and_the_gain() -> None:
    clean = clean_images(8)
    noisy = corrupt(clean, NOISY, torch.Generator().manual_seed(0))
    meter = ReconstructMeter()
    meter.update(clean.float() / 255, noisy, clean)  # a perfect restoration
    report = meter.compute().scalars
    assert report["psnr"] == MAX_PSNR and report["ssim"] == pytest.approx(1.0, abs=1e-4)
    mse = float(((noisy.float() - clean.float()) / 255).square().mean((1, 2, 3)).log10().mul(-10).mean())
    assert report["input_psnr"] == pytest.approx(mse, rel=1e-4)
    assert report["psnr_gain"] == pytest.approx(MAX_PSNR - report["input_psnr"])
    assert report["input_ssim"] < 0.9 and math.isfinite(report["ssim_gain"])
    assert ssim_kernel(28) == 11 and ssim_kernel(8) == 7 and ssim_kernel(5) == 5


def test_psnr_alone_is_the_meters_psnr_and_scores_a_single_pixel() -> None:
    clean = clean_images(8).float() / 255
    noisy = corrupt(clean_images(8), NOISY, torch.Generator().manual_seed(0)).float() / 255
    assert torch.equal(image_psnr(noisy, clean), image_quality(noisy, clean)[0])
    pixel = torch.full((2, 3, 1, 1), 0.5)
    assert image_psnr(pixel, pixel).tolist() == [MAX_PSNR, MAX_PSNR]  # SSIM's window could not score it
    assert image_psnr(pixel, pixel + 0.1).tolist() == pytest.approx([20.0, 20.0])
