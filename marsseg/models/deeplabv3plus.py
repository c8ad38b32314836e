"""DeepLabV3+ (Chen et al. 2018) on the aligned Xception encoder, sized for 64x128 images.

Same encoder as MarsSeg (`xception.py`), so the comparison isolates what MarsSeg changes: its
Mini-ASPP/PSA branches, SPPM and connector against DeepLab's ASPP and two-level decoder.
Adaptations to 64x128:
- ASPP rates (2, 4, 6) at output stride 8 and (1, 2, 3) at 16, not (12, 24, 36) / (6, 12, 18):
  the deep map is 8x16 (or 4x8), so DeepLab's rates would make every 3x3 branch a 1x1 conv
  surrounded by padding;
- the decoder joins the H/4 tap (`f2`) as in the paper, with 48 low-level channels scaled by
  `decoder_channels / 256`.
"""

from __future__ import annotations

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
from marsseg.models.xception import (
    MIDDLE_BLOCKS,
    OUTPUT_STRIDE,
    WIDTH,
    XCEPTION_KNOBS,
    AlignedXception,
    deep_rates,
)

PAPER_DECODER_CHANNELS = 256
PAPER_LOW_LEVEL_CHANNELS = 48


@register_model(
    "deeplabv3plus",
    knobs=(
        *XCEPTION_KNOBS,
        Knob("decoder_channels", "int", 128, low=32, high=256, step=32, help="ASPP/decoder width"),
        Knob("dropout", "float", 0.1, low=0.0, high=0.5, help="dropout after ASPP and decoder"),
    ),
)
class DeepLabV3Plus(nn.Module):
    """Encoder -> ASPP on the deep features -> upsample to H/4, join f2 -> two 3x3 convs -> 1x1."""

    def __init__(
        self,
        width: float = WIDTH.default,
        middle_blocks: int = MIDDLE_BLOCKS.default,
        output_stride: int = OUTPUT_STRIDE.default,
        decoder_channels: int = 128,
        dropout: float = 0.1,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.encoder = AlignedXception(in_channels, width, middle_blocks, output_stride)
        self.aspp = SpatialPyramid(
            self.encoder.channels.deep,
            decoder_channels,
            deep_rates(output_stride),
            pointwise=True,
            image_pooling=True,
            dropout=dropout,
        )
        low_level = scale_channels(
            PAPER_LOW_LEVEL_CHANNELS, decoder_channels / PAPER_DECODER_CHANNELS
        )
        self.low_level = ConvBNReLU(self.encoder.channels.f2, low_level, 1)
        self.decoder = ConvStack(decoder_channels + low_level, decoder_channels, dropout=dropout)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        taps = self.encoder(x)
        low_level = self.low_level(taps.f2)
        fused = self.decoder(cat_resized([self.aspp(taps.deep), low_level], low_level.shape[-2:]))
        return resize_to(self.classifier(fused), x.shape[-2:])
