"""How the data tools check the type of a JSON value, and the words their messages use for it.

Every reader of JSON input in clara.data (stage files, the nutrition knowledge base and its
vocabulary, the PubMedQA and MedQuAD converters) checks field types through `FieldChecker`, so a
wrong value gets the same message wherever it occurs: `expected a string, got number`,
`empty string`, `empty list`, `expected a JSON object, got array`. Types are named as JSON names
them (`json_type_name`), not as Python does, because the person reading the message wrote JSON.

The checker does not know where a value came from: it hands each problem, as (field, message), to
the `report` callback of its caller, which adds the file, the line and its own field prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def json_type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, as used in messages ("got array")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class FieldChecker:
    """Checks decoded JSON values; each method returns the value converted, or None after
    reporting why it is not acceptable through `report(field, message)`."""

    def __init__(self, report: Callable[[str, str], None]):
        self.report = report

    def string(self, value: Any, field: str, *, empty_ok: bool = False) -> str | None:
        """A string; unless `empty_ok`, one with something besides whitespace."""
        if not isinstance(value, str):
            self.report(field, f"expected a string, got {json_type_name(value)}")
            return None
        if not empty_ok and not value.strip():
            self.report(field, "empty string")
            return None
        return value

    def string_list(self, value: Any, field: str, *, bare_string_ok: bool = False,
                    empty_ok: bool = False) -> tuple[str, ...] | None:
        """A list of non-empty strings (a bare string as a one-item list if `bare_string_ok`;
        an empty list only if `empty_ok`). Each bad item is reported as `field[i]`."""
        if isinstance(value, str) and bare_string_ok:
            item = self.string(value, field)
            return None if item is None else (item,)
        if not isinstance(value, list):
            expected = "a string or a list of strings" if bare_string_ok else "a list of strings"
            self.report(field, f"expected {expected}, got {json_type_name(value)}")
            return None
        if not value and not empty_ok:
            self.report(field, "empty list")
            return None
        items = [self.string(item, f"{field}[{i}]") for i, item in enumerate(value)]
        return None if any(item is None for item in items) else tuple(items)

    def integer(self, value: Any, field: str) -> int | None:
        """A whole number (JSON true and false are not numbers, although Python counts them)."""
        if isinstance(value, bool) or not isinstance(value, int):
            self.report(field, f"expected an integer, got {json_type_name(value)}")
            return None
        return value

    def object(self, value: Any, field: str) -> dict[str, Any] | None:
        """A JSON object."""
        if not isinstance(value, dict):
            self.report(field, f"expected a JSON object, got {json_type_name(value)}")
            return None
        return value

    def array(self, value: Any, field: str, items: str) -> list[Any] | None:
        """A JSON array, its items unchecked; `items` names what it should hold, for the message
        ("integers" -> "expected a list of integers, got object")."""
        if not isinstance(value, list):
            self.report(field, f"expected a list of {items}, got {json_type_name(value)}")
            return None
        return value
