"""SegNet (Badrinarayanan et al. 2017): a VGG-16-style encoder and a mirrored decoder that
upsamples by max-unpooling with the encoder's pooling indices.

Unpooling puts each value back where its maximum came from, so boundaries are restored from
where the encoder saw them without storing whole feature maps for skips (the paper's point,
and what distinguishes it from U-Net here).
Adaptations to 64x128:
- 4 stages by default instead of VGG-16's 5 (the `depth` knob allows 2-5), since five poolings
  leave a 2x4 map;
- 32 channels at full resolution by default instead of 64 (`base_channels`), still capped at
  VGG's 512;
- dropout after the deepest encoder stage and each decoder stage, as in Bayesian SegNet.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from marsseg.classes import NUM_CLASSES
from marsseg.models.blocks import ConvStack, resize_to
from marsseg.models.registry import register_model
from marsseg.models.unet import BASE_CHANNELS, DEPTH, DROPOUT, level_channels

VGG16_CONVS_PER_STAGE = (2, 2, 3, 3, 3)


@register_model("segnet", knobs=(DEPTH, BASE_CHANNELS, DROPOUT))
class SegNet(nn.Module):
    """`depth` conv stages each followed by 2x2 max pooling; the decoder mirrors them."""

    def __init__(
        self,
        depth: int = DEPTH.default,
        base_channels: int = BASE_CHANNELS.default,
        dropout: float = DROPOUT.default,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        channels = level_channels(base_channels, depth - 1)
        convs = VGG16_CONVS_PER_STAGE[:depth]
        ins = [in_channels, *channels[:-1]]
        self.encoder = nn.ModuleList(
            ConvStack(c_in, c_out, n, dropout=dropout if i == depth - 1 else 0.0)
            for i, (c_in, c_out, n) in enumerate(zip(ins, channels, convs, strict=True))
        )
        # Decoder stage i undoes encoder stage i: from channels[i] back to its input's channels.
        outs = [channels[0], *channels[:-1]]
        self.decoder = nn.ModuleList(
            ConvStack(c_in, c_out, n, dropout=dropout)
            for c_in, c_out, n in zip(channels, outs, convs, strict=True)
        )
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        unpool_args = []
        for stage in self.encoder:
            y = stage(y)
            size = y.shape[-2:]
            y, indices = F.max_pool2d(y, 2, return_indices=True)
            unpool_args.append((indices, size))
        for stage, (indices, size) in zip(
            reversed(self.decoder), reversed(unpool_args), strict=True
        ):
            y = stage(F.max_unpool2d(y, indices, 2, output_size=size))
        return resize_to(self.classifier(y), x.shape[-2:])
