"""Learning-rate schedules, step by optimizer step, as the official CLI gets them from transformers.

With W = ceil(warmup_ratio * total_steps) warmup steps and progress p = (step - W) / max(1, total - W):

    warmup (step < W):     lr = base_lr * (step + 1) / W    (the first update already learns)
    cosine_with_min_lr:    lr = base_lr * (m + (1 - m) * (1 + cos(pi p)) / 2),   m = min_lr_ratio
    cosine:                the same with m = 0
    linear:                lr = base_lr * max(0, (total - step) / max(1, total - W))
    constant_with_warmup:  lr = base_lr after warmup
    constant:              lr = base_lr always (no warmup)

`step` counts optimizer steps already taken, so the first update uses lr_at(0) = base_lr / W.
transformers' warmup starts at 0, so the official run's first update changes nothing; ours
reaches base_lr one step earlier (docs/official-differences.md). The loop computes
the lr from the step count alone, so a resumed run needs no scheduler state. The official CLI
passes min_lr = 0.1 * learning_rate, hence min_lr_ratio = 0.1. Past total_steps the cosine stays at
its end value (transformers' would climb again).
"""

from __future__ import annotations

import math


from clara.recipes.args import LR_SCHEDULERS


# The official CLI passes min_lr = 0.1 * learning_rate to its cosine schedule.
OFFICIAL_MIN_LR_RATIO = 0.1


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1,
              kind: str = "cosine_with_min_lr") -> float:
    """The multiplier of the base learning rate after `step` optimizer steps."""
    if kind not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr schedule {kind!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    if step < 0 or total_steps < 1:
        raise ValueError(f"need step >= 0 and total_steps >= 1, got step={step}, total_steps={total_steps}")
    if kind == "constant":
        return 1.0
    warm = warmup_steps(total_steps, warmup_ratio)
    if step < warm:
        return (step + 1) / warm
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine":
        return cosine
    return cosine * (1.0 - min_lr_ratio) + min_lr_ratio


def lr_at(step: int, total_steps: int, base_lr: float, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1,
          kind: str = "cosine_with_min_lr") -> float:
    return base_lr * lr_factor(step, total_steps, warmup_ratio, min_lr_ratio, kind)
