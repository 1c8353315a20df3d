"""A linear layer over a quantized frozen weight, dequantized per call and never kept.

    y = x Wᵀ + b,   W = dequantize(dtype)   (clara/quant.py: NF4 or int8 codes -> [out, in])

Autograd would keep the dequantized W alive from the forward to the backward (it is an input of
the multiply), which for a 7B model is the whole unquantized weight set during every backward.
This node saves only the dequantize function: the backward dequantizes W again for the input
gradient, so one layer's W exists at a time, in forward and backward alike. W is frozen: it gets
no gradient, and neither does the bias.

The dtype of the multiply is autocast's where autocast is on (it does not reach into a custom
node by itself), else the input's; on CPUs without bf16 GEMMs a multiply of several rows runs in
fp32, as clara.kernels.matmul.linear does.

An int8 weight on CPU, where no gradient is wanted, a bf16 input and at most a few rows (decoding
a token) is multiplied as int8 by torch's weight-only kernel (`aten._weight_int8pack_mm`, the one
gpt-fast's int8 mode uses), without any dequantized copy: a decode step then reads one byte per
weight. Measured on a 14336 x 4096 weight, one thread: 3.7 ms against 8.8 ms for the bf16 matmul
at one row; but 90 ms against 23 ms at 64 rows, and with fp32 inputs the kernel takes a slow
path (64 ms at one row), so prefill and fp32 models take the dequantizing path.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from clara.kernels.matmul import LOW_PRECISION, WIDEN_MIN_ROWS, cpu_has_native_bf16

Dequantize = Callable[[torch.dtype], torch.Tensor]


class _DequantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, dequantize):
        # x [N, in] in the multiply's dtype; bias [out] of that dtype or None
        weight = dequantize(x.dtype)
        out = F.linear(x, weight, bias)
        ctx.dequantize = dequantize
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad.mm(ctx.dequantize(grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def dequant_linear(x: torch.Tensor, dequantize: Dequantize, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[..., in] -> [..., out]: x times the dequantized weight, plus bias; in x's dtype (autocast's)."""
    dtype = compute_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    widen = (x2.shape[0] >= WIDEN_MIN_ROWS and dtype in LOW_PRECISION and x.device.type == "cpu"
             and not cpu_has_native_bf16())
    work = torch.float32 if widen else dtype
    with torch.autocast(x.device.type, enabled=False):
        out = _DequantLinear.apply(x2.to(work), None if bias is None else bias.to(work), dequantize)
    return out.to(dtype).view(*lead, -1)


def _int8_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


# The int8 kernel beats a bf16 matmul only for matrix-vector-like products (see the docstring).
INT8_KERNEL_MAX_ROWS = 8


def int8_linear_without_grad(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x times the int8 weight (codes [out, in], one scale a row) by the int8 kernel, or None where
    that kernel does not apply or would be slower (a gradient is wanted, not on CPU, not bf16, more
    than INT8_KERNEL_MAX_ROWS rows, or this torch lacks it)."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad) or not _int8_kernel_available():
        return None
    dtype = compute_dtype(x)
    rows = x.numel() // x.shape[-1]
    if dtype != torch.bfloat16 or rows > INT8_KERNEL_MAX_ROWS:
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    with torch.autocast("cpu", enabled=False):
        out = torch.ops.aten._weight_int8pack_mm(x2, codes, scales.to(dtype))
        if bias is not None:
            out = out + bias.to(dtype)
    return out.view(*lead, -1)
