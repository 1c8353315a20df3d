"""The training recipe end to end on a tiny random base: every stage learns, resume is exact,
accumulation matches one big batch, and two processes match one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from clara.checkpoint import CheckpointError
from clara.recipes import train_sft
from clara.recipes.args import parse_args
from clara.recipes.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tiny_base_dir, stage_files):
    return tiny_base_dir, stage_files


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


def test_the_schedule_follows_max_steps(setup, tmp_path):
    from clara.recipes.schedule import lr_at

    base, data = setup
    flags = argv(base, data, "stage1_2", tmp_path, "--train_batch_size", "2", "--micro_train_batch_size", "2",
                 "--max_epochs", "3", "--max_steps", "4", "--learning_rate", "1e-3", "--lr_warmup_ratio", "0.25")
    flags[flags.index("--lr_scheduler") + 1] = "cosine_with_min_lr"
    train(parse_args(flags))
    logged = [m["lr"] for m in metrics(tmp_path / "run")]
    # 4 steps of an 18-step run: warmup (1 step) and cosine decay are laid over the 4 steps
    assert logged == pytest.approx([lr_at(i, 4, 1e-3, warmup_ratio=0.25) for i in range(4)], rel=1e-12)
    assert logged[-1] < logged[1]


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
    assert steps == ["step_5", "step_6"]  # 6 steps; the last one is a step checkpoint too, so the run can go on


def test_a_run_keeps_its_checkpoints_and_refuses_another_runs(setup, tmp_path):
    base, data = setup
    common = ["--train_batch_size", "2", "--micro_train_batch_size", "2", "--max_epochs", "1", "--save_steps", "1",
              "--max_steps", "2"]
    run = tmp_path / "shared"
    first = [a for a in argv(base, data, "stage1_2", tmp_path, *common) if a not in ("--ckpt_path", str(tmp_path / "ckpt"))]
    first[first.index("--save_path") + 1] = str(run)
    train(parse_args(first))
    # inside the run folder
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_1", "step_2"]

    def resume(*changes: str) -> list[str]:
        flags = [*first, "--load_checkpoint"]
        for flag, value in zip(changes[::2], changes[1::2]):
            if flag in flags:
                flags[flags.index(flag) + 1] = value
            else:
                flags += [flag, value]
        return flags

    with pytest.raises(CheckpointError, match=r"belongs to another run \(--compress_rate 16 there, 8 here\)"):
        train(parse_args(resume("--compress_rate", "8")))
    with pytest.raises(CheckpointError, match=r"belongs to another run \(dataset fingerprint"):
        train(parse_args(resume("--max_samples", "3")))
    with pytest.raises(CheckpointError, match=r"belongs to another run \(stage 'stage1_2' there, 'stage2' here"):
        train(parse_args(resume("--stage", "stage2", "--dataset", str(data["stage2"]))))
    assert len(train(parse_args(resume("--max_steps", "3"))).losses) == 1  # its own run resumes: step 3


def test_the_cli_refuses_another_runs_checkpoint_in_one_line(setup, tmp_path, capsys):
    base, data = setup
    flags = argv(base, data, "stage1_2", tmp_path, "--train_batch_size", "2", "--micro_train_batch_size", "2",
                 "--max_epochs", "1", "--save_steps", "1", "--max_steps", "1")
    assert train_sft.main(flags) == 0
    capsys.readouterr()
    flags[flags.index("--lora_rank") + 1] = "8"
    assert train_sft.main([*flags, "--load_checkpoint"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clara-train: error: ") and "--lora_rank 4 there, 8 here" in err[0]


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
           "-m", "clara.recipes.train_sft", *argv(base, data, "stage1_2", tmp_path / "two", *common)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = [m["loss"] for m in metrics(tmp_path / "two" / "run") if "loss" in m]
    assert len(two) == len(single) == 3
    assert max(abs(a - b) for a, b in zip(single, two)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Stages chain through checkpoints; small data; evaluation; interruption
# ---------------------------------------------------------------------------------------------
def test_stages_chain_through_checkpoints(setup, tmp_path):
    """stage1 -> stage1_2 with --pretrain <run dir> -> stage2 with --pretrain_checkpoint, as the
    official release: stage1_2 keeps the encoder and starts a fresh decoder adapter, stage2 starts
    the query reasoner from the encoder."""
    from clara.lora import adapter_state_dict
    from clara.model import Clara

    base, data = setup
    few = ["--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_epochs", "1", "--max_steps", "2",
           "--learning_rate", "1e-2"]
    train(parse_args(argv(base, data, "stage1", tmp_path / "s1", *few)))
    stage1 = Clara.from_pretrained(tmp_path / "s1" / "run" / "final")
    s12 = train(parse_args(argv(base, data, "stage1_2", tmp_path / "s12", *few)[:1] + [str(tmp_path / "s1" / "run")]
                           + argv(base, data, "stage1_2", tmp_path / "s12", *few)[2:]))
    assert len(s12.losses) == 2
    args = argv(base, data, "stage2", tmp_path / "s2", *few, "--pretrain_checkpoint", str(tmp_path / "s12" / "run"))
    s2 = train(parse_args(args))
    assert len(s2.losses) == 2
    stage2 = Clara.from_pretrained(tmp_path / "s2" / "run" / "final")
    assert stage2.config.training_stage == "stage2"
    assert sorted(stage2.adapter_names) == ["decoder_adapter", "encoder_adapter", "query_reasoner_adapter"]
    # The compressor is frozen after stage 1_2, so stage 2 carries the stage-1_2 encoder unchanged.
    stage12 = Clara.from_pretrained(tmp_path / "s12" / "run" / "final")
    for key, value in adapter_state_dict(stage12.decoder, "encoder_adapter").items():
        assert torch.equal(value, adapter_state_dict(stage2.decoder, "encoder_adapter")[key])
    # stage1_2 trained its encoder further, starting from stage 1's.
    assert any(not torch.equal(v, adapter_state_dict(stage12.decoder, "encoder_adapter")[k])
               for k, v in adapter_state_dict(stage1.decoder, "encoder_adapter").items())


def test_dataset_smaller_than_one_batch_trains(setup, tmp_path):
    base, data = setup
    result = train(parse_args(argv(base, data, "stage1_2", tmp_path, "--train_batch_size", "16",
                                   "--micro_train_batch_size", "4", "--max_epochs", "2", "--max_samples", "5")))
    assert len(result.losses) == 2  # one step per epoch, of the 5 examples there are
    assert [m["input_tokens"] > 0 for m in metrics(tmp_path / "run")] == [True, True]


def test_eval_dataset_and_sample_generations(setup, tmp_path, capsys):
    base, data = setup
    train(parse_args(argv(base, data, "stage1_2", tmp_path, "--train_batch_size", "2", "--micro_train_batch_size", "2",
                          "--max_epochs", "1", "--max_steps", "2", "--eval_dataset", str(data["stage1_2"]),
                          "--max_samples", "4", "--eval_steps", "1", "--do_eval_gen")))
    rows = [m for m in metrics(tmp_path / "run") if "eval_loss" in m]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["eval_loss"]) and 0.0 <= r["eval_gen_f1"] <= 1.0 for r in rows)
    assert "[eval gen] question:" in capsys.readouterr().out


def test_hub_dataset_name_reads_through_datasets(setup, tmp_path, monkeypatch):
    """A --dataset that names a hub dataset goes through `datasets.load_dataset` (stubbed here:
    no network); its rows are validated like a file's."""
    from clara.data.formats import ValidationError
    from clara.recipes.dataset import load_examples

    rows = [json.loads(line) for line in data_lines(setup[1]["stage1_2"])]
    calls = []
    fake = types.SimpleNamespace(load_dataset=lambda name, split: calls.append((name, split)) or rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    examples = load_examples("someone/nutrition-stage1_2", "stage1_2", max_samples=3)
    assert calls == [("someone/nutrition-stage1_2", "train")] and len(examples) == 3
    assert examples[0].question == rows[0]["question"]
    fake.load_dataset = lambda name, split: [{"question": 7, "docs": ["d"], "answer": "a"}]
    with pytest.raises(ValidationError, match=r"someone/bad\[train\]:1: question"):
        load_examples("someone/bad", "stage1_2")


def data_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]
