"""SwiGLU's gate, silu(gate) ⊙ up, as one autograd node that keeps only its two inputs.

    y = silu(g) ⊙ u,   silu(g) = g σ(g)
    dL/du = d ⊙ silu(g),   dL/dg = d ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))

Composed (kernels/reference.py swiglu), autograd keeps g (for silu's backward), silu(g) and u (for
the product's): three [T, F] tensors a block, the largest activations in the model. silu(g) is
cheap to recompute from g, so this node keeps g and u only and rebuilds silu(g) in backward, from
data the backward reads anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clara.kernels import reference


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        # Two [T, F] allocations, each result written over its own temporary.
        grad_up = F.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = grad * up
            torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: [..., F] x [..., F] -> [..., F]."""
    if reference.enabled("swiglu"):
        return reference.swiglu(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate).mul_(up)
