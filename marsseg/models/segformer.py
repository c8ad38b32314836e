"""SegFormer (Xie et al. 2021): a hierarchical Mix Transformer (MiT) encoder and an all-MLP decoder.

MiT's ingredients, all kept: overlapping patch embeddings (strided convs wider than their
stride, so patches share borders), efficient self-attention (keys and values come from a map
shrunk by a strided conv, ratios 8, 4, 2, 1 over the four stages), Mix-FFN (a 3x3 depthwise
conv between the MLP's two linears stands in for positional encodings, so any input size works)
and a decoder that projects each stage to one width, upsamples and fuses them with 1x1 convs.
Adaptations to 64x128:
- the first patch embedding strides 2 by default (`first_stride`, 4 in the paper): at stride 4,
  a 64x128 image would be a 16x32 grid at best and 2x4 at the last stage, too coarse for rocks
  a few pixels wide; with stride 2 the stages see 32x64, 16x32, 8x16 and 4x8;
- stage widths are `embed_dim` x (1, 2, 5, 8) with MiT's heads (1, 2, 5, 8): `embed_dim` 32 and
  2 blocks per stage is MiT-B0;
- the key/value reduction pads maps whose size is not a multiple of its ratio, so the 32x64 and
  96x192 inputs of a multi-scale wrapper work too.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from marsseg.classes import NUM_CLASSES
from marsseg.models.blocks import ConvBNReLU, cat_resized, resize_to
from marsseg.models.knobs import Knob
from marsseg.models.registry import register_model

STAGE_WIDTHS = (1, 2, 5, 8)
"""Stage widths in units of `embed_dim`, and each stage's number of heads (so heads are `embed_dim`
wide)."""
REDUCTION_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4


def to_map(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) map."""
    return tokens.transpose(1, 2).unflatten(2, size)


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) map -> (B, H*W, C) tokens."""
    return x.flatten(2).transpose(1, 2)


class OverlapPatchEmbed(nn.Module):
    """A strided conv wider than its stride, then LayerNorm: patches overlap their neighbours."""

    def __init__(self, in_channels: int, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        return self.norm(to_tokens(x)), (x.shape[-2], x.shape[-1])


class EfficientSelfAttention(nn.Module):
    """Multi-head attention with keys and values from the map shrunk `reduction` times per side.

    Cost drops from (HW)^2 to (HW)^2 / reduction^2, which is what lets the first stage attend
    globally over all its tokens.
    """

    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.heads = heads
        self.reduction = reduction
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if reduction > 1:
            self.reduce = nn.Conv2d(dim, dim, reduction, stride=reduction)
            self.reduce_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        q = self.query(x).view(b, n, self.heads, -1).transpose(1, 2)
        context = x
        if self.reduction > 1:
            h, w = size
            r = self.reduction
            padded = F.pad(to_map(x, size), (0, -w % r, 0, -h % r))
            context = self.reduce_norm(to_tokens(self.reduce(padded)))
        k, v = self.key_value(context).view(b, -1, 2, self.heads, c // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv -> GELU -> linear: the conv leaks position into the tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = to_tokens(self.dwconv(to_map(self.fc1(x), size)))
        return self.fc2(F.gelu(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: efficient self-attention, then Mix-FFN."""

    def __init__(self, dim: int, heads: int, reduction: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = EfficientSelfAttention(dim, heads, reduction)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, MLP_RATIO * dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = x + self.attention(self.norm1(x), size)
        return x + self.ffn(self.norm2(x), size)


class MiTStage(nn.Module):
    """Overlapping patch embedding, `num_blocks` transformer blocks, LayerNorm; returns a map."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        heads: int,
        reduction: int,
        num_blocks: int,
        kernel_size: int,
        stride: int,
    ) -> None:
        super().__init__()
        self.embed = OverlapPatchEmbed(in_channels, dim, kernel_size, stride)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, reduction) for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens, size = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens, size)
        return to_map(self.norm(tokens), size)


@register_model(
    "segformer",
    knobs=(
        Knob("embed_dim", "int", 32, low=16, high=64, step=16, help="first-stage width"),
        Knob("blocks_per_stage", "int", 2, low=1, high=3, help="transformer blocks per stage"),
        Knob("first_stride", "categorical", 2, choices=(2, 4), help="first patch-embed stride"),
        Knob("decoder_channels", "int", 128, low=32, high=256, step=32, help="all-MLP width"),
        Knob("dropout", "float", 0.1, low=0.0, high=0.5, help="dropout before the classifier"),
    ),
)
class SegFormer(nn.Module):
    """MiT encoder (4 stages) -> per-stage linear projection -> upsample, concat, fuse -> 1x1."""

    def __init__(
        self,
        embed_dim: int = 32,
        blocks_per_stage: int = 2,
        first_stride: int = 2,
        decoder_channels: int = 128,
        dropout: float = 0.1,
        in_channels: int = 1,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        dims = [embed_dim * w for w in STAGE_WIDTHS]
        ins = [in_channels, *dims[:-1]]
        # MiT: a 7x7 embedding for the first stage, 3x3 with stride 2 for the others.
        shapes = [(7, first_stride)] + [(3, 2)] * (len(dims) - 1)
        self.stages = nn.ModuleList(
            MiTStage(c_in, dim, heads, r, blocks_per_stage, k, s)
            for c_in, dim, heads, r, (k, s) in zip(
                ins, dims, STAGE_WIDTHS, REDUCTION_RATIOS, shapes, strict=True
            )
        )
        self.project = nn.ModuleList(nn.Conv2d(dim, decoder_channels, 1) for dim in dims)
        self.fuse = ConvBNReLU(len(dims) * decoder_channels, decoder_channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        features = []
        y = x
        for stage, project in zip(self.stages, self.project, strict=True):
            y = stage(y)
            features.append(project(y))
        fused = self.fuse(cat_resized(features, features[0].shape[-2:]))
        return resize_to(self.classifier(self.dropout(fused)), x.shape[-2:])
