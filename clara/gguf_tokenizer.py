"""A byte-level BPE `tokenizers.Tokenizer` rebuilt from a GGUF file's tokenizer metadata.

A GGUF "gpt2" vocabulary carries its tokens (`tokenizer.ggml.tokens`), merges, token kinds and
the name of the pre-tokenizer its merges were learned on (`tokenizer.ggml.pre`); together they
give back the model's tokenizer.json without it. SentencePiece vocabularies ("llama") cannot be
rebuilt this way; those models need their tokenizer.json.

`read_gguf_tokenizer` returns the backend with the ids the metadata names; clara.tokenizer's
`Tokenizer.from_gguf` wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from clara.gguf_file import read_gguf

# The split regexes of the models' own tokenizer.json files, per `tokenizer.ggml.pre` name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# GGUF token kinds (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4


@dataclass
class GGUFTokenizer:
    """The rebuilt backend and what the metadata says around it (ids are None when not given)."""

    backend: Backend
    vocab: dict[str, int]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    eot_id: int | None  # end of turn, when it differs from EOS
    add_bos: bool
    chat_template: str | None
    source: str


def gguf_pre_tokenizer(pre: str, source: str) -> tuple[Any, bool]:
    """-> (pre_tokenizer, ignore_merges) for a GGUF `tokenizer.ggml.pre` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # Every digit alone first, then GPT-2's regex on what lies between.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in ("gpt-2", "gpt2", "default"):
        return byte_level, False
    split_regex = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split_regex is None:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: smollm, starcoder, refact, "
            "gpt-2, default, llama-bpe, qwen2 (or load the model's tokenizer.json instead)"
        )
    seq = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # Llama 3 looks a whole piece up in the vocabulary before merging (ignore_merges in its tokenizer.json).
    return seq, pre in ("llama-bpe", "llama3")


def gguf_metadata(path_or_file) -> tuple[dict[str, Any], str]:
    """-> (metadata, source name) from a path, a parsed clara.gguf_file.GGUFFile, or a gguf.GGUFReader."""
    if isinstance(path_or_file, (str, Path)):
        path = Path(path_or_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        path_or_file = read_gguf(path)
    if isinstance(getattr(path_or_file, "metadata", None), dict):  # GGUFFile
        return path_or_file.metadata, str(path_or_file.path)
    if hasattr(path_or_file, "fields"):  # gguf.GGUFReader, whose memmap knows the file name
        source = str(getattr(getattr(path_or_file, "data", None), "filename", None) or "<GGUFReader>")
        meta = {k: f.contents() for k, f in path_or_file.fields.items() if k.startswith("tokenizer.")}
        return meta, source
    raise TypeError(f"from_gguf expects a path, a GGUFFile or a gguf.GGUFReader, got {type(path_or_file).__name__}")


def read_gguf_tokenizer(path_or_file) -> GGUFTokenizer:
    """Rebuild the tokenizer of a GGUF path, GGUFFile or gguf.GGUFReader."""
    meta, source = gguf_metadata(path_or_file)
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ValueError(f"{source}: no tokenizer metadata "
                         "(tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') can be "
                         "rebuilt from a GGUF; load the model's tokenizer.json instead")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{source}: tokenizer.ggml.merges missing; a 'gpt2' vocabulary needs its merges")
    pre, ignore_merges = gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), source)

    vocab = {tok: i for i, tok in enumerate(tokens)}
    # A merge is "left right"; byte-level symbols never hold a real space, so the first one splits.
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    kinds = meta.get("tokenizer.ggml.token_type") or []
    # Control tokens (<|im_start|>, ...) are special: matched whole, skipped by decode.
    # User-defined tokens are matched whole, but decode as ordinary text.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, kinds) if kind == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, kinds) if kind == USER_DEFINED])

    def token_id(key: str) -> int | None:
        i = meta.get(key)
        if i is None:
            return None
        if not 0 <= i < len(tokens):
            raise ValueError(f"{source}: {key} = {i} is outside the vocabulary (size {len(tokens)})")
        return int(i)

    return GGUFTokenizer(
        backend=backend, vocab=vocab, bos_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_id=token_id("tokenizer.ggml.eos_token_id"), pad_id=token_id("tokenizer.ggml.padding_token_id"),
        eot_id=token_id("tokenizer.ggml.eot_token_id"), add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"), source=source,
    )
