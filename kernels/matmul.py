"""Matrix multiplies for low-precision weights on CPUs without native bf16/fp16 dot products.

On CPUs with AVX512-BF16 or AMX, oneDNN multiplies bf16 matrices natively. Without them (AVX2-only
machines, many AMD EPYCs among them) torch falls back to a generic bf16 GEMM that we measured at
18.6 GFLOP/s against 102.6 GFLOP/s for fp32 on the same 2 cores (`python bench/matmul.py`).
There we widen the operands to fp32 and multiply there. The result is what a bf16 GEMM computes
anyway: the products of two bf16 numbers are exact in fp32 and the sum is accumulated in fp32; only
the summation order differs. Weights stay stored in bf16, so memory is still halved.

CLARA_LOW_PRECISION_MATMUL=native|fp32 overrides the detection.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    forced = os.environ.get("CLARA_LOW_PRECISION_MATMUL", "").strip().lower()
    if forced in ("native", "fp32"):
        return forced == "native"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # macOS, Windows: trust the platform's own kernels
        return True
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16"))


def widen_on_this_cpu(t: torch.Tensor) -> bool:
    """True when a low-precision op on `t` should run in fp32 instead (see the module docstring)."""
    if t.device.type != "cpu" or cpu_has_native_bf16():
        return False
    return t.dtype in LOW_PRECISION or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in LOW_PRECISION
    )


# Below this many input rows the multiply is a matrix-vector product, bound by reading the weight:
# the bf16 kernel reads half the bytes and wins (decoding one token: 140 us native vs 273 us
# widened for a 576 -> 1536 layer; at 4 rows widening already wins, 432 us vs 562 us).
WIDEN_MIN_ROWS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, widened to fp32 on CPUs that lack bf16/fp16 GEMMs; returns x's dtype."""
    if x.numel() < WIDEN_MIN_ROWS * x.shape[-1] or not widen_on_this_cpu(x):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


class _AccumulateLowRank(torch.autograd.Function):
    """out += z up^T in place (out [N, o], z [N, r], up [o, r], all 2-D and one dtype).

    Written out so that the backward takes up's gradient as grad^T z ([o, N] x [N, r]), the
    orientation F.linear's backward uses: autograd's addmm_ formula computes z^T grad
    ([r, N] x [N, o]) instead, which this CPU's GEMM runs at about half the speed for r = 16.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, z: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(out)
        ctx.save_for_backward(z, up)
        return out.addmm_(z, up.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, up = ctx.saved_tensors
        grad_z = grad.mm(up) if ctx.needs_input_grad[1] else None
        grad_up = grad.t().mm(z) if ctx.needs_input_grad[2] else None
        return grad, grad_z, grad_up


def linear_lowrank(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor,
                   up: torch.Tensor) -> torch.Tensor:
    """linear(x, weight, bias) + z up^T: the LoRA layer's W x + b + B (s A dropout(x)), z = s A dropout(x).

    x [..., in], z [..., r] (r small), up [out, r] -> [..., out] in x's dtype. Where the dtypes allow,
    the low-rank product is accumulated into the base product's own buffer, so no [..., out]
    tensor is allocated, scaled or added for it: several elementwise passes over the largest
    activations of every layer, measured by bench/train_step.py. Widened (bf16 on CPUs without
    bf16 GEMMs) both products are summed in fp32 and rounded once. Otherwise (autocast choosing
    the dtypes, mixed dtypes) it is the plain sum.
    """
    lead, n_out = x.shape[:-1], weight.shape[0]
    # 2-D throughout: an in-place op on a view would make autograd copy the whole output.
    x2, z2 = x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])
    if x.numel() >= WIDEN_MIN_ROWS * x.shape[-1] and widen_on_this_cpu(x):
        with torch.autocast("cpu", enabled=False):
            out = F.linear(x2.float(), weight.float(), None if bias is None else bias.float())
            out = _AccumulateLowRank.apply(out, z2.float(), up.float())
        return out.view(*lead, n_out).to(x.dtype)
    if not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype == z.dtype == up.dtype:
        out = _AccumulateLowRank.apply(F.linear(x2, weight, bias), z2, up)
        return out.view(*lead, n_out)
    return linear(x, weight, bias) + linear(z, up).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose multiply goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
