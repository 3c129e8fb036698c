"""U-Net pieces: a decoder over any multi-scale encoder, and the ResNet-style CNN encoder of "U-Net (C)".

The decoder is the authors' HR decoder (channels 256/128/64/32/16, method.md section 4): five blocks,
each doubling the resolution from stride 32 to stride 1, concatenating the encoder map of the same
stride where there is one (MiT has strides 4..32, the CNN 2..32), then two 3x3 conv + BN + ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from damformer.models.heads import conv_bn_relu


class UNetDecoder(nn.Module):
    """Decoder from stride 32 to full resolution with skip connections; logits at stride 1.

    Args:
        in_dims: channels of the encoder maps.
        in_strides: their strides (ascending, the last one 32).
        num_classes: output classes.
        channels: widths of the five decoder blocks (stride 16, 8, 4, 2, 1).
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        *,
        channels: Sequence[int] = (256, 128, 64, 32, 16),
    ) -> None:
        super().__init__()
        self.skip_index = {stride: i for i, stride in enumerate(in_strides)}
        deepest = in_strides[-1]
        self.strides = [deepest // 2 ** (i + 1) for i in range(len(channels))]
        blocks, previous = [], in_dims[-1]
        for stride, width in zip(self.strides, channels, strict=True):
            skip = in_dims[self.skip_index[stride]] if stride in self.skip_index else 0
            blocks.append(
                nn.Sequential(conv_bn_relu(previous + skip, width, 3), conv_bn_relu(width, width, 3))
            )
            previous = width
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Conv2d(previous, num_classes, 3, padding=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Encoder maps -> logits (B, classes, H, W) at the stride of the last block (1 by default)."""
        x = features[-1]
        for stride, block in zip(self.strides, self.blocks, strict=True):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if stride in self.skip_index:
                x = torch.cat([x, features[self.skip_index[stride]]], dim=1)
            x = block(x)
        return self.classifier(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, identity (or 1x1 projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class ResNetEncoder(nn.Module):
    """ResNet-18-style encoder for any number of bands (no pretrained weights needed).

    Forward: ``(B, in_chans, H, W)`` -> maps at strides 2, 4, 8, 16, 32 with 64, 64, 128, 256, 512
    channels (``out_dims`` / ``out_strides``).
    """

    def __init__(
        self, in_chans: int = 3, *, widths: Sequence[int] = (64, 128, 256, 512), depth: int = 2
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers, previous = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(previous, width, stride)] + [
                BasicBlock(width, width) for _ in range(depth - 1)
            ]
            layers.append(nn.Sequential(*blocks))
            previous = width
        self.layers = nn.ModuleList(layers)
        self.out_dims = [widths[0], *widths]
        self.out_strides = [2, 4, 8, 16, 32]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x_bchw: torch.Tensor) -> list[torch.Tensor]:  # noqa: D102
        x = self.stem(x_bchw)
        features = [x]
        x = F.max_pool2d(x, 3, 2, 1)
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features
