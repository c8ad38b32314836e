"""Aligned Xception encoder (Chen et al. 2018, DeepLabV3+), shared by MarsSeg and DeepLabV3+.

MarsSeg's "multi-level extractor" is this backbone with four taps. Adaptations to 64x128 inputs
and ~2.5k training images, all exposed as knobs:
- 1 input channel (the rover images are grayscale);
- every channel count is scaled by `width` (the full 2048-channel network has ~40M parameters and
  would memorise the training set);
- `middle_blocks` repeats of the middle flow instead of 16: at output stride 8 the middle flow
  runs on an 8x16 map, whose receptive field a handful of dilated blocks already covers.
"""

from __future__ import annotations

from typing import Generic, NamedTuple, TypeVar

from torch import Tensor, nn

from marsseg.models.blocks import ConvBNReLU, SeparableConv, scale_channels
from marsseg.models.knobs import Knob

T = TypeVar("T")

WIDTH = Knob(
    "width", "float", 0.25, low=0.125, high=0.5, help="channel multiplier of the Xception encoder"
)
MIDDLE_BLOCKS = Knob(
    "middle_blocks", "int", 4, low=1, high=8, help="middle-flow blocks (16 in Xception-65)"
)
OUTPUT_STRIDE = Knob(
    "output_stride", "categorical", 8, choices=(8, 16), help="input size / deep-feature size"
)
XCEPTION_KNOBS = (WIDTH, MIDDLE_BLOCKS, OUTPUT_STRIDE)


def deep_rates(output_stride: int) -> tuple[int, ...]:
    """Dilation rates for a pyramid (ASPP, SPPM) on the deep map: (2, 4, 6) at output stride 8,
    (1, 2, 3) at 16.

    DeepLab's (6, 12, 18) at output stride 16 suit 513x513 crops, whose deep map is 33x33. A
    64x128 image's deep map is 8x16 (4x8 at stride 16), where those rates would leave each 3x3
    branch a 1x1 conv surrounded by padding. As in DeepLab, the rates double at output stride 8.
    """
    return tuple(rate * 16 // output_stride for rate in (1, 2, 3))


class Taps(NamedTuple, Generic[T]):
    """The encoder's four outputs (or their channel counts), shallow to deep.

    At output stride 8: f1 at H/2, f2 at H/4, f3 and deep at H/8 (32x64, 16x32, 8x16 and 8x16 for
    a 64x128 image). At output stride 16, f3 and deep are at H/16.
    """

    f1: T
    f2: T
    f3: T
    deep: T


class XceptionBlock(nn.Module):
    """Three separable convs plus a residual connection; only the last conv may stride.

    `forward_with_tap` also returns the features before that last conv: MarsSeg taps f1 and f2
    there, so the shallow features keep the resolution they had before the block downsamples.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            SeparableConv(in_channels, out_channels, dilation=dilation),
            SeparableConv(out_channels, out_channels, dilation=dilation),
        )
        self.last = SeparableConv(out_channels, out_channels, stride=stride, dilation=dilation)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels and stride == 1
            else ConvBNReLU(in_channels, out_channels, 1, stride=stride, relu=False)
        )

    def forward_with_tap(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tap = self.body(x)
        return self.last(tap) + self.skip(x), tap

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_tap(x)[0]


class AlignedXception(nn.Module):
    """Stem -> entry flow (3 blocks) -> middle flow (dilated) -> exit flow, returning `Taps`.

    Output stride 8 follows DeepLab: entry block 3 does not stride, the middle flow uses dilation 2
    and the exit flow dilations 2 and 4, so the deep map of a 64x128 image is 8x16. Output stride
    16 strides in entry block 3 and halves those dilations.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: float = WIDTH.default,
        middle_blocks: int = MIDDLE_BLOCKS.default,
        output_stride: int = OUTPUT_STRIDE.default,
    ) -> None:
        super().__init__()
        c = {n: scale_channels(n, width) for n in (32, 64, 128, 256, 728, 1024, 1536, 2048)}
        entry3_stride, middle_dilation, exit_dilations = (
            (1, 2, (2, 4)) if output_stride == 8 else (2, 1, (1, 2))
        )
        self.stem = nn.Sequential(
            ConvBNReLU(in_channels, c[32], 3, stride=2), ConvBNReLU(c[32], c[64], 3)
        )
        self.entry1 = XceptionBlock(c[64], c[128], stride=2)
        self.entry2 = XceptionBlock(c[128], c[256], stride=2)
        self.entry3 = XceptionBlock(c[256], c[728], stride=entry3_stride)
        self.middle = nn.Sequential(
            *(XceptionBlock(c[728], c[728], dilation=middle_dilation) for _ in range(middle_blocks))
        )
        self.exit_block = XceptionBlock(c[728], c[1024], dilation=exit_dilations[0])
        self.exit_convs = nn.Sequential(
            SeparableConv(c[1024], c[1536], dilation=exit_dilations[1]),
            SeparableConv(c[1536], c[1536], dilation=exit_dilations[1]),
            SeparableConv(c[1536], c[2048], dilation=exit_dilations[1]),
        )
        self.channels = Taps(f1=c[128], f2=c[256], f3=c[728], deep=c[2048])

    def forward(self, x: Tensor) -> Taps[Tensor]:
        x, f1 = self.entry1.forward_with_tap(self.stem(x))
        x, f2 = self.entry2.forward_with_tap(x)
        f3 = self.middle(self.entry3(x))
        deep = self.exit_convs(self.exit_block(f3))
        return Taps(f1, f2, f3, deep)
