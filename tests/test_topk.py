"""Tests for clara/topk.py: the straight-through top-k of CLaRa's Algorithm 1.

Expected selections come from a plain-Python sort by (-score, index), expected gradients from
per-slot softmaxes written out here slot by slot, from torch.autograd.gradcheck's finite
differences, and, for one tiny case, from the closed form d softmax_n / d s_m = p_n (δ_nm - p_m) / τ.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clara.topk import (
    OFFICIAL_TAKEN_EPS,
    differentiable_top1,
    differentiable_topk,
    hard_topk_indices,
    soft_topk_surrogate,
)

FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# A few repeated values make ties common; the others make them rare.
TIE_PRONE_VALUES = st.sampled_from([-2.0, -0.0, 0.0, 0.5, 3.0])
SPREAD_VALUES = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)
TEMPERATURES = st.floats(min_value=1e-6, max_value=100.0, allow_nan=False)


@st.composite
def score_batches(draw, max_batch: int = 4, max_candidates: int = 40, values=None):
    """(logits [B, N] as nested lists, k) with B in 1..max_batch, N in 1..max_candidates, k in 1..N."""
    batch = draw(st.integers(1, max_batch))
    n_candidates = draw(st.integers(1, max_candidates))
    k = draw(st.integers(1, n_candidates))
    if values is None:
        values = draw(st.sampled_from([TIE_PRONE_VALUES, SPREAD_VALUES]))
    row = st.lists(values, min_size=n_candidates, max_size=n_candidates)
    rows = [draw(row) for _ in range(batch)]
    return rows, k


def expected_picks(row: list[float], k: int, valid: list[bool] | None = None) -> list[int]:
    """The documented tie rule: largest score first, and among equal scores the lower index first."""
    candidates = [n for n in range(len(row)) if valid is None or valid[n]]
    return sorted(candidates, key=lambda n: (-row[n], n))[:k]


def reference_soft_rows(logits: torch.Tensor, k: int, temperature: float, eps: float) -> torch.Tensor:
    """Algorithm 1's soft rows, one slot at a time: softmax(s/τ + log(1 - stop_grad(taken) + eps)).

    Written independently of the module (no shift, no vectorised cumsum); eps = 0 gives log(0) = -inf.
    """
    batch, n_candidates = logits.shape
    picks = [expected_picks(row, k) for row in logits.tolist()]
    taken = torch.zeros(batch, n_candidates, dtype=logits.dtype)
    rows = []
    for slot in range(k):
        rows.append(torch.softmax(logits / temperature + torch.log(1 - taken.detach() + eps), dim=-1))
        taken = taken.clone()
        for b in range(batch):
            taken[b, picks[b][slot]] = 1.0
    return torch.stack(rows, dim=1)  # [B, k, N]


# ----------------------------------------------------------------------------------------------
# forward pass: exact one-hot rows, the true top-k, the tie rule
# ----------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(batch=score_batches(), temperature=TEMPERATURES, dtype=st.sampled_from(FLOAT_DTYPES))
def test_forward_rows_are_one_hot_of_the_true_topk(batch, temperature, dtype):
    rows, k = batch
    logits = torch.tensor(rows, dtype=torch.float64).to(dtype)
    weights, idx = differentiable_topk(logits, k, temperature)
    n_batch, n_candidates = logits.shape

    assert weights.shape == (n_batch, k, n_candidates) and weights.dtype == dtype
    assert idx.shape == (n_batch, k) and idx.dtype == torch.int64
    # Every row exactly one-hot, at the reported index.
    one_hot = torch.zeros(n_batch, k, n_candidates, dtype=dtype).scatter_(2, idx.unsqueeze(-1), 1.0)
    assert torch.equal(weights, one_hot)
    # No document twice.
    for picks in idx.tolist():
        assert len(set(picks)) == k
    # The picked scores are exactly torch.topk's values, in the same (descending) order.
    assert torch.equal(logits.gather(1, idx), torch.topk(logits, k, dim=-1).values)
    # And the indices follow the tie rule (as stored in `dtype`, where rounding can create ties).
    stored_rows = logits.double().tolist()
    assert idx.tolist() == [expected_picks(row, k) for row in stored_rows]
    # Without ties the indices are torch.topk's indices too.
    for b, row in enumerate(stored_rows):
        if len(set(row)) == len(row):
            assert idx[b].tolist() == torch.topk(logits[b], k).indices.tolist()


def test_ties_go_to_the_lower_index_and_signed_zeros_are_equal():
    logits = torch.tensor([[1.0, 3.0, 3.0, -0.0, 3.0, 0.0, 1.0]])
    _, idx = differentiable_topk(logits, 7, 0.5)
    assert idx.tolist() == [[1, 2, 4, 0, 6, 3, 5]]
    _, idx = differentiable_topk(torch.zeros(2, 5), 3, 1.0)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_top1_is_straight_through_argmax_and_equals_k1():
    logits = torch.tensor([[0.3, -1.0, 2.0, 2.0], [5.0, 4.0, 4.5, -3.0]], dtype=torch.float64)
    logits.requires_grad_(True)
    weights, idx = differentiable_top1(logits, 0.7)
    assert idx.tolist() == [[2], [0]]
    assert torch.equal(weights, torch.tensor([[[0.0, 0, 1, 0]], [[1.0, 0, 0, 0]]], dtype=torch.float64))
    upstream = torch.tensor([[[1.0, -2.0, 0.5, 3.0]], [[0.0, 1.0, -1.0, 2.0]]], dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights * upstream).sum(), logits)
    # ml-clara's top-1: the gradient of softmax(s/τ), nothing masked.
    plain = logits.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((torch.softmax(plain / 0.7, -1) * upstream[:, 0]).sum(), plain)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    weights_k1, idx_k1 = differentiable_topk(logits, 1, 0.7)
    assert torch.equal(weights_k1, weights) and torch.equal(idx_k1, idx)


# ----------------------------------------------------------------------------------------------
# masking of invalid candidates
# ----------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data(), temperature=TEMPERATURES)
def test_masked_candidates_are_never_picked_and_get_no_soft_mass(data, temperature):
    rows, _ = data.draw(score_batches(values=TIE_PRONE_VALUES))
    logits = torch.tensor(rows, dtype=torch.float64)
    n_candidates = logits.shape[1]
    valid = [data.draw(st.lists(st.booleans(), min_size=n_candidates, max_size=n_candidates)) for _ in rows]
    for row_valid in valid:  # at least one valid candidate per row
        row_valid[data.draw(st.integers(0, n_candidates - 1))] = True
    k = data.draw(st.integers(1, min(sum(row_valid) for row_valid in valid)))
    mask = torch.tensor(valid)
    # Scores at invalid candidates are never read, so garbage there must not matter.
    logits = logits.masked_fill(~mask, float("nan")).requires_grad_(True)

    weights, idx = differentiable_topk(logits, k, temperature, mask=mask)
    assert idx.tolist() == [expected_picks(row, k, v) for row, v in zip(logits.tolist(), valid)]
    assert bool(mask.gather(1, idx).all())
    soft = soft_topk_surrogate(logits.detach(), weights.detach(), temperature, mask=mask)
    invalid_soft = soft.masked_select(~mask.unsqueeze(1).expand_as(soft))
    assert torch.equal(invalid_soft, torch.zeros(int((~mask).sum()) * k, dtype=soft.dtype))
    upstream = torch.linspace(-1, 1, weights.numel(), dtype=weights.dtype).reshape(weights.shape)
    (grad,) = torch.autograd.grad((weights * upstream).sum(), logits)
    assert bool(torch.isfinite(grad).all())
    assert torch.equal(grad.masked_select(~mask), torch.zeros(int((~mask).sum()), dtype=grad.dtype))


def test_too_few_valid_candidates_is_a_clear_error():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with pytest.raises(ValueError, match=r"mask leaves 1 valid candidates in row 1 but k=2"):
        differentiable_topk(torch.zeros(2, 3), 2, 1.0, mask=mask)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((torch.zeros(3), 1, 1.0), {}, ValueError, r"2-D \[B, N\].*shape \(3,\)"),
        ((torch.zeros(1, 2, 3), 1, 1.0), {}, ValueError, r"2-D \[B, N\]"),
        (([[1.0, 2.0]], 1, 1.0), {}, TypeError, r"torch.Tensor"),
        ((torch.zeros(2, 3, dtype=torch.int64), 1, 1.0), {}, TypeError, r"floating-point"),
        ((torch.zeros(2, 3), 0, 1.0), {}, ValueError, r"k must be between 1 and N=3.*k=0"),
        ((torch.zeros(2, 3), 4, 1.0), {}, ValueError, r"k must be between 1 and N=3.*k=4"),
        ((torch.zeros(2, 3), 1.0, 1.0), {}, TypeError, r"k must be an int"),
        ((torch.zeros(2, 3), True, 1.0), {}, TypeError, r"k must be an int"),
        ((torch.zeros(2, 3), 1, 0.0), {}, ValueError, r"temperature must be a finite number > 0, got 0.0"),
        ((torch.zeros(2, 3), 1, -0.5), {}, ValueError, r"temperature must be a finite number > 0"),
        ((torch.zeros(2, 3), 1, float("nan")), {}, ValueError, r"temperature must be a finite number > 0"),
        ((torch.zeros(2, 3), 1, float("inf")), {}, ValueError, r"temperature must be a finite number > 0"),
        ((torch.zeros(2, 3), 1, torch.tensor(1.0)), {}, TypeError, r"temperature must be a real number"),
        ((torch.tensor([[0.0, float("nan")]]), 1, 1.0), {}, ValueError, r"NaN or inf"),
        ((torch.tensor([[0.0, float("-inf")]]), 1, 1.0), {}, ValueError, r"pass mask="),
        ((torch.zeros(2, 3), 1, 1.0), {"mask": torch.ones(2, 3)}, TypeError, r"mask must be a bool tensor"),
        (
            (torch.zeros(2, 3), 1, 1.0), {"mask": torch.ones(3, 2, dtype=torch.bool)}, ValueError,
            r"mask shape \(3, 2\)",
        ),
        ((torch.zeros(2, 3), 1, 1.0), {"taken_eps": -1e-8}, ValueError, r"taken_eps"),
    ],
)
def test_bad_inputs_give_clear_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        differentiable_topk(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# gradients of the soft path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("taken_eps", [0.0, OFFICIAL_TAKEN_EPS])
@pytest.mark.parametrize("use_mask", [False, True])
def test_soft_surrogate_passes_gradcheck(taken_eps, use_mask):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    mask = torch.tensor(
        [[True] * 6, [True, False, True, True, False, True], [False, True, True, True, True, True]]
    )
    mask = mask if use_mask else None
    k = 3
    idx = hard_topk_indices(logits, k, mask)
    hard = torch.zeros(3, k, 6, dtype=torch.float64).scatter_(2, idx.unsqueeze(-1), 1.0)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: soft_topk_surrogate(s, hard, 0.7, mask=mask, taken_eps=taken_eps),
        (logits,),
        eps=1e-6,
        atol=1e-7,
    )


@settings(max_examples=60, deadline=None)
@given(
    batch=score_batches(max_candidates=12, values=st.floats(-3.0, 3.0, allow_nan=False)),
    temperature=st.floats(0.05, 5.0),
    taken_eps=st.sampled_from([0.0, OFFICIAL_TAKEN_EPS]),
    seed=st.integers(0, 2**16),
)
def test_weight_gradient_is_the_gradient_of_the_per_slot_softmaxes(batch, temperature, taken_eps, seed):
    rows, k = batch
    logits = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(len(rows), k, len(rows[0]), dtype=torch.float64, generator=generator)
    weights, _ = differentiable_topk(logits, k, temperature, taken_eps=taken_eps)
    (grad,) = torch.autograd.grad((weights * upstream).sum(), logits)
    reference_logits = logits.detach().clone().requires_grad_(True)
    soft = reference_soft_rows(reference_logits, k, temperature, taken_eps)
    (expected,) = torch.autograd.grad((soft * upstream).sum(), reference_logits)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


def test_hand_computed_gradient_n3_k2():
    # s = [2, 1, 0], τ = 1/2, k = 2: slot 0 picks doc 0, slot 1 picks doc 1. Loss L = W[0,0] + W[1,1].
    # Slot 0: p = softmax([4, 2, 0]);  dW[0,0]/ds_m = 2 p_0 (δ_0m - p_m).
    # Slot 1: doc 0 is taken, so q = softmax over docs 1, 2 of [2, 0] and q_0 = 0;
    #         dW[1,1]/ds_m = 2 q_1 (δ_1m - q_m).
    # dL/ds = 2 [p0 (1 - p0),  -p0 p1 + q1 q2,  -p0 p2 - q1 q2]  ≈ [0.23090, 0.00662, -0.23751].
    z0 = math.exp(4) + math.exp(2) + 1
    p0, p1, p2 = math.exp(4) / z0, math.exp(2) / z0, 1 / z0
    q1, q2 = math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)
    expected = torch.tensor(
        [[2 * p0 * (1 - p0), 2 * (-p0 * p1 + q1 * q2), 2 * (-p0 * p2 - q1 * q2)]], dtype=torch.float64
    )

    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    weights, idx = differentiable_topk(logits, 2, 0.5)
    assert idx.tolist() == [[0, 1]]
    assert torch.equal(weights.detach(), torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64))
    (weights[0, 0, 0] + weights[0, 1, 1]).backward()
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-15)
    rounded = torch.tensor([[0.23090, 0.00662, -0.23751]], dtype=torch.float64)
    torch.testing.assert_close(logits.grad, rounded, atol=5e-5, rtol=0)


def test_official_log_floor_lets_taken_documents_keep_soft_mass():
    # ml-clara adds log(1 - taken + 1e-8): a taken document is pushed down by only ln(1e-8) ≈ -18.42.
    # At the paper's τ = 0.02 a score gap of 0.4 is 20 > 18.42, so slot 1's soft row still prefers
    # doc 0, which slot 0 already took. Our default (eps = 0) gives doc 0 exactly zero mass.
    logits = torch.tensor([[0.9, 0.5, 0.1]], dtype=torch.float64)
    hard = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    official = soft_topk_surrogate(logits, hard, 0.02, taken_eps=OFFICIAL_TAKEN_EPS)[0, 1]
    a, b, c = 45 + math.log(1e-8), 25 + math.log(1 + 1e-8), 5 + math.log(1 + 1e-8)  # s/τ + log floor
    z = math.exp(a) + math.exp(b) + math.exp(c)
    expected = torch.tensor([math.exp(a) / z, math.exp(b) / z, math.exp(c) / z], dtype=torch.float64)
    torch.testing.assert_close(official, expected)
    assert official[0] > 0.8  # the gradient of slot 1 mostly reaches the wrong document

    ours = soft_topk_surrogate(logits, hard, 0.02)[0, 1]
    assert ours[0].item() == 0.0
    picked_mass = 1 / (1 + math.exp(-20))  # softmax over docs 1, 2 of [25, 5]
    expected = torch.tensor([0.0, picked_mass, 1 - picked_mass], dtype=torch.float64)
    torch.testing.assert_close(ours, expected)


# ----------------------------------------------------------------------------------------------
# temperature -> 0, extreme values
# ----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    batch=score_batches(max_candidates=20, values=st.integers(-50, 50).map(lambda v: v / 10)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_soft_rows_approach_the_hard_rows_as_temperature_goes_to_zero(batch, dtype):
    rows, k = batch
    distinct_rows = [sorted(set(row)) for row in rows]
    logits = torch.tensor(rows, dtype=dtype)
    _, idx = differentiable_topk(logits, k, 1.0)
    hard = torch.zeros(len(rows), k, len(rows[0]), dtype=dtype).scatter_(2, idx.unsqueeze(-1), 1.0)
    # Smallest gap between two different scores of a row (scores are multiples of 0.1).
    gaps = [min((b - a for a, b in zip(r, r[1:])), default=math.inf) for r in distinct_rows]
    errors = []
    for temperature in [1.0, 0.3, 0.1, 0.03, 0.01]:
        soft = soft_topk_surrogate(logits, hard, temperature)
        error = (soft - hard).abs().amax(dim=(1, 2))  # [B]
        errors.append(error)
        for b, row in enumerate(rows):
            # Without ties the pick of slot j beats every other untaken candidate by at least the gap,
            # so 1 - soft_j[pick] <= (N - 1) exp(-gap / τ); all soft mass is off the pick otherwise.
            if len(set(row)) == len(row):
                bound = (len(row) - 1) * math.exp(-gaps[b] / temperature)
                assert error[b].item() <= bound + 1e-6
    for coarser, finer in zip(errors, errors[1:]):
        assert bool((finer <= coarser + 1e-6).all())


@settings(max_examples=60, deadline=None)
@given(
    batch=score_batches(max_candidates=16, values=st.sampled_from([-1e4, -1.0, 0.0, 3.0, 1e4, 9999.0])),
    temperature=st.sampled_from([1e-6, 1e-3, 1.0]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    taken_eps=st.sampled_from([0.0, OFFICIAL_TAKEN_EPS]),
)
def test_tiny_temperature_and_large_logits_stay_finite(batch, temperature, dtype, taken_eps):
    rows, k = batch
    logits = torch.tensor(rows, dtype=dtype, requires_grad=True)
    weights, idx = differentiable_topk(logits, k, temperature, taken_eps=taken_eps)
    assert bool(torch.isfinite(weights).all())
    hard = torch.zeros_like(weights).scatter_(2, idx.unsqueeze(-1), 1.0)
    assert torch.equal(weights.detach(), hard)
    soft = soft_topk_surrogate(logits.detach(), hard, temperature, taken_eps=taken_eps)
    assert bool(torch.isfinite(soft).all())
    torch.testing.assert_close(soft.sum(-1), torch.ones(soft.shape[:2], dtype=soft.dtype))
    upstream = torch.linspace(-1, 1, weights.numel()).reshape(weights.shape).to(dtype)
    (grad,) = torch.autograd.grad((weights * upstream).sum(), logits)
    assert bool(torch.isfinite(grad).all())


def test_scores_that_would_overflow_when_divided_by_tau_stay_finite():
    # 1e30 / 1e-9 overflows float32; shifting by the row maximum first keeps every s/τ <= 0.
    logits = torch.tensor([[1e30, 0.0, -1e30], [2.0, 1e30, 1e30]], requires_grad=True)
    weights, idx = differentiable_topk(logits, 2, 1e-9)
    assert idx.tolist() == [[0, 1], [1, 2]]
    hard = weights.detach()
    torch.testing.assert_close(
        soft_topk_surrogate(logits.detach(), hard, 1e-9),
        torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]], [[0, 0.5, 0.5], [0, 0, 1.0]]]),
    )
    (grad,) = torch.autograd.grad(weights[:, 1, :].sum() + weights[1, 0, 1], logits)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.5e8, -2.5e8]]))


def test_ties_at_tiny_temperature_split_soft_mass_and_keep_finite_gradient():
    logits = torch.tensor([[1e4, 1e4, -1e4]], requires_grad=True)
    weights, idx = differentiable_topk(logits, 1, 1e-6)
    assert idx.tolist() == [[0]]
    hard = torch.tensor([[[1.0, 0.0, 0.0]]])
    soft = soft_topk_surrogate(logits.detach(), hard, 1e-6)
    torch.testing.assert_close(soft, torch.tensor([[[0.5, 0.5, 0.0]]]))
    weights[0, 0, 0].backward()
    # d soft_0 / d s = p_0 (δ - p) / τ = [0.25, -0.25, 0] / 1e-6.
    torch.testing.assert_close(logits.grad, torch.tensor([[2.5e5, -2.5e5, 0.0]]))


# ----------------------------------------------------------------------------------------------
# selecting documents with W
# ----------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    batch=score_batches(),
    hidden=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_selected_documents_are_exactly_the_topk_candidates(batch, hidden, dtype, seed):
    rows, k = batch
    logits = torch.tensor(rows, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.randn(len(rows), len(rows[0]), hidden, generator=generator).to(dtype)
    weights, idx = differentiable_topk(logits, k, 0.02)
    selected = weights.to(dtype) @ candidates  # [B, k, D]
    expected = candidates.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden))  # [B, k, D]
    assert torch.equal(selected, expected)
