"""Building blocks shared by the architectures, each written once (as in smp's `base` modules).

Conventions: convolutions followed by BatchNorm carry no bias (the norm's shift replaces it), and
every block keeps its input's spatial size unless it is given a stride, so the models never
hard-code 64x128 and also run at the 32x64 and 96x192 scales a multi-scale wrapper feeds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """`channels * width` rounded to a multiple of `divisor` (and at least `divisor`).

    Multiples of 8 keep the width multiplier from producing odd channel counts that vectorise
    poorly on CPUs and tensor cores.
    """
    return max(divisor, int(channels * width + divisor / 2) // divisor * divisor)


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of `x` to spatial `size`; a no-op when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def cat_resized(tensors: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """Resize every tensor to `size` and concatenate them along channels: a decoder's skip join."""
    return torch.cat([resize_to(t, size) for t in tensors], dim=1)


class ConvBNReLU(nn.Sequential):
    """Conv -> BatchNorm -> ReLU with 'same' padding for any (possibly rectangular) kernel."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        batch_norm: bool = True,
        relu: bool = True,
    ) -> None:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                (kh, kw),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=not batch_norm,
            )
        ]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 conv-BN-ReLU then pointwise 1x1 conv-BN-ReLU.

    The BN and ReLU after the depthwise conv are the "aligned Xception" change DeepLabV3+ made to
    Chollet's separable convolution (Chen et al. 2018, sec. 3.2).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__(
            ConvBNReLU(in_channels, in_channels, 3, stride, dilation, groups=in_channels),
            ConvBNReLU(in_channels, out_channels, 1),
        )


class ConvStack(nn.Sequential):
    """`num_convs` 3x3 conv-(BN)-ReLU layers, then dropout.

    The stage of U-Net, U-Net++ and SegNet, and each step of the MarsSeg and DeepLab decoders.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_convs: int = 2,
        batch_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = [
            ConvBNReLU(in_channels if i == 0 else out_channels, out_channels, batch_norm=batch_norm)
            for i in range(num_convs)
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv-BN-ReLU -> broadcast back: ASPP's image-level branch."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.project(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, *x.shape[-2:])


class StripPooling(nn.Module):
    """Strip pooling (Hou et al. 2020, "Strip Pooling", the SPM module).

    Averaging whole rows (1 x W) and whole columns (H x 1) gives each pixel context along long,
    thin structures (a horizon, a band of sand) that a square pooling window mixes with clutter.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = max(in_channels // 4, 8)
        self.reduce = ConvBNReLU(in_channels, mid, 1)
        self.along_width = ConvBNReLU(mid, mid, (1, 3), relu=False)
        self.along_height = ConvBNReLU(mid, mid, (3, 1), relu=False)
        self.fuse = nn.Sequential(ConvBNReLU(mid, mid, 3), ConvBNReLU(mid, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        size = x.shape[-2:]
        rows = self.along_width(F.adaptive_avg_pool2d(x, (1, None))).expand(-1, -1, *size)
        cols = self.along_height(F.adaptive_avg_pool2d(x, (None, 1))).expand(-1, -1, *size)
        return self.fuse(F.relu(rows + cols))


class SpatialPyramid(nn.Module):
    """Parallel branches over one input, concatenated, then a 1x1 conv-BN-ReLU projection.

    This is the common skeleton of DeepLab's ASPP and of MarsSeg's Mini-ASPP and SPPM; they differ
    only in which branches they hold:
    - one 3x3 conv-BN-ReLU per entry of `rates` (its dilation), always;
    - `pointwise`: a 1x1 conv-BN-ReLU branch;
    - `image_pooling`: an `ImagePooling` branch;
    - `strip_pooling`: a `StripPooling` branch.
    Every branch outputs `out_channels`, as in DeepLab.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int],
        pointwise: bool = False,
        image_pooling: bool = False,
        strip_pooling: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [ConvBNReLU(in_channels, out_channels, 1)] if pointwise else []
        branches += [ConvBNReLU(in_channels, out_channels, 3, dilation=r) for r in rates]
        if image_pooling:
            branches.append(ImagePooling(in_channels, out_channels))
        if strip_pooling:
            branches.append(StripPooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        project: list[nn.Module] = [ConvBNReLU(len(branches) * out_channels, out_channels, 1)]
        if dropout > 0:
            project.append(nn.Dropout(dropout))
        self.project = nn.Sequential(*project)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class PolarizedSelfAttention(nn.Module):
    """Parallel Polarized Self-Attention, PSA_p (Liu et al. 2021).

    Two branches reweight `x`, and their outputs are summed:
    - channel-only: a softmax over all pixels pools `Wv(x)` (C/2 channels) into one descriptor,
      `Wz` lifts it back to C, LayerNorm + sigmoid give a weight per channel;
    - spatial-only: a softmax over the C/2 channels of the globally pooled `Wq(x)` mixes `Wv(x)`
      into one map, sigmoid gives a weight per pixel.
    "Polarized": each branch collapses one dimension entirely while keeping the other at full
    resolution, which is why it suits dense prediction. The channel query has no bias: a constant
    added before a softmax over pixels would not change anything and would never get a gradient.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.channel_v = nn.Conv2d(channels, half, 1)
        self.channel_q = nn.Conv2d(channels, 1, 1, bias=False)
        self.channel_z = nn.Conv2d(half, channels, 1)
        self.channel_norm = nn.LayerNorm(channels)
        self.spatial_v = nn.Conv2d(channels, half, 1)
        self.spatial_q = nn.Conv2d(channels, half, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        value = self.channel_v(x).flatten(2)  # (B, C/2, HW)
        query = self.channel_q(x).flatten(2).softmax(dim=-1)  # (B, 1, HW)
        pooled = (value @ query.transpose(1, 2)).unsqueeze(-1)  # (B, C/2, 1, 1)
        channel_logits = self.channel_norm(self.channel_z(pooled).flatten(1))  # (B, C)
        channel_out = x * channel_logits.sigmoid().view(b, c, 1, 1)

        value = self.spatial_v(x).flatten(2)  # (B, C/2, HW)
        query = F.adaptive_avg_pool2d(self.spatial_q(x), 1).flatten(1).softmax(dim=-1)  # (B, C/2)
        spatial_logits = (query.unsqueeze(1) @ value).view(b, 1, h, w)
        spatial_out = x * spatial_logits.sigmoid()
        return channel_out + spatial_out
