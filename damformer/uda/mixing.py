"""ClassMix (per image) and the strong photometric augmentation of mixed multispectral images.

Images here are the model's raw inputs: aerial (B, 5, H, W) on the 0..255 scale, bands R, G, B, NIR,
elevation. Draws come from an explicit ``torch.Generator`` so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F  # noqa: N812

IGNORE_INDEX = 255


LABEL_VALUES = 256  # labels are uint8: class indices and the ignore index 255


def classmix_masks(source_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: half of the classes present in its source label (rounded up); mask = their pixels.

    DAFormer draws one class set over the whole batch; per image keeps every mix meaningful when the
    images of a batch hold different classes (method.md section 5). Returns (B, H, W) bool.

    Tensor operations of fixed shapes on the labels' device (no ``unique``, no host synchronisation):
    every class value gets a random key, absent classes the largest; the ceil(n / 2) smallest keys of
    each image are its chosen classes. ``generator`` must be on the labels' device.
    """
    batch = source_labels.shape[0]
    flat = source_labels.reshape(batch, -1).long()
    present = torch.zeros(batch, LABEL_VALUES, dtype=torch.bool, device=flat.device)
    present.scatter_(1, flat, True)
    present[:, IGNORE_INDEX] = False
    keys = torch.rand(batch, LABEL_VALUES, generator=generator, device=flat.device).masked_fill(~present, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)  # position of each class value in its image's draw order
    chosen = rank < (present.sum(dim=1, keepdim=True) + 1) // 2
    return chosen.gather(1, flat).reshape(source_labels.shape)


def mix(mask_bhw: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """``inside`` where the mask holds, ``outside`` elsewhere (images (B, C, H, W) or maps (B, H, W))."""
    mask = mask_bhw[:, None] if inside.dim() == 4 else mask_bhw
    return torch.where(mask, inside, outside)


@dataclass(frozen=True)
class StrongAugment:
    """Colour jitter and Gaussian blur for multispectral aerial images (method.md section 5).

    DAFormer silently skips both unless an image has exactly 3 channels. Here: brightness, contrast,
    saturation and hue on RGB; brightness and contrast on NIR; blur on every band except elevation,
    whose values are heights, not colours (ours).

    Attributes:
        jitter: strength of brightness/contrast/saturation/hue (0.2).
        jitter_p: probability of jitter per image (0.8).
        blur_p: probability of blur per image (0.5); sigma ~ U(0.15, 1.15), kernel ~10% of the side.
    """

    jitter: float = 0.2
    jitter_p: float = 0.8
    blur_p: float = 0.5

    def __call__(self, aerial: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) float 0..255 -> augmented copy (C = 3 for RGB, 5 for RGB + NIR + elevation).

        The whole batch at once on its device: per-image draws from ``generator`` (on that device),
        images not drawn for jitter or blur keep their values exactly.
        """
        x = aerial.float()
        draws = torch.rand(x.shape[0], 8, generator=generator, device=x.device)
        jittered = self._jitter(x, draws[:, 1:5])
        x = torch.where((draws[:, 0] < self.jitter_p)[:, None, None, None], jittered, x)
        blurred = self._blur(x, 0.15 + draws[:, 7])
        return torch.where((draws[:, 6] < self.blur_p)[:, None, None, None], blurred, x)

    def jitter_factors(self, draws: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(brightness, contrast, saturation, hue) from uniform draws in [0, 1) (..., 4).

        As torchvision's ``ColorJitter(s, s, s, s)`` (DAFormer's, s = 0.2): the first three factors in
        [1 - s, 1 + s]; hue a shift in [-s, s] of a full turn (+-72 degrees at s = 0.2).
        """
        draws = torch.as_tensor(draws, dtype=torch.float32)
        s = self.jitter
        brightness, contrast, saturation = (1 + s * (2 * draws[..., i] - 1) for i in range(3))
        return brightness, contrast, saturation, s * (2 * draws[..., 3] - 1)

    def _jitter(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        brightness, contrast, saturation, hue = (f[:, None, None] for f in self.jitter_factors(draws))
        rgb = images[:, :3] * brightness[:, None]
        grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).mean(dim=(1, 2), keepdim=True)
        rgb = (rgb - grey[:, None]) * contrast[:, None] + grey[:, None]
        luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
        rgb = (rgb - luma[:, None]) * saturation[:, None] + luma[:, None]
        rgb = _rotate_hue(rgb, hue[:, 0, 0])
        parts = [rgb.clamp(0, 255)]
        if images.shape[1] > 3:  # NIR: brightness and contrast only; elevation untouched
            nir = images[:, 3] * brightness
            mean = nir.mean(dim=(1, 2), keepdim=True)
            parts.append(((nir - mean) * contrast + mean).clamp(0, 255)[:, None])
            parts.append(images[:, 4:])
        return torch.cat(parts, dim=1)

    @staticmethod
    def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with one sigma per image, of every band but elevation (grouped convs)."""
        batch, channels, height, width = images.shape
        radius = max(1, round(0.1 * width) // 2)
        offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
        kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (B, 2r + 1)
        bands = min(channels, 4)  # never the elevation band
        weights = kernels.repeat_interleave(bands, dim=0)[:, None]  # one kernel per (image, band)
        x = images[:, :bands].reshape(1, batch * bands, height, width)
        x = F.conv2d(
            F.pad(x, (radius, radius, 0, 0), mode="reflect"), weights[:, :, None, :], groups=batch * bands
        )
        x = F.conv2d(
            F.pad(x, (0, 0, radius, radius), mode="reflect"), weights[:, :, :, None], groups=batch * bands
        )
        return torch.cat([x.reshape(batch, bands, height, width), images[:, bands:]], dim=1)


def _rotate_hue(rgb: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (B, 3, H, W) images by ``turn`` (B,) of a full circle in YIQ space (luma kept)."""
    angle = 2 * math.pi * turn.to(rgb.dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    rotate = torch.stack(
        [
            torch.stack([one, zero, zero], -1),
            torch.stack([zero, cos, -sin], -1),
            torch.stack([zero, sin, cos], -1),
        ],
        dim=-2,
    )  # (B, 3, 3)
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        dtype=rgb.dtype,
        device=rgb.device,
    )
    matrix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
    return torch.einsum("bij,bjhw->bihw", matrix, rgb)
