"""The stage JSONL formats of CLaRa training, read and written as typed examples.

One JSON object per line. The layouts follow the official release (apple/ml-clara), whose loader
accepts several names for the same field; we accept the same names. There are three layouts
(data formats); which one a stage's files follow is its `Stage.data_format` in the stage table,
clara/stages.py (`example_class(stage)` gives the class):

| data format | layout | example class |
|---|---|---|
| stage1 (compression pretraining) | `{data_type: qa or paraphrase, question: [q..], answers: [a..], docs: [doc..]}` | `Stage1Example` |
| stage1_2 (instruction tuning) | `{question, docs: [k docs], answer and/or gold_answer}` | `Stage1_2Example` |
| stage2 (end to end, and retrieval pretraining) | `{question, docs: [N candidates], answer and/or gold_answer, pos_index: [i..]}` | `Stage2Example` |

Field names accepted:
- documents: `docs`, `context` or `content` (exactly one of them; a list of non-empty strings);
- stage1 answers: `answers`, `golden_answers`, `gold_answer` or `answer` (the first present;
  a list, one answer per question; a bare string counts as a one-item list, as does a bare
  string `question`). `data_type` defaults to qa. A paraphrase row's `question` is ignored
  whatever it holds, as the official reader never reads it (its target is the first answer);
- stage1_2 / stage2: `answer` is the generation target; `gold_answer`, `golden_answers` and
  `answers` (a string or a list of strings) are reference answers for scoring. Each example
  keeps the target (`answer`: the `answer` field, else the first reference) and every
  reference (`gold_answers`: all references in field order, else the target alone).
- `pos_index`: the indices of the positive candidates; required for a stage whose loss is
  retrieval (stage2_pretrain_retrieval), optional otherwise (the official end-to-end example
  files have none), never empty when given.
- `id`: optional, a string or an integer, kept as a string (our converters write it).
Any other field is ignored, as the official loader does. Field types are checked, and worded in
messages, by clara.data.json_fields like every other JSON input of clara.data.

Document counts: stage1 and stage1_2 rows must hold exactly `top_k` documents when a top_k is
given, and otherwise the same number on every row (the collator stacks them per batch); stage2
rows need at least `top_k` candidates to select from.

Every problem is reported with the file, the line number and the field, e.g.
`train.jsonl:12: pos_index[0]: 7 is out of range for 5 docs (0..4)`; a file is read to the end so
that all of its problems are reported at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from clara.data.json_fields import FieldChecker, json_type_name
from clara.files import atomic_write_jsonl, not_utf8_message, wide_encoding
from clara.stages import get_stage

DATA_TYPES = ("qa", "paraphrase")
DOC_FIELDS = ("docs", "context", "content")
STAGE1_ANSWER_FIELDS = ("answers", "golden_answers", "gold_answer", "answer")
REFERENCE_FIELDS = ("gold_answer", "golden_answers", "answers")
ROW_FIELD = "<row>"  # the field name used for problems with a whole line
FILE_FIELD = "<file>"  # ... and with the whole file
MAX_PROBLEMS_IN_MESSAGE = 100


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a stage file: where it is (file, line, field) and what it is."""

    path: str
    line: int | None  # 1-based; None for problems with the whole file
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.field}: {self.message}"


class ValidationError(ValueError):
    """Raised by the readers and writers with every problem found (see `.problems`)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        shown = [str(problem) for problem in self.problems[:MAX_PROBLEMS_IN_MESSAGE]]
        hidden = len(self.problems) - len(shown)
        if hidden:
            shown.append(f"... and {hidden} more (python -m clara.data.validate lists them all)")
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{len(self.problems)} {noun}:\n" + "\n".join(shown))

    @property
    def summary(self) -> str:
        """One line for a command's error: the first problem, and how to see the others."""
        first = str(self.problems[0]) if self.problems else "no problems recorded"
        more = len(self.problems) - 1
        if not more:
            return first
        return (f"{first} (and {more} more problem{'s' if more > 1 else ''}: "
                f"clara-data validate {self.problems[0].path} --stage STAGE lists them all)")


@dataclass(frozen=True)
class Stage1Example:
    """Compression pretraining: one or more documents and QA pairs (or a paraphrase) about them."""

    data_format: ClassVar[str] = "stage1"
    data_type: str  # "qa": answer each question from the memory; "paraphrase": restate the docs
    questions: tuple[str, ...]  # empty for paraphrase rows
    answers: tuple[str, ...]  # one per question for "qa"; answers[0] is the target for "paraphrase"
    docs: tuple[str, ...]
    id: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"data_type": self.data_type, "question": list(self.questions),
                               "answers": list(self.answers), "docs": list(self.docs)}
        if self.id is not None:
            row["id"] = self.id
        return row


@dataclass(frozen=True)
class Stage1_2Example:
    """Instruction tuning: a question, its k documents, the target answer and the references."""

    data_format: ClassVar[str] = "stage1_2"
    question: str
    docs: tuple[str, ...]
    answer: str  # the generation target
    gold_answers: tuple[str, ...]  # every accepted answer, for scoring
    id: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"question": self.question, "docs": list(self.docs),
                               "answer": self.answer, "golden_answers": list(self.gold_answers)}
        if self.id is not None:
            row["id"] = self.id
        return row


@dataclass(frozen=True)
class Stage2Example:
    """End to end: a question, N candidate documents, which of them are positive, the answer."""

    data_format: ClassVar[str] = "stage2"
    question: str
    docs: tuple[str, ...]  # the N candidates the query reasoner selects top-k from
    answer: str
    gold_answers: tuple[str, ...]
    pos_index: tuple[int, ...] = field(default=())  # empty when the file gives none (stage2 only)
    id: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"question": self.question, "docs": list(self.docs),
                               "answer": self.answer, "golden_answers": list(self.gold_answers)}
        if self.pos_index:
            row["pos_index"] = list(self.pos_index)
        if self.id is not None:
            row["id"] = self.id
        return row


Example = Union[Stage1Example, Stage1_2Example, Stage2Example]
# The example class of each data format; which format a stage's rows follow is the stage table's
# `Stage.data_format` (clara/stages.py), read through `example_class`.
FORMAT_CLASS: dict[str, type] = {cls.data_format: cls
                                 for cls in (Stage1Example, Stage1_2Example, Stage2Example)}


def check_stage(stage: str) -> None:
    get_stage(stage)  # a ValueError listing the stages


def example_class(stage: str) -> type:
    """The example class whose layout the rows of `stage` follow (a ValueError for an unknown
    stage)."""
    return FORMAT_CLASS[get_stage(stage).data_format]


class _RowChecker(FieldChecker):
    """Collects the problems of one row, as `Problem`s, while its fields are converted."""

    def __init__(self, path: str, line: int | None):
        super().__init__(self.add)
        self.path, self.line = path, line
        self.problems: list[Problem] = []

    def add(self, field_name: str, message: str) -> None:
        self.problems.append(Problem(self.path, self.line, field_name, message))

    def docs(self, row: dict[str, Any]) -> tuple[str, ...] | None:
        present = [name for name in DOC_FIELDS if name in row]
        if not present:
            self.add("docs", "missing (also accepted: context, content)")
            return None
        for extra in present[1:]:
            self.add(extra, f"given together with {present[0]!r}; keep only one document field")
        return self.string_list(row[present[0]], present[0], bare_string_ok=False)

    def row_id(self, row: dict[str, Any]) -> str | None:
        value = row.get("id")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.add("id", f"expected a string or an integer, got {json_type_name(value)}")
            return None
        return str(value)


def _parse_stage1(row: dict[str, Any], check: _RowChecker) -> Stage1Example | None:
    data_type = row.get("data_type", "qa")  # the official loader's default
    data_type = check.string(data_type, "data_type", empty_ok=True)
    if data_type is not None and data_type not in DATA_TYPES:
        check.add("data_type", f"{data_type!r} is not one of 'qa', 'paraphrase'")
        data_type = None
    docs = check.docs(row)

    answer_field = next((name for name in STAGE1_ANSWER_FIELDS if name in row), None)
    answers = None
    if answer_field is None:
        check.add("answers", "missing (also accepted: golden_answers, gold_answer, answer)")
    else:
        answers = check.string_list(row[answer_field], answer_field, bare_string_ok=True)

    questions: tuple[str, ...] | None = ()
    if data_type == "paraphrase":
        # A paraphrase row restates its documents. The official reader does not read `question`
        # on a row whose data_type is "paraphrase" (it uses ""), so any value, or none, is
        # accepted here and dropped: [""], "", null, [] or a list of anything.
        pass
    elif "question" not in row:
        check.add("question", "missing")
        questions = None
    else:
        questions = check.string_list(row["question"], "question", bare_string_ok=True)
        if questions is not None and answers is not None and len(questions) != len(answers):
            check.add(answer_field, f"{len(answers)} answers for {len(questions)} questions")
    row_id = check.row_id(row)
    if check.problems:
        return None
    return Stage1Example(data_type, questions, answers, docs, row_id)


def _parse_answers(row: dict[str, Any], check: _RowChecker) -> tuple[str | None, tuple[str, ...] | None]:
    """The generation target and every reference answer of a stage1_2/stage2 row."""
    target = check.string(row["answer"], "answer") if "answer" in row else None
    references: list[str] = []
    for name in REFERENCE_FIELDS:
        if name in row:
            values = check.string_list(row[name], name, bare_string_ok=True)
            references.extend(value for value in values or () if value not in references)
    if "answer" not in row and not any(name in row for name in REFERENCE_FIELDS):
        check.add("answer", "missing (also accepted: gold_answer, golden_answers, answers)")
        return None, None
    if target is None and not references:
        return None, None
    target = target if target is not None else references[0]
    return target, tuple(references) if references else (target,)


def _parse_pos_index(value: Any, n_docs: int | None, check: _RowChecker) -> tuple[int, ...] | None:
    if check.array(value, "pos_index", "integers") is None:
        return None
    if not value:
        check.add("pos_index", "empty list (a row needs at least one positive candidate)")
        return None
    seen: set[int] = set()
    ok = True
    for i, item in enumerate(value):
        name = f"pos_index[{i}]"
        if check.integer(item, name) is None:
            ok = False
        elif n_docs is not None and not 0 <= item < n_docs:
            check.add(name, f"{item} is out of range for {n_docs} docs (0..{n_docs - 1})")
            ok = False
        elif item in seen:
            check.add(name, f"{item} repeats an earlier entry")
            ok = False
        else:
            seen.add(item)
    return tuple(value) if ok else None


def _parse_question_row(row: dict[str, Any], stage: str, check: _RowChecker) -> Example | None:
    question = None
    if "question" not in row:
        check.add("question", "missing")
    elif isinstance(row["question"], list):
        # The usual cause is a stage1 file read as another stage: say so.
        check.add("question", f"expected a string, got array (a list of questions is the stage1 "
                              f"layout; is --stage {stage} right?)")
    else:
        question = check.string(row["question"], "question")
    docs = check.docs(row)
    answer, references = _parse_answers(row, check)
    pos_index: tuple[int, ...] | None = ()
    cls = example_class(stage)
    if cls is Stage2Example:
        if "pos_index" in row:
            pos_index = _parse_pos_index(row["pos_index"], len(docs) if docs else None, check)
        elif "retrieval" in get_stage(stage).losses:
            check.add("pos_index", f"missing (required for {stage}: its loss needs the positives)")
    row_id = check.row_id(row)
    if check.problems:
        return None
    if cls is Stage1_2Example:
        return Stage1_2Example(question, docs, answer, references, row_id)
    return Stage2Example(question, docs, answer, references, pos_index, row_id)


def parse_stage_row(row: Any, stage: str, path: str = "<row>", line: int | None = None
                    ) -> tuple[Example | None, list[Problem]]:
    """Convert one decoded JSON value to its stage's example; (None, problems) when it is invalid.

    Document-count rules that involve `top_k` or other rows are checked by `validate_rows`.
    """
    check_stage(stage)
    check = _RowChecker(path, line)
    if check.object(row, ROW_FIELD) is None:
        return None, check.problems
    if example_class(stage) is Stage1Example:
        example = _parse_stage1(row, check)
    else:
        example = _parse_question_row(row, stage, check)
    return example, check.problems


def _count_problem(example: Example, stage: str, top_k: int | None,
                   first: tuple[int, int] | None) -> str | None:
    """Why this row's number of documents is wrong, or None. `first` = (line, count) of row one."""
    n_docs = len(example.docs)
    if example_class(stage) is not Stage2Example:
        if top_k is not None and n_docs != top_k:
            return f"{n_docs} documents, expected --top_k {top_k}"
        if top_k is None and first is not None and n_docs != first[1]:
            return (f"{n_docs} documents, but line {first[0]} has {first[1]} "
                    "(every row needs the same number; --top_k checks a given value)")
    elif top_k is not None and n_docs < top_k:
        return f"{n_docs} candidates, fewer than --top_k {top_k}"
    return None


def validate_rows(rows: Iterable[tuple[int, Any]], stage: str, path: str, top_k: int | None = None
                  ) -> tuple[list[Example], list[Problem]]:
    """Parse decoded rows given as (line number, value); return the valid examples and all problems."""
    check_stage(stage)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    examples: list[Example] = []
    problems: list[Problem] = []
    first: tuple[int, int] | None = None
    for line, value in rows:
        example, row_problems = parse_stage_row(value, stage, path, line)
        problems.extend(row_problems)
        if example is None:
            continue
        message = _count_problem(example, stage, top_k, first)
        if message is not None:
            problems.append(Problem(path, line, _docs_field_name(value), message))
            continue
        if first is None:
            first = (line, len(example.docs))
        examples.append(example)
    return examples, problems


def _docs_field_name(row: dict[str, Any]) -> str:
    return next((name for name in DOC_FIELDS if name in row), "docs")


def _decoded_lines(path: str, problems: list[Problem]) -> Iterable[tuple[int, Any]]:
    """Yield (line number, JSON value) for each non-blank line, recording undecodable lines."""
    with open(path, "rb") as stream:
        encoding = wide_encoding(stream.read(4))
        if encoding is not None:  # one problem, not one per line
            problems.append(Problem(path, None, FILE_FIELD, not_utf8_message(path, encoding).split(": ", 1)[1]))
            return
        stream.seek(0)
        for line_number, raw in enumerate(stream, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark written by some editors
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problems.append(Problem(path, line_number, ROW_FIELD,
                                        f"not valid UTF-8 (byte {error.start + 1} of the line)"))
                continue
            try:
                yield line_number, json.loads(text)
            except json.JSONDecodeError as error:
                problems.append(Problem(path, line_number, ROW_FIELD,
                                        f"invalid JSON: {error.msg} (column {error.colno})"))


@dataclass(frozen=True)
class FileReport:
    """What `validate_stage_file` found: the valid examples, every problem, the rows read."""

    examples: list[Example]
    problems: list[Problem]
    n_rows: int  # non-blank lines


def validate_stage_file(path: str | os.PathLike, stage: str, top_k: int | None = None) -> FileReport:
    """Read a whole stage file and report every problem in it (never raises for bad content)."""
    check_stage(stage)
    path = os.fspath(path)
    decode_problems: list[Problem] = []
    try:
        lines = list(_decoded_lines(path, decode_problems))
    except OSError as error:
        return FileReport([], [Problem(path, None, FILE_FIELD, f"cannot read: {error.strerror}")], 0)
    examples, row_problems = validate_rows(lines, stage, path, top_k)
    n_rows = len(lines) + sum(problem.line is not None for problem in decode_problems)
    # Stable sort: file order, and within a line the order the fields were checked in.
    problems = sorted(decode_problems + row_problems, key=lambda problem: problem.line or 0)
    if n_rows == 0:
        problems.append(Problem(path, None, FILE_FIELD, "no rows"))
    return FileReport(examples, problems, n_rows)


def read_stage_file(path: str | os.PathLike, stage: str, top_k: int | None = None) -> list[Example]:
    """Read a stage file into examples; raise ValidationError listing every problem if any."""
    report = validate_stage_file(path, stage, top_k)
    if report.problems:
        raise ValidationError(report.problems)
    return report.examples


def write_stage_file(path: str | os.PathLike, examples: Iterable[Example], stage: str,
                     top_k: int | None = None) -> int:
    """Validate `examples` as `stage` rows, then write them atomically; return the row count.

    Nothing is written when any example is invalid: the ValidationError names the line each
    example would have had.
    """
    check_stage(stage)
    path = os.fspath(path)
    expected_class = example_class(stage)
    rows: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for index, example in enumerate(examples):
        if not isinstance(example, expected_class):
            problems.append(Problem(path, index + 1, ROW_FIELD,
                                    f"{type(example).__name__} is not a {stage} example "
                                    f"(expected {expected_class.__name__})"))
            continue
        rows.append(example.to_json_dict())
    if not problems:
        _, problems = validate_rows(enumerate(rows, start=1), stage, path, top_k)
    if not rows and not problems:
        problems.append(Problem(path, None, FILE_FIELD, "no rows to write"))
    if problems:
        raise ValidationError(problems)
    return atomic_write_jsonl(path, rows)
