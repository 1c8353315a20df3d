"""--stage2_mips: each question's candidates come from a search of the whole corpus, in process.

The official end-to-end training asks a retrieval server (which it does not ship) for every
question's top-n documents. Here the corpus is every distinct document of the training file. The
frozen compressor compresses each one once into a MemoryIndex; at each step, the query reasoner
(as it is at that step, without grad and without dropout) searches it, and the row's candidates
become the top n found. The scores that train the query reasoner are then computed again, with
grad, over those n (clara.model.Clara._retrieve), so the gradient sees the documents the current
retriever actually ranks highest: hard negatives from the whole corpus, not the file's fixed 20.

A row whose positives are all missing from its top n gets its first positive in place of the
n-th candidate: InfoNCE needs a positive, and the generator its answer's source.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from clara.data.formats import Stage2Example
from clara.model import Clara
from clara.retrieval import MemoryIndex


class CorpusSearch:
    """The training file's documents in a MemoryIndex, and the swap of each row's candidates."""

    def __init__(self, model: Clara, examples: Sequence[Stage2Example], top_n: int, batch_size: int = 16):
        self.corpus = list(dict.fromkeys(d for e in examples for d in e.docs))
        if top_n < 1 or top_n > len(self.corpus):
            raise ValueError(f"--stage2_retrieval_top_n {top_n}: the corpus holds {len(self.corpus)} "
                             "distinct documents")
        self.top_n = top_n
        memory = model.compress_documents(self.corpus, batch_size=batch_size)  # fills the memory cache too
        self.index = MemoryIndex(memory.shape[1], memory.shape[2], dtype=memory.dtype)
        self.index.add(memory.cpu(), [str(i) for i in range(len(self.corpus))])

    @torch.no_grad()
    def candidates(self, model: Clara, examples: Sequence[Stage2Example]) -> list[Stage2Example]:
        """The rows with their candidates replaced by the query reasoner's top n over the corpus."""
        _, found = self.index.search(model.query_vectors([e.question for e in examples]), self.top_n)
        return [self._swap(e, row.tolist()) for e, row in zip(examples, found)]

    def _swap(self, example: Stage2Example, found: list[int]) -> Stage2Example:
        docs = [self.corpus[i] for i in found]
        positives = [example.docs[i] for i in example.pos_index]
        pos_index = tuple(i for i, d in enumerate(docs) if d in positives)
        if positives and not pos_index:
            docs[-1] = positives[0]
            pos_index = (len(docs) - 1,)
        return dataclasses.replace(example, docs=tuple(docs), pos_index=pos_index)
