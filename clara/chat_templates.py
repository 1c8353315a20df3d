"""Chat formats in plain Python (no Jinja): which format a model speaks, and the prompt text of a
conversation in it.

    fmt = infer_chat_format(template_text, vocab)           # "chatml", "llama3", ...
    text = render_chat(fmt, messages, add_generation_prompt=True, bos="<s>", eos="</s>")

Each renderer mirrors the Jinja template its model family ships (SmolLM2 and Qwen2 speak ChatML;
Llama 3; Llama 2; Mistral Instruct; Phi-3 and Phi-4-mini; Phi-2's model-card QA form). Special
tokens are spelled out in the text; the tokenizer encodes them whole.
"""

from __future__ import annotations

import re

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

# The BOS / EOS text a format writes when the tokenizer has no such token.
_DEFAULT_BOS = {"llama3": "<|begin_of_text|>"}
_DEFAULT_EOS = {"phi3": "<|endoftext|>", "phi4": "<|endoftext|>"}


# ---------------------------------------------------------------------------------------------
# Which format
# ---------------------------------------------------------------------------------------------
def template_text(template) -> str | None:
    """tokenizer_config's chat_template is a string, or a list of {"name", "template"} of which
    "default" is used."""
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
    if "<repo_name>" in vocab and "<jupyter_code>" in vocab:  # tokens only SmolLM2's vocabulary has
        return SMOLLM_SYSTEM_PROMPT
    if len(vocab) > 150_000:  # Qwen2's vocabulary; the other ChatML models have far smaller ones
        return QWEN_SYSTEM_PROMPT
    return None


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def render_chat(chat_format: str, messages: list[dict], add_generation_prompt: bool = True, *,
                bos: str | None = None, eos: str | None = None, default_system_prompt: str | None = None,
                source: str = "<tokenizer>") -> str:
    """A conversation as prompt text in `chat_format`; bos / eos are the tokenizer's own token texts
    (None: the format's usual spelling)."""
    check_messages(messages)
    bos = bos or _DEFAULT_BOS.get(chat_format, "<s>")
    eos = eos or _DEFAULT_EOS.get(chat_format, "</s>")
    if chat_format == "chatml":
        return render_chatml(messages, add_generation_prompt, default_system_prompt)
    if chat_format == "llama3":
        return render_llama3(messages, add_generation_prompt, bos)
    if chat_format == "llama2":
        return render_llama2(messages, bos, eos)
    if chat_format == "mistral":
        return render_mistral(messages, bos, eos)
    if chat_format in ("phi3", "phi4"):
        return render_phi3(messages, add_generation_prompt, eos, newline=chat_format == "phi3")
    if chat_format == "phi2":
        return render_phi2(messages, add_generation_prompt)
    raise ValueError(f"{source}: chat format {chat_format!r} has no chat template; "
                     f"pass chat_format= one of {', '.join(CHAT_FORMATS[:-1])}")


def check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a str, got {type(m['content']).__name__}")


def split_system(messages) -> tuple[str | None, list[dict]]:
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
    system, turns = split_system(messages)
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
    system, turns = split_system(messages)
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
