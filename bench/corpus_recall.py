"""Retrieval over a whole corpus, as NutriBot searches: each stage2 dev question against every
distinct document of the file, by the checkpoint's query reasoner and by BM25.

    python bench/corpus_recall.py --model checkpoints/nutribot-smollm2 --data data/kb_k3/stage2_dev.jsonl

The corpus is every distinct candidate of the file (for the knowledge base: all its passages); a
question's positives are its row's pos_index documents. Prints recall@1/@5/@20 and MRR of both.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from clara.data.bm25 import BM25Index
from clara.data.formats import read_stage_file
from clara.lora import copy_adapter
from clara.model import QUERY, Clara
from clara.retrieval import MemoryIndex
from clara.stages import ENCODER


def scores_of(rankings: list[list[int]], positives: list[set[int]]) -> dict[str, float]:
    first = [next((r + 1 for r, i in enumerate(ranking) if i in pos), None) for ranking, pos in zip(rankings, positives)]
    out = {f"recall@{k}": float(np.mean([f is not None and f <= k for f in first])) for k in (1, 5, 20)}
    out["mrr"] = float(np.mean([1.0 / f if f else 0.0 for f in first]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Clara checkpoint (one without a query reasoner uses its compressor)")
    p.add_argument("--data", required=True, help="stage2 file: question, docs, pos_index")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()

    rows = read_stage_file(args.data, "stage2")
    corpus = list(dict.fromkeys(d for r in rows for d in r.docs))
    where = {d: i for i, d in enumerate(corpus)}
    positives = [{where[r.docs[i]] for i in r.pos_index} for r in rows]
    questions = [r.question for r in rows]

    model = Clara.from_pretrained(args.model).eval()
    if QUERY not in model.adapter_names:
        copy_adapter(model.decoder, ENCODER, QUERY)
    memory = model.compress_documents(corpus)
    index = MemoryIndex(memory.shape[1], memory.shape[2])
    index.add(memory, [str(i) for i in range(len(corpus))])
    with torch.no_grad():
        _, found = index.search(model.query_vectors(questions), top_n=len(corpus))
    clara = scores_of(found.tolist(), positives)

    bm25 = BM25Index(corpus)
    bm25_rankings = [np.argsort(-bm25.scores(q), kind="stable").tolist() for q in questions]
    baseline = scores_of(bm25_rankings, positives)

    result = {"data": args.data, "model": args.model, "questions": len(rows), "corpus": len(corpus),
              "clara": clara, "bm25": baseline}
    print(f"{len(rows)} questions against {len(corpus)} documents")
    for name, figures in (("query reasoner", clara), ("BM25", baseline)):
        print(f"  {name:15s} " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
