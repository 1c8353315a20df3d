"""NutriBot's own nutrition knowledge base: loading, validation and interaction coverage.

The knowledge base lives in the folder ``data/nutrition_kb/`` next to this file:

    documents.jsonl   one document per line (see README.md there for every field)
    vocabulary.json   the controlled vocabulary that every tag must come from

``load_knowledge_base()`` reads and validates it and returns ``KBDocument`` dataclasses;
``coverage_report()`` lists, for each diet-drug / diet-disease interaction NutriBot must know
about, the documents whose tags cover it. `clara.data.kb_stages` turns it into CLaRa stage files.
Field types are checked, and worded in messages, by `clara.data.json_fields`, as in every other
JSON reader of clara.data.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from clara.data.json_fields import FieldChecker
from clara.files import read_json

KB_DIR = Path(__file__).resolve().parent / "nutrition_kb"
DOCUMENTS_FILE = "documents.jsonl"
VOCABULARY_FILE = "vocabulary.json"

CATEGORIES = ("nutrient", "food", "diet_pattern", "interaction", "condition")
TAG_FIELDS = ("encourages", "restricts", "conditions", "medications", "allergens")
VOCABULARY_KINDS = ("intake", "condition", "medication", "allergen")
DOCUMENT_FIELDS = ("id", "title", "text", "source", "category", "tags", "questions")
MIN_QUESTIONS = 2


class KnowledgeBaseError(ValueError):
    """Invalid knowledge base or vocabulary; the message names file, line and field of each problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ----------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str  # a phrase or one sentence, answerable from the document's text alone


@dataclass(frozen=True)
class DocumentTags:
    """Controlled-vocabulary tags; README.md in the KB folder gives the meaning of each field."""

    encourages: tuple[str, ...] = ()  # intake the document advises its readers to choose
    restricts: tuple[str, ...] = ()  # intake to control: avoid, limit, keep steady or time apart
    conditions: tuple[str, ...] = ()  # the people the advice is about (conditions, life stages)
    medications: tuple[str, ...] = ()  # medicines whose use the advice concerns
    allergens: tuple[str, ...] = ()  # major allergens in recommended foods, or the allergy discussed

    def terms(self, field: str) -> tuple[str, ...]:
        if field not in TAG_FIELDS:
            raise KeyError(f"unknown tag field {field!r} (expected one of {', '.join(TAG_FIELDS)})")
        return getattr(self, field)


@dataclass(frozen=True)
class KBDocument:
    id: str
    title: str
    text: str
    source: str  # the public guideline its facts come from
    category: str  # one of CATEGORIES
    tags: DocumentTags
    questions: tuple[QAPair, ...]

    def to_dict(self) -> dict:
        """The JSONL row this document was read from (fields in file order)."""
        return {
            "id": self.id,
            "title": self.title,
            "text": self.text,
            "source": self.source,
            "category": self.category,
            "tags": {name: list(self.tags.terms(name)) for name in TAG_FIELDS},
            "questions": [{"question": qa.question, "answer": qa.answer} for qa in self.questions],
        }


# ----------------------------------------------------------------------------- vocabulary


def normalize_term(name: str) -> str:
    """Lowercase, straight apostrophes, single spaces, no surrounding punctuation."""
    name = name.replace("\u2019", "'").lower()
    return " ".join(name.split()).strip(" .,;:!?")


@dataclass(frozen=True)
class Vocabulary:
    """Canonical tag terms per kind, each with synonyms that should match it.

    ``fields`` maps each tag field to the kind its terms come from (encourages and restricts
    both use "intake"). A synonym is any name (brand name, class member, plural, other spelling)
    that a patient or clinician may write and that must trigger the same tag.
    """

    fields: dict[str, str]
    terms: dict[str, dict[str, tuple[str, ...]]]  # kind -> canonical -> synonyms

    def __post_init__(self):
        lookup: dict[str, dict[str, str]] = {}
        for kind, entries in self.terms.items():
            names = {}
            for canonical, synonyms in entries.items():
                names[canonical] = canonical
                for synonym in synonyms:
                    names[synonym] = canonical
            lookup[kind] = names
        object.__setattr__(self, "_lookup", lookup)
        # Longest names first, so "chronic kidney disease" wins over "kidney disease".
        patterns = {
            kind: re.compile(
                "|".join(
                    r"(?<![a-z0-9])" + re.escape(name) + r"(?:s|es)?(?![a-z0-9])"
                    for name in sorted(names, key=len, reverse=True)
                )
            )
            for kind, names in lookup.items()
        }
        object.__setattr__(self, "_patterns", patterns)

    def kind_of(self, field: str) -> str:
        return self.fields[field]

    def is_canonical(self, kind: str, term: str) -> bool:
        return term in self.terms[kind]

    def canonical(self, kind: str, name: str) -> str | None:
        """The canonical term for ``name`` (a term or a synonym, any case, simple plurals), else None."""
        names = self._lookup[kind]
        name = normalize_term(name)
        for candidate in (name, name[:-2] if name.endswith("es") else None, name[:-1] if name.endswith("s") else None):
            if candidate and candidate in names:
                return names[candidate]
        return None

    def find_terms(self, kind: str, text: str) -> list[str]:
        """Canonical terms of ``kind`` mentioned in free text, in order of first mention."""
        found: list[str] = []
        for match in self._patterns[kind].finditer(normalize_term(text)):
            term = self.canonical(kind, match.group(0))
            if term is not None and term not in found:
                found.append(term)
        return found


def _checker(where: str, problems: list[str]) -> FieldChecker:
    """A FieldChecker that adds `where: field: message` to `problems` (`where: message` for a
    problem with the whole value, whose field is "")."""
    return FieldChecker(lambda field, message: problems.append(f"{where}: {field}: {message}" if field
                                                               else f"{where}: {message}"))


def load_vocabulary(path: str | os.PathLike | None = None) -> Vocabulary:
    """Read and check ``vocabulary.json`` (default: the packaged one)."""
    path = Path(path) if path is not None else KB_DIR / VOCABULARY_FILE
    raw = read_json(path, error=lambda message: KnowledgeBaseError([message]))
    problems: list[str] = []
    check = _checker(str(path), problems)
    field_kinds = raw.get("fields")
    if (not isinstance(field_kinds, dict) or sorted(field_kinds) != sorted(TAG_FIELDS)
            or not all(isinstance(kind, str) for kind in field_kinds.values())):
        problems.append(f"{path}: fields: must map exactly {', '.join(TAG_FIELDS)} to a kind")
        field_kinds = {}
    if "kinds" not in raw:
        raise KnowledgeBaseError(problems + [f"{path}: kinds: missing field"])
    kinds_raw = check.object(raw["kinds"], "kinds")
    if kinds_raw is None:
        raise KnowledgeBaseError(problems)
    for field, kind in field_kinds.items():
        if kind not in kinds_raw:
            problems.append(f"{path}: fields.{field}: kind {kind!r} is not defined under kinds")
    terms: dict[str, dict[str, tuple[str, ...]]] = {}
    for kind, entry in kinds_raw.items():
        label = f"kinds.{kind}.terms"
        if check.object(entry, f"kinds.{kind}") is None:
            continue
        if "terms" not in entry:
            problems.append(f"{path}: {label}: missing field")
            continue
        entries = check.object(entry["terms"], label)
        if entries is None:
            continue
        seen: dict[str, str] = {}  # every name of this kind -> the canonical term it belongs to
        for canonical in entries:
            seen[canonical] = canonical
        kind_terms = {}
        for canonical, synonyms in entries.items():
            where = f"{path}: {label}[{canonical!r}]"
            if canonical != normalize_term(canonical) or not canonical:
                problems.append(f"{where}: terms must be lowercase, trimmed and non-empty")
            synonyms = check.string_list(synonyms, f"{label}[{canonical!r}]", empty_ok=True)
            if synonyms is None:
                continue
            for synonym in synonyms:
                if synonym != normalize_term(synonym):
                    problems.append(f"{where}: synonym {synonym!r} must be lowercase and trimmed")
                elif synonym in seen and seen[synonym] != canonical:
                    problems.append(f"{where}: synonym {synonym!r} already names {seen[synonym]!r}")
                seen.setdefault(synonym, canonical)
            kind_terms[canonical] = synonyms
        terms[kind] = kind_terms
    if problems:
        raise KnowledgeBaseError(problems)
    return Vocabulary(fields=dict(field_kinds), terms=terms)


# ----------------------------------------------------------------------------- loading


def _resolve_paths(path: str | os.PathLike | None) -> tuple[Path, Path]:
    """(documents file, vocabulary file) for a KB folder, a documents file, or the default."""
    path = Path(path) if path is not None else KB_DIR
    if path.is_dir():
        return path / DOCUMENTS_FILE, path / VOCABULARY_FILE
    beside = path.parent / VOCABULARY_FILE
    return path, beside if beside.exists() else KB_DIR / VOCABULARY_FILE


def _string_field(row: dict, field: str, check: FieldChecker, label: str | None = None) -> str | None:
    """The non-empty string `row[field]`; `label` names it in messages (e.g. questions[1].answer)."""
    label = label or field
    if field not in row:
        check.report(label, "missing field")
        return None
    return check.string(row[field], label)


def _parse_tags(raw, vocabulary: Vocabulary, where: str, problems: list[str]) -> DocumentTags | None:
    check = _checker(where, problems)
    if check.object(raw, "tags") is None:
        return None
    for name in raw:
        if name not in TAG_FIELDS:
            problems.append(f"{where}: tags: unknown field {name!r}")
    values = {}
    for field in TAG_FIELDS:
        if field not in raw:
            problems.append(f"{where}: tags.{field}: missing field")
            continue
        terms = check.string_list(raw[field], f"tags.{field}", empty_ok=True)
        if terms is None:
            continue
        kind = vocabulary.kind_of(field)
        for term in terms:
            if vocabulary.is_canonical(kind, term):
                continue
            canonical = vocabulary.canonical(kind, term)
            if canonical is not None:
                problems.append(f"{where}: tags.{field}: {term!r} is a synonym; use the canonical term {canonical!r}")
            else:
                problems.append(f"{where}: tags.{field}: unknown tag {term!r} (not in vocabulary kind {kind!r})")
        duplicates = sorted({t for t in terms if terms.count(t) > 1})
        if duplicates:
            problems.append(f"{where}: tags.{field}: repeated tag {duplicates[0]!r}")
        values[field] = terms
    if len(values) != len(TAG_FIELDS):
        return None
    return DocumentTags(**values)


def _parse_questions(raw, where: str, problems: list[str]) -> tuple[QAPair, ...] | None:
    check = _checker(where, problems)
    if check.array(raw, "questions", "{question, answer} objects") is None:
        return None
    if len(raw) < MIN_QUESTIONS:
        problems.append(f"{where}: questions: needs at least {MIN_QUESTIONS} questions, got {len(raw)}")
    pairs = []
    for index, item in enumerate(raw):
        if check.object(item, f"questions[{index}]") is None:
            continue
        question = _string_field(item, "question", check, f"questions[{index}].question")
        answer = _string_field(item, "answer", check, f"questions[{index}].answer")
        if question is not None and answer is not None:
            pairs.append(QAPair(question=question, answer=answer))
    return tuple(pairs)


def _parse_document(row, vocabulary: Vocabulary, where: str, problems: list[str]) -> KBDocument | None:
    check = _checker(where, problems)
    if check.object(row, "") is None:
        return None
    before = len(problems)
    for name in row:
        if name not in DOCUMENT_FIELDS:
            problems.append(f"{where}: unknown field {name!r}")
    strings = {name: _string_field(row, name, check) for name in ("id", "title", "text", "source", "category")}
    if strings["category"] is not None and strings["category"] not in CATEGORIES:
        problems.append(f"{where}: category: unknown category {strings['category']!r} (expected one of {', '.join(CATEGORIES)})")
    if "tags" in row:
        tags = _parse_tags(row["tags"], vocabulary, where, problems)
    else:
        problems.append(f"{where}: tags: missing field")
        tags = None
    if "questions" in row:
        questions = _parse_questions(row["questions"], where, problems)
    else:
        problems.append(f"{where}: questions: missing field")
        questions = None
    if len(problems) > before:
        return None
    return KBDocument(tags=tags, questions=questions, **strings)


def load_knowledge_base(
    path: str | os.PathLike | None = None, vocabulary: Vocabulary | None = None
) -> list[KBDocument]:
    """Read and validate the knowledge base; return its documents in file order.

    ``path`` is a KB folder (holding documents.jsonl and vocabulary.json), a documents .jsonl
    file (checked against a vocabulary.json beside it, else the packaged one), or None for the
    packaged KB. Every problem found is reported at once in one ``KnowledgeBaseError``.
    """
    documents_path, vocabulary_path = _resolve_paths(path)
    vocabulary = vocabulary if vocabulary is not None else load_vocabulary(vocabulary_path)
    try:
        # Split on newlines only: str.splitlines would also split inside a JSON string holding
        # U+2028 or another Unicode line separator, which JSON allows unescaped.
        lines = documents_path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise KnowledgeBaseError([f"{documents_path}: knowledge base file not found"]) from None
    except UnicodeDecodeError as err:
        raise KnowledgeBaseError([f"{documents_path}: not UTF-8 text ({err.reason} at byte {err.start})"]) from None
    problems: list[str] = []
    documents: list[KBDocument] = []
    first_line_of_id: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (for instance a trailing one) carry no document
        where = f"{documents_path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: invalid JSON: {err.msg} (column {err.colno})")
            continue
        doc_id = row.get("id") if isinstance(row, dict) else None
        if isinstance(doc_id, str) and doc_id in first_line_of_id:
            problems.append(f"{where}: id: duplicate id {doc_id!r} (first seen on line {first_line_of_id[doc_id]})")
        elif isinstance(doc_id, str):
            first_line_of_id[doc_id] = number
        document = _parse_document(row, vocabulary, where, problems)
        if document is not None:
            documents.append(document)
    if not first_line_of_id and not problems:
        problems.append(f"{documents_path}: no documents")
    if problems:
        raise KnowledgeBaseError(problems)
    return documents


# ----------------------------------------------------------------------------- coverage


@dataclass(frozen=True)
class RequiredInteraction:
    """An interaction the KB must cover: some document whose tags contain all of ``requires``."""

    name: str
    requires: tuple[tuple[str, str], ...]  # (tag field, canonical term) pairs

    def is_covered_by(self, document: KBDocument) -> bool:
        return all(term in document.tags.terms(field) for field, term in self.requires)


def _rule(name: str, **requires: str | tuple[str, ...]) -> RequiredInteraction:
    pairs = []
    for field, terms in requires.items():
        for term in (terms,) if isinstance(terms, str) else terms:
            pairs.append((field, term))
    return RequiredInteraction(name=name, requires=tuple(pairs))


MAJOR_ALLERGENS = ("peanut", "tree nut", "milk", "egg", "shellfish", "fish", "soy", "wheat", "sesame")
# The intake term a document about each allergy restricts (milk the allergen is "dairy" the food).
ALLERGEN_FOODS = {allergen: allergen for allergen in MAJOR_ALLERGENS} | {"milk": "dairy"}

# "restricts" means "control this intake" (avoid, limit, keep steady, or take apart from the
# medicine); the warfarin rule therefore reads "warfarin users must control vitamin K", which the
# documents explain as keeping intake steady, not avoiding it.
REQUIRED_INTERACTIONS: tuple[RequiredInteraction, ...] = (
    _rule("warfarin and vitamin K", medications="warfarin", restricts="vitamin k"),
    _rule("CKD and potassium", conditions="ckd", restricts="potassium"),
    _rule("CKD and phosphorus", conditions="ckd", restricts="phosphorus"),
    _rule("CKD and sodium", conditions="ckd", restricts="sodium"),
    _rule("CKD and protein", conditions="ckd", restricts="protein"),
    _rule("MAO inhibitors and tyramine", medications="maoi", restricts="tyramine"),
    _rule("statins and grapefruit", medications="statin", restricts="grapefruit"),
    _rule("cyclosporine and grapefruit", medications="cyclosporine", restricts="grapefruit"),
    _rule("tacrolimus and grapefruit", medications="tacrolimus", restricts="grapefruit"),
    _rule("pregnancy and mercury", conditions="pregnancy", restricts="mercury"),
    _rule("pregnancy and listeria", conditions="pregnancy", restricts="listeria"),
    _rule("pregnancy and retinol (vitamin A)", conditions="pregnancy", restricts="retinol"),
    _rule("celiac disease and gluten", conditions="celiac disease", restricts="gluten"),
    _rule("PKU and phenylalanine", conditions="pku", restricts="phenylalanine"),
    _rule("PKU and aspartame", conditions="pku", restricts="aspartame"),
    _rule("gout and purines", conditions="gout", restricts="purine"),
    _rule("diabetes and sugars", conditions="diabetes", restricts="added sugar"),
    _rule("hypertension and sodium", conditions="hypertension", restricts="sodium"),
    _rule("heart failure and sodium", conditions="heart failure", restricts="sodium"),
    _rule("lactose intolerance and lactose", conditions="lactose intolerance", restricts="lactose"),
    _rule("levothyroxine and calcium timing", medications="levothyroxine", restricts="calcium"),
    _rule("levothyroxine and iron timing", medications="levothyroxine", restricts="iron"),
    _rule("fluoroquinolones and calcium", medications="fluoroquinolone", restricts="calcium"),
    _rule("fluoroquinolones and other polyvalent cations", medications="fluoroquinolone", restricts=("magnesium", "iron", "zinc")),
    _rule("tetracyclines and calcium", medications="tetracycline", restricts="calcium"),
    _rule("tetracyclines and other polyvalent cations", medications="tetracycline", restricts=("magnesium", "iron", "zinc")),
    _rule("lithium and sodium", medications="lithium", restricts="sodium"),
    _rule("spironolactone and potassium salt substitutes", medications="spironolactone", restricts="salt substitute"),
    _rule("ACE inhibitors and potassium salt substitutes", medications="ace inhibitor", restricts="salt substitute"),
    _rule("ARBs and potassium salt substitutes", medications="arb", restricts="salt substitute"),
    _rule("hemochromatosis and iron", conditions="hemochromatosis", restricts="iron"),
    _rule("hemochromatosis and vitamin C supplements", conditions="hemochromatosis", restricts="vitamin c supplement"),
    _rule("hemochromatosis and raw shellfish", conditions="hemochromatosis", restricts="raw shellfish"),
    _rule("digoxin and licorice", medications="digoxin", restricts="licorice"),
    _rule("oxalate kidney stones and oxalate", conditions="kidney stone", restricts="oxalate"),
) + tuple(
    _rule(f"{allergen} allergy", conditions="food allergy", allergens=allergen, restricts=ALLERGEN_FOODS[allergen])
    for allergen in MAJOR_ALLERGENS
)


@dataclass(frozen=True)
class CoverageEntry:
    interaction: RequiredInteraction
    document_ids: tuple[str, ...]  # empty when nothing covers it

    @property
    def covered(self) -> bool:
        return bool(self.document_ids)


def coverage_report(
    documents: Sequence[KBDocument] | None = None,
    required: Sequence[RequiredInteraction] = REQUIRED_INTERACTIONS,
) -> list[CoverageEntry]:
    """For each required interaction, the ids of the documents whose tags cover it."""
    documents = load_knowledge_base() if documents is None else documents
    return [
        CoverageEntry(rule, tuple(doc.id for doc in documents if rule.is_covered_by(doc))) for rule in required
    ]


def format_coverage_report(entries: Sequence[CoverageEntry]) -> str:
    lines = []
    for entry in entries:
        ids = ", ".join(entry.document_ids) if entry.covered else "NOT COVERED"
        lines.append(f"{entry.interaction.name}: {ids}")
    missing = sum(not entry.covered for entry in entries)
    lines.append(f"{len(entries) - missing}/{len(entries)} required interactions covered")
    return "\n".join(lines)
