"""A depthwise convolution whose weight gradient has the parameter's strides on every device.

``nn.Conv2d(C, C, k, groups=C)`` stores its weight as (C, 1, k, k). The gradient its backward returns
has another stride on the size-1 dimension (``[k*k, 1, k, 1]`` on CPU) than the parameter
(``[k*k, k*k, k, 1]``): the same memory, but DDP compares strides literally, warns "Grad strides do not
match bucket view strides" and copies the gradient into its bucket instead of using it in place.
Stored as (C, k, k) and viewed as (C, 1, k, k) in ``forward``, the weight gets its gradient through
that view's backward, which drops the size-1 dimension: contiguous, like the parameter.

State dicts hold the parameter as it is, (C, k, k); loading also accepts ``nn.Conv2d``'s (C, 1, k, k),
so SegFormer weights and checkpoints written before this module load unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class DepthwiseConv2d(nn.Module):
    """``nn.Conv2d(channels, channels, kernel, padding=dilation * (kernel // 2), groups=channels)``."""

    def __init__(self, channels: int, kernel: int, *, dilation: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.dilation = channels, kernel, dilation
        self.weight = nn.Parameter(torch.empty(channels, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        # nn.Conv2d's default initialisation: the same bounds and the same random draws
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(kernel * kernel)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        padding = self.dilation * (self.kernel_size // 2)
        weight = self.weight.unsqueeze(1)
        return F.conv2d(x, weight, self.bias, padding=padding, dilation=self.dilation, groups=self.channels)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 4:
            state_dict[key] = state_dict[key].squeeze(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}"
