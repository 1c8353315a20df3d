"""Our decoder against transformers' implementation of each family, on tiny random models."""

import pytest
import torch

from hf_reference import FAMILIES, left_padded_batch, make_pair

pytest.importorskip("transformers", reason="transformers is the test-only reference (pip install -e .[dev])")

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    return request.param, *make_pair(request.param)


def test_logits_match_reference(pair):
    family, hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL, family


def test_left_padded_batch_matches_reference(pair):
    family, hf, ours = pair
    ids, mask = left_padded_batch(hf.config.vocab_size, [11, 6, 9])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        got = ours(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.isfinite(got).all()
    assert (got[valid] - expected[valid]).abs().max().item() <= TOL, family


def test_inputs_embeds_match_reference(pair):
    family, hf, ours = pair
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(2, 10, hf.config.hidden_size, generator=g) * 0.5
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
        got = ours(inputs_embeds=embeds, attention_mask=mask).logits
    valid = mask.bool()
    assert (got[valid] - expected[valid]).abs().max().item() <= TOL, family


def test_long_context_rope_scaling_matches_reference():
    """Past the original context LongRoPE switches to its long factors; Llama 3 scaling bends low frequencies."""
    for family in ("phi4_mini", "llama3"):
        hf, ours = make_pair(family)
        ids = torch.randint(0, hf.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
            got = ours(ids).logits
        assert (got - expected).abs().max().item() <= TOL, family
