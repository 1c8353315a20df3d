"""Stage-1 files with reconstruction rows: `clara-data restate FILE ... --out OUT`.

Writes the stage1 rows of every FILE and, for each distinct document among them, one paraphrase
row whose target is the document itself: restate the document from its memory. Where no model is
at hand to write real paraphrases, these rows are what makes the compressor carry the document's
content: a QA row can often be answered from the question alone (MedQuAD's answers are whole
passages whose style the generator learns), a restated document cannot. The rows are shuffled
with --seed, so a training run sees both kinds throughout.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence

from clara.command import command_main
from clara.data.cli import command_parser
from clara.data.formats import Stage1Example, read_stage_file, write_stage_file


def with_restated_documents(examples: Sequence[Stage1Example], seed: int) -> list[Stage1Example]:
    """One paraphrase row per distinct document (in first-seen order), then `examples`, shuffled."""
    seen: dict[str, None] = {}
    for example in examples:
        for doc in example.docs:
            seen.setdefault(doc, None)
    restated = [Stage1Example("paraphrase", (), (doc,), (doc,)) for doc in seen]
    rows = restated + list(examples)
    random.Random(seed).shuffle(rows)
    return rows


def build_parser():
    parser = command_parser("restate", __doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("files", nargs="+", metavar="FILE", help="stage1 JSONL files to read")
    parser.add_argument("--out", required=True, metavar="FILE", help="the stage1 JSONL file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    return parser


@command_main("clara-data restate")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    examples = [e for path in args.files for e in read_stage_file(path, "stage1")]
    rows = with_restated_documents(examples, args.seed)
    write_stage_file(args.out, rows, "stage1")
    print(f"{args.out}: {len(rows)} rows ({len(examples)} read, {len(rows) - len(examples)} restated documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
