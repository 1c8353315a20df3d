"""BM25 as a retriever on the candidates of stage2 files: recall@1/3/5, precision@1/3/5, MRR.

    clara-data bm25 FILE [FILE ...] --out results/bm25
    python -m clara.data.bm25_baseline FILE [FILE ...] --out results/bm25

For each row, BM25 ranks that row's own candidates (`docs`) for its question, and the ranking is
scored against `pos_index` with `clara.data.metrics.retrieval_scores` - the same candidates and the
same metrics the end-to-end model is judged on. The BM25 statistics (document frequencies,
average length) come from all distinct candidate texts of the file, not from the candidates of
one row alone, too few to make idf meaningful. Candidates with equal scores keep their
order in the row, whose positions were shuffled by the converters, so ties are not in BM25's
favour. Writes PREFIX.json and PREFIX.md atomically and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clara.command import command_main
from clara.data.bm25 import BM25Index
from clara.data.cli import command_parser
from clara.data.formats import Stage2Example, example_class, read_stage_file
from clara.data.metrics import RETRIEVAL_KS, retrieval_scores
from clara.files import atomic_write_json, atomic_write_text
from clara.stages import STAGE_NAMES

# The stages whose rows hold candidates to rank (the stage2 layout), in the stage table's order.
BASELINE_STAGES = tuple(name for name in STAGE_NAMES if example_class(name) is Stage2Example)


def bm25_rankings(examples: Sequence[Stage2Example], k1: float = 1.2, b: float = 0.75) -> list[list[int]]:
    """For each example, its candidate positions ordered by BM25 score (best first)."""
    doc_of_text: dict[str, int] = {}
    for example in examples:
        for text in example.docs:
            doc_of_text.setdefault(text, len(doc_of_text))
    index = BM25Index(list(doc_of_text), k1, b)
    rankings = []
    for example in examples:
        scores = index.scores(example.question)
        candidate_scores = [scores[doc_of_text[text]] for text in example.docs]
        rankings.append(sorted(range(len(example.docs)), key=lambda i: -candidate_scores[i]))
    return rankings


def evaluate_file(path: str, stage: str, k1: float = 1.2, b: float = 0.75) -> dict[str, Any]:
    """Read a stage2 file and return its BM25 retrieval metrics (and what they were computed on)."""
    examples = read_stage_file(path, stage)
    missing = [i + 1 for i, example in enumerate(examples) if not example.pos_index]
    if missing:
        raise ValueError(f"{path}: {len(missing)} rows have no pos_index (first: row {missing[0]}); "
                         "retrieval metrics need the positives")
    metrics = retrieval_scores(bm25_rankings(examples, k1, b), [example.pos_index for example in examples])
    candidates = [len(example.docs) for example in examples]
    return {"file": path, "stage": stage, "k1": k1, "b": b, "queries": len(examples),
            "candidates_mean": sum(candidates) / len(candidates), "metrics": metrics}


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    columns = [f"recall@{k}" for k in RETRIEVAL_KS] + [f"precision@{k}" for k in RETRIEVAL_KS] + ["mrr"]
    lines = ["| file | queries | candidates | " + " | ".join(columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for result in results:
        values = " | ".join(f"{result['metrics'][column]:.4f}" for column in columns)
        lines.append(f"| {result['file']} | {result['queries']} | {result['candidates_mean']:.1f} | {values} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "bm25",
        "BM25 retrieval baseline: rank each row's own candidates (docs) of stage2-layout files for "
        "its question and score the ranking against pos_index (recall@1/3/5, precision@1/3/5, "
        "MRR). Prints a Markdown table and writes it, with the numbers as JSON, to PREFIX.md and "
        "PREFIX.json.")
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="stage2-layout JSONL file(s); every row needs pos_index")
    parser.add_argument("--stage", choices=BASELINE_STAGES, default=BASELINE_STAGES[0],
                        help="the stage the files are validated as; each of these uses the stage2 "
                             "layout (default: %(default)s)")
    parser.add_argument("--out", default="bm25_baseline", metavar="PREFIX",
                        help="where to write PREFIX.json and PREFIX.md (default: %(default)s, in "
                             "the current folder)")
    parser.add_argument("--k1", type=float, default=1.2,
                        help="BM25 term-frequency saturation: how much a repeated query word in "
                             "a document still adds (default: %(default)s)")
    parser.add_argument("--b", type=float, default=0.75,
                        help="BM25 length normalisation, 0 (none) to 1 (full): how much a long "
                             "document's score is scaled down (default: %(default)s)")
    return parser


@command_main("clara-data bm25")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = [evaluate_file(path, args.stage, args.k1, args.b) for path in args.files]
    prefix = Path(args.out)
    table = markdown_table(results)
    atomic_write_json(prefix.with_name(prefix.name + ".json"), results)
    atomic_write_text(prefix.with_name(prefix.name + ".md"), table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
