"""Our decoder vs. transformers' LlamaForCausalLM on the embedded SmolLM2-135M weights, one process.

    python bench/decoder.py [--dtypes fp32 bf16] [--repeats 3] [--threads 2]

Three measurements per dtype, each run alternately ours / reference `--repeats` times (median kept),
so both see the same machine state:
  prefill  batch 4 x 512 tokens, logits of the last position only (what generation needs)
  decode   batch 1, 128 new tokens with the KV cache, greedy, after a 32-token prompt
  train    batch 2 x 512, forward + backward of the LM loss with rank-16 LoRA adapters (alpha 32)
           on every linear layer of the blocks as the only trainable parameters: ours through
           clara.lora, the reference through forward hooks adding F.linear(F.linear(x, A), B) * 2,
           which is what a peft LoRA layer computes
Prints tokens/s for each and the ratio ours / reference (> 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# transformers' reference model is built by the test helpers (a test-only dependency).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hf_reference import reference_from_ours  # noqa: E402

from clara.generate import generate  # noqa: E402
from clara.lora import apply_lora, set_active_adapter, trainable_parameters  # noqa: E402
from clara.weights import embedded_model_path, load_gguf  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora_hooks(model: nn.Module, rank: int = 16, seed: int = 0) -> list[nn.Parameter]:
    """Attach y += (x A^T) B^T * 2 to every target linear via forward hooks; returns the new params."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for name, module in sorted(model.named_modules()):
        if not (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS):
            continue
        dt = module.weight.dtype
        a = nn.Parameter((torch.randn(rank, module.in_features, generator=g) * 0.01).to(dt))
        b = nn.Parameter((torch.randn(module.out_features, rank, generator=g) * 0.01).to(dt))
        params += [a, b]
        module.register_forward_hook(lambda m, inp, out, a=a, b=b: out + F.linear(F.linear(inp[0], a), b) * 2.0)
    return params


def side_by_side(ours_fn, ref_fn, repeats: int) -> tuple[float, float]:
    """Median seconds of each after one warm-up, the two run alternately so both see the same machine."""
    ours_fn(), ref_fn()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, times in ((ours_fn, t_ours), (ref_fn, t_ref)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(t_ours), statistics.median(t_ref)


def run(dtype_name: str, repeats: int) -> list[tuple[str, float, float]]:
    dtype = DTYPES[dtype_name]
    ours = load_gguf(embedded_model_path("smollm2-135m"), dtype=dtype)
    ref = reference_from_ours(ours)
    for p in list(ours.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, ours.config.vocab_size, (4, 512), generator=g)
    prompt = torch.randint(0, ours.config.vocab_size, (1, 32), generator=g)
    train_ids = torch.randint(0, ours.config.vocab_size, (2, 512), generator=g)
    rows = []

    # ---- prefill ----
    def prefill_ours():
        with torch.inference_mode():
            ours(prefill_ids, logits_to_keep=1)

    def prefill_ref():
        with torch.inference_mode():
            ref(input_ids=prefill_ids, logits_to_keep=1, use_cache=False)

    t_ours, t_ref = side_by_side(prefill_ours, prefill_ref, repeats)
    n = prefill_ids.numel()
    rows.append(("prefill 4x512", n / t_ours, n / t_ref))

    # ---- decode ----
    def decode_ours():
        out = generate(ours, prompt, max_new_tokens=128)
        assert out.shape[1] == 128

    def decode_ref():
        with torch.inference_mode():
            out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=128,
                               min_new_tokens=128, do_sample=False, pad_token_id=2)
        assert out.shape[1] == 32 + 128

    t_ours, t_ref = side_by_side(decode_ours, decode_ref, repeats)
    rows.append(("decode 1x128", 128 / t_ours, 128 / t_ref))

    # ---- train step ----
    apply_lora(ours, ["bench"], r=16, alpha=32, target_modules="all-linear")
    set_active_adapter(ours, "bench")
    lora_ours = trainable_parameters(ours, ["bench"])
    lora_ref = add_lora_hooks(ref)
    ours.train(), ref.train()

    def step(params, call):
        for p in params:
            p.grad = None
        logits = call()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), train_ids[:, 1:].flatten())
        loss.backward()

    def train_ours():
        step(lora_ours, lambda: ours(train_ids).logits)

    def train_ref():
        step(lora_ref, lambda: ref(input_ids=train_ids, use_cache=False).logits)

    t_ours, t_ref = side_by_side(train_ours, train_ref, repeats)
    n = train_ids.numel()
    rows.append(("train step 2x512", n / t_ours, n / t_ref))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                   help="weight/compute dtypes to measure (default: fp32 bf16)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed runs per measurement (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dtype':5} {'measurement':18} {'ours tok/s':>11} {'ref tok/s':>11} {'ratio':>6}")
    for name in args.dtypes:
        for label, ours_tps, ref_tps in run(name, args.repeats):
            print(f"{name:5} {label:18} {ours_tps:11.1f} {ref_tps:11.1f} {ours_tps / ref_tps:6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
