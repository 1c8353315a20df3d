"""The tokenizer: a `tokenizers.Tokenizer` plus what a chat model needs around it.

Three sources:
  * a Hugging Face folder (tokenizer.json, tokenizer_config.json, and special_tokens_map.json /
    generation_config.json / chat_template.jinja when present)      -> Tokenizer.from_hf_dir
  * a bare tokenizer.json (+ an optional parsed config dict)         -> Tokenizer.from_file
  * the tokenizer metadata of a GGUF file (read by clara.gguf_file): byte-level BPE rebuilt from
    `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`              -> Tokenizer.from_gguf
`load_tokenizer(path)` picks one from the path.

Around the backend: BOS/EOS/pad ids, chat templates rendered in plain Python (no Jinja) for the
formats in CHAT_FORMATS, the ids that end generation, padding into tensors, and StreamDecoder for
printing tokens as they come.

Encoding never lets the backend's post-processor add tokens; BOS is added here, and only when
`add_bos` says so. A rendered chat prompt already starts with BOS where the format writes one, so
encode it with add_bos=False (`encode_chat` does).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from clara.files import read_json
from clara.gguf_file import read_gguf

CHAT_FORMATS = ("chatml", "llama3", "llama2", "mistral", "phi3", "phi4", "phi2", "none")
ROLES = ("system", "user", "assistant")

SMOLLM_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."

# The token that closes a turn, per format; generation stops on it as well as on EOS.
END_OF_TURN = {
    "chatml": ("<|im_end|>",),
    "llama3": ("<|eot_id|>",),
    "llama2": ("</s>",),
    "mistral": ("</s>",),
    "phi3": ("<|end|>", "<|endoftext|>"),
    "phi4": ("<|end|>", "<|endoftext|>"),
    "phi2": ("<|endoftext|>",),
    "none": (),
}

# When a config names no EOS token, the first of these found in the vocabulary is taken.
_EOS_GUESSES = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")

# ---------------------------------------------------------------------------------------------
# GGUF pre-tokenizers. Each GGUF "gpt2" vocabulary names (tokenizer.ggml.pre) the split its
# merges were learned on; the regexes below are those of the models' own tokenizer.json files.
# ---------------------------------------------------------------------------------------------
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gguf_pre_tokenizer(pre: str, source: str) -> tuple[Any, bool]:
    """-> (pre_tokenizer, ignore_merges) for a GGUF `tokenizer.ggml.pre` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # Every digit alone first, then GPT-2's regex on what lies between.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in ("gpt-2", "gpt2", "default"):
        return byte_level, False
    split_regex = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split_regex is None:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: smollm, starcoder, refact, "
            "gpt-2, default, llama-bpe, qwen2 (or load the model's tokenizer.json instead)"
        )
    seq = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # Llama 3 looks a whole piece up in the vocabulary before merging (ignore_merges in its tokenizer.json).
    return seq, pre in ("llama-bpe", "llama3")


def _gguf_metadata(path_or_file) -> tuple[dict[str, Any], str]:
    """-> (metadata, source name) from a path, a parsed clara.gguf_file.GGUFFile, or a gguf.GGUFReader."""
    if isinstance(path_or_file, (str, Path)):
        path = Path(path_or_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        path_or_file = read_gguf(path)
    if isinstance(getattr(path_or_file, "metadata", None), dict):  # GGUFFile
        return path_or_file.metadata, str(path_or_file.path)
    if hasattr(path_or_file, "fields"):  # gguf.GGUFReader, whose memmap knows the file name
        source = str(getattr(getattr(path_or_file, "data", None), "filename", None) or "<GGUFReader>")
        meta = {k: f.contents() for k, f in path_or_file.fields.items() if k.startswith("tokenizer.")}
        return meta, source
    raise TypeError(f"from_gguf expects a path, a GGUFFile or a gguf.GGUFReader, got {type(path_or_file).__name__}")


# ---------------------------------------------------------------------------------------------
# Config helpers
# ---------------------------------------------------------------------------------------------
def _token_text(value) -> str | None:
    """tokenizer_config writes special tokens either as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_text(template) -> str | None:
    """chat_template is a string, or a list of {"name", "template"} of which "default" is used."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


def infer_chat_format(template: str | None, vocab: dict[str, int], tokenizer_class: str | None = None) -> str:
    """The chat format a model speaks, from its template text, else from the special tokens it has."""
    if template:
        if "<|im_start|>" in template:
            return "chatml"
        if "<|start_header_id|>" in template:
            return "llama3"
        if "<|end|>" in template and "<|assistant|>" in template:
            # Phi-3 puts a newline after each role tag; Phi-4-mini puts none.
            return "phi3" if re.search(r"<\|assistant\|>(\n|\\n|'\s*\+\s*'(\n|\\n))", template) else "phi4"
        if "[INST]" in template:
            return "llama2" if "<<SYS>>" in template else "mistral"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3"
    if "<|user|>" in vocab and "<|end|>" in vocab:
        return "phi3"
    if "[INST]" in vocab:
        return "mistral"
    if tokenizer_class == "CodeGenTokenizer":
        return "phi2"
    return "none"


def default_system_prompt_for(template: str | None, chat_format: str, vocab: dict[str, int]) -> str | None:
    """The system prompt a ChatML template inserts when the conversation brings none.

    Taken from the template when it writes one as a literal; a template without one inserts
    nothing. Without a template, the family's known default (SmolLM2, Qwen2) is used.
    """
    if chat_format != "chatml":
        return None
    if template:
        found = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<+]+?)<\|im_end\|>", template)
        return found.group(1).replace("\\n", "\n") if found else None
    if "<repo_name>" in vocab and "<jupyter_code>" in vocab:
        return SMOLLM_SYSTEM_PROMPT
    if len(vocab) > 150_000:
        return QWEN_SYSTEM_PROMPT
    return None


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
            eos_id = next((vocab[t] for t in _EOS_GUESSES if t in vocab), None)
        if eos_id is None:
            raise ValueError(f"{path}: cannot tell the end-of-sequence token; "
                             "give eos_token in tokenizer_config.json")
        bos_id = token_id("bos_token")
        bos_text = _token_text(config.get("bos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _add_bos_from_post_processor(backend, bos_text)
        template = _template_text(config.get("chat_template"))
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
        meta, source = _gguf_metadata(path_or_reader)
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise ValueError(f"{source}: no tokenizer metadata "
                             "(tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
        if model != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') can be "
                             "rebuilt from a GGUF; load the model's tokenizer.json instead")
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise ValueError(f"{source}: tokenizer.ggml.merges missing; a 'gpt2' vocabulary needs its merges")
        pre, ignore_merges = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), source)

        vocab = {tok: i for i, tok in enumerate(tokens)}
        # A merge is "left right"; byte-level symbols never hold a real space, so the first one splits.
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre
        backend.decoder = decoders.ByteLevel()
        kinds = meta.get("tokenizer.ggml.token_type") or []
        # 3 = control (<|im_start|>, ...): special, matched whole, skipped by decode.
        # 4 = user-defined: matched whole, but ordinary text.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, kinds) if kind == 3])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, kind in zip(tokens, kinds) if kind == 4])

        def token_id(key: str) -> int | None:
            i = meta.get(key)
            if i is None:
                return None
            if not 0 <= i < len(tokens):
                raise ValueError(f"{source}: {key} = {i} is outside the vocabulary (size {len(tokens)})")
            return int(i)

        eos_id = token_id("tokenizer.ggml.eos_token_id")
        if eos_id is None:
            eos_id = next((vocab[t] for t in _EOS_GUESSES if t in vocab), None)
        if eos_id is None:
            raise ValueError(f"{source}: tokenizer.ggml.eos_token_id missing "
                             "and no known EOS token in the vocabulary")
        template = meta.get("tokenizer.chat_template")
        fmt = infer_chat_format(template, vocab)
        eot = token_id("tokenizer.ggml.eot_token_id")
        return cls(
            backend, bos_id=token_id("tokenizer.ggml.bos_token_id"), eos_id=eos_id,
            pad_id=token_id("tokenizer.ggml.padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), chat_format=fmt,
            default_system_prompt=default_system_prompt_for(template, fmt, vocab),
            extra_stop_ids=[] if eot is None else [eot], source=source,
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
    def _token_or(self, i: int | None, fallback: str) -> str:
        text = self.id_to_token(i) if i is not None else None
        return text or fallback

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation as this model's prompt text (special tokens spelled out)."""
        _check_messages(messages)
        bos = self._token_or(self.bos_id, "<s>")
        eos = self._token_or(self.eos_id, "</s>")
        if self.chat_format == "chatml":
            return render_chatml(messages, add_generation_prompt, self.default_system_prompt)
        if self.chat_format == "llama3":
            return render_llama3(messages, add_generation_prompt, self._token_or(self.bos_id, "<|begin_of_text|>"))
        if self.chat_format == "llama2":
            return render_llama2(messages, bos, eos)
        if self.chat_format == "mistral":
            return render_mistral(messages, bos, eos)
        if self.chat_format in ("phi3", "phi4"):
            eos = self._token_or(self.eos_id, "<|endoftext|>")
            return render_phi3(messages, add_generation_prompt, eos, newline=self.chat_format == "phi3")
        if self.chat_format == "phi2":
            return render_phi2(messages, add_generation_prompt)
        raise ValueError(f"{self.source}: chat format {self.chat_format!r} has no chat template; "
                         f"pass chat_format= one of {', '.join(CHAT_FORMATS[:-1])}")

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
# Chat formats, in plain Python. Each mirrors the Jinja template the model family ships.
# ---------------------------------------------------------------------------------------------
def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a str, got {type(m['content']).__name__}")


def _split_system(messages) -> tuple[str | None, list[dict]]:
    """A leading system message apart from the turns; user/assistant must then alternate."""
    system, turns = None, list(messages)
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            at = i + (system is not None)
            raise ValueError(f"message {at}: expected role {expected!r} (after an optional first system message, "
                             f"turns must alternate user/assistant), got {m['role']!r}")
    return system, turns


def render_chatml(messages, add_generation_prompt: bool, default_system_prompt: str | None) -> str:
    """<|im_start|>role\\ncontent<|im_end|>\\n per message (SmolLM2, Qwen2)."""
    out = []
    if messages and messages[0]["role"] != "system" and default_system_prompt is not None:
        out.append(f"<|im_start|>system\n{default_system_prompt}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_llama3(messages, add_generation_prompt: bool, bos: str) -> str:
    """Llama 3: BOS, then <|start_header_id|>role<|end_header_id|>\\n\\n content (stripped) <|eot_id|>."""
    out = [bos] if messages else []
    out += [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages]
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def render_llama2(messages, bos: str, eos: str) -> str:
    """Llama 2 chat: the system prompt goes inside the first [INST] in a <<SYS>> block.

    Every user turn is `<s>[INST] ... [/INST]`; an assistant turn is ` answer </s>`. The prompt
    always ends with [/INST] before the answer, so there is no separate generation prompt.
    """
    system, turns = _split_system(messages)
    out = []
    for i, m in enumerate(turns):
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            out.append(f"{bos}[INST] {content.strip()} [/INST]")
        else:
            out.append(f" {content.strip()} {eos}")
    return "".join(out)


def render_mistral(messages, bos: str, eos: str) -> str:
    """Mistral Instruct (v0.2 / Mixtral template): one BOS, ` [INST] ... [/INST]`, system folded
    into the first user turn followed by a blank line; an assistant turn is ` answer</s>`."""
    system, turns = _split_system(messages)
    out = [bos]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = m["content"] if i > 0 or system is None else f"{system}\n\n{m['content']}"
            out.append(f" [INST] {content} [/INST]")
        else:
            out.append(f" {m['content']}{eos}")
    return "".join(out)


def render_phi3(messages, add_generation_prompt: bool, eos: str, newline: bool = True) -> str:
    """Phi-3: <|role|>\\ncontent<|end|>\\n; Phi-4-mini: <|role|>content<|end|> (newline=False).
    Without a generation prompt the text ends with EOS, as both templates do."""
    nl = "\n" if newline else ""
    out = [f"<|{m['role']}|>{nl}{m['content']}<|end|>{nl}" for m in messages]
    out.append(f"<|assistant|>{nl}" if add_generation_prompt else eos)
    return "".join(out)


def render_phi2(messages, add_generation_prompt: bool) -> str:
    """Phi-2 has no chat template; its model card's QA form is "Instruct: <prompt>\\nOutput:".

    A system message becomes a plain first line; each user turn is "Instruct: ...", each
    assistant turn "Output: ...", one per line; the generation prompt is a bare "Output:".
    """
    lines = []
    for m in messages:
        prefix = {"system": "", "user": "Instruct: ", "assistant": "Output: "}[m["role"]]
        lines.append(prefix + m["content"])
    text = "\n".join(lines)
    if add_generation_prompt:
        text += ("\n" if text else "") + "Output:"
    return text


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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A folder (Hugging Face layout), a tokenizer.json (its folder's tokenizer_config.json is read
    too), a .gguf file, or the alias of the embedded model (`smollm2-135m`)."""
    from clara.weights import EMBEDDED_ALIASES, embedded_model_path  # weights imports us lazily; no cycle at load

    if str(path) in EMBEDDED_ALIASES:
        return Tokenizer.from_gguf(embedded_model_path(str(path)))
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
    if path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    if path.suffix == ".json":
        if path.name == "tokenizer.json":
            return Tokenizer.from_hf_dir(path.parent)
        return Tokenizer.from_file(path)
    raise ValueError(f"{path}: expected a folder, a tokenizer.json or a .gguf file")
