"""Tiny random models that many test files build: decoders of every family, and Clara over
SmolLM2's real tokenizer. Values are drawn from seeded generators, so a seed rebuilds the same model.
"""

from __future__ import annotations

import copy
import functools
import itertools

import torch

from clara.config import ClaraConfig, DecoderConfig
from clara.data.formats import Stage1_2Example, Stage1Example, Stage2Example
from clara.decoder import Decoder
from clara.lora import lora_layers
from clara.model import DECODER, ENCODER, QUERY, Clara

# ---------------------------------------------------------------------------------------------
# Decoders of each family (vocab 101, hidden 48)
# ---------------------------------------------------------------------------------------------
FAMILY_CONFIGS = {
    "llama_tied": dict(tie_word_embeddings=True, num_key_value_heads=2),
    "mistral_window": dict(num_key_value_heads=2, sliding_window=8),
    "phi3_fused": dict(fused_qkv=True, fused_gate_up=True, partial_rotary_factor=0.5),
    "phi2_parallel": dict(norm="layernorm", mlp="gelu", parallel_residual=True, attention_bias=True,
                          attention_out_bias=True, mlp_bias=True, lm_head_bias=True, partial_rotary_factor=0.5),
}


def random_tiny_decoder(overrides: dict, seed: int = 0, std: float = 0.3, max_positions: int = 256) -> Decoder:
    """A 2-layer decoder (vocab 101, hidden 48) with every parameter drawn from N(0, std)."""
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=max_positions, **overrides)
    model = Decoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def conditioned_tiny_model(family: str, seed: int) -> Decoder:
    """A tiny random decoder with weights of std 0.05, norms at one and embeddings of std 0.3: its
    logits are spread enough to learn from and to compare, and stable (no exploding activations)."""
    model = random_tiny_decoder(FAMILY_CONFIGS[family], seed=seed, std=0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
        model.embed_tokens.weight.mul_(6.0)
    return model


def tiny_model(family: str, seed: int = 0) -> Decoder:
    # std 0.3 gives peaky logits: greedy choices are far from ties.
    return random_tiny_decoder(FAMILY_CONFIGS[family], seed, std=0.3)


HIDDEN = 48
# n_mem = 16 / 4 = 4 memory vectors per document; no dropout, so every forward pass is deterministic.
TINY = dict(compress_rate=4, doc_max_length=16, lora_r=4, lora_dropout=0.0, generation_top_k=2)


def greedy_by_recompute(model, ids, n):
    """n greedy tokens by recomputing the whole sequence each step: the no-cache reference."""
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
    return out[:, ids.shape[1]:]


# ---------------------------------------------------------------------------------------------
# Tiny CLaRa models over SmolLM2's real tokenizer
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _pristine_tokenizer():
    from clara.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m")


def fresh_tokenizer():
    """SmolLM2's tokenizer without CLaRa's tokens (a copy: Clara adds its tokens in place)."""
    return copy.deepcopy(_pristine_tokenizer())


@functools.lru_cache(maxsize=1)
def shared_tokenizer():
    """One copy that every model of this file extends in place: a copy costs about 0.3 s, and a
    token that is already there keeps its id, so models with other n_mem only add rows they ignore.
    (Checkpoint tests need fresh_tokenizer: the base fingerprint counts the tokenizer's size.)"""
    return fresh_tokenizer()


def tiny_base(seed: int = 0, tied: bool = True, hidden: int = HIDDEN, tokenizer=None) -> tuple[Decoder, object]:
    """(decoder, tokenizer): a 2-layer random decoder over SmolLM2's 49152 tokens.

    The same seed gives the same weights, so a test can rebuild "the same base" from scratch.
    tokenizer: default a fresh copy of SmolLM2's.
    """
    tokenizer = tokenizer if tokenizer is not None else fresh_tokenizer()
    cfg = DecoderConfig(vocab_size=len(_pristine_tokenizer()), hidden_size=hidden, intermediate_size=80,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, tie_word_embeddings=tied)
    with torch.device("meta"):  # skip the default initialisation: every value is drawn below
        decoder = Decoder(cfg)
    decoder.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return decoder.eval(), tokenizer


def tiny_clara(stage: str = "stage1", seed: int = 0, tied: bool = True, **overrides) -> Clara:
    decoder, tokenizer = tiny_base(seed, tied, tokenizer=shared_tokenizer())
    torch.manual_seed(seed)  # the LoRA A factors are drawn from the global generator
    return Clara.from_decoder(decoder, tokenizer, ClaraConfig(**{**TINY, "training_stage": stage, **overrides}))


@torch.no_grad()
def randomize(model: Clara, seed: int, adapters=(ENCODER, DECODER, QUERY), factors=("lora_B",),
              memory: bool = False, std: float = 0.2) -> None:
    """Give adapters (and the memory embeddings) values a training run could have produced.

    lora_B starts at zero, so at initialisation every lora_A gradient is exactly zero (dL/dA = B^T ...)
    and no test could tell a frozen A from a trained one; drawing B at random fixes that.
    """
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model.decoder).values():
        for name in adapters:
            if name in layer.adapters:
                for factor in factors:
                    p = getattr(layer.adapters[name], factor)
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    if memory:
        model.memory_embeddings.copy_(torch.randn(model.memory_embeddings.shape, generator=g) * 0.3)


DOCS = ("Iron carries oxygen in the blood. Red meat and beans are rich in iron.",
        "Vitamin C helps the body absorb iron from plants.",
        "Calcium builds bones; dairy and kale provide it.")
EXAMPLES = {
    "stage1": [
        Stage1Example("qa", ("What does iron do?", "Where is iron found?"),
                      ("It carries oxygen.", "In red meat and beans."), (DOCS[0],)),
        Stage1Example("paraphrase", (), (DOCS[1],), (DOCS[1],)),
    ],
    "stage1_2": [
        Stage1_2Example("What carries oxygen?", (DOCS[0], DOCS[2]), "Iron.", ("Iron",)),
        Stage1_2Example("Which foods give calcium, and what does it build?", (DOCS[2], DOCS[1]),
                        "Dairy and kale; it builds bones.", ("dairy",)),
    ],
    "stage2": [
        Stage2Example("What carries oxygen?", DOCS, "Iron.", ("Iron",), (0,)),
        Stage2Example("What builds bones?", (DOCS[2], DOCS[0], DOCS[1]), "Calcium.", ("Calcium",), (0,)),
    ],
    "stage2_pretrain_retrieval": [
        Stage2Example("What carries oxygen?", DOCS, "Iron.", ("Iron",), (0, 1)),  # two positives
        Stage2Example("What builds bones?", (DOCS[2], DOCS[0], DOCS[1]), "Calcium.", ("Calcium",), (0,)),
    ],
}
STAGES = list(EXAMPLES)

# What each stage trains, written out independently of clara/model.py's tables.
PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj")
TRAINS = {
    "stage1": (ENCODER, DECODER),
    "stage1_2": (ENCODER, DECODER),
    "stage2": (QUERY, DECODER),
    "stage2_pretrain_retrieval": (QUERY,),
}


def expected_trained(stage: str) -> set[str]:
    names = {f"decoder.layers.{i}.{proj}.adapters.{adapter}.lora_{factor}"
             for i, proj, adapter, factor in itertools.product(range(2), PROJECTIONS, TRAINS[stage], "AB")}
    # The memory-token rows train in stage1 only, as in the official release.
    return names | ({"memory_embeddings"} if stage == "stage1" else set())


