"""MedQuAD question-answer pairs -> stage1, stage1_2 and stage2 JSONL files, with train/dev splits.

    clara-data medquad --input ../shared/data/medquad/medquad_qa.jsonl --out_dir out/medquad
    (or python -m clara.data.medquad with the same flags)

Input: JSONL, one `{id, source, url, focus, qtype, question, answer}` per line (NIH pages; the
answer is a whole passage). `question` and `answer` are required; a record without a focus uses
its url as its topic; a question whose template lost its topic ("What is (are)  ?") is dropped.
The answers are the documents: each distinct answer text (after --max_doc_words) is one
document, shared by every question it answers.

What is written:
- stage1: the answers of one topic (same source and focus) are packed, in file order, into
  documents of at most --max_doc_words words (a passage that does not fit starts the next
  document; 0 keeps one passage per document). Each document gives one QA row whose questions
  are all the topic's questions answered by a passage in it (a repeated question kept once) and
  whose answers are those passages - so several short answers of one topic make a multi-QA row.
- stage1_2: one row per distinct (question, answer) pair: its passage and the --top_k - 1
  passages BM25 ranks highest for the question among the other answers (hard distractors),
  shuffled with a seed per row. answer = golden_answers = the passage.
- stage2: one row per distinct question (case and spacing ignored): every passage that answers
  that question anywhere in the input is a positive (MedQuAD repeats some questions across
  sources; up to --num_candidates // 2 positives), and the best BM25 matches among the other
  passages fill the row up to --num_candidates; shuffled with a seed per row; pos_index = the
  positives' places. answer = the row's own passage, golden_answers = every positive passage.
Splits: whole topics go to dev (--dev_fraction of the topics, --seed), so a dev question's topic
is never trained on (a passage repeated word for word across topics, such as NCI's clinical-trials
boilerplate, can still occur on both sides); BM25 negatives come from all passages of both splits.
Row ids are `line<N>`, the input line of the first record behind the row (MedQuAD's own ids
repeat).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from clara.command import command_main
from clara.files import utf8_lines
from clara.data.bm25 import BM25Index
from clara.data.cli import command_parser
from clara.data.conversion import (StageOutputs, add_converter_flags, add_out_dir_flag, cap_words, dev_keys,
                                   place_among, seeded_rng, word_count, write_outputs)
from clara.data.formats import Problem, Stage1_2Example, Stage1Example, Stage2Example, ValidationError
from clara.data.json_fields import FieldChecker

REQUIRED_FIELDS = ("question", "answer")  # non-empty strings
OPTIONAL_FIELDS = ("source", "focus", "url")  # strings, possibly empty
# A question template whose topic slot was left empty in the source ("What is (are)  ?",
# "Who is at risk for ? ?"): such a question asks nothing, so it is dropped (and counted).
TEMPLATE_HOLE = re.compile(r"\s{2}\?|\bfor \?")


@dataclass(frozen=True)
class MedQuADRecord:
    line: int  # 1-based line in the input file: a unique id
    source: str
    focus: str  # the topic; the page URL stands in where the source left it empty
    question: str
    answer: str

    @property
    def topic(self) -> str:
        return f"{self.source}\t{self.focus}"

    @property
    def question_key(self) -> str:
        return " ".join(self.question.casefold().split())


@dataclass(frozen=True)
class MedQuADSettings:
    top_k: int = 5  # documents per stage1_2 row
    num_candidates: int = 20  # candidates per stage2 row
    dev_fraction: float = 0.1
    seed: int = 0
    max_doc_words: int = 200  # ~ what a 256-token compressor input holds; 0 keeps passages whole
    k1: float = 1.2
    b: float = 0.75

    def check(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.num_candidates < max(2, self.top_k):
            raise ValueError(f"num_candidates must be at least max(2, top_k={self.top_k}), "
                             f"got {self.num_candidates}")
        if self.max_doc_words < 0:
            raise ValueError(f"max_doc_words must be >= 0, got {self.max_doc_words}")


def load_medquad(path: str | Path, max_rows: int | None = None) -> list[MedQuADRecord]:
    """Records of a MedQuAD JSONL file; one ValidationError lists every bad line and field."""
    path = str(path)
    records: list[MedQuADRecord] = []
    problems: list[Problem] = []
    line_number = 0
    check = FieldChecker(lambda name, message: problems.append(Problem(path, line_number, name, message)))
    for line_number, text in utf8_lines(path):
        if max_rows is not None and len(records) >= max_rows:
            break
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            problems.append(Problem(path, line_number, "<row>",
                                    f"invalid JSON: {error.msg} (column {error.colno})"))
            continue
        if check.object(raw, "<row>") is None:
            continue
        before = len(problems)
        for name in REQUIRED_FIELDS:
            if name not in raw:
                check.report(name, "missing")
            else:
                check.string(raw[name], name)
        optional = {name: raw.get(name, "") for name in OPTIONAL_FIELDS}
        for name, value in optional.items():
            check.string(value, name, empty_ok=True)
        if len(problems) == before:
            topic = optional["focus"].strip() or optional["url"].strip() or f"line{line_number}"
            records.append(MedQuADRecord(line_number, optional["source"].strip(), topic,
                                         raw["question"].strip(), raw["answer"].strip()))
    if not records and not problems:
        problems.append(Problem(path, None, "<file>", "no records"))
    if problems:
        raise ValidationError(problems)
    return records


def pack_passages(doc_ids: Sequence[int], words: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy packing in order: a passage joins the current pack while the total stays <= budget."""
    packs: list[list[int]] = []
    total = 0
    for doc_id in doc_ids:
        if packs and budget > 0 and total + words[doc_id] <= budget:
            packs[-1].append(doc_id)
            total += words[doc_id]
        else:
            packs.append([doc_id])
            total = words[doc_id]
    return packs


def convert_medquad(records: Sequence[MedQuADRecord], settings: MedQuADSettings) -> StageOutputs:
    """All stage rows for `records` (see the module docstring for what each holds)."""
    settings.check()
    outputs = StageOutputs()
    kept = [record for record in records if not TEMPLATE_HOLE.search(record.question)]
    outputs.count("records_dropped_empty_template", len(records) - len(kept))
    records = kept

    # Documents: distinct (capped) answer texts.
    doc_of_text: dict[str, int] = {}
    doc_texts: list[str] = []
    record_doc: list[int] = []
    for record in records:
        text = cap_words(record.answer, settings.max_doc_words)
        if text not in doc_of_text:
            doc_of_text[text] = len(doc_texts)
            doc_texts.append(text)
        record_doc.append(doc_of_text[text])
    if len(doc_texts) < settings.num_candidates:
        raise ValueError(f"{len(doc_texts)} distinct answers cannot fill {settings.num_candidates} "
                         "stage2 candidates; lower --num_candidates or use more rows")
    doc_words = [word_count(text) for text in doc_texts]
    outputs.count("documents", len(doc_texts))

    positives: dict[str, list[int]] = {}
    for record, doc in zip(records, record_doc):
        docs = positives.setdefault(record.question_key, [])
        if doc not in docs:
            docs.append(doc)
    max_positives = settings.num_candidates // 2

    topics: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        topics.setdefault(record.topic, []).append(index)
    dev = dev_keys(list(topics), settings.dev_fraction, settings.seed)
    outputs.count("topics_dev", len(dev))
    outputs.count("topics_train", len(topics) - len(dev))

    # stage1: packed passages of one topic, with every question they answer.
    outputs.count("stage1_repeated_questions_dropped", 0)  # listed in the summary even when 0
    for topic, members in topics.items():
        split = "dev" if topic in dev else "train"
        topic_docs = list(dict.fromkeys(record_doc[i] for i in members))
        for pack in pack_passages(topic_docs, doc_words, settings.max_doc_words):
            in_pack = set(pack)
            questions, answers, seen = [], [], set()
            qa_records = [i for i in members if record_doc[i] in in_pack]
            for i in qa_records:
                if records[i].question_key in seen:
                    outputs.count("stage1_repeated_questions_dropped")
                    continue
                seen.add(records[i].question_key)
                questions.append(records[i].question)
                answers.append(doc_texts[record_doc[i]])
            document = "\n".join(doc_texts[doc] for doc in pack)
            outputs.add(split, Stage1Example(
                "qa", tuple(questions), tuple(answers), (document,), f"line{records[qa_records[0]].line}"))

    # stage1_2 and stage2: BM25 negatives, computed once per distinct question.
    index = BM25Index(doc_texts, settings.k1, settings.b)
    negatives_of: dict[str, list[int]] = {}
    done_pairs: set[tuple[str, str, int]] = set()
    done_questions: set[tuple[str, str]] = set()
    for record, doc in zip(records, record_doc):
        split = "dev" if record.topic in dev else "train"
        key = record.question_key
        row_positives = positives[key][:max_positives]
        if key not in negatives_of:
            wanted = max(settings.num_candidates - len(row_positives), settings.top_k - 1)
            negatives_of[key] = index.top_k(record.question, wanted, exclude=positives[key])
        negatives = negatives_of[key]

        if (split, key, doc) not in done_pairs:
            done_pairs.add((split, key, doc))
            docs, _ = place_among([doc_texts[doc]], [doc_texts[j] for j in negatives[: settings.top_k - 1]],
                                  seeded_rng(settings.seed, f"stage1_2:{record.line}"))
            outputs.add(split, Stage1_2Example(
                record.question, tuple(docs), doc_texts[doc], (doc_texts[doc],), f"line{record.line}"))

        if (split, key) not in done_questions:
            done_questions.add((split, key))
            if doc not in row_positives:  # its own passage always counts, even past the cap
                row_positives = [doc] + row_positives[:-1]
            golds = [doc_texts[doc]] + [doc_texts[j] for j in row_positives if j != doc]
            fill = settings.num_candidates - len(row_positives)
            docs, pos_index = place_among([doc_texts[j] for j in row_positives],
                                          [doc_texts[j] for j in negatives[:fill]],
                                          seeded_rng(settings.seed, f"stage2:{record.line}"))
            outputs.add(split, Stage2Example(
                record.question, tuple(docs), doc_texts[doc], tuple(golds), tuple(pos_index),
                f"line{record.line}"))
            outputs.count("stage2_multi_positive_rows", len(row_positives) > 1)
    return outputs


def build_parser() -> argparse.ArgumentParser:
    defaults = MedQuADSettings()
    parser = command_parser(
        "medquad",
        "Convert MedQuAD question-answer pairs to CLaRa stage1, stage1_2 and stage2 JSONL files, "
        "plus summary.json; every file is validated as it is written. The answer passages are the "
        "documents. Stage1: a topic's passages packed into documents with every question they "
        "answer; stage1_2: each question with its passage among BM25 distractors (--top_k "
        "documents); stage2: each distinct question with every passage that answers it among "
        "BM25 negatives (--num_candidates documents, pos_index marking the positives). Whole "
        "topics go to dev, deterministically. The module docstring of clara.data.medquad gives "
        "the exact rules.")
    parser.add_argument("--input", required=True, metavar="FILE",
                        help="MedQuAD JSONL, one record per line: question and answer (required), "
                             "source, focus and url (optional; id and qtype are ignored)")
    add_out_dir_flag(parser)
    parser.add_argument("--top_k", type=int, default=defaults.top_k,
                        help="documents per stage1_2 row: the answer passage + BM25 distractors; "
                             "match training's --generation_top_k (default: %(default)s)")
    parser.add_argument("--num_candidates", type=int, default=defaults.num_candidates,
                        help="candidates per stage2 row: the positives (at most half of them) + "
                             "BM25 negatives; at least max(2, --top_k) (default: %(default)s)")
    parser.add_argument("--dev_fraction", type=float, default=defaults.dev_fraction,
                        help="fraction of topics (source + focus) in the dev split, in [0, 1) "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the split and of the documents' order (default: %(default)s)")
    parser.add_argument("--max_doc_words", type=int, default=defaults.max_doc_words,
                        help="cut each answer passage to this many words, and pack stage1 "
                             "documents up to it; 0 keeps passages whole, one per document "
                             "(default: %(default)s)")
    add_converter_flags(parser, defaults)
    return parser


@command_main("clara-data medquad")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = MedQuADSettings(args.top_k, args.num_candidates, args.dev_fraction, args.seed,
                               args.max_doc_words, args.k1, args.b)
    settings.check()
    records = load_medquad(args.input, args.max_rows)
    started = time.perf_counter()
    outputs = convert_medquad(records, settings)
    seconds = time.perf_counter() - started
    summary = write_outputs(args.out_dir, outputs, {"input": args.input, "max_rows": args.max_rows,
                                                    **asdict(settings)}, settings.top_k)
    for name, rows in summary["files"].items():
        print(f"{Path(args.out_dir) / name}: {rows} rows")
    print(f"{len(records)} records converted in {seconds:.1f} s (BM25 index and negatives included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
