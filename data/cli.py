"""`clara-data`: the data commands under one name.

    clara-data validate FILE --stage stage1          python -m clara.data.validate FILE --stage stage1
    clara-data pubmedqa --input ... --out_dir ...    python -m clara.data.pubmedqa ...
    clara-data medquad --input ... --out_dir ...     python -m clara.data.medquad ...
    clara-data pdfs DIR --out OUT                    python -m clara.data.pdfs ...
    clara-data kb --out OUT                          python -m clara.data.kb_stages ...
    clara-data bm25 FILE --stage stage2 --out P      python -m clara.data.bm25_baseline ...
    clara-data restate FILE ... --out OUT            python -m clara.data.restate ...

Each subcommand is its module's own command line, run with the same flags either way;
`clara-data SUBCOMMAND --help` explains them. The modules build their parsers with
`command_parser`, so every help page names the command `clara-data SUBCOMMAND` and gives its
`python -m` form from the table below. This module imports no subcommand until one is run.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import textwrap
from typing import Sequence

from clara.command import CommandParser, command_main, fail

# subcommand -> (module, one line for the overview)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("clara.data.validate", "check stage JSONL files; every problem as file:line: field: message"),
    "pubmedqa": ("clara.data.pubmedqa", "PubMedQA -> stage1, stage1_2 and stage2 files with train/dev splits"),
    "medquad": ("clara.data.medquad", "MedQuAD -> stage1, stage1_2 and stage2 files with train/dev splits"),
    "pdfs": ("clara.data.pdfs", "PDFs -> clean text -> chunks (with file and page) -> stage1 rows"),
    "kb": ("clara.data.kb_stages", "NutriBot's built-in knowledge base -> stage files; --coverage"),
    "bm25": ("clara.data.bm25_baseline", "BM25 retrieval baseline on stage2 files: recall@k, MRR"),
    "restate": ("clara.data.restate", "stage1 files + one row restating each document from its memory"),
}


def _fill(text: str) -> str:
    # The width argparse itself wraps the flag help to.
    width = max(shutil.get_terminal_size().columns - 2, 40)
    return "\n\n".join(textwrap.fill(paragraph, width, break_on_hyphens=False)
                       for paragraph in text.split("\n\n"))


def command_parser(subcommand: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of a `clara-data` subcommand: its usage line says `clara-data
    SUBCOMMAND`, and its description ends with the `python -m` form of the same command."""
    module = SUBCOMMANDS[subcommand][0]
    return CommandParser(
        prog=f"clara-data {subcommand}",
        description=f"{_fill(description)}\n\nAlso runs as: python -m {module} [same flags]",
        epilog=_fill(epilog) if epilog else None,
        # Paragraphs kept as filled above: the python -m line stays whole.
        formatter_class=argparse.RawDescriptionHelpFormatter)


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: clara-data SUBCOMMAND [FLAGS ...]", "", "subcommands, each with its python -m form:"]
    for name, (module, summary) in SUBCOMMANDS.items():
        lines += [f"  {name:<{width}}  {summary}", f"  {'':<{width}}  python -m {module} [FLAGS ...]"]
    lines += ["", "clara-data SUBCOMMAND --help explains the flags of each; both forms take the same flags."]
    return "\n".join(lines)


@command_main("clara-data")
def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # a usage error: the overview goes to stderr, as argparse does
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        return fail("clara-data", f"unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
