"""MarsSeg (Li et al. 2024, "MarsSeg: Mars Surface Semantic Segmentation with Multi-level
Extractor and Connector", arXiv 2404.04155), adapted to 64x128 grayscale images.

The paper's blocks and where they live here:
- **encoder** ("multi-level extractor"): `AlignedXception` (`xception.py`), tapped at f1 (H/2),
  f2 (H/4), f3 (H/8, a middle-flow output) and deep (H/8) at output stride 8;
- **Mini-ASPP** on f1, f2 and f3: `SpatialPyramid` with three dilated 3x3 branches (1, 2r, 4r);
- **PSA** after each Mini-ASPP and after the SPPM: `PolarizedSelfAttention` (parallel PSA);
- **SPPM** on the deep features: `SpatialPyramid` with a 1x1, three dilated 3x3, an image-pooling
  and a strip-pooling branch;
- **connector** (decoder): `Connector`, progressive fusion deep -> f3 -> f2 -> f1;
- **head**: 1x1 conv to classes at H/2, 4x4 stride-2 transposed conv-BN-ReLU, 3x3 conv.

Adaptations to 64x128 (each also noted where it is made):
- channel counts scale with `width` (encoder) and `decoder_channels` (SPPM, connector, and the
  Mini-ASPP outputs, which keep the paper's 48:32:24 ratio to its 256 decoder channels);
- Mini-ASPP rates are (1, 2, 4) at both output strides instead of (1, 2r, 4r) with r = 2 at
  output stride 8: the paper's images are about 8x larger, and r = 2 would give f3's widest
  branch a dilation of 8 on an 8-row map, i.e. a 3x3 conv whose vertical taps are all padding;
- SPPM rates are (2, 4, 6) at output stride 8 and (1, 2, 3) at 16, instead of DeepLab's
  (6, 12, 18) x r, which on an 8x16 map would see almost nothing but padding.
"""

from __future__ import annotations

from torch import Tensor, nn

from marsseg.classes import NUM_CLASSES
from marsseg.models.blocks import (
    ConvStack,
    PolarizedSelfAttention,
    SpatialPyramid,
    cat_resized,
    resize_to,
    scale_channels,
)
from marsseg.models.knobs import Knob
from marsseg.models.registry import register_model
from marsseg.models.xception import (
    MIDDLE_BLOCKS,
    OUTPUT_STRIDE,
    WIDTH,
    XCEPTION_KNOBS,
    AlignedXception,
    Taps,
    deep_rates,
)

MINI_ASPP_RATES = (1, 2, 4)
PAPER_DECODER_CHANNELS = 256
PAPER_BRANCH_CHANNELS = Taps(f1=48, f2=32, f3=24, deep=PAPER_DECODER_CHANNELS)


def _with_psa(block: nn.Module, channels: int, psa: bool) -> nn.Module:
    return nn.Sequential(block, PolarizedSelfAttention(channels)) if psa else block


class Connector(nn.Module):
    """The paper's connector: fuse deep -> f3 -> f2 -> f1, upsampling bilinearly between steps.

    Each step concatenates the running features with the next (Mini-ASPP + PSA) branch and applies
    a 3x3 conv-BN-ReLU and dropout (0.4 in the paper); the last step adds one more 3x3 conv with
    half that dropout (0.2 in the paper). The output is at f1's resolution, H/2.
    """

    def __init__(self, branch_channels: Taps[int], channels: int, dropout: float) -> None:
        super().__init__()
        self.fuse_f3 = ConvStack(channels + branch_channels.f3, channels, 1, dropout=dropout)
        self.fuse_f2 = ConvStack(channels + branch_channels.f2, channels, 1, dropout=dropout)
        self.fuse_f1 = nn.Sequential(
            ConvStack(channels + branch_channels.f1, channels, 1, dropout=dropout),
            ConvStack(channels, channels, 1, dropout=dropout / 2),
        )

    def forward(self, branches: Taps[Tensor]) -> Tensor:
        x = branches.deep
        for fuse, skip in (
            (self.fuse_f3, branches.f3),
            (self.fuse_f2, branches.f2),
            (self.fuse_f1, branches.f1),
        ):
            x = fuse(cat_resized([x, skip], skip.shape[-2:]))
        return x


@register_model(
    "marsseg",
    knobs=(
        *XCEPTION_KNOBS,
        Knob("decoder_channels", "int", 96, low=32, high=256, step=32, help="SPPM/connector width"),
        Knob("dropout", "float", 0.4, low=0.0, high=0.5, help="connector dropout (paper: 0.4)"),
        Knob("psa", "bool", True, help="polarized self-attention after Mini-ASPPs and SPPM"),
    ),
)
class MarsSeg(nn.Module):
    """Encoder -> Mini-ASPP + PSA (f1, f2, f3) and SPPM + PSA (deep) -> connector -> head.

    The defaults (width 0.25, 4 middle blocks, 96 decoder channels) give about 3.5M parameters:
    the paper's full-width model has tens of millions, far more than ~2.5k 64x128 images support.
    """

    def __init__(
        self,
        width: float = WIDTH.default,
        middle_blocks: int = MIDDLE_BLOCKS.default,
        output_stride: int = OUTPUT_STRIDE.default,
        decoder_channels: int = 96,
        dropout: float = 0.4,
        psa: bool = True,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.encoder = AlignedXception(in_channels, width, middle_blocks, output_stride)
        ratio = decoder_channels / PAPER_DECODER_CHANNELS
        branch = Taps(*(scale_channels(c, ratio) for c in PAPER_BRANCH_CHANNELS))
        tap = self.encoder.channels
        self.mini_aspp = nn.ModuleList(
            _with_psa(SpatialPyramid(tap_c, out_c, MINI_ASPP_RATES), out_c, psa)
            for tap_c, out_c in zip(tap[:3], branch[:3], strict=True)
        )
        sppm = SpatialPyramid(
            tap.deep,
            decoder_channels,
            deep_rates(output_stride),
            pointwise=True,
            image_pooling=True,
            strip_pooling=True,
        )
        self.sppm = _with_psa(sppm, decoder_channels, psa)
        self.connector = Connector(branch, decoder_channels, dropout)
        self.head = nn.Sequential(
            nn.Conv2d(decoder_channels, num_classes, 1),
            nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(num_classes),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_classes, num_classes, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        taps = self.encoder(x)
        shallow = [block(t) for block, t in zip(self.mini_aspp, taps[:3], strict=True)]
        fused = self.connector(Taps(*shallow, deep=self.sppm(taps.deep)))
        return resize_to(self.head(fused), x.shape[-2:])
