"""Does the decoder read the memory? Answer NLL of stage1 QA rows with the memory slots filled five ways.

    python bench/memory_probe.py --model CHECKPOINT_OR_BASE --data STAGE1_FILE [--rows 4] [--json OUT]

For each of the first --rows QA rows (one document each) of --data, the mean NLL of the answer with
the slots holding:

  own          the row's own memory vectors (what the model is trained on)
  shuffled     the next row's memory vectors: a decoder that reads content does worse here
  zero         zeros: the slots carry nothing
  scaled_0.1   the own vectors times 0.1: tells direction from scale (the first RMSNorm of every
               block removes scale from what attention reads, not from the residual stream)
  doc_tokens   the input embeddings of the document's first n_mem tokens: an untrained "memory" that
               carries content in the decoder's own input space

and the mean norm of the memory vectors beside that of the token embeddings. A model whose `own`
equals `shuffled` ignores the memory, whatever its training loss says. --model is a checkpoint
folder, or a base model name (e.g. smollm2-135m) for a fresh Clara with untrained adapters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clara import Clara
from clara.data.formats import read_stage_file
from clara.prompts import prompt_for_example
from clara.recipes.nll import _row_nll


def slot_fillings(model: Clara, examples) -> dict[str, torch.Tensor]:
    memory = model.compress_documents([e.docs[0] for e in examples]).unsqueeze(1)  # [B, 1, n_mem, E]
    n_mem = memory.shape[2]
    table = model.decoder.embed_tokens.weight
    doc_tokens = torch.stack([table[torch.tensor(model.tokenizer.encode(e.docs[0], add_bos=False)[:n_mem])]
                              for e in examples]).unsqueeze(1)
    return {"own": memory, "shuffled": torch.roll(memory, 1, dims=0), "zero": torch.zeros_like(memory),
            "scaled_0.1": memory * 0.1, "doc_tokens": doc_tokens}


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Clara checkpoint folder, or a base model name")
    p.add_argument("--data", type=Path, required=True, help="a stage1 JSONL file; its QA rows are read")
    p.add_argument("--rows", type=int, default=4, help="how many QA rows (at least 2; default 4)")
    p.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = p.parse_args()
    torch.manual_seed(0)
    model = Clara.from_pretrained(args.model) if Path(args.model).is_dir() else Clara.from_base(args.model)
    model.eval()
    examples = [e for e in read_stage_file(args.data, "stage1") if e.data_type == "qa" and len(e.docs) == 1]
    examples = examples[:args.rows]
    if len(examples) < 2:
        raise SystemExit(f"{args.data}: needs at least 2 QA rows with one document, found {len(examples)}")
    fillings = slot_fillings(model, examples)
    prompts = [prompt_for_example(e, model.tokenizer, model.config, model.rng, model.texts) for e in examples]
    result = {"model": args.model, "data": str(args.data), "rows": len(examples),
              "memory_norm": fillings["own"].norm(dim=-1).mean().item(),
              "token_embedding_norm": model.decoder.embed_tokens.weight.norm(dim=-1).mean().item(), "nll": {}}
    print(f"mean norm: memory vectors {result['memory_norm']:.2f}, token embeddings "
          f"{result['token_embedding_norm']:.2f}")
    for name, memory in fillings.items():
        per_row = _row_nll(model, prompts, memory)
        result["nll"][name] = {"mean": sum(per_row) / len(per_row), "per_row": per_row}
        print(f"{name:>11}  mean {result['nll'][name]['mean']:.4f}  rows {' '.join(f'{v:.3f}' for v in per_row)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
