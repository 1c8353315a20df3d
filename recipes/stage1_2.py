"""Stage 1_2, instruction tuning: `python -m clara.recipes.stage1_2 CONFIG [--flag value ...]`.

Data: stage1_2 rows, a question with its k documents and the answer.
Trains: the encoder adapter and a fresh decoder adapter on the stage-1 compressor (a stage-1
checkpoint's decoder adapter is not loaded: the generator learns to answer questions from the
memory of k documents, a new task); the memory-token rows stay as stage 1 left them.
Loss: cross-entropy over the answer tokens (+ 0.1 x MSE with mse_loss).
The run: clara.recipes.loop.train; CONFIG's pretrain names the stage-1 checkpoint (or run folder).
"""

from __future__ import annotations

import sys

from clara.command import command_main
from clara.recipes.stage_config import run_stage

STAGE = "stage1_2"


@command_main("clara.recipes.stage1_2")
def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
