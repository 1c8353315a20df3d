"""One CLaRa stage-1 training step on the embedded SmolLM2-135M: ours vs. the official release's.

    python bench/train_step.py [--dtypes fp32 bf16] [--repeats 5] [--profile] [--threads 2]
                               [--ablate fast-dropout fused-lora fused-norm-rope fused-swiglu byte-mask]
                               [--without_dropout]

The step (issue 5, "Speed"): a micro-batch of 2 QA rows, each one document of exactly 256 tokens
and a decoder prompt + target of about 90 tokens; compress rate 32 (8 memory vectors), rank-16
LoRA adapters (alpha 32, dropout 0.1) on every linear layer of the blocks, memory-token embeddings
trainable, MSE alignment loss weighted 0.1. One step = forward + backward + AdamW step + zero_grad;
collation (tokenising, padding) is timed separately, once.

ours       clara.recipes.loop.build_model / make_optimizer with the stage-1 flags of the official CLI, and
           Clara.forward on the collated batch: exactly what `python -m clara.recipes.train_sft` runs.
reference  the official stage-1 step (openrlhf/models/modeling_clara.py: _compr_decoder,
           _forward_stage_1, _replace_embeddings) rewritten here over transformers'
           LlamaForCausalLM with the same weights (bench/decoder.py) and peft-style LoRA through
           forward hooks, one adapter active per pass:
             encoder pass  decoder(input_ids, attention_mask, output_hidden_states=True): logits of
                           every position are computed (and unused); hidden_states[-1] at the
                           memory tokens are the memory; MSE of the masked means
             decoder pass  the embeddings of the prompt with the memory copied into the slots, one
                           slot at a time; decoder(inputs_embeds, attention_mask, labels): logits of
                           every position and transformers' loss
             trainable     both adapters, and the whole input-embedding matrix (optimize_mem_tokens:
                           a gradient hook zeroes every row but the memory tokens'); SmolLM2 ties it
                           to the lm head, so the head's weight gradient is computed too
           total = loss + 0.1 * mse, backward, AdamW (betas 0.9/0.95, no weight decay, as the CLI).
           The two adapters start as copies of ours, so with dropout off both sides compute the
           same loss: the script checks that before timing (a faithful rewrite, same inputs).

Precision, both sides alike (recipes/precision.py): fp32; or bf16 base weights under bf16 autocast
with fp32 adapters (the reference's trainable embedding stays in the weight dtype, as DeepSpeed's
bf16 model copy). On CPUs without AVX512-BF16/AMX ours widens bf16 multiplies to fp32
(kernels/matmul.py) while transformers calls torch's generic bf16 GEMM: the bf16 reference row
measures what the official code does on such a CPU.

Runs ours and the reference alternately (as bench/decoder.py side_by_side, the order rotating each
round), median of --repeats, and prints the machine's load average before and after: with only 2
cores, other processes slow torch's threads down a lot. Besides the ratio of the medians it prints
the ratio within each round (the reference's step over ours run next to it), whose spread shows how
much the machine's speed moved.

FLOPs: counted per side from the shapes (see `step_flops`), divided by the step time and set
beside this CPU's measured fp32 and bf16 matmul rates (model FLOPs utilisation).
--profile: torch.profiler table of our step (self CPU time), the same time summed by kind, and the
    wall time the profiler does not see (Python between ops, the numpy dropout masks).
--ablate: also time our step with an optimisation switched off, alternating with the others on the
    same model. fused-lora, fused-norm-rope and fused-swiglu put those ops on the reference path
    (clara.kernels.use_reference_kernels: the plain composed ops of kernels/reference.py instead of
    the single autograd nodes of kernels/lora.py, norm.py + rope.py, swiglu.py). fast-dropout is
    the composed LoRA layer with torch's F.dropout, i.e. without the numpy-drawn masks either.
    byte-mask is kernels/lora.py's node as it was with an fp32 dropout factor, keeping it and the
    dropped input f ⊙ x for the backward instead of a uint8 mask and x (fp32 only). Those two
    replace the LoRA layers' forward on this model's instances. All of them together are the code
    before these optimisations (with fused-lora or fast-dropout off, byte-mask's node is not used).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from decoder import LORA_TARGETS  # noqa: E402  (bench/ is this script's own folder)
from hf_reference import reference_from_ours  # noqa: E402
from clara.lora import LoRAAdapter, LoRALinear, lora_layers  # noqa: E402
from clara.model import DECODER, ENCODER, Clara  # noqa: E402
from clara.data.formats import Stage1Example  # noqa: E402
from clara.kernels import cpu_has_native_bf16, linear, use_reference_kernels  # noqa: E402
from clara.kernels.masks import dropout_factor  # noqa: E402
from clara.kernels.lora import lora_linear as kernel_lora_linear  # noqa: E402
from clara.recipes.args import parse_args as parse_train_args  # noqa: E402
from clara.recipes.loop import build_model, make_optimizer, start_checkpoint  # noqa: E402
from clara.recipes.precision import choose_precision  # noqa: E402

DOC_TOKENS = 256
ABLATIONS = ["fast-dropout", "fused-lora", "fused-norm-rope", "fused-swiglu", "byte-mask"]
BATCH = 2
MSE_WEIGHT = 0.1

# Prose for the documents; only token counts matter for timing, but real text keeps the
# tokenizer's behaviour (and the losses) ordinary.
PASSAGE = (
    "Dietary fibre is the part of plant foods that the small intestine cannot digest. Soluble fibre, "
    "found in oats, barley, beans, lentils, apples and citrus fruit, dissolves in water to form a gel "
    "that slows the emptying of the stomach and the absorption of sugar, which helps to keep blood "
    "glucose steady after a meal. It also binds bile acids in the gut, so the liver draws more "
    "cholesterol from the blood to make new ones, and LDL cholesterol falls by a few percent. Insoluble "
    "fibre, found in wholegrain bread, bran, nuts and the skins of vegetables, adds bulk to the stool "
    "and speeds its passage through the colon, which prevents constipation. Bacteria in the large "
    "intestine ferment some fibres into short-chain fatty acids such as butyrate, the main fuel of the "
    "cells that line the colon. Adults are advised to eat about 25 to 30 grams of fibre a day, yet most "
    "eat far less. Fibre should be increased slowly, over a few weeks, and with plenty of fluid, because "
    "a sudden rise can cause bloating and wind. People with some bowel conditions, such as a narrowing "
    "of the intestine, may be told to limit fibre for a time; they should follow the advice of their "
    "own doctor or dietitian. Fruit and vegetables eaten whole give more fibre than juices, and pulses "
    "can replace part of the meat in soups and stews. A bowl of porridge with fruit, a lentil soup at "
    "lunch and a portion of vegetables at dinner already reach the daily goal for most adults, and "
    "they bring potassium, vitamins and other plant compounds along with the fibre itself."
)
QA = [
    ("How much fibre should an adult eat each day?", "About 25 to 30 grams."),
    ("What does soluble fibre do to blood glucose?", "It keeps it steadier after a meal."),
]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def exact_document(tokenizer, n_tokens: int, skip_words: int) -> str:
    """A slice of PASSAGE (repeated as needed) that tokenizes to exactly n_tokens tokens."""
    words = PASSAGE.split() * 4
    words = words[skip_words:]
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose text fits in n_tokens
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), add_bos=False)) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    ids = tokenizer.encode(text, add_bos=False)
    for filler in ("a", "the", "and", "of"):  # one more short word usually lands exactly
        if len(ids) == n_tokens:
            break
        candidate = text + " " + filler
        if len(tokenizer.encode(candidate, add_bos=False)) == n_tokens:
            text, ids = candidate, tokenizer.encode(candidate, add_bos=False)
    if len(ids) != n_tokens:
        raise RuntimeError(f"could not build a document of exactly {n_tokens} tokens (got {len(ids)})")
    return text


def examples(tokenizer) -> list[Stage1Example]:
    return [Stage1Example(data_type="qa", questions=(q,), answers=(a,),
                          docs=(exact_document(tokenizer, DOC_TOKENS, skip_words=40 * i),))
            for i, (q, a) in enumerate(QA[:BATCH])]


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------
def train_args(dtype_name: str):
    """The official stage-1 command line, as clara.recipes.train_sft reads it."""
    argv = ["--pretrain", "smollm2-135m", "--dataset", "unused.jsonl", "--stage", "stage1",
            "--compress_rate", "32", "--doc_max_length", "256", "--mse_loss", "--qa_loss",
            "--lora_rank", "16", "--lora_dropout", "0.1", "--micro_train_batch_size", str(BATCH),
            "--train_batch_size", str(BATCH), "--learning_rate", "1e-4"]
    if dtype_name == "bf16":
        argv.append("--bf16")
    return parse_train_args(argv)


# ---------------------------------------------------------------------------------------------
# Reference: the official stage-1 step over transformers
# ---------------------------------------------------------------------------------------------
class SwitchableLoRA:
    """peft-style LoRA through forward hooks: y += (alpha/r) B A dropout(x) of the active adapter.

    `active` names the adapter the next forward pass uses (the official code calls
    decoder.set_adapter before each pass).
    """

    def __init__(self, hf: nn.Module, ours: Clara, names: tuple[str, ...], dropout: float):
        self.active = names[0]
        self.params: list[nn.Parameter] = []
        self.dropout = nn.Dropout(dropout)
        modules = dict(hf.named_modules())
        for name, layer in lora_layers(ours.decoder).items():
            target = "model." + name.replace(".attn.", ".self_attn.")
            if target.rsplit(".", 1)[-1] not in LORA_TARGETS:
                raise RuntimeError(f"unexpected LoRA layer {name}")
            factors = {}
            for adapter in names:
                a = layer.adapters[adapter]
                # Copies of ours: same start, so the two losses can be compared.
                pair = (nn.Parameter(a.lora_A.detach().clone()), nn.Parameter(a.lora_B.detach().clone()),
                        a.scaling)
                factors[adapter] = pair
                self.params += pair[:2]
            modules[target].register_forward_hook(self._hook(factors))

    def _hook(self, factors):
        def add_delta(module, inputs, out):
            a, b, scaling = factors[self.active]
            x = self.dropout(inputs[0].to(a.dtype))
            return out + (F.linear(F.linear(x, a), b) * scaling).to(out.dtype)
        return add_delta

    def train(self, mode: bool) -> None:
        self.dropout.train(mode)


@dataclass
class Reference:
    model: nn.Module
    lora: SwitchableLoRA
    mem_ids: torch.Tensor  # the memory-token ids


def build_reference(ours: Clara, dtype: torch.dtype, dropout: float) -> Reference:
    hf = reference_from_ours(ours.decoder)
    for p in hf.parameters():
        p.requires_grad_(False)
    # optimize_mem_tokens: the whole (tied) embedding matrix trains, masked to the memory rows by a
    # gradient hook. Its own copy, so the reference's updates never touch ours. The memory rows
    # start from ours' memory_embeddings, as ours' do.
    emb = hf.get_input_embeddings()
    weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=True)
    with torch.no_grad():
        weight[ours.memory_token_ids] = ours.memory_embeddings.detach().to(weight.dtype)
    emb.weight = weight
    hf.tie_weights()
    if hf.lm_head.weight is not weight:
        raise RuntimeError("the reference's lm head is not tied to its embedding")
    row_mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
    row_mask[ours.memory_token_ids] = 1.0
    weight.register_hook(lambda grad: grad * row_mask)
    lora = SwitchableLoRA(hf, ours, (ENCODER, DECODER), dropout)
    return Reference(hf.train(), lora, torch.tensor(ours.memory_token_ids))


def reference_forward(ref: Reference, enc_ids, enc_mask, dec_ids, dec_mask, labels) -> tuple[torch.Tensor, ...]:
    """(total, lm loss, mse) as the official _forward_stage_1 computes them (generation_top_k = 1)."""
    # _compr_decoder
    ref.lora.active = ENCODER
    emb = ref.model(input_ids=enc_ids, attention_mask=enc_mask, output_hidden_states=True).hidden_states[-1]
    mask = torch.isin(enc_ids, ref.mem_ids)
    attn = enc_mask.bool()
    mem_mask, non_mem_mask = mask & attn, (~mask) & attn
    mem_mean = (emb * mem_mask.unsqueeze(-1)).sum(dim=1) / mem_mask.sum(dim=1).unsqueeze(-1)
    non_mem_mean = (emb * non_mem_mask.unsqueeze(-1)).sum(dim=1) / non_mem_mask.sum(dim=1).unsqueeze(-1)
    mse = F.mse_loss(non_mem_mean, mem_mean, reduction="mean")
    compressed = emb[mask].reshape(emb.size(0), -1, emb.size(-1))
    # _replace_embeddings: slot by slot into the prompt embeddings
    inputs_embeds = ref.model.get_input_embeddings()(dec_ids)
    n_mem = compressed.size(1)
    first = torch.argmax((dec_ids == int(ref.mem_ids[0])).int(), dim=1)
    for i in range(inputs_embeds.size(0)):
        start = first[i].item()
        inputs_embeds[i, start:start + n_mem, :] = compressed[i]
    # the generator
    ref.lora.active = DECODER
    out = ref.model(inputs_embeds=inputs_embeds, attention_mask=dec_mask, labels=labels)
    return out.loss + MSE_WEIGHT * mse, out.loss, mse


# ---------------------------------------------------------------------------------------------
# Ablations: our step with one optimisation switched off (the code before it)
# ---------------------------------------------------------------------------------------------
def _torch_dropout_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear.forward composed as kernels/reference.py's lora_linear, but with torch's F.dropout
    (its bernoulli_ mask) instead of the numpy-drawn one."""
    active = self.selection.active()
    out = linear(x, self.weight, self.bias)
    if active is None:
        return out
    adapter = self.adapter(active)
    h = F.dropout(x.to(adapter.lora_A.dtype), adapter.dropout_p, adapter.training)
    return out + linear(linear(h, adapter.lora_A) * adapter.scaling, adapter.lora_B).to(x.dtype)


def _factor_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear.forward with _FactorLoRALinear (below) for the adapter."""
    active = self.selection.active()
    if active is None:
        return linear(x, self.weight, self.bias)
    adapter = self.adapter(active)
    return _factor_lora_linear(x, self.weight, self.bias, adapter.lora_A, adapter.lora_B, adapter.scaling,
                               adapter.dropout_p, adapter.training)


class _FactorLoRALinear(torch.autograd.Function):
    """kernels/lora.py's node as it was before the byte mask: the fp32 factor f = c·m multiplies x,
    and the forward keeps both f and the dropped copy f ⊙ x for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, factor, scaling):
        out = F.linear(x, weight, bias)
        dropped = x if factor is None else x * factor
        z = dropped.mm(lora_a.t())
        if factor is None and scaling != 1.0:
            z.mul_(scaling)
        out.addmm_(z, lora_b.t())
        ctx.scaling = 1.0 if factor is not None else scaling
        ctx.save_for_backward(weight, dropped, factor, z, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, dropped, factor, z, lora_a, lora_b = ctx.saved_tensors
        grad_z = grad.mm(lora_b)
        if ctx.scaling != 1.0:
            grad_z.mul_(ctx.scaling)
        grad_x = grad.mm(weight)
        if factor is None:
            grad_x.addmm_(grad_z, lora_a)
        else:
            grad_x.addcmul_(grad_z.mm(lora_a), factor)
        return grad_x, None, None, grad_z.t().mm(dropped), z.t().mm(grad).t(), None, None


def _factor_lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, training=False):
    """clara.kernels.lora.lora_linear with _FactorLoRALinear (fp32 operands only: the bench's fp32 row)."""
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return kernel_lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
    x2 = x.reshape(-1, x.shape[-1])
    factor = dropout_factor(x2.shape, dropout_p, scaling) if training and dropout_p > 0 else None
    return _FactorLoRALinear.apply(x2, weight, bias, lora_a, lora_b, factor, scaling).view(*x.shape[:-1], -1)


# Ablations that the reference switch expresses: the ops it puts on the reference path.
REFERENCE_ABLATIONS = {"fused-lora": {"lora"}, "fused-norm-rope": {"rms_norm", "rotary"}, "fused-swiglu": {"swiglu"}}
# The others replace the LoRA layers' forward on this model's instances.
LAYER_FORWARDS = {"fast-dropout": _torch_dropout_forward, "byte-mask": _factor_forward}


def ablated_step(model: Clara, names: list[str], step):
    """`step` run with the optimisations `names` switched off, and everything restored after it."""
    ops = set().union(*(REFERENCE_ABLATIONS.get(n, set()) for n in names))
    forwards = [n for n in names if n in LAYER_FORWARDS]
    if "byte-mask" in forwards and ("fast-dropout" in forwards or "lora" in ops):
        forwards.remove("byte-mask")  # the composed layer does not use kernels/lora.py's node at all
    layers = list(lora_layers(model.decoder).values())

    def run():
        for name in forwards:
            for layer in layers:
                layer.forward = types.MethodType(LAYER_FORWARDS[name], layer)
        try:
            with use_reference_kernels(ops):
                step()
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
    return run


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function, one per round, after one warm-up call each: they run in turn
    `repeats` times so that all of them see the same machine (bench/decoder.py's side_by_side, for
    any number). The order rotates every round, so no function always runs right after the same
    other one."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def step_flops(cfg, enc_shape, dec_shape, n_answer: int, r: int, side: str) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one step, by part.

    linear    the block projections: 2·N·T forward, the same again for the input gradients in
              backward (frozen weights: no weight gradient)
    lora      2·r·(in+out)·T per projection forward; backward = input + factor gradients = 2x that
    attention Q·K^T and P·V over the full L x L square, 4·L²·H·D forward per layer and sequence;
              backward 2x forward
    logits    ours: the answer positions only, forward + input gradient (the head is frozen);
              reference: every encoder position forward (unused), every decoder position forward +
              input gradient + weight gradient (the tied embedding trains)
    """
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, d, g, n_layers = cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads, cfg.num_hidden_layers
    shapes = [(e, h * d), (e, g * d), (e, g * d), (h * d, e), (e, f), (e, f), (f, e)]
    n_linear = n_layers * sum(i * o for i, o in shapes)
    n_lora = n_layers * sum(r * (i + o) for i, o in shapes)
    tokens = enc_shape[0] * enc_shape[1] + dec_shape[0] * dec_shape[1]
    attn = sum(n_layers * b * 4 * seq * seq * h * d for b, seq in (enc_shape, dec_shape))
    out = {
        "linear": 2 * 2 * n_linear * tokens,
        "lora": 3 * 2 * n_lora * tokens,
        "attention": 3 * attn,
    }
    if side == "ours":
        out["logits"] = 2 * 2 * e * v * n_answer
    else:
        enc_tokens, dec_tokens = enc_shape[0] * enc_shape[1], dec_shape[0] * dec_shape[1]
        out["logits"] = 2 * e * v * enc_tokens + 3 * 2 * e * v * dec_tokens
    out["total"] = sum(out.values())
    return out


def matmul_peaks() -> dict[str, float]:
    """GFLOP/s of this CPU's fp32 and bf16 (torch's kernel) GEMMs: the best of 10 calls on each of the
    step's largest shape (encoder MLP, 534 x 576 -> 1536) and a square 1024^3 (a peak: the fastest)."""
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for m, k, n in ((534, 576, 1536), (1024, 1024, 1024)):
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            F.linear(x, w)
            for _ in range(10):
                t = time.perf_counter()
                F.linear(x, w)
                best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
        peaks[name] = best
    return peaks


# ---------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------
KINDS = [
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "_softmax")),
    ("optimizer", ("_foreach_", "adamw", "Optimizer.")),
    ("dtype casts and copies", ("aten::to", "aten::_to_copy", "aten::copy_")),
    ("elementwise and reductions", (
        "aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::silu", "aten::rsqrt", "aten::pow",
        "aten::mean", "aten::sum", "aten::cat", "aten::where", "aten::bernoulli", "dropout", "aten::masked_fill",
        "aten::cos", "aten::sin", "aten::fill_", "aten::zero_", "aten::mse", "aten::sigmoid", "aten::clone",
        "aten::index", "aten::gather", "aten::scatter", "aten::embedding", "aten::nll", "aten::log_softmax",
        "aten::_log_softmax", "aten::exp", "aten::cumsum", "aten::isin", "aten::sqrt", "aten::lerp", "aten::ge",
        "aten::lt", "aten::bitwise", "aten::clamp")),
]


def kind_of(op_name: str) -> str:
    name = op_name.lower()
    for kind, needles in KINDS:
        if any(needle.lower() in name for needle in needles):
            return kind
    return "other ops (autograd nodes, views, allocation)"


def profile(step_fn, rows: int = 20) -> None:
    """Self CPU time of the ops of one step (after a warm-up step), by op and by kind."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step_fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        step_fn()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    by_kind = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total / 1e6
    # The profiler slows the step a little; the share of each kind is what to read.
    print(f"self CPU time by kind (profiled step: {wall:.2f} s wall, {total:.2f} s inside torch ops):")
    for kind, sec in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:46} {sec:7.3f} s  {100 * sec / wall:5.1f}%")
    outside = wall - total
    print(f"  {'outside torch ops (Python, numpy dropout masks)':46} {outside:7.3f} s  {100 * outside / wall:5.1f}%")


# ---------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------
def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# Relative difference of the two losses (dropout off) above which the reference is not the same
# computation: fp32 agrees to rounding; in bf16 transformers multiplies in bf16 and ours in fp32.
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


def run(dtype_name: str, repeats: int, with_profile: bool, ablate: list[str], peaks: dict[str, float],
        without_dropout: bool = False) -> None:
    device = torch.device("cpu")
    args = train_args(dtype_name)
    precision = choose_precision(device, dtype_name == "bf16")
    torch.manual_seed(0)
    model = build_model(args, precision, device, start_checkpoint(args))
    model.train()
    optimizer = make_optimizer(model, args)

    rows = examples(model.tokenizer)
    t0 = time.perf_counter()
    batch = model.collate(rows)
    collate_s = time.perf_counter() - t0
    enc, dec = batch.documents, batch.decoder
    doc_lengths = [len(model.tokenizer.encode(r.docs[0], add_bos=False)) for r in rows]
    dec_lengths = dec.attention_mask.sum(1).tolist()
    n_answer = batch.n_target_tokens
    print(f"[{dtype_name}] documents {doc_lengths} tokens -> encoder rows {list(enc.input_ids.shape)}; "
          f"decoder prompt+target {dec_lengths} tokens (padded {list(dec.input_ids.shape)}), "
          f"{n_answer} answer tokens; collate {collate_s * 1e3:.1f} ms (not in the step)")

    ref = build_reference(model, precision.weight_dtype, args.lora_dropout)
    ref_params = ref.lora.params + [ref.model.get_input_embeddings().weight]
    ref_optimizer = torch.optim.AdamW(ref_params, lr=args.learning_rate, betas=tuple(args.adam_betas),
                                      weight_decay=args.l2, eps=1e-8)
    labels = dec.labels

    # Faithfulness: dropout off, same weights and inputs -> the same losses.
    model.eval(), ref.lora.train(False)
    with torch.no_grad(), precision.autocast(device):
        ours_loss, aux = model(batch)
        ref_loss, ref_lm, ref_mse = reference_forward(ref, enc.input_ids, enc.attention_mask, dec.input_ids,
                                                      dec.attention_mask, labels)
    print(f"[{dtype_name}] losses without dropout: ours {float(ours_loss):.5f} (lm {float(aux['lm_loss']):.5f}, "
          f"mse {float(aux['mse_loss']):.6f}); reference {float(ref_loss):.5f} (lm {float(ref_lm):.5f}, "
          f"mse {float(ref_mse):.6f})")
    gap = abs(float(ours_loss) - float(ref_loss)) / abs(float(ref_loss))
    if gap > LOSS_TOLERANCE[dtype_name]:
        raise RuntimeError(f"the reference's loss differs from ours by {gap:.1e} (relative): it does not compute "
                           "the same step, so its time would mean nothing")
    model.train(), ref.lora.train(True)

    def ours_step():
        with precision.autocast(device):
            loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def ref_step():
        with precision.autocast(device):
            loss, _, _ = reference_forward(ref, enc.input_ids, enc.attention_mask, dec.input_ids,
                                           dec.attention_mask, labels)
        loss.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad(set_to_none=True)

    sides = {"ours": ours_step, "reference": ref_step}
    for name in ablate:
        sides[f"ours without {name}"] = ablated_step(model, [name], ours_step)
    if len(ablate) > 1:
        sides["ours without " + " + ".join(ablate)] = ablated_step(model, ablate, ours_step)
    if without_dropout:
        adapters = [a for layer in lora_layers(model.decoder).values() for a in layer.adapters.values()
                    if isinstance(a, LoRAAdapter)]

        def no_dropout_step():
            for a in adapters:
                a.dropout_p = 0.0
            try:
                ours_step()
            finally:
                for a in adapters:
                    a.dropout_p = args.lora_dropout
        sides["ours, LoRA dropout 0 (not the task)"] = no_dropout_step

    load_before = load_text()
    rounds = alternate(sides, repeats)
    times = {side: statistics.median(ts) for side, ts in rounds.items()}
    load_after = load_text()

    tokens = enc.input_ids.numel() + dec.input_ids.numel()
    cfg = model.decoder.config
    shapes = (tuple(enc.input_ids.shape), tuple(dec.input_ids.shape), n_answer, args.lora_rank)
    f_ours, f_ref = step_flops(cfg, *shapes, "ours"), step_flops(cfg, *shapes, "reference")
    for side, fl in (("ours", f_ours), ("reference", f_ref)):
        print(f"[{dtype_name}] GFLOP per step, {side}: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in fl.items()))
    print(f"{'dtype':5} {'side':42} {'s/step':>7} {'tok/s':>7} {'GFLOP/s':>8} {'MFU fp32':>8} {'MFU bf16':>8}")
    for side, t in times.items():
        fl = f_ref if side == "reference" else f_ours
        rate = fl["total"] / t / 1e9
        print(f"{dtype_name:5} {side:42} {t:7.3f} {tokens / t:7.1f} {rate:8.1f} {rate / peaks['fp32']:8.0%} "
              f"{rate / peaks['bf16']:8.0%}")
    floor = f_ours["total"] / peaks["fp32"] / 1e9
    print(f"{dtype_name:5} reference / ours = {times['reference'] / times['ours']:.2f}x; our FLOPs at the fp32 "
          f"matmul peak alone take {floor:.2f} s; load average {load_before} -> {load_after}")
    # The machine's speed drifts between rounds; the two sides of one round saw the same machine.
    per_round = sorted(r / o for r, o in zip(rounds["reference"], rounds["ours"]))
    print(f"      reference / ours within each round: median {statistics.median(per_round):.2f}x, "
          f"{per_round[0]:.2f}-{per_round[-1]:.2f}x over {len(per_round)} rounds")
    if dtype_name == "bf16" and not cpu_has_native_bf16():
        print("      (ours multiplies bf16 tensors in fp32 on this CPU, so its rate can pass the bf16 kernel's peak)")
    print(f"      tok/s counts the {tokens} encoder + decoder positions of a step", flush=True)

    if with_profile:
        print(f"[{dtype_name}] profile of our step:")
        profile(ours_step)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="precisions to measure (default: fp32 bf16)")
    p.add_argument("--repeats", type=int, default=5, help="alternating timed steps per side (default 5)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of our step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--ablate", nargs="+", default=[], choices=ABLATIONS,
                   help="also time our step with these optimisations switched off (each, and all together)")
    p.add_argument("--without_dropout", action="store_true",
                   help="also time our step with the adapters' dropout set to 0: what the dropout costs")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    peaks = matmul_peaks()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}, "
          f"load {load_text()}; matmul peak fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 (torch kernel) "
          f"{peaks['bf16']:.1f} GFLOP/s")
    for name in args.dtypes:
        run(name, args.repeats, args.profile, args.ablate, peaks, args.without_dropout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
