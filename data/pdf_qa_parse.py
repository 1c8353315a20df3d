"""Read question-answer pairs and paraphrases out of a language model's reply.

Models asked for JSON answer in many shapes: a bare list, a list inside ```json fences, a list
followed by "I hope this helps", an object wrapping the list, or plain "Q: ... A: ..." lines. We
try, in order: each fenced block, then the whole reply, as JSON (decoding from every "[" or "{"
until one decodes into a recognised shape); then Q/A lines. Pairs that are incomplete, empty,
placeholders ("...") or repeats are dropped and counted, never repaired by guessing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.S)
_QUESTION_KEYS = ("question", "q", "query")
_ANSWER_KEYS = ("answer", "a", "answers", "response")
_LIST_KEYS = ("pairs", "qa_pairs", "qa", "questions", "items", "data", "results")
_MAX_JSON_STARTS = 50  # decoding attempts per text; a long non-JSON reply must stay cheap
_LABEL = r"(?:[-*\u2022]\s+|\d+[.)]\s*)?\**\s*{word}\s*\d*\s*\**\s*[:\uff1a]\s*\**\s*(.*)$"
_Q_LINE = re.compile(_LABEL.format(word="(?:q|question)"), re.I)
_A_LINE = re.compile(_LABEL.format(word="(?:a|answer)"), re.I)
_INLINE_ANSWER = re.compile(r"\s+\**(?:a|answer)\**\s*:\s*\**\s*", re.I)


@dataclass
class ParsedPairs:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    invalid: int = 0  # candidate pairs found but dropped (incomplete, empty, repeated)


def _fences(reply: str) -> list[str]:
    return [m.group(1) for m in _FENCE.finditer(reply)]


def _get(item: dict, keys: tuple[str, ...]):
    lowered = {str(k).lower(): v for k, v in item.items()}
    for key in keys:
        if key in lowered:
            return lowered[key]
    return None


def _as_text(value) -> str | None:
    """The text a model meant by `value`, or None. Deliberately lenient, unlike the strict field
    checks of clara.data.json_fields that files get: a reply's JSON is read for what it says, and
    what it says is then filtered by `_validated`."""
    if isinstance(value, list):  # {"answers": ["x"]}: the first non-empty string
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) else None


def _pairs_from_json(obj) -> list[tuple[str | None, str | None]] | None:
    """Raw (question, answer) candidates from a decoded JSON value; None when not a QA shape."""
    if isinstance(obj, list):
        if not obj:
            return None
        raw = []
        for item in obj:
            if isinstance(item, dict):
                raw.append((_as_text(_get(item, _QUESTION_KEYS)),
                            _as_text(_get(item, _ANSWER_KEYS))))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                raw.append((_as_text(item[0]), _as_text(item[1])))
            else:
                raw.append((None, None))
        if all(q is None and a is None for q, a in raw):
            return None
        return raw
    if isinstance(obj, dict):
        questions, answers = _get(obj, ("questions",)), _get(obj, ("answers",))
        if isinstance(questions, list) and isinstance(answers, list) and all(
            isinstance(q, str) for q in questions
        ):
            n = max(len(questions), len(answers))
            padded_q = questions + [None] * (n - len(questions))
            padded_a = answers + [None] * (n - len(answers))
            return [(_as_text(q), _as_text(a)) for q, a in zip(padded_q, padded_a)]
        question, answer = _get(obj, _QUESTION_KEYS), _get(obj, _ANSWER_KEYS)
        if isinstance(question, str):
            return [(question, _as_text(answer))]
        for key in _LIST_KEYS:
            inner = _get(obj, (key,))
            if isinstance(inner, list):
                return _pairs_from_json(inner)
    return None


def _json_candidates(text: str) -> list[tuple[str | None, str | None]] | None:
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch in "[{"][:_MAX_JSON_STARTS]
    for start in starts:
        try:
            obj, _ = decoder.raw_decode(text, start)  # ignores whatever prose follows
        except json.JSONDecodeError:
            continue
        raw = _pairs_from_json(obj)
        if raw is not None:
            return raw
    return None


def _line_candidates(text: str) -> list[tuple[str | None, str | None]]:
    raw: list[list[str | None]] = []
    field_open: str | None = None  # "q" or "a": which field continuation lines extend
    for line in text.splitlines():
        stripped = line.strip()
        q_match, a_match = _Q_LINE.match(stripped), _A_LINE.match(stripped)
        if q_match:
            question = q_match.group(1)
            inline = _INLINE_ANSWER.split(question, maxsplit=1)  # "Q: ... A: ..." on one line
            raw.append([inline[0], inline[1] if len(inline) == 2 else None])
            field_open = "a" if len(inline) == 2 else "q"
        elif a_match:
            if raw and raw[-1][1] is None:
                raw[-1][1] = a_match.group(1)
            else:
                raw.append([None, a_match.group(1)])  # an answer with no question
            field_open = "a"
        elif not stripped:
            field_open = None  # a blank line ends a field: what follows is prose, not answer
        elif field_open == "q":
            raw[-1][0] = f"{raw[-1][0]} {stripped}"
        elif field_open == "a":
            raw[-1][1] = f"{raw[-1][1]} {stripped}"
    return [(q, a) for q, a in raw]


def _clean(text: str | None) -> str:
    if text is None:
        return ""
    text = " ".join(text.split()).strip()
    return text.strip("*").strip()


def _meaningful(text: str) -> bool:
    # Placeholders copied from the prompt's example ("...", "<answer>") carry no letters/digits
    # outside angle brackets.
    return bool(re.search(r"[A-Za-z0-9]", re.sub(r"<[^>]*>", "", text)))


def _validated(raw: list[tuple[str | None, str | None]], limit: int | None) -> ParsedPairs:
    result = ParsedPairs()
    seen: set[str] = set()
    for question, answer in raw:
        q, a = _clean(question), _clean(answer)
        key = q.lower()
        if not (_meaningful(q) and _meaningful(a)) or len(q.split()) < 2 or key in seen:
            result.invalid += 1
            continue
        seen.add(key)
        result.pairs.append((q, a))
    if limit is not None and len(result.pairs) > limit:
        result.pairs = result.pairs[:limit]  # extra valid pairs are not counted as invalid
    return result


def parse_qa_pairs(reply: str, limit: int | None = None) -> ParsedPairs:
    """Valid, distinct (question, answer) pairs in `reply`, at most `limit` of them."""
    for text in [*_fences(reply), reply]:
        raw = _json_candidates(text)
        if raw is not None:
            parsed = _validated(raw, limit)
            if parsed.pairs:
                return parsed
    without_fences = _FENCE.sub(lambda m: m.group(1), reply)
    return _validated(_line_candidates(without_fences), limit)


_PARAPHRASE_KEYS = ("paraphrase", "text", "rewritten", "passage", "output")


def parse_paraphrase(reply: str, passage: str) -> str | None:
    """The rewritten passage in `reply`, or None when the reply is not a usable paraphrase."""
    fences = _fences(reply)
    text = (fences[0] if fences else reply).strip()
    if text[:1] in "[{\"":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            obj = _get(obj, _PARAPHRASE_KEYS)
        if isinstance(obj, str):
            text = obj.strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):
        text = "\n".join(lines[1:]).strip()  # "Here is the passage in other words:"
    text = text.strip().strip('"').strip()
    words, source_words = text.split(), passage.split()
    if len(words) < max(3, len(source_words) // 5) or len(words) > 3 * len(source_words) + 50:
        return None  # a fragment, or a runaway generation
    if " ".join(words).lower() == " ".join(source_words).lower():
        return None  # copied, not paraphrased
    return text
