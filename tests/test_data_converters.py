"""PubMedQA and MedQuAD converters: valid files, the documented rules, determinism, bad input."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from clara.data import medquad, pubmedqa
from clara.data.conversion import cap_words, dev_keys, place_among
from clara.data.formats import ValidationError, read_stage_file, validate_stage_file
from clara.data.medquad import MedQuADRecord, MedQuADSettings, convert_medquad, load_medquad, pack_passages
from clara.data.pubmedqa import fit_to_k, load_pubmedqa

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PUBMEDQA = SHARED_DATA / "pubmedqa" / "pqal_trainval.json"
MEDQUAD = SHARED_DATA / "medquad" / "medquad_qa.jsonl"
FILES = [f"{stage}_{split}.jsonl" for stage in ("stage1", "stage1_2", "stage2") for split in ("train", "dev")]
STAGE_OF_FILE = {"stage1": ("stage1", None), "stage1_2": ("stage1_2", 5), "stage2": ("stage2_pretrain_retrieval", 5)}


def need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")


def read_outputs(out_dir: Path) -> dict[str, list]:
    """Every output file, checked by the validator (stage2 files must carry pos_index)."""
    examples = {}
    for name in FILES:
        stage, top_k = STAGE_OF_FILE[name.rsplit("_", 1)[0]]
        report = validate_stage_file(out_dir / name, stage, top_k)
        assert report.problems == [], name
        examples[name] = report.examples
    return examples


# --- shared helpers -------------------------------------------------------------------------


def test_dev_keys_fraction_and_determinism():
    keys = [f"k{i}" for i in range(200)]
    dev = dev_keys(keys, 0.1, seed=3)
    assert len(dev) == 20 and dev <= set(keys)
    assert dev_keys(list(reversed(keys)), 0.1, seed=3) == dev  # input order does not matter
    assert dev_keys(keys, 0.1, seed=4) != dev
    assert dev_keys(keys, 0.0, seed=3) == set()
    assert len(dev_keys(keys[:3], 0.01, seed=0)) == 1  # at least one when the fraction is positive
    with pytest.raises(ValueError, match=r"dev_fraction must be in \[0, 1\)"):
        dev_keys(keys, 1.0, seed=0)


def test_place_among_reports_where_the_positives_went():
    docs, positions = place_among(["P1", "P2"], ["n1", "n2", "n3"], random.Random(0))
    assert sorted(docs) == ["P1", "P2", "n1", "n2", "n3"]
    assert [docs[i] for i in positions] in (["P1", "P2"], ["P2", "P1"])
    assert all(docs[i].startswith("n") for i in range(5) if i not in positions)


def test_cap_words():
    assert cap_words("a  b\nc d", 0) == "a  b\nc d"
    assert cap_words("a  b\nc d", 4) == "a  b\nc d"
    assert cap_words("a  b\nc d", 3) == "a b c"


# --- PubMedQA -------------------------------------------------------------------------------


def test_fit_to_k_merges_the_smallest_adjacent_pair_then_pads():
    contexts = ["a b", "c", "d e f", "g"]
    # pairs: 2+1=3, 1+3=4, 3+1=4 -> merge 0,1; then 3+3=6, 3+1=4 -> merge 1,2
    assert fit_to_k(contexts, 2, []) == (["a b c", "d e f g"], 2, 0)
    assert fit_to_k(contexts, 3, []) == (["a b c", "d e f", "g"], 1, 0)
    assert fit_to_k(contexts, 6, ["p1", "p2", "p3"]) == (contexts + ["p1", "p2"], 0, 2)
    with pytest.raises(ValueError, match="need 2 padding documents, only 1 available"):
        fit_to_k(contexts, 6, ["p1"])


def test_pubmedqa_conversion_writes_valid_files_that_follow_the_rules(tmp_path):
    need(PUBMEDQA)
    source = json.loads(PUBMEDQA.read_text(encoding="utf-8"))
    out = tmp_path / "pubmedqa"
    assert pubmedqa.main(["--input", str(PUBMEDQA), "--out_dir", str(out)]) == 0
    examples = read_outputs(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == {name: len(examples[name]) for name in FILES}

    n_dev = round(0.1 * len(source))
    for stage in ("stage1", "stage1_2", "stage2"):
        assert len(examples[f"{stage}_dev.jsonl"]) == n_dev
        assert len(examples[f"{stage}_train.jsonl"]) == len(source) - n_dev
    dev_ids = {example.id for example in examples["stage2_dev.jsonl"]}
    assert {example.id for example in examples["stage1_dev.jsonl"]} == dev_ids
    assert not dev_ids & {example.id for example in examples["stage2_train.jsonl"]}

    for example in examples["stage1_train.jsonl"] + examples["stage1_dev.jsonl"]:
        record = source[example.id]
        assert example.docs == (" ".join(record["CONTEXTS"]),)
        assert example.questions == (record["QUESTION"], record["QUESTION"] + " Answer yes, no or maybe.")
        assert example.answers == (record["LONG_ANSWER"], record["final_decision"])

    for example in examples["stage1_2_train.jsonl"] + examples["stage1_2_dev.jsonl"]:
        contexts = source[example.id]["CONTEXTS"]
        own = min(len(contexts), 5)
        # the record's own text comes first and whole; padding (if any) follows
        assert " ".join(example.docs[:own]) == " ".join(contexts)
        assert not set(example.docs[own:]) & set(contexts)
        assert example.answer == source[example.id]["final_decision"]
        assert example.gold_answers == (source[example.id]["final_decision"],)

    positions = set()
    for example in examples["stage2_train.jsonl"] + examples["stage2_dev.jsonl"]:
        [position] = example.pos_index
        positions.add(position)
        assert example.docs[position] == " ".join(source[example.id]["CONTEXTS"])
        assert len(example.docs) == 20 == len(set(example.docs))
    assert len(positions) > 10  # the positive is not always in the same place


def test_pubmedqa_is_deterministic_and_the_seed_changes_the_split(tmp_path):
    need(PUBMEDQA)
    args = ["--input", str(PUBMEDQA), "--max_rows", "60", "--num_candidates", "8", "--answer_style", "both"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert pubmedqa.main(args + ["--out_dir", str(tmp_path / name), "--seed", seed]) == 0
    for name in FILES + ["summary.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "stage2_dev.jsonl").read_bytes() != (tmp_path / "c" / "stage2_dev.jsonl").read_bytes()
    example = read_stage_file(tmp_path / "a" / "stage1_2_train.jsonl", "stage1_2", top_k=5)[0]
    assert example.answer.split(". ", 1)[0] in ("Yes", "No", "Maybe")


def test_pubmedqa_reads_jsonl_and_huggingface_layouts(tmp_path):
    rows = [{"pubid": 11, "question": "Q1?", "context": {"contexts": ["c1", "c2"]}, "long_answer": "L1",
             "final_decision": "yes"},
            {"pmid": "12", "QUESTION": "Q2?", "CONTEXTS": ["d1"], "LONG_ANSWER": "", "final_decision": "No"}]
    path = tmp_path / "pq.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = load_pubmedqa(path)
    assert [(r.pmid, r.question, r.contexts, r.long_answer, r.decision) for r in records] == [
        ("11", "Q1?", ("c1", "c2"), "L1", "yes"), ("12", "Q2?", ("d1",), "", "no")]


def test_pubmedqa_bad_input_lists_every_problem(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"question": "q", "contexts": [], "final_decision": "perhaps"}\nnot json\n'
                     '{"pmid": 1, "question": "q", "contexts": ["c"], "final_decision": "yes"}\n'
                     '{"pmid": 1, "question": "q", "contexts": ["c"], "final_decision": "yes"}\n')
    with pytest.raises(ValidationError) as raised:
        load_pubmedqa(jsonl)
    assert [str(problem) for problem in raised.value.problems] == [
        f"{jsonl}:1: contexts: empty list",
        f"{jsonl}:1: final_decision: 'perhaps' is not one of yes, no, maybe",
        f"{jsonl}:2: <row>: invalid JSON: Expecting value (column 1)",
        f"{jsonl}:4: id: '1' repeats an earlier record",
    ]
    mapping = tmp_path / "ori.json"
    mapping.write_text(json.dumps({"123": {"CONTEXTS": ["c"], "final_decision": "yes"}}))
    with pytest.raises(ValidationError) as raised:
        load_pubmedqa(mapping)
    assert [str(problem) for problem in raised.value.problems] == [
        f'{mapping}: ["123"].QUESTION: missing (also accepted: question)']


def test_pubmedqa_field_types_are_worded_like_the_stage_files(tmp_path):
    # The same words as clara-data validate (clara.data.json_fields), whichever layout a field is in.
    jsonl = tmp_path / "types.jsonl"
    jsonl.write_text(json.dumps({"question": 3, "context": {"contexts": ["c", ""]}, "long_answer": ["x"],
                                 "final_decision": True}) + "\n" + json.dumps([1]) + "\n"
                     + json.dumps({"question": "q", "contexts": ["c"]}) + "\n")
    with pytest.raises(ValidationError) as raised:
        load_pubmedqa(jsonl)
    assert [str(problem) for problem in raised.value.problems] == [
        f"{jsonl}:1: question: expected a string, got number",
        f"{jsonl}:1: context.contexts[1]: empty string",
        f"{jsonl}:1: long_answer: expected a string, got array",
        f"{jsonl}:1: final_decision: expected a string, got boolean",
        f"{jsonl}:2: <record>: expected a JSON object, got array",
        f"{jsonl}:3: final_decision: missing (also accepted: FINAL_DECISION, decision)",
    ]
    top = tmp_path / "top.json"
    top.write_text("3")
    with pytest.raises(ValidationError) as raised:
        load_pubmedqa(top)
    assert [str(problem) for problem in raised.value.problems] == [
        f"{top}: <file>: expected an object or an array at the top, got number"]


def test_medquad_missing_and_mistyped_fields(tmp_path):
    path = tmp_path / "mq.jsonl"
    path.write_text('{"answer": "a"}\n{"question": ["q"], "answer": "a", "source": null}\n')
    with pytest.raises(ValidationError) as raised:
        load_medquad(path)
    assert [str(problem) for problem in raised.value.problems] == [
        f"{path}:1: question: missing",
        f"{path}:2: question: expected a string, got array",
        f"{path}:2: source: expected a string, got null",
    ]


def test_pubmedqa_hf_without_datasets_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SystemExit, match="--hf needs the `datasets` package and a network connection"):
        pubmedqa.main(["--hf", "pubmed_qa/pqa_labeled", "--out_dir", str(tmp_path)])


def test_pubmedqa_refuses_too_few_records_for_the_candidates(tmp_path, capsys):
    need(PUBMEDQA)
    assert pubmedqa.main(["--input", str(PUBMEDQA), "--max_rows", "10", "--out_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("clara-data pubmedqa: error: 10 records cannot fill 20 stage2 candidates; "
                                       "lower --num_candidates\n")


# --- MedQuAD --------------------------------------------------------------------------------


def test_pack_passages_greedy_in_order():
    words = [50, 120, 40, 300, 10]
    assert pack_passages([0, 1, 2, 3, 4], words, 200) == [[0, 1], [2], [3], [4]]
    assert pack_passages([0, 2, 4], words, 200) == [[0, 2, 4]]
    assert pack_passages([0, 2, 4], words, 0) == [[0], [2], [4]]


def test_medquad_conversion_writes_valid_files_that_follow_the_rules(tmp_path):
    need(MEDQUAD)
    out = tmp_path / "medquad"
    assert medquad.main(["--input", str(MEDQUAD), "--out_dir", str(out), "--max_rows", "400"]) == 0
    examples = read_outputs(out)
    records = load_medquad(MEDQUAD, max_rows=400)
    capped = {record.line: cap_words(record.answer, 200) for record in records}
    answers_of: dict[str, set[str]] = {}
    for record in records:
        answers_of.setdefault(record.question_key, set()).add(capped[record.line])

    stage1 = examples["stage1_train.jsonl"] + examples["stage1_dev.jsonl"]
    dropped = json.loads((out / "summary.json").read_text())["counters"]["stage1_repeated_questions_dropped"]
    assert sum(len(example.questions) for example in stage1) == len(records) - dropped
    asked = {" ".join(question.casefold().split()) for example in stage1 for question in example.questions}
    assert asked == set(answers_of)  # every question is asked somewhere
    assert any(len(example.questions) > 1 for example in stage1)  # several answers of a topic packed
    for example in stage1:
        assert len(example.docs[0].split()) <= 200
        for question, answer in zip(example.questions, example.answers):
            assert answer in example.docs[0]
            assert answer in answers_of[" ".join(question.casefold().split())]

    for example in examples["stage1_2_train.jsonl"] + examples["stage1_2_dev.jsonl"]:
        key = " ".join(example.question.casefold().split())
        assert example.answer in example.docs and example.answer in answers_of[key]
        assert len(set(example.docs) & answers_of[key]) == 1  # distractors are never answers

    for example in examples["stage2_train.jsonl"] + examples["stage2_dev.jsonl"]:
        key = " ".join(example.question.casefold().split())
        assert {example.docs[i] for i in example.pos_index} == answers_of[key]
        assert set(example.gold_answers) == answers_of[key] and example.answer == example.gold_answers[0]
        assert len(example.docs) == 20 == len(set(example.docs))

    # whole topics are split: every row's topic (found through its id, the input line) is on one side
    topic_of = {f"line{record.line}": record.topic for record in records}
    topics = {split: {topic_of[example.id] for stage in ("stage1", "stage1_2", "stage2")
                      for example in examples[f"{stage}_{split}.jsonl"]} for split in ("train", "dev")}
    assert topics["dev"] and topics["train"] and not topics["dev"] & topics["train"]
    assert len(topics["dev"]) == json.loads((out / "summary.json").read_text())["counters"]["topics_dev"]


def test_medquad_is_deterministic(tmp_path):
    need(MEDQUAD)
    args = ["--input", str(MEDQUAD), "--max_rows", "150", "--num_candidates", "10", "--top_k", "3"]
    for name in ("a", "b"):
        assert medquad.main(args + ["--out_dir", str(tmp_path / name)]) == 0
    for name in FILES + ["summary.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_medquad_repeated_question_gives_a_multi_positive_row_and_holes_are_dropped():
    answer = "word " * 30
    records = [MedQuADRecord(1, "GARD", "Flu", "What is (are) Flu ?", "Flu is an infection. " + answer),
               MedQuADRecord(2, "GHR", "Flu", "what is (are) flu ?", "Influenza is a virus. " + answer),
               MedQuADRecord(3, "CDC", "http://x", "What is (are)  ?", "Orphan text. " + answer)]
    records += [MedQuADRecord(10 + i, "NIH", f"Topic {i}", f"What is topic {i} ?", f"Topic {i} text.")
                for i in range(8)]
    outputs = convert_medquad(records, MedQuADSettings(top_k=3, num_candidates=6, dev_fraction=0.0))
    assert outputs.counters["records_dropped_empty_template"] == 1
    [flu] = [example for example in outputs.examples[("stage2", "train")] if example.id == "line1"]
    assert {flu.docs[i] for i in flu.pos_index} == {records[0].answer, records[1].answer}
    assert flu.answer == records[0].answer
    assert not any(example.id == "line3" for example in outputs.examples[("stage1_2", "train")])
    # the two Flu questions differ only in case: one stage2 row, but each source its own stage1_2 row
    assert sum(example.question.lower().startswith("what is (are) flu") for example in
               outputs.examples[("stage2", "train")]) == 1
    assert sum(example.question.lower().startswith("what is (are) flu") for example in
               outputs.examples[("stage1_2", "train")]) == 2


def test_medquad_bad_input_lists_every_problem(tmp_path):
    path = tmp_path / "mq.jsonl"
    path.write_text('{"question": "q", "answer": ""}\n[1]\n{"question": "q", "answer": "a", "focus": 3}\n')
    with pytest.raises(ValidationError) as raised:
        load_medquad(path)
    assert [str(problem) for problem in raised.value.problems] == [
        f"{path}:1: answer: empty string",
        f"{path}:2: <row>: expected a JSON object, got array",
        f"{path}:3: focus: expected a string, got number",
    ]
