"""LoRA invariants on tiny random decoders: base equality, merge, training, state dicts, switching."""

import contextlib
import math
import threading
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from clara.kernels import build_attention_mask

from clara.decoder import Decoder
from clara.lora import (
    LoRALinear,
    active_adapter,
    adapter_state_dict,
    add_adapter,
    apply_lora,
    checkpoint_context,
    copy_adapter,
    load_adapter_state_dict,
    lora_layers,
    mark_only_adapters_trainable,
    merge_adapter,
    set_active_adapter,
    trainable_parameters,
    unmerge_adapter,
    use_adapter,
)
from tiny_models import random_tiny_decoder

ADAPTERS = ["encoder_adapter", "decoder_adapter", "query_reasoner_adapter"]
FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "phi3_fused": dict(fused_qkv=True, fused_gate_up=True),
    "phi2_biases": dict(norm="layernorm", mlp="gelu", parallel_residual=True, attention_bias=True,
                        attention_out_bias=True, mlp_bias=True, lm_head_bias=True),
}
R, ALPHA = 4, 8  # CLaRa uses alpha = 2r


def tiny_decoder(family: str = "llama", seed: int = 0) -> Decoder:
    return random_tiny_decoder(FAMILIES[family], seed, std=0.1, max_positions=64)


def lora_decoder(family: str = "llama", seed: int = 0, dropout: float = 0.0) -> Decoder:
    model = tiny_decoder(family, seed)
    apply_lora(model, ADAPTERS, r=R, alpha=ALPHA, dropout=dropout, target_modules="all-linear")
    return model


@torch.no_grad()
def randomize_adapter(model: nn.Module, name: str, seed: int) -> None:
    """Make B nonzero (it starts at zero) so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        b = layer.adapters[name].lora_B
        b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def token_ids(seed: int = 1, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, 101, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids, adapter):
    with torch.no_grad(), use_adapter(model, adapter):
        return model(ids).logits


def base_logits(family: str, ids) -> torch.Tensor:
    with torch.no_grad():
        return tiny_decoder(family)(ids).logits


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------
def test_all_linear_converts_every_block_linear_and_names_adapter_parameters():
    model = tiny_decoder("llama")
    converted = apply_lora(model, ADAPTERS, r=R, alpha=ALPHA, target_modules="all-linear")
    per_block = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj"]
    assert converted == [f"layers.{i}.{m}" for i in range(2) for m in per_block]
    assert not isinstance(model.lm_head, LoRALinear)
    assert not any(m.training for m in model.modules())  # an eval-mode model stays in eval mode

    state = model.state_dict()
    a, b = state["layers.0.attn.q_proj.adapters.encoder_adapter.lora_A"], state[
        "layers.0.attn.q_proj.adapters.encoder_adapter.lora_B"]
    assert a.shape == (R, 48) and b.shape == (48, R)
    assert torch.equal(b, torch.zeros(48, R))
    # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(48)
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    down_a = state["layers.1.mlp.down_proj.adapters.query_reasoner_adapter.lora_A"]
    assert down_a.shape == (R, 80)
    layer = model.layers[0].attn.q_proj
    assert layer.adapters["decoder_adapter"].scaling == ALPHA / R
    assert not layer.weight.requires_grad


def test_fused_projections_get_one_adapter_over_the_whole_output():
    model = tiny_decoder("phi3_fused")
    converted = apply_lora(model, ["encoder_adapter"], r=R, alpha=ALPHA, target_modules=["qkv_proj", "gate_up_proj"])
    assert converted == ["layers.0.attn.qkv_proj", "layers.0.mlp.gate_up_proj",
                         "layers.1.attn.qkv_proj", "layers.1.mlp.gate_up_proj"]
    qkv_out = 48 + 2 * 48  # 4 query heads and 4 kv heads of 12 dims
    assert model.layers[0].attn.qkv_proj.adapters["encoder_adapter"].lora_B.shape == (qkv_out, R)
    assert model.layers[0].mlp.gate_up_proj.adapters["encoder_adapter"].lora_B.shape == (2 * 80, R)


def test_target_that_matches_nothing_is_refused_with_the_available_names():
    model = tiny_decoder("phi3_fused")
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no linear layer.*qkv_proj"):
        apply_lora(model, ["encoder_adapter"], r=R, alpha=ALPHA, target_modules=["q_proj", "o_proj"])
    for bad in ["bad.name", "", "trailing\n"]:
        with pytest.raises(ValueError, match="identifier"):
            apply_lora(model, [bad], r=R, alpha=ALPHA)
    apply_lora(model, ["encoder_adapter"], r=R, alpha=ALPHA)
    with pytest.raises(ValueError, match="add_adapter"):
        apply_lora(model, ["decoder_adapter"], r=R, alpha=ALPHA)


def test_layer_computes_the_documented_formula():
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(16, 12))
    adapter = layer.add_adapter("encoder_adapter", r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(5, 16)
    expected = x @ layer.weight.T + layer.bias + (4 / 2) * (x @ adapter.lora_A.T @ adapter.lora_B.T)
    with use_adapter(layer, "encoder_adapter"):
        assert torch.allclose(layer(x), expected, atol=1e-6, rtol=0)
    with use_adapter(layer, None):
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(4)
    layer = LoRALinear(nn.Linear(16, 12))
    with torch.no_grad():
        layer.add_adapter("encoder_adapter", r=2, alpha=4, dropout=0.5).lora_B.normal_()
    x = torch.randn(5, 16)
    layer.train()
    with use_adapter(layer, None):
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    with use_adapter(layer, "encoder_adapter"):
        first, second = layer(x), layer(x)
        assert not torch.equal(first, second)  # a fresh dropout mask per call
        layer.eval()
        assert torch.equal(layer(x), layer(x))


# ------------------------------------------------------------------------------------------------
# Equal to the base where it should be
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_initialised_b_gives_exactly_the_base_output(family):
    ids = token_ids()
    expected = base_logits(family, ids)
    model = lora_decoder(family)
    for adapter in [None, *ADAPTERS]:
        assert torch.equal(logits(model, ids, adapter), expected), adapter


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inactive_adapter_gives_exactly_the_base_output(family):
    ids = token_ids()
    model = lora_decoder(family)
    for i, name in enumerate(ADAPTERS):
        randomize_adapter(model, name, seed=i)
    assert torch.equal(logits(model, ids, None), base_logits(family, ids))
    assert not torch.allclose(logits(model, ids, "encoder_adapter"), base_logits(family, ids), atol=1e-3)


def test_base_state_dict_loads_unchanged_into_a_converted_model():
    ids = token_ids()
    base = tiny_decoder("phi2_biases", seed=0)
    converted = lora_decoder("phi2_biases", seed=1)  # different random base weights
    result = converted.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(k for k in converted.state_dict() if ".adapters." in k)
    assert torch.equal(converted.layers[1].attn.q_proj.bias, base.layers[1].attn.q_proj.bias)
    with torch.no_grad():
        assert torch.equal(logits(converted, ids, None), base(ids).logits)


# ------------------------------------------------------------------------------------------------
# Switching adapters
# ------------------------------------------------------------------------------------------------
def test_switching_adapters_changes_outputs_and_switching_back_restores_them():
    ids = token_ids()
    model = lora_decoder()
    randomize_adapter(model, "encoder_adapter", seed=1)
    randomize_adapter(model, "decoder_adapter", seed=2)
    enc, dec = logits(model, ids, "encoder_adapter"), logits(model, ids, "decoder_adapter")
    assert (enc - dec).abs().max() > 1e-2
    assert torch.equal(logits(model, ids, "encoder_adapter"), enc)


def test_use_adapter_nests_overrides_the_default_and_rejects_unknown_names():
    model = lora_decoder()
    assert active_adapter(model) is None
    set_active_adapter(model, "decoder_adapter")
    with use_adapter(model, "encoder_adapter"):
        assert active_adapter(model) == "encoder_adapter"
        with use_adapter(model, None):
            assert active_adapter(model) is None
        assert active_adapter(model) == "encoder_adapter"
    assert active_adapter(model) == "decoder_adapter"
    with pytest.raises(KeyError, match="'nope'.*adapters present"):
        with use_adapter(model, "nope"):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with use_adapter(model, "encoder_adapter"):
            raise RuntimeError("boom")
    assert active_adapter(model) == "decoder_adapter"  # restored after the exception


def test_use_adapter_applies_to_the_calling_thread_only():
    model = lora_decoder()
    set_active_adapter(model, "decoder_adapter")
    seen = []
    with use_adapter(model, "encoder_adapter"):
        thread = threading.Thread(target=lambda: seen.append(active_adapter(model)))
        thread.start()
        thread.join()
        assert active_adapter(model) == "encoder_adapter"
    assert seen == ["decoder_adapter"]  # the other thread sees the model's default


def test_two_models_switch_independently():
    first, second = lora_decoder(seed=0), lora_decoder(seed=0)
    with use_adapter(first, "encoder_adapter"):
        assert active_adapter(first) == "encoder_adapter"
        assert active_adapter(second) is None


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def lm_loss(model, ids):
    out = model(ids[:, :-1]).logits
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def test_gradients_reach_only_the_active_adapter():
    model = lora_decoder("phi3_fused")
    for i, name in enumerate(ADAPTERS):
        randomize_adapter(model, name, seed=i)
    mark_only_adapters_trainable(model, ADAPTERS)
    with use_adapter(model, "decoder_adapter"):
        lm_loss(model, token_ids()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if ".adapters.decoder_adapter." in n}
    assert all(model.get_parameter(n).grad.abs().max() > 0 for n in with_grad)


def test_optimizer_steps_change_only_the_active_adapter():
    model = lora_decoder("llama", dropout=0.1).train()
    for i, name in enumerate(ADAPTERS):
        randomize_adapter(model, name, seed=i)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mark_only_adapters_trainable(model, ADAPTERS)
    params = trainable_parameters(model, ADAPTERS)
    assert len(params) == 2 * 14 * len(ADAPTERS)  # A and B in 14 layers for each adapter
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids = token_ids(shape=(2, 10))
    for _ in range(3):
        optimizer.zero_grad()
        with use_adapter(model, "encoder_adapter"):
            lm_loss(model, ids).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if ".adapters.encoder_adapter." in name:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name  # base and the other adapters: bit for bit


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        model = lora_decoder("llama", dropout=0.1).train()
        randomize_adapter(model, "encoder_adapter", seed=5)
        mark_only_adapters_trainable(model, ["encoder_adapter"])
        model.set_gradient_checkpointing(checkpointing)
        torch.manual_seed(11)  # same dropout masks; checkpointing replays the RNG state
        with use_adapter(model, "encoder_adapter"):
            lm_loss(model, token_ids()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and len(plain) == 28
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], atol=1e-6, rtol=0), name


def two_adapter_loss(model, ids):
    """Stage-2 shape: one adapter encodes, another generates, backward once outside both blocks."""
    with use_adapter(model, "query_reasoner_adapter"):
        hidden = model(ids, compute_logits=False).hidden_states
    with use_adapter(model, "decoder_adapter"):
        out = model(inputs_embeds=hidden).logits
    return out.square().mean()


def test_checkpoint_context_recomputes_with_the_forward_pass_adapter():
    model = lora_decoder()
    randomize_adapter(model, "query_reasoner_adapter", seed=1)
    randomize_adapter(model, "decoder_adapter", seed=2)
    mark_only_adapters_trainable(model, ADAPTERS)
    block = model.layers[0]
    x = torch.randn(1, 6, 48)
    cos, sin = model.rotary(torch.arange(6)[None], x.dtype)
    mask = build_attention_mask(6, 6, None, None, device=x.device)

    def run(context_fn=None, backward_under=None):
        model.zero_grad()
        with use_adapter(model, "query_reasoner_adapter"):
            if context_fn is None:
                h = block(x, cos, sin, mask, None, 0)
            else:
                h = checkpoint(block, x, cos, sin, mask, None, 0, use_reentrant=False, context_fn=context_fn)
        with use_adapter(model, "decoder_adapter"):
            y = model.layers[1](h, cos, sin, mask, None, 1)
        with use_adapter(model, backward_under):
            y.square().mean().backward()  # layer 0 is recomputed here
        return {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}

    def assert_same(expected, actual):
        assert expected.keys() == actual.keys() and len(expected) == 14
        for name in expected:
            assert torch.allclose(expected[name], actual[name], atol=1e-6, rtol=0), name

    plain = run()
    assert_same(plain, run(checkpoint_context, backward_under=None))
    assert_same(plain, run(checkpoint_context, backward_under="decoder_adapter"))
    # Without it, layer 0 is recomputed with whatever is active at backward: silently wrong here.
    no_context = run(lambda: (contextlib.nullcontext(), contextlib.nullcontext()), backward_under="decoder_adapter")
    assert max((plain[n] - no_context[n]).abs().max() for n in plain) > 1e-4


def test_decoder_checkpointing_with_two_adapters_in_one_graph():
    def grads(checkpointing: bool):
        model = lora_decoder()
        randomize_adapter(model, "query_reasoner_adapter", seed=1)
        randomize_adapter(model, "decoder_adapter", seed=2)
        mark_only_adapters_trainable(model, ADAPTERS)
        model.set_gradient_checkpointing(checkpointing)
        two_adapter_loss(model, token_ids()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], atol=1e-6, rtol=0), name


# ------------------------------------------------------------------------------------------------
# Merge
# ------------------------------------------------------------------------------------------------
def test_merged_equals_unmerged_and_unmerge_restores_the_base():
    ids = token_ids()
    model = lora_decoder("phi2_biases")
    randomize_adapter(model, "decoder_adapter", seed=3)
    unmerged = logits(model, ids, "decoder_adapter")
    weights = {n: layer.weight.detach().clone() for n, layer in lora_layers(model).items()}

    merge_adapter(model, "decoder_adapter")
    assert all(not torch.equal(layer.weight, weights[n]) for n, layer in lora_layers(model).items())
    assert (logits(model, ids, "decoder_adapter") - unmerged).abs().max() <= 1e-6

    unmerge_adapter(model, "decoder_adapter")
    for name, layer in lora_layers(model).items():
        assert (layer.weight - weights[name]).abs().max() <= 1e-6, name
    assert (logits(model, ids, None) - base_logits("phi2_biases", ids)).abs().max() <= 1e-6


def test_merge_is_guarded():
    model = lora_decoder()
    randomize_adapter(model, "encoder_adapter", seed=1)
    merge_adapter(model, "encoder_adapter")
    merged = model.layers[0].attn.q_proj.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged") as caught:
        merge_adapter(model, "encoder_adapter")
    assert len(caught) == 1  # one warning for the model, not one per layer
    assert torch.equal(model.layers[0].attn.q_proj.weight, merged)  # the second merge did nothing
    with pytest.raises(RuntimeError, match="'encoder_adapter' is merged; unmerge it first"):
        merge_adapter(model, "decoder_adapter")
    with pytest.raises(RuntimeError, match="merged into the weight, but 'decoder_adapter' is active"):
        logits(model, token_ids(), "decoder_adapter")
    with pytest.raises(RuntimeError, match="merged into the weight, but None is active"):
        logits(model, token_ids(), None)
    with pytest.raises(RuntimeError, match="merged"):
        load_adapter_state_dict(model, "encoder_adapter", adapter_state_dict(model, "encoder_adapter"))
    with pytest.warns(UserWarning, match="is not merged"):
        unmerge_adapter(model, "decoder_adapter")
    unmerge_adapter(model, "encoder_adapter")
    with pytest.warns(UserWarning, match="is not merged"):
        unmerge_adapter(model, "encoder_adapter")


# ------------------------------------------------------------------------------------------------
# Adapter state dicts and copies
# ------------------------------------------------------------------------------------------------
def test_adapter_state_dict_round_trips_bit_for_bit_under_another_name(tmp_path):
    ids = token_ids()
    source = lora_decoder("phi3_fused", seed=0)
    randomize_adapter(source, "encoder_adapter", seed=7)
    state = adapter_state_dict(source, "encoder_adapter")
    assert set(state) == {f"layers.{i}.{m}.lora_{ab}" for i in range(2)
                          for m in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
                          for ab in "AB"}
    save_file(state, tmp_path / "encoder_adapter.safetensors")

    target = lora_decoder("phi3_fused", seed=0)  # same base, fresh adapters
    missing, unexpected = load_adapter_state_dict(target, "query_reasoner_adapter",
                                                  load_file(tmp_path / "encoder_adapter.safetensors"))
    assert missing == [] and unexpected == []
    reloaded = adapter_state_dict(target, "query_reasoner_adapter")
    assert all(torch.equal(reloaded[k], state[k]) for k in state)
    assert torch.equal(logits(target, ids, "query_reasoner_adapter"), logits(source, ids, "encoder_adapter"))


def test_loading_a_mismatched_adapter_state_names_the_keys():
    model = lora_decoder()
    state = adapter_state_dict(model, "encoder_adapter")
    dropped = dict(state)
    del dropped["layers.1.mlp.up_proj.lora_B"]
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.mlp.up_proj.lora_B'\]"):
        load_adapter_state_dict(model, "decoder_adapter", dropped)
    assert load_adapter_state_dict(model, "decoder_adapter", dropped, strict=False) == (
        ["layers.1.mlp.up_proj.lora_B"], [])
    extra = {**state, "layers.0.attn.q_proj.lora_C": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.0.attn.q_proj.lora_C'\]"):
        load_adapter_state_dict(model, "decoder_adapter", extra)
    wrong_rank = {**state, "layers.0.attn.k_proj.lora_A": torch.zeros(R + 1, 48)}
    with pytest.raises(ValueError, match=r"layers.0.attn.k_proj.lora_A: checkpoint \(5, 48\) vs model \(4, 48\)"):
        load_adapter_state_dict(model, "decoder_adapter", wrong_rank, strict=False)
    with pytest.raises(KeyError, match="'missing_adapter'"):
        load_adapter_state_dict(model, "missing_adapter", state)


def test_copy_adapter_gives_identical_outputs_and_independent_parameters():
    ids = token_ids()
    model = tiny_decoder("llama")
    apply_lora(model, ["encoder_adapter"], r=R, alpha=ALPHA, dropout=0.05, target_modules=["q_proj", "v_proj"])
    randomize_adapter(model, "encoder_adapter", seed=8)
    copy_adapter(model, "encoder_adapter", "query_reasoner_adapter")  # created by the copy
    assert torch.equal(logits(model, ids, "query_reasoner_adapter"), logits(model, ids, "encoder_adapter"))
    copied = model.layers[0].attn.q_proj.adapters["query_reasoner_adapter"]
    assert copied.dropout_p == 0.05 and copied.scaling == ALPHA / R
    assert not copied.training  # added to an eval-mode model: no dropout at inference

    add_adapter(model, "decoder_adapter", r=R, alpha=ALPHA)
    existing = model.layers[1].attn.v_proj.adapters["decoder_adapter"].lora_B
    copy_adapter(model, "encoder_adapter", "decoder_adapter")  # onto an existing adapter, in place
    assert model.layers[1].attn.v_proj.adapters["decoder_adapter"].lora_B is existing
    with torch.no_grad():
        copied.lora_B.add_(1.0)
    assert not torch.equal(copied.lora_B, model.layers[0].attn.q_proj.adapters["encoder_adapter"].lora_B)
    add_adapter(model, "wide", r=R + 2, alpha=ALPHA)
    with pytest.raises(ValueError, match="ranks differ"):
        copy_adapter(model, "encoder_adapter", "wide")
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(model, "wide", r=R, alpha=ALPHA)


# ------------------------------------------------------------------------------------------------
# Low precision
# ------------------------------------------------------------------------------------------------
def test_bf16_weights():
    ids = token_ids()
    model = tiny_decoder("llama").to(torch.bfloat16)
    with torch.no_grad():
        expected = model(ids).logits
    apply_lora(model, ADAPTERS, r=R, alpha=ALPHA)
    assert model.layers[0].mlp.up_proj.adapters["encoder_adapter"].lora_A.dtype == torch.bfloat16
    assert torch.equal(logits(model, ids, "encoder_adapter"), expected)  # B = 0: exactly the base

    randomize_adapter(model, "encoder_adapter", seed=9)
    layer, x = model.layers[0].attn.q_proj, torch.randn(3, 48).to(torch.bfloat16)
    adapter = layer.adapters["encoder_adapter"]
    reference = (x.float() @ layer.weight.float().T
                 + (ALPHA / R) * (x.float() @ adapter.lora_A.float().T @ adapter.lora_B.float().T))
    with use_adapter(model, "encoder_adapter"):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=2e-2, rtol=2e-2)

    mark_only_adapters_trainable(model, ["encoder_adapter"])
    with use_adapter(model, "encoder_adapter"):
        lm_loss(model, ids).backward()
    assert adapter.lora_B.grad.dtype == torch.bfloat16 and adapter.lora_B.grad.abs().max() > 0

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings on an ordinary merge/unmerge pair
        before = layer.weight.detach().clone()
        merge_adapter(model, "encoder_adapter")
        unmerge_adapter(model, "encoder_adapter")
    assert torch.allclose(layer.weight.float(), before.float(), atol=2e-3, rtol=1e-2)  # bf16 rounding


def test_fp32_adapters_on_a_bf16_base():
    ids = token_ids()
    model = tiny_decoder("llama").to(torch.bfloat16)
    apply_lora(model, ["encoder_adapter"], r=R, alpha=ALPHA, adapter_dtype=torch.float32)
    randomize_adapter(model, "encoder_adapter", seed=10)
    assert model.layers[1].attn.o_proj.adapters["encoder_adapter"].lora_B.dtype == torch.float32
    mark_only_adapters_trainable(model, ["encoder_adapter"])
    with use_adapter(model, "encoder_adapter"):
        out = model(ids).logits
        lm_loss(model, ids).backward()
    assert out.dtype == torch.bfloat16
    assert model.layers[1].attn.o_proj.adapters["encoder_adapter"].lora_B.grad.dtype == torch.float32
