"""Model configuration: one dataclass describes every supported decoder family.

The families differ only in a handful of switches (norm kind, MLP kind, biases, fused projections,
parallel residual, partial rotary, RoPE scaling), so the decoder reads those switches instead of
being subclassed per family. `DecoderConfig.from_hf(config_json)` maps a Hugging Face
`config.json` onto these switches; presets for the embedded model live in `weights.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

# model_type values of config.json that we know how to build, and what family each one is.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3", "phi")


class ConfigError(ValueError):
    """A config that cannot describe a model we can build; the message names the field."""


@dataclass
class DecoderConfig:
    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096

    # --- family switches -----------------------------------------------------------------------
    model_type: str = "llama"  # kept so a checkpoint can say which family it came from
    norm: str = "rmsnorm"  # "rmsnorm" (Llama, Mistral, Qwen2, Phi-3) | "layernorm" (Phi-2)
    norm_eps: float = 1e-6
    mlp: str = "swiglu"  # "swiglu": down(silu(gate) * up) | "gelu": fc2(gelu_tanh(fc1))
    attention_bias: bool = False  # bias on q/k/v (Qwen2, Phi-2)
    attention_out_bias: bool = False  # bias on the output projection (Phi-2)
    mlp_bias: bool = False  # bias on MLP projections (Phi-2)
    lm_head_bias: bool = False  # Phi-2
    fused_qkv: bool = False  # Phi-3 stores one qkv_proj; we keep that layout
    fused_gate_up: bool = False  # Phi-3 stores one gate_up_proj
    parallel_residual: bool = False  # Phi-2: x + attn(ln(x)) + mlp(ln(x)), one norm per block
    tie_word_embeddings: bool = False

    # --- positions -----------------------------------------------------------------------------
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated (Phi-2 0.4, Phi-4-mini 0.75)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear"|"longrope", ...}
    sliding_window: int | None = None  # Mistral: keys older than this many positions are masked

    # --- special tokens ------------------------------------------------------------------------
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    # --- derived, filled in __post_init__ --------------------------------------------------------
    rotary_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ConfigError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.mlp == "gelu" and self.fused_gate_up:
            raise ConfigError("fused_gate_up needs mlp='swiglu'")
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dimension {self.rotary_dim} (head_dim x partial_rotary_factor) must be even")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "longrope", "default"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (llama3, linear, longrope)")

    # ------------------------------------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown DecoderConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Short hash of the architecture, so a checkpoint can refuse a different base."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "DecoderConfig":
        """Map a Hugging Face config.json (as a dict) onto our switches.

        `source` only names the file in error messages.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures") or []
            raise ConfigError(
                f"{source}: unknown architecture model_type={model_type!r} {archs}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str) -> Any:
            if key not in hf:
                raise ConfigError(f"{source}: missing field {key!r} for model_type {model_type!r}")
            return hf[key]

        # transformers >= 5 writes RoPE settings into `rope_parameters`; older files use
        # `rope_theta` + `rope_scaling`. Accept both.
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                rope_scaling = None
            elif kind == "longrope":
                rope_scaling.setdefault(
                    "original_max_position_embeddings",
                    hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")),
                )
        partial = hf.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))

        common = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            partial_rotary_factor=float(partial),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        act = hf.get("hidden_act", "silu")
        if model_type == "phi":
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
                raise ConfigError(f"{source}: hidden_act {act!r} not supported for phi (tanh-approximate GELU only)")
            if hf.get("qk_layernorm"):
                raise ConfigError(f"{source}: qk_layernorm=True is not supported")
            return cls(
                **common,
                norm="layernorm",
                norm_eps=hf.get("layer_norm_eps", 1e-5),
                mlp="gelu",
                attention_bias=True,
                attention_out_bias=True,
                mlp_bias=True,
                lm_head_bias=True,
                parallel_residual=True,
            )
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} not supported for {model_type} (silu only)")
        sliding = None
        if model_type == "mistral" or (model_type == "qwen2" and hf.get("use_sliding_window")):
            sliding = hf.get("sliding_window")
        return cls(
            **common,
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            # Qwen2 always has q/k/v bias and no output bias; Llama's `attention_bias` covers all four.
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            attention_out_bias=model_type == "llama" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            fused_qkv=model_type == "phi3",
            fused_gate_up=model_type == "phi3",
            sliding_window=sliding,
        )


def rope_attention_factor(cfg: DecoderConfig) -> float:
    """LongRoPE scales cos/sin by sqrt(1 + ln(s) / ln(L_orig)) where s is the context extension."""
    if cfg.rope_type != "longrope":
        return 1.0
    rs = cfg.rope_scaling or {}
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    original = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or cfg.max_position_embeddings / original
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))
