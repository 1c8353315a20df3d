"""The checkpoint in git, checkpoints/nutribot-smollm2: its files are those its manifest hashes,
it loads on the embedded base, and the manifest says how it was made."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch

from clara.files import sha256_file
from clara.model import Clara
from clara.recipes.args import parse_args

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "nutribot-smollm2"


def manifest() -> dict:
    return json.loads((SHIPPED / "manifest.json").read_text())


def test_the_manifest_hashes_the_files_in_git():
    recorded = manifest()
    assert set(recorded["files"]) == {"clara.json", "adapters.safetensors", "embeddings.safetensors"}
    for name, digest in recorded["files"].items():
        assert sha256_file(SHIPPED / name) == digest, name
    assert sum((SHIPPED / name).stat().st_size for name in recorded["files"]) <= 40 * 2**20


def test_the_manifest_says_how_each_stage_was_made():
    recorded = manifest()
    stages = [stage["stage"] for stage in recorded["stages"]]
    assert stages[0] == "stage1" and stages[-1] == json.loads((SHIPPED / "clara.json").read_text())[
        "clara_config"]["training_stage"]
    for stage in recorded["stages"]:
        command = shlex.split(stage["command"])
        assert command[0] == "clara-train" and parse_args(command[1:]).stage == stage["stage"]
        assert stage["steps"] > 0 and stage["data"] and all(len(d) == 64 for d in stage["data"].values())
    assert recorded["git_commit"] and recorded["device"]


def test_it_loads_on_the_embedded_base_and_compresses():
    model = Clara.from_pretrained(SHIPPED)
    assert model.base_name == "smollm2-135m" and model.config.compress_rate == manifest()["stages"][0][
        "identity"]["shapes"]["compress_rate"]
    memory = model.compress_documents(["Kale is rich in vitamin K, which warfarin works against."])
    assert memory.shape == (1, model.config.n_mem_tokens, model.hidden_size) and bool(torch.isfinite(memory).all())
