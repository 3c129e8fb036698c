"""Deep temporal fusion (DTF): inject the Sentinel-2 branch's map into the aerial encoder's features.

Two paths, summed into the HR encoder maps at the chosen levels (``model.fusion_levels``; by default
every level, as FLAIR-2's U-T&T; the authors' release uses the deepest only):

* cropped: the part of the LR map under the aerial footprint (102.4 m of a 400 m crop: 10.24 of 40
  pixels), after a 1x1 conv to the level's width, sampled bilinearly at the level's pixels (ours: the
  exact footprint rather than a whole-pixel crop; the conv and the resampling commute);
* collapsed: the spatial mean of each sample's whole LR map (context around the patch), a 3-layer MLP
  (64 -> 213 -> 362 -> C, dropout 0.3), tiled over the level.

Every operation is per sample: no statistic is shared across the batch (the released code took the
collapsed path's mean from batch element 0 for all samples; see method.md section 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Aerial patch side over Sentinel-2 crop side: 512 px x 0.2 m over 40 px x 10 m.
FLAIR2_FOOTPRINT = 512 * 0.2 / (40 * 10.0)


def _sampling_matrix(size: int, length: int, fraction: float, like: torch.Tensor) -> torch.Tensor:
    """(size, length) bilinear weights of ``size`` samples over the centred ``fraction`` of an axis.

    The samples sit at the output's pixel centres; input pixel i covers [i, i + 1) of the axis, and the
    borders are clamped (as ``align_corners=False``).
    """
    centres = (torch.arange(size, dtype=torch.float32, device=like.device) + 0.5) / size
    position = (length / 2 + (centres - 0.5) * fraction * length - 0.5).clamp(0, length - 1)
    low = position.floor().clamp(max=max(length - 2, 0))
    high = (low + 1).clamp(max=length - 1)
    share = position - low
    weights = torch.zeros(size, length, dtype=torch.float32, device=like.device)
    weights.scatter_add_(1, low.long()[:, None], (1 - share)[:, None])
    weights.scatter_add_(1, high.long()[:, None], share[:, None])
    return weights.to(like.dtype)


def footprint_sample(map_bchw: torch.Tensor, fraction: float, size: tuple[int, int]) -> torch.Tensor:
    """The aerial footprint of a Sentinel-2 map, resampled bilinearly to ``size``: (B, C, *size).

    The footprint is the centred ``fraction`` of each side. It rarely spans whole pixels (25.6 m of a
    160 m crop is 2.56 pixels): an integer centre crop would be off by up to half a pixel (5 m), so the
    footprint is sampled exactly, at the output's pixel centres. Two small matrices, no data-dependent
    shapes.
    """
    rows = _sampling_matrix(size[0], map_bchw.shape[-2], fraction, map_bchw)
    cols = _sampling_matrix(size[1], map_bchw.shape[-1], fraction, map_bchw)
    return torch.einsum("yh,bchw,xw->bcyx", rows, map_bchw, cols)


class DeepTemporalFusion(nn.Module):
    """Add the Sentinel-2 context to HR encoder maps at ``levels``.

    Args:
        lr_dim: channels of the U-TAE output map.
        hr_dims: channels of every HR encoder level.
        levels: indices of the levels that receive the fusion (default: the deepest).
        footprint: aerial footprint as a fraction of the S2 crop side.
        hidden: widths of the collapsed path's MLP.
        dropout: dropout after each hidden layer of the MLP.
        zero_init: start both paths' output layers at zero (the fusion adds nothing at step 0).
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
        zero_init: bool = True,
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
        if zero_init:
            # (ours) Both paths start at zero: at step 0 the fused maps are the aerial ones, and the randomly
            # initialised temporal branch enters as it learns (its own LR loss trains it meanwhile) instead
            # of adding noise to the deepest aerial features from the first step.
            for layer in [*self.cropped.values(), *(mlp[-1] for mlp in self.collapsed.values())]:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, hr_features: Sequence[torch.Tensor], lr_bchw: torch.Tensor) -> list[torch.Tensor]:
        """HR maps (list of (B, C_i, H_i, W_i)) and the LR map (B, C, S, S) -> fused HR maps."""
        context = lr_bchw.mean(dim=(2, 3))  # (B, C): one vector per sample
        out = list(hr_features)
        for level in self.levels:
            target = out[level]
            local = footprint_sample(self.cropped[str(level)](lr_bchw), self.footprint, target.shape[-2:])
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
