"""The training recipe end to end on a tiny random base: every stage learns, resume is exact,
accumulation matches one big batch, and two processes match one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.args import parse_args
from recipes.loop import train
from tests.tiny_base import write_stage_files, write_tiny_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = write_tiny_base(tmp_path_factory.mktemp("base"))
    data = write_stage_files(tmp_path_factory.mktemp("data"))
    return base, data


def argv(base, data, stage, out: Path, *extra: str) -> list[str]:
    file = data["stage2" if stage.startswith("stage2") else stage]
    return ["--pretrain", str(base), "--dataset", str(file), "--stage", stage, "--compress_rate", "16",
            "--doc_max_length", "32", "--max_len", "256", "--generation_top_k", "2", "--lora_dropout", "0",
            "--lora_rank", "4", "--save_path", str(out / "run"), "--ckpt_path", str(out / "ckpt"),
            "--logging_steps", "1", "--seed", "3", "--lr_scheduler", "constant", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Every stage learns
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,extra", [
    ("stage1", ["--mse_loss", "--qa_loss"]),
    ("stage1_2", []),
    ("stage2", []),
    ("stage2_pretrain_retrieval", []),
])
def test_each_stage_loss_falls_over_20_steps(setup, tmp_path, stage, extra):
    base, data = setup
    lr = "2e-3" if stage == "stage2_pretrain_retrieval" else "1e-2"
    args = parse_args(argv(base, data, stage, tmp_path, "--train_batch_size", "4", "--micro_train_batch_size", "2",
                           "--max_epochs", "7", "--max_steps", "20", "--learning_rate", lr, *extra))
    result = train(args)
    losses = result.losses
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # A drop of a tenth of a nat in 20 steps is learning, not noise: steps of a fixed model on
    # these batches vary by a few hundredths.
    assert last < first - 0.1, (stage, losses)
    assert (tmp_path / "run" / "final" / "clara.json").exists()
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m["step"] for m in metrics(tmp_path / "run")] == list(range(1, 21))


# ---------------------------------------------------------------------------------------------
# Resume and accumulation
# ---------------------------------------------------------------------------------------------
def test_resume_continues_the_loss_curve_exactly(setup, tmp_path):
    """2N steps straight vs. N steps, stop, resume for N more: the same losses (dropout on, so the
    RNG states must be restored too)."""
    base, data = setup
    common = ["--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_epochs", "2",
              "--learning_rate", "5e-3", "--save_steps", "3", "--lora_dropout", "0.1", "--mse_loss"]
    straight = train(parse_args(argv(base, data, "stage1", tmp_path / "a", *common))).losses
    first = train(parse_args(argv(base, data, "stage1", tmp_path / "b", *common, "--max_steps", "3"))).losses
    resumed = train(parse_args(argv(base, data, "stage1", tmp_path / "b", *common, "--load_checkpoint"))).losses
    assert len(straight) == 6 and len(first) == 3 and len(resumed) == 3
    assert max(abs(a - b) for a, b in zip(straight, first + resumed)) <= 1e-6
    logged = [m["loss"] for m in metrics(tmp_path / "b" / "run")]
    assert logged == pytest.approx(straight, abs=1e-6)  # metrics.jsonl holds one row per step


def test_gradient_accumulation_4x1_equals_1x4(setup, tmp_path):
    base, data = setup
    common = ["--train_batch_size", "4", "--max_epochs", "1", "--learning_rate", "1e-2", "--mse_loss", "--qa_loss"]
    four_micro = train(parse_args(argv(base, data, "stage1", tmp_path / "a", *common,
                                       "--micro_train_batch_size", "1"))).losses
    one_micro = train(parse_args(argv(base, data, "stage1", tmp_path / "b", *common,
                                      "--micro_train_batch_size", "4"))).losses
    assert len(four_micro) == 3
    assert max(abs(a - b) for a, b in zip(four_micro, one_micro)) <= 1e-5


def test_checkpoints_keep_the_newest_and_skip_half_written(setup, tmp_path):
    base, data = setup
    train(parse_args(argv(base, data, "stage1_2", tmp_path, "--train_batch_size", "2", "--micro_train_batch_size", "2",
                          "--max_epochs", "1", "--save_steps", "1", "--max_ckpt_num", "2")))
    steps = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_4", "step_5"]  # 6 steps; the last step is the final model, not a checkpoint


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_stage", ["0", "2"])
def test_two_processes_match_one(setup, tmp_path, zero_stage):
    """torchrun with 2 CPU processes (gloo; DDP, or FSDP2 for --zero_stage 2) gives the loss curve
    of one process with the same global batch."""
    base, data = setup
    common = ["--train_batch_size", "4", "--micro_train_batch_size", "1", "--max_epochs", "1",
              "--learning_rate", "1e-2", "--zero_stage", zero_stage]
    single = train(parse_args(argv(base, data, "stage1_2", tmp_path / "one", *common))).losses
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "recipes.train_sft", *argv(base, data, "stage1_2", tmp_path / "two", *common)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = [m["loss"] for m in metrics(tmp_path / "two" / "run") if "loss" in m]
    assert len(two) == len(single) == 3
    assert max(abs(a - b) for a, b in zip(single, two)) <= 1e-5
