"""NutriBot's knowledge loading and retriever on a tiny random checkpoint: provenance, the persisted
index (built once, rebuilt when documents or compressor change), both modes, the result shape, and
the safety guarantee over the whole knowledge base."""

from __future__ import annotations

import json

import pytest
import torch

from clara.data.knowledge_base import load_knowledge_base
from nutribot.knowledge import BUILT_IN, load_knowledge
from nutribot.retriever import ClaraRetriever, compressor_fingerprint, numerics
from nutribot.safety import extract_contraindications
from nutribot.filters import restricted_mentions
from nutribot_helpers import tiny_retriever, write_tiny_checkpoint
from test_data_pdfs import text_page, write_pdf
from tiny_base import require_embedded_tokenizer

RESULT_KEYS = {"answer", "warnings", "contraindications", "documents", "mode"}
DOCUMENT_KEYS = {"id", "title", "text", "source", "page", "score", "warnings"}
CONTRAINDICATION_KEYS = {"name", "evidence", "restricts", "reason"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    require_embedded_tokenizer()
    root = tmp_path_factory.mktemp("nutribot")
    write_tiny_checkpoint(root)
    return root


def test_built_in_knowledge_keeps_ids_sources_and_tags():
    knowledge = load_knowledge(None, tokenizer=None)
    documents = load_knowledge_base()
    assert knowledge.origin == BUILT_IN
    assert [p.id for p in knowledge.passages] == [d.id for d in documents]
    first = knowledge.passages[0]
    assert first.source == documents[0].source and first.page is None
    assert first.tags["medications"] == ("warfarin",)


def test_pdfs_are_read_when_given_with_file_and_page(tmp_path, shared):
    from clara.tokenizer import load_tokenizer

    folder = tmp_path / "pdfs"
    folder.mkdir()
    pages = [text_page(["Kale and spinach are rich in vitamin K."] * 6, 1, 2),
             text_page(["Grapefruit juice interacts with some statins."] * 6, 2, 2)]
    (folder / "greens.pdf").write_bytes(write_pdf(pages))
    knowledge = load_knowledge(folder, load_tokenizer("smollm2-135m"), doc_max_length=32)
    assert knowledge.origin == f"PDFs in {folder}"
    assert {p.source for p in knowledge.passages} == {"greens.pdf"}
    assert [p.page for p in knowledge.passages][0] == 1 and knowledge.passages[-1].page == 2
    assert any("Grapefruit" in p.text for p in knowledge.passages if p.page == 2)


def test_a_missing_or_empty_pdf_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such PDF file or folder"):
        load_knowledge(tmp_path / "nowhere", tokenizer=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PDF text to answer from"):
        load_knowledge(tmp_path / "empty", tokenizer=None)


def test_index_is_built_once_then_loaded_and_rebuilt_when_the_compressor_changes(shared, monkeypatch):
    first = tiny_retriever(shared)
    assert len(first.index) == len(first.knowledge.passages)
    path = first.index_path()
    assert path.is_file()

    def no_rebuild(self, *a, **k):
        raise AssertionError("the index was rebuilt although nothing changed")

    monkeypatch.setattr(ClaraRetriever, "build_index", no_rebuild)
    second = tiny_retriever(shared)
    assert torch.equal(second.index.vectors, first.index.vectors)
    monkeypatch.undo()

    # Another compressor (a trained encoder adapter) means another index file.
    with torch.no_grad():
        for layer in second.model.decoder.modules():
            if hasattr(layer, "adapters") and "encoder_adapter" in layer.adapters:
                layer.adapters["encoder_adapter"].lora_B.normal_(0, 0.1)
    assert compressor_fingerprint(second.model) != compressor_fingerprint(first.model)
    assert second.index_path() != path


def test_a_bf16_int8_model_keeps_an_index_of_its_own_and_answers(shared):
    from clara.quant import QuantizedLinear

    full = tiny_retriever(shared)
    small = ClaraRetriever(None, shared / "checkpoint", "clara", cache_dir=shared / "cache", dtype="bf16",
                           quantize="int8", max_new_tokens=4, progress=False)
    kinds = {m.kind for m in small.model.decoder.modules() if isinstance(m, QuantizedLinear)}
    assert kinds == {"int8"} and small.model.memory_embeddings.dtype == torch.bfloat16
    assert (numerics(small.model), numerics(full.model)) == ("bfloat16, int8 base", "float32")
    # Its memories are computed in other numbers: they must not be served from the fp32 index, or the reverse.
    assert small.index_path() != full.index_path() and small.index_path().is_file()
    assert small.index.vectors.shape == full.index.vectors.shape
    reply = small.answer("Which greens should I eat more of?", "72-year-old on warfarin", top_k=2).to_json()
    assert set(reply) == RESULT_KEYS and len(reply["documents"]) == 2 and reply["warnings"]
    with pytest.raises(ValueError, match="dtype must be one of"):
        ClaraRetriever(None, shared / "checkpoint", dtype="float64")


@pytest.mark.parametrize("mode", ["clara", "text"])
def test_answer_has_exactly_the_documented_shape(shared, mode):
    retriever = tiny_retriever(shared, mode)
    reply = retriever.answer("Which greens should I eat more of?", "72-year-old on warfarin", top_k=3).to_json()
    assert set(reply) == RESULT_KEYS and reply["mode"] == mode
    assert isinstance(reply["answer"], str)
    assert len(reply["documents"]) == 3
    for d in reply["documents"]:
        assert set(d) == DOCUMENT_KEYS and isinstance(d["score"], float) and d["page"] is None
    assert [c["name"] for c in reply["contraindications"]] and all(
        set(c) == CONTRAINDICATION_KEYS for c in reply["contraindications"])
    json.dumps(reply)  # serialisable as it is


def test_text_mode_ranks_by_words(shared):
    retriever = tiny_retriever(shared, "text")
    found = retriever.search("warfarin vitamin K keep intake steady", None, top_k=1)
    assert found.documents[0].passage.id == "kb-0001"
    assert found.contraindications == []


def test_streamed_text_adds_up_to_the_answer(shared):
    retriever = tiny_retriever(shared, "clara", max_new_tokens=8)
    pieces, found = [], []
    reply = retriever.answer("Is oatmeal good for cholesterol?", "", on_text=pieces.append, on_found=found.append)
    assert "".join(pieces).strip() == reply.answer
    assert len(found) == 1 and [d.passage.id for d in found[0].documents] == [d.passage.id for d in reply.documents]


def test_bad_questions_are_refused(shared):
    retriever = tiny_retriever(shared, "text")
    with pytest.raises(ValueError, match="empty"):
        retriever.search("   ")
    with pytest.raises(TypeError, match="string"):
        retriever.search(None)
    with pytest.raises(ValueError, match="top_k"):
        retriever.search("kale", top_k=0)
    with pytest.raises(ValueError, match="mode"):
        ClaraRetriever(None, shared / "checkpoint", "vector")


CONTEXTS = ["on warfarin", "CKD stage 4", "pregnant, 20 weeks", "celiac disease", "taking phenelzine (an MAOI)",
            "atorvastatin 40 mg", "peanut allergy", "gout", "lactose intolerant", "type 2 diabetes",
            "hemochromatosis", "history of calcium oxalate kidney stones", "on levothyroxine",
            "hypertension", "PKU"]


@pytest.mark.parametrize("mode", ["clara", "text"])
def test_no_document_of_the_whole_base_names_a_restricted_item_without_its_warning(shared, mode):
    retriever = tiny_retriever(shared, mode)
    every = len(retriever.knowledge.passages)
    for context in CONTEXTS:
        contraindications = extract_contraindications(context)
        assert contraindications, context
        documents = retriever.search("What should I eat?", context, top_k=every).documents
        assert len(documents) == every
        for d in documents:
            for c, item in restricted_mentions(d.passage.text, contraindications):
                assert any(c.name in w and item in w.lower() for w in d.warnings), (context, d.passage.id, item)


def test_an_answer_naming_restricted_items_carries_their_warnings(shared, monkeypatch):
    retriever = tiny_retriever(shared, "clara")
    said = ("Eat more spinach, kale and grapefruit; aged cheese, bananas, tuna, bread and peanuts are fine, "
            "with a glass of wine and some liver.")
    monkeypatch.setattr(retriever.model, "generate_from_compressed_documents_and_questions",
                        lambda *a, **k: [said])
    for context in CONTEXTS:
        contraindications = extract_contraindications(context)
        reply = retriever.answer("What should I eat?", context)
        assert reply.answer == said
        for c, item in restricted_mentions(said, contraindications):
            assert any(c.name in w and item in w.lower() for w in reply.warnings), (context, item)


@pytest.mark.parametrize("mode", ["clara", "text"])
def test_the_repetition_penalty_reaches_generation(shared, mode, monkeypatch):
    retriever = ClaraRetriever(None, shared / "checkpoint", mode, cache_dir=shared / "cache", max_new_tokens=4,
                               repetition_penalty=1.4, progress=False)
    method = ("generate_from_compressed_documents_and_questions" if mode == "clara" else
              "generate_from_text_context")
    original, calls = getattr(retriever.model, method), []

    def spy(*args, **kwargs):
        calls.append(kwargs["repetition_penalty"])
        return original(*args, **kwargs)

    monkeypatch.setattr(retriever.model, method, spy)
    retriever.answer("Which greens should I eat more of?", "on warfarin", top_k=2)
    assert calls == [1.4]
    with pytest.raises(ValueError, match="repetition_penalty must be positive"):
        ClaraRetriever(None, shared / "checkpoint", mode, cache_dir=shared / "cache", repetition_penalty=0)
