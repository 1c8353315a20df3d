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

from clara.stages import STAGE_NAMES

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


def in_decoder_blocks(module_name: str) -> bool:
    """Whether a module lives inside the decoder's transformer blocks (`layers.<i>. ...`): the linear
    layers that LoRA's "all-linear" adapts and quantization replaces, never embeddings or lm_head."""
    return "layers" in module_name.split(".")[:-1]


# =================================================================================================
# CLaRa: compression, memory tokens, adapters, retrieval
# =================================================================================================
MAX_COMPRESS_RATE = 256

# The strings of CLaRa's special tokens. The official release spells memory tokens `<MEM{i}>`;
# we write `<MEM_{i}>`, so importing an official checkpoint maps tokens by role, not by spelling.
MEM_TOKEN = "<MEM>"  # the one shared memory token when distinct_mem_tokens is False
ENC_TOKEN = "<ENC>"  # opens every compressor input
SEP_TOKEN = "<SEP>"  # closes each document slot in a decoder prompt (when sep_token is True)
AE_TOKEN = "<AE>"  # reserved by the official vocabulary (auto-encoding mode); added so ids line up


def mem_token(i: int) -> str:
    return f"<MEM_{i}>"


@dataclass
class ClaraConfig:
    """What CLaRa adds on top of a base decoder: compression, memory tokens, LoRA, top-k.

    A document of up to `doc_max_length` tokens becomes `n_mem_tokens = doc_max_length //
    compress_rate` memory vectors; the decoder prompt holds one slot of that many placeholders
    per document. Defaults follow the official training CLI (distinct, trainable memory tokens,
    <SEP> after each slot, LoRA r=16 alpha=2r dropout 0.1 on every linear layer).
    """

    # --- compression -----------------------------------------------------------------------------
    compress_rate: int = 32  # document tokens per memory vector, 1..256
    doc_max_length: int = 256  # longer documents are truncated to this many tokens
    distinct_mem_tokens: bool = True  # <MEM_0>..<MEM_{n-1}>; False: one shared <MEM> repeated
    train_mem_embeddings: bool = True  # only the memory-token rows of the embedding get gradient
    sep_token: bool = True  # a <SEP> after each document slot in the decoder prompt

    # --- LoRA adapters (encoder_adapter, decoder_adapter, query_reasoner_adapter) ----------------
    lora_r: int = 16
    lora_alpha: float | None = None  # None -> 2 * lora_r; the update is scaled by alpha / r
    lora_dropout: float = 0.1
    lora_target_modules: str | tuple[str, ...] = "all-linear"  # or the projection names, e.g. ("q_proj",)

    # --- training and generation -----------------------------------------------------------------
    training_stage: str = "stage1"  # one of clara.stages.STAGE_NAMES
    generation_top_k: int = 5  # documents (slots) per decoder prompt in stage1_2 / stage2
    retrieval_temperature: float = 0.02  # tau of the differentiable top-k and of InfoNCE (paper: 0.02)
    mse_loss: bool = False  # add the compressor's alignment loss (weighted by mse_loss_weight)
    mse_loss_weight: float = 0.1
    qa_loss: bool = False  # stage1: train on the QA rows (the official CLI's --qa_loss)
    max_new_tokens: int = 128  # default length limit of the generate_* methods

    # --- derived, filled in __post_init__ ----------------------------------------------------------
    n_mem_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, list):  # JSON gives lists; keep a hashable tuple
            self.lora_target_modules = tuple(self.lora_target_modules)
        self._check_types()
        if not 1 <= self.compress_rate <= MAX_COMPRESS_RATE:
            raise ConfigError(f"compress_rate must be from 1 to {MAX_COMPRESS_RATE}, got {self.compress_rate}")
        if self.doc_max_length < 1:
            raise ConfigError(f"doc_max_length must be at least 1, got {self.doc_max_length}")
        if self.doc_max_length % self.compress_rate:
            # A remainder would leave the last tokens of a full document without a memory vector
            # of their own; name the nearest lengths that work instead.
            lower = self.doc_max_length - self.doc_max_length % self.compress_rate
            upper = lower + self.compress_rate
            hint = f"{lower} or {upper}" if lower else f"{upper}"
            raise ConfigError(
                f"doc_max_length {self.doc_max_length} is not a multiple of compress_rate {self.compress_rate}; "
                f"n_mem_tokens = doc_max_length / compress_rate must be a whole number "
                f"(try doc_max_length {hint})"
            )
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be at least 1, got {self.lora_r}")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = self.lora_target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                raise ConfigError(f"lora_target_modules must be 'all-linear' or a list of module names, "
                                  f"got {targets!r}")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"lora_target_modules must be 'all-linear' or a non-empty list of module names, "
                              f"got {list(targets)!r}")
        if self.training_stage not in STAGE_NAMES:
            raise ConfigError(f"training_stage must be one of {', '.join(STAGE_NAMES)}, "
                              f"got {self.training_stage!r}")
        if self.generation_top_k < 1:
            raise ConfigError(f"generation_top_k must be at least 1, got {self.generation_top_k}")
        if not self.retrieval_temperature > 0:
            raise ConfigError(f"retrieval_temperature must be positive, got {self.retrieval_temperature}")
        if self.mse_loss_weight < 0:
            raise ConfigError(f"mse_loss_weight must be zero or positive, got {self.mse_loss_weight}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        self.n_mem_tokens = self.doc_max_length // self.compress_rate

    def _check_types(self) -> None:
        """Type errors first, so a JSON "16" or true in place of a number is named, not compared."""
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            kind = _CLARA_FIELD_KINDS[f.name]
            if not has_kind(value, kind):
                raise ConfigError(f"{f.name} must be {KIND_TEXT[kind]}, got {value!r}")

    # ---------------------------------------------------------------------------------------------
    @property
    def lora_scaling(self) -> float:
        """alpha / r, the factor on the LoRA update B A x."""
        return self.lora_alpha / self.lora_r

    def memory_tokens(self) -> list[str]:
        """The n_mem_tokens placeholder strings of one document slot, in order."""
        if self.distinct_mem_tokens:
            return [mem_token(i) for i in range(self.n_mem_tokens)]
        return [MEM_TOKEN] * self.n_mem_tokens

    def special_tokens(self) -> list[str]:
        """The token strings to add to the tokenizer (each once): memory tokens, <ENC>, <SEP>, <AE>.

        <SEP> is added even when sep_token is False so that the vocabulary, and with it a
        checkpoint's embedding rows, does not depend on that switch.
        """
        mem = self.memory_tokens() if self.distinct_mem_tokens else [MEM_TOKEN]
        return [*mem, ENC_TOKEN, SEP_TOKEN, AE_TOKEN]

    def to_dict(self) -> dict[str, Any]:
        """The init fields, JSON-ready (n_mem_tokens is derived, so not written)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if isinstance(out["lora_target_modules"], tuple):
            out["lora_target_modules"] = list(out["lora_target_modules"])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClaraConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"ClaraConfig.from_dict expects a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            noun = "field" if len(unknown) == 1 else "fields"
            raise ConfigError(f"unknown ClaraConfig {noun}: {', '.join(unknown)}")
        return cls(**d)


# The JSON value kinds a config field may be declared as: how each is checked, and how a message
# names it. ClaraConfig and the official-checkpoint reader (clara.official) both check with these.
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_module_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) and v for v in value)


_KIND_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "number": _is_number,
    "number?": lambda v: v is None or _is_number(v),
    "str": lambda v: isinstance(v, str),
    "modules": lambda v: isinstance(v, (str, list, tuple)),  # ClaraConfig names the exact problem after
    "module_list": lambda v: v == "all-linear" or _is_module_list(v),
}
KIND_TEXT = {"int": "an integer", "bool": "true or false", "number": "a finite number",
             "number?": "a finite number or null", "str": "a string",
             "modules": "'all-linear' or a list of module names",
             "module_list": "'all-linear' or a non-empty list of module names"}


def has_kind(value: Any, kind: str) -> bool:
    """Whether a (JSON-decoded) value is of `kind`, one of KIND_TEXT's keys; bools are not numbers."""
    return _KIND_CHECKS[kind](value)


# How each ClaraConfig field is type-checked (see ClaraConfig._check_types).
_CLARA_FIELD_KINDS = {
    "compress_rate": "int", "doc_max_length": "int", "distinct_mem_tokens": "bool",
    "train_mem_embeddings": "bool", "sep_token": "bool", "lora_r": "int", "lora_alpha": "number?",
    "lora_dropout": "number", "lora_target_modules": "modules", "training_stage": "str",
    "generation_top_k": "int", "retrieval_temperature": "number", "mse_loss": "bool",
    "mse_loss_weight": "number", "qa_loss": "bool", "max_new_tokens": "int",
}
