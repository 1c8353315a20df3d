"""Warnings on documents and answers, and the order of documents, for a patient's contraindications.

- Every document that names an item restricted for the patient (the item, a vocabulary synonym or
  an everyday food for it: "kale" for vitamin K) carries a warning naming the contraindication and
  the item.
- A document about the restriction itself is the most useful one: it comes first, with its
  warning. Either the knowledge base tags it as restricting the item for this very condition or
  medicine (tags `restricts` and `conditions` / `medications` / `allergens`), or its title and text
  name both the contraindication and the item ("vitamin K ... warfarin").
- A document that encourages a restricted item (tagged `encourages`, or, for untagged passages
  such as PDF text, "eat more" / "good source of" in a sentence naming it) comes after all others.
- Items are matched as whole words, case-insensitive, with plurals: the item, its vocabulary
  synonyms, its everyday foods (safety_rules.FOODS).
- An answer gets a warning for every restricted item it names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clara.data.knowledge_base import load_vocabulary

from nutribot.safety import ALLERGY, COMPILED, Contraindication, rule_of
from nutribot.safety_rules import FOODS, RULES_BY_KEY

ENCOURAGE_CUES = re.compile(r"\b(?:eat more|eating more|include more|add more|increase (?:your )?(?:intake|"
                            r"consumption)|aim for more|load up on|good choices? (?:include|are)|try to eat|"
                            r"enjoy more|choose more|(?:good|great|excellent|rich) sources? of)\b",
                            re.IGNORECASE)
SENTENCE = re.compile(r"[^.!?\n]+")


_vocabulary = functools.lru_cache(maxsize=1)(load_vocabulary)  # read the file once


@functools.lru_cache(maxsize=1)
def _intake_synonyms() -> dict[str, tuple[str, ...]]:
    return {term: tuple(syns) for term, syns in _vocabulary().terms["intake"].items()}


@functools.cache
def item_terms(item: str) -> tuple[str, ...]:
    """Every word that names `item`: itself, its vocabulary synonyms, its everyday foods; longest first."""
    words = {item, *_intake_synonyms().get(item, ()), *FOODS.get(item, ())}
    return tuple(sorted({w.lower() for w in words}, key=len, reverse=True))


@functools.cache
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
    # A word can name two of a contraindication's items ("salt substitute" is its own item and a
    # potassium food): it is listed once.
    return list(dict.fromkeys(warning_text(c, *dict.fromkeys(words)) for c, words in grouped.values()))


@dataclass
class FilteredDocument:
    document: Any  # the mapping given
    warnings: list[str] = field(default_factory=list)
    encourages_restricted: bool = False
    about_restriction: bool = False


def _tag_terms(document: Mapping, field_name: str) -> tuple[str, ...]:
    tags = document.get("tags") or {}
    return tuple(t for t in (tags.get(field_name, ()) or ()) if t)


def _names_item(tag: str, item: str) -> bool:
    """A tag term names the item: "spinach" names vitamin k (one of its foods), "vitamin k" names itself.
    Not the other way: a tag "alcohol" does not name beer, nor "lactose-free dairy" lactose."""
    return bool(_item_pattern(item).fullmatch(tag))


def _tagged_items(document: Mapping, field_name: str, c: Contraindication) -> list[str]:
    tags = _tag_terms(document, field_name)
    return [item for item in c.restricts if any(_names_item(t, item) for t in tags)]


def _sentences_with(text: str, pattern: re.Pattern) -> list[str]:
    return [s.group(0) for s in SENTENCE.finditer(text) if pattern.search(s.group(0))]


def _names_contraindication(text: str, c: Contraindication) -> bool:
    """The text names the contraindication itself (its rule's words, or its knowledge-base terms)."""
    rule = rule_of(c)
    if rule is None:
        return c.name.split(" (")[0].lower() in text.lower()
    if rule.allergy:
        return any(ALLERGY.search(s) for s in _sentences_with(text, COMPILED[rule.key]))
    return bool(COMPILED[rule.key].search(text) or _kb_names_pattern(rule.key).search(text))


@functools.cache
def _kb_names_pattern(rule_key: str) -> re.Pattern:
    """The vocabulary's names for the rule's condition and medication terms ("kidney disease" for ckd)."""
    terms = _vocabulary().terms
    names = {name for kind in ("condition", "medication") for term in RULES_BY_KEY[rule_key].kb_terms
             if term in terms[kind] for name in (term, *terms[kind][term])}
    if not names:
        return re.compile(r"(?!)")  # matches nothing
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?:e?s)?(?![\w-])", re.IGNORECASE)


def _about_restriction(document: Mapping, text: str, c: Contraindication, mentioned: set[str]) -> bool:
    """The KB tags the document as restricting the item for this very condition or medicine, or
    its text names both the contraindication and the item."""
    rule = rule_of(c)
    for_this = rule is not None and any(
        t in rule.kb_terms for f in ("conditions", "medications", "allergens") for t in _tag_terms(document, f))
    if for_this and _tagged_items(document, "restricts", c):
        return True
    return bool(mentioned) and _names_contraindication(text, c)


def _encourages(document: Mapping, text: str, c: Contraindication, mentioned: set[str]) -> list[str]:
    """Restricted items the document encourages: by its tags, or (untagged passages, e.g. from a PDF)
    by an "eat more" cue in a sentence that names the item."""
    items = _tagged_items(document, "encourages", c)
    if not document.get("tags"):
        items += [item for item in sorted(mentioned)
                  if any(ENCOURAGE_CUES.search(s) for s in _sentences_with(text, _item_pattern(item)))]
    return items


def filter_documents(documents: Sequence[Mapping], contraindications: Sequence[Contraindication], *,
                     demote: bool = True) -> list[FilteredDocument]:
    """Every document with its warnings, none dropped. With `demote`: the documents about a
    restriction first, then the others in the given order, then those that encourage a restricted
    item (stable within each group); without it, the given order."""
    results = []
    for document in documents:
        text = f"{document.get('title') or ''}\n{document.get('text') or ''}"
        mentions = restricted_mentions(text, contraindications)
        result = FilteredDocument(document)
        for c in contraindications:
            mentioned = {restricted_item_of(c, w) for c2, w in mentions if c2 is c}
            encouraged = _encourages(document, text, c, mentioned)
            # A tag alone (no word in the text) still earns a warning: the reader must not miss it.
            for item in [*encouraged, *_tagged_items(document, "restricts", c)]:
                if item not in mentioned:
                    mentions.append((c, item))
                    mentioned.add(item)
            result.encourages_restricted |= bool(encouraged)
            result.about_restriction |= _about_restriction(document, text, c, mentioned)
        result.warnings = _warnings(mentions)
        results.append(result)
    if not demote:
        return results
    about = [f for f in results if f.about_restriction and not f.encourages_restricted]
    neutral = [f for f in results if not f.about_restriction and not f.encourages_restricted]
    return about + neutral + [f for f in results if f.encourages_restricted]


def answer_warnings(answer: str, contraindications: Sequence[Contraindication]) -> list[str]:
    """A warning for every restricted item the answer names."""
    return _warnings(restricted_mentions(answer, contraindications))
