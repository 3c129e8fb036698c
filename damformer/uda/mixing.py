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


def classmix_masks(source_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: half of the classes present in its source label (rounded up); mask = their pixels.

    DAFormer draws one class set over the whole batch; per image keeps every mix meaningful when the
    images of a batch hold different classes (method.md section 5). Returns (B, H, W) bool.
    """
    masks = torch.zeros_like(source_labels, dtype=torch.bool)
    for index, label in enumerate(source_labels):
        classes = torch.unique(label)
        classes = classes[classes != IGNORE_INDEX]
        if classes.numel() == 0:
            continue
        chosen = classes[
            torch.randperm(classes.numel(), generator=generator)[: math.ceil(classes.numel() / 2)]
        ]
        masks[index] = torch.isin(label, chosen.to(label.device))
    return masks


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
        """(B, C, H, W) float 0..255 -> augmented copy (C = 3 for RGB, 5 for RGB + NIR + elevation)."""
        out = aerial.float().clone()
        for index in range(out.shape[0]):
            draws = torch.rand(8, generator=generator).tolist()
            if draws[0] < self.jitter_p:
                out[index] = self._jitter(out[index], draws[1:6])
            if draws[6] < self.blur_p:
                out[index] = self._blur(out[index], 0.15 + draws[7])
        return out

    def jitter_factors(self, draws: list[float]) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue) from four uniform draws in [0, 1).

        As torchvision's ``ColorJitter(s, s, s, s)`` (DAFormer's, s = 0.2): the first three factors in
        [1 - s, 1 + s]; hue a shift in [-s, s] of a full turn (+-72 degrees at s = 0.2).
        """
        s = self.jitter
        brightness, contrast, saturation = (1 + s * (2 * d - 1) for d in draws[:3])
        hue = s * (2 * draws[3] - 1)
        return brightness, contrast, saturation, hue

    def _jitter(self, image: torch.Tensor, draws: list[float]) -> torch.Tensor:
        brightness, contrast, saturation, hue = self.jitter_factors(draws)
        rgb = image[:3]
        rgb = rgb * brightness
        grey = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).mean()
        rgb = (rgb - grey) * contrast + grey
        luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        rgb = (rgb - luma) * saturation + luma
        rgb = _rotate_hue(rgb, hue)
        out = image.clone()
        out[:3] = rgb.clamp(0, 255)
        if image.shape[0] > 3:  # NIR: brightness and contrast only
            nir = image[3] * brightness
            out[3] = ((nir - nir.mean()) * contrast + nir.mean()).clamp(0, 255)
        return out

    @staticmethod
    def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
        side = image.shape[-1]
        radius = max(1, round(0.1 * side) // 2)
        offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        bands = min(image.shape[0], 4)  # never the elevation band
        x = image[:bands, None]
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
        out = image.clone()
        out[:bands] = x[:, 0]
        return out


def _rotate_hue(rgb: torch.Tensor, turn: float) -> torch.Tensor:
    """Rotate hue by ``turn`` of a full circle in YIQ space (luma kept)."""
    if turn == 0:
        return rgb
    angle = 2 * math.pi * turn
    cos, sin = math.cos(angle), math.sin(angle)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    matrix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
    return torch.einsum("ij,jhw->ihw", matrix.to(rgb), rgb)
