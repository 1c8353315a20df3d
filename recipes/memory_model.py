"""The memory model of the planner: the peak memory of one CLaRa training step, and the largest
micro-batch that fits a budget.

    plan = estimate_peak_memory(cfg, stage="stage1", micro_batch=2, max_len=2048, doc_max_length=256,
                                compress_rate=32, weight_dtype="fp16", compute_dtype="fp16",
                                gradient_checkpointing=True)
    print(format_plan(plan))

The command line and train_sft's --dry_run report are in recipes/planner.py; the architectures
it plans for come from recipes/presets.py.

What is counted (bytes; T tokens of a pass, E hidden, F intermediate, H/G query/key-value heads,
D head dim, V vocabulary, s bytes of the compute dtype):

* static: the frozen base weights (weight dtype; with a quantized base, the blocks' linear weights
  at NF4's 4.13 or int8's 8 bits plus scales, clara/quant.py); every LoRA adapter the stage's model holds in
  fp32; for the adapters it trains also an fp32 gradient and AdamW's two fp32 moments (both
  counts come from the stage table, clara/stages.py).
* stored activations, i.e. the tensors autograd keeps for backward. The base weights are frozen,
  so a linear layer keeps its input only when it carries a trainable adapter. Per block, in
  decoder.py's order:
    norm input in fp32 (RMSNorm widens; LayerNorm runs in fp32 under autocast) + 1-2 fp32 stats;
    each adapter-carrying linear: its input (shared between q/k/v without autocast, with its uint8
    dropout mask: kernels/lora.py; under autocast each gets its own copy, as the fp32 adapter casts
    it, and a dropout mask) + [T, r];
    attention: rotated q [T, HD], k and v [T, GD] (fused qkv keeps the whole [T, (H+2G)D]
    output alive), the output [T, HD] and the fp32 log-sum-exp [T, H]; with padding, SDPA turns
    the boolean mask into a float [B, L, L] bias per layer and keeps it;
    SwiGLU keeps gate and up (+ the product as down's input) - 3 x [T, F]; GELU 2 x [T, F].
  With gradient checkpointing a block keeps only its input [T, E], and the backward pass
  recomputes one block at a time.
  Passes: the compressor reads n_docs x (doc_max_length + 3 + n_mem) tokens per example, the
  generator max_len tokens (an upper bound: real prompts are shorter). A stage with a frozen
  compressor (stage2, stage2_pretrain_retrieval) compresses the documents without gradient (one
  block's working set) and encodes the query with gradient; a stage without an LM loss
  (stage2_pretrain_retrieval) runs no generator.
* logits (stages with an LM loss): log_softmax keeps fp32 [T, V]; at the loss backward two more
  fp32 [T, V] gradients exist.
* backward working set: gradients flowing through one block (about 3 x [T, F] + 3 x [T, E]).

* a quantized base dequantizes one linear layer's weight at a time, in forward and in backward:
  the largest one in the compute dtype, plus the NF4 decoder's chunk of indices and values.

peak = static + max(end of forward + loss backward, block backward (+ one recomputed block))
       (+ the dequantized weight, quantized bases).
The figures model PyTorch's eager autograd as used by clara/decoder.py; tests/test_planner.py checks
them against the measured CPU peak; on CUDA under autocast two measured factors correct them (below).
The CUDA context is not counted: it is outside the allocator's budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from clara.config import DecoderConfig
from clara.quant import CHUNK_VALUES, check_quant_kind, quantized_bytes
from clara.stages import get_stage
from clara.weights import DTYPES

GiB = 1024**3
ADAPTER_BYTES = 4  # adapters are fp32 master weights
# Working set of one block's backward, in units of [T, F] and [T, E] compute-dtype tensors
# (gradients of the MLP intermediates and of the residual stream/attention inputs). With
# checkpointing the peak comes right after the recomputation, when the gradients have only begun
# to flow (fitted on the CPU measurements of tests/test_planner.py).
BACKWARD_F_TENSORS, BACKWARD_E_TENSORS = 3, 3
RECOMPUTE_F_TENSORS, RECOMPUTE_E_TENSORS = 1, 1
# kernels/swiglu.py rebuilds silu(gate) in its backward: one [T, F] more while it runs.
SWIGLU_BACKWARD_F_TENSORS = 1
# On CUDA under fp16/bf16 autocast the activations and the logits take more than the model above
# counts (casts to and from the compute dtype, the loss backward's temporaries, allocator
# rounding); these factors scale them. They are fitted to peaks measured on a GPU with phi-2's
# shape by bench/gpu_planner_sweep.py (docs/memory-planner.md describes the sweep).
CUDA_AUTOCAST_ACTIVATIONS, CUDA_AUTOCAST_LOGITS = 1.14, 1.69


def dtype_of(d: str | torch.dtype) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of {', '.join(DTYPES)} (or a torch.dtype)")
    return DTYPES[d]


def nbytes(d: str | torch.dtype) -> int:
    return dtype_of(d).itemsize


# ------------------------------------------------------------------------------------------------
# Parameter counts
# ------------------------------------------------------------------------------------------------
def block_linears(cfg: DecoderConfig) -> list[tuple[str, int, int, str]]:
    """(name, in_features, out_features, input tensor) of one block's linear layers, as decoder.py
    builds them. The input tensor names which activation feeds the layer."""
    e, f = cfg.hidden_size, cfg.intermediate_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out: list[tuple[str, int, int, str]] = []
    if cfg.fused_qkv:
        out.append(("qkv_proj", e, q_out + 2 * kv_out, "h_attn"))
    else:
        out += [("q_proj", e, q_out, "h_attn"), ("k_proj", e, kv_out, "h_attn"), ("v_proj", e, kv_out, "h_attn")]
    out.append(("o_proj", q_out, e, "attn_out"))
    h_mlp = "h_attn" if cfg.parallel_residual else "h_mlp"
    if cfg.mlp == "gelu":
        out.append(("up_proj", e, f, h_mlp))
    elif cfg.fused_gate_up:
        out.append(("gate_up_proj", e, 2 * f, h_mlp))
    else:
        out += [("gate_proj", e, f, h_mlp), ("up_proj", e, f, h_mlp)]
    out.append(("down_proj", f, e, "mlp_act"))
    return out


def base_parameter_count(cfg: DecoderConfig) -> int:
    """Parameters of clara.decoder.Decoder(cfg), exactly."""
    e, v = cfg.hidden_size, cfg.vocab_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_block = sum(i * o for _, i, o, _ in block_linears(cfg))
    if cfg.attention_bias:
        per_block += q_out + 2 * kv_out
    if cfg.attention_out_bias:
        per_block += e
    if cfg.mlp_bias:
        per_block += (cfg.intermediate_size if cfg.mlp == "gelu" else 2 * cfg.intermediate_size) + e
    norm = e if cfg.norm == "rmsnorm" else 2 * e
    per_block += norm * (1 if cfg.parallel_residual else 2)
    total = v * e + cfg.num_hidden_layers * per_block + norm
    if not cfg.tie_word_embeddings:
        total += v * e + (v if cfg.lm_head_bias else 0)
    return total


def frozen_weight_bytes(cfg: DecoderConfig, weight_bytes: int, quantize: str | None = None) -> int:
    """Bytes of the frozen base: every parameter at `weight_bytes`, or with `quantize` the blocks'
    linear weights as clara.quant stores them and the rest at `weight_bytes`."""
    total = base_parameter_count(cfg) * weight_bytes
    if quantize is None:
        return total
    linears = block_linears(cfg)
    unquantized = total - cfg.num_hidden_layers * sum(i * o for _, i, o, _ in linears) * weight_bytes
    return unquantized + cfg.num_hidden_layers * sum(quantized_bytes(i, o, quantize) for _, i, o, _ in linears)


def dequantized_weight_bytes(cfg: DecoderConfig, compute_bytes: int, quantize: str | None) -> int:
    """The largest block linear dequantized in the compute dtype, with the NF4 decoder's chunk."""
    if quantize is None:
        return 0
    largest = max(i * o for _, i, o, _ in block_linears(cfg))
    chunk = min(largest, CHUNK_VALUES) * (2 + compute_bytes) if quantize == "nf4" else 0  # int32 per pair + values
    return largest * compute_bytes + chunk


def targeted_linears(cfg: DecoderConfig, targets: str | tuple[str, ...] | list[str]) -> list[tuple[str, int, int, str]]:
    linears = block_linears(cfg)
    if targets == "all-linear" or targets == ["all-linear"] or targets == ("all-linear",):
        return linears
    names = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(names) - {n for n, *_ in linears})
    if unknown:
        raise ValueError(f"lora targets {unknown} are not linear layers of this model "
                         f"({', '.join(n for n, *_ in linears)})")
    return [lin for lin in linears if lin[0] in names]


def adapter_parameter_count(cfg: DecoderConfig, r: int, targets="all-linear") -> int:
    """Parameters of ONE adapter (lora_A [r, in] + lora_B [out, r] on every targeted linear)."""
    return cfg.num_hidden_layers * sum(r * (i + o) for _, i, o, _ in targeted_linears(cfg, targets))


def adapters_for_stage(stage: str) -> tuple[int, int]:
    """(adapters the model holds, adapters the stage trains), from the stage table."""
    s = get_stage(stage)
    return len(s.adapters), len(s.trained_adapters)


# ------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Precision:
    w: int  # bytes of the frozen weights and of the residual stream
    s: int  # bytes of matmul outputs (the compute dtype)
    autocast: bool  # compute dtype differs from the fp32 adapters: autocast casts every adapter input
    dropout: bool
    dropout_mask: int  # bytes per element of a dropout mask under autocast: bool on CUDA, fp32 on CPU
    # A quantized base: adapters run the composed path (kernels/reference.py lora_delta), each keeping
    # its own dropped input as under autocast, and the base multiply keeps nothing.
    composed_lora: bool = False


def _block_stored(cfg: DecoderConfig, rows: int, length: int, lora: list, r: int, p: _Precision,
                  mask_per_layer: bool) -> int:
    """Bytes autograd keeps for one block of a pass over [rows, length] tokens (no checkpointing)."""
    t = rows * length
    e, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, g = cfg.num_attention_heads, cfg.num_key_value_heads
    fp32 = 4
    norm_stats = 1 if cfg.norm == "rmsnorm" else 2  # rsqrt | mean + rstd
    norms = 1 if cfg.parallel_residual else 2
    total = norms * t * (e * fp32 + norm_stats * fp32)

    # Activations that linear inputs may share (element counts per token, compute dtype unless noted).
    shared = {"h_attn": e, "h_mlp": e, "attn_out": h * hd, "mlp_act": f}
    # LayerNorm under autocast outputs fp32; RMSNorm casts back to the compute dtype.
    shared_bytes = {"h_attn": fp32 if (cfg.norm == "layernorm" and p.autocast) else p.s, "h_mlp": p.s,
                    "attn_out": p.s, "mlp_act": p.s}
    kept_shared = {"attn_out"}  # SDPA keeps its output whatever the adapters do
    for _, fan_in, _, source in lora:
        if p.autocast or p.composed_lora:
            total += t * fan_in * p.s  # the adapter's own copy (autocast casts its input)
            total += t * fan_in * p.dropout_mask if p.dropout else 0
        else:
            kept_shared.add(source)  # kernels/lora.py keeps the input itself, dropout or not
            total += t * fan_in if p.dropout else 0  # and its uint8 keep mask
        total += t * r * (p.s if p.autocast else ADAPTER_BYTES)  # A x, kept for B's gradient
    total += sum(t * shared[name] * shared_bytes[name] for name in kept_shared)

    # Attention (the output is counted above as attn_out).
    v_elems = (h + 2 * g) * hd if cfg.fused_qkv else g * hd
    total += t * (h * hd + g * hd + v_elems) * p.s + t * h * fp32
    if mask_per_layer:
        total += rows * length * length * p.s
    # MLP: gelu keeps up (gelu's input); swiglu keeps gate and up (kernels/swiglu.py recomputes
    # silu(gate)). The product / gelu output is mlp_act, counted when down_proj's adapter keeps it.
    total += t * f * p.s * (1 if cfg.mlp == "gelu" else 2)
    return total


def _block_no_grad(cfg: DecoderConfig, rows: int, length: int, p: _Precision, mask: bool) -> int:
    """Live bytes inside one block of a forward pass without gradient (documents in stage2)."""
    t = rows * length
    e, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    return t * (3 * e + 2 * qkv + 3 * f) * p.s + (rows * length * length * p.s if mask else 0)


def _pass_extras(cfg: DecoderConfig, rows: int, length: int, p: _Precision, mask: bool) -> int:
    """Per pass, whatever the checkpointing: cos/sin, the boolean mask, the final norm's input and
    statistics, and the final hidden states."""
    t = rows * length
    e = cfg.hidden_size
    norm_stats = 1 if cfg.norm == "rmsnorm" else 2
    rope = 2 * t * cfg.rotary_dim * p.w
    return rope + (rows * length * length if mask else 0) + t * (e * 4 + norm_stats * 4) + t * e * p.s


@dataclass
class PassPlan:
    name: str
    rows: int
    length: int
    with_grad: bool
    stored: int  # bytes kept from the forward pass until backward
    recompute: int  # one block recomputed in backward (checkpointing), else 0
    working: int  # gradients flowing through one block in backward (or a no-grad block's forward)


def _plan_pass(cfg, name, rows, length, lora, r, p: _Precision, ckpt: bool, with_grad: bool, mask: bool) -> PassPlan:
    t = rows * length
    if not with_grad:
        return PassPlan(name, rows, length, False, 0, 0, _block_no_grad(cfg, rows, length, p, mask))
    block = _block_stored(cfg, rows, length, lora, r, p, mask)
    extras = _pass_extras(cfg, rows, length, p, mask)
    if ckpt:
        stored = cfg.num_hidden_layers * t * cfg.hidden_size * p.w + extras
        f_tensors = RECOMPUTE_F_TENSORS + (SWIGLU_BACKWARD_F_TENSORS if cfg.mlp != "gelu" else 0)
        working = t * (f_tensors * cfg.intermediate_size + RECOMPUTE_E_TENSORS * cfg.hidden_size) * p.s
        return PassPlan(name, rows, length, True, stored, block, working)
    working = t * (BACKWARD_F_TENSORS * cfg.intermediate_size + BACKWARD_E_TENSORS * cfg.hidden_size) * p.s
    return PassPlan(name, rows, length, True, cfg.num_hidden_layers * block + extras, 0, working)


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    # configuration
    stage: str
    micro_batch: int
    max_len: int
    encoder_tokens: int  # tokens per compressor pass with gradient (all rows)
    decoder_tokens: int
    weight_dtype: str
    compute_dtype: str
    gradient_checkpointing: bool
    quantize: str | None
    # bytes
    frozen_weights: int
    adapter_params: int  # every adapter, fp32
    adapter_grads: int  # trainable adapters
    optimizer_states: int  # AdamW exp_avg + exp_avg_sq, fp32
    encoder_activations: int  # stored for backward
    decoder_activations: int
    recompute: int  # one block recomputed in backward (checkpointing)
    logits: int  # fp32 log-probabilities kept + the two fp32 gradients at the loss backward
    backward_working: int  # gradients through one block
    no_grad_encoding: int  # stage2: documents compressed without gradient (one block's working set)
    dequantized_weight: int  # quantized base: one layer's weight dequantized for its multiply
    total: int
    peak_phase: str  # "loss backward" | "block backward" | "document encoding"
    passes: list[PassPlan] = field(default_factory=list)

    @property
    def static(self) -> int:
        return self.frozen_weights + self.adapter_params + self.adapter_grads + self.optimizer_states

    @property
    def activations(self) -> int:
        return self.encoder_activations + self.decoder_activations


def estimate_peak_memory(decoder_config: DecoderConfig, *, stage: str = "stage1", micro_batch: int = 1,
                         max_len: int = 2048, doc_max_length: int = 256, compress_rate: int = 32,
                         generation_top_k: int = 1, lora_r: int = 16, lora_targets: Any = "all-linear",
                         lora_dropout: float = 0.1, weight_dtype: str | torch.dtype = "bf16",
                         compute_dtype: str | torch.dtype = "bf16", gradient_checkpointing: bool = False,
                         n_docs_per_example: int | None = None, logits_tokens: int | None = None,
                         padded: bool = True, device: str = "cuda", quantize: str | None = None) -> MemoryPlan:
    """Estimated peak bytes of one training step (forward + backward + optimizer step).

    n_docs_per_example: documents compressed per example (default: 1 in stage1, generation_top_k in
        stage1_2, and in the stage2 stages the candidates, also generation_top_k unless given).
    logits_tokens: positions whose logits are computed, over the micro-batch (default: all
        micro_batch x max_len; a model that keeps only answer positions needs fewer).
    padded: rows of unequal length, so attention gets a mask (always true for real batches).
    device: "cuda" or "cpu"; on CPU a dropout mask has the input's dtype, on CUDA it is bool.
    lora_targets: "all-linear" or projection names.
    quantize: None, "nf4" or "int8": the frozen base's block linears stored quantized (weight_dtype
        is then the dtype of everything else, compute_dtype the one they are dequantized to).
    """
    check_quant_kind(quantize)
    spec = get_stage(stage)
    for name, value in (("micro_batch", micro_batch), ("max_len", max_len), ("doc_max_length", doc_max_length),
                        ("compress_rate", compress_rate), ("generation_top_k", generation_top_k), ("lora_r", lora_r)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if doc_max_length % compress_rate:
        raise ValueError(f"doc_max_length {doc_max_length} is not a multiple of compress_rate {compress_rate}")
    cfg = decoder_config
    w_dtype, c_dtype = dtype_of(weight_dtype), dtype_of(compute_dtype)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    # Under autocast the dropout runs on the fp32 copy the adapter makes: on CPU an fp32 factor (an
    # upper bound: kernels/lora.py widens with a uint8 mask where the CPU lacks bf16 instructions).
    p = _Precision(w=w_dtype.itemsize, s=c_dtype.itemsize, autocast=c_dtype != torch.float32,
                   dropout=lora_dropout > 0, dropout_mask=1 if device == "cuda" else ADAPTER_BYTES,
                   composed_lora=quantize is not None)
    lora = targeted_linears(cfg, lora_targets)
    n_mem = doc_max_length // compress_rate
    enc_width = doc_max_length + 3 + n_mem
    if n_docs_per_example is None:
        n_docs_per_example = 1 if spec.typed_rows else generation_top_k  # stage1 rows hold one

    passes: list[PassPlan] = []
    ckpt = gradient_checkpointing
    if spec.compressor_trained:
        passes.append(_plan_pass(cfg, "compressor", micro_batch * n_docs_per_example, enc_width, lora, lora_r, p,
                                 ckpt, True, padded))
    else:
        # The frozen compressor encodes the candidates without gradient; the query reasoner encodes
        # the question (as wide as a document, an upper bound) with gradient.
        passes.append(_plan_pass(cfg, "documents (no grad)", micro_batch * n_docs_per_example, enc_width, lora,
                                 lora_r, p, ckpt, False, padded))
        if spec.retrieves:
            passes.append(_plan_pass(cfg, "query reasoner", micro_batch, enc_width, lora, lora_r, p, ckpt, True,
                                     padded))
    decoder_pass = None
    if spec.generates:
        decoder_pass = _plan_pass(cfg, "generator", micro_batch, max_len, lora, lora_r, p, ckpt, True, padded)
        passes.append(decoder_pass)

    n_adapters, n_trained = adapters_for_stage(stage)
    one_adapter = adapter_parameter_count(cfg, lora_r, lora_targets) * ADAPTER_BYTES
    frozen = frozen_weight_bytes(cfg, w_dtype.itemsize, quantize)
    dequantized = dequantized_weight_bytes(cfg, c_dtype.itemsize, quantize)
    adapters, grads, states = n_adapters * one_adapter, n_trained * one_adapter, 2 * n_trained * one_adapter

    # Measured corrections for CUDA under fp16/bf16 autocast (see CUDA_AUTOCAST_* above).
    act_factor, logit_factor = (CUDA_AUTOCAST_ACTIVATIONS, CUDA_AUTOCAST_LOGITS) if (
        device == "cuda" and p.autocast) else (1.0, 1.0)
    for ps in passes:
        ps.stored, ps.recompute, ps.working = (int(v * act_factor) for v in (ps.stored, ps.recompute, ps.working))
    with_grad = [ps for ps in passes if ps.with_grad]
    stored = sum(ps.stored for ps in with_grad)
    encoder_stored = sum(ps.stored for ps in with_grad if ps is not decoder_pass)
    logit_positions = micro_batch * max_len if logits_tokens is None else logits_tokens
    n_logits = logit_positions * cfg.vocab_size if spec.generates else 0
    logits_kept = 4 * n_logits
    logits_backward = int(12 * n_logits * logit_factor) - logits_kept  # the factor scales kept + backward
    working = max(ps.working for ps in with_grad)
    recompute = max(ps.recompute for ps in with_grad)
    no_grad = max((ps.working for ps in passes if not ps.with_grad), default=0)

    phases = {
        "loss backward": stored + logits_kept + logits_backward,
        "block backward": stored + recompute + working,
        "document encoding": no_grad + (encoder_stored if no_grad else 0),
    }
    peak_phase = max(phases, key=phases.get)
    static = frozen + adapters + grads + states + dequantized
    return MemoryPlan(
        stage=stage, micro_batch=micro_batch, max_len=max_len,
        encoder_tokens=sum(ps.rows * ps.length for ps in with_grad if ps is not decoder_pass),
        decoder_tokens=micro_batch * max_len if spec.generates else 0,
        weight_dtype=str(w_dtype).removeprefix("torch."),
        compute_dtype=str(c_dtype).removeprefix("torch."), gradient_checkpointing=ckpt, quantize=quantize,
        frozen_weights=frozen, adapter_params=adapters, adapter_grads=grads, optimizer_states=states,
        encoder_activations=encoder_stored, decoder_activations=decoder_pass.stored if decoder_pass else 0,
        recompute=recompute,
        logits=logits_kept + logits_backward, backward_working=working, no_grad_encoding=no_grad,
        dequantized_weight=dequantized,
        total=static + phases[peak_phase], peak_phase=peak_phase, passes=passes,
    )


def largest_micro_batch(budget_bytes: int, decoder_config: DecoderConfig, limit: int = 4096, **kwargs: Any) -> int:
    """The largest micro_batch whose estimated peak fits `budget_bytes` (0 when even 1 does not)."""
    kwargs.pop("micro_batch", None)

    def fits(b: int) -> bool:
        return estimate_peak_memory(decoder_config, micro_batch=b, **kwargs).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):  # the estimate grows with the batch: double, then bisect
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 1024**2:.1f} MiB"


def format_plan(plan: MemoryPlan, budget_bytes: int | None = None, largest: int | None = None) -> str:
    ckpt = "on" if plan.gradient_checkpointing else "off"
    rows = [
        ("frozen base weights", plan.frozen_weights,
         f"{plan.quantize} block linears, the rest {plan.weight_dtype}" if plan.quantize else plan.weight_dtype),
        ("LoRA adapters (fp32)", plan.adapter_params, "all adapters"),
        ("LoRA gradients (fp32)", plan.adapter_grads, "trained adapters"),
        ("AdamW states (fp32)", plan.optimizer_states, "exp_avg + exp_avg_sq"),
        ("compressor activations", plan.encoder_activations, f"{plan.encoder_tokens} tokens, stored for backward"),
        ("generator activations", plan.decoder_activations, f"{plan.decoder_tokens} tokens, stored for backward"),
        ("recomputed block", plan.recompute, "checkpointing: one block at a time"),
        ("logits + loss gradients", plan.logits, "fp32 log-probs + the loss backward's buffers"),
        ("backward working set", plan.backward_working, "gradients through one block"),
    ]
    if plan.quantize:
        rows.append(("dequantized weight", plan.dequantized_weight, "one layer at a time, in the compute dtype"))
    if plan.no_grad_encoding:
        rows.append(("document encoding (no grad)", plan.no_grad_encoding, "one block's working set"))
    lines = [f"memory plan: {plan.stage}, micro-batch {plan.micro_batch}, max_len {plan.max_len}, "
             f"weights {plan.weight_dtype}{f' ({plan.quantize} base)' if plan.quantize else ''}, "
             f"compute {plan.compute_dtype}, gradient checkpointing {ckpt}"]
    lines += [f"  {name:<28}{format_bytes(value):>12}   {note}" for name, value, note in rows]
    lines.append(f"  {'estimated peak':<28}{format_bytes(plan.total):>12}   at the {plan.peak_phase}")
    if budget_bytes is not None:
        verdict = "fits" if plan.total <= budget_bytes else "does NOT fit"
        lines.append(f"  budget {format_bytes(budget_bytes)}: {verdict}")
    if largest is not None:
        lines.append(f"  largest micro-batch within the budget: {largest}")
    return "\n".join(lines)
