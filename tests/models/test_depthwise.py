"""DepthwiseConv2d: nn.Conv2d's maths and weights, with a gradient in the parameter's own layout."""

import torch
from torch import nn

from damformer.models.depthwise import DepthwiseConv2d


def test_same_output_and_gradients_as_nn_conv2d_and_its_weights_load():
    torch.manual_seed(0)
    reference = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
    ours = DepthwiseConv2d(8, 3, dilation=2)
    ours.load_state_dict(reference.state_dict())  # (C, 1, k, k) accepted
    assert ours.weight.shape == (8, 3, 3) and ours.state_dict()["weight"].shape == (8, 3, 3)
    x = torch.randn(2, 8, 11, 13, requires_grad=True)
    torch.testing.assert_close(ours(x), reference(x))
    ours(x).square().sum().backward()
    ours_grad = ours.weight.grad.clone()
    reference(x).square().sum().backward()
    torch.testing.assert_close(ours_grad, reference.weight.grad.squeeze(1))
    # the layout DDP checks: the gradient has the parameter's strides (nn.Conv2d's does not, on CPU)
    assert ours.weight.grad.stride() == ours.weight.stride()


def test_same_initial_values_as_nn_conv2d_from_the_same_seed():
    torch.manual_seed(3)
    reference = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    torch.manual_seed(3)
    ours = DepthwiseConv2d(16, 3)
    torch.testing.assert_close(ours.weight, reference.weight.detach().squeeze(1), rtol=0, atol=0)
    torch.testing.assert_close(ours.bias, reference.bias.detach(), rtol=0, atol=0)
