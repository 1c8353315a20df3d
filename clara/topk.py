"""Differentiable top-k: pick k documents hard, let the gradient through softly (CLaRa, Algorithm 1).

End-to-end CLaRa scores N candidate documents per query, s [B, N], and must feed exactly k of them
to the generator while still training the scorer from the generator's loss. Algorithm 1 of the
paper (arXiv 2511.18659) does this with k straight-through one-hot rows:

    hard_j  = one_hot(j-th largest s)                                    (forward value)
    taken_j = sum_{i<j} hard_i                                           (documents already picked)
    soft_j  = softmax( s/tau + log(1 - stop_grad(taken_j) + eps) )       (gradient path)
    W_j     = hard_j + soft_j - stop_grad(soft_j)

so W [B, k, N] equals the hard selection in the forward pass (W @ candidates gathers exactly the k
chosen documents) while dL/ds = sum_j (dL/dW_j) . d soft_j / ds, with

    d soft_j[n] / d s[m] = soft_j[n] (delta_nm - soft_j[m]) / tau.

Our choices, and where they differ from Apple's ml-clara `differentiable_topk`:

* eps. Algorithm 1 and ml-clara use eps = 1e-8, meant only to keep log(0) away. But log(1e-8) is
  only -18.4, while s/tau is not bounded: with cosine scores and tau = 0.02 (the paper's value), a
  document picked earlier whose score beats slot j's pick by more than 18.4 * 0.02 ≈ 0.37 still
  holds most of slot j's soft mass, so slot j's gradient mostly reaches a document it did not pick,
  and soft_j does not approach hard_j as tau -> 0. That is a bug, so our default is eps = 0: taken
  documents get exactly -inf, i.e. zero soft mass. log(0) is safe here because `taken` carries no
  gradient and the softmax of a row with at least one finite entry is finite. `taken_eps=1e-8`
  reproduces ml-clara's numbers (up to rounding) for parity checks.
* Overflow. ml-clara divides the raw logits by tau, which overflows once |s|/tau passes the
  dtype's range (65504 in float16, 3.4e38 in float32), and its temperature floor,
  max(tau, 1e-6), silently hides a tau <= 0. We shift each slot's logits by their (detached)
  maximum before dividing, which changes no softmax and no gradient, compute the soft path in
  float32 (float64 when the logits are float64), and reject tau <= 0 with an error.
* Ties. torch.topk orders equal values arbitrarily. We use a stable sort, so among equal logits the
  lower index is picked first; slot j is the j-th entry of the list sorted by (-s[n], n).
* Masking. An optional `mask` [B, N] marks valid candidates; invalid ones are never picked and get
  zero soft mass in every slot. A row with fewer than k valid candidates is an error.
* Top-1. ml-clara keeps a separate `differentiable_topk_top_1`; with one slot `taken` is empty and
  the formula is the plain straight-through softmax, so `differentiable_top1` is k = 1.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

# Algorithm 1's log floor, for reproducing ml-clara exactly; see the module docstring for why it is
# not our default.
OFFICIAL_TAKEN_EPS = 1e-8


def _check_inputs(
    logits: torch.Tensor, k: int, temperature: float, mask: torch.Tensor | None, taken_eps: float
) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape [B, N], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [B, N] (batch, candidates), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    n_candidates = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_candidates:
        raise ValueError(f"k must be between 1 and N={n_candidates} (the number of candidates), got k={k}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(taken_eps, bool) or not isinstance(taken_eps, Real) or not 0 <= taken_eps < 1:
        raise ValueError(f"taken_eps must be a number in [0, 1), got {taken_eps!r}")
    if mask is None:
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(
                "logits contain NaN or inf; to exclude candidates pass mask= instead of -inf scores"
            )
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool tensor [B, N] with True for valid candidates")
    if mask.shape != logits.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal logits shape {tuple(logits.shape)}")
    if mask.device != logits.device:
        raise ValueError(f"mask is on {mask.device} but logits are on {logits.device}")
    # Scores of invalid candidates are never read, so padding there may hold anything.
    if not bool((torch.isfinite(logits) | ~mask).all()):
        raise ValueError("logits contain NaN or inf at valid candidates (mask True)")
    n_valid = mask.sum(dim=1)  # [B]
    short_rows = (n_valid < k).nonzero().flatten().tolist()
    if short_rows:
        row = short_rows[0]
        raise ValueError(
            f"mask leaves {int(n_valid[row])} valid candidates in row {row} but k={k} must be picked "
            f"({len(short_rows)} row(s) have fewer than k valid candidates)"
        )


def _soft_dtype(logits: torch.Tensor) -> torch.dtype:
    # The soft path's exps are sensitive to rounding; half precision would round them too coarsely.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def hard_topk_indices(logits: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k largest logits per row, largest first; ties go to the lower index.

    logits [B, N] (finite), mask [B, N] bool or None -> idx [B, k] (int64). Invalid candidates sort
    after every valid one, so they are never chosen when a row has at least k valid candidates.
    """
    keys = logits.detach() + 0.0  # + 0.0 turns -0.0 into 0.0, so the sort sees them as equal
    if mask is not None:
        keys = keys.masked_fill(~mask, float("-inf"))
    # stable=True keeps equal keys in index order; torch.topk gives no such promise.
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices  # [B, N]
    return order[:, :k]


def soft_topk_surrogate(
    logits: torch.Tensor,
    hard: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    taken_eps: float = 0.0,
) -> torch.Tensor:
    """The soft rows whose gradient W carries: soft_j = softmax(s/tau + log(1 - taken_j + eps)).

    logits [B, N], hard [B, k, N] fixed one-hot rows (no gradient) -> soft [B, k, N], computed in
    float32 (float64 for float64 logits). Exposed so tests can check W's gradient against it.
    """
    compute_dtype = _soft_dtype(logits)
    scores = logits.to(compute_dtype)  # [B, N]
    hard = hard.detach().to(compute_dtype)  # [B, k, N]
    # taken_j = hard_0 + ... + hard_{j-1}: an exclusive cumulative sum over the slots.
    taken = hard.cumsum(dim=1) - hard  # [B, k, N], entries 0 or 1, stop-grad by construction
    if taken_eps > 0:
        log_floor = torch.log(1.0 - taken + taken_eps)  # [B, k, N]: log(eps) where taken, ~0 elsewhere
        excluded = torch.zeros_like(taken, dtype=torch.bool)
    else:
        # eps = 0: log(1 - taken) is -inf exactly where taken; we write that -inf with masked_fill
        # below instead of adding it, so no inf - inf can appear, and masked_fill sends zero
        # gradient to those entries.
        log_floor = torch.zeros_like(taken)
        excluded = taken.bool()  # [B, k, N]
    if mask is not None:
        excluded = excluded | ~mask.unsqueeze(1)
    # softmax(x) == softmax(x - c) for any constant c per slot, so shifting each slot by the max of
    # its own logits (in score units, detached) changes neither value nor gradient, and keeps every
    # entry <= 0 before the division by a tiny tau, where s/tau itself could overflow. The max
    # is over the slot's candidates (untaken ones when eps = 0, so slot j's shift is its pick's score).
    slot_scores = scores.detach().unsqueeze(1) + temperature * log_floor  # [B, k, N]
    slot_scores = slot_scores.masked_fill(excluded, float("-inf"))
    shift = slot_scores.amax(dim=-1, keepdim=True)  # [B, k, 1]
    slot_logits = (scores.unsqueeze(1) - shift) / temperature + log_floor  # [B, k, N]
    slot_logits = slot_logits.masked_fill(excluded, float("-inf"))
    return torch.softmax(slot_logits, dim=-1)  # [B, k, N]


def differentiable_topk(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
    taken_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through top-k selection (CLaRa, Algorithm 1).

    logits [B, N] scores of N candidates per query; k slots (1 <= k <= N); temperature tau > 0;
    mask [B, N] bool of valid candidates (optional); taken_eps the log floor of Algorithm 1 (0 by
    default, 1e-8 = ml-clara; see the module docstring).

    Returns W [B, k, N] in logits' dtype, whose row j is exactly the one-hot of the j-th largest
    logit in the forward pass and has the gradient of soft_j, and idx [B, k] (int64) of the picked
    candidates, largest first, no candidate twice. Selected documents: W @ candidates [B, k, D].
    """
    _check_inputs(logits, k, temperature, mask, taken_eps)
    idx = hard_topk_indices(logits, k, mask)  # [B, k]
    batch, n_candidates = logits.shape
    hard = torch.zeros(batch, k, n_candidates, dtype=_soft_dtype(logits), device=logits.device)
    hard.scatter_(2, idx.unsqueeze(-1), 1.0)  # [B, k, N] one-hot rows
    soft = soft_topk_surrogate(logits, hard, float(temperature), mask, float(taken_eps))  # [B, k, N]
    # soft - soft.detach() is exactly 0 in the forward pass (x - x == 0 for finite x), so W == hard
    # bit for bit, while the backward pass sees only soft.
    weights = hard + (soft - soft.detach())  # [B, k, N]
    return weights.to(logits.dtype), idx


def differentiable_top1(
    logits: torch.Tensor, temperature: float = 1.0, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through arg-max: W [B, 1, N] = one_hot(argmax s) + softmax(s/tau) - stop_grad(same).

    ml-clara's `differentiable_topk_top_1`; with a single slot nothing is taken yet, so this is
    differentiable_topk with k = 1. Returns (W [B, 1, N], idx [B, 1]).
    """
    return differentiable_topk(logits, 1, temperature, mask=mask)
