"""BM25 Okapi ranking over an in-memory corpus, with a fixed, deterministic tokeniser.

Score of document d for query q (Robertson & Zaragoza 2009, eq. 3.15, with the query-term
frequency weight taken to its k3 -> infinity limit, i.e. a repeated query term counts again):

    score(d, q) = sum over query tokens t of  idf(t) * tf(t, d) * (k1 + 1)
                                              / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (n_docs - df(t) + 0.5) / (df(t) + 0.5))        (never negative)

`tf` is the count of t in d, `|d|` the number of tokens in d, `avgdl` their mean over the corpus.

Tokenisation: Unicode case-folding, then maximal runs of letters and digits (`[^\\W_]+`), then
the English stopwords of `STOPWORDS` are dropped. No stemming, no randomness: the same text
always gives the same tokens.

The index is a compressed sparse layout built with numpy: for each term, the ids of the
documents containing it and the term's precomputed BM25 weight in each. A query adds, for each
of its terms, that term's weights into a dense score vector: the cost is the total length of
the query terms' posting lists, not the size of the corpus, so the converters can score every
question against every document of a dataset. Ties in score rank the lower document index first.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

TOKEN_PATTERN = re.compile(r"[^\W_]+")

# Function words that carry no topic; our own short list (no library needed).
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself
just me more most my myself no nor not of off on once only or other our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these
they this those through to too under until up very was we were what when where which while who
whom why will with would you your yours yourself yourselves
""".split())


def tokenize(text: str) -> list[str]:
    """Lower-cased letter/digit runs of `text`, stopwords removed."""
    return [token for token in TOKEN_PATTERN.findall(text.casefold()) if token not in STOPWORDS]


class BM25Index:
    """BM25 Okapi over a fixed list of documents; documents are referred to by their index."""

    def __init__(self, documents: Sequence[str], k1: float = 1.2, b: float = 0.75):
        if k1 < 0:
            raise ValueError(f"k1 must be >= 0, got {k1}")
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"b must be in [0, 1], got {b}")
        self.k1, self.b = k1, b
        self.n_docs = len(documents)
        self.vocabulary: dict[str, int] = {}
        term_ids: list[int] = []
        doc_ids: list[int] = []
        counts: list[int] = []
        lengths = np.zeros(self.n_docs, dtype=np.float64)
        for doc_id, text in enumerate(documents):
            tokens = tokenize(text)
            lengths[doc_id] = len(tokens)
            for term, count in Counter(tokens).items():
                term_ids.append(self.vocabulary.setdefault(term, len(self.vocabulary)))
                doc_ids.append(doc_id)
                counts.append(count)
        self.doc_lengths = lengths
        self.avgdl = float(lengths.mean()) if self.n_docs and lengths.sum() > 0 else 1.0

        terms = np.asarray(term_ids, dtype=np.int64)
        order = np.argsort(terms, kind="stable")  # group postings by term, doc ids ascending
        self.posting_docs = np.asarray(doc_ids, dtype=np.int64)[order]
        tf = np.asarray(counts, dtype=np.float64)[order]
        df = np.bincount(terms, minlength=len(self.vocabulary)).astype(np.float64)
        self.posting_starts = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)
        self.idf = np.log1p((self.n_docs - df + 0.5) / (df + 0.5))
        norm = k1 * (1.0 - b + b * lengths[self.posting_docs] / self.avgdl)
        term_of_posting = terms[order]
        self.posting_weights = self.idf[term_of_posting] * tf * (k1 + 1.0) / (tf + norm)

    def term_ids(self, query: str) -> list[int]:
        """Vocabulary ids of the query's tokens (unknown tokens dropped, repeats kept)."""
        return [self.vocabulary[token] for token in tokenize(query) if token in self.vocabulary]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query`: float64 [n_docs]."""
        scores = np.zeros(self.n_docs, dtype=np.float64)
        for term in self.term_ids(query):
            start, end = self.posting_starts[term], self.posting_starts[term + 1]
            # A term's doc ids are distinct, so this fancy-indexed add touches each doc once.
            scores[self.posting_docs[start:end]] += self.posting_weights[start:end]
        return scores

    def top_k(self, query: str, k: int, exclude: Iterable[int] = ()) -> list[int]:
        """Indices of the k best documents (fewer if the corpus is smaller), best first."""
        return top_indices(self.scores(query), k, exclude)

    def rank(self, query: str, doc_ids: Sequence[int]) -> list[int]:
        """`doc_ids` reordered best first (ties keep their given order); corpus-wide statistics."""
        scores = self.scores(query)
        return sorted(doc_ids, key=lambda doc_id: -scores[doc_id])


def top_indices(scores: np.ndarray, k: int, exclude: Iterable[int] = ()) -> list[int]:
    """The k highest-scoring indices, best first, lower index first among equal scores."""
    excluded = np.fromiter(set(exclude), dtype=np.int64)
    if excluded.size:
        scores = scores.copy()
        scores[excluded] = -np.inf
    k = min(k, scores.size - excluded.size)
    if k <= 0:
        return []
    if k < scores.size:
        # The k-th best score; everything above it is in, and the lowest indices at it fill up.
        kth = np.partition(scores, scores.size - k)[scores.size - k]
        above = np.flatnonzero(scores > kth)
        at = np.flatnonzero(scores == kth)[: k - above.size]
        chosen = np.concatenate([above, at])
    else:
        chosen = np.arange(scores.size)
    order = np.lexsort((chosen, -scores[chosen]))
    return chosen[order].tolist()
