"""Mistral-7B stage 1 on an NF4 base inside a T4's 16 GiB, measured on a larger GPU.

The T4 recipe of recipes/configs/mistral7b-t4/stage1.toml (fp16 weights and autocast, dynamic loss
scaling, gradient checkpointing, CR 32, 256-token documents, MSE + QA, LoRA r 16 on every block
linear) on Mistral-7B's shape with random NF4 codes (bench/cpu_decode.py builds them), under
torch.cuda.set_per_process_memory_fraction(16 GiB): one recipe step per micro-batch, the second
step's torch.cuda.max_memory_allocated against the planner's estimate for the same batch.

On a GPU machine, from the repository root, with gpu_inputs/ carried (bench/prepare_gpu_check.sh):

    PYTHONUNBUFFERED=1 python3 bench/gpu_quant_t4.py [--micro_batches 1 2 4 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from cpu_decode import random_quantized_decoder  # noqa: E402
from cuda_helpers import GiB, GPU_INPUTS, OPT_ARGS, free_cuda, recipe_step, stage1_examples  # noqa: E402
from clara.config import ClaraConfig  # noqa: E402
from clara.model import Clara  # noqa: E402
from clara.recipes.loop import make_optimizer  # noqa: E402
from clara.recipes.planner import estimate_peak_memory, preset_config  # noqa: E402
from clara.recipes.precision import planned_precision  # noqa: E402
from clara.tokenizer import load_tokenizer  # noqa: E402

CAP = 16 * GiB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro_batches", type=int, nargs="+", default=[1, 2, 4, 5], help="Micro-batches to measure")
    ap.add_argument("--quantize", choices=("nf4", "int8"), default="nf4", help="How the base is stored")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    tokenizer_dir = GPU_INPUTS / "base"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        print(f"{tokenizer_dir} is missing: run `bash bench/prepare_gpu_check.sh` and carry gpu_inputs/", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP / total), dev)
    _, precision = planned_precision("t4", bf16=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = ClaraConfig(compress_rate=32, doc_max_length=256, training_stage="stage1", lora_r=16, lora_dropout=0.1,
                         generation_top_k=1, mse_loss=True, qa_loss=True, lora_target_modules="all-linear")
    # Mistral-7B's shape over the carried tokenizer's vocabulary (the planner is given the same).
    cfg = dataclasses.replace(preset_config("mistral-7b"), vocab_size=len(tokenizer) + len(config.special_tokens()))
    start = time.time()
    decoder = random_quantized_decoder(cfg, args.quantize, precision.weight_dtype, device=dev)
    model = Clara.from_decoder(decoder, tokenizer, config, base_name="random Mistral-7B")
    model.rng.seed(0)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.data = p.data.float()
    model.decoder.set_gradient_checkpointing(True)
    model.train()
    optimizer = make_optimizer(model, OPT_ARGS)
    scaler = torch.amp.GradScaler("cuda")
    print(f"built in {time.time() - start:.0f} s; {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated; "
          f"cap {CAP / GiB:.0f} GiB of {total / GiB:.0f}")
    plan_common = dict(stage="stage1", doc_max_length=256, compress_rate=32, generation_top_k=1, lora_r=16,
                       lora_targets="all-linear", lora_dropout=0.1, weight_dtype=precision.weight_dtype,
                       compute_dtype=precision.autocast_dtype, device="cuda", gradient_checkpointing=True,
                       quantize=args.quantize)
    for b in args.micro_batches:
        free_cuda()
        batch = model.collate(stage1_examples(b), max_len=2048)
        max_len = batch.decoder.input_ids.shape[1]
        plan = estimate_peak_memory(cfg, micro_batch=b, max_len=max_len, **plan_common)
        try:
            recipe_step(model, batch, optimizer, scaler, precision, dev)  # creates AdamW's states
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.time()
            loss = recipe_step(model, batch, optimizer, scaler, precision, dev)[0]
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            print(f"micro-batch {b}, max_len {max_len}: peak {peak / GiB:.2f} GiB, plan {plan.total / GiB:.2f} GiB "
                  f"({plan.total / peak - 1:+.1%}), step {time.time() - t:.1f} s, loss {float(loss):.3f}")
        except torch.cuda.OutOfMemoryError:
            print(f"micro-batch {b}, max_len {max_len}: out of memory under the 16 GiB cap "
                  f"(plan {plan.total / GiB:.2f} GiB)")
            optimizer.zero_grad(set_to_none=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
