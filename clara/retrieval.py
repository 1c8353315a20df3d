"""Retrieval in the memory space: query vectors, cosine scores, top-k selection, InfoNCE, an index.

A query is encoded like a document, with the query-reasoner adapter: its n_mem memory vectors,
flattened to one vector of n_mem * hidden, face each candidate's flattened memory vectors; the
score is their cosine (computed in fp32). `select_documents` turns the scores into the k memory
blocks the generator reads, through the straight-through top-k, so the generator's loss reaches
the query reasoner.

`MemoryIndex` stands in for the retrieval server the official release calls but does not ship:
precomputed memory vectors in memory, saved and loaded as safetensors, searched by matrix product
in chunks so a large collection never needs an [n_queries, N] float matrix of full width at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clara.files import atomic_path
from clara.topk import differentiable_topk


def flatten_memory(memory: torch.Tensor) -> torch.Tensor:
    """[..., n_mem, hidden] -> [..., n_mem * hidden]."""
    return memory.flatten(-2)


def cosine_scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """queries [B, D]; candidates [B, N, D] (each query its own) or [N, D] (shared) -> [B, N] fp32."""
    q = F.normalize(queries.float(), dim=-1)
    c = F.normalize(candidates.float(), dim=-1)
    if c.dim() == 2:
        return q @ c.T
    return torch.einsum("bd,bnd->bn", q, c)


def select_documents(scores: torch.Tensor, memory: torch.Tensor, k: int, temperature: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick k of each query's N candidates.

    scores [B, N]; memory [B, N, n_mem, hidden]. Returns (selected [B, k, n_mem, hidden], idx [B, k]):
    selected is exactly the chosen candidates' memory in the forward pass, and passes the gradient
    of Algorithm 1's soft selection back to the scores.
    """
    n = scores.shape[1]
    if k > n:
        raise ValueError(f"cannot select top-{k} documents from {n} candidates")
    weights, idx = differentiable_topk(scores, k, temperature)  # [B, k, N]
    selected = torch.einsum("bkn,bnd->bkd", weights.to(memory.dtype), memory.flatten(2))
    return selected.view(*selected.shape[:2], *memory.shape[2:]), idx


def info_nce(scores: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive loss with several positives: -log(sum_pos e^(s/tau) / sum_all e^(s/tau)), averaged
    over the queries that have at least one positive (paper, retrieval pretraining).

    scores [B, N] cosine; positive [B, N] bool.
    """
    has_positive = positive.any(-1)
    if not bool(has_positive.any()):
        raise ValueError("info_nce: no query in the batch has a positive candidate (pos_index empty everywhere)")
    logits = scores.float() / temperature
    numerator = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=-1)
    denominator = torch.logsumexp(logits, dim=-1)
    return (denominator - numerator)[has_positive].mean()


# ---------------------------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------------------------
def _digest(vectors: torch.Tensor) -> str:
    return hashlib.sha256(vectors.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class MemoryIndex:
    """Memory vectors of a document collection: [N, n_mem, hidden], with a string id per document."""

    def __init__(self, n_mem: int, hidden: int, dtype: torch.dtype = torch.float32):
        self.n_mem, self.hidden, self.dtype = n_mem, hidden, dtype
        self.vectors = torch.empty(0, n_mem, hidden, dtype=dtype)
        self.ids: list[str] = []
        self._norms: torch.Tensor | None = None  # each block's L2 norm, flattened; computed on the first search

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, memory: torch.Tensor, ids: list[str]) -> None:
        """Append documents: memory [n, n_mem, hidden] and their ids (unique in the index)."""
        if memory.dim() != 3 or tuple(memory.shape[1:]) != (self.n_mem, self.hidden):
            raise ValueError(f"MemoryIndex.add: expected memory [n, {self.n_mem}, {self.hidden}], "
                             f"got {list(memory.shape)}")
        if len(ids) != memory.shape[0]:
            raise ValueError(f"MemoryIndex.add: {memory.shape[0]} memory blocks but {len(ids)} ids")
        known = set(self.ids)
        for doc_id in ids:
            if not isinstance(doc_id, str):
                raise TypeError(f"MemoryIndex.add: ids must be str, got {type(doc_id).__name__}")
            if doc_id in known:
                raise ValueError(f"MemoryIndex.add: duplicate document id {doc_id!r}")
            known.add(doc_id)
        self.vectors = torch.cat([self.vectors, memory.detach().to("cpu", self.dtype)])
        self.ids.extend(ids)
        self._norms = None

    def memory(self, indices: torch.Tensor) -> torch.Tensor:
        """The stored memory of `indices` (any shape) -> [*indices.shape, n_mem, hidden]."""
        return self.vectors[indices.cpu()]

    @torch.no_grad()
    def search(self, queries: torch.Tensor, top_n: int, chunk_size: int = 4096
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine top-n for queries [B, n_mem * hidden] (flattened query memory).

        Scores chunks of `chunk_size` documents at a time and keeps a running top-n, so memory
        stays O(B * (chunk_size + top_n)). Returns (scores [B, n], indices [B, n]), best first,
        with n = min(top_n, len(self)).
        """
        if len(self) == 0:
            raise ValueError("MemoryIndex.search: the index is empty")
        if top_n < 1:
            raise ValueError(f"MemoryIndex.search: top_n must be at least 1, got {top_n}")
        if queries.dim() != 2 or queries.shape[1] != self.n_mem * self.hidden:
            raise ValueError(f"MemoryIndex.search: expected queries [B, {self.n_mem * self.hidden}], "
                             f"got {list(queries.shape)}")
        q = F.normalize(queries.float().cpu(), dim=-1)
        n = min(top_n, len(self))
        if self._norms is None:  # once per index state: a search then reads each block once
            self._norms = torch.cat([self.vectors[i:i + chunk_size].flatten(1).float().norm(dim=1)
                                     for i in range(0, len(self), chunk_size)]).clamp_min(1e-12)
        best_scores = torch.full((q.shape[0], 0), float("-inf"))
        best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for start in range(0, len(self), chunk_size):
            chunk = self.vectors[start:start + chunk_size].flatten(1).float()
            scores = (q @ chunk.T) / self._norms[start:start + chunk.shape[0]]  # cosine [B, chunk]
            idx = torch.arange(start, start + chunk.shape[0]).expand_as(scores)
            merged_scores = torch.cat([best_scores, scores], 1)
            merged_idx = torch.cat([best_idx, idx], 1)
            keep = merged_scores.topk(min(n, merged_scores.shape[1]), dim=1)
            best_scores, best_idx = keep.values, merged_idx.gather(1, keep.indices)
        return best_scores, best_idx

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (vectors + ids in its metadata), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        vectors = self.vectors.contiguous()
        metadata = {"format": "clara-memory-index/1", "ids": json.dumps(self.ids),
                    "n_mem": str(self.n_mem), "hidden": str(self.hidden), "sha256": _digest(vectors)}
        with atomic_path(path) as tmp:
            save_file({"vectors": vectors}, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MemoryIndex":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: memory index not found")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable memory index ({e})") from None
        if metadata.get("format") != "clara-memory-index/1" or "vectors" not in tensors:
            raise ValueError(f"{path}: not a memory index written by MemoryIndex.save")
        vectors = tensors["vectors"]
        try:
            ids = json.loads(metadata["ids"])
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the ids in the metadata are unreadable ({e})") from None
        if "sha256" in metadata and _digest(vectors) != metadata["sha256"]:
            raise ValueError(f"{path}: corrupted (the vectors' sha256 differs from the one recorded when saved)")
        if vectors.dim() != 3 or len(ids) != vectors.shape[0]:
            raise ValueError(f"{path}: {len(ids)} ids for vectors of shape {list(vectors.shape)}")
        index = cls(vectors.shape[1], vectors.shape[2], vectors.dtype)
        index.vectors, index.ids = vectors, list(ids)
        return index
