"""Hierarchical U-Net: a chain of U-Nets, coarse to fine, each refining the one before.

Stage 0 segments the image shrunk by `2 ** (stages - 1)` per side, where a small U-Net already
sees the whole horizon and the large terrain regions. Each later stage runs at twice the previous
resolution on the image joined with the previous stage's upsampled logits (and, with
`condition="features"`, its last decoder features too), and predicts a correction that is added
to those logits. The last stage runs at full resolution, so fine boundaries are drawn by a
network that no longer has to find out what the regions are.

Why residual refinement: the sum hands the coarse logits the final loss's gradient unchanged, so
the coarse stage learns a usable segmentation even without a loss of its own.

Deep supervision (`deep_supervision` > 0): in training mode the model also keeps every stage's
logits but the last, upsampled to the input size, in `aux_logits`, and `auxiliary_loss`
turns them into the weighted loss term, which the training loop adds to the main loss for any
model that offers `auxiliary_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from marsseg.classes import NUM_CLASSES
from marsseg.models.blocks import resize_to
from marsseg.models.knobs import Knob
from marsseg.models.registry import register_model
from marsseg.models.unet import DROPOUT, UNet

STAGES = Knob("stages", "int", 2, low=2, high=3, help="U-Nets in the chain, each at 2x the last")
DEPTH = Knob("depth", "int", 3, low=2, high=4, help="2x downsamplings inside each U-Net")
COARSE_CHANNELS = Knob(
    "coarse_channels", "int", 32, low=8, high=64, log=True, help="coarse U-Net's base width"
)
REFINE_CHANNELS = Knob(
    "refine_channels", "int", 16, low=8, high=32, log=True, help="each refinement's base width"
)
CONDITION = Knob(
    "condition",
    "categorical",
    "logits",
    choices=("logits", "features"),
    help="what a refinement sees of the previous stage besides the image",
)
DEEP_SUPERVISION = Knob(
    "deep_supervision",
    "float",
    0.0,
    low=0.0,
    high=1.0,
    help="weight of the coarse stages' own loss (deep supervision)",
)


def stage_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """`size` divided by `factor`, at least one pixel per side."""
    return max(1, round(size[0] / factor)), max(1, round(size[1] / factor))


class StageUNet(UNet):
    """A U-Net that returns its decoder's last features along with its logits."""

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.decoder(self.encoder(x))
        return self.classifier(features), features


@register_model(
    "hunet",
    knobs=(STAGES, DEPTH, COARSE_CHANNELS, REFINE_CHANNELS, CONDITION, DROPOUT, DEEP_SUPERVISION),
)
class HierarchicalUNet(nn.Module):
    """`stages` U-Nets from 1/2^(stages-1) resolution up to full resolution (see module doc).

    The coarse U-Net is wide (`coarse_channels`) because it runs on a small image; refinements
    run on many more pixels and default narrower (`refine_channels`).
    """

    def __init__(
        self,
        stages: int = STAGES.default,
        depth: int = DEPTH.default,
        coarse_channels: int = COARSE_CHANNELS.default,
        refine_channels: int = REFINE_CHANNELS.default,
        condition: str = CONDITION.default,
        dropout: float = DROPOUT.default,
        deep_supervision: float = DEEP_SUPERVISION.default,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.condition = condition
        self.deep_supervision = deep_supervision
        self.aux_logits: list[Tensor] = []
        nets = [StageUNet(depth, coarse_channels, True, dropout, in_channels, num_classes)]
        for _ in range(stages - 1):
            previous = nets[-1].classifier.in_channels if condition == "features" else 0
            extra = num_classes + previous
            nets.append(
                StageUNet(depth, refine_channels, True, dropout, in_channels + extra, num_classes)
            )
        self.stages = nn.ModuleList(nets)

    def forward(self, x: Tensor) -> Tensor:
        size = tuple(x.shape[-2:])
        last = len(self.stages) - 1
        logits, features = self.stages[0].forward_with_features(
            resize_to(x, stage_size(size, 2**last))
        )
        coarse = [logits]
        for i, net in enumerate(self.stages[1:], start=1):
            stage_input = resize_to(x, stage_size(size, 2 ** (last - i)))
            previous = [logits, features] if self.condition == "features" else [logits]
            previous = [resize_to(t, stage_input.shape[-2:]) for t in previous]
            correction, features = net.forward_with_features(torch.cat([stage_input, *previous], 1))
            logits = previous[0] + correction
            coarse.append(logits)
        keep = self.training and self.deep_supervision > 0
        self.aux_logits = [resize_to(t, size) for t in coarse[:-1]] if keep else []
        return resize_to(logits, size)

    def auxiliary_loss(
        self, criterion: Callable[..., Tensor], masks: Tensor, **criterion_kwargs: Any
    ) -> Tensor:
        """`deep_supervision` x the mean of `criterion(logits, masks, **criterion_kwargs)` over the
        coarse stages' logits of the last training-mode forward pass; zero when there are none
        (eval mode, or the knob at 0). The kwargs pass through what the trainer's criterion takes
        besides logits and masks (`dist_maps`, `epoch`)."""
        if not self.aux_logits:
            return masks.new_zeros((), dtype=torch.float32)
        losses = [criterion(t.float(), masks, **criterion_kwargs) for t in self.aux_logits]
        return self.deep_supervision * torch.stack(losses).mean()
