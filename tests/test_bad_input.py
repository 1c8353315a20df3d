"""Bad input across every command: one clear line, a non-zero exit, no traceback, nothing changed.

Each case runs a console script's `main` in-process from a workspace folder that holds a tiny base
model, stage files, a finished training run and a few broken files. The case passes when

  * the command returns non-zero (2 for bad input; `clara-data validate` reports problems with 1),
  * its last line of output is its one error line, `PROG: error: ...` (validate prints its
    problem lines as `FILE:LINE: FIELD: ...`), naming the file, line or flag the case expects,
  * no traceback was printed, and
  * every file under the workspace is byte for byte as before (no run folder touched, no output
    half written, no default folder such as ./ckpt created).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from clara.command import debug_requested


@dataclass(frozen=True)
class Case:
    name: str
    command: str  # which console script
    argv: Callable[[dict], list[str]]  # workspace paths -> arguments
    names: Callable[[dict], str]  # workspace paths -> what the error line must contain
    exit_code: int = 2


def _main(command: str):
    if command == "clara-train":
        from clara.recipes.train_sft import main
    elif command == "clara-generate":
        from clara.generate_cli import main
    elif command == "clara-eval":
        from clara.recipes.evaluate import main
    elif command == "clara-data":
        from clara.data.cli import main
    elif command == "clara-import":
        from clara.official import main
    elif command == "clara-plan":
        from clara.recipes.planner import main
    else:
        raise AssertionError(command)
    return main


def train(w: dict, *extra: str, dataset: str = "stage1_2", stage: str = "stage1_2", save: str = "new_run") -> list[str]:
    """clara-train flags of a tiny stage1_2 run into a fresh folder, and then `extra`."""
    flags = {"--pretrain": str(w["base"]), "--dataset": str(w[dataset]), "--stage": stage, "--compress_rate": "16",
             "--doc_max_length": "32", "--max_len": "256", "--generation_top_k": "2", "--lora_rank": "4",
             "--train_batch_size": "2", "--micro_train_batch_size": "2", "--max_steps": "2", "--save_steps": "1",
             "--lora_dropout": "0", "--save_path": str(w["root"] / save)}
    extra = list(extra)
    while extra and extra[0] in flags and len(extra) > 1 and not extra[1].startswith("--"):
        flag = extra.pop(0)
        flags[flag] = extra.pop(0)
    return [item for pair in flags.items() for item in pair] + extra


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


CASES = [
    # ---- clara-train: the data, read before any model loads
    Case("train: missing dataset file", "clara-train", lambda w: with_flag(train(w), "--dataset", str(w["root"] / "nope.jsonl")),
         lambda w: f"{w['root'] / 'nope.jsonl'}"),
    Case("train: a folder as dataset", "clara-train", lambda w: with_flag(train(w), "--dataset", str(w["data_dir"])),
         lambda w: f"{w['data_dir']}"),
    Case("train: invalid JSON line", "clara-train", lambda w: train(w, dataset="bad_json"), lambda w: f"{w['bad_json']}:2"),
    Case("train: row without answer", "clara-train", lambda w: train(w, dataset="no_answer"),
         lambda w: f"{w['no_answer']}:1: answer"),
    Case("train: UTF-16 dataset", "clara-train", lambda w: train(w, dataset="utf16"), lambda w: f"{w['utf16']}: <file>: the file is UTF-16"),
    Case("train: empty dataset", "clara-train", lambda w: train(w, dataset="empty"), lambda w: f"{w['empty']}: <file>: no rows"),
    Case("train: --generation_top_k against the rows", "clara-train", lambda w: train(w, "--generation_top_k", "3"),
         lambda w: f"{w['stage1_2']}:1: docs"),
    Case("train: stage1 rows for stage2", "clara-train", lambda w: train(w, dataset="stage1", stage="stage2"),
         lambda w: f"{w['stage1']}:1: question"),
    Case("train: bad --eval_dataset", "clara-train", lambda w: train(w, "--eval_dataset", str(w["bad_json"])),
         lambda w: f"{w['bad_json']}:2"),
    # ---- clara-train: flags
    Case("train: unknown flag", "clara-train", lambda w: train(w, "--bogus"), lambda w: "--bogus"),
    Case("train: unknown stage", "clara-train", lambda w: train(w, "--stage", "stage3"), lambda w: "--stage"),
    Case("train: batch not a multiple", "clara-train", lambda w: train(w, "--train_batch_size", "3"),
         lambda w: "--train_batch_size 3"),
    Case("train: --dataset_probs count", "clara-train", lambda w: train(w, "--dataset_probs", "0.5,0.5"),
         lambda w: "--dataset_probs"),
    Case("train: doc length not a multiple", "clara-train", lambda w: train(w, "--doc_max_length", "40"),
         lambda w: "--doc_max_length 40"),
    Case("train: --device cuda without CUDA", "clara-train", lambda w: train(w, "--device", "cuda"),
         lambda w: "--device cuda"),
    # ---- clara-train: the model to start from
    Case("train: missing --pretrain folder", "clara-train", lambda w: with_flag(train(w), "--pretrain", str(w["root"] / "no_model")),
         lambda w: f"{w['root'] / 'no_model'}"),
    Case("train: unknown model alias", "clara-train", lambda w: with_flag(train(w), "--pretrain", "smollm3-135m"),
         lambda w: "smollm3-135m: no such file or folder"),
    Case("train: --max_len too small for the prompt", "clara-train", lambda w: train(w, "--max_len", "8"),
         lambda w: f"{w['stage1_2']}: row"),
    Case("train: corrupted clara.json as --pretrain", "clara-train",
         lambda w: with_flag(train(w), "--pretrain", str(w["bad_config_ckpt"])), lambda w: f"{w['bad_config_ckpt'] / 'clara.json'}"),
    Case("train: flipped adapter byte in --pretrain_checkpoint", "clara-train",
         lambda w: train(w, "--pretrain_checkpoint", str(w["flipped_ckpt"]), dataset="stage2", stage="stage2"),
         lambda w: f"{w['flipped_ckpt'] / 'adapters.safetensors'}: corrupted"),
    Case("train: --pretrain_checkpoint without clara.json", "clara-train",
         lambda w: train(w, "--pretrain_checkpoint", str(w["data_dir"])), lambda w: "--pretrain_checkpoint"),
    Case("train: --compress_rate against the checkpoint's", "clara-train",
         lambda w: train(w, "--pretrain_checkpoint", str(w["done"]), "--compress_rate", "8", dataset="stage2", stage="stage2"),
         lambda w: "--compress_rate 8 (the checkpoint has 16)"),
    # ---- clara-train: run folders
    Case("train: into a finished run's folder", "clara-train", lambda w: train(w, save="done"),
         lambda w: f"--save_path {w['done']}: holds a run already"),
    Case("train: the default ./ckpt of an earlier run", "clara-train",
         lambda w: [a for pair in zip(train(w)[::2], train(w)[1::2]) if pair[0] != "--save_path" for a in pair],
         lambda w: "--save_path ckpt: holds a run already"),
    Case("train: resume with another dataset", "clara-train",
         lambda w: train(w, "--load_checkpoint", "--max_samples", "3", save="done"), lambda w: "dataset fingerprint"),
    Case("train: resume as another stage", "clara-train",
         lambda w: train(w, "--load_checkpoint", dataset="stage2", stage="stage2", save="done"),
         lambda w: "stage 'stage1_2' there, 'stage2' here"),
    Case("train: resume at another compress rate", "clara-train",
         lambda w: train(w, "--load_checkpoint", "--compress_rate", "8", save="done"),
         lambda w: "--compress_rate 16 there, 8 here"),
    Case("train: --load_checkpoint on a run that saved no step checkpoint", "clara-train",
         lambda w: train(w, "--load_checkpoint", "--save_steps", "-1", save="unsaved"),
         lambda w: f"{w['root'] / 'unsaved' / 'checkpoints'} has no step checkpoint to resume"),
    Case("train: --save_path is a file", "clara-train", lambda w: with_flag(train(w), "--save_path", str(w["stage1"])),
         lambda w: f"--save_path {w['stage1']}: exists and is not a folder"),
    # ---- clara-generate
    Case("generate: empty prompt", "clara-generate", lambda w: ["--model", str(w["base"]), "--prompt", ""], lambda w: "--prompt"),
    Case("generate: negative temperature", "clara-generate",
         lambda w: ["--model", str(w["base"]), "--prompt", "hi", "--temperature", "-1"], lambda w: "--temperature"),
    Case("generate: top_p 0", "clara-generate", lambda w: ["--model", str(w["base"]), "--prompt", "hi", "--top_p", "0"],
         lambda w: "--top_p"),
    Case("generate: no new tokens", "clara-generate",
         lambda w: ["--model", str(w["base"]), "--prompt", "hi", "--max_new_tokens", "0"], lambda w: "--max_new_tokens"),
    Case("generate: missing model folder", "clara-generate", lambda w: ["--model", str(w["root"] / "no_model"), "--prompt", "hi"],
         lambda w: f"{w['root'] / 'no_model'}"),
    Case("generate: broken config.json", "clara-generate", lambda w: ["--model", str(w["bad_base"]), "--prompt", "hi"],
         lambda w: f"{w['bad_base'] / 'config.json'}"),
    Case("generate: index pointing outside the folder", "clara-generate",
         lambda w: ["--model", str(w["escaping_base"]), "--prompt", "hi"],
         lambda w: f"{w['escaping_base'] / 'model.safetensors.index.json'}: shard name '../outside.safetensors'"),
    Case("generate: --device cuda without CUDA", "clara-generate",
         lambda w: ["--model", str(w["base"]), "--prompt", "hi", "--device", "cuda"], lambda w: "--device cuda"),
    # ---- clara-eval
    Case("eval: missing data file", "clara-eval",
         lambda w: ["--model", str(w["done"]), "--data", str(w["root"] / "nope.jsonl"), "--stage", "stage1_2"],
         lambda w: f"{w['root'] / 'nope.jsonl'}"),
    Case("eval: invalid JSON line", "clara-eval", lambda w: ["--model", str(w["done"]), "--data", str(w["bad_json"]), "--stage", "stage1_2"],
         lambda w: f"{w['bad_json']}:2"),
    Case("eval: corrupted checkpoint", "clara-eval",
         lambda w: ["--model", str(w["bad_config_ckpt"]), "--data", str(w["stage1_2"]), "--stage", "stage1_2"],
         lambda w: f"{w['bad_config_ckpt'] / 'clara.json'}"),
    Case("eval: missing model", "clara-eval",
         lambda w: ["--model", str(w["root"] / "no_model"), "--data", str(w["stage1_2"]), "--stage", "stage1_2"],
         lambda w: f"{w['root'] / 'no_model'}"),
    Case("eval: zero batch size", "clara-eval",
         lambda w: ["--model", str(w["done"]), "--data", str(w["stage1_2"]), "--stage", "stage1_2", "--batch_size", "0"],
         lambda w: "--batch_size"),
    Case("eval: unknown stage", "clara-eval",
         lambda w: ["--model", str(w["done"]), "--data", str(w["stage1_2"]), "--stage", "stage9"], lambda w: "--stage"),
    # ---- clara-data
    Case("validate: UTF-16 file", "clara-data", lambda w: ["validate", str(w["utf16"]), "--stage", "stage1_2"],
         lambda w: f"{w['utf16']}: <file>: the file is UTF-16", exit_code=1),
    Case("validate: missing file", "clara-data", lambda w: ["validate", str(w["root"] / "nope.jsonl"), "--stage", "stage1_2"],
         lambda w: f"{w['root'] / 'nope.jsonl'}: <file>: cannot read", exit_code=1),
    Case("medquad: missing input", "clara-data",
         lambda w: ["medquad", "--input", str(w["root"] / "nope.jsonl"), "--out_dir", str(w["root"] / "mq")],
         lambda w: f"{w['root'] / 'nope.jsonl'}"),
    Case("medquad: UTF-16 input", "clara-data",
         lambda w: ["medquad", "--input", str(w["medquad_utf16"]), "--out_dir", str(w["root"] / "mq")],
         lambda w: f"{w['medquad_utf16']}: the file is UTF-16, not UTF-8"),
    Case("medquad: invalid JSON line", "clara-data",
         lambda w: ["medquad", "--input", str(w["medquad_bad"]), "--out_dir", str(w["root"] / "mq")],
         lambda w: f"{w['medquad_bad']}:2"),
    Case("pubmedqa: invalid JSON", "clara-data",
         lambda w: ["pubmedqa", "--input", str(w["pubmedqa_bad"]), "--out_dir", str(w["root"] / "pq")],
         lambda w: f"{w['pubmedqa_bad']}:2"),
    Case("pdfs: missing folder", "clara-data",
         lambda w: ["pdfs", str(w["root"] / "no_pdfs"), "--out", str(w["root"] / "pd"), "--no_qa", "--tokenizer", "whitespace"],
         lambda w: f"{w['root'] / 'no_pdfs'}"),
    Case("pdfs: --generator local with an unknown model", "clara-data",
         lambda w: ["pdfs", str(w["data_dir"]), "--out", str(w["root"] / "pd"), "--generator", "local",
                    "--llm_model", "no-such-model"], lambda w: "no-such-model"),
    Case("bm25: rows without pos_index", "clara-data",
         lambda w: ["bm25", str(w["stage1_2"]), "--stage", "stage2", "--out", str(w["root"] / "bm25")],
         lambda w: f"{w['stage1_2']}"),
    Case("clara-data: unknown subcommand", "clara-data", lambda w: ["convert", "x"], lambda w: "'convert'"),
    # ---- clara-import, clara-plan
    Case("import: missing source", "clara-import", lambda w: [str(w["root"] / "nope"), str(w["root"] / "dst")],
         lambda w: f"{w['root'] / 'nope'}"),
    Case("import: broken official config.json", "clara-import", lambda w: [str(w["bad_official"]), str(w["root"] / "dst")],
         lambda w: f"{w['bad_official'] / 'config.json'}"),
    Case("plan: missing model", "clara-plan", lambda w: ["--model", str(w["root"] / "no_model")],
         lambda w: f"{w['root'] / 'no_model'}"),
]


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)
    assert {case.command for case in CASES} == {"clara-train", "clara-generate", "clara-eval", "clara-data",
                                                "clara-import", "clara-plan"}


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base_dir, stage_files):
    root = tmp_path_factory.mktemp("workspace")
    data_dir = root / "data"
    shutil.copytree(stage_files["stage1"].parent, data_dir)
    w = {"root": root, "data_dir": data_dir, "base": root / "base",
         **{stage: data_dir / path.name for stage, path in stage_files.items()}}
    shutil.copytree(tiny_base_dir, w["base"])
    w["bad_json"] = root / "bad.jsonl"
    w["bad_json"].write_text(w["stage1_2"].read_text().splitlines()[0] + "\n{not json\n")
    w["no_answer"] = root / "no_answer.jsonl"
    w["no_answer"].write_text(json.dumps({"question": "q", "docs": ["a", "b"]}) + "\n")
    w["utf16"] = root / "utf16.jsonl"
    w["utf16"].write_text(w["stage1_2"].read_text(), encoding="utf-16")
    w["empty"] = root / "empty.jsonl"
    w["empty"].write_text("")
    # A finished run: the folder later cases must leave alone (and the checkpoint they start from).
    from clara.recipes.train_sft import main as train_main

    w["done"] = root / "done"
    assert train_main(train(w, save="done")) == 0
    # ./ckpt of an earlier run started from this folder with the default --save_path
    shutil.copytree(w["done"], root / "ckpt")
    # a run stopped before its first step checkpoint: outputs, no checkpoints/
    (root / "unsaved").mkdir()
    for name in ("run.json", "metrics.jsonl"):
        shutil.copy(w["done"] / name, root / "unsaved" / name)
    w["bad_config_ckpt"] = root / "bad_config_ckpt"
    shutil.copytree(w["done"] / "final", w["bad_config_ckpt"])
    (w["bad_config_ckpt"] / "clara.json").write_text("{ not json")
    w["flipped_ckpt"] = root / "flipped_ckpt"
    shutil.copytree(w["done"] / "final", w["flipped_ckpt"])
    _flip_last_byte(w["flipped_ckpt"] / "adapters.safetensors")
    w["bad_base"] = root / "bad_base"
    shutil.copytree(w["base"], w["bad_base"])
    (w["bad_base"] / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
    w["escaping_base"] = root / "escaping_base"
    shutil.copytree(w["base"], w["escaping_base"])
    (w["escaping_base"] / "model.safetensors").rename(w["escaping_base"] / "model-00001.safetensors")
    (w["escaping_base"] / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../outside.safetensors"}}))
    w["medquad_utf16"] = root / "medquad16.jsonl"
    w["medquad_utf16"].write_text(json.dumps({"question": "q?", "answer": "a."}) + "\n", encoding="utf-16")
    w["medquad_bad"] = root / "medquad_bad.jsonl"
    w["medquad_bad"].write_text(json.dumps({"question": "q?", "answer": "a."}) + "\n{oops\n")
    w["pubmedqa_bad"] = root / "pubmedqa_bad.json"
    w["pubmedqa_bad"].write_text('{"1": {"QUESTION": "q?",\n oops}}')
    w["bad_official"] = root / "official"
    w["bad_official"].mkdir()
    (w["bad_official"] / "config.json").write_text("{")
    return w


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(case, workspace, capsys, monkeypatch):
    if "--device cuda" in case.names(workspace) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(workspace["root"])  # defaults such as ./ckpt and predictions.jsonl land here
    monkeypatch.delenv("CLARA_DEBUG", raising=False)
    argv = case.argv(workspace)
    assert not debug_requested(argv)
    before = _snapshot(workspace["root"])
    capsys.readouterr()
    try:
        code = _main(case.command)(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    out, err = capsys.readouterr()
    assert code == case.exit_code, (out, err)
    assert "Traceback" not in out + err
    printed = (out if case.exit_code == 1 else err).strip().splitlines()
    assert printed, "nothing printed"
    if case.exit_code == 1:  # validate: its problem lines, then a summary line per file
        line = printed[0]
    else:
        line = printed[-1]
        prog = case.command if case.command != "clara-data" or argv[0] not in (
            "validate", "medquad", "pubmedqa", "pdfs", "kb", "bm25") else f"clara-data {argv[0]}"
        assert line.startswith(f"{prog}: error: "), line
        assert sum(text.startswith(f"{prog}: error:") for text in printed) == 1
    assert case.names(workspace) in line, line
    assert _snapshot(workspace["root"]) == before, f"{case.name} changed the workspace"


@pytest.mark.parametrize("command, argv", [
    ("clara-train", ["--pretrain", "m", "--dataset", "d", "--bogus"]),
    ("clara-generate", ["--prompt", "hi", "--bogus"]),
    ("clara-eval", ["--model", "m", "--data", "d", "--stage", "stage1_2", "--bogus"]),
    ("clara-data", ["validate", "f", "--stage", "stage1_2", "--bogus"]),
    ("clara-import", ["a", "b", "--bogus"]),
    ("clara-plan", ["--model", "m", "--bogus"]),
])
def test_a_usage_error_is_one_line_not_the_whole_usage(command, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        _main(command)(argv)
    err = capsys.readouterr().err
    prog = "clara-data validate" if command == "clara-data" else command
    assert stop.value.code == 2
    assert err == f"{prog}: error: unrecognized arguments: --bogus (see {prog} --help)\n"


def test_debug_shows_the_traceback(workspace, capsys, monkeypatch):
    from clara.generate_cli import main

    monkeypatch.chdir(workspace["root"])
    missing = str(workspace["root"] / "no_model")
    from clara.weights import WeightsError

    with pytest.raises(WeightsError, match="no such file or folder"):
        main(["--model", missing, "--prompt", "hi", "--debug"])
    monkeypatch.setenv("CLARA_DEBUG", "1")
    with pytest.raises(WeightsError, match="no such file or folder"):
        main(["--model", missing, "--prompt", "hi"])


def test_help_texts_say_what_the_code_does(capsys):
    from clara.recipes.args import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: True)" not in text and "(default: False)" not in text  # switches say what they do
    assert "checkpoints/step_N/" in text and "--overwrite" in text
    assert "--debug on an error, show the full Python traceback" in text
