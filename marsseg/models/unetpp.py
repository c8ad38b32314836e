"""U-Net++ (Zhou et al. 2018): U-Net with nested, densely connected skip pathways.

Node X[i][j] (level i, j convolution steps along the skip pathway) sees every earlier node of its
level and the upsampled X[i+1][j-1], which narrows the semantic gap between encoder and decoder
features before they meet. Encoder, classifier, channel plan and knobs are U-Net's (`unet.py`);
only the decoder differs.
Adaptations to 64x128: as U-Net's; the default base width is 16 rather than 32, because the
nested pathways convolve depth*(depth+1)/2 decoder nodes instead of depth, most at high resolution.
Deep supervision is left out: it needs a loss per output, which the shared training loop does
not have, and averaging the heads at inference alone adds nothing the final head cannot learn.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from marsseg.classes import NUM_CLASSES
from marsseg.models.blocks import ConvStack, cat_resized
from marsseg.models.registry import register_model
from marsseg.models.unet import BASE_CHANNELS, BATCH_NORM, DEPTH, DROPOUT, UNet

NESTED_BASE_CHANNELS = replace(BASE_CHANNELS, default=16, high=32)


class NestedDecoder(nn.Module):
    """The nested nodes X[i][j], j >= 1; returns X[0][depth] (the encoder gives column j = 0).

    Upsampling is bilinear, as in the authors' implementation.
    """

    def __init__(self, channels: list[int], batch_norm: bool, dropout: float) -> None:
        super().__init__()
        depth = len(channels) - 1
        # columns[j - 1][i] is X[i][j]: column j has a node for each level i <= depth - j.
        self.columns = nn.ModuleList(
            nn.ModuleList(
                ConvStack(
                    j * channels[i] + channels[i + 1],
                    channels[i],
                    batch_norm=batch_norm,
                    dropout=dropout,
                )
                for i in range(depth + 1 - j)
            )
            for j in range(1, depth + 1)
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        grid = [[feature] for feature in features]  # grid[i][j] is X[i][j]
        for column in self.columns:
            for i, node in enumerate(column):
                size = grid[i][0].shape[-2:]
                grid[i].append(node(cat_resized([*grid[i], grid[i + 1][-1]], size)))
        return grid[0][-1]


@register_model("unetpp", knobs=(DEPTH, NESTED_BASE_CHANNELS, BATCH_NORM, DROPOUT))
class UNetPlusPlus(UNet):
    """U-Net with `NestedDecoder`; only the default width differs in the constructor."""

    decoder_type = NestedDecoder

    def __init__(
        self,
        depth: int = DEPTH.default,
        base_channels: int = NESTED_BASE_CHANNELS.default,
        batch_norm: bool = BATCH_NORM.default,
        dropout: float = DROPOUT.default,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__(depth, base_channels, batch_norm, dropout, in_channels, num_classes)
