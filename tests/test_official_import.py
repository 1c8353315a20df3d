"""Importing an official CLaRa checkpoint directory (config.json, adapters.pth, decoder_first_last_layers.pth).

The official directory is written by official_files.py in the official layout: peft key names, the
whole resized embedding with the official token order (<MEM0>.., <AE>, <ENC>, <SEP> after the base
vocabulary), over a tiny random Llama with a small word-level tokenizer; the official ids and ours
differ exactly as they do for a real checkpoint (ours put <ENC> before <AE>).
"""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from clara.config import ClaraConfig
from clara.lora import adapter_state_dict, load_adapter_state_dict
from clara.model import Clara
from clara.official import (
    OfficialCheckpointError,
    import_official_checkpoint,
    main,
    read_official_config,
)
from clara.weights import load_base
from official_files import DOCS, HIDDEN, N_MEM, RANK, official_row, random_adapter, write_base, write_official


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base_dir(request, tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base") / "tiny-llama", tied=request.param)


@pytest.fixture(scope="module")
def untied_base_dir(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base") / "tiny-llama", tied=False)


@pytest.fixture(scope="module")
def untied_base(untied_base_dir):
    """A function giving a fresh (decoder, tokenizer) of the untied base; copies are cheaper than loads."""
    loaded = load_base(str(untied_base_dir))
    return lambda: copy.deepcopy(loaded)


# ---------------------------------------------------------------------------------------------
def test_import_maps_adapters_and_token_rows_by_name(tmp_path, base_dir):
    enc_official, enc_ours = random_adapter(10)
    dec_official, dec_ours = random_adapter(11)
    # The decoder adapter in the forms a PeftModel state dict uses: prefixed, adapter name inside.
    dec_official = {"base_model.model." + k.replace(".weight", ".decoder_adapter.weight"): v
                    for k, v in dec_official.items()}
    # peft adds the resized embedding to each adapter when the vocabulary grew; it must be skipped.
    enc_official["model.embed_tokens.weight"] = torch.zeros(3, HIDDEN)
    first_last = write_official(tmp_path / "official", base_dir,
                                {"encoder_adapter": enc_official, "decoder_adapter": dec_official})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = import_official_checkpoint(tmp_path / "official")
    assert not [w for w in caught if "base embedding rows differ" in str(w.message)]
    vocab = json.loads((base_dir / "config.json").read_text())["vocab_size"]

    assert model.base_name == str(base_dir)
    assert model.adapter_names == ["decoder_adapter", "encoder_adapter"]
    for name, expected in (("encoder_adapter", enc_ours), ("decoder_adapter", dec_ours)):
        got = adapter_state_dict(model.decoder, name)
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    cfg = model.config
    assert (cfg.compress_rate, cfg.doc_max_length, cfg.n_mem_tokens, cfg.lora_r, cfg.lora_alpha) == (4, 16, 4, 4, 8)
    assert (cfg.training_stage, cfg.generation_top_k, cfg.max_new_tokens, cfg.lora_dropout) == ("stage1_2", 2, 32, 0.1)
    assert cfg.distinct_mem_tokens and cfg.train_mem_embeddings and cfg.sep_token

    tok, embed = model.tokenizer, model.decoder.embed_tokens.weight
    official_embed = first_last["model.embed_tokens.weight"]
    # Ours orders <ENC> before <AE>: a copy by id would take the wrong rows.
    assert tok.token_to_id("<ENC>") != official_row("<ENC>", vocab)
    for ours, theirs in [("<ENC>", "<ENC>"), ("<SEP>", "<SEP>"), ("<AE>", "<AE>")] + [
            (f"<MEM_{i}>", f"<MEM{i}>") for i in range(N_MEM)]:
        assert torch.equal(embed[tok.token_to_id(ours)], official_embed[official_row(theirs, vocab)]), ours
        if model.decoder.lm_head is not None:
            assert torch.equal(model.decoder.lm_head.weight[tok.token_to_id(ours)],
                               first_last["lm_head.weight"][official_row(theirs, vocab)]), ours
    for row, token_id in enumerate(model.memory_token_ids):
        i = int(tok.id_to_token(token_id).removeprefix("<MEM_").removesuffix(">"))
        assert torch.equal(model.memory_embeddings[row], official_embed[official_row(f"<MEM{i}>", vocab)])
    assert model.memory_embeddings.shape == (N_MEM, HIDDEN)
    assert torch.equal(embed[:vocab], official_embed[:vocab])  # base rows untouched



def test_stage2_shared_memory_token_and_query_reasoner_from_the_encoder(tmp_path, untied_base_dir, untied_base):
    """A stage-2 checkpoint with one shared <MEM> and no query reasoner (the official loader then
    starts it from the encoder adapter); its base rows drifted, which is warned about."""
    enc_official, enc_ours = random_adapter(20)
    dec_official, _ = random_adapter(21)
    order = ["<MEM>", "<AE>", "<ENC>", "<SEP>"]
    first_last = write_official(tmp_path / "official", untied_base_dir,
                                {"encoder_adapter": enc_official, "decoder_adapter": dec_official},
                                stage="stage2", order=order, different_mem_tokens=False)
    first_last["model.embed_tokens.weight"][:5] += 1.0  # not the rows of the base we load
    torch.save(first_last, tmp_path / "official" / "decoder_first_last_layers.pth")
    with pytest.warns(UserWarning, match="base embedding rows differ from the loaded base's by up to 1"):
        model = import_official_checkpoint(tmp_path / "official", base_model=untied_base())

    query = adapter_state_dict(model.decoder, "query_reasoner_adapter")
    assert sorted(query) == sorted(enc_ours) and all(torch.equal(query[k], enc_ours[k]) for k in enc_ours)
    trainable = {n.split(".adapters.")[-1].split(".")[0] for n, _ in model.trainable_named_parameters()
                 if ".adapters." in n}
    assert trainable == {"query_reasoner_adapter", "decoder_adapter"}

    vocab, tok = len(untied_base()[1]), model.tokenizer
    official_embed = first_last["model.embed_tokens.weight"]
    assert model.memory_token_ids == [tok.token_to_id("<MEM>")]
    assert torch.equal(model.memory_embeddings[0], official_embed[vocab + order.index("<MEM>")])
    for token in ("<MEM>", "<AE>", "<ENC>", "<SEP>"):
        assert torch.equal(model.decoder.embed_tokens.weight[tok.token_to_id(token)],
                           official_embed[vocab + order.index(token)]), token


def test_adapters_take_effect_and_the_cli_converts_bit_for_bit(tmp_path, untied_base_dir, untied_base):
    enc_official, enc_ours = random_adapter(30)
    dec_official, _ = random_adapter(31)
    write_official(tmp_path / "official", untied_base_dir,
                   {"encoder_adapter": enc_official, "decoder_adapter": dec_official})
    model = import_official_checkpoint(tmp_path / "official", base_model=untied_base())
    imported = model.compress_documents(DOCS)
    assert imported.shape == (2, N_MEM, HIDDEN)

    # python -m clara.official writes our format; loading it gives the same memory vectors, bit for bit.
    assert main([str(tmp_path / "official"), str(tmp_path / "ours")]) == 0
    reloaded = Clara.from_pretrained(tmp_path / "ours", base_model=untied_base())
    assert reloaded.adapter_names == model.adapter_names
    assert torch.equal(reloaded.compress_documents(DOCS), imported)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind

    # A fresh model, and the import with its encoder adapter zeroed, compress differently.
    fresh = Clara.from_decoder(*untied_base(), config=ClaraConfig(compress_rate=4, doc_max_length=16))
    assert not torch.allclose(imported, fresh.compress_documents(DOCS), atol=1e-3)
    load_adapter_state_dict(model.decoder, "encoder_adapter",
                            {k: (torch.zeros_like(v) if k.endswith("lora_B") else v) for k, v in enc_ours.items()})
    assert not torch.allclose(imported, model.compress_documents(DOCS), atol=1e-3)


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("SRC", "DST", "--base", "--dtype", "--device"):
        assert flag in text


def test_config_fields_mapped_and_ignored_are_reported(tmp_path, untied_base_dir):
    write_official(tmp_path / "official", untied_base_dir, {}, sep=False)
    official = read_official_config(tmp_path / "official")
    assert official.ignored == ["ae_mode", "auto_map", "compr_model_name", "compr_n_layers",
                                "lora_r_compressor", "model_type", "transformers_version"]
    assert official.clara.sep_token is True and any("'sep'" in n for n in official.notes)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
def _touch(path: str) -> None:
    Path(path).write_text("unpickling ran code")


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


@pytest.mark.parametrize("victim", ["adapters.pth", "decoder_first_last_layers.pth"])
def test_pickle_with_other_objects_is_refused_without_running_it(tmp_path, untied_base_dir, victim):
    enc_official, _ = random_adapter(40)
    write_official(tmp_path / "official", untied_base_dir, {"encoder_adapter": enc_official, "decoder_adapter": {}})
    marker = tmp_path / "marker"
    torch.save({"encoder_adapter": {"x": RunsCodeWhenUnpickled(marker)}}, tmp_path / "official" / victim)
    with pytest.raises(OfficialCheckpointError) as err:
        import_official_checkpoint(tmp_path / "official")
    message = str(err.value)
    assert str(tmp_path / "official" / victim) in message
    assert "weights_only=True" in message and "test_official_import._touch" in message
    assert "weights_only=False" not in message
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"junk", b"PK\x03\x04 truncated zip"], ids=["junk", "truncated"])
def test_damaged_pth_file_is_refused_naming_it(tmp_path, untied_base_dir, content):
    write_official(tmp_path / "official", untied_base_dir, {"encoder_adapter": {}, "decoder_adapter": {}})
    path = tmp_path / "official" / "decoder_first_last_layers.pth"
    path.write_bytes(content)
    with pytest.raises(OfficialCheckpointError, match="unreadable torch file") as err:
        import_official_checkpoint(tmp_path / "official")
    assert str(path) in str(err.value)


def test_missing_adapters_file_is_named(tmp_path, untied_base_dir):
    write_official(tmp_path / "official", untied_base_dir, {})
    (tmp_path / "official" / "adapters.pth").unlink()
    with pytest.raises(OfficialCheckpointError, match=r"adapters\.pth: missing") as err:
        import_official_checkpoint(tmp_path / "official")
    assert str(tmp_path / "official" / "adapters.pth") in str(err.value)


def test_unknown_adapter_keys_are_listed_by_name(tmp_path, untied_base_dir, untied_base):
    enc_official, _ = random_adapter(50)
    dec_official, _ = random_adapter(51)
    enc_official["model.layers.0.self_attn.bogus_proj.lora_A.weight"] = torch.zeros(RANK, HIDDEN)
    write_official(tmp_path / "official", untied_base_dir,
                   {"encoder_adapter": enc_official, "decoder_adapter": dec_official})
    with pytest.raises(OfficialCheckpointError) as err:
        import_official_checkpoint(tmp_path / "official", base_model=untied_base())
    message = str(err.value)
    assert "adapters.pth" in message and "'encoder_adapter'" in message
    assert "model.layers.0.self_attn.bogus_proj.lora_A.weight" in message


def test_missing_adapter_keys_are_listed_by_name(tmp_path, untied_base_dir, untied_base):
    enc_official, _ = random_adapter(60)
    dec_official, _ = random_adapter(61)
    del dec_official["model.layers.1.mlp.down_proj.lora_B.weight"]
    write_official(tmp_path / "official", untied_base_dir,
                   {"encoder_adapter": enc_official, "decoder_adapter": dec_official})
    with pytest.raises(OfficialCheckpointError) as err:
        import_official_checkpoint(tmp_path / "official", base_model=untied_base())
    message = str(err.value)
    assert "adapters.pth" in message and "'decoder_adapter'" in message
    assert "missing keys ['layers.1.mlp.down_proj.lora_B']" in message


def test_embedding_of_another_vocabulary_is_refused(tmp_path, untied_base_dir, untied_base):
    enc_official, _ = random_adapter(70)
    dec_official, _ = random_adapter(71)
    write_official(tmp_path / "official", untied_base_dir,
                   {"encoder_adapter": enc_official, "decoder_adapter": dec_official})
    path = tmp_path / "official" / "decoder_first_last_layers.pth"
    first_last = torch.load(path, weights_only=True)
    torch.save({k: v[:-1] for k, v in first_last.items()}, path)
    with pytest.raises(OfficialCheckpointError, match=r"model\.embed_tokens\.weight has shape") as err:
        import_official_checkpoint(tmp_path / "official", base_model=untied_base())
    assert str(path) in str(err.value)


@pytest.mark.parametrize("change,field", [
    ({"compr_rate": ...}, "'compr_rate'"),
    ({"doc_max_length": "16"}, "'doc_max_length' must be an integer"),
    ({"different_mem_tokens": 1}, "'different_mem_tokens' must be true or false"),
    ({"training_stage": "stage2_reasoning"}, "'training_stage' is 'stage2_reasoning'"),
    ({"doc_max_length": 18}, "doc_max_length 18 is not a multiple of compress_rate 4"),
])
def test_bad_config_fields_are_named(tmp_path, untied_base_dir, change, field):
    write_official(tmp_path / "official", untied_base_dir, {}, **change)
    with pytest.raises(OfficialCheckpointError) as err:
        import_official_checkpoint(tmp_path / "official")
    message = str(err.value)
    assert str(tmp_path / "official" / "config.json") in message and field in message
