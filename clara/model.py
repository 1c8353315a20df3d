"""Clara: one frozen decoder, three named adapters, documents read as memory vectors.

    compress:  encoder_adapter          <ENC> BOS doc EOS <MEM_0..n-1>  -> memory [n_mem, E]
    retrieve:  query_reasoner_adapter   the query, encoded the same way -> cosine vs candidates
    generate:  decoder_adapter          prompt with n_mem placeholders per document, whose input
                                        embeddings are replaced by the memory vectors

Which adapters a stage holds and trains, and its loss terms, come from the stage table in
clara/stages.py; everything a stage does not train is frozen.

The memory-token embeddings live in their own parameter, `memory_embeddings`, looked up by
`embed`: the base embedding matrix stays frozen and only those rows can learn, which is what the
official release gets from a gradient mask over the whole matrix (where weight decay would still
touch every row).

The model owns the loss: `forward` returns it as named `LossTerm`s with their weights, and a
training loop only chooses the normaliser (the answer tokens and micro-batches of its global
batch) through `combine_loss_terms`.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from clara.checkpoint import base_fingerprint, load_clara, save_clara
from clara.compressor import Compressed, compress
from clara.config import ClaraConfig
from clara.decoder import Decoder
from clara.generate import generate
from clara.lora import (add_adapter, apply_lora, copy_adapter, lora_layers, mark_only_adapters_trainable,
                        trainable_parameters, use_adapter)
from clara.memory_cache import DocumentMemoryCache, document_key, select_rows
from clara.prompts import (DEFAULT_TEXTS, IGNORE_INDEX, DecoderBatch, EncodedPrompt, EncoderBatch, PromptTexts,
                           collate_prompts, encoder_inputs, instruction_prompt, prompt_for_example,
                           special_token_ids, stage1_paraphrase_prompt)
from clara.retrieval import cosine_scores, flatten_memory, info_nce, select_documents
from clara.tokenizer import Tokenizer
from clara.stages import DECODER, ENCODER, QUERY, get_stage
from clara.weights import extend_vocabulary, load_base



@dataclass(frozen=True)
class LossTerm:
    """One term of a stage's training loss, as the model defines it.

    `value` is a sum over answer tokens when `per_token` (the whole loss divides it by the answer
    tokens of the whole global batch, so gradient accumulation matches one big batch) and a mean
    over the micro-batch otherwise (divided by the number of micro-batches).
    """

    name: str  # "lm", "mse" or "retrieval": the names of clara.stages' Stage.losses
    value: torch.Tensor
    weight: float
    per_token: bool

    def share(self, answer_tokens: int, micro_batches: int) -> torch.Tensor:
        """This micro-batch's part of the term's global-batch value (unweighted): the global value
        is the sum of the shares of all micro-batches."""
        return self.value / max(answer_tokens if self.per_token else micro_batches, 1)


def combine_loss_terms(terms: Sequence[LossTerm], answer_tokens: int, micro_batches: int) -> torch.Tensor:
    """The training loss of one micro-batch's terms as its share of a global batch holding
    `answer_tokens` answer tokens in `micro_batches` micro-batches."""
    total = None
    for term in terms:
        part = term.weight * term.share(answer_tokens, micro_batches)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no loss terms")
    return total


def _move(x: Any, device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if hasattr(x, "__dataclass_fields__"):
        return replace(x, **{k: _move(getattr(x, k), device) for k in x.__dataclass_fields__})
    return x


@dataclass
class ClaraBatch:
    """Tensors of one training micro-batch (built by Clara.collate).

    documents: every example's documents, flattened example-major: B * n_docs rows.
    decoder: the generator prompts with answers (None for stage2_pretrain_retrieval).
    query: the questions as compressor inputs (stage2 stages only).
    positive: [B, n_docs] bool, the pos_index of each example (stage2_pretrain_retrieval).
    """

    stage: str
    documents: EncoderBatch
    n_docs: int
    decoder: DecoderBatch | None = None
    query: EncoderBatch | None = None
    positive: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.documents.input_ids.shape[0] // self.n_docs

    @property
    def n_target_tokens(self) -> int:
        """Answer tokens the LM loss counts (the shifted labels that are not ignored)."""
        if self.decoder is None:
            return 0
        return int((self.decoder.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device) -> "ClaraBatch":
        return _move(self, device)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy, as the official generate_* methods
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1: tokens already generated become less likely (1.0: none)
    seed: int | None = None
    on_token: Callable[[torch.Tensor], None] | None = None  # each step's new tokens [B], for streaming


class Clara(nn.Module):
    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, config: ClaraConfig, base_name: str,
                 base_fingerprint: str, texts: PromptTexts = DEFAULT_TEXTS):
        """Wire an already extended and LoRA-converted decoder; use from_base / from_pretrained."""
        super().__init__()
        self.decoder = decoder
        self.tokenizer = tokenizer
        # Our own copy: configure_training changes the stage in place, and a config object shared with
        # the caller (or another model built from it) would switch that model's stage too.
        self.config = replace(config)
        self.base_name = base_name
        self.base_fingerprint = base_fingerprint  # of the base's DecoderConfig before the vocabulary grew
        self.texts = texts
        self.special = special_token_ids(tokenizer, config)
        memory_ids = sorted(set(self.special.mem))
        self.memory_token_ids = memory_ids
        with torch.no_grad():
            rows = decoder.embed_tokens.weight[memory_ids].detach().clone()
        self.memory_embeddings = nn.Parameter(rows)  # [n distinct memory tokens, E]
        slot = torch.full((decoder.config.vocab_size,), -1, dtype=torch.long, device=rows.device)
        slot[memory_ids] = torch.arange(len(memory_ids), device=rows.device)
        self.register_buffer("memory_slot", slot, persistent=False)  # token id -> row, -1 if not a memory token
        self.rng = random.Random(0)  # paraphrase instruction draws; reseed for reproducible runs
        # Set by a training run whose compressor is frozen (clara.memory_cache); None: no cache.
        self.memory_cache: DocumentMemoryCache | None = None
        self.configure_training(config.training_stage)

    # -----------------------------------------------------------------------------------------
    # Construction
    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_decoder(cls, decoder: Decoder, tokenizer: Tokenizer, config: ClaraConfig | None = None,
                     base_name: str = "<in-memory>", texts: PromptTexts = DEFAULT_TEXTS) -> "Clara":
        """Add CLaRa's tokens and the stage's adapters to a base decoder (modified in place)."""
        config = config or ClaraConfig()
        fingerprint = base_fingerprint(decoder.config, len(tokenizer))
        extend_vocabulary(decoder, tokenizer, config.special_tokens())
        for p in decoder.parameters():
            p.requires_grad_(False)
        # The query reasoner is left to configure_training, which starts it as a copy of the encoder.
        names = [a for a in get_stage(config.training_stage).adapters if a != QUERY]
        apply_lora(decoder, names, r=config.lora_r, alpha=config.lora_alpha,
                   dropout=config.lora_dropout, target_modules=config.lora_target_modules)
        return cls(decoder, tokenizer, config, base_name, fingerprint, texts)

    @classmethod
    def from_base(cls, name_or_path: str, config: ClaraConfig | None = None, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", texts: PromptTexts = DEFAULT_TEXTS,
                  quantize: str | None = None) -> "Clara":
        """A fresh Clara on a base model: HF directory, hub id, GGUF file or the alias `smollm2-135m`;
        quantize="nf4"|"int8" stores the frozen base's block weights quantized (clara/quant.py)."""
        decoder, tokenizer = load_base(name_or_path, dtype=dtype, device=device, quantize=quantize)
        return cls.from_decoder(decoder, tokenizer, config, base_name=str(name_or_path), texts=texts)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "Clara":
        """A saved Clara checkpoint, or a training run's folder (its final/ model); the options
        (base, base_model, training_stage, settings, dtype, device) are clara.checkpoint.load_clara's."""
        return load_clara(cls, path, **kwargs)

    def save_pretrained(self, path) -> None:
        """Config JSON + adapters + added embedding rows as safetensors, written atomically."""
        save_clara(self, path)

    # -----------------------------------------------------------------------------------------
    # Stages and trainable parameters
    # -----------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return sorted({a for layer in lora_layers(self.decoder).values() for a in layer.adapters})

    def configure_training(self, stage: str) -> None:
        """Switch to `stage`: create missing adapters and make exactly its parameters trainable.

        A stage2 model without a query reasoner starts it as a copy of the encoder adapter (the
        paper: the query is encoded like a document, so the trained compressor is the best start).
        """
        self.config.training_stage = stage
        self.config.__post_init__()  # validates the stage name
        self.memory_cache = None  # the memories it holds may belong to a compressor about to train
        present = self.adapter_names
        for name in get_stage(stage).adapters:
            if name in present:
                continue
            if name == QUERY and ENCODER in present:
                copy_adapter(self.decoder, ENCODER, QUERY)
            else:
                add_adapter(self.decoder, name, self.config.lora_r, self.config.lora_alpha, self.config.lora_dropout)
        mark_only_adapters_trainable(self.decoder, get_stage(stage).trained_adapters)
        self.memory_embeddings.requires_grad_(self.config.train_mem_embeddings
                                              and get_stage(stage).trains_memory_embeddings)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Dropout off for the block, then the training mode the model had before."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def hidden_size(self) -> int:
        return self.decoder.config.hidden_size

    # -----------------------------------------------------------------------------------------
    # Embeddings
    # -----------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, with memory tokens read from `memory_embeddings`."""
        x = self.decoder.embed_tokens(input_ids)
        slot = self.memory_slot[input_ids]
        is_memory = (slot >= 0).unsqueeze(-1)
        memory_rows = F.embedding(slot.clamp(min=0), self.memory_embeddings).to(x.dtype)
        return torch.where(is_memory, memory_rows, x)

    def prompt_embeddings(self, batch: DecoderBatch, memory: torch.Tensor) -> torch.Tensor:
        """Input embeddings of the decoder prompts with the documents' memory written into the slots.

        memory [B, k, n_mem, E] (example i, slot j) -> placeholders at batch.memory_positions [B, k, n_mem].
        """
        embeds = self.embed(batch.input_ids)
        b, k, n_mem = batch.memory_positions.shape
        if tuple(memory.shape[:3]) != (b, k, n_mem):
            raise ValueError(f"memory of shape {list(memory.shape)} does not fit {b} prompts x {k} slots x {n_mem}")
        rows = torch.arange(b, device=embeds.device).view(b, 1, 1).expand(b, k, n_mem)
        return embeds.index_put((rows.reshape(-1), batch.memory_positions.reshape(-1)),
                                memory.reshape(-1, memory.shape[-1]).to(embeds.dtype))

    # -----------------------------------------------------------------------------------------
    # The three roles of the decoder
    # -----------------------------------------------------------------------------------------
    def compress_batch(self, batch: EncoderBatch, with_mse: bool = False) -> Compressed:
        with use_adapter(self.decoder, ENCODER):
            return compress(self.decoder, self.embed, batch, with_mse)

    def encode_queries(self, batch: EncoderBatch) -> torch.Tensor:
        """Query memory, flattened: [B, n_mem * E]."""
        with use_adapter(self.decoder, QUERY):
            return flatten_memory(compress(self.decoder, self.embed, batch).memory)

    def lm_loss(self, batch: DecoderBatch, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum of answer-token cross-entropies, answer-token count) with the decoder adapter.

        Only the positions that predict an answer token go through the lm head: the prompt (and its
        memory slots) is most of the sequence and would otherwise cost vocab-wide logits for nothing.
        """
        with use_adapter(self.decoder, DECODER):
            hidden = self.decoder(inputs_embeds=inputs_embeds, attention_mask=batch.attention_mask,
                                  compute_logits=False).hidden_states
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.decoder.compute_logits(hidden[:, :-1][keep])  # [n_answer_tokens, V]
        loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss_sum, int(keep.sum())

    # -----------------------------------------------------------------------------------------
    # Training forward
    # -----------------------------------------------------------------------------------------
    def collate(self, examples: Sequence[Any], max_len: int | None = None) -> ClaraBatch:
        """Tensors for examples of clara.data.formats (Stage1Example, Stage1_2Example, Stage2Example)."""
        if not examples:
            raise ValueError("collate: empty batch")
        stage = self.config.training_stage
        facts = get_stage(stage)
        n_docs = {len(e.docs) for e in examples}
        if len(n_docs) != 1:
            raise ValueError(f"examples of one batch need the same number of documents, got {sorted(n_docs)}")
        n_docs = n_docs.pop()
        if facts.retrieves and facts.generates and n_docs < self.config.generation_top_k:
            raise ValueError(f"{stage} selects generation_top_k={self.config.generation_top_k} documents but "
                             f"the examples have only {n_docs} candidates")
        documents = encoder_inputs(self.tokenizer, self.config, [d for e in examples for d in e.docs])
        batch = ClaraBatch(stage=stage, documents=documents, n_docs=n_docs)
        if facts.generates:
            prompts = [prompt_for_example(e, self.tokenizer, self.config, self.rng, self.texts) for e in examples]
            batch.decoder = collate_prompts(prompts, self.tokenizer.pad_id, "right", max_len)
        if facts.retrieves:
            batch.query = encoder_inputs(self.tokenizer, self.config, [e.question for e in examples])
        if "retrieval" in facts.losses:
            positive = torch.zeros(len(examples), n_docs, dtype=torch.bool)
            for i, e in enumerate(examples):
                positive[i, list(e.pos_index)] = True
            batch.positive = positive
        return batch

    def forward(self, batch: ClaraBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss of this batch alone, aux) for the batch's stage.

        aux["loss_terms"] holds the loss as its `LossTerm`s: a training loop that accumulates
        micro-batches combines them with `combine_loss_terms` over the global batch. aux also
        reports lm_loss_sum, n_tokens, mse_loss, topk_idx, scores where the stage has them.
        """
        batch = batch.to(self.device)
        facts = get_stage(batch.stage)
        if not facts.retrieves:
            terms, aux = self._forward_compress_and_generate(batch)
        elif facts.generates:
            terms, aux = self._forward_end_to_end(batch)
        else:
            terms, aux = self._forward_retrieval(batch)
        aux["loss_terms"] = terms
        return combine_loss_terms(terms, aux["n_tokens"], 1), aux

    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss term (see LossTerm), by name."""
        return {"lm": 1.0, "mse": self.config.mse_loss_weight, "retrieval": 1.0}

    def _lm_term(self, loss_sum: torch.Tensor) -> LossTerm:
        return LossTerm("lm", loss_sum, self.loss_weights()["lm"], per_token=True)

    def _forward_compress_and_generate(self, batch: ClaraBatch):
        compressed = self.compress_batch(batch.documents, with_mse=self.config.mse_loss)
        memory = compressed.memory.view(batch.batch_size, batch.n_docs, *compressed.memory.shape[1:])
        loss_sum, n_tokens = self.lm_loss(batch.decoder, self.prompt_embeddings(batch.decoder, memory))
        terms = [self._lm_term(loss_sum)]
        if compressed.mse_loss is not None:
            terms.append(LossTerm("mse", compressed.mse_loss, self.loss_weights()["mse"], per_token=False))
        return terms, {"lm_loss": (loss_sum / max(n_tokens, 1)).detach(), "lm_loss_sum": loss_sum,
                       "n_tokens": n_tokens, "mse_loss": compressed.mse_loss}

    @torch.no_grad()
    def frozen_document_memory(self, documents: EncoderBatch) -> torch.Tensor:
        """The frozen compressor's memories [N, n_mem, E]: without grad and without dropout, so a
        training step sees the memories compress_documents (and a prebuilt MemoryIndex) give.
        With a memory_cache, each distinct document is compressed once."""
        cache = self.memory_cache
        keys = [document_key(ids, mask) for ids, mask in zip(documents.input_ids, documents.attention_mask)]
        found = {k: cache.get(k) for k in keys} if cache is not None else {}
        missing = list({k: i for i, k in enumerate(keys) if found.get(k) is None}.values())
        if missing:
            with self.eval_mode():
                fresh = self.compress_batch(select_rows(documents, missing)).memory
            for i, memory in zip(missing, fresh):
                found[keys[i]] = memory
                if cache is not None:
                    cache.put(keys[i], memory)
        if cache is not None:
            cache.misses += len(missing)
            cache.hits += len(keys) - len(missing)
        return torch.stack([found[k] for k in keys])

    def _retrieve(self, batch: ClaraBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine scores [B, N], candidate memory [B, N, n_mem, E]); the compressor frozen."""
        query = self.encode_queries(batch.query)  # [B, D]
        memory = self.frozen_document_memory(batch.documents)
        memory = memory.view(batch.batch_size, batch.n_docs, *memory.shape[1:])
        return cosine_scores(query, flatten_memory(memory)), memory

    def _forward_end_to_end(self, batch: ClaraBatch):
        scores, memory = self._retrieve(batch)
        selected, idx = select_documents(scores, memory, self.config.generation_top_k,
                                         self.config.retrieval_temperature)
        loss_sum, n_tokens = self.lm_loss(batch.decoder, self.prompt_embeddings(batch.decoder, selected))
        return [self._lm_term(loss_sum)], {"lm_loss": (loss_sum / max(n_tokens, 1)).detach(), "lm_loss_sum": loss_sum,
                                           "n_tokens": n_tokens, "mse_loss": None, "topk_idx": idx,
                                           "scores": scores.detach()}

    def _forward_retrieval(self, batch: ClaraBatch):
        scores, _ = self._retrieve(batch)
        loss = info_nce(scores, batch.positive, self.config.retrieval_temperature)
        k = min(self.config.generation_top_k, scores.shape[1])
        term = LossTerm("retrieval", loss, self.loss_weights()["retrieval"], per_token=False)
        return [term], {"lm_loss": None, "n_tokens": 0, "mse_loss": None, "retrieval_loss": loss.detach(),
                        "topk_idx": scores.topk(k, dim=-1).indices, "scores": scores.detach()}

    # -----------------------------------------------------------------------------------------
    # Inference (names and arguments follow the official release)
    # -----------------------------------------------------------------------------------------
    def _check_questions(self, questions: Sequence[str], documents: Sequence[Sequence[str]] | None) -> None:
        if isinstance(questions, str):
            raise TypeError("questions must be a list of str, got a single str")
        if documents is not None:
            if len(documents) != len(questions):
                raise ValueError(f"{len(questions)} questions but {len(documents)} document lists")
            counts = {len(d) for d in documents}
            if len(counts) != 1 or 0 in counts:
                raise ValueError(f"every question needs the same, non-zero number of documents, got {sorted(counts)}")

    @torch.no_grad()
    def compress_documents(self, documents: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Memory vectors of each document: [n_docs, n_mem, hidden]."""
        if isinstance(documents, str):
            raise TypeError("compress_documents expects a list of documents, got a single str")
        if len(documents) == 0:
            raise ValueError("compress_documents: no documents")
        parts = []
        for start in range(0, len(documents), batch_size):
            batch = _move(encoder_inputs(self.tokenizer, self.config, documents[start:start + batch_size]),
                          self.device)
            parts.append(self.frozen_document_memory(batch))  # eval mode; from the memory_cache where one is set
        return torch.cat(parts)

    @torch.no_grad()
    def _generate_from_memory(self, prompts: list[EncodedPrompt], memory: torch.Tensor,
                              settings: GenerationSettings) -> list[str]:
        """memory [B, k, n_mem, E] into the prompts' slots, then decode with the decoder adapter."""
        with self.eval_mode():
            batch = _move(collate_prompts(prompts, self.tokenizer.pad_id, "left"), self.device)
            embeds = self.prompt_embeddings(batch, memory)
            generator = None
            if settings.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(settings.seed)
            with use_adapter(self.decoder, DECODER):
                new = generate(self.decoder, inputs_embeds=embeds, attention_mask=batch.attention_mask,
                               max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                               top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
                               stop_ids=self.tokenizer.stop_ids(),
                               pad_id=self.tokenizer.pad_id, generator=generator, on_token=settings.on_token)
            return [self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in new]

    def _settings(self, max_new_tokens: int | None, **kw) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=max_new_tokens or self.config.max_new_tokens, **kw)

    def generate_from_paraphrase(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                                 max_new_tokens: int | None = None, **kw) -> list[str]:
        """Stage-1 models: restate each question's documents from their memory.

        As in the official method the question only fixes the batch; the prompt is a paraphrase
        instruction over the documents' memory.
        """
        self._check_questions(questions, documents)
        k = len(documents[0])
        memory = self.compress_documents([d for docs in documents for d in docs]).view(len(questions), k, -1,
                                                                                     self.hidden_size)
        prompts = [stage1_paraphrase_prompt(self.tokenizer, self.config, None, self.rng, k, self.texts)
                   for _ in questions]
        return self._generate_from_memory(prompts, memory, self._settings(max_new_tokens, **kw))

    def generate_from_text(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                           max_new_tokens: int | None = None, **kw) -> list[str]:
        """Answer each question from its own documents (all of them, compressed)."""
        self._check_questions(questions, documents)
        k = len(documents[0])
        memory = self.compress_documents([d for docs in documents for d in docs]).view(len(questions), k, -1,
                                                                                     self.hidden_size)
        return self.generate_from_compressed_documents_and_questions(questions, memory, max_new_tokens, **kw)

    def generate_from_compressed_documents_and_questions(self, questions: Sequence[str], compressed_documents:
                                                         torch.Tensor, max_new_tokens: int | None = None,
                                                         **kw) -> list[str]:
        """compressed_documents: [B, k, n_mem, E], or [B * k, n_mem, E] as the official method takes."""
        self._check_questions(questions, None)
        memory = compressed_documents.to(self.device)
        b = len(questions)
        if memory.dim() == 3:
            if memory.shape[0] % b:
                raise ValueError(f"{memory.shape[0]} compressed documents do not split evenly over {b} questions")
            memory = memory.view(b, memory.shape[0] // b, *memory.shape[1:])
        if memory.dim() != 4 or memory.shape[0] != b or tuple(memory.shape[2:]) != (self.config.n_mem_tokens,
                                                                                     self.hidden_size):
            raise ValueError(f"compressed_documents must be [{b}, k, {self.config.n_mem_tokens}, {self.hidden_size}], "
                             f"got {list(compressed_documents.shape)}")
        prompts = [instruction_prompt(self.tokenizer, self.config, q, None, memory.shape[1], self.texts)
                   for q in questions]
        return self._generate_from_memory(prompts, memory, self._settings(max_new_tokens, **kw))

    def generate_from_text_context(self, questions: Sequence[str], contexts: Sequence[str],
                                   max_new_tokens: int | None = None, **kw) -> list[str]:
        """Answer each question with its context (the documents' full text) written into the prompt:
        the baseline of answering from compressed documents, same template and decoder adapter."""
        self._check_questions(questions, None)
        if len(contexts) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        prompts = [instruction_prompt(self.tokenizer, self.config, q, None, 0, self.texts, context=c)
                   for q, c in zip(questions, contexts)]
        no_memory = torch.zeros(len(questions), 0, 0, self.hidden_size, device=self.device)
        return self._generate_from_memory(prompts, no_memory, self._settings(max_new_tokens, **kw))

    @torch.no_grad()
    def retrieve(self, questions: Sequence[str], candidate_memory: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of each question's candidates [B, N, n_mem, E] -> (selected [B, k, n_mem, E], idx [B, k])."""
        query = self.query_vectors(questions)
        scores = cosine_scores(query, flatten_memory(candidate_memory))
        return select_documents(scores, candidate_memory, k, self.config.retrieval_temperature)

    @torch.no_grad()
    def query_vectors(self, questions: Sequence[str]) -> torch.Tensor:
        """The query reasoner's vectors [B, n_mem * E] of questions, as MemoryIndex.search takes them."""
        if QUERY not in self.adapter_names:
            raise ValueError("this model has no query_reasoner_adapter (train stage2, or load a stage2 checkpoint)")
        with self.eval_mode():
            return self.encode_queries(_move(encoder_inputs(self.tokenizer, self.config, list(questions)),
                                             self.device))

    def generate_from_questions(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                                max_new_tokens: int | None = None, top_k: int | None = None, **kw
                                ) -> tuple[list[str], torch.Tensor]:
        """End-to-end models: pick each question's top-k documents with the query reasoner, then answer.

        Returns (answers, top-k indices [B, k] into each question's document list).
        """
        self._check_questions(questions, documents)
        k = top_k or self.config.generation_top_k
        n = len(documents[0])
        if k > n:
            raise ValueError(f"top_k={k} but each question has only {n} documents")
        memory = self.compress_documents([d for docs in documents for d in docs]).view(len(questions), n, -1,
                                                                                     self.hidden_size)
        selected, idx = self.retrieve(questions, memory, k)
        answers = self.generate_from_compressed_documents_and_questions(questions, selected, max_new_tokens, **kw)
        return answers, idx


__all__ = ["Clara", "ClaraBatch", "GenerationSettings", "LossTerm", "combine_loss_terms", "ENCODER", "DECODER",
           "QUERY", "trainable_parameters"]
