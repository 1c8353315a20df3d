"""Resumable training state on disk, without pickle: safetensors for tensors, JSON for the rest.

A checkpoint folder `step_N/` holds (besides the adapters, which the model saves itself):

    optimizer.safetensors   every tensor of the optimizer state, keyed "state.<param index>.<name>"
                            (AdamW: exp_avg, exp_avg_sq, step)
    train_state.json        param groups, non-tensor optimizer state, scheduler, loss scaler,
                            data position and any extra counters
    rng_rank<R>.safetensors torch RNG states of process R as uint8 tensors ("torch_cpu",
                            "cuda.<device>"); Python's and NumPy's states as JSON in the file's metadata
    manifest.json           the size and sha256 of every other file (the model's too), written last;
                            `find_resumable_checkpoint` passes over a step whose files differ from it

Folders are written under a temporary name inside `save_path` and renamed to `step_N` when
complete, so a crash never leaves a half-written `step_N`; `latest` names the newest folder for
people and scripts, and `find_latest_checkpoint` trusts only complete `step_N` folders.
Under torchrun every rank writes its own RNG file into `checkpoint_temp_dir(save_path, N)`; rank 0
writes the rest and, after a barrier, calls `commit_checkpoint`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from clara.checkpoint import CheckpointError
from clara.files import read_json, sha256_file

FORMAT = "clara-train-state/1"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp_"


# ------------------------------------------------------------------------------------------------
# Small atomic file helpers
# ------------------------------------------------------------------------------------------------
def _temp_sibling(path: Path) -> Path:
    return path.with_name(f"{_TEMP_PREFIX}{path.name}.{os.getpid()}")


def write_json_atomically(path: Path, obj: Any) -> None:
    tmp = _temp_sibling(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tmp = _temp_sibling(path)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, metadata


def _need(obj: dict[str, Any], key: str, path: Path) -> Any:
    if key not in obj:
        raise CheckpointError(f"{path}: field {key!r} is missing")
    return obj[key]


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Every generator a training step may draw from: Python, NumPy, torch CPU and each CUDA device."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`. CUDA states are restored for the devices present (a resumed run may
    see fewer GPUs per process than the run that saved)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def rng_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rng_rank{rank}.safetensors"


def save_rng(directory: str | Path, rng: dict[str, Any], rank: int = 0) -> Path:
    """Write one process's RNG states (from `capture_rng`) to rng_rank<rank>.safetensors."""
    tensors = {"torch_cpu": rng["torch_cpu"]}
    tensors.update({f"cuda.{i}": s for i, s in enumerate(rng["cuda"])})
    metadata = {"format": FORMAT, "python": json.dumps(rng["python"]), "numpy": json.dumps(rng["numpy"]),
                "cuda_devices": str(len(rng["cuda"]))}
    path = rng_file(directory, rank)
    _save_tensors_atomically(path, tensors, metadata)
    return path


def load_rng(directory: str | Path, rank: int = 0) -> dict[str, Any]:
    """The RNG states saved by `save_rng`, in `capture_rng`'s form (pass them to `restore_rng`)."""
    path = rng_file(directory, rank)
    tensors, metadata = _read_tensors(path)
    try:
        n_cuda = int(metadata["cuda_devices"])
        state = {"python": json.loads(metadata["python"]), "numpy": json.loads(metadata["numpy"]),
                 "torch_cpu": tensors["torch_cpu"], "cuda": [tensors[f"cuda.{i}"] for i in range(n_cuda)]}
    except KeyError as e:
        raise CheckpointError(f"{path}: entry {e.args[0]!r} is missing") from None
    except (ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable RNG metadata ({e})") from None
    return state


# ------------------------------------------------------------------------------------------------
# Optimizer + the rest of the training state
# ------------------------------------------------------------------------------------------------
def _class_name(optimizer) -> str:
    """The optimizer's class; a wrapper (clara.recipes.distributed.FullStateOptimizer) names the one it wraps."""
    return getattr(optimizer, "class_name", type(optimizer).__name__)


def optimizer_class_name(optimizer) -> str:
    """The optimizer's class; wrappers (a sharded-state view, a snapshot) name the class they hold
    in `class_name`."""
    return getattr(optimizer, "class_name", None) or type(optimizer).__name__


def _live_param_groups(optimizer) -> list[dict[str, Any]]:
    # A wrapper around an optimizer exposes it as `.optimizer`; reading its param groups directly
    # avoids state_dict(), which for a sharded-state view gathers every state tensor.
    target = optimizer if hasattr(optimizer, "param_groups") else getattr(optimizer, "optimizer", None)
    if target is not None and hasattr(target, "param_groups"):
        return target.param_groups
    return optimizer.state_dict()["param_groups"]


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict, list]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                values.setdefault(str(index), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, values, groups


def save_train_state(directory: str | Path, *, optimizer: torch.optim.Optimizer, scheduler_state: dict,
                     scaler_state: dict | None, rng: dict[str, Any], data_position: dict, extra: dict,
                     rank: int = 0) -> None:
    """Write optimizer.safetensors, train_state.json and rng_rank<rank>.safetensors into `directory`.

    `optimizer` is anything with state_dict() in torch's format: an optimizer, or a wrapper naming
    the wrapped class in `class_name` (a view that gathers sharded states, a snapshot).

    scheduler_state, scaler_state, data_position and extra must be JSON-able (GradScaler.state_dict()
    is).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, values, groups = _split_optimizer_state(optimizer)
    _save_tensors_atomically(directory / OPTIMIZER_FILE, tensors, {"format": FORMAT})
    state = {
        "format": FORMAT,
        "optimizer": {"class": _class_name(optimizer), "param_groups": groups, "state_values": values},
        "scheduler": scheduler_state,
        "scaler": scaler_state,
        "data_position": data_position,
        "extra": extra,
    }
    try:
        json.dumps(state, allow_nan=True)
    except TypeError as e:
        raise TypeError(f"training state for {directory / STATE_FILE} is not JSON-able: {e}") from None
    write_json_atomically(directory / STATE_FILE, state)
    save_rng(directory, rng, rank)


def _restore_group_types(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    # JSON has no tuples; give back the optimizer's own types (AdamW's betas) so the restored
    # param groups compare and behave exactly like the originals.
    return {k: (tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v) for k, v in saved.items()}


def load_train_state(directory: str | Path, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore `optimizer` exactly and return {"scheduler", "scaler", "rng", "data_position", "extra"}.

    The RNG states are returned, not applied: call `restore_rng(state["rng"])` when the run is
    ready to continue (after building the model, whose initialisation draws random numbers).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    state_path, tensor_path = directory / STATE_FILE, directory / OPTIMIZER_FILE
    state = read_json(state_path, CheckpointError)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{state_path}: field 'format' is {state.get('format')!r}, expected {FORMAT!r}")
    opt = _need(state, "optimizer", state_path)
    groups = _need(opt, "param_groups", state_path)
    values = _need(opt, "state_values", state_path)
    if opt.get("class") != _class_name(optimizer):
        raise CheckpointError(f"{state_path}: optimizer.class is {opt.get('class')!r} but the run uses "
                              f"{_class_name(optimizer)}")
    current = optimizer.state_dict()["param_groups"]
    if len(groups) != len(current) or any(len(g.get("params", ())) != len(c["params"]) for g, c in zip(groups, current)):
        raise CheckpointError(
            f"{state_path}: optimizer.param_groups hold {[len(g.get('params', ())) for g in groups]} parameters, "
            f"the optimizer {[len(c['params']) for c in current]}: the checkpoint is for other trainable parameters")
    tensors, _ = _read_tensors(tensor_path)

    entries: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        prefix, index, name = (key.split(".", 2) + ["", ""])[:3]
        if prefix != "state" or not index.isdigit() or not name:
            raise CheckpointError(f"{tensor_path}: unexpected tensor {key!r}")
        entries.setdefault(int(index), {})[name] = tensor
    for index, named in values.items():
        if not index.isdigit():
            raise CheckpointError(f"{state_path}: optimizer.state_values has a non-numeric key {index!r}")
        entries.setdefault(int(index), {}).update(named)
    known = {i for g in groups for i in g["params"]}
    unknown = sorted(set(entries) - known)
    if unknown:
        raise CheckpointError(f"{tensor_path}: state for parameter index {unknown[0]}, which no param group holds")
    optimizer.load_state_dict({
        "state": entries,
        "param_groups": [_restore_group_types(g, c) for g, c in zip(groups, current)],
    })
    return {
        "scheduler": _need(state, "scheduler", state_path),
        "scaler": _need(state, "scaler", state_path),
        "rng": load_rng(directory, rank),
        "data_position": _need(state, "data_position", state_path),
        "extra": _need(state, "extra", state_path),
    }


# ------------------------------------------------------------------------------------------------
# Checkpoint folders
# ------------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step}"


def checkpoint_temp_dir(save_path: str | Path, step: int) -> Path:
    """The folder a checkpoint of `step` is written into before `commit_checkpoint` renames it.

    The name is the same on every rank, so all ranks can write into it; it starts with a dot, so
    a leftover from a crash is never taken for a checkpoint.
    """
    return Path(save_path) / f"{_TEMP_PREFIX}{step_dir_name(step)}"


def prepare_checkpoint_dir(save_path: str | Path, step: int) -> Path:
    """Create an empty temp folder for `step`, removing a leftover of an interrupted save."""
    tmp = checkpoint_temp_dir(save_path, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders (Windows): rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_checkpoint(save_path: str | Path, step: int) -> Path:
    """Rename the finished temp folder to step_N (replacing an older step_N) and update `latest`."""
    save_path = Path(save_path)
    tmp = checkpoint_temp_dir(save_path, step)
    if not tmp.is_dir():
        raise CheckpointError(f"{tmp}: nothing to commit (the temp checkpoint folder does not exist)")
    final = save_path / step_dir_name(step)
    old = None
    if final.exists():
        # os.replace cannot put a folder over a non-empty one; move the old one aside first.
        old = save_path / f"{_TEMP_PREFIX}old_{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(save_path)
    marker = save_path / LATEST_FILE
    marker_tmp = _temp_sibling(marker)
    marker_tmp.write_text(final.name + "\n", encoding="utf-8")
    os.replace(marker_tmp, marker)
    if old is not None:
        shutil.rmtree(old)
    return final


def write_checkpoint_atomically(save_path: str | Path, step: int, write_fn: Callable[[Path], None]) -> Path:
    """write_fn(temp folder) writes the files; their manifest is added; then the folder becomes
    save_path/step_N atomically."""
    tmp = prepare_checkpoint_dir(save_path, step)
    write_fn(tmp)
    write_manifest(tmp)
    return commit_checkpoint(save_path, step)


# ------------------------------------------------------------------------------------------------
# Manifest: a sha256 for every file of a step checkpoint
# ------------------------------------------------------------------------------------------------
def write_manifest(directory: Path) -> None:
    """MANIFEST_FILE: the size and sha256 of every other file under `directory`."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_json_atomically(directory / MANIFEST_FILE, {"format": FORMAT, "files": files})


def verify_checkpoint(directory: str | Path) -> None:
    """Raise CheckpointError naming the first file of a step checkpoint that is missing, truncated
    or changed since it was written (its size or sha256 differs from the manifest's)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing, so the checkpoint's files cannot be checked "
                              "(incomplete, or written by an older version)")
    manifest = read_json(manifest_path, CheckpointError)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{manifest_path}: field 'files' is missing or empty")
    for name, expected in files.items():
        path = directory / name
        if not path.resolve().is_relative_to(directory.resolve()):
            raise CheckpointError(f"{manifest_path}: file name {name!r} points outside the checkpoint")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(f"{path}: {size} bytes, {MANIFEST_FILE} records {expected.get('bytes')} (truncated?)")
        if sha256_file(path) != expected.get("sha256"):
            raise CheckpointError(f"{path}: corrupted (its sha256 differs from the one in {MANIFEST_FILE})")


def list_checkpoints(save_path: str | Path) -> list[tuple[int, Path]]:
    """Complete step_N folders, oldest first."""
    save_path = Path(save_path)
    if not save_path.is_dir():
        return []
    found = []
    for child in save_path.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_resumable_checkpoint(save_path: str | Path, warn: Callable[[str], None] = lambda message: None) -> Path | None:
    """The newest step_N folder whose files all match its manifest, or None when there is no
    step_N at all. A newer one that fails the check is passed over with a `warn`ing that names the
    bad file; when every one fails, CheckpointError lists them (nothing to resume, yet the folder
    is not empty: starting afresh would be a silent loss)."""
    found = list_checkpoints(save_path)
    problems = []
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
            warn(f"{path.name} cannot be resumed: {error}; trying the previous step checkpoint")
            continue
        return path
    if problems:
        raise CheckpointError(f"{save_path}: no step checkpoint is complete ({'; '.join(problems)}); "
                              "start afresh with --overwrite")
    return None


def find_latest_checkpoint(save_path: str | Path) -> Path | None:
    """The complete step_N folder with the highest N, or None. Temp folders are never returned.

    The `latest` marker is written after each commit for people and scripts; the folders
    themselves decide here, so a crash between the rename and the marker update loses nothing.
    """
    found = list_checkpoints(save_path)
    return found[-1][1] if found else None


def prune_checkpoints(save_path: str | Path, max_ckpt_num: int) -> list[Path]:
    """Delete all but the newest `max_ckpt_num` step_N folders; returns the deleted ones."""
    if max_ckpt_num < 1:
        raise ValueError(f"max_ckpt_num must be at least 1, got {max_ckpt_num}")
    found = list_checkpoints(save_path)
    doomed = [path for _, path in found[:-max_ckpt_num]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed
