"""CLaRa in pure PyTorch: documents compressed into memory vectors by one decoder, which then
retrieves over those vectors and generates from them, trained end to end.

    from clara import Clara, ClaraConfig
    model = Clara.from_base("smollm2-135m", ClaraConfig(compress_rate=32, doc_max_length=256))
    memory = model.compress_documents(["Kale is rich in vitamin K."])      # [1, 8, hidden]

The pieces: `clara.decoder` (the transformer), `clara.weights` / `clara.tokenizer` (loading a
base), `clara.lora` (named adapters on one frozen base), `clara.compressor`, `clara.topk`
(differentiable top-k), `clara.retrieval` (scores and `MemoryIndex`), `clara.model` (`Clara`).
The folders kernels/, data/ and recipes/ of the source tree are `clara.kernels`, `clara.data`
and `clara.recipes`.
"""

import importlib

# Names resolve on first use, so `import clara.data.validate` does not pay for torch and the
# model, and `python -m clara.generate` does not find its own module already imported.
_EXPORTS = {
    "Clara": "clara.model",
    "ClaraBatch": "clara.model",
    "ClaraConfig": "clara.config",
    "DecoderConfig": "clara.config",
    "Decoder": "clara.decoder",
    "KVCache": "clara.decoder",
    "MemoryIndex": "clara.retrieval",
    "Tokenizer": "clara.tokenizer",
    "load_tokenizer": "clara.tokenizer",
    "WeightsError": "clara.weights",
    "extend_vocabulary": "clara.weights",
    "load_base": "clara.weights",
    "generate_text": "clara.generate",
    "differentiable_topk": "clara.topk",
    "apply_lora": "clara.lora",
    "use_adapter": "clara.lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clara' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
