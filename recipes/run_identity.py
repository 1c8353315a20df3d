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


def run_identity(args, examples: Sequence[Any], base_fingerprint: str | None = None) -> dict[str, Any]:
    """The identity of a run; without `base_fingerprint` (known once the model is loaded) it can
    already be checked on everything else, before any model is loaded."""
    identity = {
        "stage": args.stage,
        "dataset": dataset_fingerprint(examples),
        "shapes": {name: getattr(args, name) for name in SHAPE_FLAGS},
    }
    if getattr(args, "stage2_mips", False):  # only then: runs recorded before the flag stay resumable
        identity["shapes"]["stage2_retrieval_top_n"] = args.stage2_retrieval_top_n
    if base_fingerprint is not None:
        identity["base"] = base_fingerprint
    return identity


def check_same_run(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Raise CheckpointError naming every difference between the run recorded at `where` (a step
    checkpoint or a run folder's run.json) and this one; a key `current` lacks is not compared."""
    if saved is None:
        raise CheckpointError(f"{where}: records no run identity (written by an older version), so "
                              "it cannot be checked against this run; start afresh with --overwrite")
    differences = []
    for key in ("stage", "base", "dataset"):
        if key in current and saved.get(key) != current[key]:
            what = {"base": "base model fingerprint", "dataset": "dataset fingerprint"}.get(key, key)
            differences.append(f"{what} {saved.get(key)!r} there, {current[key]!r} here")
    saved_shapes = saved.get("shapes", {})
    for name in dict.fromkeys([*current["shapes"], *saved_shapes]):
        value = current["shapes"].get(name)
        # JSON keeps lists where the flags hold lists; compare through JSON on both sides.
        if json.loads(json.dumps(saved_shapes.get(name))) != json.loads(json.dumps(value)):
            differences.append(f"--{name} {saved_shapes.get(name)!r} there, {value!r} here")
    if differences:
        raise CheckpointError(f"{where}: belongs to another run ({'; '.join(differences)}); "
                              "resume with that run's flags, or give this run its own --save_path")
