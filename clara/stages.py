"""The training stages of CLaRa: one table that the model, the training loop, the memory planner,
the command lines, the data validator and the evaluator all read.

    stage1                     compressor pretraining: QA and paraphrase rows over one document
    stage1_2                   instruction tuning: answer from k compressed documents
    stage2                     end to end: the query reasoner picks k of N candidates (differentiable
                               top-k) and the generator answers; the compressor is frozen
    stage2_pretrain_retrieval  the query reasoner alone, with InfoNCE against the positives

Changing what a stage trains or which loss it uses is a change to this table (and, for a new loss
term, to `Clara.loss_terms`), nowhere else. This module imports nothing heavy: data tools read it.
"""

from __future__ import annotations

from dataclasses import dataclass

ENCODER = "encoder_adapter"
DECODER = "decoder_adapter"
QUERY = "query_reasoner_adapter"


@dataclass(frozen=True)
class Stage:
    name: str
    data_format: str  # the stage-file layout its rows follow: "stage1", "stage1_2" or "stage2"
    adapters: tuple[str, ...]  # the adapters a model of this stage holds
    trained_adapters: tuple[str, ...]  # those the stage trains
    losses: tuple[str, ...]  # loss terms: "lm" (answer tokens), "mse" (with --mse_loss), "retrieval"
    compressor_trained: bool  # False: documents are compressed without grad (a frozen compressor)
    evaluable: bool  # the evaluator has metrics for it
    # Saved stages whose decoder adapter this stage does not load but starts afresh (the official
    # release: instruction tuning trains a new generator on the stage-1 compressor).
    fresh_decoder_after: tuple[str, ...] = ()
    # The memory-token embeddings train in compression pretraining only, as in the official
    # release; later stages keep them, so memories compressed before a stage2 run stay valid.
    trains_memory_embeddings: bool = False

    @property
    def typed_rows(self) -> bool:
        """Its rows are QA or paraphrase rows (`data_type`), a QA row with several questions, and
        --qa_loss selects among them: the stage1 layout. Other layouts hold one question a row."""
        return self.data_format == "stage1"

    def adapters_to_load(self, saved_stage: str, saved: tuple[str, ...] | list[str]) -> list[str]:
        """Which of a checkpoint's `saved` adapters (written in `saved_stage`) a model of this
        stage loads; the others start fresh."""
        fresh = (DECODER,) if saved_stage in self.fresh_decoder_after else ()
        return [name for name in saved if name not in fresh]

    @property
    def generates(self) -> bool:
        """The decoder adapter answers from memory (an LM loss over answer tokens)."""
        return "lm" in self.losses

    @property
    def retrieves(self) -> bool:
        """The query reasoner scores candidates."""
        return QUERY in self.adapters and QUERY in self.trained_adapters


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("stage1", data_format="stage1", adapters=(ENCODER, DECODER), trained_adapters=(ENCODER, DECODER),
          losses=("lm", "mse"), compressor_trained=True, evaluable=True, trains_memory_embeddings=True),
    Stage("stage1_2", data_format="stage1_2", adapters=(ENCODER, DECODER), trained_adapters=(ENCODER, DECODER),
          losses=("lm", "mse"), compressor_trained=True, evaluable=True, fresh_decoder_after=("stage1",)),
    Stage("stage2", data_format="stage2", adapters=(ENCODER, DECODER, QUERY), trained_adapters=(QUERY, DECODER),
          losses=("lm",), compressor_trained=False, evaluable=True),
    Stage("stage2_pretrain_retrieval", data_format="stage2", adapters=(ENCODER, DECODER, QUERY),
          trained_adapters=(QUERY,), losses=("retrieval",), compressor_trained=False, evaluable=False),
)}

STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
DATA_FORMATS: tuple[str, ...] = tuple(dict.fromkeys(s.data_format for s in STAGES.values()))
EVAL_STAGES: tuple[str, ...] = tuple(n for n, s in STAGES.items() if s.evaluable)


def get_stage(name: str) -> Stage:
    """The stage called `name`, or a ValueError that lists the valid names."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}") from None
