"""Clara models named on the Hugging Face hub, and where conversions of official checkpoints are kept.

    Clara.from_pretrained("apple/CLaRa-7B-Instruct", subfolder="compression-16")
    Clara.from_pretrained("apple/CLaRa-7B-Instruct:compression-16")      # the same, as one string
    clara-eval --model apple/CLaRa-7B-Instruct:compression-16 ...          # any command taking a model

The subfolder's files are downloaded with huggingface_hub (offline: taken from the hub cache).
clara.checkpoint.resolve_checkpoint then loads a folder in our format (clara.json) as it is, and
converts one holding an official checkpoint (config.json, adapters.pth,
decoder_first_last_layers.pth) once, saving the conversion under

    $CLARA_CACHE/converted/<org>--<name>/<subfolder>/<commit>/<dtype>/   (CLARA_CACHE: ~/.cache/clara)

so later loads read it and convert nothing; a new commit on the hub is a new folder. A local
official folder is converted the same way, under converted/local/<key>/<dtype>/, its key made of
its path and its files' sizes and modification times.

This module knows hub names, downloads and cache paths; it reads no weights and converts nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from clara.errors import CheckpointError
from clara.official_format import ADAPTERS_FILE, CONFIG_FILE, EMBEDDINGS_FILE
from clara.sources import error_line, looks_like_repo_id, snapshot_from_hub

CACHE_ENV = "CLARA_CACHE"
# A checkpoint at a repo's root: only these files are fetched, never a base model's weights. Ours
# are clara.checkpoint's file names (written out: that module imports this one).
ROOT_FILES = ("clara.json", "adapters.safetensors", "embeddings.safetensors",
              CONFIG_FILE, ADAPTERS_FILE, EMBEDDINGS_FILE)
_SUBFOLDER = re.compile(r"[\w.\-]+(/[\w.\-]+)*")


@dataclass(frozen=True)
class HubCheckpoint:
    repo_id: str  # "org/name"
    subfolder: str  # "compression-16"; "" for the repo's root

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.subfolder}" if self.subfolder else self.repo_id

    def patterns(self) -> list[str]:
        """What to download: the whole subfolder (config, weights, tokenizer files)."""
        return [f"{self.subfolder}/*"] if self.subfolder else list(ROOT_FILES)


def parse_hub_checkpoint(name: str | os.PathLike, subfolder: str | None = None) -> HubCheckpoint | None:
    """'org/name', 'org/name:subfolder', or 'org/name' with subfolder= -> HubCheckpoint; None for a
    name that is a local path or no repo id."""
    text = str(name)
    if Path(text).expanduser().exists():
        return None
    repo_id, colon, written = text.partition(":")
    if not looks_like_repo_id(repo_id):
        return None
    if colon and subfolder is not None:
        raise CheckpointError(f"{text}: names subfolder {written!r} and subfolder={subfolder!r} is given too; "
                              "give it once")
    folder = (subfolder if subfolder is not None else written).strip("/")
    if folder and (not _SUBFOLDER.fullmatch(folder) or {".", ".."} & set(folder.split("/"))):
        raise CheckpointError(f"{text}: subfolder {folder!r} must be a folder path inside the repo, "
                              "e.g. 'compression-16'")
    return HubCheckpoint(repo_id, folder)


def is_official_folder(folder: Path) -> bool:
    """A folder holding an official CLaRa checkpoint's config.json and adapters.pth."""
    return (folder / CONFIG_FILE).is_file() and (folder / ADAPTERS_FILE).is_file()


def names_official_or_hub_checkpoint(name: str | os.PathLike) -> bool:
    """A local official checkpoint folder, or a hub checkpoint written with its subfolder
    ('org/name:subfolder'); a bare 'org/name' stays a base model's name. No download."""
    path = Path(name).expanduser()
    if path.exists():
        return is_official_folder(path)
    hub = parse_hub_checkpoint(name)
    return hub is not None and bool(hub.subfolder)


def download_hub_checkpoint(hub: HubCheckpoint) -> tuple[Path, str]:
    """(the checkpoint's folder in the hub snapshot, the snapshot's commit hash), after downloading
    the folder's files (offline: from the hub cache)."""
    try:
        snapshot = snapshot_from_hub(hub.repo_id, hub.patterns())
    except Exception as e:  # noqa: BLE001 - unknown repo, no network and nothing cached, auth: one line
        raise CheckpointError(f"{hub}: not a local path, and the hub download failed: {error_line(e)}") from None
    folder = snapshot / hub.subfolder
    if hub.subfolder and not folder.is_dir():
        raise CheckpointError(f"{hub}: the hub repo {hub.repo_id} has no subfolder {hub.subfolder!r} "
                              f"(commit {snapshot.name})")
    return folder, snapshot.name


# ---------------------------------------------------------------------------------------------
# Where conversions are kept
# ---------------------------------------------------------------------------------------------
def converted_cache_dir() -> Path:
    """$CLARA_CACHE/converted (CLARA_CACHE defaults to ~/.cache/clara)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clara"
    return Path(root).expanduser() / "converted"


def hub_conversion_dir(hub: HubCheckpoint, commit: str, dtype: torch.dtype) -> Path:
    """Keyed by dtype too: the adapters and token rows are saved in the dtype they were converted in."""
    return (converted_cache_dir() / hub.repo_id.replace("/", "--") / (hub.subfolder or "_root") / commit
            / str(dtype).removeprefix("torch."))


def local_conversion_dir(folder: Path, dtype: torch.dtype) -> Path:
    """Keyed by the folder's path and its files' sizes and modification times: an edited file
    means a new conversion, without hashing gigabytes."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for name in (CONFIG_FILE, ADAPTERS_FILE, EMBEDDINGS_FILE):
        stat = (folder / name).stat() if (folder / name).exists() else None
        h.update(f"|{name}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}".encode())
    return converted_cache_dir() / "local" / h.hexdigest()[:16] / str(dtype).removeprefix("torch.")
