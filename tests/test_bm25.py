"""BM25: tokenisation, scores worked out by hand, ranking ties, and the stage2 baseline CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clara.data import bm25_baseline
from clara.data.bm25 import BM25Index, tokenize, top_indices
from clara.data.formats import Stage2Example, write_stage_file

DOCS = ["apple banana apple", "banana cherry", "cherry date egg fig"]  # lengths 3, 2, 4; avgdl 3


def test_tokenize_is_casefolded_alphanumeric_without_stopwords():
    assert tokenize("The Vitamin-K intake of 2 patients, under_score ÉCOLE!") == [
        "vitamin", "k", "intake", "2", "patients", "score", "école"]
    assert tokenize("what is the") == []


def test_scores_match_the_formula_by_hand():
    index = BM25Index(DOCS, k1=1.2, b=0.75)
    # apple: df 1 -> idf = ln(1 + 2.5 / 1.5); doc 0: tf 2, |d| = avgdl -> 2 * 2.2 / (2 + 1.2) = 1.375
    assert index.scores("apple").tolist() == pytest.approx([math.log(1 + 2.5 / 1.5) * 1.375, 0.0, 0.0])
    # banana, cherry: df 2 -> idf = ln(1.6). tf 1 with norm 1.2 * (0.25 + 0.75 |d| / 3):
    # doc 0 (|d| 3): 2.2 / 2.2 = 1; doc 1 (|d| 2): 2.2 / 1.9 for each term; doc 2 (|d| 4): 2.2 / 2.5
    idf = math.log(1.6)
    assert index.scores("banana cherry?").tolist() == pytest.approx(
        [idf * 1.0, 2 * idf * 2.2 / 1.9, idf * 2.2 / 2.5])
    assert index.top_k("banana cherry", 3) == [1, 0, 2]
    # a repeated query term counts twice; unknown and stop words count nothing
    assert index.scores("apple apple the kiwi").tolist() == pytest.approx((2 * index.scores("apple")).tolist())


def test_b_zero_ignores_length_and_k1_zero_ignores_tf():
    no_length = BM25Index(DOCS, k1=1.2, b=0.0)
    idf = math.log(1.6)
    assert no_length.scores("cherry").tolist() == pytest.approx([0.0, idf, idf])
    binary = BM25Index(DOCS, k1=0.0, b=0.75)
    assert binary.scores("apple").tolist() == pytest.approx([math.log(1 + 2.5 / 1.5), 0.0, 0.0])
    with pytest.raises(ValueError, match="b must be in"):
        BM25Index(DOCS, b=1.5)


def test_top_k_breaks_ties_by_lower_index_and_honours_exclusions():
    scores = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.0])
    assert top_indices(scores, 3) == [1, 3, 2]
    assert top_indices(scores, 4) == [1, 3, 2, 4]
    assert top_indices(scores, 3, exclude=[3, 1]) == [2, 4, 0]
    assert top_indices(scores, 10) == [1, 3, 2, 4, 0, 5]
    assert top_indices(scores, 10, exclude=range(6)) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4).map(float), min_size=1, max_size=30), st.integers(1, 35),
       st.sets(st.integers(0, 29), max_size=5))
def test_top_k_equals_a_full_stable_sort(values, k, exclude):
    scores = np.array(values)
    exclude = {i for i in exclude if i < len(values)}
    expected = [i for i in sorted(range(len(values)), key=lambda i: -values[i]) if i not in exclude][:k]
    assert top_indices(scores, k, exclude) == expected


def test_rank_orders_a_subset_with_corpus_statistics():
    index = BM25Index(DOCS)
    assert index.rank("banana", [2, 0, 1]) == [1, 0, 2]  # the shorter banana doc first; ties keep order


def test_bm25_baseline_on_a_hand_made_stage2_file(tmp_path, capsys):
    rows = [Stage2Example("apple", (DOCS[1], DOCS[0], DOCS[2]), "a", ("a",), (1,)),
            Stage2Example("banana", (DOCS[1], DOCS[0], DOCS[2]), "b", ("b",), (2,))]
    path = tmp_path / "stage2_dev.jsonl"
    write_stage_file(path, rows, "stage2")
    # row 1: only the positive has "apple" -> rank 1. row 2: the positive has no "banana";
    # "banana cherry" (shorter) outranks "apple banana apple" -> the positive is 3rd.
    assert bm25_baseline.bm25_rankings(rows) == [[1, 0, 2], [0, 1, 2]]
    prefix = tmp_path / "results" / "bm25"
    assert bm25_baseline.main([str(path), "--stage", "stage2", "--out", str(prefix)]) == 0
    [result] = json.loads((tmp_path / "results" / "bm25.json").read_text())
    assert result["queries"] == 2 and result["candidates_mean"] == 3.0
    assert result["metrics"] == {
        "recall@1": 0.5, "recall@3": 1.0, "recall@5": 1.0,
        "precision@1": 0.5, "precision@3": pytest.approx(1 / 3), "precision@5": pytest.approx(0.2),
        "mrr": pytest.approx((1 + 1 / 3) / 2), "n": 2}
    table = (tmp_path / "results" / "bm25.md").read_text()
    assert table.splitlines()[2] == (f"| {path} | 2 | 3.0 | 0.5000 | 1.0000 | 1.0000 | 0.5000 | 0.3333 | "
                                     "0.2000 | 0.6667 |")
    assert capsys.readouterr().out == table


def test_bm25_baseline_needs_pos_index(tmp_path, capsys):
    path = tmp_path / "e2e.jsonl"
    path.write_text(json.dumps({"question": "q", "docs": ["a", "b"], "answer": "x"}) + "\n")
    assert bm25_baseline.main([str(path), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == (f"clara-data bm25: error: {path}: 1 rows have no pos_index (first: row 1); "
                                       "retrieval metrics need the positives\n")
