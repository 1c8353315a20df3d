"""A run folder (`--save_path`) belongs to one run.

It holds run.json (the run's identity and flags), metrics.jsonl, loss_curve.png, the final model
in final/ and, by default, the step checkpoints in checkpoints/. A fresh run refuses a folder that
already holds any of these (another run's, or an earlier try of this one) unless `--overwrite`,
which removes exactly those and nothing else; `--load_checkpoint` continues the run the folder
holds, and only when its recorded identity is this run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from clara.checkpoint import CheckpointError
from clara.files import atomic_write_json, read_json
from clara.recipes.train_state import LATEST_FILE, list_checkpoints

RUN_FILE = "run.json"
# What a run writes into its folder, besides the step checkpoints.
RUN_OUTPUTS = (RUN_FILE, "metrics.jsonl", "loss_curve.png", "final")


def run_outputs(save_path: Path, checkpoint_root: Path) -> list[Path]:
    """The files and folders of a run present in `save_path` and `checkpoint_root`."""
    if save_path.exists() and not save_path.is_dir():
        raise CheckpointError(f"--save_path {save_path}: exists and is not a folder")
    found = [save_path / name for name in RUN_OUTPUTS if (save_path / name).exists()]
    found += [path for _, path in list_checkpoints(checkpoint_root)]
    if (checkpoint_root / LATEST_FILE).is_file():
        found.append(checkpoint_root / LATEST_FILE)
    return found


def check_run_folder(save_path: Path, checkpoint_root: Path, *, resuming: bool, overwrite: bool,
                     resume_requested: bool = False) -> list[Path]:
    """What `--overwrite` will remove before a fresh run starts; CheckpointError when a fresh run
    would write over another run's outputs without `--overwrite`."""
    if resuming:
        return []
    found = run_outputs(save_path, checkpoint_root)
    if not found or overwrite:
        return found
    names = ", ".join(sorted({path.name if path.parent == save_path else str(path) for path in found}))
    if resume_requested:  # --load_checkpoint was given, but the run saved no step checkpoint yet
        raise CheckpointError(f"--save_path {save_path}: holds a run ({names}) but {checkpoint_root} has no step "
                              "checkpoint to resume; start it over with --overwrite, or give this run its own "
                              "--save_path")
    raise CheckpointError(f"--save_path {save_path}: holds a run already ({names}); resume it with "
                          "--load_checkpoint, start over with --overwrite, or give this run its own --save_path")


def clear_run_outputs(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def read_run_file(save_path: Path) -> dict[str, Any] | None:
    """The identity recorded in save_path/run.json, or None when there is no run.json."""
    path = save_path / RUN_FILE
    if not path.exists():
        return None
    recorded = read_json(path, CheckpointError)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("identity"), dict):
        raise CheckpointError(f"{path}: field 'identity' is missing")
    return recorded["identity"]


def write_run_file(save_path: Path, identity: dict[str, Any], flags: dict[str, Any]) -> None:
    # Flags as JSON gives them (tuples become lists), so the file reads back as written.
    atomic_write_json(save_path / RUN_FILE, {"identity": identity, "flags": json.loads(json.dumps(flags))})
