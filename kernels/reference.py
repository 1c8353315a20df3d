"""The reference path: every fused op of clara.kernels written as plain composed PyTorch, and the
switch that routes the library through it.

Each fused op (kernels/norm.py, rope.py, swiglu.py, dropout.py, lora.py) is one autograd node with
a hand-written backward, built to save memory and per-op overhead. The functions below compute the
same values with ordinary tensor ops, so autograd derives the backward by itself. They are the
definition the fused nodes are tested against (tests/test_reference_path.py), and the place to
read or change the math: with the switch on, the decoder and the LoRA layers call these instead,
so an edit here takes effect without touching a backward.

    rms_norm(x, w, eps)     w · x / sqrt(mean(x²) + eps)          fused: kernels/norm.py
    apply_rotary(x, c, s)   x · cos + rotate_half(x) · sin         fused: kernels/rope.py
    swiglu(g, u)            silu(g) · u                            fused: kernels/swiglu.py
    dropout(x, p)           x · m / q                              fused: kernels/dropout.py
    lora_linear(...)        W x + b + (alpha/r) · B A dropout(x)   fused: kernels/lora.py

The switch (process-wide, not per thread: autograd's backward and activation checkpointing's
recomputation may run on other threads and must see the same choice):

    import clara.kernels as K
    K.use_reference_kernels(True)                   # every op, from now on
    K.use_reference_kernels(False)                  # the fused nodes again
    with K.use_reference_kernels():                 # every op, inside the block only
        ...
    with K.use_reference_kernels(["rms_norm", "rotary"]):   # these ops only, inside the block
        ...
    K.reference_kernels_enabled("lora")             # is this op on the reference path now?

    CLARA_REFERENCE_KERNELS=1 python ...            # every op, from import on
    CLARA_REFERENCE_KERNELS=lora,dropout python ... # some ops

Op names: see OPS. A call sets exactly the ops it names (the others go back to their fused node);
leaving a `with` block restores the set that was active before it.

On CPU, dropout draws its mask from kernels/masks.py on both paths, so after the same torch seed
the reference and the fused LoRA layer drop the same elements. Multiplies go through
clara.kernels.matmul.linear, which is F.linear except that it widens bf16/fp16 to fp32 on CPUs
without low-precision GEMMs: a dtype choice, not an autograd node, shared by both paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from clara.kernels.masks import dropout_factor
from clara.kernels.matmul import linear

OPS = ("rms_norm", "rotary", "swiglu", "dropout", "lora")
ENV_VAR = "CLARA_REFERENCE_KERNELS"
_ALL = frozenset(OPS)
_ON_WORDS = {"1", "true", "yes", "on", "all"}
_OFF_WORDS = {"", "0", "false", "no", "off", "none"}


# ------------------------------------------------------------------------------------------------
# The switch
# ------------------------------------------------------------------------------------------------
def _op_set(ops: bool | str | Iterable[str] | None) -> frozenset[str]:
    """True / False / None, a comma-separated string (or one of _ON_WORDS / _OFF_WORDS), or op names."""
    if ops is None or ops is False:
        return frozenset()
    if ops is True:
        return _ALL
    if isinstance(ops, str):
        word = ops.strip().lower()
        if word in _ON_WORDS:
            return _ALL
        if word in _OFF_WORDS:
            return frozenset()
        ops = [name.strip() for name in word.split(",") if name.strip()]
    names = frozenset(ops)
    unknown = sorted(names - _ALL)
    if unknown:
        raise ValueError(f"unknown reference kernel(s) {unknown}; the ops are {list(OPS)} (or True for all)")
    return names


def _from_environment() -> frozenset[str]:
    try:
        return _op_set(os.environ.get(ENV_VAR, ""))
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: {e}") from None


_active: frozenset[str] = _from_environment()


def enabled(op: str) -> bool:
    """True when `op` (one of OPS) runs on the reference path; what the fused ops ask on every call."""
    return op in _active


def reference_kernels_enabled(op: str | None = None) -> bool:
    """Whether `op` runs on the reference path now; without `op`, whether any op does."""
    if op is None:
        return bool(_active)
    if op not in _ALL:
        raise ValueError(f"unknown reference kernel {op!r}; the ops are {list(OPS)}")
    return op in _active


def active_reference_kernels() -> frozenset[str]:
    """The ops on the reference path now."""
    return _active


class use_reference_kernels:  # noqa: N801  (used like a function, as torch.set_grad_enabled)
    """Route `ops` through the reference path (True: all of OPS; False: none; or op names).

    Takes effect when called. Used as a context manager, it restores the previous choice on exit.
    """

    def __init__(self, ops: bool | str | Iterable[str] = True):
        global _active
        chosen = _op_set(ops)
        self.previous = _active
        _active = chosen

    def __enter__(self) -> use_reference_kernels:
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = self.previous


# ------------------------------------------------------------------------------------------------
# The ops, composed
# ------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / sqrt(mean(x², -1) + eps): [..., E] -> [..., E].

    The statistics are taken in fp32 (fp64 for fp64 inputs) and the normalised x is rounded to x's
    dtype before the weight multiplies it, as Hugging Face's Llama does; the product has the dtype
    that weight and x promote to.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normalised = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return weight * normalised.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (the rotate-half layout of Hugging Face checkpoints)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin on the first R dims of x; the rest pass unchanged.

    x: [B, H, L, D]; cos, sin: [B or 1, 1, L, R] with R <= D even (R < D: partial rotary).
    """
    r = cos.shape[-1]
    rotated = x[..., :r] * cos + rotate_half(x[..., :r]) * sin
    if r == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., r:]), dim=-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, silu(g) = g · sigmoid(g): [..., F] x [..., F] -> [..., F]."""
    return F.silu(gate) * up


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """x · m / q with m ~ Bernoulli(q) per element, q the keep probability; x itself in eval mode or
    at p = 0.

    On CPU the mask is kernels/masks.py's (q is 1 - p rounded to a 16-bit grid), the draw the fused
    LoRA node makes too. On other devices F.dropout draws and keeps its own (boolean) mask.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    return x * dropout_factor(x.shape, p).to(x.dtype)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False
                ) -> torch.Tensor:
    """W x + b + scaling · B A dropout(x): [..., in] -> [..., out] in x's dtype.

    W [out, in], b [out] (the frozen base); A [r, in], B [out, r] (the adapter); scaling = alpha / r.
    The adapter's part is computed in A's dtype (fp32 adapters on a bf16 base stay fp32), and the
    scaling multiplies the r-wide product rather than the out-wide one: the same value, a smaller
    tensor. This is also what kernels/lora.py runs for dtype mixes its node does not take (autocast
    on GPUs, adapters in another dtype than the base).
    """
    return linear(x, weight, bias) + lora_delta(x, lora_a, lora_b, scaling, dropout_p, training)


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
               dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """The adapter's share alone, scaling · B A dropout(x), in x's dtype (a quantized base adds it
    to its own product: clara/lora.py)."""
    h = dropout(x.to(lora_a.dtype), dropout_p, training)  # [..., in]
    z = linear(h, lora_a) * scaling  # [..., r]
    return linear(z, lora_b).to(x.dtype)
