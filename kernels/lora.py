"""One LoRA linear layer, forward and backward written out as a single autograd node.

    y = W x + b + B (A (f ⊙ x)),   f = (alpha/r) · m / q   (dropout mask m, keep probability q)
    y = W x + b + (alpha/r) · B (A x)                       (no dropout)

Shapes: x [N, in] (leading dims flattened), W [out, in], A [r, in], B [out, r], r small.

Why one node instead of the dozen that dropout, two thin linears, a scale and an add make: a
stage-1 step of SmolLM2-135M runs 420 adapter-carrying linears forward and back, and on 2 CPU
cores the per-op costs (allocations, autograd bookkeeping, extra elementwise passes over [N, in]
and [N, out]) added up to a fifth of the step. Here:
  * alpha/r is folded into the dropout factor, so dropping and scaling the input is one multiply;
  * the low-rank product is accumulated into the base product's buffer (addmm_), so no [N, out]
    tensor is allocated, scaled or added for it;
  * the backward picks the GEMM orientations that run fastest for r-wide operands (B's gradient
    as (z^T g)^T: an [r, N] x [N, out] product, measured 2.4x faster than g^T z on AVX-512), and
    adds the adapter's share of the input gradient into the base one in place.
What is saved for backward is what autograd saved before: the dropped input f ⊙ x (A's gradient
needs it), the factor f (the input gradient needs it) and z = A (f ⊙ x) [N, r].

Gradients: the base weight and bias get theirs only if they require grad (they are frozen in
CLaRa; a full fine-tune still works, x is then saved too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dropout import dropout_factor
from kernels.matmul import WIDEN_MIN_ROWS, widen_on_this_cpu


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, factor, scaling):
        # x [N, in]; factor [N, in] (dropout, alpha/r folded in) or None (then scaling applies to z)
        out = F.linear(x, weight, bias)  # [N, out]
        dropped = x if factor is None else x * factor
        z = dropped.mm(lora_a.t())  # [N, r]
        if factor is None and scaling != 1.0:
            z.mul_(scaling)
        out.addmm_(z, lora_b.t())
        ctx.scaling = 1.0 if factor is not None else scaling
        ctx.save_for_backward(x if weight.requires_grad else None, weight, dropped, factor, z, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, dropped, factor, z, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_z = grad.mm(lora_b)  # [N, r]: dL/dz
        if ctx.scaling != 1.0:
            grad_z.mul_(ctx.scaling)  # z = s · A x: the gradient through A x carries s
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = grad.mm(weight)
            if factor is None:
                grad_x.addmm_(grad_z, lora_a)
            else:
                grad_x.addcmul_(grad_z.mm(lora_a), factor)
        if need_w:
            grad_w = grad.t().mm(x)
        if need_bias:
            grad_bias = grad.sum(0)
        if need_a:
            grad_a = grad_z.t().mm(dropped)  # [r, in]
        if need_b:
            grad_b = z.t().mm(grad).t()  # [out, r]: dL/dB = g^T z (z as stored, scale included)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False
                ) -> torch.Tensor | None:
    """W x + b + scaling · B A dropout(x) as one autograd node; None when the dtypes call for the
    caller's plain composition instead (autocast on a device that multiplies low precision
    natively, or mixed dtypes outside autocast).

    x [..., in] -> [..., out] in x's dtype. On CPUs without bf16 GEMMs a low-precision x (or autocast
    to bf16/fp16) is widened to fp32 here as kernels.matmul.linear does, with fp32 adapters.
    """
    widen = x.numel() >= WIDEN_MIN_ROWS * x.shape[-1] and widen_on_this_cpu(x)
    if not widen and (torch.is_autocast_enabled(x.device.type)
                      or not x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype):
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    factor = None
    if training and dropout_p > 0.0:
        factor = dropout_factor(x2.shape, dropout_p, scaling, device=x.device)
    if widen:
        with torch.autocast("cpu", enabled=False):
            out = _LoRALinear.apply(x2.float(), weight.float(), None if bias is None else bias.float(),
                                    lora_a.float(), lora_b.float(), factor, scaling)
        return out.view(*lead, -1).to(x.dtype)
    if factor is not None:
        factor = factor.to(x.dtype)
    return _LoRALinear.apply(x2, weight, bias, lora_a, lora_b, factor, scaling).view(*lead, -1)
