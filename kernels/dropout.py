"""Dropout as one autograd node that keeps only its factor for the backward.

    y = x ⊙ f,   f = m / q,   m_i ~ Bernoulli(q),   q = the keep probability
    dL/dx = g ⊙ f

On CPU the mask comes from kernels/masks.py (numpy's SFC64, written out directly as the fp32
factor f; the same seed gives the same mask as torch's RNG state would restore). The node keeps f
in the input's dtype for its backward, as torch's CPU dropout keeps its mask. The reference path
(kernels/reference.py dropout) multiplies by the same factor with autograd's own multiply.

Other devices (and p = 0 or eval mode) use F.dropout unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clara.kernels import reference
# The mask draws live in kernels/masks.py; imported here under their long-standing names.
from clara.kernels.masks import LEVELS, dropout_factor, keep_mask, keep_probability  # noqa: F401


class _MultiplyByFactor(torch.autograd.Function):
    """y = x · f for a constant factor f (the dropout mask over the keep probability); the backward
    multiplies the gradient by the same f, which is all that is kept for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)
        return x * factor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (factor,) = ctx.saved_tensors
        return grad * factor, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with the fast mask on CPU floating-point tensors."""
    if training and not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if reference.enabled("dropout"):
        return reference.dropout(x, p, training)
    if not training or p == 0.0 or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)
    return _MultiplyByFactor.apply(x, dropout_factor(x.shape, p).to(x.dtype))


class Dropout(nn.Module):
    """nn.Dropout with the fast CPU mask (no parameters, no state-dict entries)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
