"""Stage formats: reading with every accepted alias, exact problem messages, atomic writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clara.data import validate
from clara.data.formats import (Problem, Stage1_2Example, Stage1Example, Stage2Example, ValidationError,
                          read_stage_file, validate_stage_file, write_stage_file)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OFFICIAL_STAGE1 = SHARED_DATA / "clara-example" / "pretrain_data.jsonl"

GOOD_STAGE2 = {"question": "q", "docs": ["a", "b", "c"], "answer": "x", "pos_index": [1]}


def write_lines(tmp_path: Path, lines: list[str | bytes], name: str = "rows.jsonl") -> str:
    path = tmp_path / name
    with open(path, "wb") as stream:
        for line in lines:
            stream.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            stream.write(b"\n")
    return str(path)


def problems_of(tmp_path: Path, rows: list, stage: str, top_k: int | None = None) -> list[str]:
    lines = [row if isinstance(row, (str, bytes)) else json.dumps(row) for row in rows]
    path = write_lines(tmp_path, lines)
    return [str(problem) for problem in validate_stage_file(path, stage, top_k).problems]


# Each case: (rows, stage, top_k, the exact problems expected; {f} is the file path).
BROKEN_INPUTS = {
    "invalid JSON": (['{"question": "q",, }'], "stage1_2", None,
                     ["{f}:1: <row>: invalid JSON: Expecting property name enclosed in double quotes (column 18)"]),
    "row is not an object": (["[1, 2]"], "stage2", None,
                             ["{f}:1: <row>: expected a JSON object, got array"]),
    "invalid UTF-8": ([b'{"question": "\xff"}'], "stage2", None,
                      ["{f}:1: <row>: not valid UTF-8 (byte 15 of the line)"]),
    "missing docs": ([{"question": "q", "answer": "x"}], "stage1_2", None,
                     ["{f}:1: docs: missing (also accepted: context, content)"]),
    "docs not a list": ([{"question": "q", "docs": "one doc", "answer": "x"}], "stage1_2", None,
                        ["{f}:1: docs: expected a list of strings, got string"]),
    "docs empty": ([{"question": "q", "content": [], "answer": "x"}], "stage1_2", None,
                   ["{f}:1: content: empty list"]),
    "doc not a string": ([{"question": "q", "docs": ["a", 7], "answer": "x"}], "stage1_2", None,
                         ["{f}:1: docs[1]: expected a string, got number"]),
    "doc empty": ([{"question": "q", "context": ["a", "  "], "answer": "x"}], "stage1_2", None,
                  ["{f}:1: context[1]: empty string"]),
    "two document fields": ([{"question": "q", "docs": ["a"], "context": ["b"], "answer": "x"}],
                            "stage1_2", None,
                            ["{f}:1: context: given together with 'docs'; keep only one document field"]),
    "bad data_type": ([{"data_type": "summary", "question": ["q"], "answers": ["a"], "docs": ["d"]}],
                      "stage1", None, ["{f}:1: data_type: 'summary' is not one of 'qa', 'paraphrase'"]),
    "stage1 count mismatch": ([{"data_type": "qa", "question": ["q1", "q2"], "answers": ["a"],
                                "docs": ["d"]}], "stage1", None,
                              ["{f}:1: answers: 1 answers for 2 questions"]),
    "stage1 missing question": ([{"data_type": "qa", "answers": ["a"], "docs": ["d"]}], "stage1", None,
                                ["{f}:1: question: missing"]),
    "stage1 empty question": ([{"question": ["q", ""], "answers": ["a", "b"], "docs": ["d"]}],
                              "stage1", None, ["{f}:1: question[1]: empty string"]),
    "stage1 missing answers": ([{"question": ["q"], "docs": ["d"]}], "stage1", None,
                               ["{f}:1: answers: missing (also accepted: golden_answers, gold_answer, answer)"]),
    "stage1 row read as stage1_2": ([{"question": ["q"], "answers": ["a"], "docs": ["d"]}],
                                    "stage1_2", None,
                                    ["{f}:1: question: expected a string, got array (a list of questions "
                                     "is the stage1 layout; is --stage stage1_2 right?)"]),
    "missing question": ([{"docs": ["a"], "answer": "x"}], "stage1_2", None, ["{f}:1: question: missing"]),
    "missing answer": ([{"question": "q", "docs": ["a"]}], "stage1_2", None,
                       ["{f}:1: answer: missing (also accepted: gold_answer, golden_answers, answers)"]),
    "answer not a string": ([{"question": "q", "docs": ["a"], "answer": 42}], "stage1_2", None,
                            ["{f}:1: answer: expected a string, got number"]),
    "golden_answers empty": ([{"question": "q", "docs": ["a"], "golden_answers": []}], "stage1_2", None,
                             ["{f}:1: golden_answers: empty list"]),
    "docs count != top_k": ([{"question": "q", "docs": ["a", "b", "c"], "answer": "x"}], "stage1_2", 5,
                            ["{f}:1: docs: 3 documents, expected --top_k 5"]),
    "docs count differs between rows": ([{"question": "q", "docs": ["a", "b"], "answer": "x"},
                                         {"question": "q", "docs": ["a"], "answer": "x"}], "stage1_2", None,
                                        ["{f}:2: docs: 1 documents, but line 1 has 2 (every row needs "
                                         "the same number; --top_k checks a given value)"]),
    "pos_index out of range": ([{**GOOD_STAGE2, "pos_index": [3]}], "stage2", None,
                               ["{f}:1: pos_index[0]: 3 is out of range for 3 docs (0..2)"]),
    "negative pos_index": ([{**GOOD_STAGE2, "pos_index": [0, -1]}], "stage2", None,
                           ["{f}:1: pos_index[1]: -1 is out of range for 3 docs (0..2)"]),
    "pos_index boolean": ([{**GOOD_STAGE2, "pos_index": [True]}], "stage2", None,
                          ["{f}:1: pos_index[0]: expected an integer, got boolean"]),
    "pos_index repeated": ([{**GOOD_STAGE2, "pos_index": [2, 2]}], "stage2", None,
                           ["{f}:1: pos_index[1]: 2 repeats an earlier entry"]),
    "pos_index empty": ([{**GOOD_STAGE2, "pos_index": []}], "stage2", None,
                        ["{f}:1: pos_index: empty list (a row needs at least one positive candidate)"]),
    "pos_index not a list": ([{**GOOD_STAGE2, "pos_index": 1}], "stage2", None,
                             ["{f}:1: pos_index: expected a list of integers, got number"]),
    "pos_index missing for retrieval pretraining": (
        [{"question": "q", "docs": ["a"], "answer": "x"}], "stage2_pretrain_retrieval", None,
        ["{f}:1: pos_index: missing (required for stage2_pretrain_retrieval: its loss needs the positives)"]),
    "fewer candidates than top_k": ([GOOD_STAGE2], "stage2", 5,
                                    ["{f}:1: docs: 3 candidates, fewer than --top_k 5"]),
    "id of a wrong type": ([{**GOOD_STAGE2, "id": [1]}], "stage2", None,
                           ["{f}:1: id: expected a string or an integer, got array"]),
    "empty file": ([], "stage2", None, ["{f}: <file>: no rows"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_INPUTS))
def test_each_kind_of_broken_input_gets_its_exact_message(tmp_path, case):
    rows, stage, top_k, expected = BROKEN_INPUTS[case]
    path = str(tmp_path / "rows.jsonl")
    assert problems_of(tmp_path, rows, stage, top_k) == [line.format(f=path) for line in expected]


def test_missing_file_is_reported_not_raised(tmp_path):
    path = str(tmp_path / "absent.jsonl")
    report = validate_stage_file(path, "stage2")
    assert [str(problem) for problem in report.problems] == [f"{path}: <file>: cannot read: No such file or directory"]


def test_all_problems_of_a_file_are_reported_at_once_in_line_order(tmp_path):
    rows = [json.dumps(GOOD_STAGE2), "{oops", "", json.dumps({**GOOD_STAGE2, "pos_index": [9], "answer": ""}),
            json.dumps(GOOD_STAGE2)]
    path = write_lines(tmp_path, rows)
    report = validate_stage_file(path, "stage2")
    assert [str(problem) for problem in report.problems] == [
        f"{path}:2: <row>: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{path}:4: answer: empty string",
        f"{path}:4: pos_index[0]: 9 is out of range for 3 docs (0..2)",
    ]
    assert report.n_rows == 4  # the blank line is not a row
    assert len(report.examples) == 2
    with pytest.raises(ValidationError) as raised:
        read_stage_file(path, "stage2")
    assert raised.value.problems == report.problems
    assert str(raised.value).splitlines()[0] == "3 problems:"
    assert str(raised.value).splitlines()[1:] == [str(problem) for problem in report.problems]


def test_error_message_is_capped_but_problems_are_all_kept(tmp_path):
    path = write_lines(tmp_path, ["[]"] * 130)
    with pytest.raises(ValidationError) as raised:
        read_stage_file(path, "stage2")
    lines = str(raised.value).splitlines()
    assert len(raised.value.problems) == 130
    assert lines[0] == "130 problems:"
    assert len(lines) == 1 + 100 + 1
    assert lines[-1] == "... and 30 more (python -m clara.data.validate lists them all)"


def test_aliases_give_target_and_references(tmp_path):
    rows = [
        {"question": "q1", "context": ["d1"], "answer": "target", "gold_answer": "ref"},
        {"question": "q2", "content": ["d2"], "golden_answers": ["r1", "r2"]},
        {"question": "q3", "docs": ["d3"], "answers": ["r3"], "gold_answer": ["r4", "r3"]},
        {"question": "q4", "docs": ["d4"], "answer": "only", "id": 17},
    ]
    path = write_lines(tmp_path, [json.dumps(row) for row in rows])
    examples = read_stage_file(path, "stage1_2", top_k=1)
    assert examples == [
        Stage1_2Example("q1", ("d1",), "target", ("ref",)),
        Stage1_2Example("q2", ("d2",), "r1", ("r1", "r2")),
        Stage1_2Example("q3", ("d3",), "r4", ("r4", "r3")),  # gold_answer first, repeats dropped
        Stage1_2Example("q4", ("d4",), "only", ("only",), id="17"),
    ]


def test_stage1_accepts_bare_strings_and_paraphrase_rows_without_questions(tmp_path):
    rows = [{"question": "q", "answer": "a", "docs": ["d"]},  # data_type defaults to qa
            {"data_type": "paraphrase", "answers": ["restated"], "docs": ["d"]},
            {"data_type": "paraphrase", "question": "", "golden_answers": ["p"], "docs": ["e"]},
            # the official reader ignores a paraphrase row's question, whatever it holds
            {"data_type": "paraphrase", "question": [""], "answers": ["r"], "docs": ["f"]},
            {"data_type": "paraphrase", "question": ["restate this"], "answers": ["s"], "docs": ["g"]}]
    path = write_lines(tmp_path, [json.dumps(row) for row in rows])
    assert read_stage_file(path, "stage1") == [
        Stage1Example("qa", ("q",), ("a",), ("d",)),
        Stage1Example("paraphrase", (), ("restated",), ("d",)),
        Stage1Example("paraphrase", (), ("p",), ("e",)),
        Stage1Example("paraphrase", (), ("r",), ("f",)),
        Stage1Example("paraphrase", (), ("s",), ("g",)),
    ]
    assert validate.main([str(path), "--stage", "stage1"]) == 0


# The official reader (preprocess_data) takes `question` only when data_type != "paraphrase";
# a paraphrase row's question is never read, so no value of it can make the row invalid.
IGNORED_PARAPHRASE_QUESTIONS = [[""], "", None, [], ["", "  "], [1, {"a": 2}], 7, {"q": "x"}, True]


@pytest.mark.parametrize("question", IGNORED_PARAPHRASE_QUESTIONS, ids=json.dumps)
def test_clara_data_validate_accepts_any_question_on_a_paraphrase_row(tmp_path, capsys, question):
    row = {"data_type": "paraphrase", "question": question, "answers": ["restated"], "docs": ["d"]}
    path = write_lines(tmp_path, [json.dumps(row)])
    assert validate.main([path, "--stage", "stage1"]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: stage1, 1 rows, 0 problems; docs per row 1..1 (mean 1.00); 0 QA pairs, 1 paraphrase rows"]
    assert read_stage_file(path, "stage1") == [Stage1Example("paraphrase", (), ("restated",), ("d",))]


@pytest.mark.parametrize("row, expected", [
    # A qa row's question is read by the official reader: [""] is still an empty question there.
    ({"data_type": "qa", "question": [""], "answers": ["a"], "docs": ["d"]}, ["question[0]: empty string"]),
    ({"question": [""], "answers": ["a"], "docs": ["d"]}, ["question[0]: empty string"]),  # qa by default
    # Only the exact data_type "paraphrase" skips the question; on any other row it is checked.
    ({"data_type": "Paraphrase", "question": [""], "answers": ["a"], "docs": ["d"]},
     ["data_type: 'Paraphrase' is not one of 'qa', 'paraphrase'", "question[0]: empty string"]),
    ({"data_type": None, "answers": ["a"], "docs": ["d"]},
     ["data_type: expected a string, got null", "question: missing"]),
    # The paraphrase target (the first answer) is still required.
    ({"data_type": "paraphrase", "question": [""], "answers": [""], "docs": ["d"]}, ["answers[0]: empty string"]),
    ({"data_type": "paraphrase", "question": [""], "docs": ["d"]},
     ["answers: missing (also accepted: golden_answers, gold_answer, answer)"]),
])
def test_what_a_paraphrase_row_does_not_excuse(tmp_path, row, expected):
    assert problems_of(tmp_path, [row], "stage1") == [f"{tmp_path / 'rows.jsonl'}:1: {e}" for e in expected]


def test_stage2_pos_index_is_optional_like_the_official_end_to_end_files(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"question": "q", "docs": ["a", "b"], "gold_answer": "g"})])
    assert read_stage_file(path, "stage2") == [Stage2Example("q", ("a", "b"), "g", ("g",), ())]


def test_the_official_stage1_example_file_reads(tmp_path):
    if not OFFICIAL_STAGE1.exists():
        pytest.skip(f"shared data not found at {OFFICIAL_STAGE1}")
    raw = [json.loads(line) for line in OFFICIAL_STAGE1.read_text(encoding="utf-8").splitlines()]
    examples = read_stage_file(OFFICIAL_STAGE1, "stage1", top_k=1)
    assert len(examples) == len(raw)
    assert [example.questions for example in examples] == [tuple(row["question"]) for row in raw]
    assert [example.answers for example in examples] == [tuple(row["answers"]) for row in raw]
    assert [example.docs for example in examples] == [tuple(row["docs"]) for row in raw]


def test_write_then_read_gives_the_same_examples(tmp_path):
    examples = [Stage2Example("q", ("a", "b", "é"), "x", ("x", "y"), (2, 0), "id-1"),
                Stage2Example("r", ("c", "d", "e"), "z", ("z",), (1,))]
    path = tmp_path / "out" / "stage2.jsonl"
    assert write_stage_file(path, examples, "stage2_pretrain_retrieval", top_k=3) == 2
    assert read_stage_file(path, "stage2_pretrain_retrieval", top_k=3) == examples
    assert "é" in path.read_text(encoding="utf-8")  # written as UTF-8, not \\u escapes
    assert sorted(os.listdir(path.parent)) == ["stage2.jsonl"]  # no temporary file left


def test_invalid_examples_are_not_written_and_the_old_file_survives(tmp_path):
    path = tmp_path / "stage1_2.jsonl"
    path.write_text("old\n", encoding="utf-8")
    bad = [Stage1_2Example("q", ("a", "b"), "x", ("x",)), Stage1_2Example("q", ("a",), "", ("x",))]
    with pytest.raises(ValidationError) as raised:
        write_stage_file(path, bad, "stage1_2", top_k=2)
    assert [str(problem) for problem in raised.value.problems] == [
        f"{path}:2: answer: empty string"]
    with pytest.raises(ValidationError) as raised:
        write_stage_file(path, [Stage1Example("qa", ("q",), ("a",), ("d",))], "stage2")
    assert raised.value.problems == [Problem(str(path), 1, "<row>",
                                             "Stage1Example is not a stage2 example (expected Stage2Example)")]
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["stage1_2.jsonl"]


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'stage3'"):
        validate_stage_file(tmp_path / "x.jsonl", "stage3")


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda text: text.strip())


@st.composite
def stage2_examples(draw):
    docs = draw(st.lists(texts, min_size=1, max_size=6))
    positives = draw(st.lists(st.integers(0, len(docs) - 1), min_size=1, max_size=len(docs), unique=True))
    golds = draw(st.lists(texts, min_size=1, max_size=3, unique=True))
    return Stage2Example(draw(texts), tuple(docs), golds[0], tuple(golds), tuple(positives),
                         draw(st.none() | texts))


@settings(max_examples=40, deadline=None)
@given(st.lists(stage2_examples(), min_size=1, max_size=5))
def test_any_valid_stage2_examples_round_trip(tmp_path_factory, examples):
    path = tmp_path_factory.mktemp("roundtrip") / "rows.jsonl"
    write_stage_file(path, examples, "stage2_pretrain_retrieval")
    assert read_stage_file(path, "stage2_pretrain_retrieval") == examples


def test_validate_cli_lists_problems_and_exits_1(tmp_path, capsys):
    path = write_lines(tmp_path, [json.dumps(GOOD_STAGE2), json.dumps({**GOOD_STAGE2, "pos_index": [5]}), "7"])
    assert validate.main([path, "--stage", "stage2"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:2: pos_index[0]: 5 is out of range for 3 docs (0..2)",
        f"{path}:3: <row>: expected a JSON object, got number",
        f"{path}: stage2, 3 rows, 2 problems; docs per row 3..3 (mean 3.00); positives per row 1..1",
    ]


def test_validate_cli_summarizes_a_clean_file_and_exits_0(tmp_path, capsys):
    rows = [{"question": ["q1", "q2"], "answers": ["a1", "a2"], "docs": ["d"]},
            {"data_type": "paraphrase", "answers": ["p"], "docs": ["e"]}]
    path = write_lines(tmp_path, [json.dumps(row) for row in rows])
    assert validate.main([path, "--stage", "stage1", "--top_k", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: stage1, 2 rows, 0 problems; docs per row 1..1 (mean 1.00); 2 QA pairs, 1 paraphrase rows"]
