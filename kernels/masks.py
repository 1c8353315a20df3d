"""Dropout masks drawn on CPU by numpy's SFC64 generator instead of torch's bernoulli_.

    m_i ~ Bernoulli(q) independently,   q = the keep probability

torch draws a CPU dropout mask element by element through bernoulli_. LoRA dropout draws one mask
per adapter input, on every linear layer of every step, so on CPU the draw is a visible part of a
training step. Here the mask is drawn as 16-bit integers by SFC64, which costs far less per
element, compared against a threshold, and written out by numpy in one of two forms:
  * `keep_mask`: a uint8 0/1 tensor, one byte an element (kernels/lora.py keeps it for its
    backward and applies 1/q to its rank-r product instead of the input);
  * `dropout_factor`: the fp32 factor m / q in the same pass (kernels/dropout.py and the
    reference path, kernels/reference.py, multiply the input by it).
Both are the same draw: after the same torch seed they make the same decisions.

Randomness: the generator is restarted for every mask from words drawn from torch's default CPU
generator, so torch.manual_seed, a saved and restored RNG state (exact resume) and activation
checkpointing (which replays the RNG state for the recomputation) give the same masks, as with
torch's dropout.
Resolution: m_i = 1 with probability q = (65536 - round(p · 65536)) / 65536, so p = 0.1 drops with
probability 0.1000061; callers divide by that same q, so E[x · m / q] = x exactly.

Other devices draw with torch's bernoulli_ on the device.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

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
    away. Building np.random.SFC64(seed) for every mask instead would hash each seed through a
    SeedSequence, a fixed cost per mask that small masks feel."""
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
    four. numpy writes the comparison straight into torch-allocated memory. Other devices: bernoulli_.
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
    boolean draw (a uint8 mask widened and scaled by torch would take two more). Elsewhere the mask
    comes from torch's bernoulli_ on the device.
    """
    if not _on_cpu(device):
        return torch.empty(shape, device=device).bernoulli_(1 - p).mul_(scale / keep_probability(p, device))
    factor = torch.empty(shape, dtype=torch.float32)  # torch's allocator: memory accounting sees it
    value = np.float32(scale / keep_probability(p))
    np.multiply(_keep_bits(factor.numel(), p), value, out=factor.numpy().reshape(-1))
    return factor
