"""clara.data as a whole: its command lines explain themselves, its modules read the stage table
instead of naming stages, no module shares its name with a folder, and JSON field types are
checked (and worded) one way."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

from clara.data import bm25_baseline, cli, conversion, validate
from clara.data.formats import FORMAT_CLASS, Stage1Example, Stage2Example, example_class
from clara.data.json_fields import FieldChecker, json_type_name
from clara.stages import DATA_FORMATS, STAGE_NAMES, STAGES, get_stage

DATA = Path(__file__).resolve().parents[1] / "data"


# ----------------------------------------------------------------------------- command lines


def _parser(module_name: str) -> argparse.ArgumentParser:
    return importlib.import_module(module_name).build_parser()


@pytest.mark.parametrize("sub", sorted(cli.SUBCOMMANDS))
def test_each_subcommand_help_names_both_ways_to_run_it(sub, capsys):
    module_name = cli.SUBCOMMANDS[sub][0]
    with pytest.raises(SystemExit) as exited:
        cli.main([sub, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: clara-data {sub} "), out
    assert f"Also runs as: python -m {module_name} [same flags]" in out, out
    assert _parser(module_name).format_help() == out


@pytest.mark.parametrize("sub", sorted(cli.SUBCOMMANDS))
def test_every_flag_of_every_subcommand_is_explained(sub):
    parser = _parser(cli.SUBCOMMANDS[sub][0])
    assert parser.description and len(parser.description.split()) >= 10
    for action in parser._actions:
        assert action.help and len(action.help.split()) >= 3, (sub, action.option_strings or action.dest)
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            # Every flag with a default says what it is.
            assert "%(default)s" in action.help or "default" in action.help, (sub, action.option_strings)


def test_the_overview_lists_every_subcommand_with_its_python_m_form(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub, (module_name, summary) in cli.SUBCOMMANDS.items():
        assert f"  {sub} " in out and summary in out and f"python -m {module_name} " in out, sub


def test_no_subcommand_prints_the_overview_to_stderr_and_exits_2(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: clara-data SUBCOMMAND")


def test_an_unknown_subcommand_is_named(capsys):
    assert cli.main(["convert"]) == 2
    assert "unknown subcommand 'convert'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the stage table


def test_the_commands_offer_the_stages_of_the_table():
    choices = {a.dest: a.choices for a in validate.build_parser()._actions}
    assert tuple(choices["stage"]) == STAGE_NAMES
    bm25_choices = {a.dest: a.choices for a in bm25_baseline.build_parser()._actions}["stage"]
    assert tuple(bm25_choices) == tuple(n for n, s in STAGES.items() if s.data_format == "stage2")
    assert "stage2_pretrain_retrieval" in bm25_choices


def test_every_data_format_has_an_example_class_and_output_file():
    assert set(FORMAT_CLASS) == set(DATA_FORMATS)
    assert conversion.OUTPUT_STAGES == DATA_FORMATS
    for name in DATA_FORMATS:
        # A format is named after a stage that uses it: its output file is validated as that stage.
        assert get_stage(name).data_format == name
    for name in STAGE_NAMES:
        assert example_class(name) is FORMAT_CLASS[get_stage(name).data_format]
    assert example_class("stage2_pretrain_retrieval") is Stage2Example
    assert example_class("stage1") is Stage1Example


def _stage_literals(path: Path) -> list[str]:
    """Comparisons with a stage name, and literal collections of two or more stage names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            operands = []
            for operand in (node.left, *node.comparators):
                operands += operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            if any(isinstance(o, ast.Constant) and o.value in STAGE_NAMES for o in operands):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = [e for e in node.elts if isinstance(e, ast.Constant) and e.value in STAGE_NAMES]
            if len(names) >= 2:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict):
            names = [k for k in node.keys if isinstance(k, ast.Constant) and k.value in STAGE_NAMES]
            if len(names) >= 2:
                found.append(f"{path.name}:{node.lineno}: a dict keyed by stage names")
    return found


def test_data_neither_compares_with_stage_names_nor_lists_them():
    hits = [hit for path in sorted(DATA.glob("*.py")) for hit in _stage_literals(path)]
    assert hits == []


# ----------------------------------------------------------------------------- layout


def test_no_module_shares_its_name_with_a_folder():
    modules = {path.stem for path in DATA.glob("*.py")}
    folders = {path.name for path in DATA.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert "nutrition_kb" in folders
    assert modules & folders == set()


# ----------------------------------------------------------------------------- JSON field types


@pytest.mark.parametrize("value, name", [
    (None, "null"), (True, "boolean"), (3, "number"), (2.5, "number"), ("s", "string"), ([1], "array"),
    ({"a": 1}, "object")])
def test_json_type_names(value, name):
    assert json_type_name(value) == name


def test_field_checker_reports_each_problem_with_its_field():
    problems: list[tuple[str, str]] = []
    check = FieldChecker(lambda field, message: problems.append((field, message)))
    assert check.string("x", "a") == "x"
    assert check.string("  ", "a", empty_ok=True) == "  "
    assert check.string(" ", "b") is None
    assert check.string(5, "c") is None
    assert check.string_list(["x", "y"], "d") == ("x", "y")
    assert check.string_list("x", "e", bare_string_ok=True) == ("x",)
    assert check.string_list("x", "f") is None
    assert check.string_list([], "g") is None
    assert check.string_list([], "g2", empty_ok=True) == ()
    assert check.string_list(["x", "", 3], "h") is None
    assert check.object([], "i") is None
    assert check.array({}, "j", "integers") is None
    assert check.integer(4, "k") == 4
    assert check.integer(True, "l") is None
    assert problems == [
        ("b", "empty string"),
        ("c", "expected a string, got number"),
        ("f", "expected a list of strings, got string"),
        ("g", "empty list"),
        ("h[1]", "empty string"),
        ("h[2]", "expected a string, got number"),
        ("i", "expected a JSON object, got array"),
        ("j", "expected a list of integers, got object"),
        ("l", "expected an integer, got boolean"),
    ]


def test_one_type_checker_in_data():
    # isinstance checks on decoded JSON live in json_fields; the readers call it. (Other modules
    # may still test types of their own Python values, but none re-implements the JSON names.)
    for path in sorted(DATA.glob("*.py")):
        if path.name == "json_fields.py":
            continue
        source = path.read_text(encoding="utf-8")
        assert "def json_type_name" not in source, path.name
        assert '"got " + type(' not in source and "got {type(" not in source, path.name
