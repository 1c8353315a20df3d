"""bench/plot_compression_rate.py on made-up runs: both charts drawn, and the table's derived
columns (retained, own vs no docs) computed from the scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_charts_and_table_from_runs_and_scores(tmp_path):
    runs, scores = tmp_path / "runs", tmp_path / "eval"
    scores.mkdir()
    for rate, final in ((8, 2.0), (32, 2.4)):
        (runs / f"cr{rate}").mkdir(parents=True)
        rows = [{"step": s, "loss": final + 1.0 / s} for s in range(1, 31)]
        (runs / f"cr{rate}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    nll = {"nll_compressed": 2.0, "nll_shuffled": 2.1, "nll_no_context": 2.5, "nll_full_text": 0.5}
    (scores / "cr8_dev40.metrics.json").write_text(json.dumps({"metrics": {"nll": nll}}))
    (scores / "cr32_dev40.metrics.json").write_text(json.dumps({"metrics": {"nll": {**nll, "nll_compressed": 2.3}}}))
    done = subprocess.run([sys.executable, "bench/plot_compression_rate.py", "--runs", str(runs), "--eval", str(scores),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cr_loss.png", "cr_nll.png"]
    table = [line for line in done.stdout.splitlines() if line.startswith("| 8 ") or line.startswith("| 32 ")]
    # retained (2.5 - 2.0) / (2.5 - 0.5) = 0.250, 20 % below no docs; loss: 2.0 + the mean of 1/21 .. 1/30
    assert table[0] == "| 8 | 32 | 2.040 | 2.0000 | 2.1000 | 2.5000 | 0.5000 | 0.250 | −20.0 % |"
    assert table[1].startswith("| 32 | 8 | 2.440 | 2.3000 |") and table[1].endswith("| 0.100 | −8.0 % |")
