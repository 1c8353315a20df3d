"""A run folder belongs to one run; step checkpoints are checked file by file; an interrupted or
corrupted run resumes with the losses of one that never stopped."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clara.checkpoint import CheckpointError
from clara.recipes.args import parse_args
from clara.recipes.loop import train
from clara.recipes.train_state import MANIFEST_FILE, find_resumable_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def flags(base, data, *extra: str, stage: str = "stage1_2", save: str | None = "run") -> list[str]:
    out = ["--pretrain", str(base), "--dataset", str(data["stage2" if stage.startswith("stage2") else stage]),
           "--stage", stage, "--compress_rate", "16", "--doc_max_length", "32", "--max_len", "256",
           "--generation_top_k", "2", "--lora_rank", "4", "--train_batch_size", "2", "--micro_train_batch_size", "2",
           "--learning_rate", "5e-3", "--lr_scheduler", "constant", "--lora_dropout", "0.1", "--seed", "5"]
    return out + (["--save_path", save] if save else []) + list(extra)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# One folder, one run
# ---------------------------------------------------------------------------------------------
def test_two_runs_from_one_folder_with_defaults_keep_separate_state(tiny_base_dir, stage_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "2", "--save_steps", "1", save=None)))
    assert len(first.losses) == 2 and (tmp_path / "ckpt" / "final" / "clara.json").is_file()
    recorded = json.loads((tmp_path / "ckpt" / "run.json").read_text())
    assert recorded["identity"]["stage"] == "stage1_2" and recorded["flags"]["max_steps"] == 2
    before = tree(tmp_path / "ckpt")
    # a second run, another stage and data, with every default: refused, the first run untouched
    with pytest.raises(CheckpointError, match=r"--save_path ckpt: holds a run already .*--overwrite"):
        train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "1", stage="stage2", save=None)))
    assert tree(tmp_path / "ckpt") == before
    # given its own folder it runs there, and neither run's metrics mix with the other's
    train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "1", stage="stage2", save="second")))
    assert tree(tmp_path / "ckpt") == before
    assert [m["step"] for m in metrics(tmp_path / "ckpt")] == [1, 2]
    assert [m["step"] for m in metrics(tmp_path / "second")] == [1]


def test_overwrite_replaces_the_run_and_only_the_run(tiny_base_dir, stage_files, tmp_path, caplog):
    run = tmp_path / "run"
    train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "2", "--save_steps", "1", save=str(run))))
    (run / "notes.txt").write_text("my notes")
    (run / "plots").mkdir()
    (run / "plots" / "mine.png").write_bytes(b"png")
    with caplog.at_level(logging.WARNING, logger="clara.recipes.train"):
        again = train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "1", "--overwrite", save=str(run))))
    assert len(again.losses) == 1 and "--overwrite: removing the previous run's" in caplog.text
    assert (run / "notes.txt").read_text() == "my notes" and (run / "plots" / "mine.png").read_bytes() == b"png"
    assert [m["step"] for m in metrics(run)] == [1]  # the old run's rows are gone, not mixed in
    assert not list((run / "checkpoints").glob("step_*"))  # the new run saves none (--save_steps -1)


def test_resume_checks_the_run_folder_identity_too(tiny_base_dir, stage_files, tmp_path):
    """Checkpoints kept elsewhere (--ckpt_path) still resume only into their own run's folder."""
    ckpt = str(tmp_path / "ckpt")
    train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "1", "--save_steps", "1", "--ckpt_path", ckpt,
                           save=str(tmp_path / "a"))))
    train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "1", "--max_samples", "4",
                           save=str(tmp_path / "b"))))
    with pytest.raises(CheckpointError, match=r"b/run.json: belongs to another run \(dataset fingerprint"):
        train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "2", "--load_checkpoint", "--ckpt_path", ckpt,
                               save=str(tmp_path / "b"))))


# ---------------------------------------------------------------------------------------------
# Step checkpoints: every file checked, the previous step used when the newest is damaged
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_run(tiny_base_dir, stage_files, tmp_path_factory):
    """4 steps without a stop: the losses every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    return train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "4", "--mse_loss",
                                  save=str(out / "run")))).losses


STEP_FILES = ["model/clara.json", "model/adapters.safetensors", "model/embeddings.safetensors",
              "optimizer.safetensors", "train_state.json", "rng_rank0.safetensors", MANIFEST_FILE]


@pytest.mark.parametrize("damaged", STEP_FILES)
def test_a_flipped_byte_in_any_step_file_falls_back_to_the_previous_step(damaged, straight_run, tiny_base_dir,
                                                                        stage_files, tmp_path, caplog):
    run = tmp_path / "run"
    first = train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "3", "--save_steps", "1", "--mse_loss",
                                   save=str(run))))
    assert first.losses == pytest.approx(straight_run[:3], abs=1e-6)
    newest = run / "checkpoints" / "step_3"
    assert sorted(str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file()) == sorted(STEP_FILES)
    path = newest / damaged
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=damaged.split("/")[-1] if damaged != MANIFEST_FILE else "manifest|sha256"):
        verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="clara.recipes.train"):
        resumed = train(parse_args(flags(tiny_base_dir, stage_files, "--max_steps", "4", "--save_steps", "1",
                                         "--mse_loss", "--load_checkpoint", save=str(run))))
    assert "step_3 cannot be resumed" in caplog.text and "trying the previous step checkpoint" in caplog.text
    assert [s.step for s in resumed.steps] == [3, 4]
    assert resumed.losses == pytest.approx(straight_run[2:], abs=1e-6)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]  # the lost step 3 logged once, by the resumed run


def test_a_truncated_file_and_no_complete_step_are_reported(tmp_path):
    for step in (1, 2):
        folder = tmp_path / f"step_{step}"
        folder.mkdir()
        (folder / "optimizer.safetensors").write_bytes(b"0123456789")
        from clara.recipes.train_state import write_manifest

        write_manifest(folder)
    (tmp_path / "step_2" / "optimizer.safetensors").write_bytes(b"01234")
    warnings = []
    assert find_resumable_checkpoint(tmp_path, warnings.append) == tmp_path / "step_1"
    assert "step_2 cannot be resumed" in warnings[0] and "5 bytes, manifest.json records 10 (truncated?)" in warnings[0]
    (tmp_path / "step_1" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"no step checkpoint is complete .*step_1/manifest.json: missing"):
        find_resumable_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------
# Stopping: Ctrl-C, --eval_dataset, epochs
# ---------------------------------------------------------------------------------------------
def test_ctrl_c_finishes_the_step_and_the_resumed_losses_match_a_straight_run(tiny_base_dir, stage_files, tmp_path):
    run = tmp_path / "run"
    args = flags(tiny_base_dir, stage_files, "--max_epochs", "100000", save=str(run))  # never ends by itself
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "clara.recipes.train_sft", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Ctrl-C: finishing this step" in err and "Traceback" not in err
    saved = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and saved[0] >= 3
    stopped_at = saved[0]
    assert [m["step"] for m in metrics(run)] == list(range(1, stopped_at + 1))
    resumed = train(parse_args(args + ["--load_checkpoint", "--max_steps", str(stopped_at + 2)]))
    straight = train(parse_args(flags(tiny_base_dir, stage_files, "--max_epochs", "100000", "--max_steps",
                                      str(stopped_at + 2), save=str(tmp_path / "straight"))))
    assert [s.step for s in resumed.steps] == [stopped_at + 1, stopped_at + 2]
    assert resumed.losses == pytest.approx(straight.losses[stopped_at:], abs=1e-6)


def test_resume_with_eval_rows_in_the_metrics(tiny_base_dir, stage_files, tmp_path):
    run = tmp_path / "run"
    common = ["--eval_dataset", str(stage_files["stage1_2"]), "--eval_steps", "1", "--save_steps", "1",
              "--max_samples", "4"]
    train(parse_args(flags(tiny_base_dir, stage_files, *common, "--max_steps", "2", save=str(run))))
    resumed = train(parse_args(flags(tiny_base_dir, stage_files, *common, "--max_steps", "3", "--load_checkpoint",
                                     save=str(run))))
    assert [s.step for s in resumed.steps] == [3]
    rows = metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2, 3]
    # the compressor's diagnostic: own documents against a neighbour row's
    evals = [r for r in rows if "eval_loss" in r]
    assert all(r["eval_own_vs_shuffled"] == pytest.approx(r["eval_nll_shuffled"] - r["eval_nll_own"]) for r in evals)


def test_the_last_step_of_an_epoch_is_logged_with_its_own_epoch(tiny_base_dir, stage_files, tmp_path):
    run = tmp_path / "run"
    result = train(parse_args(flags(tiny_base_dir, stage_files, "--max_epochs", "2", "--max_samples", "4",
                                    save=str(run))))
    assert len(result.steps) == 4  # 4 rows, 2 per step: 2 steps per epoch
    assert [(m["step"], m["epoch"]) for m in metrics(run)] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert metrics(run)[0]["lr"] == 5e-3  # no warmup with the constant schedule: the first step learns
