"""`nutribot`: nutrition answers from compressed documents, with the patient's contraindications first.

    nutribot ask "Which greens should I eat more of?" --patient "72-year-old on warfarin"
    nutribot ask --batch cases.jsonl --json        one {"query", "patient_context"} object a line
    nutribot index [--kb DIR]                      compress the documents once (cached)
    nutribot serve [--host 127.0.0.1 --port 8000]  HTTP API and chat page

Documents: the PDFs under --kb when given (a folder or one file), else the built-in nutrition
knowledge base. Warnings come from rules (nutribot.safety), never from the model. The patient's
context is never logged or written anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from clara.command import CommandParser, command_main
from clara.quant import QUANT_KINDS
from clara.weights import DTYPES
from nutribot.retriever import MODES, REPETITION_PENALTY, ClaraRetriever, Reply, default_checkpoint

PROG = "nutribot"


def _add_model_flags(parser) -> None:
    parser.add_argument("--kb", metavar="DIR", default=None,
                        help="PDFs to answer from: a folder (read recursively) or one .pdf file; a folder holding "
                             "documents.jsonl is read as a knowledge base in our format (default: the built-in "
                             "nutrition knowledge base)")
    parser.add_argument("--checkpoint", default=None,
                        help=f"Clara checkpoint folder, a hub checkpoint 'org/name:subfolder' (e.g. "
                             f"apple/CLaRa-7B-E2E:compression-16), or a base model name for an untrained Clara "
                             f"(default: {default_checkpoint()})")
    parser.add_argument("--mode", choices=MODES, default="clara",
                        help="clara: documents compressed into memory, retrieved by the query reasoner; text: "
                             "the baseline, BM25 and the documents' full text in the prompt (default clara)")
    parser.add_argument("--cache_dir", default=None,
                        help="where compressed indexes are kept (default $NUTRIBOT_CACHE or ~/.cache/nutribot)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weights and compute dtype (default fp32; bf16 halves the memory of a large model)")
    parser.add_argument("--quantize", choices=QUANT_KINDS, default=None,
                        help="store the base's block weights nf4 or int8 (docs/quantization.md): a 7B checkpoint "
                             "such as apple/CLaRa-7B-E2E then loads in 4 or 8 GiB; int8 answers fastest on a CPU "
                             "(default: not quantized)")


def build_parser() -> CommandParser:
    parser = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="Run `nutribot COMMAND --help` for a command's flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    ask = commands.add_parser("ask", help="answer a question (or a batch file of them)",
                              description="Answer a question for a patient: the contraindications found in the "
                                          "patient's context, their warnings, the answer and the cited documents.")
    ask.add_argument("query", nargs="?", help="the question (omit with --batch)")
    ask.add_argument("--patient", default="", metavar="TEXT",
                     help="free-text patient context: conditions, medications, allergies, pregnancy (default none)")
    ask.add_argument("--batch", metavar="FILE", type=Path,
                     help="JSONL file, one {\"query\": ..., \"patient_context\": ...} object a line; one result a "
                          "line out, the model loaded once")
    ask.add_argument("--top_k", type=int, default=5, help="documents to retrieve and answer from (default 5)")
    ask.add_argument("--json", action="store_true",
                     help="print the result as one JSON object (answer, warnings, contraindications, documents, mode)")
    ask.add_argument("--max_new_tokens", type=int, default=96, help="length limit of the answer (default 96)")
    ask.add_argument("--repetition_penalty", type=float, default=REPETITION_PENALTY,
                     help="above 1, words already in the answer become less likely (transformers' "
                          f"repetition_penalty; default {REPETITION_PENALTY})")
    _add_model_flags(ask)

    index = commands.add_parser("index", help="compress the documents into a memory index (cached)",
                                description="Compress every document once into the memory index NutriBot "
                                            "searches; later runs load it unless the documents or checkpoint "
                                            "changed.")
    _add_model_flags(index)

    serve = commands.add_parser("serve", help="start the HTTP API and chat page",
                                description="Serve POST /ask, POST /search, GET /health, the OpenAPI schema at "
                                            "/docs and the chat page at /.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _add_model_flags(serve)
    return parser


def make_retriever(args, max_new_tokens: int = 96, repetition_penalty: float = REPETITION_PENALTY) -> ClaraRetriever:
    kb = args.kb
    if kb is not None and not Path(kb).exists():
        raise FileNotFoundError(f"--kb {kb}: no such file or folder")
    return ClaraRetriever(kb, args.checkpoint, args.mode, cache_dir=args.cache_dir, device=args.device,
                          dtype=args.dtype, quantize=args.quantize, max_new_tokens=max_new_tokens,
                          repetition_penalty=repetition_penalty)


def format_reply(reply: Reply, origin: str) -> str:
    lines = []
    if reply.warnings:
        lines.append("WARNINGS")
        lines += [f"  ! {w}" for w in reply.warnings]
        lines.append("")
    if reply.contraindications:
        lines.append("Contraindications found: " + "; ".join(c.name for c in reply.contraindications))
        lines.append("")
    lines += ["Answer", f"  {reply.answer or '(no answer generated)'}", "", f"Documents ({origin}, mode {reply.mode})"]
    for d in reply.documents:
        where = d.passage.source + (f", page {d.passage.page}" if d.passage.page is not None else "")
        lines.append(f"  [{d.passage.id}] {d.passage.title} ({where}), score {d.score:.3f}")
        lines += [f"      ! {w}" for w in d.warnings]
    return "\n".join(lines)


def read_batch(path: Path) -> list[tuple[str, str]]:
    cases = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not row["query"].strip():
                raise ValueError(f"{path}:{number}: needs a non-empty string field \"query\"")
            context = row.get("patient_context", "")
            if context is None:
                context = ""
            if not isinstance(context, str):
                raise ValueError(f"{path}:{number}: \"patient_context\" must be a string")
            cases.append((row["query"], context))
    if not cases:
        raise ValueError(f"{path}: no cases")
    return cases


def run_ask(args) -> int:
    if (args.query is None) == (args.batch is None):
        raise ValueError("give a question or --batch FILE, not both" if args.query else "give a question or --batch FILE")
    if args.top_k < 1:
        raise ValueError(f"--top_k must be at least 1, got {args.top_k}")
    cases = read_batch(args.batch) if args.batch else [(args.query, args.patient)]
    started = time.perf_counter()
    retriever = make_retriever(args, args.max_new_tokens, args.repetition_penalty)
    loaded = time.perf_counter()
    log = logging.getLogger(PROG)
    log.info("documents: %s (%d passages); model loaded in %.1f s", retriever.knowledge.origin,
             len(retriever.knowledge.passages), loaded - started)
    for query, context in cases:
        reply = retriever.answer(query, context, top_k=args.top_k)
        if args.json:
            print(json.dumps(reply.to_json(), ensure_ascii=False), flush=True)
        else:
            print(format_reply(reply, retriever.knowledge.origin) + "\n", flush=True)
    per_case = (time.perf_counter() - loaded) / len(cases)
    log.info("%d case(s), %.2f s per case (mode %s), one model load", len(cases), per_case, args.mode)
    return 0


def run_index(args) -> int:
    args.mode = "clara"
    retriever = make_retriever(args)
    print(f"{retriever.knowledge.origin}: {len(retriever.index)} passages indexed in {retriever.index_path()}")
    for skipped in retriever.knowledge.skipped:
        print(f"  skipped {skipped}")
    return 0


def run_serve(args) -> int:
    import uvicorn

    from nutribot.server import create_app

    retriever = make_retriever(args)
    print(f"NutriBot on http://{args.host}:{args.port}/ ({retriever.knowledge.origin}, mode {args.mode}); "
          f"Ctrl-C stops it", flush=True)
    uvicorn.run(create_app(retriever), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


@command_main(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    return {"ask": run_ask, "index": run_index, "serve": run_serve}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
