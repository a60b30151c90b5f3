"""The augment stage's library (pipelines/preparation.py): determinism, stratified split, train-only stats,
copies, policies, own data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.datasets import load_classify, load_scenes
from pipelines.errors import ConvForgeError
from pipelines.params import AugmentParams, PolicyParams, validate
from pipelines.preparation import channel_stats, prepare_from_classify, prepare_from_scenes, stratified_split
from pipelines.datasets import (ArrayWriter, RowReader, SceneWriter, array_info, iter_scenes, read_rows,
                                save_array)
from pipelines.raw import load_raw, write_meta
from pipelines.scenes import compose_scenes
from pipelines.transforms import apply_policy, build_policy, build_scene_policy
from tests.fixtures import digits_splits, raw_data, tiny_scene_params


def augment_params(project_params, **overrides) -> AugmentParams:
    return validate(AugmentParams, {**project_params.augment.model_dump(), **overrides}, prefix="augment")


def policy_params(**values) -> PolicyParams:
    base = {"crop_padding": 0, "hflip": 0.0, "rotation_deg": 0.0, "translate": 0.0, "erasing": 0.0,
            "color_jitter": 0.0}
    return validate(PolicyParams, {**base, **values}, prefix="augment.policy")


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def splits(project_params):
    return digits_splits(project_params, max_train=300, max_test=60)


@pytest.fixture(scope="module")
def raw(splits, tmp_path_factory):
    return raw_data(splits, tmp_path_factory.mktemp("raw") / "raw")


def run(raw, root: Path, project_params, seed: int = 42, **augment) -> Path:
    scenes = tiny_scene_params(project_params, train_scenes=12, val_scenes=4, test_scenes=4)
    prepare_from_classify(raw, root / "prepared", root / "reports", augment_params(project_params, **augment),
                          scenes, seed)
    return root


def test_two_runs_are_byte_identical(raw, tmp_path, project_params):
    first = files_of(run(raw, tmp_path / "a", project_params, copies=1))
    second = files_of(run(raw, tmp_path / "b", project_params, copies=1))
    assert first.keys() == second.keys()
    assert {"prepared/classify/train/images.npy", "prepared/classify/train/is_copy.npy",
            "prepared/scenes/train/instances.json", "reports/classify_preview.png",
            "reports/scenes_preview.png", "prepared/scenes/val/masks/000001.png"} <= first.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = files_of(run(raw, tmp_path / "c", project_params, seed=7, copies=1))
    assert other["prepared/classify/val/images.npy"] != first["prepared/classify/val/images.npy"]


def test_stratified_split():
    labels = np.repeat(np.arange(4), [40, 20, 10, 30])
    train, val = stratified_split(labels, 0.1, np.random.default_rng(0))
    assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val], minlength=4).tolist() == [4, 2, 1, 3]
    again, _ = stratified_split(labels, 0.1, np.random.default_rng(0))
    np.testing.assert_array_equal(train, again)


def test_stats_from_train_only(raw, tmp_path, project_params):
    root = run(raw, tmp_path, project_params, copies=0)
    meta = json.loads((root / "prepared/classify/meta.json").read_text())
    train = load_classify(root / "prepared/classify", "train")
    test = load_classify(root / "prepared/classify", "test")
    pixels = train.images.double() / 255
    assert meta["mean"] == pytest.approx([pixels.mean().item()], abs=1e-6)
    assert meta["std"] == pytest.approx([pixels.std(unbiased=False).item()], abs=1e-6)
    everything = torch.cat([train.images, test.images]).double() / 255
    assert abs(everything.mean().item() - meta["mean"][0]) > 1e-5  # test images did not count
    counts = meta["counts"]
    assert counts["train"] + counts["val"] == 300 and 25 <= counts["val"] <= 35
    assert counts["copies"] == 0 and counts["test"] == 60 == len(test)
    assert train.mean == meta["mean"] and train.classes == [str(d) for d in range(10)]


def test_copies_are_augmented_and_flagged(raw, tmp_path, project_params):
    policy = policy_params(crop_padding=2, hflip=0.5)
    root = run(raw, tmp_path, project_params, copies=2, policy=policy.model_dump())
    data = load_classify(root / "prepared/classify", "train")
    n = int((~data.is_copy).sum())
    assert n > 250 and len(data) == 3 * n and data.is_copy.tolist() == [False] * n + [True] * (2 * n)
    originals = data.images[:n]
    for k in (1, 2):
        copies = data.images[k * n:(k + 1) * n]
        assert torch.equal(data.labels[k * n:(k + 1) * n], data.labels[:n])
        assert (copies != originals).flatten(1).any(1).float().mean() > 0.5
    meta = json.loads((root / "prepared/classify/meta.json").read_text())
    assert meta["counts"]["copies"] == 2 * n and meta["policy"]["crop_padding"] == 2
    small = data.subset(10, seed=1)
    assert len(small) == 10 and small.is_copy is not None


def test_policy_strength_zero_is_identity_and_keeps_dtype():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    strong = policy_params(crop_padding=3, hflip=1.0, rotation_deg=20, translate=0.1, erasing=0.5, color_jitter=0.4)
    assert torch.equal(apply_policy(build_policy(strong, 16, 3, strength=0.0), images, seed=0), images)
    out = apply_policy(build_policy(strong, 16, 3), images, seed=0)
    assert out.dtype == torch.uint8 and out.shape == images.shape and not torch.equal(out, images)
    assert torch.equal(out, apply_policy(build_policy(strong, 16, 3), images, seed=0))


def test_colour_jitter_only_for_rgb():
    policy = policy_params(color_jitter=0.8)
    gray = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8)
    assert torch.equal(apply_policy(build_policy(policy, 12, 1), gray, seed=0), gray)
    rgb = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    assert not torch.equal(apply_policy(build_policy(policy, 12, 3), rgb, seed=0), rgb)


def test_scene_policy_moves_boxes_and_masks_with_the_image(prepared_scenes):
    data = load_scenes(prepared_scenes, "train")
    image, target = data.images[0], {**data.targets[0], "semantic": data.masks[0]}
    flip = build_scene_policy(policy_params(hflip=1.0), 40, 1)
    out_image, out = flip(image, target)
    assert torch.equal(out_image, image.flip(-1)) and torch.equal(out["masks"], target["masks"].flip(-1))
    assert torch.equal(out["semantic"], target["semantic"].flip(-1))
    expected = target["boxes"].clone()
    expected[:, [0, 2]] = 40 - target["boxes"][:, [2, 0]]
    assert torch.equal(out["boxes"], expected)
    rotate = build_scene_policy(policy_params(rotation_deg=30, translate=0.2), 40, 1)
    torch.manual_seed(0)
    for i in range(len(data)):
        out_image, out = rotate(data.images[i], {**data.targets[i], "semantic": data.masks[i]})
        assert len(out["labels"]) == len(out["masks"]) == len(out["boxes"])
        for mask, box in zip(out["masks"], out["boxes"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def own_scenes_raw(splits, folder: Path, project_params) -> None:
    """A data/raw of own masks-kind scenes (20 train, 5 test) composed from digits."""
    params = tiny_scene_params(project_params)
    sources = [f"x/{i}" for i in range(len(splits.train_labels))]
    classes = [str(d) for d in range(10)]
    for split, count, seed in (("train", 20, 0), ("test", 5, 1)):
        with SceneWriter(folder / split, classes) as writer:
            for scene in compose_scenes(splits.train_images, splits.train_labels, sources, count, params,
                                        np.random.default_rng(seed)):
                writer.add(scene)
    write_meta(folder, {"name": "masks", "source": "test", "kind": "masks", "classes": classes, "in_channels": 1,
                        "image_size": [40, 40], "splits": {"train": 20, "test": 5}, "skipped": []})


def test_own_scene_data_gives_instance_crops(splits, tmp_path, project_params):
    own_scenes_raw(splits, tmp_path / "raw", project_params)
    own = load_raw(tmp_path / "raw")
    assert not own.is_items and own.meta["in_channels"] == 1 and own.count("train") == 20
    prepare_from_scenes(own, tmp_path / "prepared", tmp_path / "reports", augment_params(project_params, crop_size=16),
                        seed=0)
    crops = load_classify(tmp_path / "prepared/classify", "train")
    meta = json.loads((tmp_path / "prepared/classify/meta.json").read_text())
    assert crops.images.shape[1:] == (1, 16, 16) and "instance crops" in meta["note"]
    scenes = {split: load_scenes(tmp_path / "prepared/scenes", split) for split in ("train", "val", "test")}
    assert (len(scenes["train"]), len(scenes["val"]), len(scenes["test"])) == (18, 2, 5)
    assert len(crops) == sum(len(t["labels"]) for t in scenes["train"].targets)
    preview = Image.open(tmp_path / "reports/scenes_preview.png")
    assert preview.mode == "RGB" and preview.width > 400


def test_missing_prepared_data_says_what_to_run(tmp_path):
    with pytest.raises(ConvForgeError, match="dvc repro augment"):
        load_classify(tmp_path / "nothing", "train")
    with pytest.raises(ConvForgeError, match="dvc repro augment"):
        load_scenes(tmp_path / "nothing", "val")


def test_channel_stats_exact():
    images = np.array([0, 255, 255, 0], np.uint8).reshape(1, 2, 2, 1)
    assert channel_stats(images) == ([0.5], [0.5])


def test_array_writer_streams_rows_and_numpy_reads_them(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)
    with ArrayWriter(tmp_path / "a.npy", (6, 5, 3)) as writer:
        for start in range(0, 50, 7):
            writer.append(rows[start:start + 7])
        writer.append(rows[0])  # one row alone
    loaded = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert loaded.shape == (51, 6, 5, 3) and np.array_equal(loaded[:50], rows) and np.array_equal(loaded[50], rows[0])
    save_array(tmp_path / "b.npy", np.concatenate([rows, rows[:1]]))
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    with ArrayWriter.reopen(tmp_path / "b.npy") as writer:
        writer.append(rows[:2])
    assert array_info(tmp_path / "b.npy")[0] == (53, 6, 5, 3)
    assert np.array_equal(read_rows(tmp_path / "b.npy", 50, 53), np.concatenate([rows[:1], rows[:2]]))
    assert np.array_equal(RowReader(tmp_path / "a.npy")[17], rows[17]) and len(RowReader(tmp_path / "a.npy", 9)) == 9
    with pytest.raises(ValueError, match="rows of shape"):
        ArrayWriter(tmp_path / "c.npy", (6, 5, 3)).append(np.zeros((1, 5, 5, 3), np.uint8))


def test_large_splits_load_lazily_with_the_same_items(raw, tmp_path, project_params):
    root = run(raw, tmp_path, project_params, copies=1)
    eager = load_classify(root / "prepared/classify", "train")
    lazy = load_classify(root / "prepared/classify", "train", in_memory_bytes=0)
    assert isinstance(eager.images, torch.Tensor) and not isinstance(lazy.images, torch.Tensor)
    assert lazy.images.shape == tuple(eager.images.shape) and len(lazy) == len(eager)
    idx = torch.tensor([7, 2, 300, 2])
    assert torch.equal(lazy.images[idx], eager.images[idx]) and torch.equal(lazy.images[5], eager.images[5])
    assert torch.equal(lazy.subset(20, 3).images[:], eager.subset(20, 3).images)
    assert np.array_equal(lazy.images.numpy(), eager.images.numpy())
    scenes = load_scenes(root / "prepared/scenes", "train")
    lazy_scenes = load_scenes(root / "prepared/scenes", "train", in_memory_bytes=0)
    assert torch.equal(lazy_scenes.images[:], scenes.images) and torch.equal(lazy_scenes.masks[:], scenes.masks)
    for mine, theirs in zip(lazy_scenes.subset(5, 1).targets[:], scenes.subset(5, 1).targets):
        assert all(torch.equal(mine[key], theirs[key]) for key in ("boxes", "labels", "masks"))
    assert [s.image_id for s in iter_scenes(root / "prepared/scenes/train")] == scenes.image_ids


@pytest.mark.parametrize("padding,p", [(1, 0.315), (2, 0.5), (4, 1.0), (3, 0.0), (0, 0.7)])
@pytest.mark.parametrize("channels", [1, 3])
def test_crop_flip_batches_are_torchvision_item_by_item(padding, p, channels):
    """CropFlip against torchvision's own steps: the same pixels and as many draws, on items of the crop's size
    and (through the steps themselves) of another."""
    from torchvision.transforms import v2

    crop_flip = build_policy(policy_params(crop_padding=padding, hflip=p), 12, channels)
    assert type(crop_flip).__name__ == "CropFlip"
    steps = v2.Compose(([v2.RandomCrop(12, padding=padding)] if padding else [])
                       + ([v2.RandomHorizontalFlip(p)] if p else []))
    for size in (12, 15):
        images = torch.randint(0, 256, (40, channels, size, size), generator=torch.Generator().manual_seed(size),
                               dtype=torch.uint8)
        for seed in range(5):
            torch.manual_seed(seed)
            expected = torch.stack([steps(image) for image in images])
            next_draw = torch.rand(1)
            torch.manual_seed(seed)
            assert torch.equal(crop_flip.batch(images), expected)
            assert torch.equal(torch.rand(1), next_draw)
            torch.manual_seed(seed)
            assert torch.equal(torch.stack([crop_flip(image) for image in images]), expected)


def test_only_crop_and_flip_policies_batch():
    assert type(build_policy(policy_params(crop_padding=2, hflip=0.5), 12, 1)).__name__ == "CropFlip"
    for extra in ({"erasing": 0.5}, {"rotation_deg": 10.0}, {"translate": 0.1}):
        policy = build_policy(policy_params(crop_padding=2, hflip=0.5, **extra), 12, 1)
        assert not hasattr(policy, "batch")
    policy = build_policy(policy_params(crop_padding=2, color_jitter=0.3), 12, 3)
    assert not hasattr(policy, "batch")
    assert type(build_policy(policy_params(crop_padding=2, color_jitter=0.3), 12, 1)).__name__ == "CropFlip"


def test_a_split_left_empty_stops_augment_before_it_writes(splits, tmp_path, project_params):
    """Five items a class give val none (round(0.1 x 5) = 0): one line naming the split, not a traceback in
    training, and nothing written."""
    from dataclasses import replace

    keep = np.concatenate([np.flatnonzero(splits.train_labels == c)[:5] for c in range(3)])
    tiny = raw_data(replace(splits, train_images=splits.train_images[keep], train_labels=splits.train_labels[keep]),
                    tmp_path / "raw")
    with pytest.raises(ConvForgeError, match=r"classify set's val split is empty \(train 15, val 0, test 60\)"):
        run(tiny, tmp_path, project_params)
    assert not (tmp_path / "prepared").exists() or not list((tmp_path / "prepared").iterdir())


def test_a_run_stopped_while_composing_scenes_keeps_the_old_pair(raw, tmp_path, project_params, monkeypatch):
    """Classify and scenes swap into place together: a failure while composing the scenes leaves the previous
    classify set, not a new one beside the old scenes."""
    import pipelines.preparation as preparation

    before = files_of(run(raw, tmp_path, project_params) / "prepared")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preparation, "compose_scenes", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(raw, tmp_path, project_params, seed=7)
    assert files_of(tmp_path / "prepared") == before
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["classify", "scenes"]  # no staging left
