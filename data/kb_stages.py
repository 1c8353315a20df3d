"""NutriBot's knowledge base -> CLaRa stage files (stage1, stage1_2, stage2; train and dev).

    clara-data kb --out DIR             write the stage files
    clara-data kb --coverage            which documents cover each required interaction
    (or python -m clara.data.kb_stages with the same flags)

stage1 holds one row per document with its QA pairs; stage1_2 and stage2 hold one row per
question, with the question's own document among the best word-overlap hard negatives at a
seeded position. The split is by question and deterministic. The rows are the examples of
clara.data.formats, written (and validated) by clara.data.conversion like every other converter.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from typing import Sequence

from clara.command import command_main
from clara.data.cli import command_parser
from clara.data.conversion import StageOutputs, write_outputs
from clara.data.formats import Stage1_2Example, Stage1Example, Stage2Example
from clara.data.knowledge_base import (KBDocument, QAPair, coverage_report,
                                       format_coverage_report, load_knowledge_base)

# Words too common to say anything about which document a question is about. A list of its own,
# not clara.data.bm25.STOPWORDS: the hard negatives are ranked by the overlap of the remaining
# words, so the stage files written depend on exactly this list.
STOPWORDS = frozenset(
    """a about above after again all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers him his how i if in into is it its itself just may me
    might more most much must my no nor not now of off on once only or other our out over own
    per same she should so some such than that the their them then there these they this those
    through to too under until up very was we were what when where which while who whom why will
    with would yes you your usually often name two three one people someone something""".split()
)
_WORD = re.compile(r"[a-z0-9]+")


def content_words(text: str) -> frozenset[str]:
    """Lowercased words of 3+ characters that are not stopwords."""
    return frozenset(w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in STOPWORDS)


@dataclass(frozen=True)
class ConversionConfig:
    dev_fraction: float = 0.2  # share of all questions held out for dev (split by question)
    seed: int = 0  # changes the split and the position of the positive document
    n_candidates: int = 20  # stage2: documents per question, the positive plus hard negatives
    top_k: int = 5  # stage1_2: documents per question, the positive plus the next-best matches

    def __post_init__(self):
        if not 0.0 <= self.dev_fraction <= 1.0:
            raise ValueError(f"dev_fraction must be between 0 and 1, got {self.dev_fraction}")
        if self.n_candidates < 1:
            raise ValueError(f"n_candidates must be at least 1, got {self.n_candidates}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


def _stable_hash(*parts: object) -> int:
    """A hash that, unlike hash(), is the same in every Python process."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).hexdigest(), 16)


def split_questions(documents: Sequence[KBDocument], config: ConversionConfig) -> set[tuple[str, int]]:
    """The (document id, question index) pairs that go to dev.

    Every question gets a seeded hash; the round(dev_fraction * n) lowest hashes form dev. The
    split is by question, not by document: every document stays a retrieval candidate in both
    splits, and dev asks new questions about documents whose other questions may be in train.
    """
    keys = [(doc.id, index) for doc in documents for index in range(len(doc.questions))]
    keys.sort(key=lambda key: (_stable_hash(config.seed, "split", *key), key))
    return set(keys[: round(config.dev_fraction * len(keys))])


def rank_negatives(
    question: QAPair, positive: KBDocument, documents: Sequence[KBDocument], word_sets: dict[str, frozenset[str]]
) -> list[KBDocument]:
    """Other documents, best word overlap with the question first (ties by id).

    A document containing every content word of the answer might answer the question too, so
    such documents go to the end of the ranking and are used only when nothing else is left.
    """
    question_words = content_words(question.question)
    answer_words = content_words(question.answer)

    def sort_key(doc: KBDocument):
        words = word_sets[doc.id]
        may_answer = bool(answer_words) and answer_words <= words
        return (may_answer, -len(question_words & words), doc.id)

    return sorted((doc for doc in documents if doc.id != positive.id), key=sort_key)


def _candidate_list(
    positive: KBDocument, negatives: Sequence[KBDocument], size: int, seed: int, key: tuple[str, int]
) -> tuple[list[KBDocument], int]:
    """``size`` documents with the positive at a seeded position; returns (documents, its index)."""
    chosen = list(negatives[: size - 1])
    position = _stable_hash(seed, "position", size, *key) % size
    chosen.insert(position, positive)
    return chosen, position


def build_stage_examples(documents: Sequence[KBDocument], config: ConversionConfig) -> StageOutputs:
    """The examples of every (stage, split), in document order."""
    for name, size in (("n_candidates", config.n_candidates), ("top_k", config.top_k)):
        if size > len(documents):
            raise ValueError(f"{name}={size} is more than the {len(documents)} documents in the knowledge base")
    dev_keys = split_questions(documents, config)
    word_sets = {doc.id: content_words(doc.title + " " + doc.text) for doc in documents}
    outputs = StageOutputs()
    for doc in documents:
        for split in ("train", "dev"):
            pairs = [qa for i, qa in enumerate(doc.questions) if ((doc.id, i) in dev_keys) == (split == "dev")]
            if pairs:
                outputs.add(split, Stage1Example("qa", tuple(qa.question for qa in pairs),
                                                 tuple(qa.answer for qa in pairs), (doc.text,)))
        for index, qa in enumerate(doc.questions):
            key = (doc.id, index)
            split = "dev" if key in dev_keys else "train"
            negatives = rank_negatives(qa, doc, documents, word_sets)
            top, _ = _candidate_list(doc, negatives, config.top_k, config.seed, key)
            outputs.add(split, Stage1_2Example(qa.question, tuple(d.text for d in top), qa.answer,
                                               (qa.answer,)))
            candidates, position = _candidate_list(doc, negatives, config.n_candidates, config.seed, key)
            outputs.add(split, Stage2Example(qa.question, tuple(d.text for d in candidates), qa.answer,
                                             (qa.answer,), (position,)))
    return outputs


def convert(documents: Sequence[KBDocument], out_dir, config: ConversionConfig) -> dict[str, int]:
    """Write ``<out_dir>/<stage>_<split>.jsonl`` for every stage and summary.json; return the row
    count of each file by stem (stage1_train, ...)."""
    outputs = build_stage_examples(documents, config)
    settings = {"dev_fraction": config.dev_fraction, "seed": config.seed, "n_candidates": config.n_candidates,
                "top_k": config.top_k}
    summary = write_outputs(out_dir, outputs, settings, config.top_k)
    return {name.removesuffix(".jsonl"): count for name, count in summary["files"].items()}


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    defaults = ConversionConfig()
    parser = command_parser(
        "kb",
        "Validate NutriBot's nutrition knowledge base (every problem named by file, line and "
        "field; exit status 2 if any) and write CLaRa stage files from it: stage1, stage1_2 and "
        "stage2, train and dev, plus summary.json, each validated as it is written. The split "
        "is by question and deterministic. With --coverage, print instead which documents cover "
        "each diet-drug and diet-disease interaction NutriBot must know about (exit status 1 if "
        "one is not covered).")
    parser.add_argument("--kb", default=None, metavar="PATH",
                        help="knowledge base folder (documents.jsonl and vocabulary.json) or a "
                             "documents .jsonl file, checked against the vocabulary.json beside it "
                             "or else the packaged one (default: the packaged data/nutrition_kb/)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder to write stage1/stage1_2/stage2 _train/_dev .jsonl files and "
                             "summary.json into (created if missing; required unless --coverage)")
    parser.add_argument("--dev_fraction", type=float, default=defaults.dev_fraction,
                        help="share of all questions held out for dev, 0 to 1; the split is by "
                             "question and every document stays a candidate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the split and of the positive document's position "
                             "(default: %(default)s)")
    parser.add_argument("--n_candidates", type=int, default=defaults.n_candidates,
                        help="stage2: documents per question, the positive plus word-overlap hard "
                             "negatives; at most the number of documents (default: %(default)s)")
    parser.add_argument("--top_k", type=int, default=defaults.top_k,
                        help="stage1_2: documents per question, its own plus the best-overlapping "
                             "others; match training's --generation_top_k (default: %(default)s)")
    parser.add_argument("--coverage", action="store_true",
                        help="print which documents cover each required diet-drug/diet-disease "
                             "interaction, then exit; no files are written")
    return parser


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and not args.coverage:
        parser.error("--out is required unless --coverage is given")
    return args


@command_main("clara-data kb")
def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    documents = load_knowledge_base(args.kb)
    if args.coverage:
        entries = coverage_report(documents)
        print(format_coverage_report(entries))
        return 0 if all(entry.covered for entry in entries) else 1
    config = ConversionConfig(dev_fraction=args.dev_fraction, seed=args.seed, n_candidates=args.n_candidates, top_k=args.top_k)
    counts = convert(documents, args.out, config)
    print(f"{len(documents)} documents, {sum(len(d.questions) for d in documents)} questions -> {args.out}")
    for stem, count in counts.items():
        print(f"  {stem}.jsonl: {count} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
