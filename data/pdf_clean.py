"""Turn the raw lines of a PDF into clean page texts.

Three repairs, in this order:
1. Running headers and footers: a line among the first or last `EDGE_LINES` lines of a page whose
   text, with every run of digits replaced by "#", recurs in that zone on more than half of the
   pages (and on at least two) is dropped. Digits are masked so "Guide 2024, chapter 3" and
   "Guide 2024, chapter 4" count as the same line. Page numbers: the offset "printed number -
   page position" shared by most pages is found first (front matter shifts it); then a lone
   number in an edge zone ("7", "- 7 -", "Page 7 of 9") with that offset is dropped, and so is a
   short first/last line ending or starting with it that recurs on another page ("Chapter 2:
   Fats 17"). A lone number on the first or last line equal to the page's own position goes too.
   Any other number is content and stays.
2. De-hyphenation: a line ending in letter + "-" followed by a line starting with a letter may be
   a word split by the typesetter. The document's own words decide: the hyphen is dropped when the
   joined word occurs elsewhere ("SE-" + "QUENCE" -> "SEQUENCE"), kept when only the hyphenated
   form does ("well-known"); with no evidence, dropped before a lowercase letter ("clot-" + "ting"
   -> "clotting") and kept before a capital ("Anti-" + "Inflammatory").
   A word split across a page break is completed on the earlier page.
3. Paragraphs: lines closer than `PARAGRAPH_GAP` of a line height are joined with a space; a wider
   gap, or a table, starts a new line in the output. Table rows are kept one per line. Runs of
   spaces shrink to one, dot leaders ". . . ." to " ... ", and pdfminer's "(cid:N)" placeholders
   for unmapped glyphs are removed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from clara.data.pdf_extract import RawPdf, TableBlock, TextLine

EDGE_LINES = 3  # how many lines at the top and at the bottom of a page may be header/footer
PARAGRAPH_GAP = 0.6  # vertical gap, in line heights, above which a new paragraph starts

_DIGITS = re.compile(r"\d+")
_PAGE_NUMBER = re.compile(
    r"^(?:page\s+)?[-\u2013\u2014]?\s*(\d{1,4})\s*[-\u2013\u2014]?(?:\s*(?:of|/)\s*\d{1,4})?$",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
_HYPHENS = "-\u2010"
_SOFT_HYPHEN = "\u00ad"


@dataclass(frozen=True)
class PageText:
    number: int
    text: str


@dataclass
class CleanStats:
    header_footer_lines: int = 0
    dehyphenated_words: int = 0


def _signature(text: str) -> str:
    return " ".join(_DIGITS.sub("#", text.lower()).split())


def _edge_zones(lines: list[TextLine]) -> tuple[list[int], list[int]]:
    """Indices of the lines in the top and bottom zones of one page."""
    n = len(lines)
    return list(range(min(EDGE_LINES, n))), list(range(max(0, n - EDGE_LINES), n))


def _page_label(text: str) -> int | None:
    """The number in a line that is only a page number ("7", "- 7 -", "Page 7 of 9")."""
    match = _PAGE_NUMBER.match(text.strip())
    return int(match.group(1)) if match else None


def _more_than_half(count: int, n_pages: int) -> bool:
    # "Most pages": more than half of them, and never a line seen on one page only.
    return count >= max(2, n_pages // 2 + 1)


def _repeated_signatures(pages: list[list[TextLine]]) -> tuple[set[str], set[str]]:
    top_counts: Counter[str] = Counter()
    bottom_counts: Counter[str] = Counter()
    for lines in pages:
        top, bottom = _edge_zones(lines)
        # Bare page numbers are left to the offset rule: masked to "#" they would also match a
        # lone number that is content ("25" closing a sentence split over two lines).
        top_counts.update({_signature(lines[i].text) for i in top
                           if _page_label(lines[i].text) is None})
        bottom_counts.update({_signature(lines[i].text) for i in bottom
                              if _page_label(lines[i].text) is None})
    return ({sig for sig, n in top_counts.items() if _more_than_half(n, len(pages))},
            {sig for sig, n in bottom_counts.items() if _more_than_half(n, len(pages))})


_LEADING_NUMBER = re.compile(r"^(\d{1,4})\s")
_TRAILING_NUMBER = re.compile(r"\s(\d{1,4})$")
HEADER_MAX_WORDS = 12  # a running header holding a page number is short; a paragraph line is not


def _header_number(text: str) -> set[int]:
    """Numbers that could be a page number inside a running header: "Chapter 2: Fats 17"."""
    text = text.strip()
    if len(text.split()) > HEADER_MAX_WORDS:
        return set()
    return {int(m.group(1)) for m in (_LEADING_NUMBER.search(text), _TRAILING_NUMBER.search(text))
            if m}


def _page_number_offset(pdf: RawPdf) -> int | None:
    """printed number - page position shared by the page-number lines of most pages, if any.

    Front matter often shifts the printed numbers ("1" on the 3rd page: offset -2). Candidates
    are lone numbers in the edge zones and a number opening or closing a short first/last line.
    """
    offsets: Counter[int] = Counter()
    for page in pdf.pages:
        lines = page.lines
        top, bottom = _edge_zones(lines)
        labels = {_page_label(lines[i].text) for i in {*top, *bottom}} - {None}
        for i in {0, len(lines) - 1} if lines else set():
            labels |= _header_number(lines[i].text)
        offsets.update({label - page.number for label in labels})
    if offsets:
        offset, count = offsets.most_common(1)[0]
        if _more_than_half(count, len(pdf.pages)):
            return offset
    return None


def _is_page_number_line(lines: list[TextLine], i: int, page_number: int, offset: int | None,
                         edge_signatures: Counter[str]) -> bool:
    label = _page_label(lines[i].text)
    at_edge = i in (0, len(lines) - 1)
    if label is not None:
        # The numbering most pages share; or, on the very first or last line, the page's own
        # position (a document numbered on a few pages only).
        return label - page_number == offset or (at_edge and label == page_number)
    # A short first/last line carrying the shared numbering, seen (digits masked) on another
    # page too: "Chapter 2: Fats 17". A content line that merely ends in the right number is
    # not repeated, and stays.
    return (at_edge and offset is not None
            and edge_signatures[_signature(lines[i].text)] >= 2
            and any(n - page_number == offset for n in _header_number(lines[i].text)))


def remove_headers_footers(pdf: RawPdf, stats: CleanStats) -> list[list[TextLine]]:
    """The text lines of each page without running headers, footers and page numbers."""
    all_lines = [page.lines for page in pdf.pages]
    top_sigs, bottom_sigs = _repeated_signatures(all_lines)
    offset = _page_number_offset(pdf)
    edge_signatures: Counter[str] = Counter()
    for lines in all_lines:
        edge_signatures.update({_signature(lines[i].text) for i in {0, len(lines) - 1}} if lines
                               else set())
    kept_pages = []
    for page, lines in zip(pdf.pages, all_lines):
        top, bottom = _edge_zones(lines)
        drop = {i for i in top if _signature(lines[i].text) in top_sigs}
        drop |= {i for i in bottom if _signature(lines[i].text) in bottom_sigs}
        drop |= {i for i in {*top, *bottom}
                 if _is_page_number_line(lines, i, page.number, offset, edge_signatures)}
        stats.header_footer_lines += len(drop)
        kept_pages.append([line for i, line in enumerate(lines) if i not in drop])
    return kept_pages


class Dehyphenator:
    """Decides how two lines meet, using the words the document itself uses."""

    def __init__(self, texts: list[str]):
        self.joined_words: set[str] = set()
        self.hyphenated_words: set[str] = set()
        for text in texts:
            for word in _WORD.findall(text):
                (self.hyphenated_words if "-" in word else self.joined_words).add(word.lower())

    @staticmethod
    def split_candidate(left: str, right: str) -> tuple[str, str] | None:
        """(fragment before the hyphen, fragment after) when `left` ends a word `right` finishes."""
        if len(left) < 2 or left[-1] not in _HYPHENS or not left[-2].isalpha():
            return None
        if not right[:1].isalpha():
            return None
        head = re.search(r"[A-Za-z]+$", left[:-1])
        tail = re.match(r"[A-Za-z]+", right)
        if not head or not tail:
            return None
        return head.group(0), tail.group(0)

    def keeps_hyphen(self, head: str, tail: str) -> bool:
        if (head + tail).lower() in self.joined_words:
            return False  # "SE-" + "QUENCE" where the text also says "SEQUENCE"
        if f"{head}-{tail}".lower() in self.hyphenated_words:
            return True
        # No evidence either way: a lowercase continuation is a syllable break, a capital one
        # the second half of a compound ("Anti-" + "Inflammatory").
        return not tail[:1].islower()

    def join(self, left: str, right: str, stats: CleanStats) -> str:
        """`left` and `right` as one line of running text."""
        if left.endswith(_SOFT_HYPHEN):
            stats.dehyphenated_words += 1
            return left[:-1] + right
        parts = self.split_candidate(left, right)
        if parts is not None and not self.keeps_hyphen(*parts):
            stats.dehyphenated_words += 1
            return left[:-1] + right
        if left[-1:] in _HYPHENS and left[-2:-1].isalnum() and right[:1].isalnum():
            # "vitamin B-" + "12", "well-" + "known": a hyphenated compound; no space inside
            return left[:-1] + "-" + right
        return left + " " + right


def _carry_split_words(pages: list[list[TextLine]], dehyph: Dehyphenator) -> None:
    """Finish on the earlier page a word split across a page break ("nutri-" | "tion of ...")."""
    for earlier, later in zip(pages, pages[1:]):
        if not earlier or not later:
            continue
        last, first = earlier[-1], later[0]
        parts = dehyph.split_candidate(last.text, first.text)
        # Only a true split travels: the next page opening on a capital is a new sentence.
        is_split = parts is not None and not dehyph.keeps_hyphen(*parts)
        if last.text.endswith(_SOFT_HYPHEN) or is_split:
            word, _, rest = first.text.partition(" ")
            earlier[-1] = TextLine(text=last.text + "\u0000" + word, top=last.top,
                                   bottom=last.bottom)
            if rest.strip():
                later[0] = TextLine(text=rest.strip(), top=first.top, bottom=first.bottom)
            else:
                del later[0]


def _page_text(lines: list[TextLine], tables: list[TableBlock], dehyph: Dehyphenator,
               stats: CleanStats) -> str:
    items: list[TextLine | TableBlock] = sorted([*lines, *tables], key=lambda item: item.top)
    out: list[str] = []
    previous: TextLine | TableBlock | None = None
    for item in items:
        if isinstance(item, TableBlock):
            out.extend(item.rows)
        else:
            height = max(item.bottom - item.top, 1.0)
            same_paragraph = (
                isinstance(previous, TextLine)
                and item.top - previous.bottom <= PARAGRAPH_GAP * height
            )
            if same_paragraph:
                out[-1] = dehyph.join(out[-1], item.text, stats)
            else:
                out.append(item.text)
        previous = item
    # A word completed from the next page was glued on with a NUL marker; join it now.
    return "\n".join(_tidy(_resolve_carried(line, dehyph, stats)) for line in out)


_DOT_LEADER = re.compile(r"(?:\s?\.){4,}")
_UNMAPPED_GLYPH = re.compile(r"\(cid:\d+\)")


def _tidy(line: str) -> str:
    # Dot leaders of a table of contents cost many tokens and say nothing; "(cid:13)" is
    # pdfminer's stand-in for a glyph the font does not map to any character.
    line = _DOT_LEADER.sub(" ... ", line)
    line = _UNMAPPED_GLYPH.sub("", line)
    return " ".join(line.split())


def _resolve_carried(line: str, dehyph: Dehyphenator, stats: CleanStats) -> str:
    if "\u0000" not in line:
        return line
    left, _, right = line.partition("\u0000")
    return dehyph.join(left, right, stats)


def clean_pages(pdf: RawPdf) -> tuple[list[PageText], CleanStats]:
    """Page texts ready for chunking; pages left with no text are omitted."""
    stats = CleanStats()
    pages = remove_headers_footers(pdf, stats)
    dehyph = Dehyphenator([line.text for lines in pages for line in lines])
    _carry_split_words(pages, dehyph)
    texts = []
    for raw, lines in zip(pdf.pages, pages):
        text = _page_text(lines, raw.tables, dehyph, stats)
        if text.strip():
            texts.append(PageText(number=raw.number, text=text))
    return texts, stats
