"""One stage table (clara/stages.py): its facts, written out here independently, and every reader
of stages (model, checkpoint loading, loop, prompts, CLI, config, official import, evaluator)
going through it rather than comparing stage names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import clara.config
from clara.config import ClaraConfig, ConfigError
from clara.recipes import evaluate
from clara.recipes.args import build_parser
from clara.stages import DECODER, ENCODER, QUERY, EVAL_STAGES, STAGE_NAMES, get_stage

ROOT = Path(__file__).resolve().parents[1]

# name -> (typed rows, generates, retrieves, compressor trained, evaluable)
FACTS = {
    "stage1": (True, True, False, True, True),
    "stage1_2": (False, True, False, True, True),
    "stage2": (False, True, True, False, True),
    "stage2_pretrain_retrieval": (False, False, True, False, False),
}


def test_the_table_holds_the_four_stages_with_their_facts():
    assert STAGE_NAMES == tuple(FACTS)
    for name, expected in FACTS.items():
        s = get_stage(name)
        assert (s.typed_rows, s.generates, s.retrieves, s.compressor_trained, s.evaluable) == expected, name
    assert EVAL_STAGES == ("stage1", "stage1_2", "stage2")
    with pytest.raises(ValueError, match=r"unknown stage 'stage3'; expected one of stage1, stage1_2, stage2, "
                                         r"stage2_pretrain_retrieval"):
        get_stage("stage3")


@pytest.mark.parametrize("stage, saved_stage, loaded", [
    ("stage1_2", "stage1", [ENCODER]),  # instruction tuning starts a fresh generator on the compressor
    ("stage1_2", "stage1_2", [ENCODER, DECODER]),
    ("stage1", "stage1", [ENCODER, DECODER]),
    ("stage2", "stage1", [ENCODER, DECODER]),
    ("stage2", "stage2", [ENCODER, DECODER, QUERY]),
])
def test_which_saved_adapters_a_stage_loads(stage, saved_stage, loaded):
    saved = (ENCODER, DECODER, QUERY) if saved_stage.startswith("stage2") else (ENCODER, DECODER)
    assert get_stage(stage).adapters_to_load(saved_stage, saved) == loaded


def test_the_command_lines_and_the_config_offer_the_table_s_stages():
    train_choices = {a.dest: a.choices for a in build_parser()._actions}["stage"]
    eval_choices = {a.dest: a.choices for a in evaluate.build_parser()._actions}["stage"]
    assert tuple(train_choices) == STAGE_NAMES and tuple(eval_choices) == EVAL_STAGES
    assert not hasattr(clara.config, "TRAINING_STAGES")  # no copy of the table left behind
    with pytest.raises(ConfigError, match=r"^training_stage must be one of stage1, stage1_2, stage2, "
                                          r"stage2_pretrain_retrieval, got 'stage3'$"):
        ClaraConfig(training_stage="stage3")


def _stage_name_comparisons(source: str, label: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = []
        for operand in (node.left, *node.comparators):
            operands += operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
        if any(isinstance(o, ast.Constant) and o.value in STAGE_NAMES for o in operands):
            found.append(f"{label}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_stage_fact_is_a_comparison_with_a_stage_name_outside_the_table():
    files = [p for folder in ("clara", "recipes") for p in sorted((ROOT / folder).rglob("*.py"))
             if p != ROOT / "clara" / "stages.py"]
    hits = [hit for p in files for hit in _stage_name_comparisons(p.read_text(encoding="utf-8"),
                                                                   str(p.relative_to(ROOT)))]
    assert hits == []


def test_the_scan_finds_planted_comparisons():
    source = "def f(stage):\n    return stage in ('stage1_2',) or stage.data_format == 'stage1' or stage == 'x'\n"
    assert _stage_name_comparisons(source, "planted.py") == [
        "planted.py:2: stage in ('stage1_2',)", "planted.py:2: stage.data_format == 'stage1'"]
