"""The charts of docs/results.md, drawn from the runs' metrics.jsonl and clara-eval's JSON files.

    python bench/plot_results.py --runs RUNS_DIR --eval EVAL_DIR --out docs

RUNS_DIR holds the training runs (stage1/, stage1_2/ ...), each with its metrics.jsonl; EVAL_DIR
holds clara-eval outputs named MODEL_DATA.metrics.json. Writes, for every run, loss_<stage>.png
(the loss per step with a 20-step moving average), nll.png (answer NLL by condition, one group
per evaluation made with --nll) and recall.png (recall@1, recall@5 and MRR of every stage2
evaluation and of each BM25 baseline, `clara-data bm25 --out DIR`'s JSON, named in EVAL_DIR).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clara.recipes.plot import write_bar_chart_png, write_loss_curve_png

RETRIEVAL = {"recall@1": "recall@1", "recall@5": "recall@5", "mrr": "MRR"}
CONDITIONS = {"nll_compressed": "own docs, compressed", "nll_shuffled": "another row's docs",
              "nll_no_context": "no docs", "nll_full_text": "full text"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="folder of training run folders")
    p.add_argument("--eval", type=Path, required=True, help="folder of clara-eval outputs")
    p.add_argument("--out", type=Path, default=Path("docs"), help="where the PNG files go (default docs)")
    args = p.parse_args()
    for metrics in sorted(args.runs.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        steps = [r for r in rows if "loss" in r]
        stage = metrics.parent.name
        out = write_loss_curve_png(args.out / f"loss_{stage}.png", [r["step"] for r in steps],
                                   [r["loss"] for r in steps], f"{stage} training loss", smooth=20)
        print(out)
    groups = {}
    for path in sorted(args.eval.glob("*.metrics.json")):
        nll = json.loads(path.read_text())["metrics"].get("nll")
        if nll and all(c in nll for c in CONDITIONS):
            groups[path.name.removesuffix(".metrics.json")] = {label: nll[c] for c, label in CONDITIONS.items()}
    if groups:
        print(write_bar_chart_png(args.out / "nll.png", {}, "answer NLL on held-out rows (lower is better)",
                                  "mean NLL per answer token (nats)", groups=groups))
    rankers = {}
    for path in sorted(args.eval.glob("*.json")):
        found = json.loads(path.read_text())
        if isinstance(found, list) and found and "k1" in found[0]:  # clara-data bm25's summary
            rankers[path.stem] = found[0]["metrics"]
        elif isinstance(found, dict) and "retrieval" in found.get("metrics", {}):
            rankers[path.name.removesuffix(".metrics.json")] = found["metrics"]["retrieval"]
    if rankers:
        groups = {name: {label: m[key] for key, label in RETRIEVAL.items()} for name, m in rankers.items()}
        print(write_bar_chart_png(args.out / "recall.png", {}, "retrieval over 20 candidates (higher is better)",
                                  "score", groups=groups))


if __name__ == "__main__":
    main()
