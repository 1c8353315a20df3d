"""Does the memory carry the document? The answer's NLL under four contexts.

For each row (a stage1 QA row, or a stage1_2 row: question, documents, answer) the mean per-token
negative log-likelihood of the answer, with the same decoder adapter, template and wording, given

    compressed   the row's own documents, compressed into memory slots (what CLaRa reads)
    shuffled     another row's documents, compressed (row i reads row i+1's): the diagnostic; a
                 memory that carries content makes the own documents clearly better than these
    no_context   no documents at all (the template's document field left empty)
    full_text    the documents' text, cut to doc_max_length tokens each, in the prompt

and `retained` = (no_context - compressed) / (no_context - full_text): the share of what the full
text helps that the compressed memory keeps (1 = as good as the text, 0 = no help).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clara.lora import use_adapter
from clara.model import DECODER, Clara
from clara.prompts import IGNORE_INDEX, collate_prompts, prompt_for_example, text_context_prompt

CONDITIONS = ("compressed", "shuffled", "no_context", "full_text")


@dataclass
class NLLResult:
    per_row: list[dict[str, float]]  # {condition: mean NLL of the row's answer tokens}

    def means(self) -> dict[str, float]:
        present = [c for c in CONDITIONS if c in self.per_row[0]]
        out = {f"nll_{c}": sum(row[c] for row in self.per_row) / len(self.per_row) for c in present}
        if {"no_context", "full_text", "compressed"} <= set(present):
            gain_text = out["nll_no_context"] - out["nll_full_text"]
            out["retained"] = (out["nll_no_context"] - out["nll_compressed"]) / gain_text if gain_text else float("nan")
        if {"shuffled", "compressed"} <= set(present):
            out["own_vs_shuffled"] = out["nll_shuffled"] - out["nll_compressed"]
        out["n"] = len(self.per_row)
        return out


def _row_nll(model: Clara, prompts, memory: torch.Tensor | None) -> list[float]:
    """Mean answer-token NLL of each prompt; memory [B, k, n_mem, E] fills the slots when given."""
    batch = collate_prompts(prompts, model.tokenizer.pad_id, "right")
    batch = replace(batch, input_ids=batch.input_ids.to(model.device),
                    memory_positions=batch.memory_positions.to(model.device))
    embeds = model.embed(batch.input_ids) if memory is None else model.prompt_embeddings(batch, memory)
    with use_adapter(model.decoder, DECODER):
        hidden = model.decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(model.device),
                               compute_logits=False).hidden_states
    targets = batch.labels[:, 1:].to(model.device)
    out = []
    for i in range(targets.shape[0]):
        keep = targets[i] != IGNORE_INDEX
        logits = model.decoder.compute_logits(hidden[i, :-1][keep]).float()
        out.append(float(F.cross_entropy(logits, targets[i][keep], reduction="mean")))
    return out


def _full_text(model: Clara, docs: Sequence[str]) -> str:
    """The documents as the compressor sees them: each cut to doc_max_length tokens."""
    limit = model.config.doc_max_length
    return "\n".join(model.tokenizer.decode(model.tokenizer.encode(doc, add_bos=False)[:limit]) for doc in docs)


@torch.no_grad()
def answer_nll(model: Clara, examples: Sequence[Any], batch_size: int = 4, progress: bool = True,
               conditions: Sequence[str] = CONDITIONS) -> NLLResult:
    """The NLL of each example's answer under `conditions` (default all four CONDITIONS; examples:
    stage1 QA rows or stage1_2 rows, each with the same number of documents; at least two, for
    `shuffled`)."""
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown NLL condition(s) {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}")
    examples = [e for e in examples if getattr(e, "data_type", "qa") == "qa"]
    if len(examples) < 2:
        raise ValueError(f"the NLL evaluation needs at least 2 QA or stage1_2 rows, got {len(examples)}")
    if len({len(e.docs) for e in examples}) != 1:
        raise ValueError("the NLL evaluation needs the same number of documents in every row")
    with model.eval_mode():
        k = len(examples[0].docs)
        # The template follows the rows (stage1 QA or stage1_2), whatever stage the model was saved in.
        config = replace(model.config, training_stage="stage1" if hasattr(examples[0], "data_type") else "stage1_2")
        memory = model.compress_documents([d for e in examples for d in e.docs])
        memory = memory.view(len(examples), k, -1, model.hidden_size)
        shuffled = torch.roll(memory, shifts=-1, dims=0)  # row i reads row i+1's documents
        rows: list[dict[str, float]] = []
        bar = tqdm(total=len(examples), desc="answer NLL", unit="row", disable=not progress)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            slotted = [prompt_for_example(e, model.tokenizer, config, model.rng, model.texts) for e in chunk]
            runs = {
                "compressed": lambda: _row_nll(model, slotted, memory[start:start + len(chunk)]),
                "shuffled": lambda: _row_nll(model, slotted, shuffled[start:start + len(chunk)]),
                "no_context": lambda: _row_nll(model, [text_context_prompt(e, model.tokenizer, config, "", model.texts)
                                                       for e in chunk], None),
                "full_text": lambda: _row_nll(model, [text_context_prompt(e, model.tokenizer, config,
                                                                          _full_text(model, e.docs), model.texts)
                                                      for e in chunk], None),
            }
            values = {c: runs[c]() for c in conditions}
            rows += [{c: values[c][i] for c in conditions} for i in range(len(chunk))]
            bar.update(len(chunk))
        bar.close()
    return NLLResult(rows)
