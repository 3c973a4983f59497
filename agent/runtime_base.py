"""What every inference backend shares: the error tree, requests, results and stop strings.

    AdapterRuntimeError         base of everything raised on purpose; messages name adapter and file
    ├── AdapterLoadError        unusable adapter: pickled .bin, no safetensors, bad config or shapes
    │   └── IncompatibleAdapter trained on (or converted for) a different base
    ├── AdapterNotLoaded        the name is not resident (never loaded, unloaded or evicted)
    ├── AdapterBusy             unload of the active adapter (activate another one or None first)
    ├── BadRequest              a generation request is malformed; `field` names the culprit
    └── RuntimeClosed           close() was called

Two backends implement one interface (load / activate / unload by name, pins, an LRU byte cap,
generate and stream): agent.runtime.AdapterRuntime (transformers + peft, fp32) and
agent.ort_runtime.OrtRuntime (onnxruntime-genai). Lifecycle verbs stay separate as in peft:
`load` never activates; `unload` refuses the active adapter; a request pins its adapter at
admission, so a swap never changes the adapter of a request already running.

No heavy imports here: the idle agent and the inference server import this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Protocol

# peft stores adapters as ModuleDict keys (a '.' would break module paths); the ORT backend
# and the inference API keep the same rule so a name means the same thing everywhere.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ROLES = ("system", "user", "assistant")
MAX_NEW_TOKENS = 1024
MAX_STOPS = 8


class AdapterRuntimeError(Exception):
    """Base of the runtime's deliberate errors."""


class AdapterLoadError(AdapterRuntimeError):
    """The adapter cannot be loaded (format, config or shape problem)."""


class IncompatibleAdapter(AdapterLoadError):
    """The adapter was trained on (or converted for) a different base model."""

    def __init__(self, name: str, adapter_fingerprint: str, base_fingerprint: str) -> None:
        super().__init__(
            f"adapter {name!r} was trained on base {adapter_fingerprint}, "
            f"but this runtime serves base {base_fingerprint}"
        )
        self.adapter_fingerprint = adapter_fingerprint
        self.base_fingerprint = base_fingerprint


class AdapterNotLoaded(AdapterRuntimeError, LookupError):
    """The named adapter is not resident."""


class AdapterBusy(AdapterRuntimeError):
    """The adapter is active and cannot be unloaded."""


class BadRequest(AdapterRuntimeError):
    """A generation request is malformed; `field` names the bad field."""

    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(f"{field_name}: {why}")
        self.field = field_name


class RuntimeClosed(AdapterRuntimeError):
    """The runtime was closed."""


def check_name(name: str) -> str:
    """Return a valid adapter name or raise AdapterLoadError naming the rule."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise AdapterLoadError(f"adapter name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
    return name


@dataclass(frozen=True)
class GenerationResult:
    """Generated text, the adapter that produced it (None = base), new tokens and wall seconds."""

    text: str
    adapter: str | None
    tokens: int
    seconds: float
    first_token_s: float = 0.0
    finish_reason: str = "length"
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a prompt (chat-templated unless chat=False) or chat messages.

    `adapter`: ... (the default) uses the adapter active at admission, None the base model, a
    name that resident adapter. temperature 0 is greedy; stop strings end the reply (not
    included in it).
    """

    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    adapter: str | EllipsisType | None = ...
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    chat: bool = True

    def __post_init__(self) -> None:
        if bool(self.prompt) == bool(self.messages):
            raise BadRequest("input", "give exactly one of prompt or messages")
        for i, (role, content) in enumerate(self.messages):
            if role not in ROLES:
                raise BadRequest(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
            if not content:
                raise BadRequest(f"messages[{i}].content", "must not be empty")
        if self.messages and not self.chat:
            raise BadRequest("messages", "chat messages need the chat template (chat=True)")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise BadRequest("max_new_tokens", f"must be in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise BadRequest("temperature", f"must be in 0..2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOPS or any(not s for s in self.stop):
            raise BadRequest("stop", f"at most {MAX_STOPS} non-empty strings")
        if isinstance(self.adapter, str) and not ADAPTER_NAME.fullmatch(self.adapter):
            raise BadRequest("adapter", f"{self.adapter!r} is not an adapter name")

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation to template (a prompt becomes one user turn)."""
        if self.messages:
            return [{"role": r, "content": c} for r, c in self.messages]
        return [{"role": "user", "content": self.prompt}]


@dataclass
class StreamChunk:
    """A piece of a streamed reply; the last one has `finish_reason` set and the totals."""

    text: str
    tokens: int  # new tokens generated so far
    adapter: str | None
    finish_reason: str = ""  # "", or at the end: "eos", "length", "stop"
    prompt_tokens: int = 0
    first_token_s: float = 0.0
    seconds: float = 0.0
    token_ids: tuple[int, ...] = ()  # on the last chunk: every new token id (eos excluded)


@dataclass
class StopScanner:
    """Cuts a streamed text at the first stop string, holding back what could start one."""

    stops: Sequence[str]
    _pending: str = field(default="", init=False)
    stopped: bool = field(default=False, init=False)

    def feed(self, delta: str) -> str:
        """Add generated text; return what can be shown now (never part of a stop string)."""
        if self.stopped:
            return ""
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._pending = True, ""
            return text[:cut]
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The held-back text once generation ended without a stop."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text


def collect(chunks: Iterator[StreamChunk], started: float) -> GenerationResult:
    """Join a stream into one result (wall seconds counted from `started`, a perf_counter)."""
    import time

    parts: list[str] = []
    last: StreamChunk | None = None
    for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    assert last is not None  # every stream ends with a final chunk
    return GenerationResult(
        text="".join(parts),
        adapter=last.adapter,
        tokens=last.tokens,
        seconds=time.perf_counter() - started,
        first_token_s=last.first_token_s,
        finish_reason=last.finish_reason,
        token_ids=last.token_ids,
    )


class InferenceBackend(Protocol):
    """The interface both runtimes implement (see the module docstring)."""

    @property
    def base_fingerprint(self) -> str: ...

    @property
    def active(self) -> str | None: ...

    def resident(self) -> dict[str, int]: ...

    def load(self, name: str, path: Path) -> int: ...

    def activate(self, name: str | None) -> None: ...

    def unload(self, name: str) -> None: ...

    def stream(self, request: GenerateRequest) -> Iterator[StreamChunk]: ...

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 48,
        adapter: str | EllipsisType | None = ...,
        chat: bool = True,
    ) -> GenerationResult: ...

    def close(self) -> None: ...
