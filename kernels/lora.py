"""One LoRA linear layer, forward and backward written out as a single autograd node.

    y = W x + b + B z,   z = c · A (m ⊙ x)
    m: the dropout keep mask (all ones without dropout), c = (alpha/r) / q, q the keep probability

Shapes: x [N, in] (leading dims flattened), W [out, in], A [r, in], B [out, r], r small.

The composed layer (kernels/reference.py lora_linear: dropout, two thin linears, a scale and an
add) is a dozen autograd nodes and as many [N, in] / [N, out] temporaries per adapter-carrying
linear, and CLaRa puts an adapter on every linear of every block. Here:
  * the dropout mask is a uint8 0/1 tensor (kernels/masks.py keep_mask) and both alpha/r and 1/q
    scale the [N, r] product z, not the [N, in] input;
  * the low-rank product is accumulated into the base product's buffer (addmm_), so no [N, out]
    tensor is allocated, scaled or added for it;
  * the backward computes B's gradient as (z^T g)^T, an [r, N] x [N, out] product (the orientation
    in which r-wide GEMMs run fastest on CPU), and adds the adapter's share of the input gradient
    into the base one in place.
What is saved for backward: the input x itself (q, k and v share one), the mask m (one byte an
element) and z [N, r]; m ⊙ x is recomputed in backward for A's gradient, rather than keeping an
fp32 factor and a dropped copy of x per adapter.

Gradients: the base weight and bias get theirs only if they require grad (they are frozen in
CLaRa; a full fine-tune still works).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clara.kernels import reference
from clara.kernels.masks import keep_mask, keep_probability
from clara.kernels.matmul import WIDEN_MIN_ROWS, widen_on_this_cpu


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, keep, scale):
        # x [N, in]; keep [N, in] uint8 dropout mask or None; scale: c above
        out = F.linear(x, weight, bias)  # [N, out]
        # The mask is widened into a buffer that then takes the product in place: x * keep would
        # widen it into a hidden temporary and allocate the product besides.
        masked = x if keep is None else keep.to(x.dtype, copy=True).mul_(x)  # temporary
        z = masked.mm(lora_a.t())  # [N, r]
        del masked
        if scale != 1.0:
            z.mul_(scale)
        out.addmm_(z, lora_b.t())
        ctx.scale = scale
        ctx.save_for_backward(x, weight, keep, z, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, keep, z, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_z = grad.mm(lora_b)  # [N, r]: dL/dz
        if ctx.scale != 1.0:
            grad_z.mul_(ctx.scale)  # from here on, the gradient with respect to A (m ⊙ x)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        # The mask widened once for both of its uses below (each would widen it again by itself),
        # and not at all when neither the input's nor A's gradient is wanted.
        if keep is not None and (need_x or need_a):
            keep = keep.to(x.dtype, copy=True)
        if need_x:
            grad_x = grad.mm(weight)
            if keep is None:
                grad_x.addmm_(grad_z, lora_a)
            else:
                grad_x.addcmul_(grad_z.mm(lora_a), keep)
        if need_w:
            grad_w = grad.t().mm(x)
        if need_bias:
            grad_bias = grad.sum(0)
        if need_a:
            masked = x if keep is None else keep.mul_(x)  # m ⊙ x recomputed in the widened mask's buffer
            grad_a = grad_z.t().mm(masked)  # [r, in]
        if need_b:
            grad_b = z.t().mm(grad).t()  # [out, r]: dL/dB = g^T z (z as stored, scale included)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False
                ) -> torch.Tensor:
    """W x + b + scaling · B A dropout(x): [..., in] -> [..., out] in x's dtype.

    One autograd node when all four tensors share a dtype outside autocast, or when the CPU lacks
    bf16 GEMMs and x (or autocast) is bf16/fp16: then everything is widened to fp32 here, as
    clara.kernels.matmul.linear does. Otherwise (autocast on a device that multiplies low precision
    natively, or adapters in another dtype than the base), and whenever the reference switch is on
    for "lora", the composed reference (kernels/reference.py lora_linear) computes it.
    """
    widen = x.numel() >= WIDEN_MIN_ROWS * x.shape[-1] and widen_on_this_cpu(x)
    if reference.enabled("lora") or (not widen and (torch.is_autocast_enabled(x.device.type)
                                                    or not x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype)):
        return reference.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    keep, scale = None, scaling
    if training and dropout_p > 0.0:
        keep = keep_mask(x2.shape, dropout_p, device=x.device)
        scale = scaling / keep_probability(dropout_p, x.device)
    if widen:
        with torch.autocast("cpu", enabled=False):
            out = _LoRALinear.apply(x2.float(), weight.float(), None if bias is None else bias.float(),
                                    lora_a.float(), lora_b.float(), keep, scale)
        return out.view(*lead, -1).to(x.dtype)
    return _LoRALinear.apply(x2, weight, bias, lora_a, lora_b, keep, scale).view(*lead, -1)
