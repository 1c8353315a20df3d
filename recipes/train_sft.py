"""Train CLaRa: `python -m clara.recipes.train_sft --stage stage1|stage1_2|stage2|stage2_pretrain_retrieval ...`

The flags are those of the official release's train_sft.py (see `--help`), so its published command
lines run as written; DeepSpeed-only flags are accepted and ignored. Several processes:
`torchrun --nproc_per_node N -m clara.recipes.train_sft ...` (DDP, or FSDP2 with --zero_stage 2/3).
`--dry_run` prints the memory plan of the configuration and exits without loading weights.
"""

from __future__ import annotations

import os
import sys

from clara.command import INTERRUPTED, command_main
from clara.recipes.args import parse_args


@command_main("clara-train")
def main(argv: list[str] | None = None) -> int:
    # Growable CUDA segments instead of fixed-size blocks: the micro-batches' shapes vary, and
    # fixed blocks fragment the cache enough to fail a batch that the planner allows
    # (docs/memory-planner.md). Read at the first CUDA allocation, so it must be set before; a
    # value the user set is kept.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = parse_args(argv)
    if args.dry_run:
        from clara.recipes.planner import plan_from_args

        print(plan_from_args(args))
        return 0
    from clara.recipes.loop import train

    result = train(args)
    return INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
