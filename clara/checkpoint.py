"""Clara checkpoints: what a trained model adds to its base, as safetensors + JSON.

A checkpoint directory holds
    clara.json              format, ClaraConfig, the base (name, config fingerprint, weights probe),
                            the added tokens with their ids, the adapters, a sha256 per file
    adapters.safetensors    "<adapter>.<layer>.lora_A" [r, in] / ".lora_B" [out, r]
    embeddings.safetensors  "memory_embeddings" (the trainable memory rows), "embed_rows" (every
                            added token's row of the input embedding) and, for an untied head,
                            "lm_head_rows" (+ "lm_head_bias_rows")
The base weights are not copied: `load_clara` loads the recorded base and refuses one whose
architecture or weights differ from the one the checkpoint was trained on. It also takes a hub
checkpoint's name or an official CLaRa checkpoint, converted once (resolve_checkpoint).

Writes are atomic per file: everything goes to a temporary sibling directory; a new folder is that
directory renamed into place, an existing one gets each file renamed over its old version (its
other files are left alone), and the sha256s in clara.json refuse a mix of old and new files.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clara import official_format
from clara.files import current_umask, sha256_file
from clara.config import ClaraConfig, ConfigError, DecoderConfig
from clara.errors import CheckpointError
from clara.hub_checkpoints import (
    download_hub_checkpoint,
    hub_conversion_dir,
    is_official_folder,
    local_conversion_dir,
    names_official_or_hub_checkpoint,
    parse_hub_checkpoint,
)
from clara.prompts import PLAIN_TEXTS, PromptTexts
from clara.lora import add_adapter, adapter_state_dict, load_adapter_state_dict
from clara.stages import get_stage
from clara.weights import load_base

if TYPE_CHECKING:
    from clara.model import Clara

log = logging.getLogger(__name__)

FORMAT = "clara-rag-checkpoint/1"
CONFIG_FILE = "clara.json"
ADAPTERS_FILE = "adapters.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"


def base_fingerprint(config: DecoderConfig, tokenizer_size: int) -> str:
    """Identity of a base model: its architecture config and its tokenizer's size."""
    return f"{config.fingerprint()}-v{tokenizer_size}"


def weights_probe(decoder, rounded: bool = True) -> str:
    """Hash of a few base tensors (final norm, first embedding rows, first input norm).

    Two bases with one architecture (SmolLM2 base vs. instruct) share a config fingerprint; this
    tells them apart without hashing the whole model. The values are rounded to bf16 first, so the
    same base loaded in fp32, bf16 or fp16 gives the same probe (a checkpoint trained with --bf16
    loads in fp32). rounded=False: the probe of checkpoints written before the rounding, kept
    under the key "weights_probe" (new ones write "weights_probe_bf16").
    """
    h = hashlib.sha256()
    for t in (decoder.norm.weight, decoder.embed_tokens.weight[:2], decoder.layers[0].input_norm.weight):
        t = t.detach().to(torch.bfloat16) if rounded else t.detach()
        h.update(t.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _same_base_weights(decoder, recorded: dict) -> bool:
    if "weights_probe_bf16" in recorded:
        return weights_probe(decoder) == recorded["weights_probe_bf16"]
    # Older checkpoints hashed the weights as loaded: an fp32 load gives the unrounded hash, and the
    # hash of a bf16 load (a --bf16 run) equals today's rounded one.
    return recorded.get("weights_probe") in (weights_probe(decoder, rounded=False), weights_probe(decoder))


def _added_token_ids(model: "Clara") -> dict[str, int]:
    return {t: model.tokenizer.token_to_id(t) for t in model.config.special_tokens()}


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------
def save_clara(model: "Clara", path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        adapters = {}
        for name in model.adapter_names:
            for key, value in adapter_state_dict(model.decoder, name).items():
                adapters[f"{name}.{key}"] = value.cpu().contiguous()
        save_file(adapters, tmp / ADAPTERS_FILE)

        token_ids = _added_token_ids(model)
        ids = torch.tensor(list(token_ids.values()), dtype=torch.long)
        decoder = model.decoder
        embeddings = {"memory_embeddings": model.memory_embeddings.detach().cpu().contiguous(),
                      "embed_rows": decoder.embed_tokens.weight.detach()[ids.to(decoder.device)].cpu().contiguous()}
        if decoder.lm_head is not None:
            embeddings["lm_head_rows"] = decoder.lm_head.weight.detach()[ids.to(decoder.device)].cpu().contiguous()
            if decoder.lm_head.bias is not None:
                embeddings["lm_head_bias_rows"] = decoder.lm_head.bias.detach()[ids.to(decoder.device)].cpu().contiguous()
        save_file(embeddings, tmp / EMBEDDINGS_FILE)

        meta = {
            "format": FORMAT,
            "clara_config": model.config.to_dict(),
            "base": {"name": model.base_name, "fingerprint": model.base_fingerprint,
                     "weights_probe_bf16": weights_probe(decoder)},
            "added_tokens": token_ids,
            "memory_token_ids": model.memory_token_ids,
            "adapters": model.adapter_names,
            "prompt_texts": model.texts.to_dict(),
            "dtype": str(decoder.dtype).removeprefix("torch."),
            "sha256": {f: sha256_file(tmp / f) for f in (ADAPTERS_FILE, EMBEDDINGS_FILE)},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        # mkdtemp makes the directory private (0700) and safetensors writes its files 0600; give the
        # checkpoint the modes a plain mkdir / open() would, so others sharing the runs can read it.
        umask = current_umask()
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        _install_checkpoint(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install_checkpoint(new: Path, target: Path) -> None:
    """Put the checkpoint written in `new` at `target`, touching no other file of `target`.

    A new target is one rename. Into an existing folder, each of our files is renamed over its old
    version, clara.json last: a user's other files stay, and a crash halfway leaves weights that
    the old clara.json's sha256 refuses, never a silent mix.
    """
    if not target.exists():
        os.replace(new, target)
        return
    if not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a directory; choose another path for the checkpoint")
    for name in (ADAPTERS_FILE, EMBEDDINGS_FILE, CONFIG_FILE):
        if (target / name).is_dir():
            raise CheckpointError(f"{target / name}: is a folder, so the checkpoint cannot be written here")
    for name in (ADAPTERS_FILE, EMBEDDINGS_FILE, CONFIG_FILE):
        os.replace(new / name, target / name)
    new.rmdir()


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def split_by_adapter(adapters: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """adapters.safetensors' "<adapter>.<layer>.lora_X" keys -> {adapter: {"<layer>.lora_X": tensor}}."""
    by_adapter: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapters.items():
        name, _, rest = key.partition(".")
        by_adapter.setdefault(name, {})[rest] = value
    return by_adapter


def find_clara_checkpoint(name: str | os.PathLike | None) -> Path | None:
    """The Clara checkpoint folder that `name` means: the folder itself when it holds clara.json, a
    training run's folder's final model (RUN/final/), or None (not a checkpoint: a base model name).

    The one place that decides "checkpoint or run folder" for training, evaluation and loading.
    """
    if not name:
        return None
    path = Path(name)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "final" / CONFIG_FILE).is_file():
        return path / "final"
    return None


def names_clara_checkpoint(name: str | os.PathLike | None) -> bool:
    """Whether `name` means a trained Clara rather than a base model: a checkpoint or run folder, an
    official CLaRa checkpoint folder, or a hub checkpoint written 'org/name:subfolder'. Downloads
    nothing, reads no weights: commands use it to choose between from_pretrained and from_base."""
    if not name:
        return False
    return find_clara_checkpoint(name) is not None or names_official_or_hub_checkpoint(name)


def resolve_checkpoint(name: str | os.PathLike, subfolder: str | None = None, *, model_class: type["Clara"],
                       **conversion) -> Path:
    """The folder holding clara.json that `name` (+ subfolder) means; the one place names become
    checkpoint folders.

    A checkpoint or run folder is itself. A hub checkpoint ('org/name', 'org/name:subfolder') is
    downloaded (clara.hub_checkpoints). An official CLaRa checkpoint, local or on the hub, is
    converted once into a `model_class` and saved in the cache (converted_checkpoint); conversion:
    base, base_model, dtype, device for that. A name that is none of these comes back as a path,
    for read_checkpoint_meta to say what it lacks.
    """
    return resolve_or_convert(name, subfolder, model_class=model_class, **conversion)[0]


def resolve_or_convert(name: str | os.PathLike, subfolder: str | None = None, *, model_class: type["Clara"],
                       **conversion) -> tuple[Path, "Clara | None"]:
    """resolve_checkpoint's folder, and the model when this call converted an official checkpoint
    (else None): the conversion loaded the base once already, and a 7B base is slow to read twice."""
    found = find_clara_checkpoint(name) if subfolder is None else None
    if found is not None:
        return found, None
    path = Path(name).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        found = find_clara_checkpoint(folder)
        if found is None and is_official_folder(folder):
            return converted_checkpoint(folder, local_conversion_dir(folder, conversion["dtype"]), model_class,
                                        **conversion)
        return found or folder, None
    hub = parse_hub_checkpoint(name, subfolder)
    if hub is None:
        return path, None
    folder, commit = download_hub_checkpoint(hub)
    if (folder / CONFIG_FILE).is_file():
        return folder, None  # our own format, uploaded as it is
    if not is_official_folder(folder):
        hint = "" if hub.subfolder else f"; name the subfolder that holds it, as '{hub.repo_id}:SUBFOLDER'"
        raise CheckpointError(f"{hub}: holds neither {CONFIG_FILE} (a Clara checkpoint) nor "
                              f"{official_format.CONFIG_FILE} + {official_format.ADAPTERS_FILE} (an official CLaRa "
                              f"checkpoint) at commit {commit}{hint}")
    return converted_checkpoint(folder, hub_conversion_dir(hub, commit, conversion["dtype"]), model_class,
                                **conversion)


def converted_checkpoint(official_folder: Path, target: Path, model_class: type["Clara"], *, base: str | None,
                         base_model, dtype: torch.dtype, device: str | torch.device, quantize: str | None = None
                         ) -> tuple[Path, "Clara | None"]:
    """(`target`, holding the conversion of `official_folder`, made and saved atomically on first use;
    the converted model when this call made it, else None)."""
    if (target / CONFIG_FILE).is_file():
        return target, None
    log.info("converting the official CLaRa checkpoint %s into %s (once)", official_folder, target)
    # The conversion modifies the base in place; a given base stays untouched for the load that follows.
    model = official_format.convert_official_checkpoint(
        official_folder, model_class, base=base, base_model=None if base_model is None else copy.deepcopy(base_model),
        dtype=dtype, device=device, quantize=quantize)  # a quantized base keeps a 7B conversion within a laptop's RAM
    save_clara(model, target)
    return target, model


def read_checkpoint_meta(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not config_path.exists():
        hint = " (an official CLaRa checkpoint? use clara.official.import_official_checkpoint)" if (
            path / "adapters.pth").exists() else ""
        raise CheckpointError(f"{config_path}: missing; not a Clara checkpoint{hint}")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: field 'format' must be {FORMAT!r}, got "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    for key in ("clara_config", "base", "added_tokens", "adapters", "sha256"):
        if key not in meta:
            raise CheckpointError(f"{config_path}: missing field {key!r}")
    return meta


def checkpoint_texts(path: Path, meta: dict) -> PromptTexts:
    """The prompt wording a checkpoint was trained with. Checkpoints that record none were written
    before the official wording became the default, and were trained with PLAIN_TEXTS."""
    if "prompt_texts" not in meta:
        return PLAIN_TEXTS
    try:
        return PromptTexts.from_dict(meta["prompt_texts"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: prompt_texts: {e}") from None


def read_checkpoint_config(path: str | os.PathLike, meta: dict | None = None) -> ClaraConfig:
    """The ClaraConfig a checkpoint was saved with, read without loading any weights."""
    path = find_clara_checkpoint(path) or Path(path)
    meta = read_checkpoint_meta(path) if meta is None else meta
    try:
        return ClaraConfig.from_dict(meta["clara_config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: clara_config: {e}") from None


def _load_tensors(path: Path, expected_sha: str | None) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    if expected_sha is not None and sha256_file(path) != expected_sha:
        raise CheckpointError(f"{path}: corrupted (its sha256 differs from the one recorded in {CONFIG_FILE})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def load_clara(model_class: type["Clara"], path: str | os.PathLike, *, base: str | None = None,
               training_stage: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", base_model=None,
               settings: dict[str, Any] | None = None, subfolder: str | None = None,
               quantize: str | None = None) -> "Clara":
    """Load a checkpoint written by save_clara as a `model_class` (Clara.from_pretrained passes its class).

    path: a checkpoint or run folder, an official CLaRa checkpoint folder, or a hub repo id
        ("apple/CLaRa-7B-Instruct:compression-16"); see resolve_checkpoint.
    subfolder: the folder inside `path` (a hub repo or a local folder) that holds the checkpoint.
    base: where to load the base from, when it moved (default: the name recorded at save time).
    base_model: an already loaded (decoder, tokenizer) pair to use instead (tests, custom bases).
    training_stage: continue training in another stage. As the official release: stage1_2 keeps the
        encoder adapter and starts a fresh decoder adapter; stage2 without a saved query reasoner
        starts it from the encoder adapter.
    settings: ClaraConfig fields to use instead of the saved ones, e.g. a training run's
        generation_top_k; the model is built with them, not patched afterwards.
    quantize: "nf4" or "int8" loads the base with its block weights quantized (clara/quant.py);
        a checkpoint holds no base weights, so any checkpoint loads either way.
    """
    path, converted = resolve_or_convert(path, subfolder, model_class=model_class, base=base, base_model=base_model,
                                         dtype=dtype, device=device, quantize=quantize)
    if converted is not None and not settings and training_stage in (None, converted.config.training_stage):
        return converted  # what loading the conversion just saved would give, without reading the base again
    meta = read_checkpoint_meta(path)
    config = read_checkpoint_config(path, meta)
    saved_stage = config.training_stage
    if settings:
        config = dataclasses.replace(config, **settings)
    # The files are checked before the base is loaded: a corrupted checkpoint costs no model load.
    adapters = _load_tensors(path / ADAPTERS_FILE, meta["sha256"].get(ADAPTERS_FILE))
    embeddings = _load_tensors(path / EMBEDDINGS_FILE, meta["sha256"].get(EMBEDDINGS_FILE))

    base_name = base or meta["base"]["name"]
    decoder, tokenizer = base_model if base_model is not None else load_base(base_name, dtype=dtype, device=device,
                                                                             quantize=quantize)
    fingerprint = base_fingerprint(decoder.config, len(tokenizer))
    if fingerprint != meta["base"]["fingerprint"]:
        raise CheckpointError(f"{path}: trained on base {meta['base']['name']!r} (config {meta['base']['fingerprint']}), "
                              f"but the base given, {base_name!r}, has config {fingerprint}; load the matching base")
    if not _same_base_weights(decoder, meta["base"]):
        raise CheckpointError(f"{path}: trained on base {meta['base']['name']!r}, but the weights of {base_name!r} "
                              "differ (same architecture, other weights); load the matching base")

    model = model_class.from_decoder(decoder, tokenizer, config, base_name=meta["base"]["name"],
                                     texts=checkpoint_texts(path, meta))
    ids = _added_token_ids(model)
    if ids != meta["added_tokens"]:
        raise CheckpointError(f"{path / CONFIG_FILE}: the added tokens got ids {ids}, the checkpoint recorded "
                              f"{meta['added_tokens']}; the tokenizer differs")
    _load_embeddings(model, embeddings, path / EMBEDDINGS_FILE)

    saved = meta["adapters"]
    stage = training_stage or saved_stage
    by_adapter = split_by_adapter(adapters)
    if sorted(by_adapter) != sorted(saved):
        raise CheckpointError(f"{path / ADAPTERS_FILE}: holds adapters {sorted(by_adapter)}, {CONFIG_FILE} lists {saved}")
    for name in get_stage(stage).adapters_to_load(saved_stage, saved):
        if name not in model.adapter_names:
            add_adapter(model.decoder, name, config.lora_r, config.lora_alpha, config.lora_dropout)
        _load_adapter(model, name, by_adapter[name], path / ADAPTERS_FILE)
    model.configure_training(stage)
    return model.to(device)


def _load_adapter(model: "Clara", name: str, state: dict[str, torch.Tensor], where: Path) -> None:
    try:
        load_adapter_state_dict(model.decoder, name, state)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


@torch.no_grad()
def load_trained_weights(path: str | os.PathLike, model: "Clara") -> None:
    """Put a checkpoint's adapters and memory embeddings into `model`, a model of the same run
    (a training run resuming its step checkpoint): no base is loaded, the files' sha256 are checked."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    adapters = _load_tensors(path / ADAPTERS_FILE, meta["sha256"].get(ADAPTERS_FILE))
    embeddings = _load_tensors(path / EMBEDDINGS_FILE, meta["sha256"].get(EMBEDDINGS_FILE))
    memory = embeddings.get("memory_embeddings")
    if memory is None or memory.shape != model.memory_embeddings.shape:
        raise CheckpointError(f"{path / EMBEDDINGS_FILE}: memory_embeddings of shape "
                              f"{None if memory is None else list(memory.shape)}, the model needs "
                              f"{list(model.memory_embeddings.shape)}")
    for name, state in split_by_adapter(adapters).items():
        _load_adapter(model, name, state, path / ADAPTERS_FILE)
    model.memory_embeddings.copy_(memory)


@torch.no_grad()
def _load_embeddings(model: "Clara", tensors: dict[str, torch.Tensor], where: Path) -> None:
    decoder = model.decoder
    ids = torch.tensor(list(_added_token_ids(model).values()), dtype=torch.long, device=decoder.device)
    expected = {"memory_embeddings": tuple(model.memory_embeddings.shape),
                "embed_rows": (len(ids), decoder.config.hidden_size)}
    if decoder.lm_head is not None:
        expected["lm_head_rows"] = (len(ids), decoder.config.hidden_size)
        if decoder.lm_head.bias is not None:
            expected["lm_head_bias_rows"] = (len(ids),)
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{where}: missing tensor {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{where}: {key} has shape {list(tensors[key].shape)}, the model needs {list(shape)}")
    model.memory_embeddings.copy_(tensors["memory_embeddings"])
    decoder.embed_tokens.weight[ids] = tensors["embed_rows"].to(decoder.dtype).to(decoder.device)
    if decoder.lm_head is not None:
        decoder.lm_head.weight[ids] = tensors["lm_head_rows"].to(decoder.dtype).to(decoder.device)
        if decoder.lm_head.bias is not None:
            decoder.lm_head.bias[ids] = tensors["lm_head_bias_rows"].to(decoder.dtype).to(decoder.device)
