"""The architecture (DecoderConfig) of a base model, read without its weights: from a Hugging Face
config.json, or from the metadata of a GGUF file's header.

The weight loader builds its model from these configs, and the memory planner plans with them,
so both see the same architecture. Errors are ConfigError (or GGUFFormatError for a file that is
not GGUF) with a one-line message naming the file.
"""

from __future__ import annotations

from pathlib import Path

from clara.config import ConfigError, DecoderConfig
from clara.files import read_json
from clara.gguf_file import GGUFFile, read_gguf
from clara.sources import ModelSource


def hf_config(config_json: str | Path) -> DecoderConfig:
    """DecoderConfig of a Hugging Face config.json."""
    path = Path(config_json)
    return DecoderConfig.from_hf(read_json(path, ConfigError), source=str(path))


def gguf_config(gf: GGUFFile) -> DecoderConfig:
    """DecoderConfig of a llama-architecture GGUF (Llama, Mistral, SmolLM2), from its metadata."""
    meta, source = gf.metadata, str(gf.path)

    def need(key: str):
        if key not in meta:
            raise ConfigError(f"{source}: GGUF metadata field {key!r} is missing")
        return meta[key]

    arch = need("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{source}: unknown GGUF architecture {arch!r}; supported: llama (Llama, Mistral, SmolLM2)")
    n_embd, n_head = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise ConfigError(f"{source}: cannot tell the vocabulary size (no llama.vocab_size, no tokenizer.ggml.tokens)")
    return DecoderConfig(
        model_type="llama",
        vocab_size=int(vocab),
        hidden_size=n_embd,
        intermediate_size=int(need("llama.feed_forward_length")),
        num_hidden_layers=int(need("llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", n_head)),
        head_dim=int(meta.get("llama.rope.dimension_count", n_embd // n_head)),
        max_position_embeddings=int(meta.get("llama.context_length", 4096)),
        norm_eps=float(need("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        # llama.cpp's converter drops the output matrix when it is the embedding.
        tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def source_config(source: ModelSource) -> DecoderConfig:
    """DecoderConfig of a resolved source: its config.json, or its GGUF header."""
    if source.kind == "gguf":
        return gguf_config(read_gguf(source.path))
    return hf_config(source.path / "config.json")
