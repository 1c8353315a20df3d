"""Reading a checkpoint written by the official CLaRa release, and converting it onto a Clara class.

clara.official puts it on Clara (import_official_checkpoint) and is the command `clara-import`;
clara.checkpoint converts through here when Clara.from_pretrained is given an official folder or
a hub checkpoint. So this module imports neither clara.model nor clara.checkpoint: the model
class comes as an argument.

The official `CLaRa.save_pretrained` (LoRA models) writes three files into one directory:

    config.json                     its CLaRaConfig: decoder_model_name, compr_rate, doc_max_length,
                                    different_mem_tokens, lora_r, training_stage, ...
    adapters.pth                    torch.save({adapter name: peft adapter state dict}); keys such as
                                    "model.layers.0.self_attn.q_proj.lora_A.weight" [r, in]
    decoder_first_last_layers.pth   torch.save({"model.embed_tokens.weight": [V', E],
                                    "lm_head.weight": [V', E]}), the whole resized matrices (a tied
                                    model saves only the embedding)

Both .pth files are pickles. They are read with torch.load(weights_only=True) and nothing else:
tensors, dicts and plain values load; a pickle that names any other class or function is refused
before anything in it runs.

Token rows are matched by token name, not by id. The official tokenizer appends `<MEM0>`..`<MEM{n-1}>`
(or one `<MEM>`), `<AE>`, `<ENC>`, `<SEP>` after the base vocabulary; we name memory tokens
`<MEM_0>`.. and add them in our own order (ClaraConfig.special_tokens), so each of our rows is
copied from the official row of the token with the same role. Base rows are kept from the base.

    model = convert_official_checkpoint("clara-stage2-ckpt", Clara, base="mistralai/Mistral-7B-Instruct-v0.2")
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clara.config import (
    AE_TOKEN,
    ENC_TOKEN,
    MEM_TOKEN,
    SEP_TOKEN,
    KIND_TEXT,
    ClaraConfig,
    ConfigError,
    has_kind,
)
from clara.errors import CheckpointError
from clara.stages import ENCODER, QUERY, STAGE_NAMES, get_stage
from clara.lora import add_adapter, copy_adapter, load_adapter_state_dict
from clara.weights import HF_NAME_MAPS, WeightsError, _compile_map, load_base, rename

CONFIG_FILE = "config.json"
ADAPTERS_FILE = "adapters.pth"
EMBEDDINGS_FILE = "decoder_first_last_layers.pth"

# The official CLaRa builds every adapter with this peft LoraConfig (only r comes from its config).
OFFICIAL_LORA_DROPOUT = 0.1
OFFICIAL_LORA_ALPHA_PER_R = 2
OFFICIAL_ADAPTERS = ("encoder_adapter", "decoder_adapter", "query_reasoner_adapter")
KBTC_TOKEN = "<KBTC>"  # the official tokenizer appends it after its other tokens when kbtc_training is on

# A PeftModel's own state dict prefixes every name with this; the official files do not, but a
# checkpoint re-saved through PeftModel does.
PEFT_PREFIX = "base_model.model."
# "<module>.lora_A.weight", or peft's in-memory form "<module>.lora_A.<adapter>.weight".
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<factor>lora_A|lora_B)(?:\.(?P<adapter>[A-Za-z_][A-Za-z0-9_]*))?"
                       r"\.weight$")


class OfficialCheckpointError(CheckpointError):
    """An official checkpoint that cannot be imported; the message names the file and the field or key."""


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
# Official field -> (our ClaraConfig field, kind, default when the file leaves it out; _REQUIRED: no default).
_REQUIRED = object()
_CONFIG_FIELDS: dict[str, tuple[str | None, str, Any]] = {
    "compr_rate": ("compress_rate", "int", _REQUIRED),
    "doc_max_length": ("doc_max_length", "int", _REQUIRED),
    "different_mem_tokens": ("distinct_mem_tokens", "bool", _REQUIRED),
    "lora_r": ("lora_r", "int", _REQUIRED),
    "optimize_mem_tokens": ("train_mem_embeddings", "bool", False),
    "training_stage": ("training_stage", "str", "stage1"),
    "generation_top_k": ("generation_top_k", "int", 1),
    "max_new_tokens": ("max_new_tokens", "int", 128),
    # Read, but not copied into ClaraConfig as they are (see read_official_config).
    "decoder_model_name": (None, "str", None),
    "lora": (None, "bool", True),
    "sep": (None, "bool", False),
    "kbtc_training": (None, "bool", False),
    "quantization": (None, "str", "no"),
    "lora_target_modules": (None, "module_list", "all-linear"),  # not official; written by some forks
}


@dataclass
class OfficialConfig:
    """What config.json says, in our terms.

    base_name: its decoder_model_name (None when absent).
    target_modules: LoRA targets in Hugging Face module names ("all-linear" for the official release).
    ignored: official fields that have no effect here (generic transformers fields included).
    notes: differences from the official behaviour worth telling the user.
    """

    clara: ClaraConfig
    base_name: str | None
    target_modules: str | tuple[str, ...]
    kbtc_training: bool
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_official_config(path: str | os.PathLike) -> OfficialConfig:
    """Parse <path>/config.json; errors name the file and the field."""
    config_path = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise OfficialCheckpointError(f"{path}: not a directory (an official CLaRa checkpoint is a directory)")
    if not config_path.is_file():
        raise OfficialCheckpointError(f"{config_path}: missing; not an official CLaRa checkpoint")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise OfficialCheckpointError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise OfficialCheckpointError(f"{config_path}: not UTF-8 text ({e})") from None
    if not isinstance(raw, dict):
        raise OfficialCheckpointError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")

    values: dict[str, Any] = {}
    for name, (_, kind, default) in _CONFIG_FIELDS.items():
        if name not in raw:
            if default is _REQUIRED:
                raise OfficialCheckpointError(f"{config_path}: missing field {name!r}")
            values[name] = default
            continue
        value = raw[name]
        if name == "decoder_model_name" and value is None:
            values[name] = None
            continue
        if not has_kind(value, kind):
            raise OfficialCheckpointError(f"{config_path}: field {name!r} must be {KIND_TEXT[kind]}, got {value!r}")
        values[name] = value

    if not values["lora"]:
        raise OfficialCheckpointError(f"{config_path}: field 'lora' is false; only LoRA checkpoints (adapters.pth "
                                      "+ decoder_first_last_layers.pth) can be imported")
    if values["training_stage"] not in STAGE_NAMES:
        raise OfficialCheckpointError(f"{config_path}: field 'training_stage' is {values['training_stage']!r}; "
                                      f"supported: {', '.join(STAGE_NAMES)}")
    notes = []
    if not values["sep"]:
        # The official prompts always put <SEP> after each memory slot; its `sep` flag only decides
        # whether later slots are written one position further on (with sep=False they land one token
        # off, a bug). The model was trained on prompts holding <SEP>, so we keep it.
        notes.append("field 'sep' is false, but the official prompts always hold <SEP> after each slot; "
                     "kept (sep_token=True)")
    if values["quantization"] != "no":
        notes.append(f"trained over a base quantized to {values['quantization']}; the base is loaded unquantized")

    targets = values["lora_target_modules"]
    targets = targets if isinstance(targets, str) else tuple(targets)
    try:
        clara = ClaraConfig(
            **{ours: values[name] for name, (ours, _, _) in _CONFIG_FIELDS.items() if ours is not None},
            sep_token=True,
            lora_alpha=OFFICIAL_LORA_ALPHA_PER_R * values["lora_r"],
            lora_dropout=OFFICIAL_LORA_DROPOUT,
            lora_target_modules=targets,
        )
    except ConfigError as e:
        raise OfficialCheckpointError(f"{config_path}: {e}") from None
    ignored = sorted(set(raw) - set(_CONFIG_FIELDS))
    return OfficialConfig(clara=clara, base_name=values["decoder_model_name"], target_modules=targets,
                          kbtc_training=values["kbtc_training"], ignored=ignored, notes=notes)


def translate_target_modules(targets: str | tuple[str, ...], model_type: str) -> str | tuple[str, ...]:
    """LoRA target names of a Hugging Face model (e.g. Phi-2's "dense", "fc1") -> our module names."""
    if isinstance(targets, str):
        return targets
    last = {src.rsplit(".", 1)[-1]: dst.rsplit(".", 1)[-1] for src, dst in HF_NAME_MAPS[model_type].items()}
    return tuple(last.get(t, t) for t in targets)


# ---------------------------------------------------------------------------------------------
# Special tokens
# ---------------------------------------------------------------------------------------------
def official_token_name(our_token: str) -> str:
    """Our spelling of a CLaRa token -> the official one (<MEM_3> -> <MEM3>; the others are equal)."""
    m = re.fullmatch(r"<MEM_(\d+)>", our_token)
    return f"<MEM{m[1]}>" if m else our_token


def official_special_tokens(config: ClaraConfig) -> list[str]:
    """The tokens the official tokenizer adds, in its order."""
    if config.distinct_mem_tokens:
        memory = [f"<MEM{i}>" for i in range(config.n_mem_tokens)]
    else:
        memory = [MEM_TOKEN]
    return [*memory, AE_TOKEN, ENC_TOKEN, SEP_TOKEN]


def official_token_ids(base_tokenizer, tokens: list[str]) -> tuple[dict[str, int], int]:
    """Ids the official tokenizer gave `tokens` on top of `base_tokenizer` (not modified), and its size.

    Like Hugging Face's add_special_tokens: a token already in the vocabulary keeps its id, a new
    one takes the next free id after the base tokenizer's length.
    """
    ids, size = {}, len(base_tokenizer)
    for token in tokens:
        existing = base_tokenizer.token_to_id(token)
        if existing is not None:
            ids[token] = existing
        else:
            ids[token] = size
            size += 1
    return ids, size


# ---------------------------------------------------------------------------------------------
# .pth files: torch.load(weights_only=True), nothing else
# ---------------------------------------------------------------------------------------------
def load_weights_only(path: Path) -> Any:
    """torch.load with weights_only=True; a refused or unreadable pickle is an error naming the file."""
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; we never do that, so only keep the reason.
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.? Please use|\n\n|$)", str(e), re.DOTALL)
        detail = " ".join((reason[1] if reason else str(e).splitlines()[0]).split())
        raise OfficialCheckpointError(f"{path}: refused by torch.load(weights_only=True): {detail}. The file holds "
                                      "objects other than tensors and plain containers; it is not unpickled "
                                      "any further") from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways (zip, struct, EOF, opcodes)
        first = str(e).splitlines()[0] if str(e) else ""
        raise OfficialCheckpointError(f"{path}: unreadable torch file ({type(e).__name__}: {first})") from None


def _tensor_dict(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise OfficialCheckpointError(f"{path}: {what} must be a dict of tensors, got {type(obj).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialCheckpointError(f"{path}: {what} holds entries that are not named tensors: {', '.join(bad[:10])}")
    return obj


def convert_adapter_state_dict(state: dict[str, torch.Tensor], model_type: str, adapter: str,
                               source: str = ADAPTERS_FILE) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One official (peft) adapter state dict -> ours ({"layers.0.attn.q_proj.lora_A": [r, in], ...}).

    Module names go through the same HF_NAME_MAPS as base weights. Returns (state, skipped keys):
    peft also stores the resized embedding and lm head in each adapter when the vocabulary grew;
    those copies are skipped (decoder_first_last_layers.pth holds the same matrices).
    Any other key is an error that lists them.
    """
    rules = _compile_map(HF_NAME_MAPS[model_type])
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    skipped, unknown, problems = [], [], []
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = _LORA_KEY.match(name)
        if m is None:
            if rename(name, rules) in ("embed_tokens.weight", "lm_head.weight"):
                skipped.append(key)
            else:
                unknown.append(key)
            continue
        if m["adapter"] not in (None, adapter, "default"):
            problems.append(f"{key} names adapter {m['adapter']!r}")
            continue
        module = rename(m["module"] + ".weight", rules)
        if module is None:
            unknown.append(key)
            continue
        ours = f"{module.removesuffix('.weight')}.{m['factor']}"
        if ours in out:
            problems.append(f"{key} and {origin[ours]} are the same tensor")
            continue
        out[ours], origin[ours] = tensor, key
    if unknown:
        problems.append(f"keys that are not LoRA factors of a {model_type} model: "
                        f"{', '.join(sorted(unknown)[:20])}" + (" ..." if len(unknown) > 20 else ""))
    if problems:
        raise OfficialCheckpointError(f"{source}: adapter {adapter!r}: " + "; ".join(problems))
    return out, skipped


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------
def convert_official_checkpoint(path: str | os.PathLike, model_class, *, base: str | None = None, base_model=None,
                                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                                quantize: str | None = None):
    """An official CLaRa checkpoint directory -> a `model_class` (Clara, or a subclass).

    base: the base model to load (default: config.json's decoder_model_name): a Hugging Face
        directory, hub id, GGUF file or `smollm2-135m`.
    base_model: an already loaded (decoder, tokenizer) pair instead (tests, custom bases); both are
        modified in place.
    """

    path = Path(path)
    official = read_official_config(path)
    adapters_path, embeddings_path = path / ADAPTERS_FILE, path / EMBEDDINGS_FILE
    for required in (adapters_path, embeddings_path):
        if not required.is_file():
            raise OfficialCheckpointError(f"{required}: missing; an official LoRA checkpoint holds "
                                          f"{CONFIG_FILE}, {ADAPTERS_FILE} and {EMBEDDINGS_FILE}")
    # Read (and vet) both pickles before spending time on the base.
    adapter_states = load_weights_only(adapters_path)
    if not isinstance(adapter_states, dict):
        raise OfficialCheckpointError(f"{adapters_path}: expected a dict of adapter name -> state dict, "
                                      f"got {type(adapter_states).__name__}")
    if not adapter_states:
        raise OfficialCheckpointError(f"{adapters_path}: holds no adapters")
    unknown_adapters = sorted(str(a) for a in adapter_states if a not in OFFICIAL_ADAPTERS)
    if unknown_adapters:
        raise OfficialCheckpointError(f"{adapters_path}: unknown adapters {unknown_adapters}; "
                                      f"expected some of {list(OFFICIAL_ADAPTERS)}")
    for name, state in adapter_states.items():
        _tensor_dict(state, adapters_path, f"adapter {name!r}")
    first_last = _tensor_dict(load_weights_only(embeddings_path), embeddings_path, "the file")

    base_name = base or official.base_name
    if base_model is not None:
        decoder, tokenizer = base_model
        base_name = base_name or "<in-memory>"
    elif base_name is None:
        raise OfficialCheckpointError(f"{path / CONFIG_FILE}: field 'decoder_model_name' is missing; "
                                      "give the base model (--base)")
    else:
        try:
            decoder, tokenizer = load_base(base_name, dtype=dtype, device=device, quantize=quantize)
        except WeightsError as e:
            raise OfficialCheckpointError(f"base model {base_name!r} (from {path / CONFIG_FILE} or --base): "
                                          f"{e}") from None

    model_type = decoder.config.model_type
    config = dataclasses.replace(official.clara,
                                 lora_target_modules=translate_target_modules(official.target_modules, model_type))
    stage = config.training_stage
    # Everything is checked before the base is touched: from_decoder modifies it in place.
    converted = {name: convert_adapter_state_dict(state, model_type, name, str(adapters_path))[0]
                 for name, state in adapter_states.items()}
    missing = [a for a in get_stage(stage).adapters if a not in converted]
    copy_query = missing == [QUERY] and ENCODER in converted
    if missing and not copy_query:
        raise OfficialCheckpointError(f"{adapters_path}: holds {sorted(converted)}, but a {stage} model "
                                      f"({path / CONFIG_FILE} field 'training_stage') also needs {missing}")
    # Official ids are those the official tokenizer gave on top of the base tokenizer, before ours are added.
    official_tokens = official_special_tokens(config) + ([KBTC_TOKEN] if official.kbtc_training else [])
    official_ids, official_vocab = official_token_ids(tokenizer, official_tokens)
    embedding, head = _official_matrices(first_last, decoder, official_vocab, len(tokenizer), embeddings_path)

    model = model_class.from_decoder(decoder, tokenizer, config, base_name=str(base_name))
    _copy_token_rows(model, embedding, head, official_ids)
    for name, state in converted.items():
        if name not in model.adapter_names:
            add_adapter(model.decoder, name, config.lora_r, config.lora_alpha, config.lora_dropout)
        try:
            load_adapter_state_dict(model.decoder, name, state, strict=True)
        except ValueError as e:
            raise OfficialCheckpointError(f"{adapters_path}: {e} (keys in our module names)") from None
    if copy_query:
        # As the official loader: a stage-2 model without a query reasoner starts it from the compressor.
        copy_adapter(model.decoder, ENCODER, QUERY)
    model.configure_training(stage)  # trainability of adapters added above
    return model.to(device)


def _official_matrices(tensors: dict[str, torch.Tensor], decoder, official_vocab: int, n_base: int,
                       where: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embedding [V', E], lm head [V', E] or None when tied) from decoder_first_last_layers.pth, checked."""
    rules = _compile_map(HF_NAME_MAPS[decoder.config.model_type])
    found: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in tensors.items():
        ours = rename(key.removeprefix(PEFT_PREFIX), rules)
        if ours in ("embed_tokens.weight", "lm_head.weight"):
            found[ours] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise OfficialCheckpointError(f"{where}: unexpected tensors {sorted(unknown)}; expected the embedding "
                                      "(model.embed_tokens.weight) and, for an untied head, lm_head.weight")
    needed = {"embed_tokens.weight": "model.embed_tokens.weight"}
    if decoder.lm_head is not None:
        needed["lm_head.weight"] = "lm_head.weight"
    hidden = decoder.config.hidden_size
    for name, hf_name in needed.items():
        if name not in found:
            raise OfficialCheckpointError(f"{where}: missing tensor {hf_name!r} (the base's head is "
                                          f"{'untied' if decoder.lm_head is not None else 'tied'})")
        shape = tuple(found[name].shape)
        if shape != (official_vocab, hidden):
            raise OfficialCheckpointError(
                f"{where}: {hf_name} has shape {list(shape)}, expected [{official_vocab}, {hidden}] (base vocabulary "
                f"{n_base} + {official_vocab - n_base} CLaRa tokens); the base or its tokenizer differs from the "
                "one the checkpoint was trained on")

    embedding = found["embed_tokens.weight"]
    # A wrong base shows up as different base rows; a bf16 round trip changes them only slightly.
    with torch.no_grad():
        ours_base = decoder.embed_tokens.weight[:n_base].float()
        drift = (embedding[:n_base].float().to(ours_base.device) - ours_base).abs().max().item()
        scale = ours_base.abs().max().item()
    if drift > 0.02 * scale + 1e-6:
        warnings.warn(f"{where}: the base embedding rows differ from the loaded base's by up to {drift:.3g} "
                      f"(largest entry {scale:.3g}); is it the base the checkpoint was trained on?", stacklevel=3)
    return embedding, (found["lm_head.weight"] if decoder.lm_head is not None else None)


@torch.no_grad()
def _copy_token_rows(model, embedding: torch.Tensor, head: torch.Tensor | None, official_ids: dict[str, int]) -> None:
    """Each of our CLaRa token rows <- the official row of the token with the same role (by name, not id)."""
    decoder, tokenizer = model.decoder, model.tokenizer
    ours_ids = [tokenizer.token_to_id(t) for t in model.config.special_tokens()]
    theirs = [official_ids[official_token_name(t)] for t in model.config.special_tokens()]
    weight = decoder.embed_tokens.weight
    weight[ours_ids] = embedding[theirs].to(device=weight.device, dtype=weight.dtype)
    if head is not None:
        lm_head = decoder.lm_head.weight
        lm_head[ours_ids] = head[theirs].to(device=lm_head.device, dtype=lm_head.dtype)
    # The memory tokens are read from model.memory_embeddings, not from the embedding matrix.
    memory_rows = [official_ids[official_token_name(tokenizer.id_to_token(i))] for i in model.memory_token_ids]
    mem = model.memory_embeddings
    mem.copy_(embedding[memory_rows].to(device=mem.device, dtype=mem.dtype))
