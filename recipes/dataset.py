"""Training examples for a stage: from a JSONL path (clara.data.formats) or a Hugging Face dataset name.

The order of an epoch is a permutation drawn from (seed, epoch) alone, so a resumed run visits
the examples in the same order as an uninterrupted one; `global_batches` cuts that order into the
global batches of the optimizer steps, and `rank_slice` gives each process its share.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from clara.data.formats import ValidationError, parse_stage_row, read_stage_file


def _looks_like_hub_name(name: str) -> bool:
    return not os.path.exists(name) and "/" in name and not name.startswith((".", "/")) and not name.endswith(
        (".jsonl", ".json"))


def load_examples(dataset: str, stage: str, *, max_samples: int | None = None, top_k: int | None = None,
                  split: str = "train") -> list[Any]:
    """Examples of the `stage` data format from a JSONL file, or a hub dataset (`org/name`, needs
    `datasets`); a file's document counts are checked against `top_k` when given (see
    clara.data.formats)."""
    if _looks_like_hub_name(dataset):
        examples = _load_hub_dataset(dataset, stage, split)
    else:
        if not Path(dataset).exists():
            raise FileNotFoundError(f"--dataset {dataset}: no such file")
        examples = read_stage_file(dataset, stage, top_k=top_k)
    if max_samples is not None and max_samples > 0:
        examples = examples[:max_samples]
    if not examples:
        raise ValueError(f"--dataset {dataset}: no examples")
    return examples


def _load_hub_dataset(name: str, stage: str, split: str) -> list[Any]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--dataset {name}: no such file; read as a Hugging Face dataset name, it needs "
                         "`pip install datasets`") from None
    rows = datasets.load_dataset(name, split=split)
    examples, problems = [], []
    for i, row in enumerate(rows, start=1):
        example, row_problems = parse_stage_row(dict(row), stage, path=f"{name}[{split}]", line=i)
        problems.extend(row_problems)
        if example is not None:
            examples.append(example)
    if problems:
        raise ValidationError(problems)
    return examples


def select_stage1_rows(examples: list[Any], qa_loss: bool) -> list[Any]:
    """Stage 1 trains on paraphrase rows, and on QA rows too with --qa_loss (as the official CLI)."""
    kept = [e for e in examples if e.data_type == "paraphrase" or qa_loss]
    if not kept:
        raise ValueError("stage1: every row is a QA row and --qa_loss is off; pass --qa_loss to train on them")
    return kept


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=g).tolist()


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    """A last, smaller batch is kept: a data set smaller than one batch still trains."""
    return max(1, math.ceil(n_examples / global_batch))


def global_batch_indices(order: list[int], step_in_epoch: int, global_batch: int) -> list[int]:
    return order[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch]


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Contiguous share of a global batch for one rank (the first ranks take one more when uneven)."""
    n = len(indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return indices[start:start + base + (1 if rank < extra else 0)]


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
