"""The architecture the memory planner plans for, read without loading any weights.

`load_model_config(name)` takes what --model / --pretrain take: a preset below, an embedded
model's alias (its GGUF header is read, through clara.sources), a .gguf file, a config.json, a
model folder, a Clara checkpoint (planned for its base), or a hub repo id that is in the local
Hugging Face cache or whose architecture a preset describes. It never downloads.

PRESETS holds the config.json fields (those DecoderConfig.from_hf reads) of models that have no
local source here; the embedded model needs none, its own metadata is read instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clara.base_config import hf_config, source_config
from clara.checkpoint import CONFIG_FILE as CLARA_CONFIG_FILE, read_checkpoint_meta
from clara.config import DecoderConfig
from clara.sources import ALIASES, EMBEDDED_MODELS, SourceError, resolve_source

PRESETS: dict[str, dict[str, Any]] = {
    "phi-2": {  # microsoft/phi-2
        "model_type": "phi", "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 2048, "partial_rotary_factor": 0.4, "rope_theta": 10000.0,
        "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "tie_word_embeddings": False,
        "bos_token_id": 50256, "eos_token_id": 50256,
    },
    "mistral-7b": {  # mistralai/Mistral-7B-Instruct-v0.2, the base of Apple's CLaRa-7B models
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
}

# Hub ids whose architecture a preset or an embedded model already describes (planned without the
# cache). SmolLM2-135M and its Instruct version share one architecture.
HUB_PRESETS: dict[str, str] = {
    "microsoft/phi-2": "phi-2",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral-7b",
    "HuggingFaceTB/SmolLM2-135M": "smollm2-135m",
    **{model.hub_id: alias for alias, model in EMBEDDED_MODELS.items()},
}

PRESET_NAMES: tuple[str, ...] = (*PRESETS, *ALIASES)


def preset_config(name: str) -> DecoderConfig:
    """A preset's config, or an embedded model's (read from its GGUF header)."""
    if name in PRESETS:
        return DecoderConfig.from_hf(dict(PRESETS[name]), source=f"preset {name}")
    if name in EMBEDDED_MODELS:
        return source_config(resolve_source(name))
    raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESET_NAMES)}")


def load_model_config(model: str, _depth: int = 0) -> DecoderConfig:
    """The architecture of `model` without loading weights (see the module docstring).

    Errors are ValueError (ConfigError, SourceError, GGUFFormatError) with a one-line message."""
    if model in PRESETS or model in EMBEDDED_MODELS:
        return preset_config(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix != ".gguf":
        return hf_config(path)  # a config.json under any name
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / CLARA_CONFIG_FILE).is_file() and _depth == 0:  # a Clara checkpoint: plan for its base
            try:
                base = read_checkpoint_meta(path)["base"]["name"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: cannot tell the base model of this Clara checkpoint ({e})") from None
            return load_model_config(str(base), _depth + 1)
        raise ValueError(f"{path}: a folder without config.json (nor {CLARA_CONFIG_FILE})")
    if model in HUB_PRESETS and not path.exists():
        return preset_config(HUB_PRESETS[model])
    try:
        return source_config(resolve_source(model, download=None))
    except SourceError as e:
        raise SourceError(f"{e}; planner presets: {', '.join(PRESET_NAMES)}") from None
