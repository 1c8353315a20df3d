"""NutriBot's retriever: documents compressed once, searched by the query reasoner, filtered for safety.

    r = ClaraRetriever()                                   # built-in knowledge base, shipped checkpoint
    hits = r.search("Which greens should I eat?", "on warfarin", top_k=5)
    reply = r.answer("Which greens should I eat?", "on warfarin")

mode="clara" compresses every passage into a MemoryIndex, saved under the cache folder and rebuilt
only when the passages or the compressor change; a question is encoded by the query reasoner and
scored against the whole index. mode="text" is the baseline: BM25 over the passages' text and the
passages' full text in the prompt. Both give the same result shape, and in both the safety layer
(nutribot.safety, nutribot.filters: rules, no model) decides every warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clara import Clara, MemoryIndex
from clara.checkpoint import names_clara_checkpoint, weights_probe
from clara.data.bm25 import BM25Index, top_indices
from clara.generate import check_repetition_penalty
from clara.lora import copy_adapter, lora_layers
from clara.model import ENCODER, QUERY
from clara.quant import check_quant_kind, quantized_layers
from clara.weights import DTYPES
from nutribot.filters import answer_warnings, filter_documents
from nutribot.knowledge import Knowledge, Passage, load_knowledge
from nutribot.safety import Contraindication, extract_contraindications

log = logging.getLogger("nutribot")

MODES = ("clara", "text")
# Answers list foods, and without a penalty the small shipped model loops on a list (9 of 30 bench
# cases changed at 1.3, every looping one among them: docs/nutribot.md).
REPETITION_PENALTY = 1.3
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "nutribot-smollm2"
FALLBACK_BASE = "smollm2-135m"
CANDIDATES_PER_RESULT = 4  # search this many times top_k, so demoting unsafe documents still fills top_k


def default_checkpoint() -> str:
    """The shipped checkpoint when this is a source checkout, else the untrained embedded base."""
    return str(SHIPPED_CHECKPOINT) if (SHIPPED_CHECKPOINT / "clara.json").is_file() else FALLBACK_BASE


def default_cache_dir() -> Path:
    return Path(os.environ.get("NUTRIBOT_CACHE", Path.home() / ".cache" / "nutribot"))


@dataclass
class Retrieved:
    passage: Passage
    position: int  # the passage's place in the knowledge, which is its row in the MemoryIndex
    score: float
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        p = self.passage
        return {"id": p.id, "title": p.title, "text": p.text, "source": p.source, "page": p.page,
                "score": round(float(self.score), 6), "warnings": list(self.warnings)}


@dataclass
class SearchResult:
    contraindications: list[Contraindication]
    documents: list[Retrieved]

    def warnings(self) -> list[str]:
        """One line per contraindication, then each document's warnings, without repeats."""
        return _unique([patient_warning(c) for c in self.contraindications]
                       + [w for d in self.documents for w in d.warnings])


def patient_warning(c: Contraindication) -> str:
    return f"{c.name}: take care with {', '.join(c.restricts)}. {c.reason}"


@dataclass
class Reply:
    answer: str
    warnings: list[str]
    contraindications: list[Contraindication]
    documents: list[Retrieved]
    mode: str

    def to_json(self) -> dict:
        return {"answer": self.answer, "warnings": list(self.warnings),
                "contraindications": [c.to_json() for c in self.contraindications],
                "documents": [d.to_json() for d in self.documents], "mode": self.mode}


def load_model(checkpoint: str | os.PathLike, device: str = "cpu", dtype: str = "fp32",
               quantize: str | None = None) -> Clara:
    """A Clara checkpoint (a folder, a training run, an official CLaRa checkpoint, or a hub checkpoint
    'org/name:subfolder'), else a base model: an untrained Clara. dtype: "fp32", "bf16" or "fp16";
    quantize: "nf4" or "int8" stores the base's block weights quantized (a 7B base in 4 or 8 GiB)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
    settings = {"device": device, "dtype": DTYPES[dtype], "quantize": check_quant_kind(quantize)}
    if names_clara_checkpoint(checkpoint):
        return Clara.from_pretrained(checkpoint, **settings)
    return Clara.from_base(str(checkpoint), **settings)


def numerics(model: Clara) -> str:
    """What a model computes in: its dtype, and how its base's block weights are quantized."""
    quantized = sorted({m.kind for m in quantized_layers(model.decoder).values()})
    dtype = str(model.memory_embeddings.dtype).removeprefix("torch.")
    return f"{dtype}, {'+'.join(quantized)} base" if quantized else dtype


def compressor_fingerprint(model: Clara) -> str:
    """sha256 of everything that decides a passage's memory: the encoder adapter, the memory rows,
    the document length and compression rate, the base (architecture and a probe of its weights),
    and the numbers it computes in (dtype, and how its block weights are quantized, if they are)."""
    digest = hashlib.sha256()
    cfg = model.config
    digest.update(f"{model.base_fingerprint}|{weights_probe(model.decoder)}|{cfg.doc_max_length}|{cfg.n_mem_tokens}|"
                  f"{numerics(model)}".encode())
    tensors = [model.memory_embeddings]
    for layer in lora_layers(model.decoder).values():
        adapter = layer.adapters[ENCODER]
        tensors += [adapter.lora_A, adapter.lora_B]
    for t in tensors:
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ClaraRetriever:
    def __init__(self, knowledge_base_path: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                 mode: str = "clara", *, model: Clara | None = None, cache_dir: str | os.PathLike | None = None,
                 device: str = "cpu", dtype: str = "fp32", quantize: str | None = None, max_new_tokens: int = 96,
                 repetition_penalty: float = REPETITION_PENALTY, progress: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_repetition_penalty(repetition_penalty)  # before the model is loaded
        self.mode, self.max_new_tokens, self.progress = mode, max_new_tokens, progress
        self.repetition_penalty = repetition_penalty
        self.checkpoint = str(checkpoint or default_checkpoint()) if model is None else "(given model)"
        self.model = model if model is not None else load_model(self.checkpoint, device, dtype, quantize)
        self.model.eval()
        if QUERY not in self.model.adapter_names:
            # A stage1 checkpoint has no query reasoner; stage2 would start it as the compressor.
            copy_adapter(self.model.decoder, ENCODER, QUERY)
            log.info("the checkpoint has no query reasoner: questions are encoded by the compressor")
        self.knowledge: Knowledge = load_knowledge(knowledge_base_path, self.model.tokenizer,
                                                   self.model.config.doc_max_length)
        if not self.knowledge.passages:
            raise ValueError(f"{self.knowledge.origin}: no passages to search")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._lock = threading.Lock()  # one generation or search on the model at a time
        self.index: MemoryIndex | None = None
        self.bm25: BM25Index | None = None
        if mode == "clara":
            self.index = self.load_or_build_index()
        else:
            self.bm25 = BM25Index([f"{p.title}\n{p.text}" for p in self.knowledge.passages])

    # -- the index -------------------------------------------------------------------------------
    def index_path(self) -> Path:
        key = hashlib.sha256(f"{self.knowledge.fingerprint()}|{compressor_fingerprint(self.model)}".encode())
        return self.cache_dir / f"index-{key.hexdigest()[:24]}.safetensors"

    def load_or_build_index(self) -> MemoryIndex:
        path = self.index_path()
        ids = [p.id for p in self.knowledge.passages]
        if path.is_file():
            try:
                index = MemoryIndex.load(path)
                if index.ids == ids:
                    log.info("memory index of %d passages loaded from %s", len(index), path)
                    return index
                log.warning("%s does not match the passages; rebuilding it", path)
            except ValueError as e:
                log.warning("%s; rebuilding it", e)
        index = self.build_index()
        index.save(path)
        log.info("memory index of %d passages saved to %s", len(index), path)
        return index

    def build_index(self, batch_size: int = 8) -> MemoryIndex:
        cfg = self.model.config
        index = MemoryIndex(cfg.n_mem_tokens, self.model.hidden_size)
        passages = self.knowledge.passages
        with tqdm(total=len(passages), desc="compressing passages", unit="doc", disable=not self.progress) as bar:
            for start in range(0, len(passages), batch_size):
                chunk = passages[start:start + batch_size]
                with self._lock:
                    memory = self.model.compress_documents([p.text for p in chunk], batch_size=batch_size)
                index.add(memory, [p.id for p in chunk])
                bar.update(len(chunk))
        return index

    # -- search ----------------------------------------------------------------------------------
    def _rank(self, query: str, n: int) -> list[tuple[int, float]]:
        n = min(n, len(self.knowledge.passages))
        if self.mode == "text":
            scores = self.bm25.scores(query)
            return [(i, float(scores[i])) for i in top_indices(scores, n)]
        with self._lock:
            query_memory = self.model.query_vectors([query])
        scores, indices = self.index.search(query_memory, n)
        return [(int(i), float(s)) for s, i in zip(scores[0].tolist(), indices[0].tolist())]

    def search(self, query: str, patient_context: str | None = None, top_k: int = 5) -> SearchResult:
        """The contraindications in `patient_context` and the top_k passages for `query`, each with
        the warnings it needs; passages that encourage a restricted item come last."""
        query = _check_query(query)
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        contraindications = extract_contraindications(patient_context)
        ranked = self._rank(query, top_k * CANDIDATES_PER_RESULT)
        candidates = [{"index": i, "score": s, "text": self.knowledge.passages[i].text,
                       "title": self.knowledge.passages[i].title, "tags": dict(self.knowledge.passages[i].tags)}
                      for i, s in ranked]
        kept = filter_documents(candidates, contraindications)[:top_k]
        documents = [Retrieved(self.knowledge.passages[f.document["index"]], f.document["index"], f.document["score"],
                               list(f.warnings)) for f in kept]
        return SearchResult(contraindications, documents)

    # -- answer ----------------------------------------------------------------------------------
    def answer(self, query: str, patient_context: str | None = None, top_k: int = 5,
               on_text: Callable[[str], None] | None = None,
               on_found: Callable[[SearchResult], None] | None = None) -> Reply:
        """Search, then answer from the kept passages (compressed, or their text in mode "text").
        on_found receives the search result before generation starts (a page shows its warnings
        first); on_text receives the answer as it is generated, piece by piece."""
        found = self.search(query, patient_context, top_k)
        if on_found is not None:
            on_found(found)
        stream = _TextStream(self.model.tokenizer, on_text) if on_text is not None else None
        settings = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                    "on_token": stream}
        with self._lock:
            if self.mode == "text":
                context = "\n\n".join(d.passage.text for d in found.documents)
                text = self.model.generate_from_text_context([query], [context], **settings)[0]
            else:
                positions = torch.tensor([[d.position for d in found.documents]])
                memory = self.index.memory(positions)  # [1, k, n_mem, E]
                text = self.model.generate_from_compressed_documents_and_questions([query], memory, **settings)[0]
        warnings = _unique(found.warnings() + answer_warnings(text, found.contraindications))
        return Reply(text, warnings, found.contraindications, found.documents, self.mode)


class _TextStream:
    """on_token callback: decodes the tokens so far and hands on the new text (one question)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.sent) and len(text) > len(self.sent) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.sent):])
            self.sent = text


def _check_query(query) -> str:
    if not isinstance(query, str):
        raise TypeError(f"the question must be a string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("the question is empty")
    return query.strip()


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))
