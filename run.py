"""Start NutriBot's server, as the guide's `python run.py` does: `nutribot serve` with the same flags
(`python run.py --help`). As in the guide, PDFs put in ./data/pdfs are read first; without them
NutriBot answers from its built-in knowledge base. `--kb DIR` chooses another folder."""

from __future__ import annotations

import sys
from pathlib import Path

GUIDE_PDF_FOLDER = Path("data") / "pdfs"


def serve_arguments(argv: list[str], cwd: Path) -> list[str]:
    """`nutribot serve` arguments: argv, plus --kb data/pdfs when no --kb is given and that folder holds PDFs."""
    gives_kb = any(a == "--kb" or a.startswith("--kb=") for a in argv)
    folder = cwd / GUIDE_PDF_FOLDER
    if not gives_kb and folder.is_dir() and any(folder.rglob("*.pdf")):
        print(f"run.py: reading the PDFs in {GUIDE_PDF_FOLDER} (as the guide does)", file=sys.stderr)
        argv = [*argv, "--kb", str(folder)]
    return ["serve", *argv]


if __name__ == "__main__":
    from nutribot.cli import main

    sys.exit(main(serve_arguments(sys.argv[1:], Path.cwd())))
