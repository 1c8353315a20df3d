"""The tokenizer: a `tokenizers.Tokenizer` plus what a chat model needs around it.

Three sources:
  * a Hugging Face folder (tokenizer.json, tokenizer_config.json, and special_tokens_map.json /
    generation_config.json / chat_template.jinja when present)      -> Tokenizer.from_hf_dir
  * a bare tokenizer.json (+ an optional parsed config dict)         -> Tokenizer.from_file
  * the tokenizer metadata of a GGUF file, rebuilt by clara.gguf_tokenizer -> Tokenizer.from_gguf
`load_tokenizer(name)` picks one: a tokenizer.json path, or any model name clara.sources resolves
(the alias of the embedded model, a folder, a .gguf file, a hub repo id).

Around the backend: BOS/EOS/pad ids, the chat format (rendered by clara.chat_templates), the ids
that end generation, padding into tensors, and StreamDecoder for printing tokens as they come.

Encoding never lets the backend's post-processor add tokens; BOS is added here, and only when
`add_bos` says so. A rendered chat prompt already starts with BOS where the format writes one, so
encode it with add_bos=False (`encode_chat` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from clara.chat_templates import (
    CHAT_FORMATS,
    END_OF_TURN,
    QWEN_SYSTEM_PROMPT,
    SMOLLM_SYSTEM_PROMPT,
    default_system_prompt_for,
    infer_chat_format,
    render_chat,
    template_text,
)
from clara.files import read_json
from clara.gguf_tokenizer import read_gguf_tokenizer
from clara.sources import TOKENIZER_FILES, resolve_source

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer", "CHAT_FORMATS", "SMOLLM_SYSTEM_PROMPT",
           "QWEN_SYSTEM_PROMPT", "infer_chat_format", "default_system_prompt_for"]

# When a config names no EOS token, the first of these found in the vocabulary is taken.
_EOS_GUESSES = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def _token_text(value) -> str | None:
    """tokenizer_config writes special tokens either as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _guess_eos(vocab: dict[str, int]) -> int | None:
    return next((vocab[t] for t in _EOS_GUESSES if t in vocab), None)


def _add_bos_from_post_processor(backend: Backend, bos_token: str | None) -> bool:
    """Whether the tokenizer.json's own post-processor puts BOS first (Llama 2 and 3 do)."""
    if bos_token is None:
        return False
    post = json.loads(backend.to_str()).get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing":
            first = (proc.get("single") or [{}])[0]
            if first.get("SpecialToken", {}).get("id") == bos_token:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------
class Tokenizer:
    """A `tokenizers.Tokenizer` with BOS/EOS/pad ids, a chat format and streaming decode.

    bos_id / eos_id / pad_id: ids of those tokens (bos_id None when the model has none).
    add_bos: whether `encode` puts BOS first by default.
    chat_format: one of CHAT_FORMATS; how `apply_chat_template` renders a conversation.
    default_system_prompt: what ChatML inserts when a conversation starts without a system turn.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        eos_id: int,
        bos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_format: str = "none",
        default_system_prompt: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        source: str = "<memory>",
    ):
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"{source}: unknown chat_format {chat_format!r}; "
                             f"expected one of {', '.join(CHAT_FORMATS)}")
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.add_bos = bool(add_bos and bos_id is not None)
        self.chat_format = chat_format
        self.default_system_prompt = default_system_prompt
        self.source = source
        self._extra_stop_ids = set(extra_stop_ids)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab={len(self)}, chat_format={self.chat_format!r}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, add_bos={self.add_bos})")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, tokenizer_json: str | Path, config: dict | None = None,
                  chat_format: str | None = None, extra_stop_ids: Iterable[int] = ()) -> "Tokenizer":
        """From a tokenizer.json; `config` is the parsed tokenizer_config.json when there is one."""
        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            backend = Backend.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
        config = config or {}
        vocab = backend.get_vocab(with_added_tokens=True)

        def token_id(field: str) -> int | None:
            text = _token_text(config.get(field))
            if text is None:
                return None
            if text not in vocab:
                raise ValueError(f"{path}: config field {field} names {text!r}, which is not in the vocabulary")
            return vocab[text]

        eos_id = token_id("eos_token")
        if eos_id is None:
            eos_id = _guess_eos(vocab)
        if eos_id is None:
            raise ValueError(f"{path}: cannot tell the end-of-sequence token; "
                             "give eos_token in tokenizer_config.json")
        bos_id = token_id("bos_token")
        bos_text = _token_text(config.get("bos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _add_bos_from_post_processor(backend, bos_text)
        template = template_text(config.get("chat_template"))
        fmt = chat_format or infer_chat_format(template, vocab, config.get("tokenizer_class"))
        return cls(
            backend, bos_id=bos_id, eos_id=eos_id, pad_id=token_id("pad_token"), add_bos=add_bos,
            chat_format=fmt, default_system_prompt=default_system_prompt_for(template, fmt, vocab),
            extra_stop_ids=extra_stop_ids, source=str(path),
        )

    @classmethod
    def from_hf_dir(cls, directory: str | Path, chat_format: str | None = None) -> "Tokenizer":
        """From a Hugging Face model folder holding tokenizer.json."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: tokenizer folder not found")
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"{tokenizer_json}: not found (only tokenizer.json folders are supported, "
                                    "not sentencepiece tokenizer.model alone)")
        config: dict = {}
        if (directory / "tokenizer_config.json").is_file():
            config = read_json(directory / "tokenizer_config.json")
        if (directory / "special_tokens_map.json").is_file():
            for field, value in read_json(directory / "special_tokens_map.json").items():
                config.setdefault(field, value)
        if (directory / "chat_template.jinja").is_file() and not config.get("chat_template"):
            config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        stop: list[int] = []
        if (directory / "generation_config.json").is_file():
            eos = read_json(directory / "generation_config.json").get("eos_token_id")
            stop = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
        return cls.from_file(tokenizer_json, config=config, chat_format=chat_format, extra_stop_ids=stop)

    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """From a GGUF file's tokenizer metadata: a path, a GGUFFile already parsed by
        clara.gguf_file.read_gguf (shared with the weight loader), or an open gguf.GGUFReader.

        Only byte-level BPE vocabularies (tokenizer.ggml.model "gpt2") can be rebuilt; SentencePiece
        ones ("llama") need the model's tokenizer.json.
        """
        parts = read_gguf_tokenizer(path_or_reader)
        eos_id = parts.eos_id if parts.eos_id is not None else _guess_eos(parts.vocab)
        if eos_id is None:
            raise ValueError(f"{parts.source}: tokenizer.ggml.eos_token_id missing "
                             "and no known EOS token in the vocabulary")
        fmt = infer_chat_format(parts.chat_template, parts.vocab)
        return cls(
            parts.backend, bos_id=parts.bos_id, eos_id=eos_id, pad_id=parts.pad_id, add_bos=parts.add_bos,
            chat_format=fmt, default_system_prompt=default_system_prompt_for(parts.chat_template, fmt, parts.vocab),
            extra_stop_ids=[] if parts.eot_id is None else [parts.eot_id], source=parts.source,
        )

    # -- vocabulary -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add tokens that are always matched whole (<MEM_0>, <ENC>, ...); -> their ids.

        Tokens already present keep their id; new ones get ids from len(self) on, in order.
        """
        for t in tokens:
            if not isinstance(t, str) or not t:
                raise ValueError(f"special tokens must be non-empty strings, got {t!r}")
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return [self.backend.token_to_id(t) for t in tokens]

    # -- encode / decode ------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is a {type(t).__name__}, not a str")
        return [self._with_bos(e.ids, add_bos) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        return [self.bos_id, *ids] if add and self.bos_id is not None else list(ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation as this model's prompt text (special tokens spelled out)."""
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else None
        return render_chat(self.chat_format, messages, add_generation_prompt, bos=bos,
                           eos=self.id_to_token(self.eos_id), default_system_prompt=self.default_system_prompt,
                           source=self.source)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """apply_chat_template, then encode without adding a second BOS."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else None
        return self.encode(text, add_bos=False if bos and text.startswith(bos) else None)

    def stop_ids(self) -> set[int]:
        """Ids that end generation: EOS, the format's end-of-turn token, generation_config's extra EOS."""
        ids = {self.eos_id, *self._extra_stop_ids}
        for token in END_OF_TURN[self.chat_format]:
            i = self.token_to_id(token)
            if i is not None:
                ids.add(i)
        return ids

    # -- batching -------------------------------------------------------------------------------
    def pad_batch(self, batch: list[list[int]], side: str = "left") -> tuple[torch.LongTensor, torch.LongTensor]:
        """Pad to the longest sequence -> (ids [B, T], attention_mask [B, T]), both int64.

        Left padding keeps every sequence's last token in the last column, which generation needs.
        """
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if len(batch) == 0:
            raise ValueError("pad_batch: empty batch")
        width = max(len(seq) for seq in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            n = len(seq)
            if n == 0:
                continue
            cols = slice(width - n, width) if side == "left" else slice(0, n)
            ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, cols] = 1
        return ids, mask


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------
class StreamDecoder:
    """Turn token ids into text as they arrive, for printing while generating.

    push(id) returns only the new text, and holds it back while the tokens so far end inside a
    multi-byte character (their decode ends in U+FFFD). It decodes a short window rather than
    single tokens, so decoders that drop a leading space on the first token (SentencePiece) and
    characters split across tokens come out as decoding everything at once would give them.
    Concatenating every push() and a final flush() equals tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: text before it has been returned and is never re-decoded
        self._read = 0  # ids before this have been returned

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD, like decode)."""
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(done):]


def load_tokenizer(name: str | Path) -> Tokenizer:
    """A tokenizer.json (its folder's tokenizer_config.json is read too) or any model name
    clara.sources resolves: the embedded model's alias (`smollm2-135m`), a Hugging Face folder, a
    .gguf file, or a hub repo id (only the tokenizer files are downloaded)."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix != ".gguf":
        if path.suffix != ".json":
            raise ValueError(f"{path}: expected a folder, a tokenizer.json or a .gguf file")
        return Tokenizer.from_hf_dir(path.parent) if path.name == "tokenizer.json" else Tokenizer.from_file(path)
    source = resolve_source(name, download=TOKENIZER_FILES)
    if source.kind == "gguf":
        return Tokenizer.from_gguf(source.path)
    return Tokenizer.from_hf_dir(source.path)
