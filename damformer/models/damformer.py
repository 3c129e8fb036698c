"""The segmentation model of every ablation.

An HR network reads the aerial bands; optionally the Sentinel-2 branch (U-TAE) is fused into the HR
encoder (deep temporal fusion) and gives LR logits.

The model takes the loader's raw values (aerial 0..255, Sentinel-2 reflectance x 10000) and normalises
them itself, as the authors did (method.md section 4), so a checkpoint carries its input convention:
prediction and evaluation cannot normalise differently from training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from damformer.models.fusion import DeepTemporalFusion, footprint_sample
from damformer.models.utae import UTAE

# Per aerial band (R, G, B, NIR, elevation): x -> (x - mean) / std.
# RGB: ImageNet mean/std (what pretrained MiT weights expect), on the 0..255 scale. NIR and elevation:
# FLAIR-2's train statistics (flair2-format.md). The released code divides elevation by 3164.91, the
# maximum *altitude* of the metadata, which squeezes the band to ~0.005 and hides it from the network.
AERIAL_MEAN = (123.675, 116.28, 103.53, 102.36, 16.70)
AERIAL_STD = (58.395, 57.12, 57.375, 27.09, 15.85)
# The authors' release (model.aerial_norm: released): RGB as above, NIR / 255, elevation / 3164.91.
RELEASED_MEAN = (*AERIAL_MEAN[:3], 0.0, 0.0)
RELEASED_STD = (*AERIAL_STD[:3], 255.0, 3164.91)
AERIAL_NORMS = {"flair2": (AERIAL_MEAN, AERIAL_STD), "released": (RELEASED_MEAN, RELEASED_STD)}
S2_SCALE = 10000.0  # reflectance x 10000 -> reflectance, after clipping negatives to 0

BAND_SETS = {"rgb": (0, 1, 2), "rgbne": (0, 1, 2, 3, 4)}


class DAMFormer(nn.Module):
    """HR encoder + decoder, with an optional temporal branch fused into the encoder.

    Args:
        encoder: returns a list of maps (B, C_i, H / s_i, W / s_i).
        decoder: maps that list to logits at any stride (resized to the input here).
        bands: aerial band indices the model reads (``BAND_SETS``).
        adapter: optional module applied to the normalised bands before the encoder (e.g. the authors'
            1x1 conv 5 -> 3 that lets RGB ImageNet weights be used unchanged).
        temporal: the U-TAE branch (None: aerial only).
        fusion: deep temporal fusion into the encoder maps (with ``temporal``).
        lr_head: 1x1 conv from the U-TAE map to class logits (with ``temporal``).
        footprint: aerial footprint as a fraction of the Sentinel-2 crop side.
        normalisation: ``flair2`` (NIR and elevation by FLAIR-2's statistics) or ``released`` (the
            authors' NIR / 255 and elevation / 3164.91); RGB is ImageNet's in both.

    Forward returns ``{"hr": (B, K, H, W), "lr": (B, K, H, W) or None, "features": encoder maps}``;
    ``features`` are taken before fusion (the ImageNet feature distance compares those).
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        bands: Sequence[int],
        adapter: nn.Module | None = None,
        temporal: UTAE | None = None,
        fusion: DeepTemporalFusion | None = None,
        lr_head: nn.Module | None = None,
        footprint: float = 0.256,
        normalisation: str = "flair2",
    ) -> None:
        super().__init__()
        if (temporal is None) != (fusion is None) or (temporal is None) != (lr_head is None):
            raise ValueError("temporal, fusion and lr_head go together")
        self.encoder, self.decoder, self.adapter = encoder, decoder, adapter
        self.temporal, self.fusion, self.lr_head = temporal, fusion, lr_head
        self.footprint = footprint
        self.register_buffer("band_index", torch.tensor(list(bands)), persistent=False)
        mean, std = AERIAL_NORMS[normalisation]
        self.register_buffer("mean", torch.tensor([mean[b] for b in bands])[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor([std[b] for b in bands])[:, None, None], persistent=False)

    def normalise_aerial(self, aerial: torch.Tensor) -> torch.Tensor:
        """(B, 5, H, W) raw aerial (any dtype, 0..255) -> the model's bands, normalised float."""
        x = aerial.index_select(1, self.band_index).float()
        return (x - self.mean) / self.std

    def forward(
        self,
        aerial: torch.Tensor,
        s2: torch.Tensor | None = None,
        s2_mask: torch.Tensor | None = None,
        s2_days: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        """See the class docstring. ``s2`` (B, T, 10, S, S), ``s2_mask`` (B, T) bool, ``s2_days`` (B, T)."""
        x = self.normalise_aerial(aerial)
        if self.adapter is not None:
            x = self.adapter(x)
        features = self.encoder(x)
        fused = features
        lr_logits = None
        if self.temporal is not None:
            if s2 is None or s2_mask is None or s2_days is None:
                raise ValueError("this model reads Sentinel-2: pass s2, s2_mask and s2_days")
            lr_map = self.temporal(s2.float().clamp_min(0) / S2_SCALE, s2_mask, s2_days)
            fused = self.fusion(features, lr_map)
            # LR logits only where the aerial patch is: its footprint, upsampled to the patch size
            lr_logits = footprint_sample(self.lr_head(lr_map), self.footprint, aerial.shape[-2:])
        hr_logits = _resize(self.decoder(fused), aerial.shape[-2:])
        return {"hr": hr_logits, "lr": lr_logits, "features": features}


def model_inputs(batch: dict) -> tuple[torch.Tensor, ...]:
    """The positional inputs of a :class:`DAMFormer` from a loader batch (S2 fields when present)."""
    if "s2" in batch:
        return batch["aerial"], batch["s2"], batch["s2_mask"], batch["s2_day_offsets"]
    return (batch["aerial"],)


def predict_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The HR logits (B, K, H, W) of a loader batch: what evaluation, maps and figures score."""
    return model(*model_inputs(batch))["hr"]


def _resize(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
