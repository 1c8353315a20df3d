"""The answer-NLL evaluation (clara.recipes.nll, clara-eval --nll) on a tiny random Clara: each
condition's value equals the model's own loss on that prompt, and the summary follows its formula."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clara.data.formats import Stage1_2Example, Stage1Example, write_stage_file
from clara.prompts import collate_prompts, text_context_prompt
from clara.recipes import evaluate as E
from clara.recipes.nll import CONDITIONS, NLLResult, answer_nll
from tiny_models import DOCS, randomize, tiny_clara

ROWS = [Stage1_2Example("What carries oxygen?", (DOCS[0], DOCS[1]), "Iron.", ("Iron",), id="a"),
        Stage1_2Example("What helps absorb iron?", (DOCS[1], DOCS[2]), "Vitamin C.", ("Vitamin C",), id="b"),
        Stage1_2Example("What builds bones?", (DOCS[2], DOCS[0]), "Calcium.", ("Calcium",), id="c")]


@pytest.fixture(scope="module")
def model():
    m = tiny_clara("stage1_2")
    randomize(m, seed=4)  # nonzero LoRA B: the adapters change the answers
    return m.eval()


def loss_of(model, examples) -> float:
    """The training forward's LM loss of one batch: sum over answer tokens / answer tokens."""
    with torch.no_grad():
        _, aux = model(model.collate(examples))
    return float(aux["lm_loss"])


def test_compressed_and_shuffled_are_the_training_loss_of_own_and_neighbour_documents(model):
    result = answer_nll(model, ROWS, batch_size=2, progress=False)
    assert [set(row) for row in result.per_row] == [set(CONDITIONS)] * 3
    for i, row in enumerate(ROWS):
        assert result.per_row[i]["compressed"] == pytest.approx(loss_of(model, [row]), abs=1e-5)
        neighbour = ROWS[(i + 1) % 3]
        swapped = Stage1_2Example(row.question, neighbour.docs, row.answer, row.gold_answers)
        assert result.per_row[i]["shuffled"] == pytest.approx(loss_of(model, [swapped]), abs=1e-5)


def test_no_context_and_full_text_read_the_same_template_without_slots(model):
    result = answer_nll(model, ROWS, batch_size=3, progress=False)
    for i, row in enumerate(ROWS):
        for condition, context in (("no_context", ""), ("full_text", "\n".join(row.docs))):
            prompt = text_context_prompt(row, model.tokenizer, model.config, context, model.texts)
            assert prompt.n_slots == 0
            batch = collate_prompts([prompt], model.tokenizer.pad_id)
            with torch.no_grad():
                loss_sum, n = model.lm_loss(batch, model.embed(batch.input_ids))
            assert result.per_row[i][condition] == pytest.approx(float(loss_sum) / n, abs=1e-5)
    empty = text_context_prompt(ROWS[0], model.tokenizer, model.config, "", model.texts)
    assert "Background:\n\n\nQuestion:What carries oxygen?" in model.tokenizer.decode(empty.prompt_ids)


def test_the_summary_follows_its_formula():
    rows = [{"compressed": 2.0, "shuffled": 3.0, "no_context": 4.0, "full_text": 1.0},
            {"compressed": 3.0, "shuffled": 3.5, "no_context": 4.0, "full_text": 2.0}]
    means = NLLResult(rows).means()
    assert means["nll_compressed"] == 2.5 and means["nll_no_context"] == 4.0 and means["nll_full_text"] == 1.5
    assert means["retained"] == pytest.approx((4.0 - 2.5) / (4.0 - 1.5))
    assert means["own_vs_shuffled"] == pytest.approx(0.75) and means["n"] == 2


def test_stage1_rows_use_the_qa_template_and_skip_paraphrase_rows(model):
    rows = [Stage1Example("qa", ("What does iron do?",), ("It carries oxygen.",), (DOCS[0],)),
            Stage1Example("paraphrase", (), (DOCS[1],), (DOCS[1],)),
            Stage1Example("qa", ("What helps?",), ("Vitamin C.",), (DOCS[1],))]
    result = answer_nll(model, rows, progress=False)
    assert len(result.per_row) == 2
    with pytest.raises(ValueError, match="at least 2"):
        answer_nll(model, rows[:2], progress=False)


def test_clara_eval_nll_writes_the_metrics(model, tmp_path, monkeypatch, capsys):
    data = tmp_path / "s12.jsonl"
    write_stage_file(data, ROWS, "stage1_2")
    monkeypatch.setattr(E, "load_model", lambda *args, **kwargs: (model, False))
    assert E.main(["--model", "m", "--data", str(data), "--stage", "stage1_2", "--nll",
                   "--output", str(tmp_path / "nll.jsonl")]) == 0
    metrics = json.loads((tmp_path / "nll.metrics.json").read_text())["metrics"]["nll"]
    assert set(metrics) >= {"nll_compressed", "nll_no_context", "nll_full_text", "retained", "own_vs_shuffled"}
    assert all(math.isfinite(v) for v in metrics.values())
    rows = [json.loads(line) for line in (tmp_path / "nll.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert "| nll | retained |" in capsys.readouterr().out
    assert E.main(["--model", "m", "--data", str(data), "--stage", "stage2", "--nll"]) == 2
