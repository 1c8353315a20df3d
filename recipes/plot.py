"""Charts as PNG files, drawn with matplotlib (its Agg backend: no display needed).

    write_loss_curve_png("runs/stage1/loss_curve.png", steps, losses, "stage1 training loss")
    write_bar_chart_png("docs/nll.png", {"compressed": 1.9, "no context": 2.3}, "answer NLL", "nats")

metrics.jsonl stays the source of truth; these pictures are drawn from it and can be redrawn.
Writes are atomic (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import math
import textwrap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{path.stem}.{os.getpid()}.png")
    try:
        figure.savefig(tmp, dpi=100, metadata={"Title": figure.axes[0].get_title()})
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)
    return path


def write_loss_curve_png(path: str | Path, steps: Sequence[float], losses: Sequence[float], title: str,
                         smooth: int = 0, ylabel: str = "loss") -> Path:
    """Loss against optimizer step; with `smooth` > 1 a moving average over that many steps is
    drawn over the raw curve. Non-finite values are left out (they break the line)."""
    if len(steps) != len(losses):
        raise ValueError(f"{len(steps)} steps but {len(losses)} losses")
    values = [v if math.isfinite(v) else math.nan for v in map(float, losses)]
    if not any(math.isfinite(v) for v in values):
        raise ValueError("no finite (step, loss) point to plot")
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    axes.plot(steps, values, color="tab:blue", linewidth=1, alpha=0.5 if smooth > 1 else 1.0, label="per step")
    if smooth > 1 and len(values) >= smooth:
        window = [sum(values[i - smooth + 1:i + 1]) / smooth for i in range(smooth - 1, len(values))]
        axes.plot(steps[smooth - 1:], window, color="tab:blue", linewidth=2, label=f"mean of {smooth} steps")
        axes.legend()
    axes.set_title(title)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def write_bar_chart_png(path: str | Path, bars: Mapping[str, float], title: str, ylabel: str,
                        groups: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Bars with their values written on top. `groups` ({group: {bar: value}}) draws grouped bars
    (one colour per bar name) instead of the single series `bars`."""
    series = groups if groups is not None else {"": bars}
    names = list(dict.fromkeys(name for values in series.values() for name in values))
    if not names:
        raise ValueError("no bar to draw")
    # Wider for many groups, and long group names wrapped, so tick labels never run into each other.
    figure, axes = plt.subplots(figsize=(max(6.4, 1.3 * len(series) + 1.5), 4.0))
    width = 0.8 / len(names) if groups is not None else 0.6
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width if groups is not None else j for i in range(len(series))]
        heights = [values.get(name, math.nan) for values in series.values()]
        drawn = axes.bar(xs, heights, width, label=name if groups is not None else None)
        axes.bar_label(drawn, fmt="%.3g", fontsize=8)
    if groups is not None:
        axes.set_xticks(range(len(series)), [textwrap.fill(g, 14) for g in series], fontsize=9)
        axes.legend(fontsize=8, framealpha=0.9)
    else:
        axes.set_xticks(range(len(names)), names)
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def write_line_chart_png(path: str | Path, lines: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str,
                         xlabel: str, ylabel: str, *, log2_x: bool = False, markers: bool = False) -> Path:
    """One line per entry of `lines` ({label: (xs, ys)}), with a legend; `log2_x` spaces the x axis
    by powers of two and labels the given x values (compression rates)."""
    if not lines:
        raise ValueError("no line to draw")
    for label, (xs, ys) in lines.items():
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"line {label!r}: {len(xs)} x values and {len(ys)} y values")
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for label, (xs, ys) in lines.items():
        axes.plot(xs, ys, marker="o" if markers else None, linewidth=1.5, label=label)
    if log2_x:
        axes.set_xscale("log", base=2)
        ticks = sorted({x for xs, _ in lines.values() for x in xs})
        axes.set_xticks(ticks, [f"{x:g}" for x in ticks])
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, framealpha=0.9)
    figure.tight_layout()
    return _save(figure, path)
