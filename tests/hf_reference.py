"""Tiny random Hugging Face models of every family we support, and their conversion to ours.

transformers is a test-only dependency: it is the reference our decoder must match.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from clara.config import DecoderConfig
from clara.decoder import Decoder
from clara.weights import assign_state_dict, build_on_meta, convert_hf_state_dict

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256)

# family name -> (transformers config class name, model class name, config overrides)
FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, rope_theta=10000.0)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=1024,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
    "phi4_mini": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=0,
        max_position_embeddings=512, original_max_position_embeddings=64,
        rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(6)],
                          long_factor=[2.0 + 0.5 * i for i in range(6)]))),
    "phi2": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5, hidden_act="gelu_new")),
    "smollm2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                       rope_theta=100000.0, rms_norm_eps=1e-5)),
}


def make_pair(family: str, seed: int = 0) -> tuple[torch.nn.Module, Decoder]:
    """A random HF model of `family` and our Decoder holding the same weights (fp32, eval)."""
    import transformers

    cfg_name, model_name, overrides = FAMILIES[family]
    hf_cfg = getattr(transformers, cfg_name)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    hf = getattr(transformers, model_name)(hf_cfg).eval()
    # Random init of biases and norm weights is zero/one by default; perturb everything so a
    # wrongly mapped or ignored tensor shows up in the logits.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours_cfg = DecoderConfig.from_hf(hf_cfg.to_dict())
    state = convert_hf_state_dict(dict(hf.state_dict()), ours_cfg)
    ours = assign_state_dict(build_on_meta(ours_cfg), {k: v.clone() for k, v in state.items()}, family).eval()
    return hf, ours


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = 1
        ids[i, : t - n] = 0
    return ids, mask


def reference_from_ours(ours) -> nn.Module:
    """transformers' Llama with exactly our weights (our names mapped back to theirs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = ours.config
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    state = {}
    for name, tensor in ours.state_dict().items():
        name = name.replace(".attn.", ".self_attn.").replace("input_norm", "input_layernorm")
        name = name.replace("post_attention_norm", "post_attention_layernorm")
        state["model." + name] = tensor
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)  # rebuild its buffers off the meta device
    return hf.eval()
