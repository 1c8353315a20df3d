"""Measured CPU memory peak of one training step of a shipped config, beside the planner's estimate.

    python bench/cpu_peak.py [--config smollm2-cpu] [--stage stage1] [--data FILE] [--threads 2]

Builds the model and optimizer exactly as the training loop does for the config (flags from
recipes/configs/CONFIG/STAGE.toml; --data replaces its dataset), takes one micro-batch of the
longest rows of the data (so the prompts come near --max_len), runs one optimizer step to create
AdamW's states, then measures a second step with torch.profiler's memory events: parameters +
optimizer states + the peak of what the step allocates (the measure tests/test_planner.py uses).
The planner (recipes/planner.py) is asked twice: at the config's --max_len (what `clara-train
--dry_run` reports, an upper bound) and at the batch's actual prompt length.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from clara.data.formats import read_stage_file
from clara.stages import get_stage
from clara.recipes.distributed import DistInfo
from clara.recipes.loop import build_model, make_optimizer, start_checkpoint, train_step
from clara.recipes.planner import (estimate_peak_memory, load_model_config, plan_kwargs_from_train_args,
                                   profiled_peak_bytes)
from clara.recipes.precision import choose_precision
from clara.recipes.stage_config import load_stage_config

GiB = 1024 ** 3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2-cpu", help="a shipped config name or a .toml (default smollm2-cpu)")
    p.add_argument("--stage", default="stage1", help="the stage whose config is read (default stage1)")
    p.add_argument("--data", help="the stage file to take rows from (default: the config's dataset)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    args = load_stage_config(a.stage, [a.config] + (["--dataset", a.data] if a.data else []))
    device = torch.device("cpu")
    precision = choose_precision(device, args.bf16)
    torch.manual_seed(args.seed)
    model = build_model(args, precision, device, start_checkpoint(args))
    model.train()
    optimizer = make_optimizer(model, args)
    examples = read_stage_file(args.dataset, get_stage(args.stage).data_format)
    lengths = [(len(model.collate([e], args.max_len).decoder.input_ids[0]), i) for i, e in enumerate(examples[:400])]
    chosen = [examples[i] for _, i in sorted(lengths, reverse=True)[:args.micro_train_batch_size]]
    batch = model.collate(chosen, args.max_len)
    prompt_len = batch.decoder.input_ids.shape[1]
    dist = DistInfo(rank=0, local_rank=0, world_size=1)

    def step():
        train_step(model, model, [batch], optimizer, None, precision, device, dist, args.max_norm)

    step()
    live = sum(t.numel() * t.element_size() for t in model.parameters())
    live += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    measured = live + profiled_peak_bytes(step)
    cfg = load_model_config(args.pretrain)
    compute = precision.autocast_dtype or torch.float32
    kwargs = plan_kwargs_from_train_args(args, weight_dtype=precision.weight_dtype, compute_dtype=compute, device="cpu")
    at_max_len = estimate_peak_memory(cfg, **kwargs).total
    at_prompt = estimate_peak_memory(cfg, **dict(kwargs, max_len=prompt_len)).total
    print(f"{a.config} {a.stage}: micro-batch {args.micro_train_batch_size}, prompts {prompt_len} tokens "
          f"(--max_len {args.max_len}), {precision.note}")
    print(f"  measured peak            {measured / GiB:.3f} GiB")
    print(f"  planner at the prompts   {at_prompt / GiB:.3f} GiB ({at_prompt / measured - 1:+.1%})")
    print(f"  planner at --max_len     {at_max_len / GiB:.3f} GiB ({at_max_len / measured - 1:+.1%})")


if __name__ == "__main__":
    main()
