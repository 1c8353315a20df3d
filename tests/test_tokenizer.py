"""Tests for clara/tokenizer.py, with clara/gguf_tokenizer.py (GGUF vocabularies) and
clara/chat_templates.py (chat formats) behind it.

The SmolLM2 ids expected here come from tests/fixtures/smollm2_tokenizer_expected.json, written by
tests/fixtures/make_tokenizer_fixture.py with a reference BPE that shares no code with the module
(see that script's docstring). Other formats are tested on tiny tokenizers built in tmp folders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from clara.chat_templates import render_chat
from clara.gguf_file import read_gguf
from clara.sources import SourceError, embedded_model_path
from clara.tokenizer import SMOLLM_SYSTEM_PROMPT, StreamDecoder, Tokenizer, load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Bytes the SmolLM2 vocabulary has no symbol for, so its BPE (like the tokenizer.json it ships)
# drops them: six control characters, and 0xF1/0xF2, the lead bytes of U+40000..U+BFFFF (planes
# 4-11, none of them assigned). 0xC0, 0xC1 and 0xF5-0xFF never occur in UTF-8.
UNSPELLABLE = "\x04\x06\x13\x14\x16\x1d"
ANY_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=UNSPELLABLE, max_codepoint=0x3FFFF),
    max_size=60,
)


def smollm2_gguf() -> Path:
    try:
        return embedded_model_path("smollm2-135m")
    except SourceError as e:
        pytest.skip(f"the embedded SmolLM2 GGUF is not available: {e}")


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    """Shared and read-only: tests that add tokens build their own."""
    return Tokenizer.from_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def expected_rows() -> list[dict]:
    return json.loads((FIXTURES / "smollm2_tokenizer_expected.json").read_text(encoding="utf-8"))


# -------------------------------------------------------------------------------------------
# SmolLM2 from the GGUF
# -------------------------------------------------------------------------------------------
def test_gguf_tokenizer_matches_reference_ids(smol, expected_rows):
    assert len(expected_rows) >= 300
    got = smol.encode_batch([row["text"] for row in expected_rows])
    for row, ids in zip(expected_rows, got):
        assert ids == row["ids"], f"ids differ for {row['text']!r}"
    # encode and encode_batch agree
    assert [smol.encode(row["text"]) for row in expected_rows[:40]] == got[:40]


def test_gguf_metadata_facts(smol):
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos) == (1, 2, 2, False)
    assert len(smol) == 49152
    assert smol.chat_format == "chatml"
    assert smol.default_system_prompt == SMOLLM_SYSTEM_PROMPT
    assert smol.stop_ids() == {2}
    assert smol.id_to_token(2) == "<|im_end|>" and smol.token_to_id("<|im_end|>") == 2
    assert smol.token_to_id("no-such-token-here") is None


def test_digits_are_split_one_by_one(smol):
    digit = {str(d): smol.token_to_id(str(d)) for d in range(10)}
    assert smol.encode("2024") == [digit["2"], digit["0"], digit["2"], digit["4"]]
    # The whitespace run before a digit stays whole: it is split off before the GPT-2 regex runs.
    assert smol.encode("a   1") == [smol.token_to_id("a"), smol.token_to_id("ĠĠĠ"), digit["1"]]


def test_building_from_gguf_is_fast():
    path = smollm2_gguf()
    start = time.perf_counter()
    Tokenizer.from_gguf(path)
    assert time.perf_counter() - start < 2.0


def test_round_trip_on_fixture_strings(smol, expected_rows):
    for row in expected_rows:
        text = row["text"]
        assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


@settings(max_examples=150, deadline=None)
@given(ANY_TEXT)
def test_round_trip_on_arbitrary_text(smol, text):
    # special-token strings ("<jupyter_code>") encode whole, so keep them when decoding
    assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


def test_characters_without_a_byte_symbol_are_dropped(smol):
    assert smol.encode("a\x04b") == [smol.token_to_id("a"), smol.token_to_id("b")]
    assert smol.decode(smol.encode("\U00040000")) == "\ufffd" * 3  # its lead byte 0xF1 is lost


def test_special_tokens_encode_whole(smol):
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|endoftext|>") == [0]
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == smol.encode("user\nHi")
    assert smol.decode(ids) == "user\nHi"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


def test_add_bos_on_request(smol):
    assert smol.encode("Hi", add_bos=True) == [1, *smol.encode("Hi")]
    assert smol.encode_batch(["Hi", "yo"], add_bos=True) == [[1, *smol.encode("Hi")], [1, *smol.encode("yo")]]


def test_added_special_tokens_get_new_ids_and_stay_whole():
    tok = Tokenizer.from_gguf(smollm2_gguf())
    before = len(tok)
    ids = tok.add_special_tokens(["<MEM_0>", "<ENC>", "<SEP>", "<AE>"])
    assert ids == [before, before + 1, before + 2, before + 3] == [49152, 49153, 49154, 49155]
    assert len(tok) == before + 4
    assert tok.encode("abc<SEP>def") == [*tok.encode("abc"), 49154, *tok.encode("def")]
    assert tok.encode("<MEM_0><MEM_0> <ENC>") == [49152, 49152, tok.token_to_id("Ġ"), 49153]
    assert tok.decode([49153, *tok.encode("hi"), 49154]) == "hi"
    # adding again, or adding a token the vocabulary has, reuses ids
    assert tok.add_special_tokens(["<AE>", "<|im_end|>"]) == [49155, 2]
    assert len(tok) == before + 4


def test_pad_batch(smol):
    ids, mask = smol.pad_batch([[5, 6, 7], [8], []], side="left")
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8], [2, 2, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = smol.pad_batch([[5, 6, 7], [8]], side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        smol.pad_batch([[1]], side="middle")


# -------------------------------------------------------------------------------------------
# Streaming
# -------------------------------------------------------------------------------------------
def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_decoder_holds_back_split_characters(smol):
    text = "I ❤️ NY 🗽 — 😀👍🏽 done, 東京!"
    ids = smol.encode(text)
    # precondition: some of these tokens are pieces of a character
    assert any("\ufffd" in smol.decode([i]) for i in ids)
    pieces = stream(smol, ids)
    assert "".join(pieces) == smol.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[0] == "I"


def test_stream_decoder_with_special_tokens(smol):
    ids = smol.encode("<|im_start|>assistant\nSure 😀<|im_end|>")
    assert "".join(stream(smol, ids)) == smol.decode(ids) == "assistant\nSure 😀"
    assert "".join(stream(smol, ids, skip_special_tokens=False)) == "<|im_start|>assistant\nSure 😀<|im_end|>"


def test_stream_decoder_flushes_an_unfinished_character(smol):
    ids = smol.encode("ok 😀")
    partial = ids[:-1]  # the emoji's last byte is missing
    pieces = stream(smol, partial)
    assert "".join(pieces) == smol.decode(partial)
    assert pieces[-1].endswith("\ufffd")


@settings(max_examples=60, deadline=None)
@given(ANY_TEXT)
def test_stream_equals_decode_on_arbitrary_text(smol, text):
    ids = smol.encode(text)
    assert "".join(stream(smol, ids)) == smol.decode(ids)


def test_stream_decoder_with_a_sentencepiece_style_decoder(tmp_path):
    """Metaspace decoders drop the first token's leading space; streaming must not add it back."""
    from tokenizers import decoders

    backend = Backend(models.WordLevel({"▁Hello": 0, "▁world": 1, "!": 2, "<unk>": 3}, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = Tokenizer(backend, eos_id=3)
    ids = [0, 1, 2, 1]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "Hello world! world"


# -------------------------------------------------------------------------------------------
# Chat templates
# -------------------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]
NO_SYSTEM = CONVERSATION[1:]


def test_smollm2_chat_exact(smol):
    assert smol.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smol.apply_chat_template(CONVERSATION, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    )
    ids = smol.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def test_smollm2_chat_matches_the_gguf_jinja_template(smol):
    """The GGUF's own template, rendered the way transformers renders chat templates."""
    pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = read_gguf(smollm2_gguf()).metadata["tokenizer.chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(source)
    conversations = [CONVERSATION, NO_SYSTEM, [{"role": "user", "content": " spaced \n"}],
                     [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}]]
    for messages in conversations:
        for gen in (True, False):
            expected = template.render(messages=messages, add_generation_prompt=gen)
            assert smol.apply_chat_template(messages, add_generation_prompt=gen) == expected


def make_hf_dir(tmp_path: Path, special: list[str], config: dict, generation_config: dict | None = None,
                bos_post_processor: bool = False) -> Path:
    """A tiny word-level tokenizer.json with the given special tokens, plus its config files."""
    vocab = {"<unk>": 0, "Hi": 1, "there": 2}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if bos_post_processor:  # like Llama's tokenizer.json: "<s> $A"
        bos = special[0]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    folder = tmp_path / "tok"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config), encoding="utf-8")
    return folder


# Per format: special tokens, tokenizer_config, then the exact rendering of CONVERSATION with and
# without the generation prompt, and of NO_SYSTEM with it. Templates are reduced to the markers
# the format is recognised by; the renderings were checked against Jinja renders of each family's
# published template.
FORMATS = {
    "chatml": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
         "chat_template": "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{# ... #}"},
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
         "chat_template": "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}"},
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama2": (
        ["<s>", "</s>"],
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
         "chat_template": "{{ bos_token + '[INST] ' + '<<SYS>>\\n' }}"},
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST]",
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST]",
        "<s>[INST] Hi [/INST] Hello! </s><s>[INST] 2+2? [/INST]",
    ),
    "mistral": (
        ["<s>", "</s>"],
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
         "chat_template": "{{ bos_token }}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"},
        "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s> [INST] 2+2? [/INST]",
        "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s> [INST] 2+2? [/INST]",
        "<s> [INST] Hi [/INST] Hello!</s> [INST] 2+2? [/INST]",
    ),
    "phi3": (
        ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        {"eos_token": "<|endoftext|>", "add_bos_token": False,
         "chat_template": "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{{ '<|assistant|>\\n' }}"},
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n",
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n<|endoftext|>",
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n",
    ),
    "phi4": (
        ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        {"eos_token": "<|endoftext|>",
         "chat_template": "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{{ '<|assistant|>' }}"},
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>2+2?<|end|><|assistant|>",
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>2+2?<|end|><|endoftext|>",
        "<|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>2+2?<|end|><|assistant|>",
    ),
    "phi2": (
        ["<|endoftext|>"],
        {"eos_token": "<|endoftext|>", "tokenizer_class": "CodeGenTokenizer"},
        "Be brief.\nInstruct: Hi\nOutput: Hello!\nInstruct: 2+2?\nOutput:",
        "Be brief.\nInstruct: Hi\nOutput: Hello!\nInstruct: 2+2?",
        "Instruct: Hi\nOutput: Hello!\nInstruct: 2+2?\nOutput:",
    ),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_chat_formats_render_exactly(tmp_path, fmt):
    special, config, with_prompt, without_prompt, no_system = FORMATS[fmt]
    tok = Tokenizer.from_hf_dir(make_hf_dir(tmp_path, special, config))
    assert tok.chat_format == fmt
    assert tok.apply_chat_template(CONVERSATION) == with_prompt
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == without_prompt
    assert tok.apply_chat_template(NO_SYSTEM) == no_system


def test_format_and_stop_ids_from_tokens_and_generation_config(tmp_path):
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    folder = make_hf_dir(tmp_path, special, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
                         generation_config={"eos_token_id": [4, 7]})
    tok = Tokenizer.from_hf_dir(folder)
    ids = {t: tok.token_to_id(t) for t in special}
    assert tok.chat_format == "llama3"  # no template: told by its special tokens
    assert tok.stop_ids() == {ids["<|end_of_text|>"], ids["<|eot_id|>"], 4, 7}
    assert tok.bos_id == ids["<|begin_of_text|>"] and tok.add_bos is False
    assert tok.encode("Hi there", add_bos=True) == [tok.bos_id, 1, 2]
    assert tok.encode_chat([{"role": "user", "content": "Hi"}]).count(tok.bos_id) == 1


def test_add_bos_follows_the_post_processor_when_the_config_is_silent(tmp_path):
    folder = make_hf_dir(tmp_path, ["<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"},
                         bos_post_processor=True)
    tok = Tokenizer.from_hf_dir(folder)
    assert tok.add_bos is True and tok.bos_id == 3 and tok.eos_id == 4
    assert tok.encode("Hi there") == [3, 1, 2]  # BOS once: the backend's own post-processor stays off
    assert tok.encode("Hi there", add_bos=False) == [1, 2]
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "add_bos_token": False}), encoding="utf-8")
    assert Tokenizer.from_hf_dir(folder).add_bos is False


def test_chat_format_override_and_phi3_stop_ids(tmp_path):
    special, config, *_ = FORMATS["phi3"]
    tok = Tokenizer.from_file(make_hf_dir(tmp_path, special, config) / "tokenizer.json", config=config)
    assert tok.stop_ids() == {tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")}
    forced = Tokenizer.from_file(tmp_path / "tok" / "tokenizer.json", config=config, chat_format="phi2")
    assert forced.chat_format == "phi2"
    with pytest.raises(ValueError, match="unknown chat_format 'vicuna'"):
        Tokenizer.from_file(tmp_path / "tok" / "tokenizer.json", config=config, chat_format="vicuna")


def test_render_chat_spells_missing_bos_and_eos_as_the_format_does():
    turn = [{"role": "user", "content": "Hi"}]
    assert render_chat("llama3", turn) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_chat("llama2", turn) == "<s>[INST] Hi [/INST]"
    assert render_chat("phi3", turn, add_generation_prompt=False) == "<|user|>\nHi<|end|>\n<|endoftext|>"
    assert render_chat("mistral", turn, bos="<BOS>") == "<BOS> [INST] Hi [/INST]"


def test_bad_conversations_are_refused(smol, tmp_path):
    with pytest.raises(ValueError, match="message 1: unknown role 'tool'"):
        smol.apply_chat_template([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    with pytest.raises(ValueError, match="message 0: content must be a str"):
        smol.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        smol.apply_chat_template([{"content": "x"}])
    special, config, *_ = FORMATS["llama2"]
    llama2 = Tokenizer.from_hf_dir(make_hf_dir(tmp_path, special, config))
    with pytest.raises(ValueError, match="message 2: expected role 'user'"):
        llama2.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "assistant", "content": "c"}])
    plain = Tokenizer(Backend(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), eos_id=0)
    with pytest.raises(ValueError, match="chat format 'none' has no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "x"}])


# -------------------------------------------------------------------------------------------
# Other sources: tokenizer.json of the same vocabulary, small GGUF files written here
# -------------------------------------------------------------------------------------------
def test_hf_dir_with_the_smollm2_vocabulary(smol, expected_rows, tmp_path):
    folder = tmp_path / "smollm2"
    folder.mkdir()
    smol.backend.save(str(folder / "tokenizer.json"))
    template = read_gguf(smollm2_gguf()).metadata["tokenizer.chat_template"]
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
              "add_bos_token": False, "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for tok in (load_tokenizer(folder), load_tokenizer(folder / "tokenizer.json")):
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, len(tok)) == (1, 2, 2, False, 49152)
        assert tok.default_system_prompt == SMOLLM_SYSTEM_PROMPT
        rows = expected_rows[::7]
        assert tok.encode_batch([r["text"] for r in rows]) == [r["ids"] for r in rows]


def test_load_tokenizer_by_alias_path_and_hub_id(smol, tmp_path, monkeypatch):
    """One resolver for every name: the alias, the .gguf path, and a hub repo id (here served by
    an offline cache holding only the tokenizer files)."""
    by_alias, by_path = load_tokenizer("smollm2-135m"), load_tokenizer(smollm2_gguf())
    text = "Kale 2024 ❤️"
    assert by_alias.encode(text) == by_path.encode(text) == smol.encode(text)
    assert by_alias.source == by_path.source == str(smollm2_gguf())

    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-tok"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    special, config, *_ = FORMATS["chatml"]
    snapshot.parent.mkdir()
    make_hf_dir(tmp_path, special, config).rename(snapshot)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    tok = load_tokenizer("tiny-org/tiny-tok")
    assert tok.chat_format == "chatml" and tok.encode("Hi there") == [1, 2]
    assert Path(tok.source).resolve() == (snapshot / "tokenizer.json").resolve()


def write_gguf(path: Path, kv: dict) -> Path:
    """A GGUF holding only metadata (no tensors)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (kind, value) in kv.items():
        getattr(writer, f"add_{kind}")(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_bpe_kv(pre: str = "smollm", model: str = "gpt2") -> dict:
    """The 256 byte symbols, two merges and two control tokens, in GGUF's keys."""
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ"]
    tokens = ["<|endoftext|>", "<|im_end|>", *alphabet, "Ġh", "Ġhi"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    return {
        "tokenizer.ggml.model": ("string", model),
        "tokenizer.ggml.pre": ("string", pre),
        "tokenizer.ggml.tokens": ("array", tokens),
        "tokenizer.ggml.token_type": ("array", types),
        "tokenizer.ggml.merges": ("array", ["Ġ h", "Ġh i"]),
        "tokenizer.ggml.eos_token_id": ("uint32", 1),
        "tokenizer.ggml.add_bos_token": ("bool", False),
        "general.some_float": ("float32", 0.5),
    }


def test_small_gguf_by_path_by_parsed_file_and_by_reader(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = write_gguf(tmp_path / "tiny.gguf", tiny_bpe_kv())
    sources = (path, str(path), read_gguf(path), gguf.GGUFReader(str(path)))
    for tok in (Tokenizer.from_gguf(source) for source in sources):
        hi = tok.token_to_id("Ġhi")
        assert tok.encode(" hi 12<|im_end|>") == [hi, tok.token_to_id("Ġ"), tok.token_to_id("1"),
                                                    tok.token_to_id("2"), 1]
        assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.chat_format, len(tok)) == (1, 1, None, "none", 99)
        assert tok.source == str(path)
    with pytest.raises(TypeError, match="from_gguf expects a path"):
        Tokenizer.from_gguf(42)


def test_llama3_gguf_pre_tokenizer_groups_three_digits(tmp_path):
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "l3.gguf", tiny_bpe_kv(pre="llama-bpe")))
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("12345 ab")]
    assert pieces == ["123", "45", "Ġab"]


# -------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the file
# -------------------------------------------------------------------------------------------
def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_gguf(tmp_path / "absent.gguf")
    assert str(tmp_path / "absent.gguf") in one_line(err)
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_file(tmp_path / "absent.json")
    assert str(tmp_path / "absent.json") in one_line(err)
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_hf_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in one_line(err)
    with pytest.raises(SourceError) as err:  # resolved as a model name: not a path, repo id or alias
        load_tokenizer(tmp_path / "nothing-here")
    assert one_line(err).startswith(f"{tmp_path / 'nothing-here'}: no such file or folder")


def test_gguf_without_tokenizer_metadata(tmp_path):
    path = write_gguf(tmp_path / "weights-only.gguf", {"general.name": ("string", "no tokenizer")})
    with pytest.raises(ValueError) as err:
        Tokenizer.from_gguf(path)
    message = one_line(err)
    assert str(path) in message and "no tokenizer metadata" in message


def test_sentencepiece_gguf_is_refused(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tiny_bpe_kv(model="llama"))
    with pytest.raises(ValueError) as err:
        Tokenizer.from_gguf(path)
    assert str(path) in one_line(err) and "tokenizer.ggml.model is 'llama'" in str(err.value)


def test_unknown_gguf_pre_tokenizer_is_refused(tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", tiny_bpe_kv(pre="made-up"))
    with pytest.raises(ValueError) as err:
        Tokenizer.from_gguf(path)
    assert str(path) in one_line(err) and "'made-up'" in str(err.value)


def test_not_a_gguf_and_truncated_gguf(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model file at all, just text", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        Tokenizer.from_gguf(text)
    assert str(text) in one_line(err) and "not a GGUF file" in str(err.value)
    whole = write_gguf(tmp_path / "whole.gguf", tiny_bpe_kv()).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError) as err:
        Tokenizer.from_gguf(cut)
    assert str(cut) in one_line(err) and "truncated" in str(err.value)


def test_bad_tokenizer_files(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        Tokenizer.from_file(broken)
    assert str(broken) in one_line(err)
    folder = make_hf_dir(tmp_path, ["</s>"], {})
    (folder / "tokenizer_config.json").write_text('{\n  "eos_token": "</s>",\n  oops\n}', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        Tokenizer.from_hf_dir(folder)
    assert f"{folder / 'tokenizer_config.json'}:3:" in one_line(err)
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        Tokenizer.from_hf_dir(folder)
    assert "eos_token" in one_line(err) and "'<|nope|>'" in str(err.value)
    other = tmp_path / "vocab.txt"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a folder, a tokenizer.json or a .gguf"):
        load_tokenizer(other)
