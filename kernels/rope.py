"""Rotary position embedding (rotate-half layout) as one autograd node.

    y = x ⊙ cos + rotate_half(x) ⊙ sin,   rotate_half([x1, x2]) = [−x2, x1]

The composed form (kernels/reference.py apply_rotary: chunk, neg, cat, two multiplies, an add)
makes several temporaries of x's size and as many backward nodes. Written out, the forward is one
multiply and two in-place multiply-adds over the halves, and since rotate_half is a rotation its
transpose is [g1, g2] -> [g2, −g1], so the backward has the same shape and needs only cos and sin:

    dL/dx = g ⊙ cos + [g2 ⊙ sin2, −g1 ⊙ sin1]

Only the first R = cos.shape[-1] dims rotate (partial rotary leaves the rest untouched).
"""

from __future__ import annotations

import torch

from clara.kernels import reference


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, L, R], cos/sin [B or 1, 1, L, R]
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
    out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        grad_x = grad * cos
        grad_x[..., :h].addcmul_(grad[..., h:], sin[..., h:])
        grad_x[..., h:].addcmul_(grad[..., :h], sin[..., :h], value=-1)
        return grad_x, None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, L, D]; cos, sin: [B or 1, 1, L, R] with R <= D even."""
    if reference.enabled("rotary"):
        return reference.apply_rotary(x, cos, sin)
    r = cos.shape[-1]
    # Inference: the formula itself, without an autograd node (decoding builds two per block a token).
    rotate = _Rotary.apply if torch.is_grad_enabled() and x.requires_grad else _rotate
    if r == x.shape[-1]:
        return rotate(x, cos, sin)
    return torch.cat((rotate(x[..., :r], cos, sin), x[..., r:]), dim=-1)
