"""The blocks' LeakyReLU: PyTorch's values and gradients, with one activation less held for backward."""

from __future__ import annotations

import torch
from torch import nn

LEAKY_SLOPE = 0.01  # LeakyReLU negative slope of every block (PyTorch's default, the paper's)


class _LeakyReLUSavingOutput(torch.autograd.Function):
    """LeakyReLU whose backward reads the sign of its *output* (equal to the input's for a positive
    slope), so autograd keeps the output, which the next layer or the learning signal holds anyway,
    instead of a second full-size tensor: the same gradients for one activation less per block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float) -> torch.Tensor:
        out = torch.nn.functional.leaky_relu(x, slope)
        ctx.save_for_backward(out)
        ctx.slope = slope
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.leaky_relu_backward(grad, out, ctx.slope, True), None


class LeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` with the same values and gradients and less memory held for backward."""

    def __init__(self, negative_slope: float = LEAKY_SLOPE) -> None:
        if not negative_slope > 0:
            raise ValueError("the output's sign gives the gradient only for a positive slope")
        super().__init__(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return _LeakyReLUSavingOutput.apply(x, self.negative_slope)
