"""Cut a document's pages into overlapping windows of tokenizer tokens.

The pages are tokenized one by one and their ids laid end to end, remembering the page of every
token; windows of `doc_max_length` tokens then start every `doc_max_length - overlap` tokens, so
two neighbouring chunks share exactly `overlap` tokens. Each chunk keeps its file, first and last
page and index. Chunks never cross files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from clara.data.pdf_clean import PageText


@runtime_checkable
class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class WhitespaceTokenizer:
    """One token per whitespace-separated word; for tests and for use without a model.

    Ids are handed out as words are first seen, so decode only knows words this instance encoded.
    Decoding joins words with single spaces (line breaks are not kept).
    """

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self._ids:
                self._ids[word] = len(self._words)
                self._words.append(word)
            ids.append(self._ids[word])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._words[i] for i in ids)


@dataclass(frozen=True)
class ChunkConfig:
    doc_max_length: int = 256  # tokens per chunk, the compressor's document length
    overlap: int = 32  # tokens shared by neighbouring chunks of one file

    def __post_init__(self) -> None:
        if self.doc_max_length < 1:
            raise ValueError(f"doc_max_length must be at least 1, got {self.doc_max_length}")
        if not 0 <= self.overlap < self.doc_max_length:
            raise ValueError(
                f"overlap must be in [0, doc_max_length={self.doc_max_length}), got {self.overlap}"
            )


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str
    source_file: str
    page_start: int
    page_end: int
    chunk_index: int

    def to_json(self) -> dict:
        return asdict(self)


def chunk_id(source_file: str, index: int, text: str) -> str:
    # The content hash makes a chunk id change when its text does (other chunk settings, an
    # edited PDF), so resuming never pairs old generated questions with new text.
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    return f"{source_file}#{index}-{digest}"


def _special_ids(tokenizer: Tokenizer) -> set[int]:
    # Some tokenizers add BOS/EOS to every encode call; those must not end up inside chunks.
    return set(tokenizer.encode(""))


def _strip_specials(ids: list[int], specials: set[int]) -> list[int]:
    start, end = 0, len(ids)
    while start < end and ids[start] in specials:
        start += 1
    while end > start and ids[end - 1] in specials:
        end -= 1
    return ids[start:end]


def _window_text(tokenizer: Tokenizer, ids: list[int], limit: int) -> tuple[str, int]:
    """Decoded text of `ids`, shortened until it re-encodes to at most `limit` tokens.

    A byte-level BPE window can start or end inside a character or re-merge differently; the
    check makes `len(encode(chunk.text)) <= doc_max_length` hold for the model, not just here.
    Returns the text and how many of `ids` it covers.
    """
    end = len(ids)
    while end > 0:
        text = tokenizer.decode(ids[:end]).strip()
        if len(tokenizer.encode(text)) <= limit:
            return text, end
        end -= 1
    return "", 0


def chunk_pages(source_file: str, pages: list[PageText], tokenizer: Tokenizer,
                config: ChunkConfig) -> list[Chunk]:
    specials = _special_ids(tokenizer)
    ids: list[int] = []
    page_of: list[int] = []  # page number of each token in `ids`
    for position, page in enumerate(pages):
        # A line break between pages keeps their last and first words apart after decoding.
        text = page.text if position == len(pages) - 1 else page.text + "\n"
        page_ids = _strip_specials(tokenizer.encode(text), specials)
        ids.extend(page_ids)
        page_of.extend([page.number] * len(page_ids))

    chunks: list[Chunk] = []
    stride = config.doc_max_length - config.overlap
    start = 0
    while start < len(ids):
        window = ids[start:start + config.doc_max_length]
        text, covered = _window_text(tokenizer, window, config.doc_max_length)
        if text and not re.fullmatch(r"\s*", text):
            index = len(chunks)
            chunks.append(Chunk(
                id=chunk_id(source_file, index, text),
                text=text,
                source_file=source_file,
                page_start=page_of[start],
                page_end=page_of[start + max(covered, 1) - 1],
                chunk_index=index,
            ))
        if start + covered >= len(ids):
            break  # this window reached the end; another would only repeat its tail
        # Normally `stride`; less when the window had to be shortened, so no token is skipped.
        start += max(1, min(stride, covered - config.overlap))
    return chunks
