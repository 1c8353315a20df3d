"""Answer and retrieval metrics: EM, cover-EM ("acc"), token F1, PubMedQA labels, recall@k, MRR.

Answer metrics compare a prediction with every reference answer and keep the best score (the
official CLaRa evaluation scores only the first reference, which under-counts questions with
several accepted answers).

Normalisation (the SQuAD convention the official code also uses): the exact strings "True" and
"False" become "yes" and "no"; then lower-case, drop ASCII punctuation, drop the articles a, an,
the, and collapse whitespace.

- exact match: normalised prediction == normalised reference.
- cover-EM, the paper's "acc": the normalised reference occurs in the normalised prediction as a
  whole-word substring (" no " is not found in " not sure "), so "the answer is Paris" covers
  "Paris". The official code instead checks that every reference token appears somewhere in the
  prediction, in any order; whole-word substring is the paper's definition.
- token F1: harmonic mean of token precision and recall (tokens counted with multiplicity); if
  either side normalises to "yes", "no" or "noanswer" and the two differ, F1 is 0.
- an empty normalised text only matches an empty normalised text (all three metrics give 1 when
  both are empty and 0 when only one is), so an empty prediction scores 0 against real answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_BOOLEAN_WORDS = {"True": "yes", "False": "no"}
_YES_NO = {"yes", "no", "noanswer"}
PUBMEDQA_LABELS = ("yes", "no", "maybe")
RETRIEVAL_KS = (1, 3, 5)


def normalize_answer(text: str) -> str:
    """Map boolean words, lower-case, strip punctuation and articles, collapse whitespace."""
    text = _BOOLEAN_WORDS.get(text, text).lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _references(golds: str | Sequence[str]) -> list[str]:
    references = [golds] if isinstance(golds, str) else list(golds)
    if not references:
        raise ValueError("no reference answers given")
    return references


def _exact(prediction: str, reference: str) -> float:
    return float(prediction == reference)


def _cover(prediction: str, reference: str) -> float:
    if not reference:
        return float(not prediction)
    return float(f" {reference} " in f" {prediction} ")


def _f1(prediction: str, reference: str) -> float:
    if (prediction in _YES_NO or reference in _YES_NO) and prediction != reference:
        return 0.0
    predicted, expected = prediction.split(), reference.split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _best(score, prediction: str, golds: str | Sequence[str]) -> float:
    normalized = normalize_answer(prediction)
    return max(score(normalized, normalize_answer(reference)) for reference in _references(golds))


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    return _best(_exact, prediction, golds)


def cover_exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if any normalised reference is a whole-word substring of the normalised prediction."""
    return _best(_cover, prediction, golds)


def token_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """The best token F1 of the prediction against any reference (yes/no rule above)."""
    return _best(_f1, prediction, golds)


def answer_scores(predictions: Sequence[str], golds: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean EM, cover-EM ("acc") and F1 over questions; `golds[i]` are question i's references."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not predictions:
        raise ValueError("no predictions to score")
    n = len(predictions)
    return {
        "em": sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
        "acc": sum(cover_exact_match(p, g) for p, g in zip(predictions, golds)) / n,
        "f1": sum(token_f1(p, g) for p, g in zip(predictions, golds)) / n,
        "n": n,
    }


# --- PubMedQA yes / no / maybe --------------------------------------------------------------

_ANSWER_IS = re.compile(r"\banswer(?: is)? (yes|no|maybe)\b")


def extract_pubmedqa_label(prediction: str) -> str | None:
    """The yes/no/maybe decision stated in a free-text prediction, or None if there is none.

    Rule, on the normalised text (see `normalize_answer`), first match wins:
    1. it starts with "yes", "no" or "maybe" as a whole word ("No, the trial ..." -> no);
    2. it says "answer is X" or "answer X" (the colon of "Answer: maybe" is dropped as
       punctuation) -> the first such X;
    3. exactly one of the three words occurs anywhere as a whole word -> that word;
    4. otherwise (none, or several different ones) -> None; scorers count None as wrong.
    """
    words = normalize_answer(prediction).split()
    if not words:
        return None
    if words[0] in PUBMEDQA_LABELS:
        return words[0]
    stated = _ANSWER_IS.search(" ".join(words))
    if stated:
        return stated.group(1)
    present = {word for word in words if word in PUBMEDQA_LABELS}
    return present.pop() if len(present) == 1 else None


def pubmedqa_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of yes/no/maybe decisions extracted from free-text predictions.

    Per-class F1 = 2TP / (2TP + FP + FN); macro-F1 averages it over the classes that occur in the
    gold labels or the extracted predictions (a class absent from both is skipped, as sklearn's
    macro average does). A prediction with no extractable label (None) is wrong for accuracy and
    a false negative for its gold class. Also returns each class's F1 and the unparsed count.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not predictions:
        raise ValueError("no predictions to score")
    gold = [label.strip().lower() for label in labels]
    for index, label in enumerate(gold):
        if label not in PUBMEDQA_LABELS:
            raise ValueError(f"label {index}: {labels[index]!r} is not one of yes, no, maybe")
    predicted = [extract_pubmedqa_label(text) for text in predictions]
    result: dict[str, float] = {
        "accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold),
        "unparsed": sum(p is None for p in predicted),
        "n": len(gold),
    }
    class_f1 = []
    for label in PUBMEDQA_LABELS:
        true_pos = sum(p == label and g == label for p, g in zip(predicted, gold))
        false_pos = sum(p == label and g != label for p, g in zip(predicted, gold))
        false_neg = sum(p != label and g == label for p, g in zip(predicted, gold))
        denominator = 2 * true_pos + false_pos + false_neg
        if denominator:
            result[f"f1_{label}"] = 2 * true_pos / denominator
            class_f1.append(result[f"f1_{label}"])
    result["macro_f1"] = sum(class_f1) / len(class_f1)
    return result


# --- retrieval ------------------------------------------------------------------------------


def retrieval_scores(rankings: Sequence[Sequence[int]], relevant: Sequence[Iterable[int]],
                     ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """recall@k, precision@k (k in `ks`) and MRR, each computed per query, then averaged.

    `rankings[i]` lists query i's candidate ids best first; `relevant[i]` its positive ids.
    recall@k = |relevant in top k| / |relevant|; precision@k = |relevant in top k| / k;
    reciprocal rank = 1 / (1-based rank of the first relevant id), 0 if none is ranked.
    """
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings for {len(relevant)} relevance sets")
    if not rankings:
        raise ValueError("no queries to score")
    totals = {f"recall@{k}": 0.0 for k in ks} | {f"precision@{k}": 0.0 for k in ks} | {"mrr": 0.0}
    for query, (ranking, positives) in enumerate(zip(rankings, relevant)):
        positives = set(positives)
        if not positives:
            raise ValueError(f"query {query} has no relevant candidate")
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"query {query}: the ranking repeats a candidate")
        for k in ks:
            hits = len(positives.intersection(ranking[:k]))
            totals[f"recall@{k}"] += hits / len(positives)
            totals[f"precision@{k}"] += hits / k
        first_hit = next((rank for rank, doc in enumerate(ranking, start=1) if doc in positives), None)
        totals["mrr"] += 1.0 / first_hit if first_hit else 0.0
    n = len(rankings)
    return {name: value / n for name, value in totals.items()} | {"n": n}
