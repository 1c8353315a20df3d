"""The stage prompts of CLaRa and their labels, rendered through the base model's chat template.

Decoder side (what the generator reads). A document slot is `n_mem` memory placeholders and, when
`config.sep_token`, a `<SEP>`; the model writes a document's memory vectors over the
placeholders' input embeddings. Each builder returns an `EncodedPrompt`: the prompt ids (system +
user turn + the assistant header), the target ids (the answer and the end-of-turn token; empty
when the prompt is built for generation) and where the placeholders sit.

| stage | user turn | target |
|---|---|---|
| stage1, QA rows | `Background:\\n<slots>` | `Question: q\\nAnswer: a` lines, one per QA pair |
| stage1, paraphrase rows | one of `PromptTexts.paraphrase_instructions` around `<slots>` (*) | the text to restate |
| stage1_2 | `Background:\\n<slots>\\n\\nQuestion:q` with one slot per document | the answer |
| stage2 (end to end) | the same with `generation_top_k` slots (the documents the top-k selects) | the answer |

(*) picked per example with a seeded `random.Random`, so a run is reproducible.

In stage1 QA the questions are part of the target, as in the paper: the generator learns to
bring up and answer the questions a document's memory must be able to answer.

`collate_prompts` pads a list of them into `DecoderBatch` tensors: labels are -100 over the prompt
and the padding, so the loss sees only the answer and the end-of-turn token. Labels are aligned
with `input_ids` (not shifted); the loss shifts them.

Compressor side (what the encoder reads): `encoder_inputs` builds `<ENC> BOS document EOS`, left
padded to `doc_max_length + 3`, then the `n_mem` memory tokens, whose last hidden states become
the document's memory vectors.

Text from users (documents, questions, answers) may not contain the tokenizer's special-token
strings: the tokenizer would read `<MEM_0>` or `<|im_end|>` inside a document as the token
itself, moving the memory slots or ending a turn early, so such text is refused with an error
naming the field.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch

from clara.stages import get_stage
from clara.config import ENC_TOKEN, SEP_TOKEN, ClaraConfig
from clara.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of positions the loss skips (torch.nn.functional.cross_entropy's default)


# ---------------------------------------------------------------------------------------------
# Wording
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTexts:
    """Every piece of prose the prompts use; pass your own to change the wording.

    `{docs}` stands for the document slots, `{question}` for the question. The defaults are the
    official release's texts (openrlhf/models/modeling_clara.py), word for word, so an imported
    official checkpoint reads the wording it was trained on. A checkpoint records its texts.
    """

    qa_system: str = ("You are a helpful assistant. Given a document, your task is to generate some single "
                      "questions to cover all key information of the document and answer them sequentially.")
    qa_user: str = "Background:\n{docs}"
    paraphrase_system: str = ("You are a helpful assistant. Your task is follow the instructions to paraphrase "
                              "the background information.")
    paraphrase_instructions: tuple[str, ...] = (
        "Background: {docs} means the same as",
        "Background: {docs} Can you put the above sentences in your own terms?",
        "Background: {docs} Please provide a reinterpretation of the preceding background text.",
        "These two expressions are equivalent in essence:\n(1) {docs}\n(2)",
        "Background: {docs} is a paraphrase of what?",
        "Background: {docs} Could you give me a different version of the background sentences above?",
        "In other words, background: {docs} is just another way of saying:",
        "You're getting across the same point whether you say background: {docs} or",
        "Background: {docs} After unpacking the ideas in the background information above, we got:",
        "Background: {docs} Please offer a restatement of the background sentences I've just read.",
        "Background: {docs}, which also means:",
        "Strip away the mystery, and you'll find background: {docs} is simply another rendition of:",
        "The essence of background: {docs} is captured again in the following statement:",
    )
    instruction_system: str = ("You are a helpful assistant. Your task is to extract relevant information from "
                               "provided documents and to answer to questions as briefly as possible.")
    instruction_user: str = "Background:\n{docs}\n\nQuestion:{question}"

    def __post_init__(self) -> None:
        if len(self.paraphrase_instructions) == 0:
            raise ValueError("PromptTexts.paraphrase_instructions is empty")
        for name, template, keys in [("qa_user", self.qa_user, ("{docs}",)),
                                     ("instruction_user", self.instruction_user, ("{docs}", "{question}")),
                                     *((f"paraphrase_instructions[{i}]", t, ("{docs}",))
                                       for i, t in enumerate(self.paraphrase_instructions))]:
            for key in keys:
                if template.count(key) != 1:
                    raise ValueError(f"PromptTexts.{name} must contain {key} exactly once: {template!r}")


    def to_dict(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PromptTexts":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"prompt texts: unknown field(s) {', '.join(unknown)}")
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


# The official release's wording: the default, and what every imported official checkpoint reads.
OFFICIAL_TEXTS = PromptTexts()
# The wording this project used before it matched the official one: the texts of checkpoints that
# record none, and a choice for new runs (clara-train --prompt_texts plain).
PLAIN_TEXTS = PromptTexts(
    qa_system=("You are a helpful assistant. The background holds a document. Ask the questions "
               "that cover all of its key facts, one at a time, and answer each of them."),
    paraphrase_system=("You are a helpful assistant. Follow the instruction and restate the "
                       "background text faithfully."),
    paraphrase_instructions=(
        "Background:\n{docs}\nRewrite the text above in your own words.",
        "Background:\n{docs}\nSay the same thing again with different phrasing.",
        "Here is a passage: {docs}\nRestate it without changing its meaning.",
        "Background:\n{docs}\nWhat does the passage above say? Put it another way.",
        "Passage: {docs}\nGive an equivalent version of this passage.",
        "Background:\n{docs}\nExpress the same content in other words.",
        "Read this: {docs}\nNow retell its content in your own wording.",
        "Background:\n{docs}\nReword the background above, keeping every fact.",
        "The text {docs} can be restated as follows:",
        "Background:\n{docs}\nRecount the information above faithfully.",
    ),
    instruction_system=("You are a helpful assistant. Answer the question using the background "
                        "documents, as briefly as possible."),
    instruction_user="Background:\n{docs}\n\nQuestion: {question}",
)
PROMPT_TEXTS = {"official": OFFICIAL_TEXTS, "plain": PLAIN_TEXTS}
DEFAULT_TEXTS = OFFICIAL_TEXTS


def qa_target(questions: Sequence[str], answers: Sequence[str]) -> str:
    """The stage1 QA target: one `Question: q\\nAnswer: a` block per pair, joined by newlines."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if not questions:
        raise ValueError("questions: a QA example needs at least one question")
    return "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(questions, answers))


# ---------------------------------------------------------------------------------------------
# Special tokens
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of CLaRa's tokens in one tokenizer."""

    mem: tuple[int, ...]  # the n_mem ids of one slot, in order (one id repeated when shared)
    enc: int
    sep: int


def special_token_ids(tokenizer: Tokenizer, config: ClaraConfig) -> SpecialTokenIds:
    """Look the config's tokens up; refuse a tokenizer they were never added to."""
    missing = [t for t in config.special_tokens() if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(
            f"{tokenizer.source}: the tokenizer lacks CLaRa's special tokens {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}; add config.special_tokens() first "
            "(clara.weights.extend_vocabulary grows the model with them)"
        )
    return SpecialTokenIds(
        mem=tuple(tokenizer.token_to_id(t) for t in config.memory_tokens()),
        enc=tokenizer.token_to_id(ENC_TOKEN),
        sep=tokenizer.token_to_id(SEP_TOKEN),
    )


def check_plain_text(tokenizer: Tokenizer, text: str, field_name: str) -> None:
    """Refuse text that spells one of the tokenizer's special tokens (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"{field_name}: expected a str, got {type(text).__name__}")
    if "<" not in text:  # every special token we know starts with "<"; skip the scan
        return
    for token in tokenizer.backend.get_added_tokens_decoder().values():
        if token.special and token.content in text:
            raise ValueError(f"{field_name}: contains the special token {token.content!r}, which the "
                             "tokenizer would read as that token; remove or escape it")


# ---------------------------------------------------------------------------------------------
# Decoder prompts
# ---------------------------------------------------------------------------------------------
@dataclass
class EncodedPrompt:
    """One decoder example before padding.

    memory_positions[j] lists the indices in prompt_ids of slot j's placeholders (n_mem of them);
    slot j receives the j-th document's memory vectors.
    """

    prompt_ids: list[int]
    target_ids: list[int]  # answer + end-of-turn token; [] for a generation prompt
    memory_positions: list[list[int]] = field(default_factory=list)

    @property
    def n_slots(self) -> int:
        return len(self.memory_positions)


def slots_text(config: ClaraConfig, n_slots: int) -> str:
    """The placeholder text of `n_slots` documents.

    The official release always writes <SEP> here but skips one position per slot only when its
    `sep` flag is on, so with `sep=False` its later slots land one token off; we write <SEP>
    exactly when config.sep_token says so, and hand the positions over explicitly.
    """
    if n_slots < 1:
        raise ValueError(f"a prompt needs at least one document slot, got {n_slots}")
    slot = "".join(config.memory_tokens()) + (SEP_TOKEN if config.sep_token else "")
    return slot * n_slots


def _find_slots(ids: list[int], special: SpecialTokenIds, n_slots: int, where: str) -> list[list[int]]:
    """Positions of the placeholders, slot by slot; check they form the layout slots_text wrote."""
    mem_ids = set(special.mem)
    found = [i for i, t in enumerate(ids) if t in mem_ids]
    n_mem = len(special.mem)
    if len(found) != n_slots * n_mem:
        raise ValueError(f"{where}: found {len(found)} memory placeholders, expected {n_slots} slots x {n_mem}")
    slots = [found[j * n_mem:(j + 1) * n_mem] for j in range(n_slots)]
    for j, slot in enumerate(slots):
        # A template that reorders or splits the slot text would silently misplace documents.
        if slot != list(range(slot[0], slot[0] + n_mem)) or [ids[i] for i in slot] != list(special.mem):
            raise ValueError(f"{where}: document slot {j} is not {n_mem} consecutive memory tokens in order")
    return slots


def _encode_turns(tokenizer: Tokenizer, system: str, user: str, answer: str | None,
                  special: SpecialTokenIds, n_slots: int, where: str) -> EncodedPrompt:
    """Render through the chat template; the target is what the template puts after the prompt,
    cut after the first end-of-turn (or EOS) token, with EOS appended if the template writes none.

    The prompt and the target are encoded separately, so the prompt ids are exactly those that
    generation will be given.
    """
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    target_ids: list[int] = []
    if answer is not None:
        full_text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(f"{tokenizer.source}: chat format {tokenizer.chat_format!r} renders the prompt "
                             "differently once an answer follows, so the answer cannot be separated from it")
        continuation = tokenizer.encode(full_text[len(prompt_text):], add_bos=False)
        stops = tokenizer.stop_ids()
        end = next((i for i, t in enumerate(continuation) if t in stops), None)
        target_ids = continuation[:end + 1] if end is not None else [*continuation, tokenizer.eos_id]
    return EncodedPrompt(prompt_ids, target_ids, _find_slots(prompt_ids, special, n_slots, where))


def _documents_field(tokenizer: Tokenizer, config: ClaraConfig, n_docs: int, context: str | None
                     ) -> tuple[str, int]:
    """(what fills `{docs}`, the number of slots in it): n_docs memory slots, or the plain text
    `context` (no slot) for the text baselines of text_context_prompt."""
    if context is None:
        return slots_text(config, n_docs), n_docs
    check_plain_text(tokenizer, context, "docs")
    return context, 0


def stage1_qa_prompt(tokenizer: Tokenizer, config: ClaraConfig, questions: Sequence[str],
                     answers: Sequence[str], n_docs: int = 1, texts: PromptTexts = DEFAULT_TEXTS, *,
                     context: str | None = None) -> EncodedPrompt:
    """Stage 1, QA rows: from the memory of `n_docs` documents, ask and answer their questions
    (from the text `context` instead, when given)."""
    for i, q in enumerate(questions):
        check_plain_text(tokenizer, q, f"question[{i}]")
    for i, a in enumerate(answers):
        check_plain_text(tokenizer, a, f"answers[{i}]")
    special = special_token_ids(tokenizer, config)
    docs, n_slots = _documents_field(tokenizer, config, n_docs, context)
    user = texts.qa_user.replace("{docs}", docs)
    return _encode_turns(tokenizer, texts.qa_system, user, qa_target(questions, answers), special,
                         n_slots, "stage1 QA prompt")


def stage1_paraphrase_prompt(tokenizer: Tokenizer, config: ClaraConfig, target: str | None,
                             rng: random.Random, n_docs: int = 1, texts: PromptTexts = DEFAULT_TEXTS
                             ) -> EncodedPrompt:
    """Stage 1, paraphrase rows: restate the documents from their memory.

    One instruction is drawn from texts.paraphrase_instructions with `rng` (one draw per call, so a
    seeded generator gives the same choices in the same order). target None: a generation prompt.
    """
    if target is not None:
        check_plain_text(tokenizer, target, "answers[0]")
    special = special_token_ids(tokenizer, config)
    instruction = texts.paraphrase_instructions[rng.randrange(len(texts.paraphrase_instructions))]
    user = instruction.replace("{docs}", slots_text(config, n_docs))
    return _encode_turns(tokenizer, texts.paraphrase_system, user, target, special, n_docs,
                         "stage1 paraphrase prompt")


def instruction_prompt(tokenizer: Tokenizer, config: ClaraConfig, question: str, answer: str | None,
                       n_docs: int, texts: PromptTexts = DEFAULT_TEXTS, *, context: str | None = None
                       ) -> EncodedPrompt:
    """Stage 1_2: answer `question` from the memory of `n_docs` documents (from the text `context`
    instead, when given). answer None: generation."""
    check_plain_text(tokenizer, question, "question")
    if answer is not None:
        check_plain_text(tokenizer, answer, "answer")
    special = special_token_ids(tokenizer, config)
    docs, n_slots = _documents_field(tokenizer, config, n_docs, context)
    # Substitute the question last, so a question that happens to spell "{docs}" stays as typed.
    user = texts.instruction_user.replace("{docs}", docs, 1)
    user = user.replace("{question}", question, 1)
    return _encode_turns(tokenizer, texts.instruction_system, user, answer, special, n_slots,
                         "instruction prompt")


def end_to_end_prompt(tokenizer: Tokenizer, config: ClaraConfig, question: str, answer: str | None,
                      texts: PromptTexts = DEFAULT_TEXTS) -> EncodedPrompt:
    """Stage 2: the instruction prompt over the generation_top_k documents the retriever selects."""
    return instruction_prompt(tokenizer, config, question, answer, config.generation_top_k, texts)


def prompt_for_example(example: Any, tokenizer: Tokenizer, config: ClaraConfig, rng: random.Random,
                       texts: PromptTexts = DEFAULT_TEXTS) -> EncodedPrompt:
    """The training prompt of one example of clara.data.formats, by config.training_stage.

    Stage1 paraphrase rows restate `answers[0]`, the text the official data puts there (the
    documents themselves); stage2 uses generation_top_k slots whatever the number of candidates.
    """
    stage = get_stage(config.training_stage)
    if not stage.generates:
        raise ValueError(f"training_stage {stage.name!r} trains retrieval only and has no decoder prompt")
    if stage.typed_rows:
        if example.data_type == "paraphrase":
            return stage1_paraphrase_prompt(tokenizer, config, example.answers[0], rng, len(example.docs), texts)
        return stage1_qa_prompt(tokenizer, config, example.questions, example.answers, len(example.docs), texts)
    if stage.retrieves:  # the generator reads the generation_top_k documents the retriever picks
        return end_to_end_prompt(tokenizer, config, example.question, example.answer, texts)
    return instruction_prompt(tokenizer, config, example.question, example.answer, len(example.docs), texts)


def text_context_prompt(example: Any, tokenizer: Tokenizer, config: ClaraConfig, context: str,
                        texts: PromptTexts = DEFAULT_TEXTS) -> EncodedPrompt:
    """The prompt `prompt_for_example` builds for a stage1 QA row or a stage1_2 row, with the text
    `context` where the document slots would be: the documents' full text, or "" for no context.
    The baselines of a compressed prompt: the same template, wording and answer."""
    if getattr(example, "data_type", None) == "qa":
        return stage1_qa_prompt(tokenizer, config, example.questions, example.answers, texts=texts, context=context)
    if getattr(example, "data_type", None) is not None:
        raise ValueError("text_context_prompt: paraphrase rows have no text-context baseline")
    return instruction_prompt(tokenizer, config, example.question, example.answer, 0, texts, context=context)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
@dataclass
class DecoderBatch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE_INDEX over prompt and padding
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    memory_positions: torch.Tensor  # [B, k, n_mem] long: columns of input_ids holding placeholders
    truncated: torch.Tensor  # [B] bool: the target was cut to fit max_len


def collate_prompts(prompts: Sequence[EncodedPrompt], pad_id: int, padding_side: str = "right",
                    max_len: int | None = None) -> DecoderBatch:
    """Pad encoded prompts into one batch.

    Training pads on the right; generation on the left, so every prompt ends in the last column.
    Truncation (max_len, in tokens, prompt + target): the prompt is never cut, since it holds the
    memory slots; the target keeps its first max_len - len(prompt) tokens. A cut target loses its
    end-of-turn token, so the model is not taught to stop mid-answer. A prompt that leaves no room
    for at least one target token is an error.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not prompts:
        raise ValueError("collate_prompts: empty batch")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    slot_shapes = {(len(p.memory_positions), len(p.memory_positions[0]) if p.memory_positions else 0)
                   for p in prompts}
    if len(slot_shapes) != 1:
        raise ValueError(f"examples of one batch need the same number of document slots, got "
                         f"{sorted(s[0] for s in slot_shapes)}")
    rows, keeps, truncated = [], [], []
    for i, p in enumerate(prompts):
        keep = len(p.target_ids)
        if max_len is not None:
            room = max_len - len(p.prompt_ids)
            if room < (1 if p.target_ids else 0):
                raise ValueError(f"example {i}: the prompt has {len(p.prompt_ids)} tokens, leaving no room for "
                                 f"the answer within max_len {max_len}; raise max_len or use fewer documents")
            keep = min(keep, room)
        rows.append(p.prompt_ids + p.target_ids[:keep])
        keeps.append(keep)
        truncated.append(keep < len(p.target_ids))

    width = max(len(r) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    memory_positions = torch.empty((b, *slot_shapes.pop()), dtype=torch.long)
    for i, (p, row, keep) in enumerate(zip(prompts, rows, keeps)):
        start = width - len(row) if padding_side == "left" else 0
        input_ids[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, start:start + len(row)] = 1
        answer_start = start + len(p.prompt_ids)
        labels[i, answer_start:answer_start + keep] = torch.tensor(p.target_ids[:keep], dtype=torch.long)
        memory_positions[i] = torch.tensor(p.memory_positions, dtype=torch.long) + start
    return DecoderBatch(input_ids, labels, attention_mask, memory_positions, torch.tensor(truncated))


# ---------------------------------------------------------------------------------------------
# Compressor inputs
# ---------------------------------------------------------------------------------------------
@dataclass
class EncoderBatch:
    input_ids: torch.Tensor  # [N, doc_max_length + 3 + n_mem] long
    attention_mask: torch.Tensor  # [N, same] long
    memory_positions: torch.Tensor  # [N, n_mem] long: the last n_mem columns
    truncated: torch.Tensor  # [N] bool: the document had more than doc_max_length tokens


def encoder_bos_id(tokenizer: Tokenizer) -> int | None:
    """The BOS of the encoder input: the tokenizer's, else <|im_start|> (Qwen, as the official
    release), else None."""
    if tokenizer.bos_id is not None:
        return tokenizer.bos_id
    return tokenizer.token_to_id("<|im_start|>")


def encoder_inputs(tokenizer: Tokenizer, config: ClaraConfig, documents: Sequence[str]) -> EncoderBatch:
    """`<ENC> BOS document EOS`, left padded to doc_max_length + 3, then the n_mem memory tokens.

    BOS: `encoder_bos_id`: the tokenizer's own (SmolLM2 names <|im_start|>), else <|im_start|>
    where the tokenizer has it (Qwen2 has no BOS: the official code takes its first additional
    special token, <|im_start|>), else none, and the row gets one more pad: the document budget
    stays doc_max_length.
    Truncation keeps the first doc_max_length document tokens and always keeps EOS (the official
    code truncates the whole string, which drops EOS from long documents).
    Left padding puts the memory tokens right after EOS; positions count real tokens only (the
    decoder's default position_ids), so padding changes no position either way.
    An empty document is allowed: its memory tokens read `<ENC> BOS EOS`.
    """
    if isinstance(documents, str):
        raise TypeError("encoder_inputs expects a list of documents, got a single str")
    if len(documents) == 0:
        raise ValueError("encoder_inputs: no documents")
    for i, doc in enumerate(documents):
        check_plain_text(tokenizer, doc, f"documents[{i}]")
    special = special_token_ids(tokenizer, config)
    width = config.doc_max_length + 3
    n_mem = config.n_mem_tokens
    bos_id = encoder_bos_id(tokenizer)
    bos = [bos_id] if bos_id is not None else []
    encoded = tokenizer.encode_batch(list(documents), add_bos=False)

    n = len(documents)
    input_ids = torch.full((n, width + n_mem), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width + n_mem), dtype=torch.long)
    for i, ids in enumerate(encoded):
        row = [special.enc, *bos, *ids[:config.doc_max_length], tokenizer.eos_id]
        input_ids[i, width - len(row):width] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    input_ids[:, width:] = torch.tensor(special.mem, dtype=torch.long)
    memory_positions = torch.arange(width, width + n_mem, dtype=torch.long).expand(n, n_mem).clone()
    truncated = torch.tensor([len(ids) > config.doc_max_length for ids in encoded])
    return EncoderBatch(input_ids, attention_mask, memory_positions, truncated)
