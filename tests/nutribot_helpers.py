"""A tiny NutriBot for tests: a 2-layer random Clara checkpoint over SmolLM2's tokenizer, and a
retriever over the built-in knowledge base (or a few PDF pages) that answers in milliseconds."""

from __future__ import annotations

from pathlib import Path

from clara import Clara, ClaraConfig
from nutribot.retriever import ClaraRetriever
from tiny_base import write_tiny_base

TINY_NUTRIBOT = dict(compress_rate=8, doc_max_length=32, lora_r=4, lora_dropout=0.0, generation_top_k=2)


def write_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A Clara checkpoint folder on a tiny random base written beside it; returns the checkpoint."""
    base = write_tiny_base(directory / "base", seed=seed)
    model = Clara.from_base(str(base), config=ClaraConfig(**TINY_NUTRIBOT))
    checkpoint = directory / "checkpoint"
    model.save_pretrained(checkpoint)
    return checkpoint


def tiny_retriever(tmp_path: Path, mode: str = "clara", kb=None, max_new_tokens: int = 6) -> ClaraRetriever:
    checkpoint = tmp_path / "checkpoint"
    if not (checkpoint / "clara.json").is_file():
        write_tiny_checkpoint(tmp_path)
    return ClaraRetriever(kb, checkpoint, mode, cache_dir=tmp_path / "cache", max_new_tokens=max_new_tokens,
                          progress=False)
