"""Matrix multiplies for low-precision weights on CPUs without native bf16/fp16 dot products.

On CPUs with AVX512-BF16 or AMX, oneDNN multiplies bf16 matrices natively. Without them (AVX2-only
machines, many AMD EPYCs among them) torch falls back to a generic bf16 GEMM that runs several
times slower than fp32 on the same cores (`python bench/matmul.py` compares them on this machine).
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
# the bf16 kernel reads half the bytes and wins (decoding one token). From a few rows on, the
# multiply is bound by arithmetic and widening wins.
WIDEN_MIN_ROWS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, widened to fp32 on CPUs that lack bf16/fp16 GEMMs; returns x's dtype."""
    if x.numel() < WIDEN_MIN_ROWS * x.shape[-1] or not widen_on_this_cpu(x):
        return F.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose multiply goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
