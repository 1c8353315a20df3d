"""What the dataset converters share: splits, seeded placement of positives, output writing.

Determinism: every random choice comes from `random.Random` seeded with a string built from the
user's --seed and a stable key (a record id). String seeds are hashed with SHA-512 by Python,
independent of PYTHONHASHSEED, so the same input and seed give byte-identical files on every run,
and one record's shuffle does not depend on which other records were processed before it.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clara.data.formats import Example, Stage1Example, write_stage_file
from clara.files import atomic_write_json
from clara.stages import DATA_FORMATS

# One output file per data format of the stage table, named after it. Each format is named after
# the first stage that uses it, so the name is also the stage its file is validated as.
OUTPUT_STAGES = DATA_FORMATS
SPLITS = ("train", "dev")


def seeded_rng(seed: int, key: Hashable) -> random.Random:
    """A generator that depends only on (seed, key)."""
    return random.Random(f"{seed}:{key}")


def dev_keys(keys: Sequence[str], dev_fraction: float, seed: int) -> set[str]:
    """The keys that go to the dev split: round(fraction * n) of them, at least one if fraction > 0.

    The keys are sorted, shuffled with `seed`, and the first ones taken, so the split depends only
    on the set of keys, the fraction and the seed (not on the order the records came in).
    """
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    ordered = sorted(set(keys))
    if dev_fraction == 0.0 or len(ordered) < 2:
        return set()
    random.Random(f"split:{seed}").shuffle(ordered)
    n_dev = min(len(ordered) - 1, max(1, round(dev_fraction * len(ordered))))
    return set(ordered[:n_dev])


def place_among(positives: Sequence[str], negatives: Sequence[str], rng: random.Random
                ) -> tuple[list[str], list[int]]:
    """Shuffle positives and negatives together; return the docs and the positives' indices."""
    tagged = [(doc, True) for doc in positives] + [(doc, False) for doc in negatives]
    rng.shuffle(tagged)
    return [doc for doc, _ in tagged], [i for i, (_, positive) in enumerate(tagged) if positive]


def cap_words(text: str, max_words: int) -> str:
    """The first `max_words` whitespace-separated words of `text` (all of it when max_words is 0).

    Whitespace inside the kept part is preserved, so an uncapped text is returned unchanged.
    """
    if max_words <= 0:
        return text
    words = text.split()
    if len(words) <= max_words:
        return text
    return " ".join(words[:max_words])


def word_count(text: str) -> int:
    return len(text.split())


@dataclass
class StageOutputs:
    """The examples a converter produced, by data format and split, plus counters for the summary."""

    examples: dict[tuple[str, str], list[Example]] = field(
        default_factory=lambda: {(stage, split): [] for stage in OUTPUT_STAGES for split in SPLITS})
    counters: dict[str, int] = field(default_factory=dict)

    def add(self, split: str, example: Example) -> None:
        """File `example` under `split` in the output file of its class's data format."""
        self.examples[(example.data_format, split)].append(example)

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount


def output_path(out_dir: str | os.PathLike, stage: str, split: str) -> Path:
    return Path(out_dir) / f"{stage}_{split}.jsonl"


def write_outputs(out_dir: str | os.PathLike, outputs: StageOutputs, settings: dict[str, Any],
                  top_k: int) -> dict[str, Any]:
    """Write every non-empty (stage, split) file and summary.json, all atomically.

    Each file is validated as it is written: stage1_2 rows with exactly `top_k` documents,
    stage2 rows with at least `top_k` candidates. Stage1 rows hold the documents their questions
    are about, however many (only equal counts are checked). Returns the summary: the row count of
    each file and the settings used.
    """
    rows: dict[str, int] = {}
    for (stage, split), examples in outputs.examples.items():
        if not examples:
            continue
        path = output_path(out_dir, stage, split)
        count_rule = None if isinstance(examples[0], Stage1Example) else top_k
        rows[path.name] = write_stage_file(path, examples, stage, count_rule)
    summary = {"files": rows, "counters": dict(sorted(outputs.counters.items())), "settings": settings}
    atomic_write_json(Path(out_dir) / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- shared flags
def add_out_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out_dir", required=True, metavar="DIR",
                        help="folder for stage1/stage1_2/stage2 _train/_dev .jsonl files and "
                             "summary.json (created if missing)")


def add_converter_flags(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """--max_rows and the BM25 parameters of a converter whose settings (`defaults`) hold k1 and b."""
    parser.add_argument("--max_rows", type=int, default=None, metavar="N",
                        help="use only the first N records, for a quick run (default: all)")
    parser.add_argument("--k1", type=float, default=defaults.k1,
                        help="BM25 term-frequency saturation, for choosing distractors and negatives "
                             "(default: %(default)s)")
    parser.add_argument("--b", type=float, default=defaults.b,
                        help="BM25 length normalisation, 0 (none) to 1 (full) (default: %(default)s)")
