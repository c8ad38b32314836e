"""EfferDeepNet (Wei, Wei and Zhang 2023, "EfferDeepNet: An Efficient Semantic Segmentation Method
for Outdoor Terrain", Machines 11(2), 256), rebuilt from scratch for 64x128 grayscale images.

What the paper specifies, and where it lives here:
- depthwise separable convolutions whose depthwise stage uses **kernels of different sizes**
  (`MixedDepthwiseConv` inside `EfferBlock`), to see terrain texture at several scales at once;
- an **attention mechanism** that reweights the features (`SqueezeExcite`);
- **ghost modules** to cut redundant feature maps and parameters (`GhostModule`, in place of the
  blocks' 1x1 convolutions);
- an **enhanced feature extraction network** after the encoder, for sharper region boundaries
  (`EnhancedDecoder`).

What this implementation chose where the paper leaves a detail open (only the paper's abstract
was at hand, so every layout detail below is a choice), for 64x128 images:
- the encoder is EfficientNet-B0's stage table (widths, expansion ratios, repeats) of MBConv
  blocks, scaled by `width` and `depth` as EfficientNet scales it; the first stride is 2, as in B0;
- the mixed kernels are the first `kernel_sizes` of (3, 5, 7) with the channels split evenly
  between them, as in MixNet (Tan and Le 2019);
- the attention is EfficientNet's squeeze-and-excitation (ratio 0.25 of the block's input);
- ReLU instead of EfficientNet's Swish outside the attention, as in GhostNet, so every block
  reuses `ConvBNReLU`;
- the encoder stops striding at `output_stride` (8 by default, so the deep map of a 64x128 image
  is 8x16, not B0's 2x4) and dilates later blocks instead, as DeepLab does;
- the enhanced feature extraction network is DeepLabV3+'s: an atrous pyramid
  on the deep features, then a decoder joining shallower encoder features; it joins two shallow
  levels (H/4, then H/2) rather than DeepLabV3+'s one (H/4), because at 64x128 the H/4 map is
  16x32, on which a big rock a few pixels wide is a single cell.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from marsseg.classes import NUM_CLASSES
from marsseg.models.blocks import (
    ConvBNReLU,
    ConvStack,
    SpatialPyramid,
    cat_resized,
    resize_to,
    scale_channels,
)
from marsseg.models.knobs import Knob
from marsseg.models.registry import register_model
from marsseg.models.xception import OUTPUT_STRIDE, deep_rates

MIXED_KERNEL_SIZES = (3, 5, 7)
SE_RATIO = 0.25
"""Squeeze-and-excitation bottleneck width as a fraction of the block's input channels (B0's)."""
STEM_CHANNELS = 32


class Stage(NamedTuple):
    """One row of EfficientNet-B0's stage table (the kernel column is replaced by mixed kernels)."""

    expand: int
    channels: int
    repeats: int
    stride: int


B0_STAGES = (
    Stage(1, 16, 1, 1),  # H/2: the `shallow` tap
    Stage(6, 24, 2, 2),  # H/4: the `low` tap
    Stage(6, 40, 2, 2),  # H/8
    Stage(6, 80, 3, 2),  # H/16 (dilated at output stride 8)
    Stage(6, 112, 3, 1),
    Stage(6, 192, 4, 2),  # H/32 in B0; always dilated here
    Stage(6, 320, 1, 1),
)
SHALLOW_STAGE, LOW_STAGE = 0, 1

WIDTH = Knob("width", "float", 0.5, low=0.25, high=1.0, help="channel multiplier of B0's widths")
DEPTH = Knob("depth", "float", 0.75, low=0.5, high=1.0, help="block multiplier of B0's repeats")
KERNEL_SIZES = Knob(
    "kernel_sizes",
    "int",
    2,
    low=1,
    high=3,
    help="depthwise kernel sizes mixed per block: the first n of 3, 5, 7",
)
ATTENTION = Knob("attention", "bool", True, help="squeeze-and-excitation in every block")
GHOST = Knob("ghost", "bool", True, help="ghost modules instead of 1x1 convs in the blocks")
DECODER_CHANNELS = Knob(
    "decoder_channels", "int", 64, low=32, high=128, step=32, help="ASPP/decoder width"
)
DROPOUT = Knob("dropout", "float", 0.1, low=0.0, high=0.5, help="dropout after ASPP and decoder")


class GhostModule(nn.Module):
    """Ghost module (Han et al. 2020, GhostNet): half the output channels come from a 1x1 conv,
    the other half from a cheap 3x3 depthwise conv on that half ("ghosts" of the first).

    Feature maps of trained CNNs come in near-duplicate pairs; computing one of each pair by a
    depthwise conv halves the 1x1 conv's parameters and FLOPs for nearly the same features.
    """

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True) -> None:
        super().__init__()
        primary = math.ceil(out_channels / 2)
        self.out_channels = out_channels
        self.primary = ConvBNReLU(in_channels, primary, 1, relu=relu)
        self.cheap = ConvBNReLU(primary, primary, 3, groups=primary, relu=relu)

    def forward(self, x: Tensor) -> Tensor:
        intrinsic = self.primary(x)
        return torch.cat([intrinsic, self.cheap(intrinsic)], dim=1)[:, : self.out_channels]


class MixedDepthwiseConv(nn.Module):
    """A depthwise conv whose channels are split into groups, each with its own kernel size
    (MixConv, Tan and Le 2019): one layer sees both fine grain and coarse texture."""

    def __init__(
        self, channels: int, kernel_sizes: tuple[int, ...], stride: int, dilation: int
    ) -> None:
        super().__init__()
        base, extra = divmod(channels, len(kernel_sizes))
        self.splits = [base + (i < extra) for i in range(len(kernel_sizes))]
        # BatchNorm is per channel, so one BN per group is the same as one BN after the concat.
        self.groups = nn.ModuleList(
            ConvBNReLU(c, c, k, stride=stride, dilation=dilation, groups=c)
            for c, k in zip(self.splits, kernel_sizes, strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.split(x, self.splits, dim=1)
        return torch.cat([conv(part) for conv, part in zip(self.groups, parts, strict=True)], 1)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): a weight per channel from the pooled features, so
    the block can stress the channels that matter for the image at hand.

    Swish in the bottleneck, as in EfficientNet: at the narrow widths a search tries, the bottleneck
    has 2-4 units, and ReLU could switch all of them off for a whole batch.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.SiLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


def pointwise(in_channels: int, out_channels: int, relu: bool, ghost: bool) -> nn.Module:
    """The block's 1x1 projection: a ghost module or a plain 1x1 conv-BN(-ReLU)."""
    if ghost:
        return GhostModule(in_channels, out_channels, relu)
    return ConvBNReLU(in_channels, out_channels, 1, relu=relu)


class EfferBlock(nn.Module):
    """MBConv with EfferDeepNet's three changes: 1x1 expansion -> mixed-kernel depthwise conv ->
    attention -> 1x1 projection (no ReLU, a linear bottleneck), residual when shapes allow."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand: int,
        stride: int,
        dilation: int,
        kernel_sizes: tuple[int, ...],
        attention: bool,
        ghost: bool,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(pointwise(in_channels, hidden, relu=True, ghost=ghost))
        layers.append(MixedDepthwiseConv(hidden, kernel_sizes, stride, dilation))
        if attention:
            layers.append(SqueezeExcite(hidden, max(1, int(in_channels * SE_RATIO))))
        layers.append(pointwise(hidden, out_channels, relu=False, ghost=ghost))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class EfferEncoder(nn.Module):
    """Stem -> the seven B0 stages; returns the H/2 and H/4 stage outputs and the deep features.

    Once the running stride reaches `output_stride`, a stage that would stride keeps its stride 1
    and doubles the dilation of every later block instead (DeepLab's rule), so the deep map keeps
    the resolution small rocks need.
    """

    def __init__(
        self,
        in_channels: int,
        width: float,
        depth: float,
        kernel_sizes: tuple[int, ...],
        attention: bool,
        ghost: bool,
        output_stride: int,
    ) -> None:
        super().__init__()
        c_in = scale_channels(STEM_CHANNELS, width)
        self.stem = ConvBNReLU(in_channels, c_in, 3, stride=2)
        stride, dilation = 2, 1
        stages = []
        for stage in B0_STAGES:
            c_out = scale_channels(stage.channels, width)
            first_stride = stage.stride
            if stride * stage.stride > output_stride:
                first_stride, dilation = 1, dilation * stage.stride
            stride *= first_stride
            blocks = [
                EfferBlock(
                    c_in if i == 0 else c_out,
                    c_out,
                    stage.expand,
                    first_stride if i == 0 else 1,
                    dilation,
                    kernel_sizes,
                    attention,
                    ghost,
                )
                for i in range(math.ceil(stage.repeats * depth))
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        widths = [scale_channels(stage.channels, width) for stage in B0_STAGES]
        self.channels = (widths[SHALLOW_STAGE], widths[LOW_STAGE], widths[-1])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outputs = []
        y = self.stem(x)
        for stage in self.stages:
            y = stage(y)
            outputs.append(y)
        return outputs[SHALLOW_STAGE], outputs[LOW_STAGE], y


class EnhancedDecoder(nn.Module):
    """The "enhanced feature extraction network": ASPP on the deep features, then two fusion
    steps, each upsampling the running features to a shallower tap (H/4, then H/2), joining that
    tap projected by a 1x1 conv, and convolving.

    DeepLabV3+ joins one tap at H/4; the second, at H/2, is this implementation's choice for
    64x128 boundaries (see the module docstring).
    """

    def __init__(
        self,
        channels: tuple[int, int, int],
        decoder_channels: int,
        output_stride: int,
        dropout: float,
    ) -> None:
        super().__init__()
        shallow, low, deep = channels
        self.aspp = SpatialPyramid(
            deep,
            decoder_channels,
            deep_rates(output_stride),
            pointwise=True,
            image_pooling=True,
            dropout=dropout,
        )
        skip = max(8, decoder_channels // 4)  # DeepLabV3+: 48 low-level channels for 256
        self.project = nn.ModuleList(ConvBNReLU(c, skip, 1) for c in (low, shallow))
        self.fuse = nn.ModuleList(
            ConvStack(decoder_channels + skip, decoder_channels, num_convs, dropout=dropout)
            for num_convs in (2, 1)
        )

    def forward(self, shallow: Tensor, low: Tensor, deep: Tensor) -> Tensor:
        y = self.aspp(deep)
        for project, fuse, tap in zip(self.project, self.fuse, (low, shallow), strict=True):
            y = fuse(cat_resized([y, project(tap)], tap.shape[-2:]))
        return y


@register_model(
    "efferdeepnet",
    knobs=(
        WIDTH,
        DEPTH,
        KERNEL_SIZES,
        ATTENTION,
        GHOST,
        OUTPUT_STRIDE,
        DECODER_CHANNELS,
        DROPOUT,
    ),
)
class EfferDeepNet(nn.Module):
    """`EfferEncoder` -> `EnhancedDecoder` (output at H/2) -> 1x1 classifier -> input size.

    Defaults (width 0.5, depth 0.75, kernels 3 and 5) keep it the lightest network of the
    registry, in the spirit of the paper's goal of real-time terrain recognition on a robot.
    """

    def __init__(
        self,
        width: float = WIDTH.default,
        depth: float = DEPTH.default,
        kernel_sizes: int = KERNEL_SIZES.default,
        attention: bool = ATTENTION.default,
        ghost: bool = GHOST.default,
        output_stride: int = OUTPUT_STRIDE.default,
        decoder_channels: int = DECODER_CHANNELS.default,
        dropout: float = DROPOUT.default,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        kernels = MIXED_KERNEL_SIZES[:kernel_sizes]
        self.encoder = EfferEncoder(
            in_channels, width, depth, kernels, attention, ghost, output_stride
        )
        self.decoder = EnhancedDecoder(
            self.encoder.channels, decoder_channels, output_stride, dropout
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.decoder(*self.encoder(x))
        return resize_to(self.classifier(features), x.shape[-2:])
