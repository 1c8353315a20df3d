"""Autoregressive generation with a KV cache: the sampler, and text in / text out on top of it.

    prefill:  the whole (left-padded) prompt in one forward pass, keeping only the last logits
    decode:   one token per step for every row; finished rows keep emitting the pad token

Rows of a batch share the cache's time axis; left padding lives in the attention mask, and
positions come from counting real tokens, so a padded batch generates exactly what each prompt
would alone. The command line (`clara-generate`, `python -m clara.generate`) is clara.generate_cli.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from clara.decoder import Decoder


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """logits [B, V] -> token ids [B]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V] with every token in `seen` (a [B, V] bool mask) made less likely, as CTRL's
    repetition penalty (and transformers' repetition_penalty): a positive logit is divided by the
    penalty, a negative one multiplied by it. penalty 1.0 changes nothing."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def check_repetition_penalty(penalty: float) -> float:
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be positive (1.0: none), got {penalty}")
    return penalty


@torch.no_grad()
def check_generation_request(prompt_tokens: int, context: int, max_new_tokens: int, temperature: float,
                             top_p: float, repetition_penalty: float = 1.0) -> int:
    """The number of new tokens to generate; a ValueError for a request that cannot be served.

    A prompt that fits the model's context but leaves less room than `max_new_tokens` generates
    what fits, with a warning: positions past the context were never trained.
    """
    if prompt_tokens == 0:
        raise ValueError("the prompt is empty: give at least one token to continue from")
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    check_repetition_penalty(repetition_penalty)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_tokens >= context:
        raise ValueError(f"the prompt has {prompt_tokens} tokens but the model's context is {context}: "
                         "shorten the prompt")
    if prompt_tokens + max_new_tokens > context:
        fitting = context - prompt_tokens
        warnings.warn(f"the prompt has {prompt_tokens} tokens of the model's {context}: generating at most "
                      f"{fitting} new tokens instead of {max_new_tokens}", stacklevel=3)
        return fitting
    return max_new_tokens


def generate(
    model: Decoder,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` for each row; returns the new tokens [B, n] (n <= max_new_tokens).

    The prompt is `input_ids` [B, L] or `inputs_embeds` [B, L, E] (CLaRa's memory vectors), with
    `attention_mask` [B, L] marking left padding. A row stops at its first token in `stop_ids`
    (which is kept in the output); after that it is filled with `pad_id`. `on_token` receives the
    tokens [B] of every step, for streaming. `repetition_penalty` > 1 makes the tokens already in a
    row (its prompt ids, not their padding, and the tokens it generated) less likely.
    """
    prompt = input_ids if input_ids is not None else inputs_embeds
    b, l = prompt.shape[:2]
    max_new_tokens = check_generation_request(l, model.config.max_position_embeddings, max_new_tokens,
                                              temperature, top_p, repetition_penalty)
    device = model.device
    if attention_mask is None:
        attention_mask = torch.ones(b, l, dtype=torch.long, device=device)
    cache = model.new_cache(b, l + max_new_tokens)
    out = model(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, logits_to_keep=1)
    seen = None  # [B, V]: the tokens each row holds so far, for the repetition penalty
    if repetition_penalty != 1.0:
        counts = torch.zeros(b, out.logits.shape[-1], dtype=torch.long, device=device)
        if input_ids is not None:
            counts.scatter_add_(1, input_ids, attention_mask.long())  # padding adds 0
        seen = counts > 0
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        token = sample_next(logits, temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        if seen is not None:
            seen[torch.arange(b, device=device), token] = True
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        finished |= torch.isin(token, stop)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones(b, 1, dtype=attention_mask.dtype, device=device)], 1)
        out = model(token[:, None], attention_mask=attention_mask, cache=cache, logits_to_keep=1)
    if not new_tokens:
        return torch.zeros(b, 0, dtype=torch.long, device=device)
    return torch.stack(new_tokens, 1)


def prompt_ids(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a plain prompt, or of a one-turn chat rendered with the model's template."""
    if not chat:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


def generate_text(
    model: Decoder,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    chat: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system: str | None = None,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
) -> str:
    """One prompt in, the generated text out (special tokens dropped)."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt, chat, system)], device=model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    new = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   repetition_penalty=repetition_penalty, stop_ids=tokenizer.stop_ids(), pad_id=tokenizer.pad_id,
                   generator=generator)
    return tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()


if __name__ == "__main__":
    from clara.generate_cli import main

    raise SystemExit(main())
