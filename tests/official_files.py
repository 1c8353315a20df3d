"""An official CLaRa checkpoint written as the official `CLaRa.save_pretrained` writes it, over a
tiny random base in a Hugging Face folder, for the import tests (test_official_import.py,
test_hub_checkpoint.py).

The official directory holds config.json, adapters.pth and decoder_first_last_layers.pth in the
official layout: peft key names, the whole resized embedding with the official token order (<MEM0>..,
<AE>, <ENC>, <SEP> after the base vocabulary). The base is a tiny random Llama (or Mistral) with a
small word-level tokenizer; the official ids and ours differ exactly as they do for a real
checkpoint (ours put <ENC> before <AE>).
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, RANK = 32, 4, 2, 64, 2, 4
HEAD_DIM = HIDDEN // HEADS
# HF module name -> (our module name, out_features, in_features); written out by hand so a wrong
# name map in the code under test cannot agree with itself.
LLAMA_MODULES = {
    "self_attn.q_proj": ("attn.q_proj", HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": ("attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": ("attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": ("attn.o_proj", HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": ("mlp.gate_proj", FFN, HIDDEN),
    "mlp.up_proj": ("mlp.up_proj", FFN, HIDDEN),
    "mlp.down_proj": ("mlp.down_proj", HIDDEN, FFN),
}
N_MEM = 4  # doc_max_length 16 / compr_rate 4
# The official tokenizer's order; ids start at the base tokenizer's length.
OFFICIAL_ORDER = ["<MEM0>", "<MEM1>", "<MEM2>", "<MEM3>", "<AE>", "<ENC>", "<SEP>"]
DOCS = ["Vitamin C is found in citrus fruit.", "Oats are a whole grain with soluble fibre."]


# A Mistral-Instruct chat template in short: user turns in [INST] ... [/INST].
MISTRAL_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                         "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
                         "{% endif %}{% endfor %}")
# model_type -> what its config.json says beyond the Llama fields (Mistral-7B-v0.2 has no sliding window)
ARCHITECTURES = {"llama": {"architectures": ["LlamaForCausalLM"]},
                 "mistral": {"architectures": ["MistralForCausalLM"], "sliding_window": None}}


def write_tokenizer(directory: Path, chat_template: str | None = None) -> int:
    """A small word-level tokenizer.json (the words of DOCS, <s>, </s>) as a Hugging Face folder holds it.

    Returns its vocabulary size.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    words = sorted({w for doc in DOCS for w in re.findall(r"\w+|[^\w\s]", doc)})
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def write_base(directory: Path, tied: bool, model_type: str = "llama") -> Path:
    """A tiny random Llama or Mistral as a Hugging Face directory (config.json, model.safetensors,
    tokenizer); a Mistral's tokenizer has the Instruct chat template."""
    directory.mkdir(parents=True)
    vocab = write_tokenizer(directory, MISTRAL_CHAT_TEMPLATE if model_type == "mistral" else None)
    config = {"model_type": model_type, **ARCHITECTURES[model_type], "vocab_size": vocab,
              "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": tied,
              "bos_token_id": 1, "eos_token_id": 2}
    (directory / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(1)
    state = {"model.embed_tokens.weight": torch.randn(vocab, HIDDEN, generator=g),
             "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g)}
    if not tied:
        state["lm_head.weight"] = 0.2 * torch.randn(vocab, HIDDEN, generator=g)
    for i in range(LAYERS):
        for hf, (_, out_f, in_f) in LLAMA_MODULES.items():
            state[f"model.layers.{i}.{hf}.weight"] = 0.2 * torch.randn(out_f, in_f, generator=g)
        state[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    save_file(state, str(directory / "model.safetensors"))
    return directory


def random_adapter(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(peft state dict in official names, the same tensors under our names)."""
    g = torch.Generator().manual_seed(seed)
    official, ours = {}, {}
    for i in range(LAYERS):
        for hf, (our, out_f, in_f) in LLAMA_MODULES.items():
            a = 0.3 * torch.randn(RANK, in_f, generator=g)
            b = 0.3 * torch.randn(out_f, RANK, generator=g)
            official[f"model.layers.{i}.{hf}.lora_A.weight"] = a
            official[f"model.layers.{i}.{hf}.lora_B.weight"] = b
            ours[f"layers.{i}.{our}.lora_A"] = a
            ours[f"layers.{i}.{our}.lora_B"] = b
    return official, ours


def write_official(directory: Path, base: Path, adapters: dict, *, stage: str = "stage1_2",
                   order: list[str] = OFFICIAL_ORDER, **config_changes):
    """An official checkpoint in base's vocabulary, its added tokens in `order`.

    Returns the official embedding and lm head matrices.
    """
    directory.mkdir(parents=True)
    base_config = json.loads((base / "config.json").read_text())
    vocab, tied = base_config["vocab_size"], base_config["tie_word_embeddings"]
    config = {
        # fields the official CLaRaConfig writes, mapped or knowingly ignored
        "decoder_model_name": str(base), "compr_rate": 4, "doc_max_length": 16, "different_mem_tokens": True,
        "lora": True, "lora_r": RANK, "sep": True, "optimize_mem_tokens": True, "training_stage": stage,
        "generation_top_k": 2, "max_new_tokens": 32, "quantization": "no", "kbtc_training": False,
        "compr_model_name": None, "compr_n_layers": 5, "ae_mode": "token", "lora_r_compressor": RANK,
        "auto_map": {"AutoConfig": "modeling_clara.CLaRaConfig"}, "model_type": "CLaRa",
        "transformers_version": "4.44.0",
    }
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not ...}  # `...` deletes a field
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(adapters, directory / "adapters.pth")

    base_state = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    embedding = torch.cat([base_state["model.embed_tokens.weight"], 5 + torch.randn(len(order), HIDDEN, generator=g)])
    first_last = {"model.embed_tokens.weight": embedding}
    if not tied:
        first_last["lm_head.weight"] = torch.cat([base_state["lm_head.weight"],
                                                  -5 + torch.randn(len(order), HIDDEN, generator=g)])
    torch.save(first_last, directory / "decoder_first_last_layers.pth")
    assert embedding.shape[0] == vocab + len(order)
    return first_last


def official_row(name: str, vocab: int) -> int:
    return vocab + OFFICIAL_ORDER.index(name)
