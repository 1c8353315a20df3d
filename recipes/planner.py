"""`clara-plan` (also `python -m clara.recipes.planner`): will a CLaRa training configuration fit,
and how big can the micro-batch be? Also train_sft's --dry_run report (`plan_from_args`).

    clara-plan --model phi-2 --micro_batch 2 --dtype fp16 --gradient_checkpointing

The memory model is recipes/memory_model.py; the architectures come from recipes/presets.py.
Their public names are importable from here as well.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from clara.command import CommandParser, command_main
from clara.quant import QUANT_KINDS
from clara.recipes.memory_model import (
    GiB,
    MemoryPlan,
    PassPlan,
    adapter_parameter_count,
    adapters_for_stage,
    base_parameter_count,
    estimate_peak_memory,
    format_bytes,
    format_plan,
    frozen_weight_bytes,
    largest_micro_batch,
)
from clara.recipes.precision import choose_precision, pick_device, planned_precision
from clara.recipes.presets import HUB_PRESETS, PRESET_NAMES, PRESETS, load_model_config, preset_config
from clara.stages import STAGE_NAMES
from clara.weights import DTYPES

__all__ = ["GiB", "MemoryPlan", "PassPlan", "adapter_parameter_count", "adapters_for_stage", "base_parameter_count",
           "estimate_peak_memory", "format_bytes", "format_plan", "frozen_weight_bytes", "largest_micro_batch",
           "HUB_PRESETS",
           "PRESET_NAMES", "PRESETS", "load_model_config", "preset_config", "plan_kwargs_from_train_args",
           "plan_from_args", "build_parser", "main"]


def profiled_peak_bytes(fn) -> int:
    """Peak of CPU tensor memory allocated by fn() above what was live before it: the running sum
    of torch.profiler's allocation and free events, in time order (what the planner is checked
    against)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return peak


def plan_kwargs_from_train_args(args: Any, *, weight_dtype: str | torch.dtype, compute_dtype: str | torch.dtype,
                                device: str = "cuda") -> dict[str, Any]:
    """estimate_peak_memory's keyword arguments (all but the config) for train_sft's settings: any
    object whose attributes are named as its flags (recipes/args.py), given the dtypes the run
    picked for its device."""
    return dict(stage=args.stage, micro_batch=args.micro_train_batch_size, max_len=args.max_len,
                doc_max_length=args.doc_max_length, compress_rate=args.compress_rate,
                generation_top_k=args.generation_top_k, lora_r=args.lora_rank, lora_targets=args.target_modules,
                lora_dropout=args.lora_dropout, weight_dtype=weight_dtype, compute_dtype=compute_dtype,
                gradient_checkpointing=args.gradient_checkpointing, device=device,
                quantize=getattr(args, "quantize", None))


def plan_from_args(args: Any) -> str:
    """The --dry_run report of train_sft: the plan for the device and precision the run would pick
    (recipes/precision.py), and the largest micro-batch within --memory_budget_gb."""
    cfg = load_model_config(args.pretrain)
    target = getattr(args, "plan_for", "auto")
    if target == "auto":
        device = pick_device(args.device)
        precision = choose_precision(device, args.bf16)
        kind = "cpu" if device.type == "cpu" else "cuda"
    else:
        kind, precision = planned_precision(target, args.bf16)
        device = target
    compute = precision.autocast_dtype or torch.float32
    kwargs = plan_kwargs_from_train_args(args, weight_dtype=precision.weight_dtype, compute_dtype=compute,
                                         device=kind)
    plan = estimate_peak_memory(cfg, **kwargs)
    budget = int(args.memory_budget_gb * GiB)
    largest = largest_micro_batch(budget, cfg, **kwargs)
    quantized = f", {args.quantize} base" if getattr(args, "quantize", None) else ""
    head = f"device {device} ({precision.note}{quantized}); base {args.pretrain}"
    return head + "\n" + format_plan(plan, budget, largest)


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="clara-plan",
                                 description="Estimate the peak memory of one CLaRa training step and the largest "
                                             "micro-batch that fits a budget.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True,
                    help=f"Preset ({', '.join(PRESET_NAMES)}), a .gguf file, a Hugging Face config.json or model "
                         "folder, a Clara checkpoint, or a hub id in the local cache")
    ap.add_argument("--stage", default="stage1", choices=STAGE_NAMES, help="Training stage")
    ap.add_argument("--micro_batch", "--micro_train_batch_size", dest="micro_batch", type=int, default=2,
                    help="Examples per forward/backward pass")
    ap.add_argument("--max_len", type=int, default=2048, help="Generator sequence length (upper bound)")
    ap.add_argument("--doc_max_length", type=int, default=256, help="Document tokens per document")
    ap.add_argument("--compress_rate", type=int, default=32, help="Document tokens per memory vector")
    ap.add_argument("--generation_top_k", type=int, default=1, help="Documents per generator prompt")
    ap.add_argument("--n_docs", type=int, default=None,
                    help="Documents compressed per example (default: 1 in stage1, else generation_top_k)")
    ap.add_argument("--lora_rank", type=int, default=16, help="LoRA rank of every adapter")
    ap.add_argument("--lora_dropout", type=float, default=0.1, help="LoRA dropout (adds masks and input copies)")
    ap.add_argument("--target_modules", nargs="+", default=["all-linear"], help="Linear layers with adapters")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                    help="Dtype of the frozen weights and of the compute (fp16 on a T4, bf16 on sm80+)")
    ap.add_argument("--compute_dtype", default=None, choices=sorted(DTYPES),
                    help="Compute (autocast) dtype when it differs from --dtype")
    ap.add_argument("--gradient_checkpointing", action="store_true", help="Recompute blocks in backward")
    ap.add_argument("--quantize", choices=QUANT_KINDS, default=None,
                    help="Frozen base stored quantized (nf4 or int8 block linears); --dtype is then the dtype "
                         "of the rest and of the dequantized weights")
    ap.add_argument("--logits_tokens", type=int, default=None,
                    help="Positions with logits per micro-batch (default: micro_batch x max_len)")
    ap.add_argument("--memory_budget_gb", type=float, default=15.0, help="Budget in GiB for the largest micro-batch")
    return ap


@command_main("clara-plan")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_model_config(args.model)
    kwargs = dict(stage=args.stage, max_len=args.max_len, doc_max_length=args.doc_max_length,
                  compress_rate=args.compress_rate, generation_top_k=args.generation_top_k, lora_r=args.lora_rank,
                  lora_targets=args.target_modules, lora_dropout=args.lora_dropout, weight_dtype=args.dtype,
                  compute_dtype=args.compute_dtype or args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                  quantize=args.quantize,
                  n_docs_per_example=args.n_docs, logits_tokens=args.logits_tokens)
    plan = estimate_peak_memory(cfg, micro_batch=args.micro_batch, **kwargs)
    budget = int(args.memory_budget_gb * GiB)
    if args.logits_tokens is not None:
        kwargs.pop("logits_tokens")  # a fixed count would not grow with the batch
    largest = largest_micro_batch(budget, cfg, **kwargs)
    print(format_plan(plan, budget, largest))
    other = estimate_peak_memory(cfg, micro_batch=args.micro_batch,
                                 **{**kwargs, "gradient_checkpointing": not args.gradient_checkpointing})
    print(f"  with gradient checkpointing {'off' if args.gradient_checkpointing else 'on'}: "
          f"{format_bytes(other.total)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
