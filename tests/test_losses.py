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
from marsseg.config import TrainConfig
from marsseg.errors import ConfigError
from marsseg.losses import (
    CombinedLoss,
    LossConfig,
    boundary_loss,
    class_weights_from_masks,
    focal_loss,
    lovasz_softmax_loss,
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
    "lovasz": lambda logits, masks: lovasz_softmax_loss(logits, masks),
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


def test_dice_lovasz_and_boundary_ignore_the_background_logit(labelled_batch):
    """All are defined on classes 1-4: a softmax over all five would let class 0 soak them up."""
    _, masks = labelled_batch
    dist_maps = torch.from_numpy(signed_distance_maps(masks.numpy().astype(np.uint8)))
    logits = _random_logits(masks).detach()
    raised = logits.clone()
    raised[:, BACKGROUND] += 5.0
    for loss_fn in (
        lambda x: soft_dice_loss(x, masks),
        lambda x: soft_dice_loss(x, masks, generalized=True),
        lambda x: boundary_loss(x, masks, dist_maps),
        lambda x: lovasz_softmax_loss(x, masks),
    ):
        torch.testing.assert_close(loss_fn(raised), loss_fn(logits))


def test_dice_averages_classes_per_batch(labelled_batch):
    """A class predicted wrongly everywhere costs its share of the mean over present classes."""
    _, masks = labelled_batch
    logits = _perfect_logits(masks).detach()
    logits[:, [3, 4]] = logits[:, [4, 3]]  # swap sand and big rock
    assert soft_dice_loss(logits, masks).item() == pytest.approx(0.5, abs=1e-3)


def _two_class_logits(p_soil: list[float]) -> torch.Tensor:
    """Logits (1, 5, 1, len) giving softmax over classes 1-4 of (p, 1 - p, 0, 0) per pixel."""
    logits = torch.full((1, NUM_CLASSES, 1, len(p_soil)), -1e4)
    logits[0, 1, 0] = torch.tensor(p_soil).log()
    logits[0, 2, 0] = (1 - torch.tensor(p_soil)).log()
    logits[0, BACKGROUND] = 7.0  # the scored softmax must not see it
    return logits.requires_grad_()


def test_lovasz_matches_a_hand_computed_value():
    """Four labelled pixels (soil, soil, bedrock, soil) and one background pixel.

    p_soil = (0.9, 0.4, 0.3, 0.2), p_bedrock = 1 - p_soil, so both classes have errors
    e = |fg - p| = (0.1, 0.6, 0.3, 0.8); sorted: d 0.8, b 0.6, c 0.3, a 0.1. The loss of a class
    is sum_i e_(i) * (J(i) - J(i-1)), J(i) = 1 - |gt minus top i| / |gt plus top i|.
    Soil (gt {a, b, d}, c is a non-member): J = 1/3, 2/3, 3/4, 1, steps 1/3, 1/3, 1/12, 1/4;
    loss 0.8/3 + 0.6/3 + 0.3/12 + 0.1/4 = 31/60.
    Bedrock (gt {c}): J = 1/2, 2/3, 1, 1, steps 1/2, 1/6, 1/3, 0; loss 0.4 + 0.1 + 0.1 = 3/5.
    Sand and big rock are absent (errors all 0): the mean is over two classes, (31/60 + 3/5)/2.
    """
    logits = _two_class_logits([0.9, 0.4, 0.3, 0.2, 0.5])
    masks = torch.tensor([[[1, 1, 2, 1, BACKGROUND]]])
    loss = lovasz_softmax_loss(logits, masks)
    assert loss.item() == pytest.approx(67 / 120, abs=1e-6)

    loss.backward()
    grad = logits.grad[0, 1:3, 0]
    assert torch.isfinite(logits.grad).all()
    assert (grad[:, :4] != 0).all() and not grad[:, 4].any()
    assert not logits.grad[0, BACKGROUND].any()
    stepped = (logits - 0.5 * logits.grad).detach()
    assert lovasz_softmax_loss(stepped, masks) < loss  # the gradient points downhill


def test_lovasz_is_near_zero_on_a_perfect_prediction(labelled_batch):
    _, masks = labelled_batch
    assert lovasz_softmax_loss(_perfect_logits(masks), masks) < 1e-6
    assert lovasz_softmax_loss(_random_logits(masks), masks) > 0.5


def _independent_iou_loss(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over the classes present in `target` of 1 - IoU, counting labelled pixels only."""
    labelled = target != BACKGROUND
    losses = []
    for cls in range(1, NUM_CLASSES):
        truth, guess = (target == cls) & labelled, (pred == cls) & labelled
        if truth.any():
            losses.append(1 - (truth & guess).sum() / (truth | guess).sum())
    return float(np.mean(losses))


def test_lovasz_is_one_minus_iou_at_hard_predictions_and_skips_absent_classes(labelled_batch):
    """The Lovász extension is exact at the vertices: a 0/1 prediction costs 1 - IoU.

    Big rock is absent from the ground truth but predicted on ~10% of pixels; it must not count,
    else its 1 - IoU = 1 would join the mean.
    """
    _, masks = labelled_batch
    target = torch.where(masks == 4, 3, masks)
    generator = torch.Generator().manual_seed(3)
    noise = torch.randint(1, NUM_CLASSES, target.shape, generator=generator)
    flip = torch.rand(target.shape, generator=generator) < 0.4
    pred = torch.where(flip | (target == BACKGROUND), noise, target)
    logits = F.one_hot(pred, NUM_CLASSES).permute(0, 3, 1, 2).float() * 100.0

    expected = _independent_iou_loss(pred.numpy(), target.numpy())
    assert 0.2 < expected < 0.8
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(expected, abs=1e-5)
    with_absent = (3 * expected + 1) / 4
    assert lovasz_softmax_loss(logits, target).item() != pytest.approx(with_absent, abs=1e-2)


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


def _counted_masks(*counts: int) -> np.ndarray:
    """A (1, 1, N) mask with counts[k] pixels of class k + 1, plus a few background pixels."""
    labels = np.repeat(np.arange(1, len(counts) + 1), counts)
    return np.concatenate([labels, np.zeros(9, dtype=int)]).astype(np.uint8)[None, None]


def test_class_weight_cap_clips_to_a_multiple_of_the_lightest_class():
    masks = _counted_masks(100, 100, 100, 1)  # big rock 100x rarer than the rest
    uncapped = torch.tensor([0, 1, 1, 1, 100]) / 25.75
    torch.testing.assert_close(class_weights_from_masks(masks, "inverse"), uncapped)
    torch.testing.assert_close(
        class_weights_from_masks(masks, "inverse", cap=10),
        torch.tensor([0, 4, 4, 4, 40]) / 13,
    )
    for cap in (100, 250.0):  # at or above the raw ratio: nothing to clip
        torch.testing.assert_close(class_weights_from_masks(masks, "inverse", cap=cap), uncapped)
    # inverse_sqrt's raw ratio is 10: a cap of 2 gives (1, 1, 1, 2) / 1.25.
    torch.testing.assert_close(
        class_weights_from_masks(masks, "inverse_sqrt", cap=2),
        torch.tensor([0, 0.8, 0.8, 0.8, 1.6]),
    )
    torch.testing.assert_close(
        class_weights_from_masks(masks, "inverse", cap=1), torch.tensor([0.0, 1, 1, 1, 1])
    )
    torch.testing.assert_close(
        class_weights_from_masks(masks, "none", cap=10), torch.tensor([0.0, 1, 1, 1, 1])
    )


def test_class_weight_cap_applies_to_an_absent_class():
    """Raw inverse weights (1, 4, 100) and the absent big rock at the largest, 100: capped at
    10x soil, (1, 4, 10, 10) with mean 25/4."""
    masks = _counted_masks(100, 25, 1)
    torch.testing.assert_close(
        class_weights_from_masks(masks, "inverse", cap=10),
        torch.tensor([0, 4, 16, 40, 40]) / 25,
    )


@pytest.mark.parametrize("cap", [0.5, -1, float("nan"), "x"])
def test_bad_class_weight_cap_names_the_field(cap):
    with pytest.raises(ConfigError, match=r"^loss\.class_weight_cap must be ") as error:
        class_weights_from_masks(_counted_masks(10, 10, 10, 1), "inverse", cap=cap)
    assert "\n" not in str(error.value)


def test_loss_config_defaults_are_the_reference_recipe():
    config = LossConfig()
    assert config.weights_at(0) == {
        "ce": 1.0,
        "dice": 0.0,
        "focal": 0.0,
        "lovasz": 0.0,
        "boundary": 0.0,
    }
    assert config.class_weights == "none" and config.label_smoothing == 0
    assert config.class_weight_cap == 0
    assert not config.needs_distance_maps


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dice_weight": -1.0}, "loss.dice_weight must be a finite number >= 0, got -1.0"),
        (
            {"boundary_ramp": float("nan")},
            "loss.boundary_ramp must be a finite number >= 0, got nan",
        ),
        ({"ce_weight": "1"}, "loss.ce_weight must be a finite number >= 0, got '1'"),
        ({"label_smoothing": 1.0}, "loss.label_smoothing must be a finite number >= 0 and < 1"),
        ({"region_floor": 1.5}, "loss.region_floor must be a finite number >= 0 and <= 1"),
        ({"class_weights": "median"}, "loss.class_weights must be one of none, inverse"),
        ({"ce_weight": 0.0}, "every term weight is 0"),
        ({"ce_weight": 0.0}, "loss.focal_weight or loss.lovasz_weight)"),
        ({"lovasz_weight": -0.5}, "loss.lovasz_weight must be a finite number >= 0, got -0.5"),
        ({"class_weight_cap": 0.5}, "loss.class_weight_cap must be >= 1, got 0.5"),
        ({"class_weight_cap": -1}, "loss.class_weight_cap must be >= 1, got -1"),
        (
            {"class_weight_cap": float("nan")},
            "loss.class_weight_cap must be a finite number, got nan",
        ),
        ({"class_weight_cap": "x"}, "loss.class_weight_cap must be a finite number, got 'x'"),
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


def test_combined_loss_with_lovasz_only(labelled_batch):
    _, masks = labelled_batch
    config = LossConfig(lovasz_weight=1.0, ce_weight=0)
    assert config == LossConfig.from_terms({"lovasz": 1.0})
    loss_fn = CombinedLoss(config)
    logits = _random_logits(masks)
    total = loss_fn(logits, masks)
    torch.testing.assert_close(total, lovasz_softmax_loss(logits, masks))
    assert set(loss_fn.terms) == {"lovasz"}
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.any()


def test_lovasz_and_cap_survive_config_round_trips():
    loss = LossConfig(
        ce_weight=0.5, lovasz_weight=0.75, class_weights="inverse", class_weight_cap=10.0
    )
    config = TrainConfig(loss=loss)
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config
    assert again.loss.lovasz_weight == 0.75 and again.loss.class_weight_cap == 10.0
    assert LossConfig.from_dict({"lovasz_weight": 1.0, "class_weight_cap": 10}).lovasz_weight == 1
    with pytest.raises(ConfigError, match=r"loss\.class_weight_cap must be >= 1"):
        TrainConfig.from_dict({"loss": {"class_weight_cap": 0.5}})


def test_boundary_ramp_moves_weight_from_region_to_boundary():
    config = LossConfig(
        ce_weight=1.0,
        dice_weight=1.0,
        lovasz_weight=0.5,
        boundary_weight=0.01,
        boundary_ramp=0.1,
    )
    assert config.needs_distance_maps
    assert config.weights_at(0) == pytest.approx(
        {"ce": 1, "dice": 1, "focal": 0, "lovasz": 0.5, "boundary": 0.01}
    )
    assert config.weights_at(3) == pytest.approx(
        {"ce": 0.7, "dice": 0.7, "focal": 0, "lovasz": 0.35, "boundary": 0.31}
    )
    # The region terms stop at region_floor; the boundary weight keeps growing, as in the paper.
    assert config.weights_at(20) == pytest.approx(
        {"ce": 0.1, "dice": 0.1, "focal": 0, "lovasz": 0.05, "boundary": 2.01}
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
