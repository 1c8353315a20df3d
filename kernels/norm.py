"""RMSNorm as one autograd node: y = w ⊙ n,  n = x / sqrt(mean(x²) + eps), computed in fp32.

The composed version (kernels/reference.py rms_norm: cast, square, mean, add, rsqrt, multiply,
cast, multiply) leaves autograd a chain of nodes to walk backward, several of them over the whole
[N, E] tensor, and keeps their inputs. Written out, the backward is

    g_n = g ⊙ w,   dL/dx = r ⊙ (g_n − n ⊙ mean(g_n ⊙ n)),   r = 1 / sqrt(mean(x²) + eps)

(one row statistic and three passes), and only x's per-row r is kept besides x itself.
Values follow the reference exactly: statistics in fp32 (fp64 for fp64 inputs), n rounded to x's
dtype, then times w in the dtype that w and x promote to.
"""

from __future__ import annotations

import torch

from clara.kernels import reference


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _normalise(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.to(_stats_dtype(x))
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))  # [..., 1]
    return weight * (xf * r).to(x.dtype), r


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, r = _normalise(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xf = x.to(r.dtype)
        grad_x = grad_w = None
        n = xf * r  # [..., E] fp32
        if ctx.needs_input_grad[0]:
            g_n = grad.to(r.dtype) * weight.to(r.dtype)
            dot = (g_n * n).mean(-1, keepdim=True)  # [..., 1]
            grad_x = g_n.sub_(n.mul(dot)).mul_(r).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad * n.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2, -1) + eps)) with fp32 statistics: [..., E] -> [..., E]."""
    if reference.enabled("rms_norm"):
        return reference.rms_norm(x, weight, eps)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    # Inference: the formula without an autograd node (decoding builds two norms per block a token).
    return _normalise(x, weight, eps)[0]
