"""The planner's estimate against the measured CUDA peak over micro-batch sizes: phi-2's shape with
random weights, the T4 recipe (fp16 weights, fp16 autocast, dynamic loss scaling), with and without
gradient checkpointing. Prints one line per configuration: the peak of the second recipe step
(torch.cuda.max_memory_allocated), the planner's default estimate, its estimate with logits only
for the answer tokens (as Clara computes them), their relative error and the estimate's parts.

On a GPU machine, from the repository root, with the library importable and gpu_inputs/ carried
(bench/prepare_gpu_check.sh writes it and says how to install the library there):

    PYTHONUNBUFFERED=1 python3 bench/gpu_planner_sweep.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cuda_helpers import (GiB, GPU_INPUTS, OPT_ARGS, build_clara_random, free_cuda, planner_setup,  # noqa: E402
                          recipe_step, stage1_examples)
from clara.recipes.loop import make_optimizer  # noqa: E402
from clara.recipes.planner import estimate_peak_memory  # noqa: E402

PARTS = ("frozen_weights", "encoder_activations", "decoder_activations", "recompute", "logits", "backward_working")


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    tokenizer_dir = GPU_INPUTS / "base"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        print(f"{tokenizer_dir} is missing: run `bash bench/prepare_gpu_check.sh` and carry gpu_inputs/",
              file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    cfg, precision, common = planner_setup(dev)
    for ckpt in (True, False):
        model = build_clara_random(cfg, tokenizer_dir, dev, precision.weight_dtype, 16, ckpt)
        optimizer = make_optimizer(model, OPT_ARGS)
        scaler = torch.amp.GradScaler("cuda")
        for b in ((2, 8, 16, 32, 45) if ckpt else (2, 8, 16)):
            free_cuda()
            base = torch.cuda.memory_allocated()
            batch = model.collate(stage1_examples(b), max_len=2048)
            t = time.time()
            recipe_step(model, batch, optimizer, scaler, precision, dev)  # creates AdamW's states
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            recipe_step(model, batch, optimizer, scaler, precision, dev)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            max_len = batch.decoder.input_ids.shape[1]
            est = estimate_peak_memory(cfg, micro_batch=b, max_len=max_len, gradient_checkpointing=ckpt, **common)
            est_a = estimate_peak_memory(cfg, micro_batch=b, max_len=max_len, gradient_checkpointing=ckpt,
                                         logits_tokens=batch.n_target_tokens, **common)
            print(f"ckpt={ckpt} b={b:3d} max_len={max_len} peak={peak / GiB:.2f} GiB (static before step "
                  f"{base / GiB:.2f}) reserved={torch.cuda.max_memory_reserved() / GiB:.2f} "
                  f"est_default={est.total / GiB:.2f} est_answer_logits={est_a.total / GiB:.2f} "
                  f"phase={est_a.peak_phase} rel={(est_a.total - peak) / peak:+.3f} step {time.time() - t:.1f}s",
                  flush=True)
            print("   parts:", {k: round(getattr(est_a, k) / GiB, 3) for k in PARTS}, flush=True)
            batch = None
            optimizer.zero_grad(set_to_none=True)
        model = optimizer = None
        free_cuda()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
