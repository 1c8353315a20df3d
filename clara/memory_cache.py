"""Memories of a frozen compressor, kept per document for the length of a training run.

In stage2 and stage2_pretrain_retrieval the compressor (encoder adapter and memory-token rows)
does not train, so a document's memory is the same at every step. The candidates of a stage2
file are drawn from a corpus far smaller than steps x batch x candidates (our knowledge base:
182 passages behind 434 questions of 20 candidates), so compressing each one once makes a CPU
step cost its query encoding and generation instead of 160 document encodings.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from clara.prompts import EncoderBatch


def document_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
    """A document's identity: its encoder tokens without the padding."""
    return input_ids[attention_mask.bool()].cpu().numpy().tobytes()


def select_rows(batch: EncoderBatch, rows: list[int]) -> EncoderBatch:
    index = torch.tensor(rows, device=batch.input_ids.device)
    return EncoderBatch(input_ids=batch.input_ids[index], attention_mask=batch.attention_mask[index],
                        memory_positions=batch.memory_positions[index], truncated=batch.truncated[index])


class DocumentMemoryCache:
    """Least recently used document memories [n_mem, E], at most `max_documents` of them.

    Valid only while the compressor is unchanged: Clara.configure_training drops it, and the
    training loop turns one on only for stages whose compressor is frozen.
    """

    def __init__(self, max_documents: int = 50_000):
        if max_documents < 1:
            raise ValueError(f"max_documents must be at least 1, got {max_documents}")
        self.max_documents = max_documents
        self._memory: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, key: bytes) -> torch.Tensor | None:
        memory = self._memory.get(key)
        if memory is not None:
            self._memory.move_to_end(key)
        return memory

    def put(self, key: bytes, memory: torch.Tensor) -> None:
        self._memory[key] = memory
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_documents:
            self._memory.popitem(last=False)
