"""The compression-rate charts of docs/results.md: runs of one config that differ only in
--compress_rate, each scored with `clara-eval --nll` on the same held-out rows.

    python bench/plot_compression_rate.py --runs RUNS_DIR --eval EVAL_DIR --out docs

RUNS_DIR holds the runs as cr<RATE>/ (each with its metrics.jsonl); EVAL_DIR holds their scores as
cr<RATE>_<DATA>.metrics.json. Writes cr_loss.png (training loss per step, a 10-step mean, one line
a rate) and cr_nll.png (held-out answer NLL against the rate: own document compressed, another
row's, no document and full text), and prints the table docs/results.md quotes.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from clara.recipes.plot import write_line_chart_png

CONDITIONS = {"nll_compressed": "own docs, compressed", "nll_shuffled": "another row's docs",
              "nll_no_context": "no docs", "nll_full_text": "full text"}
SMOOTH = 10


def moving_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[i - window + 1:i + 1]) / window for i in range(window - 1, len(values))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="folder holding the cr<RATE>/ run folders")
    p.add_argument("--eval", type=Path, required=True, help="folder holding cr<RATE>_*.metrics.json")
    p.add_argument("--out", type=Path, default=Path("docs"), help="where the PNG files go (default docs)")
    args = p.parse_args()

    losses = {}
    for metrics in args.runs.glob("cr*/metrics.jsonl"):
        rate = re.fullmatch(r"cr(\d+)", metrics.parent.name)
        if rate:
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            losses[int(rate.group(1))] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    scores = {}
    for path in args.eval.glob("cr*_*.metrics.json"):
        rate = re.match(r"cr(\d+)_", path.name)
        nll = json.loads(path.read_text())["metrics"].get("nll")
        if rate and nll and all(c in nll for c in CONDITIONS):
            scores[int(rate.group(1))] = nll
    if not losses and not scores:
        raise SystemExit(f"no cr<RATE> runs in {args.runs} and no cr<RATE>_*.metrics.json in {args.eval}")

    if losses:
        lines = {}
        for rate in sorted(losses):
            steps, values = zip(*losses[rate])
            lines[f"CR {rate}"] = (list(steps[SMOOTH - 1:]), moving_mean(list(values), SMOOTH))
        print(write_line_chart_png(args.out / "cr_loss.png", lines, f"compressor pretraining by compression rate "
                                   f"({SMOOTH}-step mean)", "optimizer step", "reconstruction loss"))
    if scores:
        rates = sorted(scores)
        lines = {label: (rates, [scores[r][c] for r in rates]) for c, label in CONDITIONS.items()}
        print(write_line_chart_png(args.out / "cr_nll.png", lines, "held-out answer NLL by compression rate",
                                   "compression rate (document tokens per memory vector)", "mean NLL per token (nats)",
                                   log2_x=True, markers=True))
    print("| CR | memory vectors per 256 tokens | last 10 steps' loss | own docs | another row's | no docs | "
          "full text | retained | own vs no docs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rate in sorted(set(losses) | set(scores)):
        tail = [v for _, v in losses.get(rate, [])][-SMOOTH:]
        loss = f"{sum(tail) / len(tail):.3f}" if tail else ""
        s = scores.get(rate)
        if s is None:
            print(f"| {rate} | {256 // rate} | {loss} | | | | | | |")
            continue
        retained = (s["nll_no_context"] - s["nll_compressed"]) / (s["nll_no_context"] - s["nll_full_text"])
        lower = (s["nll_no_context"] - s["nll_compressed"]) / s["nll_no_context"]
        print(f"| {rate} | {256 // rate} | {loss} | {s['nll_compressed']:.4f} | {s['nll_shuffled']:.4f} | "
              f"{s['nll_no_context']:.4f} | {s['nll_full_text']:.4f} | {retained:.3f} | −{100 * lower:.1f} % |")


if __name__ == "__main__":
    main()
