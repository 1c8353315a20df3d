"""The memory planner: exact parameter counts, and estimates within 15% of the measured CPU peak."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from clara.config import DecoderConfig
from clara.decoder import Decoder
from clara.lora import (
    apply_lora,
    mark_only_adapters_trainable,
    trainable_parameters,
    use_adapter,
)
from clara.weights import WeightsError, embedded_model_path, gguf_config, open_gguf
from clara.recipes.args import parse_args
from clara.recipes.planner import (
    PRESETS,
    GiB,
    adapter_parameter_count,
    base_parameter_count,
    estimate_peak_memory,
    format_plan,
    largest_micro_batch,
    load_model_config,
    main,
    plan_from_args,
    plan_kwargs_from_train_args,
    preset_config,
)
from tiny_models import random_tiny_decoder

FAMILIES = {
    "llama_gqa": dict(num_key_value_heads=2),
    "llama_tied": dict(tie_word_embeddings=True),
    "phi3_fused": dict(fused_qkv=True, fused_gate_up=True),
    "qwen2_bias": dict(attention_bias=True, num_key_value_heads=2),
    "phi2": dict(norm="layernorm", mlp="gelu", parallel_residual=True, attention_bias=True, attention_out_bias=True,
                 mlp_bias=True, lm_head_bias=True, partial_rotary_factor=0.5),
}
ADAPTERS = ["encoder_adapter", "decoder_adapter"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parameter_counts_are_exact(family):
    model = random_tiny_decoder(FAMILIES[family])
    assert base_parameter_count(model.config) == sum(p.numel() for p in model.parameters())
    targets = ["q_proj", "down_proj"] if family != "phi3_fused" else ["qkv_proj", "down_proj"]
    for target in ("all-linear", targets):
        m = random_tiny_decoder(FAMILIES[family])
        apply_lora(m, ADAPTERS, r=3, alpha=6, target_modules=target)
        n = sum(p.numel() for p in trainable_parameters(m, ["encoder_adapter"]))
        assert adapter_parameter_count(m.config, 3, target) == n


def test_presets_match_their_sources():
    phi2 = preset_config("phi-2")
    assert base_parameter_count(phi2) == 2_779_683_840  # phi-2 (model card: 2.7B parameters)
    assert base_parameter_count(preset_config("smollm2-135m")) == 134_515_008  # SmolLM2-135M
    assert (phi2.rotary_dim, phi2.norm, phi2.mlp, phi2.parallel_residual) == (32, "layernorm", "gelu", True)
    try:
        embedded = gguf_config(open_gguf(embedded_model_path("smollm2-135m")))
    except WeightsError as e:  # the embedded model is an optional package
        pytest.skip(f"embedded smollm2-135m not available: {e}")
    preset = preset_config("smollm2-135m")
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_theta"]
    assert {f: getattr(preset, f) for f in fields} == {f: getattr(embedded, f) for f in fields}
    assert load_model_config(str(embedded_model_path("smollm2-135m"))) == embedded  # a .gguf path


# ------------------------------------------------------------------------------------------------
# Measured against estimated
# ------------------------------------------------------------------------------------------------
def measured_peak_bytes(fn) -> int:
    """Peak of CPU tensor memory allocated by fn() above what was live before it.

    The profiler reports every CPU allocation and free (with its size) when profile_memory=True;
    their running sum in time order is the memory held by tensors, and its maximum is the peak.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return peak


def test_measured_peak_helper_sees_allocations_and_frees():
    def fn():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB -> 6 MB live
        del a
        c = torch.empty(250, 1000)  # 1 MB -> 3 MB live
        del b, c

    assert measured_peak_bytes(fn) == 6_000_000


def stage1_like_step(model: Decoder, batch: int, doc_max_length: int, compress_rate: int, max_len: int):
    """What CLaRa stage 1 does per micro-batch: compress the documents with the encoder adapter
    (attention-masked, left padded), write the memory vectors into the generator's input
    embeddings, run the generator with the decoder adapter, cross-entropy on the answer + 0.1 MSE."""
    cfg = model.config
    n_mem = doc_max_length // compress_rate
    width = doc_max_length + 3 + n_mem
    g = torch.Generator().manual_seed(1)
    enc_ids = torch.randint(0, cfg.vocab_size, (batch, width), generator=g)
    enc_mask = torch.ones(batch, width, dtype=torch.long)
    enc_mask[0, :7] = 0
    dec_ids = torch.randint(0, cfg.vocab_size, (batch, max_len), generator=g)
    dec_mask = torch.ones(batch, max_len, dtype=torch.long)
    dec_mask[-1, -9:] = 0
    labels = dec_ids.masked_fill(dec_mask == 0, -100)
    labels[:, : max_len // 3] = -100

    def loss_fn():
        with use_adapter(model, "encoder_adapter"):
            hidden = model(enc_ids, attention_mask=enc_mask, compute_logits=False).hidden_states
        memory = hidden[:, -n_mem:]
        mse = F.mse_loss(hidden[:, :-n_mem].mean(1), memory.mean(1))
        with use_adapter(model, "decoder_adapter"):
            emb = model.embed_tokens(dec_ids)
            emb = torch.cat([emb[:, :2], memory, emb[:, 2 + n_mem:]], 1)
            logits = model(inputs_embeds=emb, attention_mask=dec_mask).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return ce + 0.1 * mse

    return loss_fn




@pytest.mark.parametrize("checkpointing, dropout", [(False, 0.0), (False, 0.1), (True, 0.1)])
def test_estimate_within_15_percent_of_measured_cpu_peak(checkpointing, dropout, one_thread):
    over = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    batch, doc, rate, max_len, r = 2, 64, 8, 192, 4
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**over))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    apply_lora(model, ADAPTERS, r, 2 * r, dropout)
    mark_only_adapters_trainable(model, ADAPTERS)
    model.set_gradient_checkpointing(checkpointing)
    model.train()
    opt = torch.optim.AdamW(trainable_parameters(model, ADAPTERS), lr=1e-3, betas=(0.9, 0.95))
    loss_fn = stage1_like_step(model, batch, doc, rate, max_len)

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first step creates AdamW's states; measure a steady-state step
    live_before = sum(p.numel() * p.element_size() for p in model.parameters())
    live_before += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    measured = live_before + measured_peak_bytes(step)

    plan = estimate_peak_memory(model.config, stage="stage1", micro_batch=batch, max_len=max_len, doc_max_length=doc,
                                compress_rate=rate, lora_r=r, lora_dropout=dropout, weight_dtype="fp32",
                                compute_dtype="fp32", gradient_checkpointing=checkpointing, device="cpu")
    print(f"estimate {plan.total} measured {measured} ({plan.total / measured - 1:+.1%})")
    assert abs(plan.total - measured) / measured < 0.15, format_plan(plan) + f"\nmeasured {measured}"


# ------------------------------------------------------------------------------------------------
# Behaviour of the plan
# ------------------------------------------------------------------------------------------------
T4 = dict(stage="stage1", max_len=2048, doc_max_length=256, compress_rate=32, weight_dtype="fp16",
          compute_dtype="fp16")


def test_checkpointing_dropout_and_batch_move_the_estimate_the_right_way():
    cfg = preset_config("phi-2")
    plain = estimate_peak_memory(cfg, micro_batch=2, **T4)
    ckpt = estimate_peak_memory(cfg, micro_batch=2, gradient_checkpointing=True, **T4)
    no_dropout = estimate_peak_memory(cfg, micro_batch=2, lora_dropout=0.0, **T4)
    double = estimate_peak_memory(cfg, micro_batch=4, gradient_checkpointing=True, **T4)
    assert ckpt.decoder_activations < plain.decoder_activations / 10 and ckpt.total < plain.total
    assert no_dropout.total < plain.total
    assert double.total > ckpt.total and double.frozen_weights == ckpt.frozen_weights
    assert plain.frozen_weights == base_parameter_count(cfg) * 2
    assert plain.encoder_tokens == 2 * (256 + 3 + 8) and plain.decoder_tokens == 4096
    stage2 = estimate_peak_memory(cfg, micro_batch=2, generation_top_k=5, **{**T4, "stage": "stage2"})
    assert stage2.no_grad_encoding > 0 and stage2.adapter_params == 3 * adapter_parameter_count(cfg, 16) * 4
    with pytest.raises(ValueError, match="not a multiple of compress_rate"):
        estimate_peak_memory(cfg, **{**T4, "compress_rate": 30})


def test_largest_micro_batch_is_the_boundary():
    cfg = preset_config("phi-2")
    budget = 15 * GiB
    best = largest_micro_batch(budget, cfg, gradient_checkpointing=True, **T4)
    assert best >= 1
    assert estimate_peak_memory(cfg, micro_batch=best, gradient_checkpointing=True, **T4).total <= budget
    assert estimate_peak_memory(cfg, micro_batch=best + 1, gradient_checkpointing=True, **T4).total > budget
    assert largest_micro_batch(GiB, cfg, **T4) == 0  # the fp16 weights alone are 5 GiB


def test_train_args_feed_the_planner():
    args = parse_args(["--pretrain", "microsoft/phi-2", "--dataset", "d.jsonl", "--micro_train_batch_size", "2",
                       "--gradient_checkpointing", "--lora_dropout", "0"])
    kwargs = plan_kwargs_from_train_args(args, weight_dtype="fp16", compute_dtype="fp16")
    plan = estimate_peak_memory(preset_config("phi-2"), **kwargs)
    assert (plan.micro_batch, plan.max_len, plan.gradient_checkpointing) == (2, 2048, True)


def test_dry_run_report_for_train_args():
    args = parse_args(["--pretrain", "microsoft/phi-2", "--dataset", "d.jsonl", "--device", "cpu",
                       "--micro_train_batch_size", "2", "--gradient_checkpointing"])
    report = plan_from_args(args)
    assert report.startswith("device cpu (fp32")
    assert "micro-batch 2, max_len 2048, weights float32, compute float32, gradient checkpointing on" in report
    assert "largest micro-batch within the budget:" in report


def test_cli_prints_the_plan(capsys, tmp_path):
    assert main(["--model", "phi-2", "--dtype", "fp16", "--gradient_checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak" in out and "largest micro-batch within the budget:" in out
    assert main(["--model", str(tmp_path / "none.json")]) == 2
    assert "neither a preset" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "phi",\n "vocab_size": }')
    assert main(["--model", str(tmp_path)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    assert set(PRESETS) == {"phi-2", "smollm2-135m"}
    assert math.isclose(PRESETS["phi-2"]["partial_rotary_factor"], 0.4)
