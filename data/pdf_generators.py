"""Text generators that write QA pairs and paraphrases for the PDF pipeline.

Anything with `complete(prompt) -> str` will do. Two are provided:
- `OpenAICompatibleGenerator`: POST /chat/completions to a server (OpenAI, vLLM, llama.cpp,
  Ollama, ...). Its URL and key come from the environment only, never from files or flags, so a
  key never lands in a shell history, a config file or a log line.
- `LocalModelGenerator`: a base model loaded with `clara.weights.load_base` and prompted through its
  chat template by `clara.generate.generate_text`; imported on first use so that extraction and
  chunking work without the model code.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from clara.errors import InputError

URL_ENV = "NUTRIBOT_LLM_URL"
KEY_ENV = "NUTRIBOT_LLM_KEY"
MODEL_ENV = "NUTRIBOT_LLM_MODEL"
_RETRYABLE_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}


@runtime_checkable
class TextGenerator(Protocol):
    def complete(self, prompt: str) -> str: ...


class GeneratorError(InputError, RuntimeError):
    """The generator could not produce any reply (as opposed to a reply we cannot parse)."""


@dataclass(frozen=True)
class HttpGeneratorConfig:
    base_url: str  # e.g. http://localhost:8080/v1 ; "/chat/completions" is appended
    model: str
    api_key: str | None = None  # local servers often need none
    timeout_s: float = 60.0
    max_attempts: int = 4  # tries per prompt for network errors, 429 and 5xx answers
    backoff_s: float = 1.0  # first wait between tries; doubles each time
    temperature: float = 0.7
    max_tokens: int = 512

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlparse(self.base_url).scheme
        if scheme not in ("http", "https"):
            # urllib would also open file:// URLs; a generator must only ever talk HTTP.
            raise ValueError(f"{URL_ENV} must be an http:// or https:// URL, got scheme {scheme!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")

    @classmethod
    def from_env(cls, model: str | None, env: Mapping[str, str] = os.environ,
                 **settings) -> "HttpGeneratorConfig":
        url = env.get(URL_ENV, "").strip()
        if not url:
            raise ValueError(
                f"set {URL_ENV} to the base URL of an OpenAI-compatible server "
                f"(e.g. http://localhost:8080/v1), and {KEY_ENV} to its API key if it needs one"
            )
        model = model or env.get(MODEL_ENV, "").strip()
        if not model:
            raise ValueError(f"name the model with --llm_model or {MODEL_ENV}")
        return cls(base_url=url, model=model, api_key=env.get(KEY_ENV) or None, **settings)

    @property
    def endpoint(self) -> str:
        url = self.base_url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"


class OpenAICompatibleGenerator:
    def __init__(self, config: HttpGeneratorConfig, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self._sleep = sleep  # injectable so tests of the retry path do not wait

    def _request(self, prompt: str) -> urllib.request.Request:
        body = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return urllib.request.Request(
            self.config.endpoint, data=json.dumps(body).encode("utf-8"), headers=headers,
            method="POST",
        )

    @staticmethod
    def _content(payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise GeneratorError(f"reply is not a chat completion ({type(exc).__name__})") from exc
        if not isinstance(content, str):
            raise GeneratorError("reply's choices[0].message.content is not a string")
        return content

    def complete(self, prompt: str) -> str:
        last_error = ""
        for attempt in range(self.config.max_attempts):
            wait = self.config.backoff_s * 2 ** attempt
            try:
                with urllib.request.urlopen(self._request(prompt),
                                            timeout=self.config.timeout_s) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}"
                if exc.code not in _RETRYABLE_HTTP:
                    raise GeneratorError(f"{self.config.endpoint} answered {last_error}") from exc
                wait = max(wait, _retry_after_s(exc.headers))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt + 1 < self.config.max_attempts:
                self._sleep(wait)
        raise GeneratorError(
            f"{self.config.endpoint} failed {self.config.max_attempts} time(s); last: {last_error}"
        )


def _retry_after_s(headers) -> float:
    """Seconds a 429/503 answer asks us to wait (capped at a minute); 0 when it does not say."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(max(float(value), 0.0), 60.0)
    except (TypeError, ValueError):
        return 0.0


class LocalModelGenerator:
    """A base model from `clara.weights.load_base`, prompted with its chat template."""

    def __init__(self, model_path: str, max_new_tokens: int = 512, temperature: float = 0.7,
                 seed: int = 0):
        self.model_path = model_path
        self.max_new_tokens = max_new_tokens
        # Sampling, not greedy: a retry after a malformed reply must be able to differ from it.
        self.temperature = temperature
        self._next_seed = seed  # one seed per call: a rerun of the pipeline gives the same rows
        self._model = None
        self._tokenizer = None

    def load(self) -> None:
        """Load the model now (it loads on the first prompt otherwise)."""
        from clara.weights import load_base  # -> (decoder, tokenizer with its chat template)

        if self._model is None:
            self._model, self._tokenizer = load_base(self.model_path)

    def complete(self, prompt: str) -> str:
        self.load()
        from clara.generate import generate_text

        seed, self._next_seed = self._next_seed, self._next_seed + 1
        return generate_text(self._model, self._tokenizer, prompt,
                             max_new_tokens=self.max_new_tokens, chat=True,
                             temperature=self.temperature, seed=seed)
