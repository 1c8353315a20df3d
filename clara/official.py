"""Import a checkpoint written by the official CLaRa release as a Clara, and `clara-import` (also
`python -m clara.official`).

    model = import_official_checkpoint("clara-stage2-ckpt", base="mistralai/Mistral-7B-Instruct-v0.2")
    python -m clara.official clara-stage2-ckpt converted/ --base /models/Mistral-7B-Instruct-v0.2

The official format and its conversion are in clara.official_format (the files, the .pth reading
with weights_only=True, the key and token-row mapping). Clara.from_pretrained also takes an
official folder or a hub checkpoint ("apple/CLaRa-7B-Instruct:compression-16") directly, and
caches the conversion (clara.checkpoint.resolve_checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from clara.command import CommandParser, command_main
from clara.model import Clara
from clara.official_format import (
    ADAPTERS_FILE,
    CONFIG_FILE,
    EMBEDDINGS_FILE,
    OfficialCheckpointError,
    OfficialConfig,
    convert_adapter_state_dict,
    convert_official_checkpoint,
    load_weights_only,
    read_official_config,
)
from clara.weights import DTYPES

__all__ = ["ADAPTERS_FILE", "CONFIG_FILE", "EMBEDDINGS_FILE", "OfficialCheckpointError", "OfficialConfig",
           "convert_adapter_state_dict", "import_official_checkpoint", "load_weights_only", "main",
           "read_official_config"]


def import_official_checkpoint(path: str | os.PathLike, *, base: str | None = None, base_model=None,
                               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                               quantize: str | None = None) -> Clara:
    """An official CLaRa checkpoint directory -> our Clara.

    base: the base model to load (default: config.json's decoder_model_name): a Hugging Face
        directory, hub id, GGUF file or `smollm2-135m`.
    base_model: an already loaded (decoder, tokenizer) pair instead (tests, custom bases); both are
        modified in place.
    quantize: "nf4" or "int8" stores the base's block weights quantized (clara/quant.py).
    """
    return convert_official_checkpoint(path, Clara, base=base, base_model=base_model, dtype=dtype, device=device,
                                       quantize=quantize)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="clara-import",
        description="Convert an official CLaRa checkpoint directory (config.json, adapters.pth, "
                    "decoder_first_last_layers.pth) into a Clara checkpoint. The .pth files are read with "
                    "torch.load(weights_only=True) only.",
    )
    p.add_argument("src", metavar="SRC", help="the official checkpoint directory")
    p.add_argument("dst", metavar="DST", help="where to write the Clara checkpoint: a new folder, or an existing one whose clara.json and .safetensors files are replaced (its other files are left alone)")
    p.add_argument("--base", default=None,
                   help="base model to load instead of config.json's decoder_model_name: a Hugging Face "
                        "directory, a hub repo id, a .gguf file or 'smollm2-135m'")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the loaded base and of the saved adapters and rows (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device for the conversion, e.g. cpu, cuda (default cpu)")
    return p


@command_main("clara-import")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    official = read_official_config(args.src)
    model = import_official_checkpoint(args.src, base=args.base, dtype=DTYPES[args.dtype], device=args.device)
    model.save_pretrained(args.dst)
    cfg = model.config
    print(f"[clara.official] {args.src} -> {args.dst}: base {model.base_name!r}, stage {cfg.training_stage}, "
          f"adapters {model.adapter_names}, compress_rate {cfg.compress_rate}, doc_max_length {cfg.doc_max_length}, "
          f"{cfg.n_mem_tokens} memory tokens", file=sys.stderr)
    for note in official.notes:
        print(f"[clara.official] note: {note}", file=sys.stderr)
    if official.ignored:
        print(f"[clara.official] config.json fields with no effect here: {', '.join(official.ignored)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
