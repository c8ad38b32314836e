"""Hierarchical multi-scale attention (Tao, Sapra and Catanzaro 2020, arXiv 2005.10821) around
any light registered network.

The base network segments the image at several scales; an attention head predicts, per pixel and
per scale, how much to trust that scale's prediction against the next larger scale's. Scales are
fused pairwise from the largest down (the paper's hierarchy):

    fused = attention_s * logits_s + (1 - attention_s) * fused        (s: the smaller scale)

so the head only ever learns a *relative* weight between adjacent scales. That is what lets it
train on one pair (0.5 and 1.0, as in the paper) and infer with any chain of scales, e.g.
0.5, 1.0, 1.5, without retraining. Coarse scales tend to win on large ambiguous regions (sand
against soil), fine scales on thin structures (rock edges); the head learns where.

Adaptations:
- the paper's attention head reads the trunk's last features; a wrapper around any registered
  model only gets its logits, so the head reads the logits and the image at that scale (through
  two 3x3 conv-BN-ReLU layers and a 1x1 conv to one channel, the paper's head shape);
- every scale's logits and attention are resized to the input size before fusing (the paper fuses
  at the resolution of scale 1.0, which is the input size here);
- the base is built at its default knobs: the base's own knobs would double the search space and
  be sampled even when another base is drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from marsseg.classes import NUM_CLASSES
from marsseg.models.blocks import ConvStack, resize_to
from marsseg.models.knobs import Knob
from marsseg.models.registry import build_model, register_model

BASES = ("segnet", "efferdeepnet", "unet", "deeplabv3plus", "segformer", "marsseg")
"""Architectures `hmsa` can wrap. Left out: `hmsa` itself, `hunet` (already a coarse-to-fine
chain, and wrapping it runs every one of its U-Nets at every scale) and `unetpp` (its nested
decoder is the most FLOP-heavy per pixel, and inference at 1.5x and 2x multiplies that by 2.25
and 4). The first, SegNet, is the quickest to train on a CPU; the default, EfferDeepNet, has the
fewest FLOPs, which matters most here: three inference scales cost 3.5 forward passes."""

SCALE_SETS = ("1.0", "0.5,1.0", "0.5,1.0,1.5", "0.5,1.0,2.0", "0.5,1.0,1.5,2.0")
"""Inference scale sets, as strings so that Optuna's storage and YAML configs keep them exactly.
"1.0" alone is single-scale inference: it lets the search find out whether more scales help."""


def parse_scales(text: str) -> tuple[float, ...]:
    """The scales in `text` ("0.5,1.0,1.5"), largest first: the order they are fused in."""
    scales = sorted({float(part) for part in text.split(",")}, reverse=True)
    if not scales or scales[-1] <= 0:
        raise ValueError(f"scales must be positive numbers separated by commas, got {text!r}")
    return tuple(scales)


TRAIN_SCALES = parse_scales("0.5,1.0")
"""The paper trains on one adjacent pair of scales; inference chains as many as it is given."""


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """`size` times `scale`, rounded, at least 8 pixels per side (a base downsamples 2-4 times)."""
    return max(8, round(size[0] * scale)), max(8, round(size[1] * scale))


BASE = Knob("base", "categorical", "efferdeepnet", choices=BASES, help="the wrapped architecture")
SCALES = Knob(
    "scales",
    "categorical",
    "0.5,1.0,1.5",
    choices=SCALE_SETS,
    help="inference scales (training always uses 0.5 and 1.0)",
)
ATTENTION_CHANNELS = Knob(
    "attention_channels", "int", 32, low=8, high=64, log=True, help="width of the attention head"
)


@register_model("hmsa", knobs=(BASE, SCALES, ATTENTION_CHANNELS))
class HierarchicalMultiScaleAttention(nn.Module):
    """A registered `base` network run at several scales, fused by a learned attention head."""

    def __init__(
        self,
        base: str = BASE.default,
        scales: str = SCALES.default,
        attention_channels: int = ATTENTION_CHANNELS.default,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.base = build_model(base)
        self.inference_scales = parse_scales(scales)
        self.attention = nn.Sequential(
            ConvStack(in_channels + num_classes, attention_channels),
            nn.Conv2d(attention_channels, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(x, TRAIN_SCALES if self.training else self.inference_scales)

    def fuse(self, x: Tensor, scales: tuple[float, ...]) -> Tensor:
        """Logits at `x`'s size from the base at each of `scales` (largest first)."""
        size = tuple(x.shape[-2:])
        fused = None
        for scale in scales:
            image = resize_to(x, scaled_size(size, scale))
            logits = self.base(image)
            if fused is None:  # the largest scale: its attention would have nothing to weigh
                fused = resize_to(logits, size)
                continue
            attention = self.attention(torch.cat([image, logits], dim=1))
            attention = resize_to(attention, size)
            fused = attention * resize_to(logits, size) + (1 - attention) * fused
        return fused
