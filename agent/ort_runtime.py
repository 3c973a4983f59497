"""The onnxruntime-genai backend: a runtime bundle loaded once, .onnx_adapter files swapped per request.

The bundle (adapters_store.runtime_bundle) is the base with int4 weights and its LoRA A/B
matrices as graph inputs of symbolic rank. An adapter is an .onnx_adapter holding tensors for
those inputs (adapters_store.onnx_adapter); `og.Adapters.load` reads it beside the model, and
each generator is told which adapter it runs with (`Generator.set_active_adapter`). So unlike
the torch backend there is no shared module state: the adapter is a property of the request,
a swap is a dictionary update, and a request already running keeps its adapter whatever
happens to `active`. onnxruntime-genai refuses to unload an adapter a generator still uses;
pins make that never happen (an unloaded adapter is freed when its last request ends).

Same interface and errors as agent.runtime (agent.runtime_base), same LRU byte cap; the active
adapter and pinned ones are never evicted. Imports neither torch nor transformers: text goes
through onnxruntime-genai's own tokenizer and chat template.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import EllipsisType
from typing import Any

from adapters_store.errors import AdapterFormatError
from adapters_store.onnx_adapter import FORM_NAME, check_form
from adapters_store.runtime_bundle import read_bundle_manifest
from agent.adapter_files import manifest_fingerprint, strip_sha
from agent.residency import Residency, Resident
from agent.runtime_base import (
    AdapterLoadError,
    BadRequest,
    GenerateRequest,
    GenerationResult,
    IncompatibleAdapter,
    RuntimeClosed,
    StopScanner,
    StreamChunk,
    check_name,
    collect,
)


class OrtRuntime:
    """A runtime bundle served by onnxruntime-genai, with named, hot-swappable LoRA adapters."""

    def __init__(
        self,
        bundle_dir: Path,
        *,
        max_resident_bytes: int = 256 * 2**20,
        threads: int | None = None,
        max_concurrent: int = 1,
    ) -> None:
        import onnxruntime_genai as og

        self.bundle_dir = Path(bundle_dir)
        try:
            self.manifest = read_bundle_manifest(self.bundle_dir)
        except AdapterFormatError as exc:
            raise AdapterLoadError(str(exc)) from None
        config = og.Config(str(self.bundle_dir))
        if threads:
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self._og = og
        self._model: Any = og.Model(config)
        self._tokenizer: Any = og.Tokenizer(self._model)
        self._adapters: Any = og.Adapters(self._model)
        self._eos = {int(t) for t in self._tokenizer.eos_token_ids}
        genai = json.loads((self.bundle_dir / "genai_config.json").read_text())
        self._context = int(genai["model"].get("context_length", 2048))
        self._has_template = any(self.bundle_dir.glob("chat_template.jinja")) or _config_has_template(self.bundle_dir)
        self._og_lock = threading.Lock()  # every og.Adapters call (load, unload, binding one)
        self._slots = threading.BoundedSemaphore(max_concurrent)  # generations at once
        self._reg = Residency(max_resident_bytes)
        self._handles = itertools.count()
        self._closed = False

    @property
    def base_fingerprint(self) -> str:
        """Fingerprint of the base the bundle was exported from."""
        return self.manifest.base_fingerprint

    @property
    def active(self) -> str | None:
        """The adapter new requests use by default; None means the base model."""
        return self._reg.active

    @property
    def max_resident_bytes(self) -> int:
        """Budget of resident adapters' bytes."""
        return self._reg.max_bytes

    def resident(self) -> dict[str, int]:
        """Return resident adapters and their bytes, least recently used first."""
        return self._reg.sizes()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosed("the adapter runtime is closed")

    def _release(self, handles: list[str | None]) -> None:
        """Unload from onnxruntime-genai what the registry let go."""
        with self._og_lock:
            for handle in handles:
                if handle is not None and not self._closed:
                    self._adapters.unload(handle)

    def load(self, name: str, path: Path) -> int:
        """Load an .onnx_adapter (a file, or a folder holding adapter.onnx_adapter and maybe
        manifest.json) without activating it; return its bytes."""
        import onnxruntime as ort

        self._check_open()
        check_name(name)
        path = Path(path)
        file = path / FORM_NAME if path.is_dir() else path
        if path.is_dir():
            theirs = manifest_fingerprint(name, path)
            if theirs is not None and strip_sha(theirs) != strip_sha(self.base_fingerprint):
                raise IncompatibleAdapter(name, theirs, self.base_fingerprint)
        if not file.is_file():
            raise AdapterLoadError(f"adapter {name!r}: no {file.name} at {file.parent}")
        self._reg.check_free(name)
        try:
            params = ort.AdapterFormat.read_adapter(str(file)).get_parameters()
            check_form({k: tuple(v.shape()) for k, v in params.items()}, self.manifest)
        except AdapterFormatError as exc:
            raise AdapterLoadError(f"adapter {name!r}: {exc}") from None
        except (RuntimeError, ValueError) as exc:  # not an adapter file at all
            raise AdapterLoadError(f"adapter {name!r}: {file.name} is not an ONNX Runtime adapter: {exc}") from None
        nbytes = file.stat().st_size
        handle = f"{name}.{next(self._handles)}"  # unique per load: a drained one may linger
        with self._og_lock:
            self._check_open()
            self._adapters.load(str(file), handle)
        try:
            evicted = self._reg.add(name, handle, nbytes)
        except AdapterLoadError:  # loaded under the same name meanwhile
            self._release([handle])
            raise
        self._release(list(evicted))
        return nbytes

    def activate(self, name: str | None) -> None:
        """Make a resident adapter (or None, the base) the default for new requests."""
        self._check_open()
        self._reg.activate(name)

    def unload(self, name: str) -> None:
        """Drop a resident adapter; refuses the active one (AdapterBusy)."""
        self._check_open()
        self._release([self._reg.remove(name)])

    def _encode(self, request: GenerateRequest) -> list[int]:
        if request.chat and self._has_template:
            text = self._tokenizer.apply_chat_template(
                messages=json.dumps(request.chat_messages()), add_generation_prompt=True
            )
        else:
            text = request.prompt
        ids = [int(t) for t in self._tokenizer.encode(text)]
        if len(ids) >= self._context:
            raise BadRequest("prompt", f"{len(ids)} tokens; this model's context holds {self._context}")
        return ids

    def stream(self, request: GenerateRequest) -> Iterator[StreamChunk]:
        """Stream a reply; the adapter is pinned when iteration starts (see the module docstring)."""
        started = time.perf_counter()
        self._check_open()
        name, res = self._reg.pin(request.adapter)
        try:
            ids = self._encode(request)
            with self._slots:
                yield from self._decode(request, ids, name, res, started)
        finally:
            self._release([self._reg.unpin(res)])

    def _decode(
        self, request: GenerateRequest, ids: list[int], name: str | None, res: Resident | None, started: float
    ) -> Iterator[StreamChunk]:
        og = self._og
        params = og.GeneratorParams(self._model)
        search: dict[str, Any] = {"max_length": min(len(ids) + request.max_new_tokens, self._context)}
        if request.temperature > 0:
            search.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0)
            search["random_seed"] = request.seed
        else:
            search["do_sample"] = False
        params.set_search_options(**search)
        generator = og.Generator(self._model, params)
        if res is not None:
            with self._og_lock:
                generator.set_active_adapter(self._adapters, res.handle)
        generator.append_tokens(ids)
        detok = self._tokenizer.create_stream()
        scanner = StopScanner(request.stop)
        new: list[int] = []
        first, finish = 0.0, "length"
        while not generator.is_done():
            self._check_open()
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            first = first or time.perf_counter() - started
            if token in self._eos:
                finish = "eos"
                break
            new.append(token)
            emit = scanner.feed(detok.decode(token))
            if emit:
                yield StreamChunk(emit, len(new), name)
            if scanner.stopped:
                finish = "stop"
                break
        del generator  # releases its hold on the adapter before the pin does
        yield StreamChunk(
            scanner.flush(),
            len(new) + (finish == "eos"),
            name,
            token_ids=tuple(new),
            finish_reason=finish,
            prompt_tokens=len(ids),
            first_token_s=first,
            seconds=time.perf_counter() - started,
        )

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 48,
        adapter: str | EllipsisType | None = ...,
        chat: bool = True,
    ) -> GenerationResult:
        """Greedy-generate a reply with the adapter pinned at admission (default: the active one)."""
        started = time.perf_counter()
        request = GenerateRequest(prompt=prompt, adapter=adapter, max_new_tokens=max_new_tokens, chat=chat)
        return collect(self.stream(request), started)

    def close(self) -> None:
        """Release the model; later calls raise RuntimeClosed."""
        with self._og_lock:
            self._closed = True
        self._reg.clear()
        # Unreferenced, onnxruntime-genai frees the adapters, then the model.
        self._adapters = self._model = self._tokenizer = None

    def __enter__(self) -> OrtRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _config_has_template(bundle_dir: Path) -> bool:
    try:
        return bool(json.loads((bundle_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False
