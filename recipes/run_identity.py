"""What makes a step checkpoint belong to a run: its stage, base model, data and shapes.

A step checkpoint records the identity of the run that wrote it; `--load_checkpoint` resumes it
only when the new run's identity is the same, so a run can never continue another run's state
(another stage, base, dataset or LoRA shape) without a word.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

from clara.checkpoint import CheckpointError

# Flags whose change makes the saved state meaningless or the data position wrong.
SHAPE_FLAGS = ("compress_rate", "doc_max_length", "lora_rank", "lora_alpha", "target_modules",
               "generation_top_k", "train_batch_size", "max_len", "qa_loss", "mse_loss")


def dataset_fingerprint(examples: Sequence[Any]) -> str:
    """sha256 of the training examples as read (after --max_samples and row selection)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(dataclasses.asdict(example), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def run_identity(args, base_fingerprint: str, examples: Sequence[Any]) -> dict[str, Any]:
    return {
        "stage": args.stage,
        "base": base_fingerprint,
        "dataset": dataset_fingerprint(examples),
        "shapes": {name: getattr(args, name) for name in SHAPE_FLAGS},
    }


def check_same_run(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint: str) -> None:
    """Raise CheckpointError naming every difference between the checkpoint's run and this one."""
    if saved is None:
        raise CheckpointError(f"{checkpoint}: records no run identity (written by an older version), so "
                              "it cannot be checked against this run; start fresh without --load_checkpoint")
    differences = []
    for key in ("stage", "base", "dataset"):
        if saved.get(key) != current[key]:
            what = {"base": "base model fingerprint", "dataset": "dataset fingerprint"}.get(key, key)
            differences.append(f"{what} {saved.get(key)!r} there, {current[key]!r} here")
    saved_shapes = saved.get("shapes", {})
    for name, value in current["shapes"].items():
        # JSON keeps lists where the flags hold lists; compare through JSON on both sides.
        if json.loads(json.dumps(saved_shapes.get(name))) != json.loads(json.dumps(value)):
            differences.append(f"--{name} {saved_shapes.get(name)!r} there, {value!r} here")
    if differences:
        raise CheckpointError(f"{checkpoint}: belongs to another run ({'; '.join(differences)}); "
                              "resume with that run's flags, or give this run its own --save_path")
