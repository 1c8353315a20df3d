"""Stage 2 warm-up, retrieval only: `python -m clara.recipes.stage2_retrieval CONFIG [...]`.

Data: stage2 rows with pos_index, the candidates that hold the answer.
Trains: the query reasoner alone (started as a copy of the encoder adapter); the compressor and
the generator are frozen and no answer is generated.
Loss: InfoNCE of the query against the candidates' memories: the positives' cosine scores must
stand out from the others'. It gives the end-to-end stage a retriever that starts above chance.
The run: clara.recipes.loop.train (stage stage2_pretrain_retrieval).
"""

from __future__ import annotations

import sys

from clara.command import command_main
from clara.recipes.stage_config import run_stage

STAGE = "stage2_pretrain_retrieval"


@command_main("clara.recipes.stage2_retrieval")
def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
