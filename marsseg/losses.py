"""Segmentation losses on logits (B, 5, H, W) and integer masks (B, H, W), combined from a config.

Every term leaves background (label 0) out: the metric never scores those pixels, and the teams
of the challenge report their largest single gain from not training on them. Beyond that, each
term says in its docstring what it does with background and with classes absent from a batch,
because those two cases are where segmentation losses quietly go wrong.

The search samples a `LossConfig`; training builds one `CombinedLoss` from it and, when the
boundary term is on, feeds it the ground truth's `signed_distance_maps`, computed once per
(augmented) mask alongside the data rather than on every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn

from marsseg.checks import check_number
from marsseg.classes import BACKGROUND, NUM_CLASSES, SCORED_CLASSES
from marsseg.errors import ConfigError

LOSS_TERMS = ("ce", "dice", "boundary", "focal", "lovasz")
"""Loss term names as config strings; `LossConfig` has one `<name>_weight` field per term."""
REGION_TERMS = ("ce", "dice", "focal", "lovasz")
"""The terms the boundary ramp takes weight from (the paper's "region" loss)."""
CLASS_WEIGHT_SCHEMES = ("none", "inverse", "inverse_sqrt")

_SCORED = list(SCORED_CLASSES)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which loss terms to use and how much each weighs; the defaults are the reference recipe.

    The boundary term follows Kervadec et al. 2019: it is unstable on its own early in training,
    so `boundary_ramp` moves weight from the region terms (ce, dice, focal, lovasz) to it each
    epoch, like their `StealWeight` schedule: the region terms are scaled by
    `max(region_floor, 1 - boundary_ramp * epoch)` and the boundary weight is
    `boundary_weight + boundary_ramp * epoch`.
    """

    ce_weight: float = 1.0
    dice_weight: float = 0.0
    boundary_weight: float = 0.0
    focal_weight: float = 0.0
    lovasz_weight: float = 0.0
    boundary_ramp: float = 0.0
    region_floor: float = 0.1
    class_weights: str = "none"
    """Scheme for `class_weights_from_masks`, applied to the ce and focal terms."""
    class_weight_cap: float = 0.0
    """Largest class weight as a multiple of the smallest (0: no cap). Full inverse weights give
    big rock 50-250x soil's weight; the challenge's best teams capped theirs near 10x."""
    label_smoothing: float = 0.0
    generalized_dice: bool = False
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        for name in (*(f"{term}_weight" for term in LOSS_TERMS), "boundary_ramp", "focal_gamma"):
            check_number(getattr(self, name), f"loss.{name}", low=0.0)
        check_number(self.region_floor, "loss.region_floor", low=0.0, high=1.0)
        check_number(
            self.label_smoothing, "loss.label_smoothing", low=0.0, high=1.0, high_open=True
        )
        _check_scheme(self.class_weights)
        _check_cap(self.class_weight_cap)
        if not isinstance(self.generalized_dice, bool):
            raise ConfigError(
                f"loss.generalized_dice must be true or false, got {self.generalized_dice!r}"
            )
        if self.boundary_ramp == 0 and not any(getattr(self, f"{t}_weight") for t in LOSS_TERMS):
            raise ConfigError(
                "loss: every term weight is 0 (set loss.ce_weight, loss.dice_weight, "
                "loss.boundary_weight, loss.focal_weight or loss.lovasz_weight)"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossConfig:
        """Build from a config section, naming any unknown key (and any unknown loss term)."""
        known = {field.name for field in fields(cls)}
        for key in data:
            if key.endswith("_weight") and key not in known:
                _unknown_term(key.removesuffix("_weight"))
            if key not in known:
                raise ConfigError(f"loss.{key}: unknown field (known: {', '.join(sorted(known))})")
        return cls(**data)

    @classmethod
    def from_terms(cls, weights: Mapping[str, float], **options: Any) -> LossConfig:
        """Build from `{term: weight}`, e.g. `{"ce": 1.0, "dice": 0.5}`; unnamed terms get 0."""
        for term in weights:
            if term not in LOSS_TERMS:
                _unknown_term(term)
        return cls(**{f"{term}_weight": weights.get(term, 0.0) for term in LOSS_TERMS}, **options)

    @property
    def needs_distance_maps(self) -> bool:
        """True when the boundary term is ever on, so the data must carry distance maps."""
        return self.boundary_weight > 0 or self.boundary_ramp > 0

    def weights_at(self, epoch: int) -> dict[str, float]:
        """The weight of each term at `epoch` (0-based), after the boundary ramp."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        region_scale = max(self.region_floor, 1.0 - self.boundary_ramp * epoch)
        return {
            "ce": self.ce_weight * region_scale,
            "dice": self.dice_weight * region_scale,
            "focal": self.focal_weight * region_scale,
            "lovasz": self.lovasz_weight * region_scale,
            "boundary": self.boundary_weight + self.boundary_ramp * epoch,
        }


def _unknown_term(term: str) -> None:
    raise ConfigError(
        f"loss.{term}_weight: unknown loss term {term!r} (known: {', '.join(LOSS_TERMS)})"
    )


def _check_scheme(scheme: str) -> None:
    if scheme not in CLASS_WEIGHT_SCHEMES:
        raise ConfigError(
            f"loss.class_weights must be one of {', '.join(CLASS_WEIGHT_SCHEMES)}, got {scheme!r}"
        )


def _check_cap(cap: float) -> None:
    check_number(cap, "loss.class_weight_cap")
    if cap != 0 and cap < 1:
        raise ConfigError(f"loss.class_weight_cap must be >= 1, got {cap!r} (0 turns the cap off)")


def class_weights_from_masks(masks: np.ndarray, scheme: str, cap: float = 0.0) -> torch.Tensor:
    """Per-class weights (NUM_CLASSES,) from the training masks' pixel frequencies.

    `inverse` weighs a class by 1 / frequency, `inverse_sqrt` by 1 / sqrt(frequency) (gentler: big
    rock is ~250x rarer than soil, and full inverse weights make its gradient dominate).
    A `cap` >= 1 is the other way to tame them: no class weighs more than `cap` times the
    lightest scored class (0: no cap; it changes nothing under `none`).
    Weights are normalised to mean 1 over the scored classes, so switching schemes does not also
    change the loss scale. Background gets 0: it is ignored anyway. A class absent from `masks`
    gets the largest weight of the present ones instead of an infinite one.
    """
    _check_scheme(scheme)
    _check_cap(cap)
    weights = np.zeros(NUM_CLASSES, dtype=np.float64)
    if scheme == "none":
        weights[_SCORED] = 1.0
        return torch.from_numpy(weights).float()
    counts = np.bincount(np.asarray(masks).ravel(), minlength=NUM_CLASSES)[_SCORED]
    present = counts > 0
    if not present.any():
        raise ValueError("class_weights_from_masks: the masks contain no scored class (1-4)")
    frequency = counts / counts.sum()
    power = 1.0 if scheme == "inverse" else 0.5
    scored = np.zeros(len(_SCORED))
    scored[present] = frequency[present] ** -power
    scored[~present] = scored[present].max()
    if cap:
        scored = np.minimum(scored, cap * scored.min())
    weights[_SCORED] = scored / scored.mean()
    return torch.from_numpy(weights).float()


def signed_distance_maps(masks: np.ndarray) -> np.ndarray:
    """Signed distance to each scored class's boundary: (N, H, W) labels -> (N, 4, H, W) float32.

    Channel k is class SCORED_CLASSES[k]. As in Kervadec et al. 2019, a pixel outside the class
    holds its distance to the nearest class pixel (> 0), a pixel inside holds minus its distance
    to the nearest outside pixel plus one (<= 0, so 0 on the class's inner boundary). A class
    absent from a mask, or covering all of it, has no boundary and gets zeros. Distances are
    divided by the image diagonal (so |value| <= 1), keeping the boundary term on the scale of
    the region terms.

    One exact EDT (scipy) per label present in a mask gives the distance to that label; the
    distance from inside a class to its outside is the nearest of the other labels' distances.
    That is 5 transforms per mask at most instead of 8. scipy holds the GIL, so callers compute
    maps once per (augmented) mask and cache them with the data rather than on every step.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"signed_distance_maps expects masks (N, H, W), got shape {masks.shape}")
    maps = np.zeros((len(masks), len(_SCORED), *masks.shape[1:]), dtype=np.float32)
    scale = 1.0 / math.hypot(*masks.shape[1:])
    for n, mask in enumerate(masks):
        labels = np.flatnonzero(np.bincount(mask.ravel(), minlength=NUM_CLASSES))
        if len(labels) < 2:
            continue
        distance_to = {label: distance_transform_edt(mask != label) for label in labels}
        for k, cls in enumerate(_SCORED):
            if cls not in distance_to:
                continue
            to_outside = np.minimum.reduce([distance_to[c] for c in labels if c != cls])
            maps[n, k] = np.where(mask == cls, 1.0 - to_outside, distance_to[cls]) * scale
    return maps


def _valid_weights(masks: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """Per-pixel weight: 0 on background, else the class weight of the true label (or 1)."""
    valid = (masks != BACKGROUND).float()
    return valid if class_weights is None else class_weights[masks] * valid


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(values) / sum(weights), and 0 rather than NaN for a batch with no labelled pixel."""
    return values.sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


def masked_cross_entropy(
    logits: torch.Tensor,
    masks: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy over labelled pixels only: torch's `ignore_index` drops background.

    Torch's own reduction is kept (weighted mean over labelled pixels, as `reduction="mean"`),
    except that an all-background batch gives 0 instead of NaN. Label smoothing spreads its mass
    over all five classes; `ignore_index` still zeroes both parts of the loss at background
    pixels, so those pixels get no gradient.
    """
    summed = F.cross_entropy(
        logits.float(),
        masks,
        weight=class_weights,
        ignore_index=BACKGROUND,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return _weighted_mean(summed, _valid_weights(masks, class_weights))


def focal_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    gamma: float = 2.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017), -alpha_t (1 - p_t)^gamma log p_t, labelled pixels.

    Class weights play the role of alpha_t. The modulating factor is clamped away from 0 so that
    a gamma below 1 does not turn a perfectly classified pixel into an infinite gradient.
    """
    nll = F.cross_entropy(logits.float(), masks, ignore_index=BACKGROUND, reduction="none")
    modulation = (-torch.expm1(-nll)).clamp_min(1e-6) ** gamma  # 1 - p_t, computed accurately
    weights = _valid_weights(masks, class_weights)
    return _weighted_mean(modulation * nll * weights, weights)


def _scored_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the scored classes' logits only, (B, 4, H, W).

    Dice and boundary terms are defined on classes 1-4. With a five-way softmax they could park
    probability on background at no cost (background has no target and no distance map), which
    the metric punishes, so these terms never see the background logit; ce and focal still
    push it down at every labelled pixel.
    """
    return logits[:, _SCORED].float().softmax(dim=1)


def soft_dice_loss(
    logits: torch.Tensor, masks: torch.Tensor, generalized: bool = False, smooth: float = 1.0
) -> torch.Tensor:
    """1 - soft Dice over classes 1-4, per class over the whole batch, background pixels masked.

    Plain Dice averages over the classes present in the batch's ground truth. An absent class
    is left to ce/focal: its Dice would be smooth / (sum of leaked probability + smooth), a near
    maximal loss for a tiny leak, which would teach the model never to predict the rare class
    (big rock is absent from most batches); segmentation_models_pytorch does the same.

    `generalized` uses Sudre et al. 2017 weights 1 / (class pixels)^2, normalised to sum to 1.
    An absent class gets the largest weight of the present ones (MONAI's rule), not infinity;
    the ratio of sums keeps its false positives a bounded penalty.
    """
    probs = _scored_probabilities(logits) * (masks != BACKGROUND)[:, None]
    target = F.one_hot(masks, NUM_CLASSES).permute(0, 3, 1, 2)[:, _SCORED].float()
    dims = (0, 2, 3)
    intersection = (probs * target).sum(dims)
    target_sum = target.sum(dims)
    cardinality = probs.sum(dims) + target_sum
    present = target_sum > 0
    if generalized:
        weights = torch.where(present, target_sum.clamp_min(1.0) ** -2, 0.0)
        weights = torch.where(present, weights, weights.max())
        weights = weights / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
        dice = (2 * (weights * intersection).sum() + smooth) / (
            (weights * cardinality).sum() + smooth
        )
        return 1.0 - dice
    dice = (2 * intersection + smooth) / (cardinality + smooth)
    return _weighted_mean((1.0 - dice) * present, present.float())


def boundary_loss(
    logits: torch.Tensor, masks: torch.Tensor, dist_maps: torch.Tensor
) -> torch.Tensor:
    """Boundary loss (Kervadec et al. 2019): mean over labelled pixels of sum_k p_k * phi_k.

    `dist_maps` (B, 4, H, W) come from `signed_distance_maps`. Probability on a class far outside
    its true region costs its distance; probability inside the region earns a reward, so the
    loss is minimal (negative) when predicted regions match the true ones. Background pixels,
    whose true class is unknown, do not count.
    """
    per_pixel = (_scored_probabilities(logits) * dist_maps).sum(dim=1)
    valid = (masks != BACKGROUND).float()
    return _weighted_mean(per_pixel * valid, valid)


def lovasz_softmax_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018): a convex surrogate of 1 - IoU, the metric itself.

    Per class, the pixels' errors |fg - p| are sorted in decreasing order and weighted by the
    Lovász extension's gradient of the Jaccard loss; at hard (0/1) predictions the value is
    exactly 1 - IoU. Like Dice it uses the softmax over classes 1-4 and takes the batch as one
    set of pixels, as the metric pools its IoU over the whole set. Background pixels get error 0,
    which sorts them last where they weigh nothing: the value of leaving them out, without a
    data-dependent shape. Classes absent from the batch's ground truth do not count (Berman's
    `classes='present'`): theirs would be the largest probability leaked anywhere, teaching the
    model never to predict big rock. A batch without any labelled pixel gives 0.
    """
    labelled = (masks != BACKGROUND).flatten()[:, None]
    probs = _scored_probabilities(logits).permute(0, 2, 3, 1).reshape(-1, len(_SCORED))
    fg = F.one_hot(masks.flatten(), NUM_CLASSES)[:, _SCORED].float() * labelled
    errors, order = ((fg - probs).abs() * labelled).sort(dim=0, descending=True)
    per_class = (errors * _lovasz_jaccard_gradient(fg.gather(0, order))).sum(dim=0)
    present = (fg.sum(dim=0) > 0).float()
    return _weighted_mean(per_class * present, present)


def _lovasz_jaccard_gradient(fg_sorted: torch.Tensor) -> torch.Tensor:
    """J(i) - J(i-1) per column, J(i) the Jaccard loss when the first i pixels are wrong.

    Getting a foreground pixel wrong removes it from the intersection, getting a background
    pixel wrong adds it to the union; the union is never empty (it holds the ground truth, or
    the i >= 1 wrong pixels), so there is no division by zero.
    """
    total = fg_sorted.sum(dim=0)
    intersection = total - fg_sorted.cumsum(dim=0)
    union = total + (1.0 - fg_sorted).cumsum(dim=0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


class CombinedLoss(nn.Module):
    """Weighted sum of the terms a `LossConfig` turns on, with the boundary ramp by epoch.

    After each forward, `terms` holds every computed term's unweighted value (detached, still on
    the device, so logging does not force a sync) keyed by its config name.
    """

    def __init__(self, config: LossConfig, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        if config.class_weights != "none" and class_weights is None:
            raise ValueError(
                f"loss.class_weights is {config.class_weights!r}: pass "
                f"class_weights_from_masks(train_masks, {config.class_weights!r}) to CombinedLoss"
            )
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if class_weights.shape != (NUM_CLASSES,) or not torch.isfinite(class_weights).all():
                raise ValueError(
                    f"class_weights must be {NUM_CLASSES} finite values, got {class_weights}"
                )
        self.config = config
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.terms: dict[str, torch.Tensor] = {}

    def forward(
        self,
        logits: torch.Tensor,
        masks: torch.Tensor,
        dist_maps: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> torch.Tensor:
        if self.config.needs_distance_maps and dist_maps is None:
            raise ValueError(
                "the loss config turns the boundary term on (loss.boundary_weight or "
                "loss.boundary_ramp > 0): forward() needs dist_maps from signed_distance_maps"
            )
        weights = self.config.weights_at(epoch)
        self.terms = {}
        total = logits.new_zeros((), dtype=torch.float32)
        for name, weight in weights.items():
            if weight == 0:
                continue
            value = self._term(name, logits, masks, dist_maps)
            self.terms[name] = value.detach()
            total = total + weight * value
        return total

    def _term(
        self,
        name: str,
        logits: torch.Tensor,
        masks: torch.Tensor,
        dist_maps: torch.Tensor | None,
    ) -> torch.Tensor:
        config = self.config
        if name == "ce":
            return masked_cross_entropy(logits, masks, self.class_weights, config.label_smoothing)
        if name == "focal":
            return focal_loss(logits, masks, config.focal_gamma, self.class_weights)
        if name == "dice":
            return soft_dice_loss(logits, masks, generalized=config.generalized_dice)
        if name == "lovasz":
            return lovasz_softmax_loss(logits, masks)
        assert name == "boundary" and dist_maps is not None
        return boundary_loss(logits, masks, dist_maps)
