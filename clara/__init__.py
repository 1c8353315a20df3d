"""CLaRa in pure PyTorch: the decoder, its weights and tokenizer, generation.

    from clara import load_base, generate_text
    model, tokenizer = load_base("smollm2-135m")
    print(generate_text(model, tokenizer, "What is the capital of France?"))
"""

from clara.config import ClaraConfig, DecoderConfig
from clara.decoder import Decoder, KVCache
from clara.tokenizer import Tokenizer, load_tokenizer
from clara.weights import WeightsError, extend_vocabulary, load_base

__all__ = [
    "ClaraConfig", "Decoder", "DecoderConfig", "KVCache", "Tokenizer", "WeightsError",
    "extend_vocabulary", "generate_text", "load_base", "load_tokenizer",
]


def __getattr__(name):
    # Imported lazily so `python -m clara.generate` does not find its module already imported.
    # (`clara.generate` itself is the module; the function is `clara.generate.generate`.)
    if name == "generate_text":
        import importlib

        return getattr(importlib.import_module("clara.generate"), name)
    raise AttributeError(f"module 'clara' has no attribute {name!r}")
