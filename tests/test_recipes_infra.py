"""Model-independent parts of the training recipes: flags, lr schedule, checkpoint state, loss PNG."""

import dataclasses
import json
import math
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from clara.recipes.args import IGNORED, LR_SCHEDULERS, build_parser, parse_args
from clara.recipes.plot import write_bar_chart_png, write_line_chart_png, write_loss_curve_png
from clara.recipes.schedule import lr_at, lr_factor
from clara.recipes.train_config import TrainConfig
from clara.recipes.train_state import (
    CheckpointError,
    capture_rng,
    checkpoint_temp_dir,
    find_latest_checkpoint,
    load_rng,
    load_train_state,
    prune_checkpoints,
    restore_rng,
    save_rng,
    save_train_state,
    step_dir_name,
    write_checkpoint_atomically,
)

# The seed's stage1 command line from issue 5 (save path filled in).
SEED_CMD = ("--pretrain microsoft/phi-2 --dataset nutrition_train.jsonl --train_batch_size 16 "
            "--micro_train_batch_size 2 --max_len 2048 --max_epochs 3 --learning_rate 1e-4 --save_path ckpt/run "
            "--save_steps 500 --logging_steps 10 --stage stage1 --compress_rate 32 --doc_max_length 256 "
            "--mse_loss --qa_loss --zero_stage 2 --bf16 --flash_attn").split()


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------
def test_seed_command_line_parses_to_the_given_values():
    a = parse_args(SEED_CMD)
    assert (a.pretrain, a.dataset, a.save_path, a.stage) == ("microsoft/phi-2", "nutrition_train.jsonl", "ckpt/run", "stage1")
    assert (a.train_batch_size, a.micro_train_batch_size, a.max_len, a.max_epochs) == (16, 2, 2048, 3)
    assert a.learning_rate == 1e-4 and (a.save_steps, a.logging_steps) == (500, 10)
    assert (a.compress_rate, a.doc_max_length, a.zero_stage) == (32, 256, 2)
    assert a.mse_loss and a.qa_loss and a.bf16 and a.flash_attn
    assert not a.gradient_checkpointing and not a.load_checkpoint and not a.dry_run


def test_step_checkpoints_default_into_the_run_folder():
    # The official default ./ckpt/checkpoints_sft was shared by every run started from one folder.
    from clara.recipes.loop import checkpoint_root

    a = parse_args(["--pretrain", "m", "--dataset", "d", "--save_path", "runs/one"])
    assert a.ckpt_path is None and checkpoint_root(a) == Path("runs/one/checkpoints")
    b = parse_args(["--pretrain", "m", "--dataset", "d", "--ckpt_path", "elsewhere"])
    assert checkpoint_root(b) == Path("elsewhere")


def test_defaults_are_the_official_ones():
    # Values of ml-clara openrlhf/cli/train_sft.py's parser (but --ckpt_path, see above).
    a = build_parser().parse_args(["--pretrain", "m", "--dataset", "d"])
    official = dict(pretrain_checkpoint=None, stage="stage1", generation_top_k=1, doc_max_length=256, compress_rate=32,
                    qa_loss=True, stage2_mips=False, stage2_retrieval_top_n=1, mse_loss=False, do_eval_gen=False,
                    save_path="./ckpt", save_steps=-1, load_checkpoint=False,
                    max_ckpt_num=3, max_epochs=2, learning_rate=5e-6, lr_warmup_ratio=0.03,
                    lr_scheduler="cosine_with_min_lr", l2=0.0, adam_betas=(0.9, 0.95), max_norm=1.0,
                    micro_train_batch_size=8, train_batch_size=128, local_rank=-1, zero_stage=2, bf16=False,
                    gradient_checkpointing=False, flash_attn=False, eval_dataset=None, dataset_split="train",
                    max_samples=1000000, max_len=2048, logging_steps=1, eval_steps=-1, seed=42)
    assert {k: getattr(a, k) for k in official} == official
    assert (a.dry_run, a.memory_budget_gb, a.device, a.lora_rank, a.max_steps) == (False, 15.0, "auto", 16, -1)


def test_the_loop_config_is_typed_and_maps_the_flags_one_to_one():
    config = parse_args(["--pretrain", "m", "--dataset", "d", "--lora_rank", "8", "--adam_betas", "0.8", "0.9"])
    assert isinstance(config, TrainConfig)
    assert (config.lora_rank, config.adam_betas, config.stage) == (8, (0.8, 0.9), "stage1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lora_rank = 4  # a run's configuration does not change under the loop
    parser = build_parser()
    ignored = {a.dest for a in parser._actions if a.help and IGNORED in a.help}
    # --help and --debug belong to the command line (clara.command), not to the run
    flags = {a.dest for a in parser._actions if a.dest not in ("help", "debug")} - ignored
    assert {f.name for f in dataclasses.fields(TrainConfig)} == flags
    assert json.loads(json.dumps(config.to_dict()))["lora_rank"] == 8  # checkpoints record it as JSON


def test_every_flag_has_help_and_ignored_ones_say_so(capsys):
    parser = build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
    ignored = {opt for action in parser._actions if "ignored" in action.help for opt in action.option_strings}
    assert {"--adam_offload", "--zpg", "--overlap_comm", "--local_rank", "--use_wandb"} <= ignored
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    assert "--memory_budget_gb" in capsys.readouterr().out


def test_deepspeed_only_flags_are_accepted():
    flags = SEED_CMD + ["--adam_offload", "--zpg", "8", "--overlap_comm", "--local_rank", "3", "--use_wandb", "key",
                        "--save_hf_ckpt", "--disable_ds_ckpt"]
    a = build_parser().parse_args(flags)
    assert a.zpg == 8 and a.local_rank == 3
    assert parse_args(flags) == parse_args(SEED_CMD)  # and change nothing the loop sees


@pytest.mark.parametrize("extra, names", [
    (["--train_batch_size", "10", "--micro_train_batch_size", "4"], ["--train_batch_size 10", "--micro_train_batch_size 4"]),
    (["--compress_rate", "30"], ["--doc_max_length 256", "--compress_rate 30", "240 or 270"]),
    (["--save_steps", "0"], ["--save_steps"]),
    (["--dataset_probs", "0.5,0.5"], ["--dataset_probs has 2 values", "1 source"]),
    (["--ds_tensor_parallel_size", "2"], ["--ds_tensor_parallel_size 2"]),
])
def test_bad_values_name_the_flags(extra, names, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(SEED_CMD + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err


def test_qa_loss_can_be_switched_off():
    assert parse_args(SEED_CMD + ["--no_qa_loss"]).qa_loss is False


# ------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ------------------------------------------------------------------------------------------------
def test_cosine_with_min_lr_exact_points():
    total, base = 200, 1e-4  # warmup = ceil(0.03 * 200) = 6 steps
    assert lr_at(0, total, base) == base / 6  # the first update already learns
    assert lr_at(3, total, base) == base * 4 / 6
    assert lr_at(5, total, base) == base  # the last warmup step reaches the peak
    assert lr_at(6, total, base) == base  # end of warmup: cos(0) = 1
    assert lr_at(6 + 97, total, base) == pytest.approx(base * 0.55, rel=1e-12)  # halfway: 0.1 + 0.9 / 2
    assert lr_at(total, total, base) == pytest.approx(base * 0.1, rel=1e-15)
    assert lr_at(total + 50, total, base) == lr_at(total, total, base)  # stays at the floor


def test_other_kinds_exact_points():
    assert lr_factor(0, 100, kind="constant") == 1.0
    assert [lr_factor(s, 100, kind="constant_with_warmup") for s in (0, 1, 2, 3, 50)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert lr_factor(3 + 97 // 2, 100, kind="linear") == (100 - 51) / 97
    assert lr_factor(100, 100, kind="cosine") == 0.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, 10, kind="exponential")


@pytest.mark.parametrize("kind", LR_SCHEDULERS)
def test_schedule_matches_transformers(kind):
    """transformers' schedule, except that our warmup is one step ahead: its first update is at lr 0."""
    optimization = pytest.importorskip("transformers.optimization")
    total, base = 57, 3e-4
    warmup = math.ceil(total * 0.03)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    extra = {"scheduler_specific_kwargs": {"min_lr": base * 0.1}} if kind == "cosine_with_min_lr" else {}
    ref = optimization.get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total, **extra)
    theirs = []
    for _ in range(total + 2):
        theirs.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    for step in range(total + 1):
        expected = theirs[step + 1] if step < warmup and kind != "constant" else theirs[step]
        assert lr_at(step, total, base, kind=kind) == pytest.approx(expected, rel=1e-12, abs=1e-20), step


# ------------------------------------------------------------------------------------------------
# Training state
# ------------------------------------------------------------------------------------------------
def adamw_after_steps(params, steps: int, seed: int = 0):
    opt = torch.optim.AdamW([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 5e-3,
                                                                  "weight_decay": 0.0}], betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(4, 3), (3,), (2, 5)]]


def test_optimizer_round_trip_gives_bit_identical_next_step(tmp_path):
    params = make_params()
    opt = adamw_after_steps(params, 3)
    sched = {"kind": "constant", "steps_done": 3}
    save_train_state(tmp_path, optimizer=opt, scheduler_state=sched, scaler_state={"scale": 1024.0, "_growth_tracker": 7},
                     rng=capture_rng(), data_position={"epoch": 1, "consumed": 48}, extra={"global_step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.safetensors", "rng_rank0.safetensors", "train_state.json"]

    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = torch.optim.AdamW([{"params": clones[:2], "lr": 0.5}, {"params": clones[2:], "lr": 0.5}], betas=(0.5, 0.5))
    rest = load_train_state(tmp_path, fresh)
    assert rest["scheduler"] == sched and rest["scaler"] == {"scale": 1024.0, "_growth_tracker": 7}
    assert rest["data_position"] == {"epoch": 1, "consumed": 48} and rest["extra"] == {"global_step": 3}
    assert fresh.param_groups[0]["betas"] == (0.9, 0.95) and fresh.param_groups[1]["lr"] == 5e-3

    g = torch.Generator().manual_seed(99)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for ps, o in ((params, opt), (clones, fresh)):
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        o.step()
    for a, b in zip(params, clones):
        assert torch.equal(a, b)


class WrappedOptimizer:
    """Like clara.recipes.distributed.FullStateOptimizer: state_dict/load_state_dict + class_name + .optimizer."""

    def __init__(self, optimizer):
        self.optimizer, self.class_name = optimizer, type(optimizer).__name__

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, sd):
        self.optimizer.load_state_dict(sd)


def test_wrapped_optimizer_round_trips_under_the_wrapped_class_name(tmp_path):
    params = make_params()
    save_train_state(tmp_path, optimizer=WrappedOptimizer(adamw_after_steps(params, 2)), scheduler_state={},
                     scaler_state=None, rng=capture_rng(), data_position={}, extra={})
    assert json.loads((tmp_path / "train_state.json").read_text())["optimizer"]["class"] == "AdamW"
    plain = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}])
    load_train_state(tmp_path, plain)  # a bare AdamW reads what the wrapper wrote
    assert int(plain.state[params[0]]["step"]) == 2
    with pytest.raises(CheckpointError, match="optimizer.class is 'AdamW' but the run uses SGD"):
        load_train_state(tmp_path, torch.optim.SGD(params, lr=0.1))


def test_rng_round_trip_restores_every_generator(tmp_path):
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    np.random.standard_normal()  # leave a cached Gaussian in NumPy's state
    save_rng(tmp_path, capture_rng(), rank=1)

    def draw():
        return random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()

    first = draw()
    restore_rng(load_rng(tmp_path, rank=1))
    assert draw() == first
    with pytest.raises(CheckpointError, match="rng_rank0.safetensors: file not found"):
        load_rng(tmp_path, rank=0)


def test_broken_checkpoint_files_name_the_file(tmp_path):
    params = make_params()
    opt = adamw_after_steps(params, 1)
    save_train_state(tmp_path, optimizer=opt, scheduler_state={}, scaler_state=None, rng=capture_rng(),
                     data_position={}, extra={})
    state_file, tensor_file = tmp_path / "train_state.json", tmp_path / "optimizer.safetensors"
    good_json, good_tensors = state_file.read_text(), tensor_file.read_bytes()

    state_file.write_text(good_json[: len(good_json) // 2])
    with pytest.raises(CheckpointError, match=r"train_state\.json:\d+: invalid JSON"):
        load_train_state(tmp_path, opt)
    state_file.write_text(good_json)

    tensor_file.write_bytes(good_tensors[:40])
    with pytest.raises(CheckpointError, match="optimizer.safetensors: not a readable safetensors file"):
        load_train_state(tmp_path, opt)
    tensor_file.unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors: file not found"):
        load_train_state(tmp_path, opt)
    tensor_file.write_bytes(good_tensors)

    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(CheckpointError, match="train_state.json: optimizer.param_groups hold"):
        load_train_state(tmp_path, other)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_train_state(tmp_path / "nope", opt)


def test_atomic_checkpoint_folders_latest_and_pruning(tmp_path):
    def writer(text):
        return lambda d: (d / "payload.txt").write_text(text)

    for step in (5, 10, 9):
        write_checkpoint_atomically(tmp_path, step, writer(f"step {step}"))
    assert (tmp_path / "latest").read_text() == "step_9\n"  # the marker names the last one written
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_10"  # the highest step wins

    def crash(d):
        (d / "payload.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint_atomically(tmp_path, 11, crash)
    assert checkpoint_temp_dir(tmp_path, 11).is_dir() and not (tmp_path / "step_11").exists()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_10"

    write_checkpoint_atomically(tmp_path, 10, writer("again"))  # re-saving a step replaces it
    assert (tmp_path / "step_10" / "payload.txt").read_text() == "again"
    write_checkpoint_atomically(tmp_path, 11, writer("step 11"))  # a leftover temp folder is cleared
    assert (tmp_path / "step_11" / "payload.txt").read_text() == "step 11"

    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_5", "step_9"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_10", "step_11"]
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert step_dir_name(7) == "step_7"
    with pytest.raises(ValueError, match="max_ckpt_num"):
        prune_checkpoints(tmp_path, 0)


# ------------------------------------------------------------------------------------------------
# Loss-curve PNG
# ------------------------------------------------------------------------------------------------
def read_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    return width, height, depth, color, raw, {k: b for k, b in chunks if k == b"tEXt"}


def test_loss_curve_png_is_a_matplotlib_chart(tmp_path):
    steps = list(range(1, 41))
    losses = [3.0 * math.exp(-s / 12) + 0.2 for s in steps]
    out = write_loss_curve_png(tmp_path / "loss.png", steps, losses, "stage1 loss", smooth=5)
    width, height, depth, color, raw, text = read_png(out)
    assert (width, height) == (640, 400) and depth == 8
    assert text[b"tEXt"].startswith(b"Title\x00stage1 loss")
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temp file left behind
    figure_bytes = out.read_bytes()
    write_loss_curve_png(tmp_path / "again.png", steps, [v + 1 for v in losses], "stage1 loss", smooth=5)
    assert (tmp_path / "again.png").read_bytes() != figure_bytes  # the data shapes the picture
    bars = write_bar_chart_png(tmp_path / "bars.png", {"compressed": 1.9, "no context": 2.3}, "answer NLL", "nats")
    assert read_png(bars)[:2] == (640, 400)
    grouped = write_bar_chart_png(tmp_path / "grouped.png", {}, "recall", "R@1",
                                  groups={"BM25": {"R@1": 0.9, "MRR": 0.93}, "CLaRa": {"R@1": 0.5, "MRR": 0.6}})
    assert read_png(grouped)[:2] == (640, 400)
    lines = {"own docs": ([4, 8, 16, 32], [1.9, 2.0, 2.1, 2.2]), "no docs": ([4, 8, 16, 32], [2.3] * 4)}
    chart = write_line_chart_png(tmp_path / "lines.png", lines, "NLL by compression rate", "CR", "nats", log2_x=True)
    assert read_png(chart)[:2] == (640, 400) and read_png(chart)[5][b"tEXt"].startswith(b"Title\x00NLL by")
    with pytest.raises(ValueError, match="line 'a': 2 x values and 1 y values"):
        write_line_chart_png(tmp_path / "bad.png", {"a": ([1, 2], [1.0])}, "t", "x", "y")


def test_loss_curve_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2 steps but 1 losses"):
        write_loss_curve_png(tmp_path / "a.png", [1, 2], [0.5], "t")
    with pytest.raises(ValueError, match="no finite"):
        write_loss_curve_png(tmp_path / "a.png", [1, 2], [float("nan"), float("inf")], "t")
    with pytest.raises(ValueError, match="no bar"):
        write_bar_chart_png(tmp_path / "b.png", {}, "t", "y")
    # A single point and a flat curve still give a picture.
    write_loss_curve_png(tmp_path / "one.png", [3], [1.0], "t")
    assert read_png(tmp_path / "one.png")[:2] == (640, 400)
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
