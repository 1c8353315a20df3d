"""Exporting a run as a checkpoint to ship: the weights in the chosen dtype, and a manifest whose
command reproduces the run's flags and whose hashes match the files."""

from __future__ import annotations

import json
import shlex

import torch

from clara.files import sha256_file
from clara.model import Clara
from clara.recipes.args import parse_args
from clara.recipes.export import main as export_main
from clara.recipes.loop import train


def test_export_writes_the_model_and_a_manifest_that_reproduces_the_run(tiny_base_dir, stage_files, tmp_path):
    flags = ["--pretrain", str(tiny_base_dir), "--dataset", str(stage_files["stage1"]), "--stage", "stage1",
             "--compress_rate", "16", "--doc_max_length", "32", "--max_len", "256", "--lora_rank", "4",
             "--train_batch_size", "2", "--micro_train_batch_size", "2", "--max_steps", "3", "--mse_loss",
             "--learning_rate", "1e-3", "--save_path", str(tmp_path / "run")]
    train(parse_args(flags))
    metrics = tmp_path / "eval.metrics.json"
    metrics.write_text(json.dumps({"metrics": {"nll": {"retained": 0.5}}}))
    out = tmp_path / "ship"
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--dtype", "bf16", "--metrics", str(metrics),
                        "--data_root", "/", "--note", "a test run"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == {name: sha256_file(out / name) for name in manifest["files"]}
    assert manifest["metrics"]["eval.metrics.json"]["metrics"]["nll"]["retained"] == 0.5
    assert manifest["notes"] == ["a test run"]
    [stage] = manifest["stages"]
    assert (stage["stage"], stage["steps"]) == ("stage1", 3) and stage["wall_s"] is not None
    assert stage["data"] == {str(stage_files["stage1"]): sha256_file(stage_files["stage1"])}
    command = shlex.split(stage["command"])
    assert command[0] == "clara-train" and parse_args(command[1:]) == parse_args(flags)
    shipped = json.loads((out / "clara.json").read_text())
    assert shipped["dtype"] == "bfloat16"
    model = Clara.from_pretrained(out)  # bf16 weights load into an fp32 model
    trained = Clara.from_pretrained(tmp_path / "run" / "final")
    assert torch.allclose(model.memory_embeddings, trained.memory_embeddings, rtol=1e-2, atol=1e-3)
