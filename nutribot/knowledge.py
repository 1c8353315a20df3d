"""What NutriBot reads: the user's PDFs when a folder is given, else the built-in knowledge base.

Every passage keeps its provenance: the knowledge base's document id and guideline source, or the
PDF file and page a chunk starts on. PDF passages are cut to the compressor's document length
(data.pdf_chunk), so each one is compressed whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clara.data.knowledge_base import load_knowledge_base
from clara.data.pdf_chunk import ChunkConfig
from clara.data.pdfs import chunk_all, extract_all

BUILT_IN = "built-in nutrition knowledge base"


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    source: str  # the guideline a KB document follows, or the PDF file's path in its folder
    page: int | None = None  # the PDF page the passage starts on (1-based); None for the KB
    tags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # the KB's tags; {} for PDFs

    def to_json(self) -> dict:
        out = asdict(self)
        out["tags"] = {k: list(v) for k, v in self.tags.items()}
        return out


@dataclass(frozen=True)
class Knowledge:
    passages: tuple[Passage, ...]
    origin: str  # BUILT_IN, or "PDFs in FOLDER"
    skipped: tuple[str, ...] = ()  # PDF files that gave no text, with the reason

    def fingerprint(self) -> str:
        """sha256 of every passage's id and text, in order: an index built from other passages is stale."""
        digest = hashlib.sha256()
        for p in self.passages:
            digest.update(json.dumps([p.id, p.title, p.text], ensure_ascii=False).encode())
        return digest.hexdigest()


def load_built_in(path: str | Path | None = None) -> Knowledge:
    """The packaged knowledge base, or one in its format (a folder holding documents.jsonl)."""
    documents = load_knowledge_base(path)
    passages = tuple(Passage(id=d.id, title=d.title, text=d.text, source=d.source, page=None,
                             tags={f: tuple(d.tags.terms(f)) for f in ("encourages", "restricts", "conditions",
                                                                        "medications", "allergens")})
                     for d in documents)
    return Knowledge(passages, BUILT_IN if path is None else f"knowledge base in {path}")


def load_pdfs(folder: str | Path, tokenizer, doc_max_length: int = 256) -> Knowledge:
    """Passages of every PDF under `folder` (or one PDF file), chunked with `tokenizer`."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such PDF file or folder")
    documents, report = extract_all(folder)
    skipped = tuple(f"{s['file']}: {s['reason']}" for s in report.files_skipped)
    if not documents:
        reasons = "; ".join(skipped) or "no .pdf files found"
        raise ValueError(f"{folder}: no PDF text to answer from ({reasons})")
    chunks = chunk_all(documents, tokenizer, ChunkConfig(doc_max_length=doc_max_length, overlap=doc_max_length // 8))
    passages = tuple(Passage(id=c.id, title=f"{Path(c.source_file).stem}, page {c.page_start}", text=c.text,
                             source=c.source_file, page=c.page_start)
                     for c in chunks)
    return Knowledge(passages, f"PDFs in {folder}", skipped)


def load_knowledge(path: str | Path | None, tokenizer, doc_max_length: int = 256) -> Knowledge:
    """The user's PDFs when `path` is given, else the built-in knowledge base (as the guide does)."""
    if path is None:
        return load_built_in()
    if (Path(path) / "documents.jsonl").is_file():
        return load_built_in(path)
    return load_pdfs(path, tokenizer, doc_max_length)
