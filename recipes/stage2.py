"""Stage 2, end-to-end retrieval and generation: `python -m clara.recipes.stage2 CONFIG [...]`.

Data: stage2 rows, a question, N candidate documents and the answer (pos_index, when present, is
for evaluation only: the retriever learns from the answer's loss).
Trains: the query reasoner (started as a copy of the encoder adapter) and the decoder adapter.
The compressor is frozen: the candidates are compressed without gradient, so an index built
before the run stays valid.
Loss: cross-entropy over the answer tokens, through the straight-through differentiable top-k
that picks generation_top_k of the candidates by the query's cosine score (tau 0.02): the
generator's loss is what teaches the retriever.
The run: clara.recipes.loop.train; CONFIG's pretrain names the stage-1_2 checkpoint.
"""

from __future__ import annotations

import sys

from clara.command import command_main
from clara.recipes.stage_config import run_stage

STAGE = "stage2"


@command_main("clara.recipes.stage2")
def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
