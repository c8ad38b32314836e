"""Losses: background is ignored, absent classes stay finite, boundary maps have their signs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from marsseg.classes import BACKGROUND, NUM_CLASSES
from marsseg.errors import ConfigError
from marsseg.losses import (
    CombinedLoss,
    LossConfig,
    boundary_loss,
    class_weights_from_masks,
    focal_loss,
    masked_cross_entropy,
    signed_distance_maps,
    soft_dice_loss,
)

DIAGONAL = math.hypot(64, 128)


def _random_logits(masks: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (len(masks), NUM_CLASSES, *masks.shape[1:])
    return torch.randn(shape, generator=generator).requires_grad_()


def _perfect_logits(masks: torch.Tensor, margin: float = 30.0) -> torch.Tensor:
    """Logits whose argmax is the mask everywhere, with near one-hot softmax."""
    return (F.one_hot(masks, NUM_CLASSES).permute(0, 3, 1, 2).float() * margin).requires_grad_()


def _background_perturbed(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    noise = 10 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    return (logits + noise * (masks == BACKGROUND)[:, None]).detach().requires_grad_()


REGION_LOSSES = {
    "ce": lambda logits, masks: masked_cross_entropy(logits, masks),
    "ce_weighted_smoothed": lambda logits, masks: masked_cross_entropy(
        logits, masks, torch.tensor([0.0, 1.0, 2.0, 0.5, 4.0]), label_smoothing=0.1
    ),
    "focal": lambda logits, masks: focal_loss(logits, masks, gamma=2.0),
    "dice": lambda logits, masks: soft_dice_loss(logits, masks),
    "generalized_dice": lambda logits, masks: soft_dice_loss(logits, masks, generalized=True),
}


@pytest.mark.parametrize("name", REGION_LOSSES)
def test_region_losses_ignore_background(name, labelled_batch):
    """Changing logits where the label is background changes neither the loss nor any gradient."""
    _, masks = labelled_batch
    loss_fn = REGION_LOSSES[name]
    logits = _random_logits(masks)
    loss = loss_fn(logits, masks)
    loss.backward()

    perturbed = _background_perturbed(logits, masks)
    perturbed_loss = loss_fn(perturbed, masks)
    perturbed_loss.backward()

    background = (masks == BACKGROUND)[:, None].expand_as(logits)
    assert background.any() and (~background).any()
    torch.testing.assert_close(perturbed_loss, loss)
    assert torch.count_nonzero(logits.grad[background]) == 0
    assert torch.count_nonzero(logits.grad[~background]) > 0
    torch.testing.assert_close(perturbed.grad, logits.grad)


def test_masked_ce_is_torchs_mean_and_zero_without_labels(labelled_batch):
    _, masks = labelled_batch
    logits = _random_logits(masks)
    weights = torch.tensor([0.0, 1.0, 2.0, 0.5, 4.0])
    expected = F.cross_entropy(logits, masks, weight=weights, ignore_index=0, label_smoothing=0.1)
    torch.testing.assert_close(masked_cross_entropy(logits, masks, weights, 0.1), expected)

    unlabelled = torch.zeros_like(masks)
    for loss_fn in REGION_LOSSES.values():
        loss = loss_fn(logits, unlabelled)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(logits.grad).all()


def test_focal_is_ce_at_gamma_zero_and_finite_when_confident(labelled_batch):
    _, masks = labelled_batch
    logits = _random_logits(masks)
    torch.testing.assert_close(
        focal_loss(logits, masks, gamma=0.0), masked_cross_entropy(logits, masks)
    )
    assert focal_loss(logits, masks, gamma=2.0) < masked_cross_entropy(logits, masks)

    perfect = _perfect_logits(masks, margin=200.0)
    loss = focal_loss(perfect, masks, gamma=0.5)
    loss.backward()
    assert torch.isfinite(perfect.grad).all()


@pytest.mark.parametrize("generalized", [False, True])
def test_dice_is_near_zero_on_a_perfect_prediction(generalized, labelled_batch):
    _, masks = labelled_batch
    assert soft_dice_loss(_perfect_logits(masks), masks, generalized=generalized) < 1e-3
    assert soft_dice_loss(_random_logits(masks), masks, generalized=generalized) > 0.5


@pytest.mark.parametrize("generalized", [False, True])
def test_dice_is_finite_and_bounded_when_a_class_is_absent(generalized, labelled_batch):
    _, masks = labelled_batch
    no_big_rock = torch.where(masks == 4, 1, masks)
    logits = _random_logits(no_big_rock)
    loss = soft_dice_loss(logits, no_big_rock, generalized=generalized)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= loss.item() <= 1
    assert torch.isfinite(logits.grad).all()
    # A perfect prediction of the present classes is not penalised for the absent one.
    assert soft_dice_loss(_perfect_logits(no_big_rock), no_big_rock, generalized=generalized) < 1e-3


def test_dice_does_not_punish_leaks_into_an_absent_class(labelled_batch):
    """1% probability on big rock everywhere, in a batch without it: a small loss, not ~1/4."""
    _, masks = labelled_batch
    no_big_rock = torch.where(masks == 4, 1, masks)
    logits = _perfect_logits(no_big_rock, margin=10.0).detach()
    logits[:, 4] = 10.0 - math.log(100)
    assert soft_dice_loss(logits, no_big_rock) < 0.03


def test_dice_and_boundary_ignore_the_background_logit(labelled_batch):
    """Both are defined on classes 1-4: a softmax over all five would let class 0 soak them up."""
    _, masks = labelled_batch
    dist_maps = torch.from_numpy(signed_distance_maps(masks.numpy().astype(np.uint8)))
    logits = _random_logits(masks).detach()
    raised = logits.clone()
    raised[:, BACKGROUND] += 5.0
    for loss_fn in (
        lambda x: soft_dice_loss(x, masks),
        lambda x: soft_dice_loss(x, masks, generalized=True),
        lambda x: boundary_loss(x, masks, dist_maps),
    ):
        torch.testing.assert_close(loss_fn(raised), loss_fn(logits))


def test_dice_averages_classes_per_batch(labelled_batch):
    """A class predicted wrongly everywhere costs its share of the mean over present classes."""
    _, masks = labelled_batch
    logits = _perfect_logits(masks).detach()
    logits[:, [3, 4]] = logits[:, [4, 3]]  # swap sand and big rock
    assert soft_dice_loss(logits, masks).item() == pytest.approx(0.5, abs=1e-3)


def _square_mask(top: int = 20, left: int = 40, size: int = 24) -> np.ndarray:
    mask = np.ones((1, 64, 128), dtype=np.uint8)
    mask[0, top : top + size, left : left + size] = 2
    return mask


def test_signed_distance_maps_have_documented_signs_and_values():
    mask = _square_mask()
    maps = signed_distance_maps(mask)
    assert maps.shape == (1, 4, 64, 128) and maps.dtype == np.float32
    inside = mask[0] == 2
    square = maps[0, 1]
    assert (square[~inside] > 0).all()
    assert (square[inside] <= 0).all()
    assert square[20, 50] == 0  # on the square's inner boundary
    assert square[32, 52] == pytest.approx(-11 / DIAGONAL)  # centre: 12 px from outside, minus 1
    assert square[20, 30] == pytest.approx(10 / DIAGONAL)  # 10 px left of the square
    # Soil surrounds the square: outside soil is the square, inside is everything else.
    assert (maps[0, 0][inside] > 0).all() and (maps[0, 0][~inside] <= 0).all()
    # Sand and big rock are absent: no boundary, no signal.
    assert not maps[0, 2:].any()


def test_signed_distance_maps_match_the_papers_definition(labelled_batch):
    """Kervadec et al.: dist(negmask) * negmask - (dist(posmask) - 1) * posmask, per class."""
    masks = labelled_batch[1].numpy().astype(np.uint8)
    masks[1][masks[1] == 4] = 2  # one mask without big rock
    maps = signed_distance_maps(masks)
    for n, mask in enumerate(masks):
        for k, cls in enumerate(range(1, 5)):
            pos = mask == cls
            expected = np.zeros(mask.shape)
            if pos.any():
                expected = (
                    distance_transform_edt(~pos) * ~pos - (distance_transform_edt(pos) - 1) * pos
                )
            np.testing.assert_allclose(maps[n, k], expected / DIAGONAL, atol=1e-6)
    assert not maps[1, 3].any()


def test_boundary_loss_prefers_the_aligned_prediction():
    mask = _square_mask()
    dist_maps = torch.from_numpy(signed_distance_maps(mask))
    masks = torch.from_numpy(mask).long()
    aligned = _perfect_logits(masks, margin=10.0)
    losses = [boundary_loss(aligned, masks, dist_maps)]
    for shift in (3, 8):
        shifted = torch.roll(aligned.detach(), shifts=(shift, shift), dims=(2, 3))
        losses.append(boundary_loss(shifted, masks, dist_maps))
    assert losses[0] < losses[1] < losses[2]
    assert losses[0] < 0  # probability inside the true regions is rewarded


def test_class_weights_follow_the_schemes():
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, :5] = 1  # 50 soil
    masks[0, 5:8] = 2  # 30 bedrock
    masks[0, 8, :8] = 3  # 8 sand, 2 background; no big rock
    torch.testing.assert_close(
        class_weights_from_masks(masks, "none"), torch.tensor([0.0, 1, 1, 1, 1])
    )
    inverse = class_weights_from_masks(masks, "inverse")
    root = class_weights_from_masks(masks, "inverse_sqrt")
    for weights in (inverse, root):
        assert torch.isfinite(weights).all() and weights[BACKGROUND] == 0
        assert weights[1:].mean().item() == pytest.approx(1.0)
        assert weights[4] == weights[1:4].max()  # absent: like the rarest present class
    assert inverse[3] / inverse[1] == pytest.approx(50 / 8)
    assert root[3] / root[1] == pytest.approx(math.sqrt(50 / 8))
    with pytest.raises(ConfigError, match=r"loss\.class_weights"):
        class_weights_from_masks(masks, "median")


def test_loss_config_defaults_are_the_reference_recipe():
    config = LossConfig()
    assert config.weights_at(0) == {"ce": 1.0, "dice": 0.0, "focal": 0.0, "boundary": 0.0}
    assert config.class_weights == "none" and config.label_smoothing == 0
    assert not config.needs_distance_maps


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dice_weight": -1.0}, "loss.dice_weight must be >= 0, got -1.0"),
        ({"boundary_ramp": float("nan")}, "loss.boundary_ramp must be finite"),
        ({"ce_weight": "1"}, "loss.ce_weight must be a number"),
        ({"label_smoothing": 1.0}, "loss.label_smoothing must be < 1"),
        ({"region_floor": 1.5}, "loss.region_floor must be <= 1"),
        ({"class_weights": "median"}, "loss.class_weights must be one of none, inverse"),
        ({"ce_weight": 0.0}, "every term weight is 0"),
    ],
)
def test_bad_loss_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        LossConfig(**fields)
    assert "\n" not in str(error.value)


def test_unknown_loss_term_names_the_field():
    with pytest.raises(ConfigError, match=r"loss\.tversky_weight: unknown loss term 'tversky'"):
        LossConfig.from_dict({"tversky_weight": 1.0})
    with pytest.raises(ConfigError, match=r"loss\.tversky_weight: unknown loss term 'tversky'"):
        LossConfig.from_terms({"ce": 1.0, "tversky": 1.0})
    with pytest.raises(ConfigError, match=r"loss\.smoothing: unknown field"):
        LossConfig.from_dict({"smoothing": 0.1})
    config = LossConfig.from_terms({"dice": 0.5, "focal": 1.0}, focal_gamma=1.0)
    assert config == LossConfig.from_dict(
        {"ce_weight": 0.0, "dice_weight": 0.5, "focal_weight": 1.0, "focal_gamma": 1.0}
    )


def test_combined_loss_is_the_configured_weighted_sum(labelled_batch):
    _, masks = labelled_batch
    config = LossConfig(ce_weight=1.0, dice_weight=0.5, focal_weight=0.25, label_smoothing=0.05)
    loss_fn = CombinedLoss(config)
    logits = _random_logits(masks)
    total = loss_fn(logits, masks)
    ce = masked_cross_entropy(logits, masks, label_smoothing=0.05)
    dice = soft_dice_loss(logits, masks)
    focal = focal_loss(logits, masks, gamma=2.0)
    torch.testing.assert_close(total, ce + 0.5 * dice + 0.25 * focal)
    assert set(loss_fn.terms) == {"ce", "dice", "focal"}
    torch.testing.assert_close(loss_fn.terms["dice"], dice.detach())
    assert not loss_fn.terms["ce"].requires_grad


def test_combined_loss_uses_class_weights(labelled_batch):
    _, masks = labelled_batch
    weights = class_weights_from_masks(masks.numpy(), "inverse")
    config = LossConfig(class_weights="inverse")
    with pytest.raises(ValueError, match="class_weights_from_masks"):
        CombinedLoss(config)
    logits = _random_logits(masks)
    torch.testing.assert_close(
        CombinedLoss(config, weights)(logits, masks), masked_cross_entropy(logits, masks, weights)
    )


def test_boundary_ramp_moves_weight_from_region_to_boundary():
    config = LossConfig(ce_weight=1.0, dice_weight=1.0, boundary_weight=0.01, boundary_ramp=0.1)
    assert config.needs_distance_maps
    assert config.weights_at(0) == pytest.approx({"ce": 1, "dice": 1, "focal": 0, "boundary": 0.01})
    assert config.weights_at(3) == pytest.approx(
        {"ce": 0.7, "dice": 0.7, "focal": 0, "boundary": 0.31}
    )
    # The region terms stop at region_floor; the boundary weight keeps growing, as in the paper.
    assert config.weights_at(20) == pytest.approx(
        {"ce": 0.1, "dice": 0.1, "focal": 0, "boundary": 2.01}
    )


def test_combined_loss_applies_the_ramp_and_needs_distance_maps():
    mask = _square_mask()
    masks = torch.from_numpy(mask).long()
    dist_maps = torch.from_numpy(signed_distance_maps(mask))
    config = LossConfig(ce_weight=1.0, boundary_weight=0.0, boundary_ramp=0.2)
    loss_fn = CombinedLoss(config)
    logits = _random_logits(masks)
    with pytest.raises(ValueError, match="dist_maps"):
        loss_fn(logits, masks)
    ce, boundary = masked_cross_entropy(logits, masks), boundary_loss(logits, masks, dist_maps)
    torch.testing.assert_close(loss_fn(logits, masks, dist_maps, epoch=0), ce)
    assert set(loss_fn.terms) == {"ce"}
    torch.testing.assert_close(
        loss_fn(logits, masks, dist_maps, epoch=2), 0.6 * ce + 0.4 * boundary
    )
    assert set(loss_fn.terms) == {"ce", "boundary"}
