"""Check stage JSONL files and list every problem in them.

    clara-data validate FILE [FILE ...] --stage STAGE [--top_k K]
    python -m clara.data.validate FILE [FILE ...] --stage STAGE [--top_k K]

STAGE is any stage of the stage table (clara/stages.py); its files are checked against the layout
the table gives it (`Stage.data_format`, see clara.data.formats). Prints one line per problem
(`file:line: field: message`), then a summary line per file. Exits with status 1 when any file
has a problem, 0 otherwise. Row contents are never printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clara.command import command_main, fail
from clara.data.cli import command_parser
from clara.data.formats import FileReport, Stage1Example, Stage2Example, validate_stage_file
from clara.stages import STAGES


def summarize(path: str, stage: str, report: FileReport) -> str:
    """One line: rows, problems, and the shape of the valid rows (counts only, no text)."""
    line = f"{path}: {stage}, {report.n_rows} rows, {len(report.problems)} problems"
    examples = report.examples
    if not examples:
        return line
    doc_counts = [len(example.docs) for example in examples]
    line += (f"; docs per row {min(doc_counts)}..{max(doc_counts)} "
             f"(mean {sum(doc_counts) / len(doc_counts):.2f})")
    if isinstance(examples[0], Stage1Example):
        qa_counts = [len(example.questions) for example in examples]
        paraphrases = sum(example.data_type == "paraphrase" for example in examples)
        line += f"; {sum(qa_counts)} QA pairs, {paraphrases} paraphrase rows"
    elif isinstance(examples[0], Stage2Example):
        positives = [len(example.pos_index) for example in examples]
        line += f"; positives per row {min(positives)}..{max(positives)}"
    return line


def build_parser() -> argparse.ArgumentParser:
    layouts = "; ".join(f"{name}: the {stage.data_format} layout"
                        + (", pos_index required" if "retrieval" in stage.losses else "")
                        for name, stage in STAGES.items())
    parser = command_parser(
        "validate",
        "Validate CLaRa stage JSONL files: print every problem as file:line: field: message, then "
        "one summary line per file; exit status 1 if any file has a problem. Row contents are "
        "never printed.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="stage JSONL file(s) to check")
    parser.add_argument("--stage", required=True, choices=tuple(STAGES),
                        help=f"the training stage the files are for, which sets the row layout "
                             f"they must follow ({layouts})")
    parser.add_argument("--top_k", type=int, default=None,
                        help="stage1 and stage1_2 layouts: every row must hold exactly this many "
                             "documents; stage2 layout: every row must hold at least this many "
                             "candidates (default: no count given, rows of the stage1 and "
                             "stage1_2 layouts need only hold equal counts)")
    return parser


@command_main("clara-data validate")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        return fail("clara-data validate", f"--top_k must be at least 1, got {args.top_k}")
    any_problem = False
    for path in args.files:
        report = validate_stage_file(path, args.stage, args.top_k)
        for problem in report.problems:
            print(problem)
        print(summarize(path, args.stage, report))
        any_problem = any_problem or bool(report.problems)
    return 1 if any_problem else 0


if __name__ == "__main__":
    sys.exit(main())
