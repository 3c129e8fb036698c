"""Mix Transformer (MiT) encoder of SegFormer, sizes b0..b5, for any number of input bands.

Four stages, each: overlapping patch embedding (strided conv + LayerNorm), ``depth`` pre-norm blocks
(efficient self-attention with spatial reduction, then Mix-FFN with a 3x3 depthwise conv), a final
LayerNorm. Outputs the four feature maps at strides 4, 8, 16 and 32 (method.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from damformer.models.depthwise import DepthwiseConv2d


@dataclass(frozen=True)
class MiTSpec:
    """Widths and depths of one MiT size."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


_WIDE = (64, 128, 320, 512)
MIT_SPECS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTSpec(_WIDE, (2, 2, 2, 2)),
    "mit_b2": MiTSpec(_WIDE, (3, 4, 6, 3)),
    "mit_b3": MiTSpec(_WIDE, (3, 4, 18, 3)),
    "mit_b4": MiTSpec(_WIDE, (3, 8, 27, 3)),
    "mit_b5": MiTSpec(_WIDE, (3, 6, 40, 3)),
}

BLOCK_EPS = 1e-6  # block and stage LayerNorms; patch-embed and reduction norms keep PyTorch's 1e-5


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole samples with probability ``p`` in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)  # scale the per-sample mask, not the map: one full-size op


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: conv (kernel 7 stride 4 or kernel 3 stride 2), flatten, LayerNorm."""

    def __init__(self, in_chans: int, dim: int, *, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x_bchw: torch.Tensor) -> tuple[torch.Tensor, int, int]:  # noqa: D102
        x = self.proj(x_bchw)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a map reduced ``sr`` times per side."""

    def __init__(self, dim: int, num_heads: int, sr: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, sr, sr) if sr > 1 else None
        self.sr_norm = nn.LayerNorm(dim) if sr > 1 else None

    def forward(self, x_bnc: torch.Tensor, height: int, width: int) -> torch.Tensor:  # noqa: D102
        batch, tokens, dim = x_bnc.shape
        heads = self.num_heads
        q = self.q(x_bnc).reshape(batch, tokens, heads, dim // heads).transpose(1, 2)
        source = x_bnc
        if self.sr is not None:
            reduced = self.sr(x_bnc.transpose(1, 2).reshape(batch, dim, height, width))
            source = self.sr_norm(reduced.flatten(2).transpose(1, 2))
        k, v = self.kv(source).reshape(batch, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # fused kernel where available; same maths
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv (positional information without embeddings) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv2d(hidden, 3)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x_bnc: torch.Tensor, height: int, width: int) -> torch.Tensor:  # noqa: D102
        x = self.fc1(x_bnc)
        batch, _, hidden = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(batch, hidden, height, width)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, sr: int, mlp_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.attn = EfficientAttention(dim, num_heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.ffn = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:  # noqa: D102
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.ffn(self.norm2(x), height, width))


class Stage(nn.Module):
    """Patch embedding, blocks and the stage's closing LayerNorm."""

    def __init__(self, in_chans: int, dim: int, *, first: bool, blocks: list[Block]) -> None:
        super().__init__()
        self.embed = PatchEmbed(in_chans, dim, kernel=7 if first else 3, stride=4 if first else 2)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=BLOCK_EPS)

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, height, width = self.embed(x_bchw)
        for block in self.blocks:
            x = block(x, height, width)
        return self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, height, width)


class MixTransformer(nn.Module):
    """The MiT encoder.

    Args:
        size: ``mit_b0`` .. ``mit_b5``.
        in_chans: input bands (3 for RGB, 5 for RGB + NIR + elevation).
        drop_path: stochastic depth rate of the last block, spread linearly from 0 over all blocks.

    Forward: ``(B, in_chans, H, W)`` -> four maps ``(B, C_i, H / s, W / s)`` for s = 4, 8, 16, 32.
    """

    def __init__(self, size: str = "mit_b0", *, in_chans: int = 3, drop_path: float = 0.1) -> None:
        super().__init__()
        if size not in MIT_SPECS:
            raise ValueError(f"MiT size: expected one of {', '.join(MIT_SPECS)}, found {size!r}")
        spec = MIT_SPECS[size]
        self.size, self.in_chans, self.spec = size, in_chans, spec
        self.embed_dims = list(spec.embed_dims)
        rates = torch.linspace(0, drop_path, sum(spec.depths)).tolist()
        stages, start, previous = [], 0, in_chans
        for index, (dim, depth, heads, sr) in enumerate(
            zip(spec.embed_dims, spec.depths, spec.num_heads, spec.sr_ratios, strict=True)
        ):
            blocks = [Block(dim, heads, sr, spec.mlp_ratio, rates[start + j]) for j in range(depth)]
            stages.append(Stage(previous, dim, first=index == 0, blocks=blocks))
            start, previous = start + depth, dim
        self.stages = nn.ModuleList(stages)
        self.apply(_init_weights)

    def forward(self, x_bchw: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        features = []
        for stage in self.stages:
            x_bchw = stage(x_bchw)
            features.append(x_bchw)
        return features


def _init_weights(module: nn.Module) -> None:
    # SegFormer's initialisation: truncated normal linears, fan-out normal convs, unit LayerNorms.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, std=(2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, DepthwiseConv2d):  # fan-out of a depthwise conv: its kernel's area
        nn.init.normal_(module.weight, std=(2.0 / module.kernel_size**2) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
