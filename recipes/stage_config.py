"""Config files for the stage scripts: a TOML file of clara-train flags, plus overrides.

    python -m clara.recipes.stage1 smollm2-cpu                       # a shipped config, by name
    python -m clara.recipes.stage1 my_run.toml --max_steps 50        # a file, one flag overridden

A config file holds `clara-train` flags by name, without the dashes:

    pretrain = "smollm2-135m"
    dataset = "data/stage1_mix_train.jsonl"
    compress_rate = 8
    mse_loss = true              # a switch: true sets it, false leaves it off
    qa_loss = false              # ... or turns it off where it is on by default (--no_qa_loss)
    target_modules = ["q_proj", "v_proj"]

The file becomes the same flags `clara-train` parses, the overrides are appended (the last value
of a flag wins), and `clara.recipes.args.parse_args` checks them all: a config file can say no
more and no less than the command line. A switch the file sets to true is turned off by an
override `--no_NAME` (e.g. `--no_bf16`, `--no_freeze_decoder_adapter`). The stage is the
script's own; a file that names another is refused. A shipped config is
`recipes/configs/NAME/<script>.toml` (stage1, stage1_2, stage2, stage2_retrieval).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from clara.recipes.args import build_parser, parse_args
from clara.recipes.train_config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Switches that are on by default and have a --no_ form to turn them off.
NEGATABLE = {"qa_loss": "--no_qa_loss"}


def config_path(name: str, stage: str) -> Path:
    """A TOML file path, or the name of a shipped config folder (its STAGE.toml)."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        return path
    file_name = f"{stage_module(stage)}.toml"
    shipped = CONFIG_DIR / name / file_name
    if not shipped.is_file():
        names = sorted(p.name for p in CONFIG_DIR.iterdir() if (p / file_name).is_file())
        raise ValueError(f"{name}: neither a .toml file nor a shipped config with a {file_name} "
                         f"(shipped: {', '.join(names)})")
    return shipped


def read_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None


def config_flags(values: dict[str, Any], path: Path) -> list[str]:
    """The clara-train command line a config's values stand for."""
    known = {action.dest: action for action in build_parser()._actions}
    argv: list[str] = []
    for key, value in values.items():
        if key not in known or key in ("help", "debug"):
            raise ValueError(f"{path}: field {key!r} is not a clara-train flag (see clara-train --help)")
        action = known[key]
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise ValueError(f"{path}: field {key!r} is a switch: write true or false, not {value!r}")
            if value:
                argv.append(f"--{key}")
            elif key in NEGATABLE:
                argv.append(NEGATABLE[key])
        elif isinstance(value, list):
            argv += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, bool):
            raise ValueError(f"{path}: field {key!r} takes a value, not {value!r}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def load_stage_config(stage: str, argv: Sequence[str]) -> TrainConfig:
    """`CONFIG [--flag value ...]` -> the run's TrainConfig, checked like clara-train's flags."""
    if not argv or argv[0].startswith("-"):
        raise ValueError(f"give a config first: a .toml file or a shipped config name, e.g. "
                         f"python -m clara.recipes.{stage_module(stage)} smollm2-cpu [--flag value ...]")
    path = config_path(argv[0], stage)
    values = read_config(path)
    if values.get("stage", stage) != stage:
        raise ValueError(f"{path}: field 'stage' is {values['stage']!r}, but this script trains {stage}")
    values["stage"] = stage
    overrides = switches_turned_off(list(argv[1:]), values)
    if "--stage" in overrides:
        raise ValueError(f"--stage: this script trains {stage}; run the script of the other stage")
    return parse_args(config_flags(values, path) + overrides)


def switches_turned_off(overrides: list[str], values: dict[str, Any]) -> list[str]:
    """Takes each `--no_NAME` for a switch NAME out of `overrides` and sets values[NAME] = False
    (clara-train itself has --no_ forms only for the switches that default to on)."""
    actions = build_parser()._actions
    parser_options = {opt for action in actions for opt in action.option_strings}
    switches = {a.dest for a in actions if a.nargs == 0 and a.dest not in ("help", "debug")}
    kept = []
    for token in overrides:
        name = token[len("--no_"):] if token.startswith("--no_") else None
        if name is not None and token not in parser_options:
            if name not in switches:
                raise ValueError(f"{token}: {name!r} is not a clara-train switch (see clara-train --help)")
            values[name] = False
        else:
            kept.append(token)
    return kept


def stage_module(stage: str) -> str:
    return {"stage2_pretrain_retrieval": "stage2_retrieval"}.get(stage, stage)


def run_stage(stage: str, argv: Sequence[str] | None) -> int:
    """A stage script's run: its config, then the loop every stage shares (exit 130 on Ctrl-C)."""
    from clara.command import INTERRUPTED
    from clara.recipes.loop import train

    config = load_stage_config(stage, list(sys.argv[1:] if argv is None else argv))
    if config.dry_run:
        from clara.recipes.planner import plan_from_args

        print(plan_from_args(config))
        return 0
    return INTERRUPTED if train(config).interrupted else 0
