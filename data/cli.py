"""`clara-data`: the data commands under one name.

    clara-data validate FILE --stage stage1          same as python -m clara.data.validate ...
    clara-data pubmedqa --input ... --out_dir ...    python -m clara.data.pubmedqa
    clara-data medquad --input ... --out_dir ...     python -m clara.data.medquad
    clara-data pdfs DIR --out OUT                    python -m clara.data.pdfs
    clara-data kb --out OUT                          python -m clara.data.kb_stages
    clara-data bm25 FILE --stage stage2 --out P      python -m clara.data.bm25_baseline

Each subcommand is its module's own command line; `clara-data SUBCOMMAND --help` explains its flags.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# subcommand -> (module, one line for the overview)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("clara.data.validate", "check stage JSONL files; every problem as file:line: field: message"),
    "pubmedqa": ("clara.data.pubmedqa", "PubMedQA -> stage1, stage1_2 and stage2 files with train/dev splits"),
    "medquad": ("clara.data.medquad", "MedQuAD -> stage1, stage1_2 and stage2 files with train/dev splits"),
    "pdfs": ("clara.data.pdfs", "PDFs -> clean text -> chunks (with file and page) -> stage1 rows"),
    "kb": ("clara.data.kb_stages", "NutriBot's built-in knowledge base -> stage files; --coverage"),
    "bm25": ("clara.data.bm25_baseline", "BM25 retrieval baseline on stage2 files: recall@k, MRR"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: clara-data SUBCOMMAND [FLAGS ...]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "clara-data SUBCOMMAND --help explains the flags of each."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"clara-data: unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
