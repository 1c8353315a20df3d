"""The attention entry point against a naive softmax(QK^T)V, the widened low-precision linear, the
LoRA linear, RMSNorm, rotary embedding and SwiGLU written as single autograd nodes (against their
formulas written out here, and gradcheck), and the fast CPU dropout. The fused nodes against the
library's own reference path (kernels/reference.py): tests/test_reference_path.py."""

import math
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import clara.kernels.matmul as klinear
import clara.kernels.lora as klora
import clara.kernels.reference as kref
from clara.kernels import Dropout, attention, build_attention_mask, dropout, linear, lora_linear
from clara.kernels.dropout import dropout_factor, keep_mask, keep_probability
from clara.kernels.swiglu import swiglu
from clara.kernels.norm import rms_norm
from clara.kernels.rope import apply_rotary
from clara.kernels.attention import flash_attention_available
from clara.kernels.reference import use_reference_kernels


@pytest.fixture(scope="module", autouse=True)
def fused_kernels():
    """These tests are about the fused nodes: run them on those whatever CLARA_REFERENCE_KERNELS says."""
    with use_reference_kernels(False):
        yield


def naive_attention(q, k, v, key_valid=None, window=None):
    """Bottom-right causal attention written out; padded-only rows attend to themselves."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    k = k.repeat_interleave(h // k.shape[1], 1)
    v = v.repeat_interleave(h // v.shape[1], 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    qpos = torch.arange(lk - lq, lk)[:, None]
    kpos = torch.arange(lk)[None]
    allowed = (kpos <= qpos).expand(b, 1, lq, lk).clone()
    if window is not None:
        allowed &= kpos > qpos - window
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :].bool()
        allowed |= kpos == qpos
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]), lk=st.integers(1, 24), data=st.data(),
)
def test_attention_matches_naive(b, groups, lk, data):
    lq = data.draw(st.integers(1, lk))
    window = data.draw(st.one_of(st.none(), st.integers(1, 30)))
    pad = data.draw(st.lists(st.integers(0, lk - 1), min_size=b, max_size=b))
    g = torch.Generator().manual_seed(lk * 31 + lq)
    q = torch.randn(b, 4, lq, 8, generator=g)
    k = torch.randn(b, 4 // groups, lk, 8, generator=g)
    v = torch.randn(b, 4 // groups, lk, 8, generator=g)
    key_valid = torch.ones(b, lk, dtype=torch.bool)
    for i, n in enumerate(pad):
        key_valid[i, :n] = False
    mask = build_attention_mask(lq, lk, key_valid, window)
    out = attention(q, k, v, mask)
    expected = naive_attention(q, k, v, key_valid, window)
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max().item() < 1e-5


def test_mask_fast_paths():
    assert build_attention_mask(5, 5).sdpa_is_causal and build_attention_mask(5, 5).dense is None
    decode = build_attention_mask(1, 9)
    assert not decode.sdpa_is_causal and decode.dense is None
    chunk = build_attention_mask(3, 9)  # chunked prefill needs an explicit bottom-right mask
    assert chunk.dense[0, 0].tolist()[0] == [True] * 7 + [False] * 2
    assert build_attention_mask(4, 4, torch.ones(2, 4)).key_valid is None  # all-valid mask is dropped
    with pytest.raises(ValueError, match="attention_mask covers 3 positions, expected 4"):
        build_attention_mask(4, 4, torch.ones(2, 3))


@pytest.mark.parametrize("widen", [True, False])
def test_low_precision_linear_equals_fp32_accumulation(monkeypatch, widen):
    monkeypatch.setattr(klinear, "cpu_has_native_bf16", lambda: not widen)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g).bfloat16()
    w = torch.randn(32, 64, generator=g).bfloat16()
    bias = torch.randn(32, generator=g).bfloat16()
    out = linear(x, w, bias)
    assert out.dtype == torch.bfloat16
    exact = (x.double() @ w.double().T + bias.double())
    # Either path accumulates in fp32 and rounds once to bf16: within one bf16 ulp of the exact sum.
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()
    if widen:
        assert torch.equal(out, F.linear(x.float(), w.float(), bias.float()).bfloat16())


def test_widened_linear_under_autocast_keeps_gradients(monkeypatch):
    monkeypatch.setattr(klinear, "cpu_has_native_bf16", lambda: False)
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w)
    assert y.dtype == torch.float32  # computed in fp32 instead of the slow bf16 kernel
    y.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(5, 4).detach())


def test_single_rows_keep_the_low_precision_kernel(monkeypatch):
    monkeypatch.setattr(klinear, "cpu_has_native_bf16", lambda: False)
    x = torch.randn(1, 64).bfloat16()
    w = torch.randn(32, 64).bfloat16()
    assert torch.equal(linear(x, w), F.linear(x, w))  # decoding one token: bandwidth-bound, bf16 wins


def test_environment_override(monkeypatch):
    klinear.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("CLARA_LOW_PRECISION_MATMUL", "native")
    assert klinear.cpu_has_native_bf16()
    klinear.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("CLARA_LOW_PRECISION_MATMUL", "fp32")
    assert not klinear.cpu_has_native_bf16()
    klinear.cpu_has_native_bf16.cache_clear()


@pytest.mark.cuda
def test_flash_attention_matches_sdpa_on_gpu():
    q = torch.randn(2, 8, 40, 64, device="cuda", dtype=torch.bfloat16)
    if not flash_attention_available(q):
        pytest.skip("flash-attn not installed or GPU older than sm80")
    k = torch.randn(2, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    key_valid = torch.ones(2, 40, dtype=torch.bool, device="cuda")
    key_valid[1, :13] = False
    for kv in (None, key_valid):
        for lq in (40, 1):
            mask = build_attention_mask(lq, 40, kv, device="cuda")
            flash = attention(q[:, :, -lq:], k, v, mask)
            sdpa = attention(q[:, :, -lq:], k, v, mask, force_sdpa=True)
            rows = slice(None) if kv is None else kv[:, -lq:]
            diff = (flash.transpose(1, 2)[rows] - sdpa.transpose(1, 2)[rows]).abs().max().item()
            assert diff < 2e-2


class FakeFlashAttn:
    """flash-attn's two entry points written naively, to test our packing glue on CPU.

    Semantics follow flash-attn 2: [B, L, H, D] layout (varlen: packed [total, H, D] with
    cu_seqlens), GQA by head groups, causal aligned bottom-right, window_size=(left, right).
    """

    @staticmethod
    def _one(q, k, v, scale, causal, window):  # q [Lq, H, D], k/v [Lk, G, D]
        lq = q.shape[0]
        out = naive_attention(q.permute(1, 0, 2)[None], k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None],
                              None, window[0] + 1 if window[0] >= 0 else None)
        assert causal or lq == 1
        return out[0].permute(1, 0, 2)

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
        return torch.stack([self._one(q[i], k[i], v[i], softmax_scale, causal, window_size) for i in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False,
                               window_size=(-1, -1)):
        outs = []
        for i in range(len(cu_q) - 1):
            qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            outs.append(self._one(q[qs], k[ks], v[ks], softmax_scale, causal, window_size))
        return torch.cat(outs)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("lq", [11, 1, 4])
def test_flash_packing_glue_matches_sdpa(monkeypatch, padded, lq):
    ka = sys.modules["clara.kernels.attention"]  # the package exports a function of the same name

    monkeypatch.setattr(ka, "flash_attention_available", lambda t: True)
    monkeypatch.setattr(ka, "_flash_attn_module", lambda: FakeFlashAttn())
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(3, 4, lq, 8, generator=g)
    k = torch.randn(3, 2, 11, 8, generator=g)
    v = torch.randn(3, 2, 11, 8, generator=g)
    key_valid = torch.ones(3, 11, dtype=torch.bool)
    if padded:
        key_valid[0, :5] = False
        key_valid[2, :2] = False
    mask = build_attention_mask(lq, 11, key_valid if padded else None, sliding_window=6)
    flash = attention(q, k, v, mask)
    sdpa = attention(q, k, v, mask, force_sdpa=True)
    real_rows = key_valid[:, -lq:]
    assert (flash.transpose(1, 2)[real_rows] - sdpa.transpose(1, 2)[real_rows]).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------
# The LoRA linear as one autograd node: W x + b + B A (f ⊙ x)
# ------------------------------------------------------------------------------------------------
def lora_inputs(lead, with_bias, seed, train_base=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 12, generator=g, requires_grad=True)
    w = torch.randn(10, 12, generator=g, requires_grad=train_base)
    bias = torch.randn(10, generator=g, requires_grad=train_base) if with_bias else None
    a = torch.randn(3, 12, generator=g, requires_grad=True)
    up = torch.randn(10, 3, generator=g, requires_grad=True)
    return x, w, bias, a, up


@pytest.mark.parametrize("train_base", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_lora_linear_value_and_gradients_match_the_composition(with_bias, lead, train_base):
    x, w, bias, a, up = lora_inputs(lead, with_bias, len(lead) + with_bias, train_base)
    out = lora_linear(x, w, bias, a, up, scaling=2.5)
    expected = x @ w.T + (bias if with_bias else 0) + 2.5 * (x @ a.T) @ up.T
    assert out.shape == (*lead, 10)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    inputs = [t for t in (x, w, bias, a, up) if t is not None and t.requires_grad]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for mine, ref in zip(got, want):
        assert mine.shape == ref.shape and torch.allclose(mine, ref, atol=1e-4, rtol=1e-5)


def test_lora_linear_with_dropout_uses_one_mask_for_value_and_gradients():
    x, w, bias, a, up = lora_inputs((6, 4), True, 3)
    torch.manual_seed(11)
    out = lora_linear(x, w, bias, a, up, scaling=2.0, dropout_p=0.3, training=True)
    torch.manual_seed(11)  # the same draw from torch's generator: the same mask
    factor = dropout_factor((24, 12), 0.3, scale=2.0).view(6, 4, 12)
    assert torch.unique(factor).tolist() == [0.0, pytest.approx(2.0 / keep_probability(0.3), rel=1e-7)]
    expected = x @ w.T + bias + ((x * factor) @ a.T) @ up.T
    assert torch.allclose(out, expected, atol=1e-5)
    grad = torch.randn(out.shape)
    for mine, ref in zip(torch.autograd.grad(out, (x, a, up), grad), torch.autograd.grad(expected, (x, a, up), grad)):
        assert torch.allclose(mine, ref, atol=1e-4, rtol=1e-5)
    # eval mode draws nothing and drops nothing
    state = torch.get_rng_state()
    assert torch.allclose(lora_linear(x, w, bias, a, up, 2.0, 0.3, training=False),
                          x @ w.T + bias + 2.0 * (x @ a.T) @ up.T, atol=1e-5)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("wanted", ["up", "a", "x", "w"])
def test_lora_linear_with_dropout_gives_any_subset_of_gradients(wanted):
    # The backward uses (and widens) the mask only for the input's and A's gradients.
    x, w, bias, a, up = lora_inputs((6, 4), True, 4)
    tensors = {"x": x, "w": w, "a": a, "up": up}
    for name, t in tensors.items():
        t.requires_grad_(name == wanted)
    torch.manual_seed(12)
    out = lora_linear(x, w, bias, a, up, scaling=2.0, dropout_p=0.3, training=True)
    torch.manual_seed(12)
    factor = dropout_factor((24, 12), 0.3, scale=2.0).view(6, 4, 12)
    expected = x @ w.T + bias + ((x * factor) @ a.T) @ up.T
    grad = torch.randn(out.shape)
    (mine,) = torch.autograd.grad(out, tensors[wanted], grad)
    (ref,) = torch.autograd.grad(expected, tensors[wanted], grad)
    assert torch.allclose(mine, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_lora_linear_gradcheck(with_dropout):
    g = torch.Generator().manual_seed(5)
    x, w, bias, a, up = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
                         for s in ((5, 6), (4, 6), (4,), (2, 6), (4, 2)))
    keep = (torch.rand(5, 6, generator=g) > 0.3).to(torch.uint8) if with_dropout else None
    assert torch.autograd.gradcheck(lambda *t: klora._LoRALinear.apply(*t, keep, 0.5), (x, w, bias, a, up))


def test_lora_linear_widened_sums_in_fp32_and_rounds_once(monkeypatch):
    monkeypatch.setattr(klinear, "cpu_has_native_bf16", lambda: False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=g).bfloat16()
    w = torch.randn(32, 64, generator=g).bfloat16()
    a = torch.randn(4, 64, generator=g)  # fp32 adapters on a bf16 base
    up = torch.randn(32, 4, generator=g)
    out = lora_linear(x, w, None, a, up, scaling=1.0)
    assert out.dtype == torch.bfloat16
    exact = x.double() @ w.double().T + (x.double() @ a.double().T) @ up.double().T
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-4).all()  # within one bf16 ulp


def test_lora_linear_composes_native_autocast_and_mixed_dtypes(monkeypatch):
    # Dtype mixes the node does not take go to the composed reference (kernels/reference.py).
    monkeypatch.setattr(klinear, "cpu_has_native_bf16", lambda: True)  # autocast picks the dtypes itself
    g = torch.Generator().manual_seed(6)
    x, a = torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g)
    w, up = torch.randn(5, 8, generator=g), torch.randn(5, 2, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, w, None, a, up, 1.5)
        expected = kref.lora_linear(x, w, None, a, up, 1.5)
    assert torch.equal(out, expected)
    mixed = lora_linear(x.double(), w.double(), None, a.requires_grad_(), up, 1.5)  # fp32 adapters, fp64 base
    assert mixed.dtype == torch.float64 and type(mixed.grad_fn).__name__ != "_LoRALinearBackward"
    assert torch.equal(mixed, kref.lora_linear(x.double(), w.double(), None, a, up, 1.5))


# ------------------------------------------------------------------------------------------------
# RMSNorm and rotary embedding as single autograd nodes
# ------------------------------------------------------------------------------------------------
def test_rms_norm_and_rotary_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))
    q = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    for r in (8, 4):  # full and partial rotary
        cos, sin = torch.randn(2, 1, 5, r, generator=g, dtype=torch.float64).unbind(0)
        cos, sin = cos[None], sin[None]
        assert torch.autograd.gradcheck(lambda q: apply_rotary(q, cos, sin), (q,))


def test_rotary_matches_rotate_half_formula():
    g = torch.Generator().manual_seed(4)
    angles = torch.randn(2, 1, 5, 3, generator=g)  # [B, 1, L, R/2]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x = torch.randn(2, 5, 4, 6, generator=g).transpose(1, 2)  # [B, H=4, L=5, D=6], strided as the decoder's q/k
    x1, x2 = x.chunk(2, -1)
    expected = x * cos + torch.cat((-x2, x1), -1) * sin
    assert torch.allclose(apply_rotary(x, cos, sin), expected, atol=1e-6)
    part = apply_rotary(x, cos[..., :4], sin[..., :4])  # partial: the last 2 dims pass through
    xr1, xr2 = x[..., :4].chunk(2, -1)
    assert torch.allclose(part[..., :4], x[..., :4] * cos[..., :4] + torch.cat((-xr2, xr1), -1) * sin[..., :4], atol=1e-6)
    assert torch.equal(part[..., 4:], x[..., 4:])


# ------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------
def test_keep_probability_is_p_on_the_16_bit_grid():
    assert keep_probability(0.1) == (65536 - 6554) / 65536
    assert keep_probability(0.5) == 0.5 and keep_probability(0.0) == 1.0


def test_dropout_keeps_the_expected_fraction_and_scales_the_kept_values():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 1.0  # no zeros of its own
    y = dropout(x, 0.1)
    kept = y != 0
    q = keep_probability(0.1)
    n = x.numel()
    # Binomial(n, q): six standard deviations (a false failure about once in 10^9 runs).
    assert abs(int(kept.sum()) - n * q) < 6 * math.sqrt(n * q * (1 - q))
    assert torch.allclose(y[kept], x[kept] / q, rtol=1e-6, atol=0)
    rows, cols = kept.float().mean(1), kept.float().mean(0)  # no stripes: every row and column near q
    assert rows.min() > q - 0.05 and cols.min() > q - 0.05


def test_dropout_gradient_uses_the_forward_mask():
    torch.manual_seed(1)
    x = (torch.rand(64, 48) + 0.5).requires_grad_()  # no zeros of its own
    y = dropout(x, 0.3)
    grad = torch.randn(64, 48)
    y.backward(grad)
    kept = y.detach() != 0
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.allclose(x.grad, torch.where(kept, grad / keep_probability(0.3), 0.0), atol=1e-6)


def test_keep_mask_follows_torch_seed_in_any_thread():
    # Each thread restarts its own generator from torch's: the same torch seed gives the same mask
    # whichever thread draws it, and the next draw is a different mask.
    torch.manual_seed(7)
    first, second = keep_mask((50, 60), 0.1), keep_mask((50, 60), 0.1)
    drawn = {}

    def worker():
        torch.manual_seed(7)
        drawn["first"] = keep_mask((50, 60), 0.1)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert torch.equal(drawn["first"], first)
    assert not torch.equal(first, second)


def test_keep_mask_is_the_factors_draw_in_one_byte():
    torch.manual_seed(4)
    keep = keep_mask((70, 90), 0.25)
    torch.manual_seed(4)
    factor = dropout_factor((70, 90), 0.25, scale=3.0)
    assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) == {0, 1}
    assert torch.equal(factor, keep * (3.0 / keep_probability(0.25)))
    # The keep rate on 630k draws: its standard deviation is 0.00055, so 0.003 is 5.5 of them.
    assert abs(keep_mask((700, 900), 0.25).float().mean().item() - keep_probability(0.25)) < 0.003


def test_dropout_masks_follow_torchs_seed():
    torch.manual_seed(7)
    first, second = dropout_factor((300, 300), 0.2), dropout_factor((300, 300), 0.2)
    torch.manual_seed(7)
    again = dropout_factor((300, 300), 0.2)
    assert torch.equal(first, again)  # manual_seed (and restored RNG states) give the same masks
    assert not torch.equal(first, second)  # a fresh mask per call
    assert first.dtype == torch.float32
    assert torch.unique(first).tolist() == [0.0, pytest.approx(1 / keep_probability(0.2), rel=1e-7)]


def test_dropout_off_in_eval_and_at_zero():
    x = torch.randn(5, 6)
    layer = Dropout(0.4).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(dropout(x, 0.0), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_swiglu_node_matches_the_composition_and_keeps_two_tensors():
    g = torch.Generator().manual_seed(8)
    gate, up = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    grad = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    want_out = F.silu(gate) * up
    got = torch.autograd.grad(swiglu(gate, up), (gate, up), grad)
    want = torch.autograd.grad(want_out, (gate, up), grad)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = swiglu(gate, up)
    assert torch.allclose(out, want_out, atol=1e-12)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up  # silu(gate) is recomputed, not kept
    with torch.no_grad():
        assert torch.allclose(swiglu(gate, up), want_out, atol=1e-12)
