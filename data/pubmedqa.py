"""PubMedQA (labelled part) -> stage1, stage1_2 and stage2 JSONL files, with train/dev splits.

    clara-data pubmedqa --input ../shared/data/pubmedqa/pqal_trainval.json --out_dir out/pubmedqa
    clara-data pubmedqa --hf pubmed_qa/pqa_labeled --out_dir out/pubmedqa   # needs `datasets`
    (or python -m clara.data.pubmedqa with the same flags)

Input: the official `ori_pqal.json` layout (`{pmid: {QUESTION, CONTEXTS, LONG_ANSWER,
final_decision, ...}}`), a JSON list of such records, a JSONL file of them (with `pmid`, `pubid`
or `id` for the record id, else the line number), or the Hugging Face layout (`question`,
`context: {contexts}`, `long_answer`, `final_decision`, `pubid`).

What is written (one record = one question about one abstract; its CONTEXTS are the abstract's
sections without the conclusion, LONG_ANSWER is the conclusion, final_decision is yes/no/maybe):
- stage1: one QA row per record, docs = [the abstract: its contexts joined by spaces];
  questions = [the question, the question + " Answer yes, no or maybe."],
  answers = [the long answer, the decision] (the long answer pair is left out when empty).
- stage1_2: one row per record with exactly --top_k docs, built from its own contexts by this
  rule: while there are more than k, merge the adjacent pair with the fewest words together
  (leftmost on ties), so no text is lost and lengths even out; while there are fewer than k, add
  the best BM25 matches for the question among the other abstracts' contexts (distractors, as a
  retriever would return them), after the record's own contexts.
- stage2: one row per record with --num_candidates candidates: its own abstract (the positive)
  and the other abstracts that BM25 ranks highest for the question (hard negatives, from the
  whole input, both splits), shuffled with a seed per record; pos_index = the positive's place.
The target `answer` follows --answer_style (decision: "yes"; long: the long answer; both:
"Yes. <long answer>"); `golden_answers` is always [the decision], for yes/no/maybe scoring.
Splits: records are assigned to dev by id (--dev_fraction, --seed; see clara.data.conversion.dev_keys).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clara.command import command_main
from clara.files import read_utf8_text, utf8_lines
from clara.data.bm25 import BM25Index
from clara.data.cli import command_parser
from clara.data.conversion import (StageOutputs, add_converter_flags, add_out_dir_flag, cap_words, dev_keys,
                                   place_among, seeded_rng, word_count, write_outputs)
from clara.data.formats import Problem, Stage1_2Example, Stage1Example, Stage2Example, ValidationError
from clara.data.json_fields import FieldChecker, json_type_name

DECISIONS = ("yes", "no", "maybe")
ANSWER_STYLES = ("decision", "long", "both")
DECISION_SUFFIX = " Answer yes, no or maybe."


@dataclass(frozen=True)
class PubMedQARecord:
    pmid: str
    question: str
    contexts: tuple[str, ...]
    long_answer: str  # may be empty
    decision: str  # yes / no / maybe

    @property
    def abstract(self) -> str:
        return " ".join(self.contexts)


@dataclass(frozen=True)
class PubMedQASettings:
    top_k: int = 5  # documents per stage1_2 row
    num_candidates: int = 20  # candidates per stage2 row (1 positive + negatives)
    dev_fraction: float = 0.1
    seed: int = 0
    answer_style: str = "decision"
    max_doc_words: int = 0  # 0: keep documents whole
    k1: float = 1.2
    b: float = 0.75

    def check(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.num_candidates < max(2, self.top_k):
            raise ValueError(f"num_candidates must be at least max(2, top_k={self.top_k}), "
                             f"got {self.num_candidates}")
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(f"answer_style must be one of {', '.join(ANSWER_STYLES)}")
        if self.max_doc_words < 0:
            raise ValueError(f"max_doc_words must be >= 0, got {self.max_doc_words}")


# --- reading --------------------------------------------------------------------------------


QUESTION_FIELDS = ("QUESTION", "question")
CONTEXT_FIELDS = ("CONTEXTS", "contexts", "context")
LONG_ANSWER_FIELDS = ("LONG_ANSWER", "long_answer")
DECISION_FIELDS = ("final_decision", "FINAL_DECISION", "decision")


def _first_present(raw: dict[str, Any], names: Sequence[str]) -> tuple[str, Any] | None:
    """(name, value) of the first of `names` in `raw`, or None when none is."""
    return next(((name, raw[name]) for name in names if name in raw), None)


def _required(raw: dict[str, Any], names: Sequence[str], check: FieldChecker) -> tuple[str, Any] | None:
    found = _first_present(raw, names)
    if found is None:
        check.report(names[0], f"missing (also accepted: {', '.join(names[1:])})")
    return found


def parse_record(raw: Any, record_id: str, path: str, line: int | None, where: str
                 ) -> tuple[PubMedQARecord | None, list[Problem]]:
    """One record in either layout; `where` prefixes field names (e.g. '["12345"].')."""
    problems: list[Problem] = []
    check = FieldChecker(lambda name, message: problems.append(Problem(path, line, f"{where}{name}", message)))
    if check.object(raw, "<record>") is None:
        return None, problems
    question = contexts = decision = None
    if found := _required(raw, QUESTION_FIELDS, check):
        question = check.string(found[1], found[0])
    if found := _required(raw, CONTEXT_FIELDS, check):
        name, value = found
        if isinstance(value, dict):  # the Hugging Face layout nests them
            name, value = f"{name}.contexts", value.get("contexts")
        contexts = check.string_list(value, name)
    long_answer = ""  # optional
    if found := _first_present(raw, LONG_ANSWER_FIELDS):
        long_answer = check.string(found[1], found[0], empty_ok=True)
    if found := _required(raw, DECISION_FIELDS, check):
        decision = check.string(found[1], found[0], empty_ok=True)
        if decision is not None and decision.strip().lower() not in DECISIONS:
            check.report(found[0], f"{decision!r} is not one of yes, no, maybe")
    if problems:
        return None, problems
    record = PubMedQARecord(record_id, question.strip(), tuple(c.strip() for c in contexts),
                            long_answer.strip(), decision.strip().lower())
    return record, problems


@dataclass(frozen=True)
class RawRecord:
    """One undecoded record and where it came from (for messages)."""

    value: Any
    record_id: str
    line: int | None  # JSONL line number; None inside a JSON document
    where: str  # prefix for field names inside a JSON document, e.g. '["12345"].'


_ID_KEYS = ("pmid", "pubid", "PMID", "id")


def _record_id(value: Any, fallback: str) -> str:
    if isinstance(value, dict):
        for key in _ID_KEYS:
            if key in value:
                return str(value[key])
    return fallback


def _jsonl_records(path: str) -> Iterable[RawRecord | Problem]:
    for line_number, text in utf8_lines(path):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            yield Problem(path, line_number, "<row>", f"invalid JSON: {error.msg} (column {error.colno})")
            continue
        yield RawRecord(value, _record_id(value, f"line{line_number}"), line_number, "")


def _json_records(path: str) -> Iterable[RawRecord | Problem]:
    try:
        data = json.loads(read_utf8_text(path))
    except json.JSONDecodeError as error:
        yield Problem(path, error.lineno, "<file>", f"invalid JSON: {error.msg} (column {error.colno})")
        return
    if isinstance(data, dict):
        for pmid, value in data.items():
            yield RawRecord(value, str(pmid), None, f"[{json.dumps(str(pmid))}].")
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield RawRecord(value, _record_id(value, f"item{index}"), None, f"[{index}].")
    else:
        yield Problem(path, None, "<file>", f"expected an object or an array at the top, "
                                            f"got {json_type_name(data)}")


def collect_records(items: Iterable[RawRecord | Problem], path: str,
                    max_rows: int | None = None) -> list[PubMedQARecord]:
    """Parse the items into records; raise one ValidationError listing every problem."""
    records: list[PubMedQARecord] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for item in items:
        if max_rows is not None and len(records) >= max_rows:
            break
        if isinstance(item, Problem):
            problems.append(item)
            continue
        record, record_problems = parse_record(item.value, item.record_id, path, item.line, item.where)
        problems.extend(record_problems)
        if record is None:
            continue
        if item.record_id in seen:
            problems.append(Problem(path, item.line, f"{item.where}id",
                                    f"{item.record_id!r} repeats an earlier record"))
            continue
        seen.add(item.record_id)
        records.append(record)
    if not records and not problems:
        problems.append(Problem(path, None, "<file>", "no records"))
    if problems:
        raise ValidationError(problems)
    return records


def load_pubmedqa(path: str | Path, max_rows: int | None = None) -> list[PubMedQARecord]:
    """Records from an ori_pqal.json-style JSON file or a JSONL file (by the .jsonl suffix)."""
    path = str(path)
    items = _jsonl_records(path) if path.endswith(".jsonl") else _json_records(path)
    return collect_records(items, path, max_rows)


def load_pubmedqa_hf(spec: str, max_rows: int | None = None) -> list[PubMedQARecord]:
    """Records from the Hugging Face hub through `datasets`, e.g. spec 'pubmed_qa/pqa_labeled'.

    The last part of the spec is taken as the configuration when it starts with 'pqa_'
    ('qiaojin/PubMedQA/pqa_labeled' also works).
    """
    try:
        import datasets  # an optional dependency: only this path needs it
    except ImportError:
        raise SystemExit("--hf needs the `datasets` package and a network connection: "
                         "pip install datasets (or pass --input with a local file)") from None
    name, _, config = spec.rpartition("/")
    if not config.startswith("pqa_"):
        name, config = spec, None
    dataset = datasets.load_dataset(name, config, split="train")
    items = (RawRecord(dict(row), _record_id(row, f"row{index}"), None, f"[{index}].")
             for index, row in enumerate(dataset))
    return collect_records(items, f"hf:{spec}", max_rows)


# --- converting -----------------------------------------------------------------------------


def fit_to_k(contexts: Sequence[str], k: int, padding: Sequence[str]) -> tuple[list[str], int, int]:
    """Exactly k documents from `contexts` (+ `padding` when short); see the module docstring.

    Returns (docs, number of merges, number of padding docs used).
    """
    docs = list(contexts)
    merges = 0
    while len(docs) > k:
        sizes = [word_count(docs[i]) + word_count(docs[i + 1]) for i in range(len(docs) - 1)]
        i = sizes.index(min(sizes))
        docs[i:i + 2] = [f"{docs[i]} {docs[i + 1]}"]
        merges += 1
    missing = k - len(docs)
    if missing > len(padding):
        raise ValueError(f"need {missing} padding documents, only {len(padding)} available")
    return docs + list(padding[:missing]), merges, max(0, missing)


def _answer(record: PubMedQARecord, style: str) -> str:
    if style == "long" and record.long_answer:
        return record.long_answer
    if style == "both" and record.long_answer:
        return f"{record.decision.capitalize()}. {record.long_answer}"
    return record.decision


def convert_pubmedqa(records: Sequence[PubMedQARecord], settings: PubMedQASettings) -> StageOutputs:
    """All stage rows for `records` (see the module docstring for what each holds)."""
    settings.check()
    if len(records) < settings.num_candidates:
        raise ValueError(f"{len(records)} records cannot fill {settings.num_candidates} stage2 "
                         "candidates; lower --num_candidates")
    cap = settings.max_doc_words
    outputs = StageOutputs()
    dev = dev_keys([record.pmid for record in records], settings.dev_fraction, settings.seed)

    abstracts = [cap_words(record.abstract, cap) for record in records]
    abstract_index = BM25Index(abstracts, settings.k1, settings.b)
    context_texts = [context for record in records for context in record.contexts]
    context_owner = [i for i, record in enumerate(records) for _ in record.contexts]
    context_index = BM25Index(context_texts, settings.k1, settings.b)
    first_context = {}
    for position, owner in enumerate(context_owner):
        first_context.setdefault(owner, position)

    for i, record in enumerate(records):
        split = "dev" if record.pmid in dev else "train"
        outputs.count(f"records_{split}")

        questions, answers = [], []
        if record.long_answer:
            questions.append(record.question)
            answers.append(record.long_answer)
        questions.append(record.question + DECISION_SUFFIX)
        answers.append(record.decision)
        outputs.add(split, Stage1Example("qa", tuple(questions), tuple(answers),
                                         (abstracts[i],), record.pmid))

        own = range(first_context[i], first_context[i] + len(record.contexts))
        needed = max(0, settings.top_k - len(record.contexts))
        padding = [context_texts[j] for j in context_index.top_k(record.question, needed, own)]
        docs, merges, padded = fit_to_k(record.contexts, settings.top_k, padding)
        outputs.count("stage1_2_merges", merges)
        outputs.count("stage1_2_padding_docs", padded)
        answer = _answer(record, settings.answer_style)
        outputs.add(split, Stage1_2Example(
            record.question, tuple(cap_words(doc, cap) for doc in docs), answer,
            (record.decision,), record.pmid))

        negatives = abstract_index.top_k(record.question, settings.num_candidates - 1, exclude=[i])
        candidates, pos_index = place_among(
            [abstracts[i]], [abstracts[j] for j in negatives], seeded_rng(settings.seed, f"stage2:{record.pmid}"))
        outputs.add(split, Stage2Example(
            record.question, tuple(candidates), answer, (record.decision,), tuple(pos_index), record.pmid))
    return outputs


# --- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = PubMedQASettings()
    parser = command_parser(
        "pubmedqa",
        "Convert PubMedQA (its labelled part) to CLaRa stage1, stage1_2 and stage2 JSONL files "
        "with deterministic train/dev splits, plus summary.json. Every file is validated as it is "
        "written. Stage1: one QA row per abstract (long answer and yes/no/maybe decision); "
        "stage1_2: the question with exactly --top_k documents built from its own abstract's "
        "sections (BM25 distractors added when it has fewer); stage2: the question with --num_candidates "
        "abstracts, its own among BM25 hard negatives, pos_index marking it. The module "
        "docstring of clara.data.pubmedqa gives the exact rules.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE",
                        help="a local file: ori_pqal.json-style JSON ({pmid: record} or a list of "
                             "records), or JSONL (by the .jsonl suffix) with one record per line")
    source.add_argument("--hf", metavar="NAME",
                        help="load from the Hugging Face hub with `datasets`, e.g. "
                             "pubmed_qa/pqa_labeled (needs the package and a network)")
    add_out_dir_flag(parser)
    parser.add_argument("--top_k", type=int, default=defaults.top_k,
                        help="documents per stage1_2 row: the abstract's sections merged or padded "
                             "to exactly this many; match training's --generation_top_k "
                             "(default: %(default)s)")
    parser.add_argument("--num_candidates", type=int, default=defaults.num_candidates,
                        help="candidates per stage2 row: 1 positive + BM25 negatives; at least "
                             "max(2, --top_k) (default: %(default)s)")
    parser.add_argument("--dev_fraction", type=float, default=defaults.dev_fraction,
                        help="fraction of records in the dev split, in [0, 1) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the split and of the candidates' order (default: %(default)s)")
    parser.add_argument("--answer_style", choices=ANSWER_STYLES, default=defaults.answer_style,
                        help="target answer of stage1_2/stage2 rows: the yes/no/maybe decision, "
                             "the long answer, or both ('Yes. <long answer>'); golden_answers is "
                             "always the decision (default: %(default)s)")
    parser.add_argument("--max_doc_words", type=int, default=defaults.max_doc_words,
                        help="cut each document to this many words; 0 keeps documents whole "
                             "(default: %(default)s)")
    add_converter_flags(parser, defaults)
    return parser


@command_main("clara-data pubmedqa")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = PubMedQASettings(args.top_k, args.num_candidates, args.dev_fraction, args.seed,
                                args.answer_style, args.max_doc_words, args.k1, args.b)
    settings.check()
    if args.input is not None:
        records = load_pubmedqa(args.input, args.max_rows)
    else:
        records = load_pubmedqa_hf(args.hf, args.max_rows)
    outputs = convert_pubmedqa(records, settings)
    source = {"input": args.input} if args.input is not None else {"hf": args.hf}
    summary = write_outputs(args.out_dir, outputs, {**source, "max_rows": args.max_rows,
                                                    **asdict(settings)}, settings.top_k)
    for name, rows in summary["files"].items():
        print(f"{Path(args.out_dir) / name}: {rows} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
