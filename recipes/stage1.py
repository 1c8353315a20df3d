"""Stage 1, compression pretraining: `python -m clara.recipes.stage1 CONFIG [--flag value ...]`.

Data: stage1 rows, each a document with QA pairs about it (`data_type: qa`) or a text to restate
from its memory (`data_type: paraphrase`; our reconstruction rows restate the document itself).
Trains: the encoder adapter (the compressor), the decoder adapter (the generator) and the
memory-token rows, on one frozen base. The document is compressed into doc_max_length /
compress_rate memory vectors, and the generator must bring up its questions and answers, or
restate it, from those vectors alone.
Loss: cross-entropy over the answer tokens, plus 0.1 x the MSE between the mean memory vector and
the mean document hidden state when the config sets mse_loss (the paper's alignment term).
The run: clara.recipes.loop.train, the loop every stage shares; CONFIG is a TOML file of
clara-train flags or a shipped config name (recipes/configs/NAME/stage1.toml).
"""

from __future__ import annotations

import sys

from clara.command import command_main
from clara.recipes.stage_config import run_stage

STAGE = "stage1"


@command_main("clara.recipes.stage1")
def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
