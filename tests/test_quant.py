"""The quantized frozen base (clara/quant.py, kernels/dequant_linear.py): NF4 and int8 round trips
with their error bounds, logits of quantized tiny models against the unquantized ones, LoRA
training on a quantized base, gradient checkpointing, and what the backward keeps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clara.kernels.dequant_linear import dequant_linear
from clara.lora import apply_lora, merge_adapter, use_adapter
from clara.quant import (
    NF4_BLOCK,
    NF4_LEVELS,
    NF4_MAX_HALF_GAP,
    QuantizationError,
    QuantizedLinear,
    dequantize_int8,
    dequantize_nf4,
    nf4_error_bound,
    quantize_int8,
    quantize_linear_layers,
    quantize_nf4,
    quantized_bytes,
    quantized_layers,
)
from clara.weights import WeightsError, load_base

from tiny_models import FAMILY_CONFIGS, conditioned_tiny_model, random_tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

shapes = st.tuples(st.integers(1, 40), st.integers(1, 300))
scales = st.sampled_from([1e-4, 0.02, 1.0, 30.0])


def _padded_blocks(w: torch.Tensor, n_blocks: int) -> torch.Tensor:
    flat = w.reshape(-1)
    return torch.cat([flat, flat.new_zeros(n_blocks * NF4_BLOCK - flat.numel())]).view(n_blocks, NF4_BLOCK)


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(shape=shapes, scale=scales, seed=st.integers(0, 2**16), outlier=st.booleans())
def test_nf4_error_stays_within_each_blocks_bound(shape, scale, seed, outlier):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    if outlier:  # one large value per tensor: its block's absmax, and the absmax scales' spread
        w.view(-1)[torch.randint(0, w.numel(), (1,), generator=g)] *= 50
    q = quantize_nf4(w)
    restored = dequantize_nf4(q)
    assert restored.shape == w.shape and restored.dtype == torch.float32
    n_blocks = q.absmax_codes.numel()
    assert n_blocks == -(-w.numel() // NF4_BLOCK) and q.codes.numel() == n_blocks * NF4_BLOCK // 2
    error = (_padded_blocks(w, n_blocks) - _padded_blocks(restored, n_blocks)).abs().amax(1)
    bound = nf4_error_bound(q)
    assert torch.all(error <= bound * (1 + 1e-5) + 1e-7), (error - bound).max()
    # The bound is the codebook's half gap times the block's absmax, and a little for the absmax's own rounding.
    absmax = _padded_blocks(w, n_blocks).abs().amax(1)
    assert torch.all(bound <= absmax * NF4_MAX_HALF_GAP * 1.01 + q.absmax_scales.max())


@settings(max_examples=40, deadline=None)
@given(shape=shapes, scale=scales, seed=st.integers(0, 2**16))
def test_int8_error_is_at_most_half_a_step_per_row(shape, scale, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    q = quantize_int8(w)
    assert q.codes.dtype == torch.int8 and q.scales.shape == (shape[0],)
    error = (w - dequantize_int8(q)).abs().amax(1)
    assert torch.all(error <= q.scales / 2 * (1 + 1e-5))
    torch.testing.assert_close(q.scales, w.abs().amax(1) / 127)


def test_nf4_levels_times_the_absmax_come_back_exactly():
    # Each block holds the 16 levels times a power of two: every value is representable, so the round
    # trip is exact when the absmax is (one block per group, offset = that absmax, code 0).
    values = torch.cat([NF4_LEVELS * 4.0] * (NF4_BLOCK // 16)).view(1, NF4_BLOCK)
    q = quantize_nf4(values)
    assert q.absmax_codes.tolist() == [0] and q.absmax_offset.item() == 4.0
    assert torch.equal(dequantize_nf4(q), values)
    # Packing: the first value of each pair in the high nibble, level -1 is index 0, level +1 index 15.
    assert q.codes[0].item() == (0 << 4) | 1 and q.codes[7].item() == (14 << 4) | 15


def test_nf4_zero_blocks_stay_zero():
    w = torch.zeros(3, 64)
    w[1] = torch.linspace(-1, 1, 64)
    restored = dequantize_nf4(quantize_nf4(w))
    assert torch.equal(restored[0], torch.zeros(64)) and torch.equal(restored[2], torch.zeros(64))


def test_storage_sizes_are_four_and_eight_bits_a_weight():
    layer = QuantizedLinear.from_weight(torch.randn(4096, 1024), None, "nf4")
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert stored == quantized_bytes(1024, 4096, "nf4")
    assert 4.12 < 8 * stored / (4096 * 1024) < 4.14
    layer = QuantizedLinear.from_weight(torch.randn(64, 32), torch.randn(64), "int8")
    assert sum(b.numel() * b.element_size() for n, b in layer.named_buffers() if n != "bias") == \
        quantized_bytes(32, 64, "int8") == 64 * 32 + 4 * 64


def test_unknown_kind_is_refused_with_the_choices():
    with pytest.raises(QuantizationError, match="nf4, int8"):
        quantize_linear_layers(torch.nn.Linear(2, 2), "fp4")
    with pytest.raises(WeightsError, match="quantize='int4'"):
        load_base("smollm2-135m", quantize="int4")


# ------------------------------------------------------------------------------------------------
# The layer: forward, backward, what is kept
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_layer_matches_a_linear_over_the_dequantized_weight_and_its_input_gradient(kind):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = QuantizedLinear.from_linear(linear, kind)
    weight = layer.dequantize(torch.float64)
    x = torch.randn(3, 5, 96, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: dequant_linear(t, layer.dequantize, layer.bias.double()), (x,))
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, weight, linear.bias.double()))
    assert not any(p.requires_grad for p in layer.parameters())


def test_backward_keeps_no_dequantized_weight():
    layer = QuantizedLinear.from_weight(torch.randn(256, 128), None, "nf4")
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (256, 128) not in saved and (128, 256) not in saved
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(4, 128), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype, rows", [(torch.bfloat16, 1), (torch.bfloat16, 8), (torch.bfloat16, 9),
                                         (torch.float32, 1)])
def test_int8_without_grad_matches_the_dequantized_multiply(dtype, rows):
    from clara.kernels import dequant_linear as module

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(dtype)
    layer = QuantizedLinear.from_linear(linear, "int8")
    x = torch.randn(rows, 64, dtype=dtype)
    slow = dequant_linear(x, layer.dequantize, layer.bias).detach()  # the path a gradient takes
    with torch.no_grad():
        fast = layer(x)
        by_kernel = module.int8_linear_without_grad(x, layer.codes, layer.scales, layer.bias)
    assert fast.dtype == dtype and fast.shape == (rows, 48)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast, slow, **tolerance)
    # The int8 kernel only for bf16 decoding-sized products (where it is faster), where this torch has it.
    expected = dtype == torch.bfloat16 and rows <= module.INT8_KERNEL_MAX_ROWS and module._int8_kernel_available()
    assert (by_kernel is not None) == expected
    if expected:
        torch.testing.assert_close(by_kernel, fast, rtol=0, atol=0)  # what the layer ran


def test_autocast_runs_the_multiply_in_the_autocast_dtype():
    layer = QuantizedLinear.from_weight(torch.randn(32, 16), None, "int8")
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ layer.dequantize().t(), rtol=2e-2, atol=5e-2)


# ------------------------------------------------------------------------------------------------
# Whole tiny models
# ------------------------------------------------------------------------------------------------
# Relative L2 error of the logits against the unquantized fp32 model (measured on these models:
# NF4 0.036-0.058, int8 0.002-0.004, the model cast to bf16 0.004-0.005).
LOGIT_TOLERANCE = {"nf4": 0.08, "int8": 0.008}


@pytest.mark.parametrize("family", ["llama_tied", "mistral_window", "phi3_fused", "phi2_parallel"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_tiny_model_logits_stay_close(family, kind):
    model = conditioned_tiny_model(family, seed=1)
    quantized = copy.deepcopy(model)
    replaced = quantize_linear_layers(quantized, kind)
    assert replaced == list(quantized_layers(quantized)) and len(replaced) >= 2 * 3
    assert "lm_head" not in replaced and quantized.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(ids).logits, quantized(ids).logits
    relative = ((out - ref).norm() / ref.norm()).item()
    assert relative < LOGIT_TOLERANCE[kind]
    assert relative > 0  # the weights really are quantized


def _train_adapter(model, steps: int = 25, checkpointing: bool = False) -> list[float]:
    torch.manual_seed(0)
    apply_lora(model, ["decoder_adapter"], r=4, alpha=8)
    model.set_gradient_checkpointing(checkpointing)
    params = [p for n, p in model.named_parameters() if "adapters" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    # A learnable pattern: each row counts up by its own stride.
    ids = (torch.arange(16) * torch.tensor([[1], [2], [3], [5]]) + torch.tensor([[0], [7], [30], [60]])) % 101
    losses = []
    with use_adapter(model, "decoder_adapter"):
        for _ in range(steps):
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_on_a_quantized_base_learns_as_on_the_unquantized_one(kind):
    base = conditioned_tiny_model("mistral_window", seed=2).train()
    quantized = copy.deepcopy(base)
    quantize_linear_layers(quantized, kind)
    plain, quant = _train_adapter(base), _train_adapter(quantized)
    assert quant[-1] < 0.7 * quant[0]  # it learns (4.67 -> 2.8 in 25 steps)
    assert abs(quant[-1] - plain[-1]) < 0.1 * plain[0]  # and about as far as the unquantized base
    assert all(b.dtype in (torch.uint8, torch.int8, torch.float32) for b in quantized.buffers())


def test_gradient_checkpointing_gives_the_same_training_on_a_quantized_base():
    base = conditioned_tiny_model("llama_tied", seed=4).train()
    quantize_linear_layers(base, "nf4")
    with_ckpt = _train_adapter(copy.deepcopy(base), steps=3, checkpointing=True)
    without = _train_adapter(copy.deepcopy(base), steps=3, checkpointing=False)
    assert with_ckpt == pytest.approx(without, rel=1e-5)


def test_merging_into_a_quantized_base_is_refused():
    model = random_tiny_decoder(FAMILY_CONFIGS["llama_tied"], std=0.05)
    quantize_linear_layers(model, "int8")
    apply_lora(model, ["decoder_adapter"], r=2, alpha=4)
    with pytest.raises(RuntimeError, match="int8-quantized base"):
        merge_adapter(model, "decoder_adapter")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_load_base_quantizes_as_it_reads(tiny_base_dir, kind):
    plain, tokenizer = load_base(tiny_base_dir)
    plain_bf16, _ = load_base(tiny_base_dir, dtype=torch.bfloat16)
    quantized, _ = load_base(tiny_base_dir, quantize=kind, dtype=torch.bfloat16)
    layers = quantized_layers(quantized)
    assert len(layers) == 2 * 7
    assert all(layer.kind == kind and layer.dtype == torch.bfloat16 for layer in layers.values())
    assert quantized.embed_tokens.weight.dtype == torch.bfloat16
    # Each layer holds what quantizing the checkpoint's weight gives.
    reference = QuantizedLinear.from_linear(plain.layers[0].mlp.down_proj, kind)
    torch.testing.assert_close(layers["layers.0.mlp.down_proj"].dequantize(), reference.dequantize())
    ids = torch.tensor([tokenizer.encode("Kale is rich in vitamin K.")])
    with torch.no_grad():
        ref, out = plain_bf16(ids).logits.float(), quantized(ids).logits.float()
    assert ((out - ref).norm() / ref.norm()).item() < LOGIT_TOLERANCE[kind] * 3  # bf16 activations add their own
