"""Read a PDF page by page with pdfplumber.

Each page comes back as its running-text lines (with their vertical position, which the header
and footer removal in `pdf_clean` needs) and its tables as rows of cells joined by " | ". The
characters inside a table are taken out of the running text, so a table is said once, as rows.

A file that cannot be read at all raises `PdfSkipped` with a reason a person can act on
(encrypted, corrupt, no text layer); a single page that fails is recorded and the rest is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CELL_SEPARATOR = " | "


class PdfSkipped(Exception):
    """The whole file is unusable; `reason` says why in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TextLine:
    text: str
    top: float  # distance from the top of the page, PDF points
    bottom: float


@dataclass(frozen=True)
class TableBlock:
    rows: tuple[str, ...]  # one string per table row, cells joined by CELL_SEPARATOR
    top: float
    bottom: float


@dataclass
class RawPage:
    number: int  # 1-based, as a reader counts pages
    lines: list[TextLine]
    tables: list[TableBlock]
    has_images: bool


@dataclass
class RawPdf:
    pages: list[RawPage]
    failed_pages: dict[int, str] = field(default_factory=dict)  # page number -> reason

    @property
    def pages_without_text(self) -> list[int]:
        return [p.number for p in self.pages if not p.lines and not p.tables]


def _cell_text(cell: str | None) -> str:
    if cell is None:
        return ""
    # A word broken at a line end inside a cell: "clot-\nting" -> "clotting".
    cell = re.sub(r"(?<=[a-z])-\n(?=[a-z])", "", cell)
    return " ".join(cell.split())


def _table_rows(cells: list[list[str | None]]) -> tuple[str, ...]:
    rows = []
    for row in cells:
        texts = [_cell_text(c) for c in row]
        if any(texts):
            rows.append(CELL_SEPARATOR.join(texts))
    return tuple(rows)


# A gap wider than this fraction of the font size between two characters is a space. The fixed
# 3-point default of pdfplumber glues the words of tightly justified small print together.
X_TOLERANCE_RATIO = 0.15
DUPLICATE_TOLERANCE = 1.0  # points; fake bold draws each glyph twice, a fraction of a point apart


def _duplicate_char_ids(chars: list[dict]) -> set[int]:
    """ids of characters drawn again at (almost) the same place with the same glyph and font.

    Linear time, with characters bucketed by row: pdfplumber's own dedupe_chars re-sorts with
    list.index, which is quadratic in the characters of a page.
    """
    kept: dict[tuple, list[tuple[float, float]]] = {}
    duplicates = set()
    for char in chars:
        identity = (char["text"], char.get("fontname"), round(float(char.get("size", 0)), 1))
        row = int(char["top"] // DUPLICATE_TOLERANCE)
        near = [
            (top, x0)
            for bucket in (row - 1, row, row + 1)
            for top, x0 in kept.get((*identity, bucket), ())
        ]
        if any(abs(char["top"] - top) <= DUPLICATE_TOLERANCE
               and abs(char["x0"] - x0) <= DUPLICATE_TOLERANCE for top, x0 in near):
            duplicates.add(id(char))
        else:
            kept.setdefault((*identity, row), []).append((char["top"], char["x0"]))
    return duplicates


def _inside(obj: dict, bbox: tuple[float, float, float, float]) -> bool:
    x0, top, x1, bottom = bbox
    cx = (obj["x0"] + obj["x1"]) / 2
    cy = (obj["top"] + obj["bottom"]) / 2
    return x0 <= cx <= x1 and top <= cy <= bottom


def _without(page, char_ids: set[int]):
    # Filtered pages share the parent's object dicts, so identity picks out exactly these chars.
    return page.filter(lambda obj: id(obj) not in char_ids) if char_ids else page


def _read_page(page, number: int) -> RawPage:
    page = _without(page, _duplicate_char_ids(page.chars))
    tables = []
    table_chars: set[int] = set()
    for table in page.find_tables():
        rows = _table_rows(table.extract(x_tolerance_ratio=X_TOLERANCE_RATIO))
        if rows:
            tables.append(TableBlock(rows=rows, top=table.bbox[1], bottom=table.bbox[3]))
            table_chars |= {id(c) for c in page.chars if _inside(c, table.bbox)}
    lines = [
        TextLine(text=line["text"], top=float(line["top"]), bottom=float(line["bottom"]))
        for line in _without(page, table_chars).extract_text_lines(
            return_chars=False, x_tolerance_ratio=X_TOLERANCE_RATIO)
        if line["text"].strip()
    ]
    return RawPage(number=number, lines=lines, tables=tables, has_images=bool(page.images))


def _open_error_reason(exc: BaseException) -> str:
    # pdfplumber wraps every pdfminer error in PdfminerException(original).
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    name = type(inner).__name__
    if name == "PDFPasswordIncorrect":
        return "encrypted: a password is needed to open it"
    if name in ("PDFEncryptionError", "PDFTextExtractionNotAllowed"):
        return f"encrypted: cannot be decrypted ({name}: {inner})"
    detail = str(inner) or name
    return f"corrupt or not a PDF ({name}: {detail})"


def read_pdf(path: str | Path) -> RawPdf:
    """Read every page of `path`; raise PdfSkipped when nothing usable can be read."""
    import pdfplumber  # imported here so that chunking and QA code need no PDF library

    try:
        pdf = pdfplumber.open(path)
    except Exception as exc:  # pdfminer raises many unrelated types for broken files
        raise PdfSkipped(_open_error_reason(exc)) from exc
    with pdf:
        try:
            plumber_pages = list(pdf.pages)
        except Exception as exc:
            raise PdfSkipped(_open_error_reason(exc)) from exc
        if not plumber_pages:
            raise PdfSkipped("corrupt or not a PDF (it has no pages)")
        result = RawPdf(pages=[])
        for number, page in enumerate(plumber_pages, start=1):
            try:
                result.pages.append(_read_page(page, number))
            except Exception as exc:  # one bad page must not cost the others
                inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
                name = type(inner).__name__
                result.failed_pages[number] = f"could not be parsed ({name}: {inner or name})"
    if not result.pages:
        raise PdfSkipped(f"corrupt: none of its {len(plumber_pages)} pages could be parsed")
    if len(result.pages_without_text) == len(result.pages):
        raise PdfSkipped(
            f"no text layer on any of its {len(result.pages)} page(s) "
            "(scanned or image-only; run OCR on it first)"
        )
    return result
