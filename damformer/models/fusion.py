"""Deep temporal fusion (DTF): inject the Sentinel-2 branch's map into the aerial encoder's features.

Two paths, summed into the HR encoder maps at the chosen levels (default: the deepest, as the authors):

* cropped: the centre of the LR map that covers the aerial footprint (102.4 m of a 400 m crop: 10 of
  40 pixels), 1x1 conv to the level's width, bilinear resize to the level's size;
* collapsed: the spatial mean of each sample's whole LR map (context around the patch), a 3-layer MLP
  (64 -> 213 -> 362 -> C, dropout 0.3), tiled over the level.

Every operation is per sample: no statistic is shared across the batch (the released code took the
collapsed path's mean from batch element 0 for all samples; see method.md section 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

# Aerial patch side over Sentinel-2 crop side: 512 px x 0.2 m over 40 px x 10 m.
FLAIR2_FOOTPRINT = 512 * 0.2 / (40 * 10.0)


def footprint_crop(lr_bchw: torch.Tensor, fraction: float) -> torch.Tensor:
    """Centre crop of ``lr_bchw`` covering ``fraction`` of each side (at least one pixel)."""
    height, width = lr_bchw.shape[-2:]
    rows, cols = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - rows) // 2, (width - cols) // 2
    return lr_bchw[..., top : top + rows, left : left + cols]


class DeepTemporalFusion(nn.Module):
    """Add the Sentinel-2 context to HR encoder maps at ``levels``.

    Args:
        lr_dim: channels of the U-TAE output map.
        hr_dims: channels of every HR encoder level.
        levels: indices of the levels that receive the fusion (default: the deepest).
        footprint: aerial footprint as a fraction of the S2 crop side.
        hidden: widths of the collapsed path's MLP.
        dropout: dropout after each hidden layer of the MLP.
    """

    def __init__(
        self,
        lr_dim: int,
        hr_dims: Sequence[int],
        *,
        levels: Sequence[int] | None = None,
        footprint: float = FLAIR2_FOOTPRINT,
        hidden: Sequence[int] = (213, 362),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        levels = [len(hr_dims) - 1] if levels is None else [i % len(hr_dims) for i in levels]
        if len(set(levels)) != len(levels):
            raise ValueError(f"fusion levels: expected distinct levels, found {levels}")
        self.levels = sorted(levels)
        self.footprint = footprint
        self.cropped = nn.ModuleDict({str(i): nn.Conv2d(lr_dim, hr_dims[i], 1) for i in self.levels})
        self.collapsed = nn.ModuleDict(
            {str(i): _mlp(lr_dim, hidden, hr_dims[i], dropout) for i in self.levels}
        )

    def forward(self, hr_features: Sequence[torch.Tensor], lr_bchw: torch.Tensor) -> list[torch.Tensor]:
        """HR maps (list of (B, C_i, H_i, W_i)) and the LR map (B, C, S, S) -> fused HR maps."""
        crop = footprint_crop(lr_bchw, self.footprint)
        context = lr_bchw.mean(dim=(2, 3))  # (B, C): one vector per sample
        out = list(hr_features)
        for level in self.levels:
            target = out[level]
            local = F.interpolate(
                self.cropped[str(level)](crop), size=target.shape[-2:], mode="bilinear", align_corners=False
            )
            out[level] = target + local + self.collapsed[str(level)](context)[:, :, None, None]
        return out


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    previous = in_dim
    for width in hidden:
        layers += [nn.Linear(previous, width), nn.ReLU(), nn.Dropout(dropout)]
        previous = width
    layers.append(nn.Linear(previous, out_dim))
    return nn.Sequential(*layers)
