"""U-Net (Ronneberger et al. 2015), with the encoder and knobs U-Net++ and SegNet reuse.

Adaptations to 64x128:
- 'same' padding instead of valid convolutions, so the output keeps the input's size without
  cropping (the original's 572 -> 388 tiling makes no sense for whole 64x128 images);
- batch-norm as a knob (the original had none);
- channels double per level but stop at `MAX_CHANNELS`: at depth 5 the bottom map of a 64x128
  image is 2x4 pixels, where 1024+ channels add millions of parameters and nothing to see.
"""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn

from marsseg.classes import NUM_CLASSES
from marsseg.models.blocks import ConvStack, cat_resized, resize_to
from marsseg.models.knobs import Knob
from marsseg.models.registry import register_model

MAX_CHANNELS = 512
DEPTH = Knob("depth", "int", 4, low=2, high=5, help="number of 2x downsamplings")
BASE_CHANNELS = Knob(
    "base_channels", "int", 32, low=8, high=64, log=True, help="channels at full resolution"
)
BATCH_NORM = Knob("batch_norm", "bool", True, help="BatchNorm after every conv")
DROPOUT = Knob(
    "dropout", "float", 0.0, low=0.0, high=0.5, help="dropout after the bottom and decoder stages"
)


def level_channels(base_channels: int, depth: int) -> list[int]:
    """Channels per level, full resolution first: doubling per level, capped at `MAX_CHANNELS`."""
    return [min(base_channels * 2**level, MAX_CHANNELS) for level in range(depth + 1)]


class UNetEncoder(nn.Module):
    """A conv stack per level with 2x max pooling between them; returns every level's features.

    Dropout sits in the bottom stage only (the original U-Net put it at the end of its contracting
    path); decoders add their own.
    """

    def __init__(
        self, in_channels: int, channels: list[int], batch_norm: bool, dropout: float
    ) -> None:
        super().__init__()
        ins = [in_channels, *channels[:-1]]
        last = len(channels) - 1
        self.stages = nn.ModuleList(
            ConvStack(c_in, c_out, batch_norm=batch_norm, dropout=dropout if i == last else 0.0)
            for i, (c_in, c_out) in enumerate(zip(ins, channels, strict=True))
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = [self.stages[0](x)]
        for stage in self.stages[1:]:
            features.append(stage(self.pool(features[-1])))
        return features


class UNetDecoder(nn.Module):
    """Per level, deep to shallow: 2x2 transposed conv, concatenation with the skip, conv stack."""

    def __init__(self, channels: list[int], batch_norm: bool, dropout: float) -> None:
        super().__init__()
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(deep, shallow, 2, stride=2) for shallow, deep in pairwise(channels)
        )
        self.fuse = nn.ModuleList(
            ConvStack(2 * c, c, batch_norm=batch_norm, dropout=dropout) for c in channels[:-1]
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        *skips, y = features
        for skip, up, fuse in reversed(list(zip(skips, self.up, self.fuse, strict=True))):
            y = fuse(cat_resized([up(y), skip], skip.shape[-2:]))
        return y


@register_model("unet", knobs=(DEPTH, BASE_CHANNELS, BATCH_NORM, DROPOUT))
class UNet(nn.Module):
    """`UNetEncoder` -> decoder -> 1x1 classifier at full resolution.

    Subclasses swap the decoder through `decoder_type` (U-Net++ swaps in its nested pathways); it
    is built from the per-level channels and returns full-resolution features of `channels[0]`.
    """

    decoder_type: type[nn.Module] = UNetDecoder

    def __init__(
        self,
        depth: int = DEPTH.default,
        base_channels: int = BASE_CHANNELS.default,
        batch_norm: bool = BATCH_NORM.default,
        dropout: float = DROPOUT.default,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        channels = level_channels(base_channels, depth)
        self.encoder = UNetEncoder(in_channels, channels, batch_norm, dropout)
        self.decoder = self.decoder_type(channels, batch_norm, dropout)
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.decoder(self.encoder(x))
        return resize_to(self.classifier(features), x.shape[-2:])
