"""Answer, PubMedQA and retrieval metrics against values worked out by hand."""

from __future__ import annotations

import pytest

from clara.data.metrics import (answer_scores, cover_exact_match, exact_match, extract_pubmedqa_label,
                          normalize_answer, pubmedqa_scores, retrieval_scores, token_f1)


@pytest.mark.parametrize("text, expected", [
    ("The  Cat's, hat!", "cats hat"),
    ("An apple a day", "apple day"),
    ("True", "yes"),
    ("False", "no"),
    ("true", "true"),  # only the exact Python-style booleans are mapped
    ("  ", ""),
    ("Theatre", "theatre"),  # articles only as whole words
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_alias():
    assert exact_match("Paris", ["London", "paris."]) == 1.0  # the official code would say 0
    assert exact_match("Paris", "London") == 0.0
    assert exact_match("the Paris", ["paris"]) == 1.0


def test_cover_exact_match_is_a_whole_word_substring():
    assert cover_exact_match("The capital is Paris, France.", ["London", "paris"]) == 1.0
    assert cover_exact_match("The capital is Paris, France.", "paris france") == 1.0
    assert cover_exact_match("France, Paris", "paris france") == 0.0  # order matters
    assert cover_exact_match("I am not sure", "no") == 0.0  # "no" is not a word of it
    assert cover_exact_match("Nope", "no") == 0.0


def test_token_f1_by_hand():
    # "big red dog" vs "red dog barked": 2 common of 3 and 3 -> P = R = 2/3 -> F1 = 2/3.
    assert token_f1("the big red dog", "a red dog barked") == pytest.approx(2 / 3)
    # best alias: "red dog" vs "red dog barked": P = 1, R = 2/3 -> F1 = 0.8
    assert token_f1("red dog", ["cat", "red dog barked", "blue"]) == pytest.approx(0.8)
    # tokens count with multiplicity: "dog dog" vs "dog": common 1, P = 1/2, R = 1 -> 2/3
    assert token_f1("dog dog", "dog") == pytest.approx(2 / 3)
    assert token_f1("cat", "dog") == 0.0


def test_token_f1_yes_no_rule():
    assert token_f1("yes", "yes it is") == 0.0  # prediction is yes/no and differs
    assert token_f1("yes it is", "yes") == 0.0  # reference is yes/no and differs
    assert token_f1("No.", "no") == 1.0
    assert token_f1("True", "yes") == 1.0
    assert token_f1("noanswer", "no answer") == 0.0
    assert token_f1("no", ["maybe", "No"]) == 1.0


def test_empty_predictions_and_references():
    assert exact_match("", "x") == 0.0
    assert cover_exact_match("", "x") == 0.0
    assert token_f1("", "x") == 0.0
    assert token_f1("x", "the") == 0.0  # the reference normalises to nothing
    assert cover_exact_match("anything", "the") == 0.0  # an empty reference covers nothing
    assert exact_match("", "the") == 1.0 and cover_exact_match("a", "the") == 1.0 and token_f1("", "") == 1.0
    with pytest.raises(ValueError, match="no reference answers"):
        exact_match("x", [])


def test_answer_scores_average_over_questions():
    predictions = ["Paris", "", "red dog"]
    golds = [["London", "paris"], ["x"], "big red dog"]
    # em: 1, 0, 0; acc: 1, 0, 0 ("big red dog" is not inside "red dog");
    # f1: 1, 0, P = 2/2, R = 2/3 -> 0.8
    assert answer_scores(predictions, golds) == {"em": pytest.approx(1 / 3), "acc": pytest.approx(1 / 3),
                                                 "f1": pytest.approx(1.8 / 3), "n": 3}
    with pytest.raises(ValueError, match="2 predictions for 3 questions"):
        answer_scores(predictions[:2], golds)


@pytest.mark.parametrize("prediction, label", [
    ("Yes, it does.", "yes"),
    ("no", "no"),
    ("MAYBE - the evidence is mixed", "maybe"),
    ("The answer is maybe.", "maybe"),
    ("Answer: No", "no"),
    ("Based on the trial, the answer is yes; no harm was seen", "yes"),
    ("The data suggest a benefit, so yes.", "yes"),
    ("There is no evidence; yes or no is unclear", None),  # two different labels, no statement
    ("Probably not.", None),
    ("", None),
    ("Yesterday it rained", None),  # whole words only
])
def test_extract_pubmedqa_label(prediction, label):
    assert extract_pubmedqa_label(prediction) == label


def test_pubmedqa_scores_by_hand():
    gold = ["yes", "yes", "no", "maybe"]
    predictions = ["Yes.", "No, it does not.", "no", "It is unclear."]  # -> yes, no, no, None
    # yes: TP 1, FP 0, FN 1 -> 2/3; no: TP 1, FP 1, FN 0 -> 2/3; maybe: TP 0, FN 1 -> 0
    scores = pubmedqa_scores(predictions, gold)
    assert scores == {"accuracy": 0.5, "unparsed": 1, "n": 4, "f1_yes": pytest.approx(2 / 3),
                      "f1_no": pytest.approx(2 / 3), "f1_maybe": 0.0, "macro_f1": pytest.approx(4 / 9)}


def test_pubmedqa_macro_f1_skips_a_class_absent_from_gold_and_predictions():
    scores = pubmedqa_scores(["yes", "no"], ["Yes", "no"])
    assert scores["macro_f1"] == 1.0 and "f1_maybe" not in scores
    with pytest.raises(ValueError, match="label 1: 'perhaps' is not one of yes, no, maybe"):
        pubmedqa_scores(["yes", "no"], ["yes", "perhaps"])


def test_retrieval_scores_are_averaged_per_query():
    rankings = [[2, 0, 1, 3, 4], [0, 1, 2, 3, 4, 5]]
    relevant = [[0, 3], {5}]
    # query 1: hits@1 = 0, @3 = 1 (doc 0), @5 = 2 -> recall 0, 1/2, 1; precision 0, 1/3, 2/5; RR 1/2
    # query 2: doc 5 at rank 6 -> recall 0, 0, 0; precision 0, 0, 0; RR 1/6
    assert retrieval_scores(rankings, relevant) == {
        "recall@1": 0.0, "recall@3": 0.25, "recall@5": 0.5,
        "precision@1": 0.0, "precision@3": pytest.approx(1 / 6), "precision@5": pytest.approx(0.2),
        "mrr": pytest.approx(1 / 3), "n": 2}
    # pooled over queries recall@5 would be 2/3; per-query averaging gives 1/2.


def test_retrieval_scores_unranked_positive_and_custom_ks():
    scores = retrieval_scores([[1, 2]], [[0]], ks=(1, 2))
    assert scores == {"recall@1": 0.0, "recall@2": 0.0, "precision@1": 0.0, "precision@2": 0.0,
                      "mrr": 0.0, "n": 1}


def test_retrieval_scores_refuse_bad_input():
    with pytest.raises(ValueError, match="query 0 has no relevant candidate"):
        retrieval_scores([[0, 1]], [[]])
    with pytest.raises(ValueError, match="query 0: the ranking repeats a candidate"):
        retrieval_scores([[0, 0]], [[0]])
    with pytest.raises(ValueError, match="1 rankings for 2 relevance sets"):
        retrieval_scores([[0]], [[0], [1]])
