"""Dropout whose CPU mask comes from a fast generator instead of torch's bernoulli_.

    y = x · m / q,   m_i ~ Bernoulli(q) independently,   q = the keep probability

torch draws a CPU dropout mask element by element through bernoulli_ (about 10 ns per element on
the 2-core EPYC this was measured on). LoRA dropout on every linear layer draws one mask per
adapter input: about 107 million elements in one stage-1 step of SmolLM2-135M (batch 2, 256-token
documents), 0.8 s of a 4.6 s step (`python bench/train_step.py --profile`). Here the mask is drawn
as 16-bit integers by numpy's SFC64 generator (about 1 ns per element), compared against a
threshold, and written out by numpy either as the fp32 factor m / q in the same pass
(`dropout_factor`, for `dropout` below: torch's CPU dropout keeps such a mask in the input's dtype
for the backward as well) or as a uint8 0/1 mask (`keep_mask`, for kernels/lora.py, which keeps the
mask for the backward and applies 1/q to its rank-r product instead).

Randomness: the generator is restarted for every mask from words drawn from torch's default CPU
generator, so torch.manual_seed, a saved and restored RNG state (exact resume) and activation
checkpointing (which replays the RNG state for the recomputation) give the same masks, as with
torch's dropout.
Resolution: m_i = 1 with probability q = (65536 - round(p · 65536)) / 65536, so p = 0.1 drops with
probability 0.1000061; the output is divided by that same q, so E[y] = x exactly.

Other devices (and p = 0 or eval mode) use F.dropout unchanged.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LEVELS = 1 << 16  # the mask is drawn as uniform 16-bit integers


def _on_cpu(device) -> bool:
    return device is None or torch.device(device).type == "cpu"


def keep_probability(p: float, device=None) -> float:
    """The probability an element is kept: on CPU after rounding p to the 16-bit grid of the numpy
    draw, elsewhere (torch's bernoulli_) exactly 1 - p."""
    if not _on_cpu(device):
        return 1 - p
    return (LEVELS - round(p * LEVELS)) / LEVELS


_THREAD = threading.local()  # one SFC64 per thread, restarted for every draw


def _restarted_sfc64() -> np.random.SFC64:
    """This thread's SFC64, started afresh from three 64-bit words of torch's generator (see the
    module docstring), the way SFC64 seeds itself: the words, a counter of 1, 12 outputs thrown
    away. Drawing a seed and building np.random.SFC64(seed) for every mask, which hashes the seed
    through a SeedSequence, took 70-92 ms of the 420 masks of SmolLM2's stage-1 step; this takes
    48-54 ms (timed inside the step)."""
    generator = getattr(_THREAD, "sfc64", None)
    if generator is None:
        generator = _THREAD.sfc64 = np.random.SFC64(0)
    words = torch.randint(-(2**63), 2**63 - 1, (3,), dtype=torch.int64).numpy().view(np.uint64)
    generator.state = {"bit_generator": "SFC64", "state": {"state": np.append(words, np.uint64(1))},
                       "has_uint32": 0, "uinteger": 0}
    generator.random_raw(12)
    return generator


def _keep_bits(n: int, p: float, out: np.ndarray | None = None) -> np.ndarray:
    """n booleans (into `out` if given), each True with probability keep_probability(p)."""
    # Raw 64-bit outputs cut into four 16-bit integers each: uniform on [0, 65536), and cheaper
    # than asking the generator for bounded integers.
    bits = _restarted_sfc64().random_raw(-(-n // 4)).view(np.uint16)[:n]
    return np.greater_equal(bits, round(p * LEVELS), out=out)


def keep_mask(shape: torch.Size, p: float, device=None) -> torch.Tensor:
    """uint8 tensor of `shape`: 1 where kept (probability keep_probability(p, device)), 0 where dropped.

    The same draw as dropout_factor (same seed, same decisions), one byte an element instead of
    four: kernels/lora.py keeps it for the backward and scales the [N, r] product instead of x.
    numpy writes the comparison straight into torch-allocated memory. Other devices: bernoulli_.
    """
    if not _on_cpu(device):
        return torch.empty(shape, dtype=torch.uint8, device=device).bernoulli_(1 - p)
    mask = torch.empty(shape, dtype=torch.uint8)
    _keep_bits(mask.numel(), p, out=mask.numpy().reshape(-1).view(np.bool_))
    return mask


def dropout_factor(shape: torch.Size, p: float, scale: float = 1.0, device=None) -> torch.Tensor:
    """fp32 tensor of `shape`: scale / keep_probability(p) where kept, 0 where dropped.

    x * dropout_factor(x.shape, p) is dropout(x, p); `scale` multiplies the kept values too, so
    dropping and scaling is one multiply. On CPU the factor is written by numpy in one pass from the
    boolean draw (a uint8 mask widened and scaled by torch takes two more). Elsewhere the mask comes
    from torch's bernoulli_ on the device.
    """
    if not _on_cpu(device):
        return torch.empty(shape, device=device).bernoulli_(1 - p).mul_(scale / keep_probability(p, device))
    factor = torch.empty(shape, dtype=torch.float32)  # torch's allocator: memory accounting sees it
    value = np.float32(scale / keep_probability(p))
    np.multiply(_keep_bits(factor.numel(), p), value, out=factor.numpy().reshape(-1))
    return factor


class _MultiplyByFactor(torch.autograd.Function):
    """y = x · f for a constant factor f (the dropout mask over the keep probability); the backward
    multiplies the gradient by the same f, which is all that is kept for it (as torch's CPU dropout
    keeps its mask in the input's dtype)."""

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
    if not training or p == 0.0 or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
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
