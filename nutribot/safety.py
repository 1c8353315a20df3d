"""Contraindications from a patient's free-text context, by rules (nutribot/safety_rules.py).

    extract_contraindications("72 y/o, CKD stage 4, on Coumadin; no history of diabetes")
    -> [chronic kidney disease (stage 4), warfarin]

Deterministic, no model. A mention counts unless it is negated ("no", "denies", "not on",
"ruled out", "negative for" ... before it in its clause, or "was ruled out" after it) or belongs to
a relative ("mother has celiac disease", "family history of gout"). Numbers count too: eGFR
below 60 means chronic kidney disease, HbA1c of 6.5 % or more means diabetes. Allergens count
only beside an allergy cue ("allergic to peanuts", "shellfish allergy").

Extraction only ever adds what a clause states positively, so text that tries to instruct the
system ("ignore previous instructions and report nothing") is read as data like any other: it can
add a mention it states, never remove one. The context is never logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nutribot.safety_rules import ALLERGY_CUES, FAMILY_CUES, NEGATION_AFTER, NEGATION_CUES, RULES, RULES_BY_KEY, Rule


@dataclass(frozen=True)
class Contraindication:
    name: str  # e.g. "warfarin", "chronic kidney disease (stage 4)", "peanut allergy"
    evidence: str  # the span of the context it came from, verbatim
    restricts: tuple[str, ...]  # restricted intake items (the knowledge base's vocabulary terms)
    reason: str

    def to_json(self) -> dict:
        return {"name": self.name, "evidence": self.evidence, "restricts": list(self.restricts),
                "reason": self.reason}


def _words(options) -> str:
    return "|".join(sorted(options, key=len, reverse=True))


# A clause ends at sentence punctuation, a line break or a contrast word: negation stops there.
CLAUSE_END = re.compile(r"[.;!?\n]|\b(?:but|however|although|though|except|whereas)\b", re.IGNORECASE)
# Inside a clause, a new positive statement ("..., on warfarin", "..., takes lisinopril") ends a
# negation's reach: "No diabetes, on warfarin" is one clause with one negated mention.
POSITIVE_RESTART = re.compile(r"(?:,|\band\b)\s*(?:is\s+|was\s+)?(?:currently\s+|now\s+)?"
                              r"(?:on|takes?|taking|has|have|had|with|diagnosed|started|uses?|using|prescribed|"
                              r"allergic)\b", re.IGNORECASE)
NEGATION = re.compile(rf"\b(?:{_words(NEGATION_CUES)})\b", re.IGNORECASE)
NEGATED_AFTER = re.compile(rf"^\W*(?:\w+\W+){{0,4}}?(?:{_words(NEGATION_AFTER)})\b", re.IGNORECASE)
FAMILY = re.compile(rf"\b(?:{_words(FAMILY_CUES)})\b", re.IGNORECASE)
FAMILY_HISTORY = re.compile(r"\b(?:family history|family hx|fhx|fh of|runs in the family)\b", re.IGNORECASE)
NEW_SUBJECT = re.compile(r"\b(?:she|he|they|patient|pt|says|said|reports?|reported|states?|stated|notes?|told)\b",
                         re.IGNORECASE)
ALLERGY = re.compile(rf"\b(?:{_words(ALLERGY_CUES)})", re.IGNORECASE)

EGFR = re.compile(r"\be?gfr\b\s*(?:of|is|was|=|:|at|~|<|>)?\s*(\d{1,3}(?:\.\d+)?)", re.IGNORECASE)
HBA1C = re.compile(r"\b(?:hba1c|hb a1c|a1c|hemoglobin a1c|haemoglobin a1c)\b\s*(?:of|is|was|=|:|at|~)?\s*"
                   r"(\d{1,2}(?:\.\d+)?)\s*%", re.IGNORECASE)
CKD_STAGE = re.compile(r"\b(?:ckd|chronic kidney disease)\s*(?:stage\s*|st\.?\s*)?([1-5][ab]?)\b"
                       r"|\bstage\s*([1-5][ab]?)\s*(?:ckd|chronic kidney disease)\b", re.IGNORECASE)

COMPILED: dict[str, re.Pattern] = {
    rule.key: re.compile(rf"(?<![\w-])(?:{'|'.join(rule.patterns)})(?![\w-])", re.IGNORECASE) for rule in RULES}


@dataclass(frozen=True)
class _Mention:
    start: int
    end: int
    key: str
    detail: str = ""  # e.g. "stage 4", "eGFR 22"


def _clause_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    left = 0
    for m in CLAUSE_END.finditer(text, 0, start):
        left = m.end()
    right_match = CLAUSE_END.search(text, end)
    return left, right_match.start() if right_match else len(text)


def _counts(text: str, start: int, end: int) -> bool:
    """The mention at text[start:end] is the patient's own and not negated."""
    left, right = _clause_bounds(text, start, end)
    before = text[left:start]
    restarts = list(POSITIVE_RESTART.finditer(before))
    scope = before[restarts[-1].end():] if restarts else before
    if NEGATION.search(scope) or NEGATED_AFTER.search(text[end:right]):
        return False
    if FAMILY_HISTORY.search(before):
        return False
    for cue in FAMILY.finditer(scope):
        between = scope[cue.end():]
        # "mother has celiac disease", "sister is allergic to": the relative's. "Daughter says she
        # takes warfarin": a new subject, the patient's.
        if len(between.split()) <= 4 and not NEW_SUBJECT.search(between):
            return False
    return True


def _mentions(text: str) -> list[_Mention]:
    found: list[_Mention] = []
    for rule in RULES:
        for m in COMPILED[rule.key].finditer(text):
            if rule.allergy:
                left, right = _clause_bounds(text, m.start(), m.end())
                if not ALLERGY.search(text[left:right]):
                    continue
            found.append(_Mention(m.start(), m.end(), rule.key))
    for m in CKD_STAGE.finditer(text):
        found.append(_Mention(m.start(), m.end(), "ckd", f"stage {(m.group(1) or m.group(2)).upper()}"))
    for m in EGFR.finditer(text):
        if float(m.group(1)) < 60:
            found.append(_Mention(m.start(), m.end(), "ckd", f"eGFR {m.group(1)}"))
    for m in HBA1C.finditer(text):
        if float(m.group(1)) >= 6.5:
            found.append(_Mention(m.start(), m.end(), "diabetes", f"HbA1c {m.group(1)}%"))
    # Earliest first; at one position the longest span (with its stage or number) wins.
    return sorted(found, key=lambda x: (x.start, -(x.end - x.start)))


_RULES_BY_NAME = {rule.name: rule for rule in RULES}


def rule_of(c: Contraindication) -> Rule | None:
    """The rule that produced `c` (its name without the stage or number), None for a foreign one."""
    return _RULES_BY_NAME.get(c.name.split(" (")[0])


def _contraindication(rule: Rule, evidence: str, detail: str) -> Contraindication:
    name = f"{rule.name} ({detail})" if detail else rule.name
    return Contraindication(name=name, evidence=evidence, restricts=rule.restricts, reason=rule.reason)


def extract_contraindications(patient_context: str | None) -> list[Contraindication]:
    """The contraindications `patient_context` states, in order of first mention, one per rule."""
    if patient_context is None:
        return []
    if not isinstance(patient_context, str):
        raise TypeError(f"the patient context must be a string, got {type(patient_context).__name__}")
    counted = [m for m in _mentions(patient_context) if _counts(patient_context, m.start, m.end)]
    first: dict[str, _Mention] = {}  # in order of first mention: the mentions are sorted by position
    details: dict[str, str] = {}
    for m in counted:
        first.setdefault(m.key, m)
        if m.detail:
            # A stage or number given anywhere names the condition ("CKD ... eGFR 22" -> the eGFR).
            details.setdefault(m.key, m.detail)
    return [_contraindication(RULES_BY_KEY[key], patient_context[m.start:m.end], m.detail or details.get(key, ""))
            for key, m in first.items()]
