"""Augmentation: image and mask stay aligned, labels stay labels, presets and caches work."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torch.utils.data import BatchSampler, DataLoader

import marsseg.augment as augment_module
from marsseg.augment import (
    AugmentConfig,
    AugmentedBatches,
    OnlineAugment,
    augment_batch,
    cached_offline_augment,
    offline_augment,
)
from marsseg.classes import IMAGE_SHAPE
from marsseg.errors import ConfigError
from marsseg.losses import signed_distance_maps

LEVELS = np.array([0.0, 0.3, 0.5, 0.7, 0.9], dtype=np.float32)
"""Grayscale level per label; background is 0 like the fill of borders and dropped regions."""


def _blob_masks(n: int, seed: int, labels=(0, 1, 2, 3, 4), sigma: float = 4.0) -> np.ndarray:
    """Masks of smooth random regions (like terrain), using only `labels`."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, len(labels), *IMAGE_SHAPE)).astype(np.float32)
    noise = ndi.gaussian_filter(noise, sigma=(0, 0, sigma, sigma))
    return np.asarray(labels, dtype=np.uint8)[noise.argmax(axis=1)]


def _images_of(masks: np.ndarray) -> np.ndarray:
    """Grayscale images that encode their own masks, plus a little off-grid texture."""
    texture = np.random.default_rng(0).uniform(0, 0.01, masks.shape).astype(np.float32)
    return LEVELS[masks] + texture * (masks > 0)


def _one_hot_image(mask: np.ndarray) -> np.ndarray:
    """(H, W, 4) image, one channel per scored class: background and fills are all zeros."""
    return (mask[..., None] == np.arange(1, 5)).astype(np.float32)


def _agreement_where_pure(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Where interpolation left a pixel pure (one class, or none), does it decode to the mask?

    A bilinear sample is pure only if all its source pixels share a label, and then the
    nearest-neighbour label at that point must be the same: so aligned outputs agree exactly.
    """
    top_two = np.sort(image, axis=-1)[..., -2:]
    pure_background = top_two[..., 1] < 1e-3
    pure_class = (top_two[..., 1] > 1 - 1e-3) & (top_two[..., 0] < 1e-3)
    pure = pure_background | pure_class
    decoded = np.where(pure_background, 0, image.argmax(axis=-1) + 1)
    return float(pure.mean()), float((decoded[pure] == mask[pure]).mean())


@pytest.mark.parametrize("intensity", [0.3, 1.0])
def test_online_augmentation_keeps_image_and_mask_aligned(intensity):
    masks = _blob_masks(24, seed=1, sigma=3)
    augment = OnlineAugment(AugmentConfig(intensity=intensity), seed=0)
    changed, slipped = 0, []
    for mask in masks:
        image, out_mask = augment(_one_hot_image(mask), mask)
        pure, agreement = _agreement_where_pure(image, out_mask)
        assert pure > 0.3
        assert agreement == 1.0
        changed += not np.array_equal(out_mask, mask)
        slipped.append(_agreement_where_pure(np.roll(image, 1, axis=1), out_mask)[1])
    assert changed >= len(masks) * 3 // 4
    assert np.mean(slipped) < 0.98  # the check does see a one-pixel slip


@pytest.mark.parametrize("photometric", [False, True])
def test_grayscale_images_stay_float_in_unit_range(photometric):
    masks = _blob_masks(16, seed=2)
    images = _images_of(masks)
    augment = OnlineAugment(AugmentConfig(intensity=1.0, photometric=photometric), seed=0)
    out_images, out_masks, _ = augment_batch(augment, images, masks, np.arange(16))
    assert out_images.shape == images.shape and out_images.dtype == np.float32
    assert out_masks.shape == masks.shape and out_masks.dtype == np.uint8
    assert out_images.min() >= 0 and out_images.max() <= 1
    # Not silently round-tripped through uint8: values stay off the 1/255 grid.
    on_grid = np.isclose(out_images * 255, np.round(out_images * 255), atol=1e-3)
    assert on_grid.mean() < 0.5
    if not photometric:  # geometric ops move pixels but never invent grey levels far from them
        interior = ndi.maximum_filter(out_masks, size=(1, 5, 5)) == ndi.minimum_filter(
            out_masks, size=(1, 5, 5)
        )
        decoded = np.abs(out_images - LEVELS[out_masks]) < 0.02
        assert decoded[interior].mean() > 0.95


def test_online_pipeline_flips_half_of_the_images_at_any_intensity():
    """The horizontal flip comes before the N ops at every intensity > 0; at a small one the
    ops barely move pixels, so a left-to-right ramp shows which way each output faces."""
    ramp = np.tile(np.linspace(0, 1, IMAGE_SHAPE[1], dtype=np.float32), (IMAGE_SHAPE[0], 1))
    unlabelled = np.zeros(IMAGE_SHAPE, np.uint8)  # nothing for MaskDropout to drop
    augment = OnlineAugment(AugmentConfig(intensity=0.05), seed=0)
    half = IMAGE_SHAPE[1] // 2
    flipped = []
    for _ in range(200):
        image, _ = augment(ramp.copy(), unlabelled.copy())
        flipped.append(image[:, :half].mean() > image[:, half:].mean())
    assert 0.35 < np.mean(flipped) < 0.65


def _augmented_masks(masks: np.ndarray) -> list[np.ndarray]:
    online = [OnlineAugment(AugmentConfig(intensity=i), seed=0) for i in (0.5, 1.0)]
    images = _images_of(masks)
    results = [augment_batch(a, images, masks, np.arange(len(masks)))[1] for a in online]
    return [*results, offline_augment(images, masks, "reference", seed=0)[1]]


def test_masks_keep_their_labels_without_interpolation():
    """Soil next to big rock: linear interpolation of labels would invent bedrock and sand."""
    masks = _blob_masks(32, seed=3, labels=(0, 1, 4))
    for out_masks in _augmented_masks(masks):
        assert out_masks.dtype == np.uint8
        assert set(np.unique(out_masks)) <= {0, 1, 4}


@pytest.mark.parametrize("photometric", [False, True])
def test_intensity_zero_is_the_identity(photometric):
    masks = _blob_masks(8, seed=4)
    images = _images_of(masks)
    dist_maps = signed_distance_maps(masks)
    augment = OnlineAugment(AugmentConfig(intensity=0.0, photometric=photometric), seed=0)
    assert augment.is_identity
    image, mask = augment(images[0], masks[0])
    np.testing.assert_array_equal(image, images[0])
    np.testing.assert_array_equal(mask, masks[0])
    indices = [5, 1, 1]
    out_images, out_masks, out_maps = augment_batch(augment, images, masks, indices, dist_maps)
    np.testing.assert_array_equal(out_images, images[indices])
    np.testing.assert_array_equal(out_masks, masks[indices])
    np.testing.assert_array_equal(out_maps, dist_maps[indices])


def test_augmented_batches_recompute_distance_maps():
    masks = _blob_masks(6, seed=5)
    dist_maps = signed_distance_maps(masks)
    augment = OnlineAugment(AugmentConfig(intensity=1.0), seed=0)
    _, out_masks, out_maps = augment_batch(augment, _images_of(masks), masks, range(6), dist_maps)
    assert out_maps.dtype == dist_maps.dtype
    np.testing.assert_array_equal(out_maps, signed_distance_maps(out_masks))


def test_reference_preset_doubles_the_data_and_drops_a_quarter_of_the_copies():
    n = 200
    masks = _blob_masks(n, seed=6)
    images = _images_of(masks)
    out_images, out_masks = offline_augment(images, masks, "reference", seed=0)
    assert out_images.shape == (2 * n, *IMAGE_SHAPE) and out_masks.shape == (2 * n, *IMAGE_SHAPE)
    np.testing.assert_array_equal(out_images[:n], images)
    np.testing.assert_array_equal(out_masks[:n], masks)

    flipped_images, flipped_masks = images[:, :, ::-1], masks[:, :, ::-1]
    copy_images, copy_masks = out_images[n:], out_masks[n:]
    dropped = copy_masks != flipped_masks
    # Every copy is flipped; dropout only ever turns labelled pixels (and their image) to 0.
    assert (copy_masks[dropped] == 0).all() and (copy_images[dropped] == 0).all()
    np.testing.assert_array_equal(copy_images[~dropped], flipped_images[~dropped])
    fraction_dropped = dropped.any(axis=(1, 2)).mean()
    assert 0.17 <= fraction_dropped <= 0.33


def test_offline_presets_are_deterministic_per_seed():
    masks = _blob_masks(40, seed=7)
    images = _images_of(masks)
    first = offline_augment(images, masks, "reference", seed=0)
    again = offline_augment(images, masks, "reference", seed=0)
    other = offline_augment(images, masks, "reference", seed=1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])
    none_images, none_masks = offline_augment(images, masks, "none", seed=0)
    np.testing.assert_array_equal(none_images, images)
    np.testing.assert_array_equal(none_masks, masks)


def test_cache_builds_once_per_data_preset_and_seed(tmp_path, monkeypatch):
    masks = _blob_masks(12, seed=8)
    images = _images_of(masks)
    built = cached_offline_augment(images, masks, "reference", 0, tmp_path, distance_maps=True)
    expected_images, expected_masks = offline_augment(images, masks, "reference", seed=0)
    np.testing.assert_array_equal(built.images, expected_images)
    np.testing.assert_array_equal(built.masks, expected_masks)
    assert built.dist_maps.dtype == np.float16
    np.testing.assert_allclose(built.dist_maps, signed_distance_maps(expected_masks), atol=1e-3)

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the cached entry should have been reused")

    monkeypatch.setattr(augment_module, "offline_augment", must_not_rebuild)
    monkeypatch.setattr(augment_module, "signed_distance_maps", must_not_rebuild)
    reused = cached_offline_augment(images, masks, "reference", 0, tmp_path, distance_maps=True)
    for a, b in zip(reused, built, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AssertionError, match="reused"):  # another seed is another entry
        cached_offline_augment(images, masks, "reference", 1, tmp_path)
    with pytest.raises(AssertionError, match="reused"):  # so are other data
        cached_offline_augment(images[:6], masks[:6], "reference", 0, tmp_path)
    entries = sorted(path.name for path in tmp_path.iterdir() if path.is_dir())
    assert len(entries) == 2 and entries[1] == f"{entries[0]}-sdm"  # no staging leftovers


def test_workers_draw_different_augmentations():
    """Each DataLoader worker starts from a copy of one state; it must reseed, not repeat it."""
    masks = _blob_masks(8, seed=9)
    dataset = AugmentedBatches(
        _images_of(masks), masks, OnlineAugment(AugmentConfig(intensity=1.0), seed=0)
    )
    same_batch_twice = BatchSampler([0, 1, 2, 3] * 2, batch_size=4, drop_last=False)
    loader = DataLoader(
        dataset, sampler=same_batch_twice, batch_size=None, num_workers=2, timeout=60
    )
    (images_a, masks_a, maps_a), (_, masks_b, _) = list(loader)
    assert isinstance(images_a, torch.Tensor) and maps_a is None
    assert not torch.equal(masks_a, masks_b)


def test_transforms_do_not_draw_in_lockstep():
    """albumentations 2.0's Compose(seed=...) gives every transform the same stream."""
    flips = augment_module.A.Compose(
        [augment_module.A.HorizontalFlip(p=0.5), augment_module.A.VerticalFlip(p=0.5)],
        save_applied_params=True,
    )
    augment_module.seed_pipeline(flips, 0)
    image, mask = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8)
    applied = {
        tuple(name for name, _ in flips(image=image, mask=mask)["applied_transforms"])
        for _ in range(40)
    }
    assert ("HorizontalFlip",) in applied and ("VerticalFlip",) in applied


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"intensity": 1.5}, "augment.intensity must be in [0, 1], got 1.5"),
        ({"intensity": -0.1}, "augment.intensity must be in [0, 1], got -0.1"),
        ({"intensity": float("nan")}, "augment.intensity must be in [0, 1], got nan"),
        ({"preset": "cutmix"}, "augment.preset must be one of none, reference, got 'cutmix'"),
        ({"photometric": "yes"}, "augment.photometric must be true or false, got 'yes'"),
    ],
)
def test_bad_augment_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        AugmentConfig(**fields)


def test_augment_config_defaults_are_the_reference_recipe():
    assert AugmentConfig() == AugmentConfig(preset="reference", intensity=0.0, photometric=False)
