"""Answering on a CPU with a CLaRa-7B-shaped model whose frozen base is quantized.

    python bench/cpu_decode.py [--quantize int8|nf4] [--layers 32] [--new_tokens 16] [--docs 5]
                               [--compress_rate 16] [--threads 2] [--json bench/results/cpu_decode.json]

The model is Mistral-7B-Instruct-v0.2's shape (recipes/presets.py "mistral-7b": 32 blocks, hidden
4096, MLP 14336, 8 key-value heads, vocabulary 32000 + CLaRa's tokens), with random weights drawn
directly as quantized codes (speed does not depend on the values, and a 7B model never exists
unquantized in memory), bf16 embeddings, norms and LM head, and CLaRa-7B's three LoRA adapters
(rank 16 on every block linear; the decoder adapter active, as when answering).

The prompt is what answering from compressed documents feeds the decoder: --docs documents of 256
tokens, each --compress_rate times shorter as memory vectors, plus a 40-token question. Timed:
prefill (the prompt through the decoder, KV cache filled) and each decoded token (greedy, no early
stop). Reported beside them:

  weights read per token   the bytes of every block linear's codes and scales, the LM head, the
                           adapters and one embedding row: what one decode step must read
  copy bandwidth           a 1 GiB tensor copied (read + written), best of 5
  bound                    weights read per token / copy bandwidth: the fastest a decode step can
                           be on this machine; the fraction reached is bound / measured
  RAM peak                 the process's maximum resident set (ru_maxrss), weights included
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clara.config import ClaraConfig, DecoderConfig  # noqa: E402
from clara.generate import generate  # noqa: E402
from clara.lora import apply_lora, lora_layers, use_adapter  # noqa: E402
from clara.model import DECODER, ENCODER, QUERY  # noqa: E402
from clara.quant import QUANT_KINDS, quantized_layers  # noqa: E402
from clara.recipes.presets import preset_config  # noqa: E402
from clara.weights import build_on_meta  # noqa: E402

GiB = 1024**3
QUESTION_TOKENS = 40


def random_quantized_decoder(cfg: DecoderConfig, kind: str, dtype: torch.dtype, seed: int = 0, device="cpu"):
    """A decoder of `cfg` whose block linears hold random `kind` codes and scales, the rest random
    `dtype`, built tensor by tensor on `device` (no unquantized copy of the model ever exists)."""
    g = torch.Generator().manual_seed(seed)
    model = build_on_meta(cfg, kind, dtype)
    quantized = set(quantized_layers(model))
    for module_name, module in model.named_modules():
        if module_name in quantized:
            for name, buffer in module.named_buffers(recurse=False):
                module.register_buffer(name, _random_code_tensor(name, buffer, kind, g, dtype).to(device))
            continue
        for name, param in module.named_parameters(recurse=False):
            value = torch.randn(param.shape, generator=g, dtype=dtype).mul_(0.02)
            if "norm" in module_name:
                value = torch.ones(param.shape, dtype=dtype)
            setattr(module, name, torch.nn.Parameter(value.to(device), requires_grad=False))
    return model.eval()


def _random_code_tensor(name: str, like: torch.Tensor, kind: str, g: torch.Generator, dtype) -> torch.Tensor:
    if name == "codes":
        low, high = (0, 256) if kind == "nf4" else (-127, 128)
        return torch.randint(low, high, like.shape, generator=g, dtype=torch.int16).to(like.dtype)
    if name == "absmax_codes":
        return torch.randint(-127, 128, like.shape, generator=g, dtype=torch.int16).to(torch.int8)
    if name in ("absmax_scales", "scales"):
        scale = 0.05 / 127 if kind == "int8" else 0.02 / 127
        return torch.full(like.shape, scale, dtype=torch.float32)
    if name == "absmax_offset":
        return torch.tensor(0.05)
    return torch.zeros(like.shape, dtype=dtype)  # bias


def add_random_adapters(model, r: int, seed: int = 1) -> int:
    """CLaRa's three adapters with random factors; returns their bytes."""
    torch.manual_seed(seed)
    apply_lora(model, [ENCODER, DECODER, QUERY], r=r, alpha=2 * r, target_modules="all-linear",
               adapter_dtype=torch.bfloat16)
    total = 0
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for adapter in layer.adapters.values():
                adapter.lora_B.normal_(0, 0.01)
                total += sum(p.numel() * p.element_size() for p in adapter.parameters())
    return total


def copy_bandwidth(bytes_: int = GiB, repeats: int = 5) -> float:
    src = torch.ones(bytes_ // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * bytes_ / best  # read + write


def weights_read_per_token(model, adapter_bytes_active: int) -> int:
    quantized = sum(b.numel() * b.element_size() for layer in quantized_layers(model).values() for b in layer.buffers())
    head = model.output_weight()
    return quantized + head.numel() * head.element_size() + adapter_bytes_active + model.config.hidden_size * 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quantize", choices=QUANT_KINDS, default="int8", help="How the block linears are stored")
    ap.add_argument("--layers", type=int, default=32, help="Transformer blocks (32 is Mistral-7B)")
    ap.add_argument("--new_tokens", type=int, default=16, help="Tokens decoded after the prompt")
    ap.add_argument("--docs", type=int, default=5, help="Documents in the prompt, as memory vectors")
    ap.add_argument("--compress_rate", type=int, default=16,
                    help="Document tokens per memory vector (of 256-token documents)")
    ap.add_argument("--lora_rank", type=int, default=16, help="Rank of the three adapters")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = preset_config("mistral-7b")
    vocab = base.vocab_size + len(ClaraConfig(compress_rate=args.compress_rate).special_tokens())
    cfg = dataclasses.replace(base, num_hidden_layers=args.layers, vocab_size=vocab)
    start = time.perf_counter()
    model = random_quantized_decoder(cfg, args.quantize, torch.bfloat16)
    adapter_bytes = add_random_adapters(model, args.lora_rank)
    build_s = time.perf_counter() - start
    per_token = weights_read_per_token(model, adapter_bytes // 3)
    print(f"built a {args.layers}-block Mistral-7B-shaped model, {args.quantize} base, in {build_s:.0f} s; "
          f"a decode step reads {per_token / GiB:.2f} GiB")

    prompt_len = args.docs * 256 // args.compress_rate + QUESTION_TOKENS
    g = torch.Generator().manual_seed(2)
    prompt = torch.randn(1, prompt_len, cfg.hidden_size, generator=g).mul_(0.02).to(torch.bfloat16)
    stamps: list[float] = []
    with torch.no_grad(), use_adapter(model, DECODER):
        generate(model, inputs_embeds=prompt[:, :8], max_new_tokens=2)  # warm-up: first-call allocations
        start = time.perf_counter()
        new = generate(model, inputs_embeds=prompt, max_new_tokens=args.new_tokens,
                       on_token=lambda _: stamps.append(time.perf_counter()))
    prefill_s = stamps[0] - start
    decode = [b - a for a, b in zip(stamps, stamps[1:])]
    decode_s = statistics.median(decode)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the bandwidth test's 2 GiB
    bandwidth = copy_bandwidth()
    bound_s = per_token / bandwidth
    figures = {
        "quantize": args.quantize, "layers": args.layers, "prompt_tokens": prompt_len, "new_tokens": int(new.shape[1]),
        "threads": args.threads, "prefill_s": round(prefill_s, 3), "decode_s_per_token": round(decode_s, 4),
        "weights_read_per_token_gib": round(per_token / GiB, 3), "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "bound_s_per_token": round(bound_s, 4), "fraction_of_bound": round(bound_s / decode_s, 3),
        "ram_peak_gib": round(peak / GiB, 2), "cpu": _cpu_name(),
    }
    print(f"prompt {prompt_len} positions: prefill {prefill_s:.2f} s; decode {decode_s:.3f} s/token "
          f"(median of {len(decode)}); bandwidth bound {bound_s:.3f} s/token at {bandwidth / 1e9:.1f} GB/s copy "
          f"-> {bound_s / decode_s:.0%} of the bound; RAM peak {peak / GiB:.2f} GiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
