"""KV-cache generation against full recomputation, batched against one-by-one, and checkpointing."""

import subprocess
import sys

import pytest
import torch

from clara.generate import generate, penalize_repeats, sample_next
from tiny_models import FAMILY_CONFIGS, greedy_by_recompute, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_kv_cache_greedy_equals_full_recompute(family):
    model = tiny_model(family)
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(5))
    cached = generate(model, ids, max_new_tokens=32)
    assert cached.shape == (1, 32)
    assert torch.equal(cached, greedy_by_recompute(model, ids, 32))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_left_padded_batch_equals_one_by_one(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 101, (n,), generator=g) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batched = generate(model, ids, mask, max_new_tokens=20)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], max_new_tokens=20)
        assert torch.equal(batched[i], alone[0]), f"row {i}"


def test_inputs_embeds_prefill_equals_ids_prefill():
    model = tiny_model("llama_tied")
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(7))
    from_ids = generate(model, ids, max_new_tokens=10)
    from_embeds = generate(model, inputs_embeds=model.embed_tokens(ids).detach(), max_new_tokens=10)
    assert torch.equal(from_ids, from_embeds)


def test_stop_token_ends_row_and_pads_the_rest():
    model = tiny_model("llama_tied")
    ids = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(8))
    free = generate(model, ids, max_new_tokens=12)[0].tolist()
    stop = free[3]
    first = free.index(stop)
    stopped = generate(model, ids, max_new_tokens=12, stop_ids={stop}, pad_id=0)[0].tolist()
    assert stopped == free[: first + 1]  # generation ended as soon as the only row stopped


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(9))
    a = sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(1))
    b = sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(sample_next(logits, 1.0, 1e-6, None), logits.argmax(-1))


@pytest.mark.parametrize("family", ["llama_tied", "phi2_parallel"])
def test_activation_checkpointing_gives_the_same_gradients(family):
    model = tiny_model(family).train()
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def grads(checkpointing: bool):
        model.zero_grad()
        model.set_gradient_checkpointing(checkpointing)
        logits = model(ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert (plain[name] - ckpt[name]).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep_equals_the_last_rows_of_full_logits(family, keep):
    """With logits_to_keep the last block runs only the kept queries: same logits, same gradients."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(1, 101, (2, 12), generator=g)  # longer than mistral's window of 8
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    embeds = model.embed_tokens(ids).detach().requires_grad_()
    full = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -keep:]
    (full_grad,) = torch.autograd.grad(full.square().sum(), embeds)
    out = model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep)
    assert out.logits.shape == (2, keep, 101) and out.hidden_states.shape == (2, keep, 48)
    assert (out.logits - full).abs().max() < 1e-5
    (grad,) = torch.autograd.grad(out.logits.square().sum(), embeds)
    assert (grad - full_grad).abs().max() < 1e-4
    cache = model.new_cache(2, 12)
    with torch.no_grad():
        model(ids[:, :7], attention_mask=mask[:, :7], cache=cache)
        cached = model(ids[:, 7:], attention_mask=mask, cache=cache, logits_to_keep=keep).logits
    assert (cached - full.detach()).abs().max() < 1e-5


def test_python_m_clara_generate_runs_the_command_line():
    """`python -m clara.generate` hands over to clara.generate_cli (the clara-generate script)."""
    done = subprocess.run([sys.executable, "-m", "clara.generate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: clara-generate") and "--max_new_tokens" in done.stdout
    assert done.stderr == ""  # no runpy warning about the module being imported twice
    done = subprocess.run([sys.executable, "-m", "clara.generate", "--prompt", "hi", "--max_new_tokens", "0"],
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, "clara-generate: error: --max_new_tokens must be at least 1, got 0\n")


@pytest.mark.parametrize("flags, message", [
    (["--prompt", ""], "clara-generate: error: --prompt is empty: give the text to answer or continue"),
    (["--prompt", "hi", "--temperature", "-1"], "clara-generate: error: --temperature must be 0 (greedy) or positive, got -1.0"),
    (["--prompt", "hi", "--top_p", "0"], "clara-generate: error: --top_p must be in (0, 1], got 0.0"),
    (["--prompt", "hi", "--repetition_penalty", "0"],
     "clara-generate: error: --repetition_penalty must be positive (1.0: none), got 0.0"),
    (["--prompt", "hi", "--device", "foo"], "clara-generate: error: --device 'foo' is not a torch device (e.g. cpu, cuda, cuda:1, mps)"),
])
def test_the_command_line_refuses_bad_requests_in_one_line_before_loading(flags, message, capsys):
    from clara.generate_cli import main

    assert main(flags) == 2
    assert capsys.readouterr().err == message + "\n"


def test_generation_requests_that_cannot_be_served_are_refused():
    model = tiny_model("llama_tied")  # context 256
    ids = torch.tensor([[1, 2, 3]])
    for kwargs, message in (({"temperature": -1.0}, "temperature must be 0 .greedy. or positive, got -1.0"),
                            ({"repetition_penalty": 0.0}, r"repetition_penalty must be positive \(1.0: none\), got 0.0"),
                            ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
                            ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0")):
        with pytest.raises(ValueError, match=message):
            generate(model, ids, **kwargs)
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="the prompt has 256 tokens but the model's context is 256"):
        generate(model, torch.ones(1, 256, dtype=torch.long))


def test_a_prompt_near_the_end_of_the_context_generates_what_fits_and_warns():
    model = tiny_model("llama_tied")  # context 256
    with pytest.warns(UserWarning, match="generating at most 6 new tokens instead of 20"):
        new = generate(model, torch.ones(1, 250, dtype=torch.long), max_new_tokens=20)
    assert new.shape == (1, 6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0]]
    assert penalize_repeats(logits, seen, 1.0) is logits


# transformers warns that, given embeddings alone, only new tokens are penalized: as ours.
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
@pytest.mark.parametrize("prompt_as", ["ids", "embeds"])
def test_repetition_penalty_matches_transformers_generate(prompt_as):
    from hf_reference import make_pair

    hf, ours = make_pair("llama2")  # untied: a tied tiny model repeats one token however it is penalized
    start = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(11))
    # The prompt ends with the model's own greedy words, which it would go on repeating.
    ids = torch.cat([start, generate(ours, start, max_new_tokens=4)], 1)
    embeds = ours.embed_tokens(ids).detach()
    prompt = {"input_ids": ids} if prompt_as == "ids" else {"inputs_embeds": embeds}
    plain = generate(ours, **prompt, max_new_tokens=24)
    penalized = generate(ours, **prompt, max_new_tokens=24, repetition_penalty=1.8)
    settings = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, repetition_penalty=1.8,
                    eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        if prompt_as == "ids":
            reference = hf.generate(ids, attention_mask=torch.ones_like(ids), **settings)[:, ids.shape[1]:]
        else:  # transformers returns only the new tokens when it is given embeddings alone
            reference = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), **settings)
    assert torch.equal(penalized, reference)
    assert len(set(penalized[0].tolist())) > len(set(plain[0].tolist()))  # fewer repeats than greedy
    if prompt_as == "ids":  # the prompt's tokens are penalized too, which embeddings alone cannot say
        assert not torch.equal(penalized, generate(ours, inputs_embeds=embeds, max_new_tokens=24, repetition_penalty=1.8))


def test_repetition_penalty_ignores_padding_in_a_batch():
    model = tiny_model("llama_tied")
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(1, 101, (n,), generator=g) for n in (8, 3)]
    # The padding holds the token the short row says first: were padding penalized, that row would change.
    first_word = generate(model, prompts[1][None], max_new_tokens=1, repetition_penalty=1.5)[0, 0]
    ids = torch.full((2, 8), int(first_word), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 8 - len(p):], mask[i, 8 - len(p):] = p, 1
    batched = generate(model, ids, mask, max_new_tokens=16, repetition_penalty=1.5)
    for i, p in enumerate(prompts):
        assert torch.equal(batched[i], generate(model, p[None], max_new_tokens=16, repetition_penalty=1.5)[0])
