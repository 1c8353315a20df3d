"""The per-stage recipe scripts: a TOML config of clara-train flags plus overrides, each stage
trained on the tiny random base; the shipped configs parse; `clara-data restate` rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clara.data.formats import Stage1Example, read_stage_file, write_stage_file
from clara.data.restate import main as restate_main
from clara.data.restate import with_restated_documents
from clara.recipes import stage1, stage1_2, stage2, stage2_retrieval
from clara.recipes.stage_config import CONFIG_DIR, config_flags, load_stage_config, read_config

SCRIPTS = {"stage1": stage1, "stage1_2": stage1_2, "stage2": stage2, "stage2_pretrain_retrieval": stage2_retrieval}


def toml(values: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(json.dumps(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else str(v)
    return "".join(f"{k} = {value(v)}\n" for k, v in values.items())


def tiny_config(base, data, stage: str, save: Path) -> dict:
    return {"pretrain": str(base), "dataset": str(data["stage2" if stage.startswith("stage2") else stage]),
            "compress_rate": 16, "doc_max_length": 32, "max_len": 256, "generation_top_k": 2, "lora_rank": 4,
            "train_batch_size": 2, "micro_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
            "save_path": str(save), "mse_loss": stage in ("stage1", "stage1_2"), "lora_dropout": 0.0}


@pytest.mark.parametrize("stage", list(SCRIPTS))
def test_each_stage_script_trains_from_its_config(stage, tiny_base_dir, stage_files, tmp_path):
    config = tmp_path / f"{stage}.toml"
    config.write_text(toml(tiny_config(tiny_base_dir, stage_files, stage, tmp_path / "run")))
    assert SCRIPTS[stage].main([str(config), "--max_steps", "1"]) == 0  # an override wins
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and all(r["loss"] > 0 for r in rows)
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["identity"]["stage"] == stage and recorded["flags"]["mse_loss"] == (stage in ("stage1", "stage1_2"))


def test_a_config_maps_to_the_same_flags_as_the_command_line(tmp_path):
    path = tmp_path / "c.toml"
    flags = config_flags({"pretrain": "m", "qa_loss": False, "mse_loss": True, "bf16": False,
                          "target_modules": ["q_proj", "v_proj"], "learning_rate": 2e-4}, path)
    assert flags == ["--pretrain", "m", "--no_qa_loss", "--mse_loss", "--target_modules", "q_proj", "v_proj",
                     "--learning_rate", "0.0002"]


def test_a_switch_the_config_sets_is_turned_off_by_a_no_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('pretrain = "m"\ndataset = "d"\nbf16 = true\nmse_loss = true\nfreeze_decoder_adapter = true\n')
    assert load_stage_config("stage1", [str(path)]).bf16 is True
    config = load_stage_config("stage1", [str(path), "--no_bf16", "--no_freeze_decoder_adapter"])
    assert (config.bf16, config.freeze_decoder_adapter, config.mse_loss) == (False, False, True)
    assert load_stage_config("stage1", [str(path), "--no_qa_loss"]).qa_loss is False
    with pytest.raises(ValueError, match=r"--no_learning_rate: 'learning_rate' is not a clara-train switch"):
        load_stage_config("stage1", [str(path), "--no_learning_rate"])


@pytest.mark.parametrize("content, message", [
    ('pretrain = "m"\ndataset = "d"\nstage = "stage2"\n', r"field 'stage' is 'stage2', but this script trains stage1"),
    ('pretrain = "m"\ndataset = "d"\nlearning_rat = 1e-4\n', r"field 'learning_rat' is not a clara-train flag"),
    ('pretrain = "m"\ndataset = "d"\nmse_loss = 1\n', r"field 'mse_loss' is a switch: write true or false"),
    ('pretrain = "m"\ndataset = \n', r"invalid TOML"),
])
def test_bad_configs_are_refused_naming_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_stage_config("stage1", [str(path)])
    assert stage1.main([str(path)]) == 2


def test_every_shipped_config_parses_as_its_stage():
    shipped = sorted(CONFIG_DIR.glob("*/*.toml"))
    assert {p.parent.name for p in shipped} == {"smollm2-cpu", "phi2-t4", "mistral7b-h100", "mistral7b-t4"}
    assert len(shipped) == 17
    stages = {"stage1": "stage1", "stage1_2": "stage1_2", "stage2": "stage2",
              "stage2_retrieval": "stage2_pretrain_retrieval"}
    for path in shipped:
        # A file named after its stage; another (smollm2-cpu/stage1_joint.toml) names it inside.
        stage = stages.get(path.stem) or read_config(path)["stage"]
        config = load_stage_config(stage, [str(path)])
        assert config.stage == stage
        assert config.doc_max_length % config.compress_rate == 0
    chain = [load_stage_config(s, [str(CONFIG_DIR / "smollm2-cpu" / f"{name}.toml")]) for s, name in (
        ("stage1", "stage1"), ("stage1", "stage1_joint"), ("stage1", "stage1_more"), ("stage1_2", "stage1_2"),
        ("stage2_pretrain_retrieval", "stage2_retrieval"), ("stage2", "stage2"))]
    for before, after in zip(chain, chain[1:]):  # each run of our checkpoint starts from the one before
        assert after.pretrain == before.save_path and after.compress_rate == before.compress_rate == 8
    paper = load_stage_config("stage1", ["mistral7b-h100"])
    assert (paper.learning_rate, paper.train_batch_size, paper.mse_loss) == (1e-4, 128, True)
    assert load_stage_config("stage2", ["mistral7b-h100"]).learning_rate == 5e-6
    assert load_stage_config("stage2", ["mistral7b-h100"]).train_batch_size == 32


@pytest.mark.parametrize("stage", ["stage1", "stage1_2", "stage2"])
def test_the_t4_configs_plan_mistral_7b_on_an_nf4_base_within_15_gib(stage, capsys):
    # Planned for a T4 wherever the test runs (plan_for = "t4"); the later stages' pretrain is a run
    # folder, so the base is named for the plan.
    extra = [] if stage == "stage1" else ["--pretrain", "mistralai/Mistral-7B-Instruct-v0.2"]
    config = load_stage_config(stage, ["mistral7b-t4", *extra])
    assert (config.quantize, config.bf16, config.gradient_checkpointing, config.plan_for) == ("nf4", True, True, "t4")
    assert (config.compress_rate, config.doc_max_length) == (32, 256)
    assert SCRIPTS[stage].main(["mistral7b-t4", "--dry_run", *extra]) == 0
    out = capsys.readouterr().out
    assert "planned for a T4 (sm75): fp16 autocast with dynamic loss scaling, nf4 base" in out
    peak = float(re.search(r"estimated peak +([\d.]+) GiB", out).group(1))
    largest = int(re.search(r"largest micro-batch within the budget: (\d+)", out).group(1))
    assert peak <= 15.0 and "budget 15.00 GiB: fits" in out
    assert 1 <= config.micro_train_batch_size <= largest


def test_a_stage_trains_on_a_quantized_base_and_its_checkpoint_loads_unquantized(tiny_base_dir, stage_files, tmp_path):
    from clara import Clara
    from clara.quant import quantized_layers

    config = tmp_path / "stage1.toml"
    config.write_text(toml({**tiny_config(tiny_base_dir, stage_files, "stage1", tmp_path / "run"), "quantize": "nf4"}))
    assert stage1.main([str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 100 for r in rows)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["flags"]["quantize"] == "nf4"
    # Adapters and memory rows do not depend on how the base was stored: the same checkpoint loads
    # on the unquantized base and on a quantized one.
    plain = Clara.from_pretrained(tmp_path / "run")
    assert not quantized_layers(plain.decoder)
    quantized = Clara.from_pretrained(tmp_path / "run", quantize="int8")
    assert len(quantized_layers(quantized.decoder)) == 2 * 7


def test_restate_adds_one_row_per_distinct_document(tmp_path):
    rows = [Stage1Example("qa", ("q1?",), ("a1",), ("doc A",)), Stage1Example("qa", ("q2?",), ("a2",), ("doc A",)),
            Stage1Example("qa", ("q3?",), ("a3",), ("doc B",))]
    mixed = with_restated_documents(rows, seed=1)
    assert sorted(map(repr, mixed)) == sorted(map(repr, rows + [Stage1Example("paraphrase", (), ("doc A",), ("doc A",)),
                                                                  Stage1Example("paraphrase", (), ("doc B",), ("doc B",))]))
    assert with_restated_documents(rows, seed=1) == mixed != with_restated_documents(rows, seed=2)
    source = tmp_path / "s1.jsonl"
    write_stage_file(source, rows, "stage1")
    assert restate_main([str(source), "--out", str(tmp_path / "out.jsonl"), "--seed", "1"]) == 0
    assert read_stage_file(tmp_path / "out.jsonl", "stage1") == mixed


def test_freeze_decoder_adapter_trains_only_the_compressor(tiny_base_dir, stage_files, tmp_path):
    from safetensors.torch import load_file

    config = tmp_path / "stage1.toml"
    config.write_text(toml({**tiny_config(tiny_base_dir, stage_files, "stage1", tmp_path / "run"),
                            "freeze_decoder_adapter": True}))
    assert stage1.main([str(config)]) == 0
    weights = load_file(str(tmp_path / "run" / "final" / "adapters.safetensors"))
    decoder_b = [t for name, t in weights.items() if "decoder_adapter" in name and "lora_B" in name]
    encoder_b = [t for name, t in weights.items() if "encoder_adapter" in name and "lora_B" in name]
    assert decoder_b and all(not t.any() for t in decoder_b)  # B starts at zero and never moved
    assert encoder_b and any(t.any() for t in encoder_b)


def test_freeze_decoder_adapter_is_refused_where_the_stage_does_not_train_it(tiny_base_dir, stage_files, tmp_path,
                                                                            capsys):
    config = tmp_path / "retrieval.toml"
    config.write_text(toml({**tiny_config(tiny_base_dir, stage_files, "stage2_pretrain_retrieval", tmp_path / "r"),
                            "freeze_decoder_adapter": True}))
    with pytest.raises(SystemExit) as stopped:
        stage2_retrieval.main([str(config)])
    assert stopped.value.code == 2
    assert "does not train the decoder adapter" in capsys.readouterr().err
