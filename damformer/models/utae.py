"""U-TAE: the Sentinel-2 branch (a spatial U-Net shared over dates, temporal attention at the bottleneck).

Method.md section 3. Shapes: ``s2`` (B, T, C, H, W) with a padding mask (B, T) (True = a real date)
and day offsets (B, T). Padded dates cannot change the output: the spatial encoder works frame by frame
and their features are zeroed after it (static shapes, for torch.compile), the temporal normalisation
and attention skip them. L-TAE attends over time at each bottleneck pixel with one learned query per
head; each head's attention map then collapses its channel group of every encoder level (group
attention skips).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

PAD_SCORE = -1000.0  # attention score of a padded date before the softmax


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.GroupNorm(4, channels) if kind == "group" else nn.BatchNorm2d(channels)


def conv_layer(
    in_ch: int, out_ch: int, norm: str, *, kernel: int = 3, stride: int = 1, padding: int = 1
) -> nn.Sequential:
    """Conv + norm (GroupNorm(4) in the encoder, BatchNorm in the decoder) + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding, padding_mode="reflect"),
        _norm(norm, out_ch),
        nn.ReLU(),
    )


class DownBlock(nn.Module):
    """4x4 stride-2 conv (keeps width), 3x3 conv to the new width, residual 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.down = conv_layer(in_ch, in_ch, "group", kernel=4, stride=2, padding=1)
        self.conv1 = conv_layer(in_ch, out_ch, "group")
        self.conv2 = conv_layer(out_ch, out_ch, "group")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.conv1(self.down(x))
        return x + self.conv2(x)


class UpBlock(nn.Module):
    """4x4 stride-2 transposed conv + BN + ReLU; skip through 1x1 conv + BN + ReLU; concat; conv; residual."""

    def __init__(self, in_ch: int, out_ch: int, skip_ch: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1), nn.BatchNorm2d(out_ch), nn.ReLU())
        self.skip = nn.Sequential(nn.Conv2d(skip_ch, skip_ch, 1), nn.BatchNorm2d(skip_ch), nn.ReLU())
        self.conv1 = conv_layer(out_ch + skip_ch, out_ch, "batch")
        self.conv2 = conv_layer(out_ch, out_ch, "batch")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.conv1(torch.cat([self.up(x), self.skip(skip)], dim=1))
        return x + self.conv2(x)


def day_encoding(days_bt: torch.Tensor, dim: int, *, period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal encoding of acquisition days: (B, T) -> (B, T, dim)."""
    index = torch.arange(dim, device=days_bt.device)
    denominator = period ** (2 * (index // 2) / dim)
    angles = days_bt.float()[..., None] / denominator
    return torch.where(index % 2 == 0, torch.sin(angles), torch.cos(angles))


class LTAE(nn.Module):
    """Lightweight temporal attention encoder applied to every pixel of a (B, T, C, h, w) map.

    Returns the attended map (B, out_dim, h, w) and the attention (heads, B, T, h, w).
    """

    def __init__(
        self,
        in_dim: int,
        *,
        out_dim: int,
        num_heads: int = 16,
        d_model: int = 256,
        d_k: int = 4,
        attn_dropout: float = 0.1,
        dropout: float = 0.2,
        period: float = 1000.0,
    ) -> None:
        super().__init__()
        self.num_heads, self.d_model, self.d_k, self.period = num_heads, d_model, d_k, period
        self.in_norm = nn.GroupNorm(num_heads, in_dim)
        self.in_proj = nn.Conv1d(in_dim, d_model, 1)
        self.query = nn.Parameter(torch.randn(num_heads, d_k) * math.sqrt(2.0 / d_k))
        self.key = nn.Linear(d_model, num_heads * d_k)
        nn.init.normal_(self.key.weight, std=math.sqrt(2.0 / d_k))
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, out_dim), nn.BatchNorm1d(out_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.GroupNorm(num_heads, out_dim)

    def forward(
        self, x_btchw: torch.Tensor, mask_bt: torch.Tensor, days_bt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See the class docstring."""
        batch, steps, channels, height, width = x_btchw.shape
        pixels = height * width
        # one sequence per pixel: (B * h * w, C, T)
        x = x_btchw.permute(0, 3, 4, 2, 1).reshape(batch * pixels, channels, steps)
        padded = (~mask_bt).repeat_interleave(pixels, dim=0)  # (N, T)
        x = self.in_proj(masked_group_norm(x, ~padded, self.in_norm)).transpose(1, 2)  # (N, T, d_model)
        encoding = day_encoding(days_bt, self.d_model // self.num_heads, period=self.period)
        x = x + encoding.repeat(1, 1, self.num_heads).repeat_interleave(pixels, dim=0)
        keys = self.key(x).reshape(batch * pixels, steps, self.num_heads, self.d_k)
        scores = torch.einsum("hd,nthd->hnt", self.query, keys) / math.sqrt(self.d_k)
        scores = scores.masked_fill(padded[None], PAD_SCORE)
        attention = self.attn_dropout(torch.softmax(scores, dim=-1))  # (heads, N, T)
        values = x.reshape(batch * pixels, steps, self.num_heads, -1)  # channel groups, no projection
        out = torch.einsum("hnt,nthd->nhd", attention, values).reshape(batch * pixels, self.d_model)
        out = self.out_norm(self.dropout(self.mlp(out)))
        out = out.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        attention = attention.reshape(self.num_heads, batch, height, width, steps).permute(0, 1, 4, 2, 3)
        return out, attention


def masked_group_norm(x_nct: torch.Tensor, real_nt: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm over (channels of a group, real dates only).

    A plain GroupNorm over the padded sequence would count the padding dates, so a sample's output
    would depend on the longest series of its batch.
    """
    batch, channels, steps = x_nct.shape
    groups = norm.num_groups
    weights = real_nt[:, None, None, :].to(x_nct.dtype)  # (N, 1, 1, T)
    grouped = x_nct.reshape(batch, groups, channels // groups, steps)
    count = weights.sum(dim=-1, keepdim=True).clamp_min(1) * (channels // groups)
    mean = (grouped * weights).sum(dim=(-2, -1), keepdim=True) / count
    var = (((grouped - mean) ** 2) * weights).sum(dim=(-2, -1), keepdim=True) / count
    normalised = ((grouped - mean) / torch.sqrt(var + norm.eps)).reshape(batch, channels, steps)
    return normalised * norm.weight[None, :, None] + norm.bias[None, :, None]


def group_attention(x_btchw: torch.Tensor, attention: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
    """Collapse time: each head's attention (upsampled to the map) weighs its channel group of ``x``."""
    heads, batch, steps = attention.shape[:3]
    size = x_btchw.shape[-2:]
    weights = attention.reshape(heads * batch, steps, *attention.shape[-2:])
    if weights.shape[-2:] != size:
        weights = F.interpolate(weights, size=size, mode="bilinear", align_corners=False)
    weights = weights.reshape(heads, batch, steps, *size) * mask_bt[None, :, :, None, None]
    # head h weighs channel group h: a view (B, T, heads, C / heads, H, W), no copy of the skip map
    groups = x_btchw.unflatten(2, (heads, -1))
    return (weights.permute(1, 2, 0, 3, 4).unsqueeze(3) * groups).sum(dim=1).flatten(1, 2)


class UTAE(nn.Module):
    """U-TAE over a Sentinel-2 series.

    Args:
        in_chans: spectral bands (10).
        encoder_widths, decoder_widths: FLAIR-2: both (64, 64, 128, 128); the last ones must be equal.
        out_conv: optional final conv widths (PASTIS: (32, 20)); empty returns the last decoder map.
        num_heads, d_model, d_k: L-TAE sizes (16, 256, 4).

    Forward: ``s2`` (B, T, C, H, W), ``mask`` (B, T) bool, ``days`` (B, T) -> (B, out_dim, H, W).
    """

    def __init__(
        self,
        in_chans: int = 10,
        *,
        encoder_widths: Sequence[int] = (64, 64, 128, 128),
        decoder_widths: Sequence[int] = (64, 64, 128, 128),
        out_conv: Sequence[int] = (),
        num_heads: int = 16,
        d_model: int = 256,
        d_k: int = 4,
    ) -> None:
        super().__init__()
        if encoder_widths[-1] != decoder_widths[-1] or len(encoder_widths) != len(decoder_widths):
            raise ValueError("U-TAE: encoder and decoder need as many levels and the same deepest width")
        widths = list(encoder_widths)
        self.in_conv = nn.Sequential(
            conv_layer(in_chans, widths[0], "group"), conv_layer(widths[0], widths[0], "group")
        )
        self.down = nn.ModuleList(DownBlock(widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        self.temporal = LTAE(
            widths[-1], out_dim=decoder_widths[-1], num_heads=num_heads, d_model=d_model, d_k=d_k
        )
        self.up = nn.ModuleList(
            UpBlock(decoder_widths[i], decoder_widths[i - 1], widths[i - 1])
            for i in range(len(widths) - 1, 0, -1)
        )
        convs, previous = [], decoder_widths[0]
        for index, width in enumerate(out_conv):
            last = index == len(out_conv) - 1
            convs.append(
                conv_layer(previous, width, "batch") if not last else nn.Conv2d(previous, width, 3, 1, 1)
            )
            previous = width
        self.out_conv = nn.Sequential(*convs)
        self.out_dim = previous

    def _encode(self, s2: torch.Tensor, mask_bt: torch.Tensor) -> list[torch.Tensor]:
        """Spatial encoder over every date, padded ones zeroed after it: per level (B, T, C, H, W).

        Static shapes (torch.compile's fullgraph, no host sync): padded dates go through the encoder
        too, and are zeroed after it. Every layer acts on each frame alone (convolutions, GroupNorm per
        frame, no BatchNorm), so a padded frame cannot change a real one: the output equals encoding the
        real dates alone.
        """
        frames = s2.flatten(0, 1)  # (B * T, C, H, W): time folded into the batch, a view
        levels = [self.in_conv(frames)]
        for block in self.down:
            levels.append(block(levels[-1]))
        real = mask_bt[:, :, None, None, None].to(s2.dtype)
        return [level.unflatten(0, mask_bt.shape) * real for level in levels]

    def forward(self, s2: torch.Tensor, mask_bt: torch.Tensor, days_bt: torch.Tensor) -> torch.Tensor:
        """See the class docstring."""
        levels = self._encode(s2, mask_bt)
        x, attention = self.temporal(levels[-1], mask_bt, days_bt)
        for block, skip in zip(self.up, reversed(levels[:-1]), strict=True):
            x = block(x, group_attention(skip, attention, mask_bt))
        return self.out_conv(x)
