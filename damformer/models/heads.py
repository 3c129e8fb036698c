"""Decode heads over the four MiT feature maps: DAFormer's context-aware head and SegFormer's MLP head.

Both output logits at stride 4; the segmentation model resizes them to the label/input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from damformer.models.depthwise import DepthwiseConv2d


def conv_bn_relu(
    in_ch: int, out_ch: int, kernel: int = 1, *, dilation: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias: a norm follows) + BatchNorm + ReLU, 'same' padding."""
    if groups > 1 and groups == in_ch == out_ch:  # depthwise: see DepthwiseConv2d for why not nn.Conv2d
        conv = DepthwiseConv2d(in_ch, kernel, dilation=dilation, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Conv2d(
            in_ch,
            out_ch,
            kernel,
            padding=dilation * (kernel // 2),
            dilation=dilation,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class _LevelEmbedding(nn.Module):
    """Per-level Linear to a common width, then bilinear resize to the stride-4 grid and concatenation."""

    def __init__(self, in_dims: Sequence[int], width: int) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(dim, width) for dim in in_dims)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        maps = []
        for linear, feature in zip(self.linears, features, strict=True):
            embedded = linear(feature.flatten(2).transpose(1, 2)).transpose(1, 2)
            embedded = embedded.reshape(feature.shape[0], -1, *feature.shape[-2:])
            if embedded.shape[-2:] != size:
                embedded = F.interpolate(embedded, size=size, mode="bilinear", align_corners=False)
            maps.append(embedded)
        return torch.cat(maps, dim=1)


def _classifier(width: int, num_classes: int) -> nn.Sequential:
    conv = nn.Conv2d(width, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(0.1), conv)


class DAFormerHead(nn.Module):
    """Context-aware feature fusion (method.md section 2).

    Linear(C_i -> 256) per level, resized to stride 4 and concatenated (1024 channels); an ASPP-like
    fusion with dilations 1 (1x1 conv) and 6, 12, 18 (depthwise-separable), no image pooling; a 3x3
    bottleneck to 256; Dropout2d(0.1) and a 1x1 classifier.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        num_classes: int,
        *,
        width: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
    ) -> None:
        super().__init__()
        self.embed = _LevelEmbedding(in_dims, width)
        fused = width * len(in_dims)
        branches = []
        for dilation in dilations:
            if dilation == 1:
                branches.append(conv_bn_relu(fused, width, 1))
            else:
                branches.append(
                    nn.Sequential(
                        conv_bn_relu(fused, fused, 3, dilation=dilation, groups=fused),
                        conv_bn_relu(fused, width, 1),
                    )
                )
        self.aspp = nn.ModuleList(branches)
        self.bottleneck = conv_bn_relu(width * len(dilations), width, 3)
        self.classifier = _classifier(width, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Four maps (strides 4..32) -> logits (B, classes, H/4, W/4)."""
        x = self.embed(features)
        x = torch.cat([branch(x) for branch in self.aspp], dim=1)
        return self.classifier(self.bottleneck(x))


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP head: Linear to 768 per level, 1x1 conv fusion 3072 -> 768 + BN + ReLU."""

    def __init__(self, in_dims: Sequence[int], num_classes: int, *, width: int = 768) -> None:
        super().__init__()
        self.embed = _LevelEmbedding(in_dims, width)
        self.fuse = conv_bn_relu(width * len(in_dims), width, 1)
        self.classifier = _classifier(width, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Four maps (strides 4..32) -> logits (B, classes, H/4, W/4)."""
        return self.classifier(self.fuse(self.embed(features)))
