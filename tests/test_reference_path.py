"""The fused autograd nodes of clara.kernels against the reference path (kernels/reference.py, plain
composed PyTorch whose backward autograd derives), and the switch that selects it.

Each op is run twice on the same inputs, under use_reference_kernels(False) (the fused node) and
use_reference_kernels(True) (the reference), and the two must agree in value and in every gradient.
Tolerances, relative to the largest magnitude of the expected tensor (at least 1; for a whole
decoder's gradients, the largest gradient element of the model):
  fp32  1e-5 (the paths differ only in the order of roundings)
  bf16  2e-2 for values, 4e-2 for gradients: a bf16 value has 8 significant bits (one ulp is
        2^-8 to 2^-7 relative), and the reference rounds to bf16 after every op where the fused
        node keeps fp32 between its steps, so they may differ by a few ulps; a whole bf16 decoder
        compounds that over its blocks (3e-2 for logits, 6e-2 for gradients)
Dropout (alone and inside the LoRA layer) draws its mask from the same generator on both paths: the
same torch seed before each run gives the same mask.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import clara.kernels as K
import clara.kernels.matmul as kmatmul
import clara.kernels.reference as kref
from clara.kernels.dropout import dropout
from clara.kernels.lora import lora_linear
from clara.kernels.masks import keep_probability
from clara.kernels.norm import rms_norm
from clara.kernels.rope import apply_rotary
from clara.kernels.swiglu import swiglu
from clara.lora import apply_lora, lora_layers, set_active_adapter
from tiny_models import FAMILY_CONFIGS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

VALUE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
EXAMPLES = settings(max_examples=25, deadline=None)

# The backward node each fused op leaves in the graph (and the reference must not).
FUSED_NODES = {"rms_norm": "_RMSNormBackward", "rotary": "_RotaryBackward", "swiglu": "_SwiGLUBackward",
               "dropout": "_MultiplyByFactorBackward", "lora": "_LoRALinearBackward"}


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str, scale: float | None = None) -> None:
    """|got - want| <= tol * scale everywhere; scale defaults to max(1, the largest |want|)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    if scale is None:
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    diff = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    assert diff <= tol * scale, f"{what}: max abs difference {diff:.3g} > {tol} x {scale:.3g}"


def graph_nodes(t: torch.Tensor) -> set[str]:
    """Class names of every node of t's autograd graph."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def both_paths(op: str, fn, inputs: list[torch.Tensor], seed: int = 0):
    """fn(*inputs) on the fused node and on the reference, with the same torch seed before each:
    [(output, gradients of the inputs that require grad)] for (fused, reference)."""
    runs = []
    for on in (False, True):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
        with K.use_reference_kernels(on):
            torch.manual_seed(seed)
            out = fn(*leaves)
        node = FUSED_NODES[op]
        assert (node in graph_nodes(out)) == (not on), f"{op}: fused node {'present' if on else 'missing'}"
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        runs.append((out.detach(), torch.autograd.grad(out, wanted, grad)))
    return runs


def compare(op: str, fn, inputs, dtype, seed: int = 0) -> None:
    (out, grads), (ref_out, ref_grads) = both_paths(op, fn, inputs, seed)
    assert_close(out, ref_out, VALUE_TOL[dtype], f"{op} value")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, GRAD_TOL[dtype], f"{op} gradient {i}")


def randn(shape, seed: int, dtype, scale: float = 1.0, requires_grad: bool = True) -> torch.Tensor:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    return t.to(dtype).requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------------
# The switch
# ------------------------------------------------------------------------------------------------
def test_switch_is_off_by_default_and_restored_by_the_context_manager():
    if os.environ.get(kref.ENV_VAR):
        pytest.skip(f"{kref.ENV_VAR} is set for this run")
    assert not K.reference_kernels_enabled()
    with K.use_reference_kernels():
        assert all(K.reference_kernels_enabled(op) for op in K.REFERENCE_OPS)
        with K.use_reference_kernels(["lora", "dropout"]):  # names exactly the ops it routes
            assert K.active_reference_kernels() == {"lora", "dropout"}
            assert not K.reference_kernels_enabled("rms_norm")
        assert K.active_reference_kernels() == set(K.REFERENCE_OPS)
    assert not K.reference_kernels_enabled()


def test_switch_called_as_a_function_lasts_until_switched_back():
    before = K.active_reference_kernels()
    try:
        K.use_reference_kernels(True)
        assert K.active_reference_kernels() == set(K.REFERENCE_OPS)
        K.use_reference_kernels("swiglu,rotary")
        assert K.active_reference_kernels() == {"swiglu", "rotary"}
        K.use_reference_kernels(False)
        assert not K.reference_kernels_enabled()
    finally:
        K.use_reference_kernels(before)


def test_switch_refuses_unknown_ops():
    before = K.active_reference_kernels()
    with pytest.raises(ValueError, match=r"unknown reference kernel\(s\) \['layer_norm'\]"):
        K.use_reference_kernels(["rms_norm", "layer_norm"])
    assert K.active_reference_kernels() == before  # a refused call changes nothing
    with pytest.raises(ValueError, match="unknown reference kernel 'norm'"):
        K.reference_kernels_enabled("norm")


@pytest.mark.parametrize("value, expected", [("1", set(kref.OPS)), ("all", set(kref.OPS)), ("0", set()),
                                             ("", set()), ("rms_norm, lora", {"rms_norm", "lora"})])
def test_environment_variable_values(monkeypatch, value, expected):
    monkeypatch.setenv(kref.ENV_VAR, value)
    assert kref._from_environment() == expected


def test_environment_variable_switches_a_new_process(tmp_path):
    # Run outside the checkout: its clara/ folder on sys.path would hide an installed (non-editable) copy.
    env = {**os.environ, kref.ENV_VAR: "1"}
    code = "import clara.kernels as K; print(sorted(K.active_reference_kernels()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == str(sorted(kref.OPS))
    env[kref.ENV_VAR] = "rms_norm,bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "CLARA_REFERENCE_KERNELS='rms_norm,bogus'" in bad.stderr


# ------------------------------------------------------------------------------------------------
# Each fused node against its reference, values and gradients
# ------------------------------------------------------------------------------------------------
@EXAMPLES
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), e=st.integers(1, 40), dtype=DTYPES,
       eps=st.sampled_from([1e-6, 1e-5]), seed=st.integers(0, 2**16))
def test_rms_norm_node_equals_the_reference(lead, e, dtype, eps, seed):
    # |x| >= 0.5: near a zero row the gradient of x / rms(x) is the difference of nearly equal terms
    # of size 1 / rms(x), and both paths return rounding noise of that size.
    x = randn((*lead, e), seed, torch.float32, scale=2.0, requires_grad=False)
    x = (x + 0.5 * x.sign()).to(dtype).requires_grad_()
    w = (torch.rand(e, generator=torch.Generator().manual_seed(seed + 7)) + 0.5).to(dtype).requires_grad_()
    (out, _), (ref_out, _) = both_paths("rms_norm", lambda x, w: rms_norm(x, w, eps), [x, w], seed)
    assert torch.equal(out, ref_out)  # the same ops in the same order: the same values, bit for bit
    compare("rms_norm", lambda x, w: rms_norm(x, w, eps), [x, w], dtype, seed)


@EXAMPLES
@given(b=st.integers(1, 3), h=st.integers(1, 4), l=st.integers(1, 9), half=st.integers(1, 8),
       rot_half=st.integers(1, 8), shared_positions=st.booleans(), strided=st.booleans(), dtype=DTYPES,
       seed=st.integers(0, 2**16))
def test_rotary_node_equals_the_reference(b, h, l, half, rot_half, shared_positions, strided, dtype, seed):
    d, r = 2 * half, 2 * min(rot_half, half)  # R <= D, both even; R < D is partial rotary
    g = torch.Generator().manual_seed(seed)
    angles = torch.randn(1 if shared_positions else b, 1, l, r // 2, generator=g) * 3
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    x = randn((b, l, h, d), seed + 1, dtype)
    if strided:  # [B, L, H, D] viewed as [B, H, L, D], as the decoder's q and k are
        fn = lambda x: apply_rotary(x.transpose(1, 2), cos, sin)  # noqa: E731
    else:
        x = x.detach().transpose(1, 2).contiguous().requires_grad_()
        fn = lambda x: apply_rotary(x, cos, sin)  # noqa: E731
    compare("rotary", fn, [x], dtype, seed)


@EXAMPLES
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_swiglu_node_equals_the_reference(shape, dtype, seed):
    gate, up = randn(shape, seed, dtype, scale=3.0), randn(shape, seed + 1, dtype)
    compare("swiglu", swiglu, [gate, up], dtype, seed)


@EXAMPLES
@given(shape=st.lists(st.integers(1, 30), min_size=1, max_size=3), p=st.sampled_from([0.05, 0.1, 0.5, 0.9]),
       dtype=DTYPES, seed=st.integers(0, 2**16))
def test_dropout_node_equals_the_reference_with_the_same_mask(shape, p, dtype, seed):
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5).to(dtype).requires_grad_()
    (out, (grad,)), (ref_out, (ref_grad,)) = both_paths("dropout", lambda x: dropout(x, p), [x], seed)
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)  # the same mask, the same multiply
    assert torch.equal(out == 0, ref_out == 0)


@EXAMPLES
@given(lead=st.lists(st.integers(1, 6), min_size=1, max_size=2), n_in=st.integers(1, 24), n_out=st.integers(1, 24),
       r=st.integers(1, 6), with_bias=st.booleans(), train_base=st.booleans(),
       p=st.sampled_from([0.0, 0.1, 0.5]), training=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_lora_node_equals_the_reference_with_the_same_dropout_mask(lead, n_in, n_out, r, with_bias, train_base, p,
                                                                   training, dtype, seed):
    x = randn((*lead, n_in), seed, dtype)
    w = randn((n_out, n_in), seed + 1, dtype, scale=0.3, requires_grad=train_base)
    bias = randn(n_out, seed + 2, dtype, requires_grad=train_base) if with_bias else None
    a = randn((r, n_in), seed + 3, dtype, scale=0.3)
    up = randn((n_out, r), seed + 4, dtype, scale=0.3)

    def layer(x, w, bias, a, up):
        return lora_linear(x, w, bias, a, up, 2.0, dropout_p=p, training=training)

    compare("lora", layer, [x, w, bias, a, up], dtype, seed)


def test_lora_dropout_mask_is_the_same_on_both_paths():
    # With B A the identity on a few inputs, dropped inputs show as exact zeros in the adapter's part:
    # both paths must zero the same ones after the same seed, and other seeds other ones.
    n = 64
    x = torch.rand(8, n) + 0.5
    w = torch.zeros(n, n)
    a, up = torch.eye(n), torch.eye(n)
    outs = {}
    for on in (False, True):
        for seed in (3, 4):
            with K.use_reference_kernels(on):
                torch.manual_seed(seed)
                outs[on, seed] = lora_linear(x, w, None, a, up, 1.0, dropout_p=0.3, training=True)
    for seed in (3, 4):
        assert torch.equal(outs[False, seed] == 0, outs[True, seed] == 0)
        assert torch.allclose(outs[False, seed], outs[True, seed], rtol=1e-6, atol=0)
    assert not torch.equal(outs[False, 3] == 0, outs[False, 4] == 0)
    kept = outs[False, 3] != 0
    assert torch.allclose(outs[False, 3][kept], (x / keep_probability(0.3))[kept])


@pytest.mark.parametrize("train_base", [False, True])
def test_widened_bf16_lora_node_equals_the_reference(monkeypatch, train_base):
    # On CPUs without bf16 GEMMs both paths multiply in fp32 (the node widens once, the reference per
    # multiply); this forces that branch whatever this CPU has.
    monkeypatch.setattr(kmatmul, "cpu_has_native_bf16", lambda: False)
    dtype = torch.bfloat16
    x = randn((3, 7, 20), 1, dtype)
    w = randn((12, 20), 2, dtype, scale=0.3, requires_grad=train_base)
    bias = randn(12, 3, dtype, requires_grad=train_base)
    a, up = randn((4, 20), 4, dtype, scale=0.3), randn((12, 4), 5, dtype, scale=0.3)
    compare("lora", lambda *t: lora_linear(*t, 2.0, dropout_p=0.1, training=True), [x, w, bias, a, up], dtype, 9)


# ------------------------------------------------------------------------------------------------
# A whole tiny decoder with LoRA adapters: the switch on and off
# ------------------------------------------------------------------------------------------------
def decoder_with_lora(family: str, dtype: torch.dtype):
    model = tiny_model(family).to(dtype)
    apply_lora(model, ["adapter"], r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.adapters["adapter"].lora_B
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    set_active_adapter(model, "adapter")
    return model.train()  # LoRA dropout on


def forward_backward(model, ids, reference: bool, checkpointing: bool = False):
    """Logits and the gradient of every trainable parameter (adapters, embeddings, norms, lm head)."""
    model.zero_grad(set_to_none=True)
    model.set_gradient_checkpointing(checkpointing)
    with K.use_reference_kernels(reference):
        torch.manual_seed(11)  # the same dropout masks on both paths
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        nodes = graph_nodes(loss)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, nodes


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_tiny_decoder_gives_the_same_logits_and_gradients_with_the_switch_on_and_off(family):
    model = decoder_with_lora(family, torch.float32)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    fused, fused_grads, fused_nodes = forward_backward(model, ids, reference=False)
    ref, ref_grads, ref_nodes = forward_backward(model, ids, reference=True)
    # Which fused nodes this family uses (Phi-2 has LayerNorm and GELU), and that the switch removes them.
    expected_nodes = {FUSED_NODES["rotary"], FUSED_NODES["lora"]}
    if FAMILY_CONFIGS[family].get("norm", "rmsnorm") == "rmsnorm":
        expected_nodes |= {FUSED_NODES["rms_norm"], FUSED_NODES["swiglu"]}
    assert expected_nodes <= fused_nodes
    assert not set(FUSED_NODES.values()) & ref_nodes
    assert_close(fused, ref, 1e-5, f"{family} logits")
    assert fused_grads.keys() == ref_grads.keys() and any(".lora_A" in n for n in ref_grads)
    assert_gradients_close(fused_grads, ref_grads, 1e-5, family)


def assert_gradients_close(got: dict, want: dict, tol: float, what: str) -> None:
    """Every parameter's gradient within tol of the largest gradient element of the model."""
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 0
    for name in want:
        assert_close(got[name], want[name], tol, f"{what} gradient of {name}", scale=scale)


def test_tiny_decoder_with_checkpointing_and_bf16_agrees_across_the_switch():
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    model = decoder_with_lora("llama_tied", torch.float32)
    fused, fused_grads, _ = forward_backward(model, ids, reference=False, checkpointing=True)
    ref, ref_grads, _ = forward_backward(model, ids, reference=True, checkpointing=True)
    assert_close(fused, ref, 1e-5, "checkpointed logits")
    assert_gradients_close(fused_grads, ref_grads, 1e-5, "checkpointed")

    # bf16 weights and adapters: rounding differs op by op, and two blocks compound it; the logits
    # stay within 3 % of their largest magnitude and the gradients within 6 % of the largest one.
    model = decoder_with_lora("llama_tied", torch.bfloat16)
    fused, fused_grads, _ = forward_backward(model, ids, reference=False)
    ref, ref_grads, _ = forward_backward(model, ids, reference=True)
    assert_close(fused, ref, 3e-2, "bf16 logits")
    assert_gradients_close(fused_grads, ref_grads, 6e-2, "bf16")
