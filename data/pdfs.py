"""PDFs -> clean page texts -> token chunks -> stage1 QA and paraphrase rows.

    clara-data pdfs DIR --out OUT_DIR [--tokenizer smollm2-135m] [--doc_max_length 256]
        [--overlap 32] [--no_qa | --generator openai|local --llm_model NAME ...]
    (or python -m clara.data.pdfs with the same flags)

Writes into OUT_DIR:
  chunks.jsonl            {id, text, source_file, page_start, page_end, chunk_index}, for NutriBot
  stage1.jsonl            {data_type: qa|paraphrase, question: [..], answers: [..], docs: [chunk],
                           source: {file, pages: [first, last], chunk_id}}
  stage1.progress.jsonl   the resume journal (see data/pdf_qa.py)
  report.json             files read and skipped (with the reason), and every count printed

Every file is either read or reported as skipped with its reason (encrypted, corrupt, no text
layer); pages that fail inside a readable file are reported too. Text from the PDFs and from the
generator is never printed.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from clara.command import command_main
from clara.data.cli import command_parser
from clara.data.pdf_chunk import Chunk, ChunkConfig, Tokenizer, WhitespaceTokenizer, chunk_pages
from clara.data.pdf_clean import PageText, clean_pages
from clara.data.pdf_extract import PdfSkipped, read_pdf
from clara.data.pdf_generators import (KEY_ENV, MODEL_ENV, URL_ENV, HttpGeneratorConfig,
                                       LocalModelGenerator, OpenAICompatibleGenerator, TextGenerator)
from clara.data.pdf_qa import GenerationConfig, GenerationCounts, generate_stage1
from clara.files import atomic_write_json, atomic_write_jsonl

CHUNKS_NAME = "chunks.jsonl"
REPORT_NAME = "report.json"
DEFAULT_TOKENIZER = "smollm2-135m"  # the embedded model's alias; clara.sources resolves it
WHITESPACE_TOKENIZER = "whitespace"


@dataclass
class PdfDocument:
    source_file: str  # path relative to the input folder, with "/" separators
    pages: list[PageText]
    page_count: int
    notes: list[str] = field(default_factory=list)  # pages that failed or had no text
    cleanup: dict = field(default_factory=dict)  # header/footer lines removed, words re-joined


@dataclass
class ExtractionReport:
    files_read: list[dict] = field(default_factory=list)  # {file, pages, notes...}
    files_skipped: list[dict] = field(default_factory=list)  # {file, reason}


def find_pdfs(input_path: Path) -> list[Path]:
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise FileNotFoundError(f"{input_path}: no such file or folder")
    return sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf")


def extract_pdf(path: Path, source_file: str) -> PdfDocument:
    """One PDF as clean page texts; raises PdfSkipped when it cannot be used at all."""
    raw = read_pdf(path)
    pages, stats = clean_pages(raw)
    notes = [f"page {n}: {reason}" for n, reason in sorted(raw.failed_pages.items())]
    empty = raw.pages_without_text
    if empty:
        notes.append(f"no text layer on page(s) {', '.join(map(str, empty))}")
    return PdfDocument(source_file=source_file, pages=pages,
                       page_count=len(raw.pages) + len(raw.failed_pages), notes=notes,
                       cleanup=asdict(stats))


def _extract_or_reason(job: tuple[Path, str]) -> PdfDocument | str:
    """A worker's job: the document, or the reason it was skipped (exceptions stay in here)."""
    path, source_file = job
    try:
        return extract_pdf(path, source_file)
    except PdfSkipped as skipped:
        return skipped.reason


def extract_all(input_path: Path, workers: int = 1) -> tuple[list[PdfDocument], ExtractionReport]:
    """Every PDF under `input_path`, in path order; `workers` > 1 reads files in parallel."""
    root = input_path if input_path.is_dir() else input_path.parent
    jobs = [(path, path.relative_to(root).as_posix()) for path in find_pdfs(input_path)]
    if workers > 1 and len(jobs) > 1:
        # pdfminer is pure Python: processes, not threads, give real parallelism.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_extract_or_reason, jobs))
    else:
        results = [_extract_or_reason(job) for job in jobs]
    report = ExtractionReport()
    documents = []
    for (_, source_file), result in zip(jobs, results):
        if isinstance(result, str):
            report.files_skipped.append({"file": source_file, "reason": result})
            continue
        documents.append(result)
        report.files_read.append({"file": source_file, "pages": result.page_count,
                                  "pages_with_text": len(result.pages),
                                  **result.cleanup, "notes": result.notes})
    return documents, report


def chunk_all(documents: list[PdfDocument], tokenizer: Tokenizer, config: ChunkConfig
              ) -> list[Chunk]:
    chunks: list[Chunk] = []
    for document in documents:
        chunks.extend(chunk_pages(document.source_file, document.pages, tokenizer, config))
    return chunks


def load_chunk_tokenizer(spec: str) -> Tokenizer:
    if spec == WHITESPACE_TOKENIZER:
        return WhitespaceTokenizer()
    from clara.tokenizer import load_tokenizer  # the model code is only needed for BPE tokens

    return load_tokenizer(spec)  # an alias (smollm2-135m), tokenizer.json, HF folder, hub id or .gguf


def build_generator(args: argparse.Namespace) -> TextGenerator:
    if args.generator == "local":
        if not args.llm_model:
            raise ValueError("--generator local needs --llm_model (a .gguf file, HF folder or "
                             f"alias such as {DEFAULT_TOKENIZER})")
        generator = LocalModelGenerator(args.llm_model, max_new_tokens=args.max_new_tokens)
        generator.load()  # now: a wrong --llm_model is reported before any PDF is read
        return generator
    config = HttpGeneratorConfig.from_env(args.llm_model, timeout_s=args.timeout,
                                          max_attempts=args.http_attempts,
                                          max_tokens=args.max_new_tokens)
    return OpenAICompatibleGenerator(config)


def format_summary(report: ExtractionReport, chunks: list[Chunk],
                   counts: GenerationCounts | None) -> str:
    lines = [f"{len(report.files_read)} file(s) read, {len(report.files_skipped)} skipped"]
    lines += [f"  skipped {item['file']}: {item['reason']}" for item in report.files_skipped]
    for item in report.files_read:
        lines += [f"  note {item['file']}: {note}" for note in item["notes"]]
    pages = sum(item["pages_with_text"] for item in report.files_read)
    lines.append(f"{pages} page(s) with text -> {len(chunks)} chunk(s)")
    if counts is not None:
        lines.append(
            f"generation: {counts.tasks_generated} task(s) done now, {counts.tasks_already_done} "
            f"already done before (resumed), of {counts.tasks_total}; "
            f"{counts.qa_pairs} QA pair(s), "
            f"{counts.invalid_pairs} invalid pair(s) dropped, {counts.malformed_replies} malformed "
            f"repl(ies), {counts.retries} retr(ies), dropped chunks: {counts.dropped_qa} QA, "
            f"{counts.dropped_paraphrase} paraphrase; {counts.generator_errors} generator error(s)")
        lines.append(f"stage1.jsonl: {counts.rows_qa} qa row(s), "
                     f"{counts.rows_paraphrase} paraphrase row(s)")
        if counts.stopped_because:
            lines.append(f"stopped early: {counts.stopped_because}; run again to continue")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    chunking, generation = ChunkConfig(), GenerationConfig()
    http = {f.name: f.default for f in fields(HttpGeneratorConfig)}
    parser = command_parser(
        "pdfs",
        "Extract the text of PDFs (running headers, footers and page numbers removed, split words "
        "re-joined, tables kept as rows), cut it into overlapping token chunks that remember "
        "their file and pages, and (unless --no_qa) have a language model write stage1 QA and "
        "paraphrase rows for each chunk. Writes chunks.jsonl, stage1.jsonl, its resume journal "
        "stage1.progress.jsonl and report.json into --out; files that cannot be read are listed "
        "with the reason. Exit status 1 when generation stopped early (run again to continue).",
        epilog=f"The openai generator reads its server from the environment only: {URL_ENV} "
               f"(base URL, e.g. http://localhost:8080/v1), {KEY_ENV} (API key, if needed), "
               f"{MODEL_ENV} (model name, if --llm_model is not given). Re-running with the same "
               "--out skips the chunks already generated.",
    )
    parser.add_argument("input", metavar="DIR", type=Path,
                        help="folder searched recursively for *.pdf (or a single PDF file)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT_DIR",
                        help="output folder for chunks.jsonl, stage1.jsonl, stage1.progress.jsonl "
                             "and report.json (created if missing)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, metavar="PATH_OR_ALIAS",
                        help="tokenizer that counts chunk tokens: a tokenizer.json, HF folder or "
                             f".gguf path, '{DEFAULT_TOKENIZER}', or '{WHITESPACE_TOKENIZER}' "
                             "(one token per word, no model files needed) (default: %(default)s)")
    parser.add_argument("--doc_max_length", type=int, default=chunking.doc_max_length,
                        help="tokens per chunk; use the compressor's document length, training's "
                             "--doc_max_length (default: %(default)s)")
    parser.add_argument("--overlap", type=int, default=chunking.overlap,
                        help="tokens shared by neighbouring chunks of a file, less than "
                             "--doc_max_length (default: %(default)s)")
    parser.add_argument("--no_qa", action="store_true",
                        help="only extract and chunk (chunks.jsonl, report.json); no generator is "
                             "needed and no stage1.jsonl is written")
    parser.add_argument("--generator", choices=("openai", "local"), default="openai",
                        help="'openai': an OpenAI-compatible HTTP server named in the environment "
                             "(see below); 'local': a base model loaded with clara.weights "
                             "(default: %(default)s)")
    parser.add_argument("--llm_model", default=None, metavar="NAME",
                        help=f"model name sent to the server (openai; default: ${MODEL_ENV}), or "
                             "the model path/alias to load (local; required)")
    parser.add_argument("--qa_per_chunk", type=int, default=generation.qa_per_chunk,
                        help="question-answer pairs asked for per chunk; extra valid pairs in a "
                             "reply are cut (default: %(default)s)")
    parser.add_argument("--no_paraphrase", action="store_true",
                        help="write QA rows only, no paraphrase rows")
    parser.add_argument("--max_retries", type=int, default=generation.max_retries,
                        help="new requests after a reply that cannot be parsed, before the chunk "
                             "is dropped and counted (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=http["max_tokens"],
                        help="most tokens a generator may write per reply (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=http["timeout_s"],
                        help="openai: seconds to wait for one HTTP reply (default: %(default)s)")
    parser.add_argument("--http_attempts", type=int, default=http["max_attempts"],
                        help="openai: tries per prompt on network errors, HTTP 429 and 5xx, with "
                             "growing waits (default: %(default)s)")
    parser.add_argument("--limit_chunks", type=int, default=None, metavar="N",
                        help="generate for the first N chunks only, a trial run; chunks.jsonl "
                             "still lists every chunk (default: all)")
    parser.add_argument("--workers", type=int, default=1,
                        help="PDF files read in parallel by this many processes (default: %(default)s)")
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bar (it is shown only on a terminal anyway)")
    return parser


@command_main("clara-data pdfs")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chunk_config = ChunkConfig(doc_max_length=args.doc_max_length, overlap=args.overlap)
    generation_config = None
    if not args.no_qa:
        generation_config = GenerationConfig(qa_per_chunk=args.qa_per_chunk, paraphrase=not args.no_paraphrase,
                                             max_retries=args.max_retries)
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.limit_chunks is not None and args.limit_chunks < 1:
        raise ValueError(f"--limit_chunks must be at least 1, got {args.limit_chunks}")
    generator = None if args.no_qa else build_generator(args)
    tokenizer = load_chunk_tokenizer(args.tokenizer)
    documents, report = extract_all(args.input, workers=args.workers)

    chunks = chunk_all(documents, tokenizer, chunk_config)
    atomic_write_jsonl(args.out / CHUNKS_NAME, (chunk.to_json() for chunk in chunks))
    counts = None
    if generator is not None:
        selected = chunks if args.limit_chunks is None else chunks[:args.limit_chunks]
        counts = generate_stage1(selected, generator, args.out, generation_config,
                                 progress=not args.no_progress)
    atomic_write_json(args.out / REPORT_NAME, {
        "files_read": report.files_read, "files_skipped": report.files_skipped,
        "chunks": len(chunks), "doc_max_length": args.doc_max_length, "overlap": args.overlap,
        "tokenizer": args.tokenizer,
        "generation": None if counts is None else asdict(counts),
    })
    print(format_summary(report, chunks, counts))
    return 1 if counts is not None and counts.stopped_because else 0


if __name__ == "__main__":
    sys.exit(main())
