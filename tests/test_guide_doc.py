"""docs/guide.md maps the training guide onto this repository: its commands must stay runnable as
written. The stage commands are parsed as their scripts parse them (config + overrides), the
NutriBot command as `nutribot` parses it, and the guide's own row format validates for every stage."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from clara.data.formats import read_stage_file
from clara.recipes.stage_config import load_stage_config
from nutribot.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
GUIDE_DOC = (ROOT / "docs" / "guide.md").read_text()


def shell_lines() -> list[str]:
    blocks = re.findall(r"```\n(.*?)```", GUIDE_DOC, flags=re.DOTALL)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_three_stage_commands_parse_with_the_guides_file_and_chain():
    commands = [shlex.split(line) for line in shell_lines() if line.startswith("python -m clara.recipes.stage")]
    stages = [c[2].rsplit(".", 1)[1] for c in commands]
    assert stages == ["stage1", "stage1_2", "stage2"]
    configs = [load_stage_config(stage, c[3:]) for stage, c in zip(stages, commands)]
    assert all(cfg.dataset == "nutrition_train.jsonl" for cfg in configs)
    assert configs[0].pretrain == "microsoft/phi-2"
    # each stage starts from the previous one's run folder
    assert [cfg.pretrain for cfg in configs[1:]] == [cfg.save_path for cfg in configs[:-1]]


def test_the_released_model_command_parses():
    line = next(line for line in shell_lines() if line.startswith("nutribot serve"))
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert (args.command, args.dtype, args.quantize) == ("serve", "bf16", "int8")
    assert args.checkpoint == "apple/CLaRa-7B-E2E:compression-16"


@pytest.mark.parametrize("stage", ["stage1", "stage1_2", "stage2"])
def test_the_guides_row_format_is_a_stage_file(tmp_path, stage):
    path = tmp_path / "nutrition_train.jsonl"
    row = {"question": "Which foods are high in vitamin K?",
           "docs": ["Cooked kale, spinach and collard greens are among the richest sources of vitamin K."],
           "gold_answer": "Leafy greens such as kale, spinach and collard greens."}
    path.write_text(json.dumps(row) + "\n")
    examples = read_stage_file(path, stage, 1)
    assert len(examples) == 1
