"""Warnings on documents and answers, and the order of documents, for a patient's contraindications.

- Every document that names an item restricted for the patient (the item, a vocabulary synonym or
  an everyday food for it: "kale" for vitamin K) carries a warning naming the contraindication and
  the item.
- A document about the restriction itself (the knowledge base tags it as restricting the item, or
  its text says to avoid / limit / keep steady beside the item) is the most useful one: it comes
  first, with its warning.
- A document that encourages a restricted item (tagged `encourages`, or "eat more ..." beside it)
  comes after all others.
- An answer gets a warning for every restricted item it names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clara.data.knowledge_base import load_vocabulary
from nutribot.safety import Contraindication
from nutribot.safety_rules import FOODS

ENCOURAGE_CUES = re.compile(r"\b(?:eat more|eating more|include more|add more|increase (?:your )?(?:intake|"
                            r"consumption)|aim for more|load up on|good choices? (?:include|are)|try to eat|"
                            r"enjoy more|choose more)\b", re.IGNORECASE)
RESTRICT_CUES = re.compile(r"\b(?:avoid\w*|limit\w*|restrict\w*|cut (?:back|down)|keep \w+(?: \w+)? steady|"
                           r"steady|interact\w*|interfere\w*|contraindicat\w*|do not|don't|should not|"
                           r"not recommended|unsafe|instead of|separate|apart from|lower|reduce\w*)\b", re.IGNORECASE)
SENTENCE = re.compile(r"[^.!?\n]+")


@functools.lru_cache(maxsize=1)
def _intake_synonyms() -> dict[str, tuple[str, ...]]:
    return {term: tuple(syns) for term, syns in load_vocabulary().terms["intake"].items()}


@functools.lru_cache(maxsize=None)
def item_terms(item: str) -> tuple[str, ...]:
    """Every word that names `item`: itself, its vocabulary synonyms, its everyday foods; longest first."""
    words = {item, *_vocabulary_synonyms(item), *FOODS.get(item, ())}
    return tuple(sorted({w.lower() for w in words}, key=len, reverse=True))


def _vocabulary_synonyms(item: str) -> tuple[str, ...]:
    return _intake_synonyms().get(item, ())


@functools.lru_cache(maxsize=None)
def _item_pattern(item: str) -> re.Pattern:
    alternatives = "|".join(re.escape(t) for t in item_terms(item))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?:e?s)?(?![\w-])", re.IGNORECASE)


def restricted_mentions(text: str, contraindications: Sequence[Contraindication]
                        ) -> list[tuple[Contraindication, str]]:
    """(contraindication, word) for every distinct word of `text` that names an item restricted by a
    contraindication, in the order of the contraindications, their items and the text."""
    out = []
    for c in contraindications:
        for item in c.restricts:
            words = dict.fromkeys(m.group(0).lower() for m in _item_pattern(item).finditer(text or ""))
            out += [(c, w) for w in words]
    return out


def restricted_item_of(c: Contraindication, word: str) -> str:
    """Which of c.restricts the word names (the first that does)."""
    for item in c.restricts:
        if _item_pattern(item).fullmatch(word):
            return item
    return word


def warning_text(c: Contraindication, *words: str) -> str:
    """One line naming the contraindication, the words used and the restricted item they name."""
    item = restricted_item_of(c, words[0])
    named = ", ".join(words)
    if list(words) != [item]:
        named += f" ({item})"
    return f"{c.name}: mentions {named}"


def _warnings(mentions: list[tuple[Contraindication, str]]) -> list[str]:
    """One warning per contraindication and restricted item, naming every word used for it."""
    grouped: dict[tuple[int, str], tuple[Contraindication, list[str]]] = {}
    for c, word in mentions:
        key = (id(c), restricted_item_of(c, word))
        grouped.setdefault(key, (c, []))[1].append(word)
    return list(dict.fromkeys(warning_text(c, *words) for c, words in grouped.values()))


@dataclass
class FilteredDocument:
    document: Any  # the mapping given
    warnings: list[str] = field(default_factory=list)
    encourages_restricted: bool = False
    about_restriction: bool = False


def _tag_terms(document: Mapping, field_name: str) -> tuple[str, ...]:
    tags = document.get("tags") or {}
    return tuple(tags.get(field_name, ()) or ())


def _sentences_with(text: str, pattern: re.Pattern) -> list[str]:
    return [s.group(0) for s in SENTENCE.finditer(text) if pattern.search(s.group(0))]


def filter_documents(documents: Sequence[Mapping], contraindications: Sequence[Contraindication]
                     ) -> list[FilteredDocument]:
    """The documents with their warnings: about-the-restriction first, then the others in the given
    order, then those that encourage a restricted item. Nothing is dropped."""
    about, neutral, encouraging = [], [], []
    for document in documents:
        text = f"{document.get('title', '')}\n{document.get('text', '')}"
        mentions = restricted_mentions(text, contraindications)
        result = FilteredDocument(document, _warnings(mentions))
        restricted = {(c.name, restricted_item_of(c, w)) for c, w in mentions}
        for _, item in restricted:
            pattern = _item_pattern(item)
            encouraged_tags = any(pattern.fullmatch(t) or _item_pattern(t).fullmatch(item)
                                  for t in _tag_terms(document, "encourages") if t)
            restricted_tags = any(pattern.fullmatch(t) or _item_pattern(t).fullmatch(item)
                                  for t in _tag_terms(document, "restricts") if t)
            sentences = _sentences_with(text, pattern)
            if restricted_tags or any(RESTRICT_CUES.search(s) for s in sentences):
                result.about_restriction = True
            if encouraged_tags or (not document.get("tags") and any(ENCOURAGE_CUES.search(s) for s in sentences)):
                result.encourages_restricted = True
        if result.encourages_restricted:
            encouraging.append(result)
        elif result.about_restriction:
            about.append(result)
        else:
            neutral.append(result)
    return about + neutral + encouraging


def answer_warnings(answer: str, contraindications: Sequence[Contraindication]) -> list[str]:
    """A warning for every restricted item the answer names."""
    return _warnings(restricted_mentions(answer, contraindications))
