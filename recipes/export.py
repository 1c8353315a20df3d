"""A trained run's model as a checkpoint to ship: `python -m clara.recipes.export RUN ... --out DIR`.

    python -m clara.recipes.export runs/stage1 runs/stage1_2 --out checkpoints/nutribot-smollm2 \\
        --dtype bf16 --metrics results/nll.metrics.json --data_root .

The last RUN's final model is written to DIR (adapters and memory rows in --dtype; the base is
not copied), with a manifest.json that says how it was made: for every RUN, its stage, the
clara-train command that reproduces it (the flags that differ from the defaults), the data files
it read with their sha256, its optimizer steps, the compute time its steps took (from
metrics.jsonl) and its wall time (first to last logged step); then the git commit of the code, the
device, the --metrics files' contents, and the sha256 of each file of DIR. A test checks the
hashes, so what is in git is what the manifest describes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from clara.command import CommandParser, command_main
from clara.files import atomic_write_json, read_json, sha256_file

FORMAT = "clara-shipped-checkpoint/1"
MANIFEST = "manifest.json"


def command_of(flags: dict[str, Any]) -> str:
    """The clara-train command line of a run: its flags that differ from the defaults."""
    from clara.recipes.args import build_parser
    from clara.recipes.stage_config import config_flags

    defaults = {a.dest: list(a.default) if isinstance(a.default, tuple) else a.default
                for a in build_parser()._actions}
    changed = {name: value for name, value in flags.items() if name in defaults and value != defaults[name]}
    return " ".join(["clara-train", *config_flags(changed, Path("run.json"))])


def stage_record(run: Path, data_root: Path) -> dict[str, Any]:
    recorded = read_json(run / "run.json")
    flags = recorded["flags"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    data = {}
    for key in ("dataset", "eval_dataset"):
        for name in (flags.get(key) or "").split(","):
            if name and (data_root / name).is_file():
                data[name] = sha256_file(data_root / name)
    return {
        "stage": recorded["identity"]["stage"], "run": str(run), "command": command_of(flags),
        "identity": recorded["identity"], "data": data, "steps": len(steps),
        "compute_s": round(sum(r.get("seconds", 0.0) for r in steps), 1),
        # metrics.jsonl rows carry the time they were written; wall time spans first to last step.
        "wall_s": round(steps[-1]["time"] - steps[0]["time"] + steps[0].get("seconds", 0.0), 1)
        if steps and "time" in steps[0] and "time" in steps[-1] else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "loss_first_10": sum(r["loss"] for r in steps[:10]) / max(len(steps[:10]), 1),
        "loss_last_10": sum(r["loss"] for r in steps[-10:]) / max(len(steps[-10:]), 1),
    }


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m clara.recipes.export", description=__doc__.split("\n\n")[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="training run folders, in the order they were trained; "
                                                         "the last one's final model is exported")
    p.add_argument("--out", required=True, help="the folder to write (its other files are left alone)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16",
                   help="dtype of the saved adapters and memory rows (default bf16: half the size of fp32)")
    p.add_argument("--metrics", nargs="*", default=[], metavar="JSON",
                   help="evaluation results (clara-eval's PREFIX.metrics.json) to record in the manifest")
    p.add_argument("--data_root", default=".", help="the folder the runs' data paths are relative to (default .)")
    p.add_argument("--note", action="append", default=[],
                   help="a line to record in the manifest's notes (how a run was stopped, resumed, ...); repeatable")
    p.add_argument("--device_note", default=None,
                   help="the machine the runs trained on, in words (default: this machine's processor)")
    return p


@command_main("python -m clara.recipes.export")
def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from clara.model import Clara
    from clara.weights import DTYPES

    args = build_parser().parse_args(argv)
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not (run / "run.json").is_file() or not (run / "final").is_dir():
            raise ValueError(f"{run}: not a finished training run (needs run.json and final/)")
    out = Path(args.out)
    model = Clara.from_pretrained(runs[-1] / "final", dtype=DTYPES[args.dtype])
    model.save_pretrained(out)
    manifest = {
        "format": FORMAT,
        "name": out.name,
        "base": model.base_name,
        "stages": [stage_record(run, Path(args.data_root)) for run in runs],
        "git_commit": git_commit(),
        "device": args.device_note or f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "metrics": {Path(m).name: read_json(m) for m in args.metrics},
        "notes": args.note,
        "files": {name: sha256_file(out / name) for name in ("clara.json", "adapters.safetensors",
                                                              "embeddings.safetensors")},
    }
    atomic_write_json(out / MANIFEST, manifest)
    size = sum((out / name).stat().st_size for name in manifest["files"])
    print(f"{out}: {size / 2**20:.1f} MiB, {len(runs)} stage(s), manifest {out / MANIFEST}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
