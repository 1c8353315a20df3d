"""Generate stage1 rows (QA pairs and paraphrases) for chunks, resumably.

Every finished (chunk, task) is appended to a journal, `stage1.progress.jsonl`, one JSON line,
flushed and fsynced, before the next starts. A re-run reads the journal and skips what is in it
(keyed by chunk id, which hashes the chunk text), so an interrupted run continues where it stopped
and a changed chunk is generated afresh. `stage1.jsonl` is rewritten atomically from the journal
at the end of every run, interrupted or not, in chunk order.

A reply that yields nothing usable is retried up to `max_retries` times, then the task is recorded
as dropped (and not retried on the next run). A generator that cannot answer at all
(`GeneratorError`: server down, bad key) is different: the task is not recorded, so the next run
tries it again, and after `max_consecutive_errors` such failures in a row the run stops.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from clara.files import atomic_write_jsonl
from clara.data.pdf_chunk import Chunk
from clara.data.pdf_generators import GeneratorError, TextGenerator
from clara.data.pdf_qa_parse import parse_paraphrase, parse_qa_pairs

JOURNAL_NAME = "stage1.progress.jsonl"
STAGE1_NAME = "stage1.jsonl"
TASKS = ("qa", "paraphrase")

QA_PROMPT = (
    "Here is a passage from a document.\n\n"
    "Passage:\n{passage}\n\n"
    "Write {n} different questions that this passage answers, each with a short answer taken "
    "from the passage. Each question must make sense on its own, without the passage at hand. "
    "Reply with only a JSON list, in this form:\n"
    '[{{"question": "...", "answer": "..."}}]'
)
PARAPHRASE_PROMPT = (
    "Here is a passage from a document.\n\n"
    "Passage:\n{passage}\n\n"
    "Rewrite the passage in your own words. Keep every fact, number, name and warning, and add "
    "nothing. Reply with only the rewritten passage."
)


@dataclass(frozen=True)
class GenerationConfig:
    qa_per_chunk: int = 3  # questions asked for per chunk (extra valid ones are cut)
    paraphrase: bool = True  # also write a paraphrase row per chunk
    max_retries: int = 2  # new tries after a reply that cannot be parsed
    max_consecutive_errors: int = 3  # generator failures in a row before the run stops

    def __post_init__(self) -> None:
        if self.qa_per_chunk < 1:
            raise ValueError(f"qa_per_chunk must be at least 1, got {self.qa_per_chunk}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS if self.paraphrase else ("qa",)


@dataclass
class GenerationCounts:
    """What one run did; `rows_*` describe the whole stage1.jsonl it wrote."""

    tasks_total: int = 0
    tasks_already_done: int = 0  # found in the journal, skipped (resumption)
    tasks_generated: int = 0
    qa_pairs: int = 0  # valid pairs generated in this run
    invalid_pairs: int = 0  # pairs dropped from otherwise usable replies
    malformed_replies: int = 0  # replies with nothing usable in them
    retries: int = 0
    dropped_qa: int = 0  # chunks whose every QA reply was malformed
    dropped_paraphrase: int = 0
    generator_errors: int = 0
    stopped_because: str | None = None
    rows_qa: int = 0
    rows_paraphrase: int = 0


class GenerationJournal:
    """The append-only record of finished (chunk, task) pairs."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[tuple[str, str], dict] = {}

    def load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, start=1):
            is_last = number == len(lines)
            if not raw.strip():
                if not is_last:
                    good_end += len(raw) + 1
                continue
            try:
                entry = json.loads(raw)
                key = (entry["chunk_id"], entry["task"])
            except (ValueError, KeyError, TypeError) as exc:
                if is_last:
                    break  # the line being written when the run was stopped; dropped below
                raise ValueError(f"{self.path}:{number}: unreadable journal line "
                                 f"({type(exc).__name__}); delete the file to start over") from exc
            if is_last:
                break  # complete JSON but no newline: the write may not have finished
            self.entries[key] = entry
            good_end += len(raw) + 1
        if good_end != len(data):
            with open(self.path, "r+b") as stream:
                stream.truncate(good_end)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.entries

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry, ensure_ascii=False) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        self.entries[(entry["chunk_id"], entry["task"])] = entry


def _attempts(generator: TextGenerator, prompt: str, parse, config: GenerationConfig,
              counts: GenerationCounts):
    """(parsed result or None, number of replies used)."""
    for attempt in range(config.max_retries + 1):
        if attempt:
            counts.retries += 1
        parsed = parse(generator.complete(prompt))
        if parsed is not None:
            return parsed, attempt + 1
        counts.malformed_replies += 1
    return None, config.max_retries + 1


def run_task(chunk: Chunk, task: str, generator: TextGenerator, config: GenerationConfig,
             counts: GenerationCounts) -> dict:
    """The journal entry for one chunk and task; raises GeneratorError when no reply came."""
    entry: dict = {"chunk_id": chunk.id, "task": task}
    if task == "qa":
        def parse(reply: str):
            result = parse_qa_pairs(reply, limit=config.qa_per_chunk)
            return result if result.pairs else None

        prompt = QA_PROMPT.format(passage=chunk.text, n=config.qa_per_chunk)
        result, used = _attempts(generator, prompt, parse, config, counts)
        if result is None:
            counts.dropped_qa += 1
            return {**entry, "status": "dropped", "replies": used}
        counts.qa_pairs += len(result.pairs)
        counts.invalid_pairs += result.invalid
        return {**entry, "status": "ok", "replies": used,
                "question": [q for q, _ in result.pairs], "answers": [a for _, a in result.pairs]}
    prompt = PARAPHRASE_PROMPT.format(passage=chunk.text)
    text, used = _attempts(generator, prompt, lambda r: parse_paraphrase(r, chunk.text), config,
                           counts)
    if text is None:
        counts.dropped_paraphrase += 1
        return {**entry, "status": "dropped", "replies": used}
    return {**entry, "status": "ok", "replies": used, "paraphrase": text}


def stage1_rows(chunks: Iterable[Chunk], journal: GenerationJournal, tasks: tuple[str, ...]
                ) -> list[dict]:
    """The stage1 rows for `chunks`, in chunk order, from the journal's successful entries."""
    rows = []
    for chunk in chunks:
        source = {"file": chunk.source_file, "pages": [chunk.page_start, chunk.page_end],
                  "chunk_id": chunk.id}
        for task in tasks:
            entry = journal.entries.get((chunk.id, task))
            if entry is None or entry["status"] != "ok":
                continue
            if task == "qa":
                rows.append({"data_type": "qa", "question": entry["question"],
                             "answers": entry["answers"], "docs": [chunk.text], "source": source})
            else:
                # The official loader ignores a paraphrase row's question; the target is answers[0].
                rows.append({"data_type": "paraphrase", "question": [],
                             "answers": [entry["paraphrase"]], "docs": [chunk.text],
                             "source": source})
    return rows


def generate_stage1(chunks: list[Chunk], generator: TextGenerator, out_dir: Path,
                    config: GenerationConfig, progress: bool = True) -> GenerationCounts:
    """Fill the journal for every (chunk, task) not yet in it; write stage1.jsonl from it."""
    counts = GenerationCounts()
    journal = GenerationJournal(out_dir / JOURNAL_NAME)
    journal.load()
    todo = [(c, t) for c in chunks for t in config.tasks]
    counts.tasks_total = len(todo)
    todo = [(c, t) for c, t in todo if (c.id, t) not in journal]
    counts.tasks_already_done = counts.tasks_total - len(todo)
    consecutive_errors = 0
    try:
        # disable=None: a bar on a terminal, silence in logs and tests.
        with tqdm(total=len(todo), unit="task", desc="generating",
                  disable=None if progress else True) as bar:
            for chunk, task in todo:
                try:
                    entry = run_task(chunk, task, generator, config, counts)
                except GeneratorError as exc:
                    counts.generator_errors += 1
                    consecutive_errors += 1
                    if consecutive_errors >= config.max_consecutive_errors:
                        counts.stopped_because = str(exc)
                        break
                    continue
                consecutive_errors = 0
                journal.append(entry)
                counts.tasks_generated += 1
                bar.update(1)
    finally:
        # Also on Ctrl-C: what is in the journal is usable now, the rest comes on the next run.
        rows = stage1_rows(chunks, journal, config.tasks)
        atomic_write_jsonl(out_dir / STAGE1_NAME, rows)
        counts.rows_qa = sum(r["data_type"] == "qa" for r in rows)
        counts.rows_paraphrase = sum(r["data_type"] == "paraphrase" for r in rows)
    return counts
