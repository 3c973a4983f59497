"""The torch inference runtime: one resident base model, LoRA adapters hot-swapped without reloading it.

Its interface and error tree (agent.runtime_base) are shared with the onnxruntime-genai backend
(agent.ort_runtime); both are re-exported here.

Concurrency: peft keeps the active adapter as attributes on every LoRA layer (`set_adapter`
writes `_active_adapter`, `disable_adapter_layers` writes `_disable_adapters`), and its per-call
`adapter_names=` registers forward pre-hooks on those same shared modules for the call
(peft/tuners/lora/model.py `_enable_peft_forward_hooks`), so concurrent calls would see each
other's hooks. Neither is per-thread: every use of the module tree (apply + generate, load,
delete) runs under one model lock, and a request pins its adapter at admission. A swap between
requests therefore never mixes two adapters inside one; on 2 cores parallel forwards would not
be faster anyway. activate/unload never wait for a running generation.

Lifecycle verbs stay separate as in peft: `load` never activates. `unload` refuses the active
adapter (AdapterBusy) rather than silently serving the base; an adapter pinned by an in-flight
request is freed when that request ends. Over `max_resident_bytes`, least recently used adapters
are unloaded, never the active one nor a pinned one.

Slots: peft's load_adapter spends most of a swap injecting LoRA modules (~100 ms on SmolLM2,
walking the module tree many times, against ~5 ms to read and copy 1.9 MB). A freed adapter's
peft slot is kept (at most _MAX_FREE_SLOTS, within the byte budget), and a later adapter with the
same LoRA config is copied into its tensors in place after checking names and shapes. Fleet
adapters of one base share a config, so a steady-state swap is a file read and a copy.

torch, transformers and peft are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any

from adapters_store.fingerprint import model_fingerprint, read_safetensors_header
from agent.adapter_files import check_adapter_dir, manifest_fingerprint, strip_sha
from agent.residency import Residency, Resident
from agent.runtime_base import (
    AdapterBusy,
    AdapterLoadError,
    AdapterNotLoaded,
    AdapterRuntimeError,
    GenerateRequest,
    GenerationResult,
    IncompatibleAdapter,
    RuntimeClosed,
    StreamChunk,
)

__all__ = [
    "AdapterBusy",
    "AdapterLoadError",
    "AdapterNotLoaded",
    "AdapterRuntime",
    "AdapterRuntimeError",
    "GenerationResult",
    "IncompatibleAdapter",
    "RuntimeClosed",
]

_MAX_FREE_SLOTS = 2
_UNKNOWN = object()  # "which adapter the layers have applied" after peft changed it behind us


@dataclass
class _Slot:
    config_key: str
    tensors: dict[str, Any]  # saved-name -> tensor sharing storage with the LoRA parameter
    nbytes: int


class AdapterRuntime:
    """A base causal LM loaded once, serving LoRA adapters that are loaded, swapped and evicted."""

    def __init__(
        self,
        base_model_dir: Path,
        *,
        max_resident_bytes: int = 256 * 2**20,
        torch_threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)  # process-wide: torch has no per-model setting
        self._torch = torch
        self.base_model_dir = Path(base_model_dir)
        # Headers only: fails fast on a folder without safetensors weights, before the big load.
        self._base_fingerprint = model_fingerprint(self.base_model_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(self.base_model_dir)
        # LoRA layers are injected into this model in place by peft.
        model: Any = AutoModelForCausalLM.from_pretrained(self.base_model_dir, dtype=torch.float32)
        self._model: Any = model.eval()
        self._peft: Any = None  # the PeftModel wrapper, created by the first load
        self._model_lock = threading.Lock()  # every touch of module state; see module docstring
        self._reg = Residency(max_resident_bytes)  # names -> slots, LRU, active, pins
        # Guards the slot tables; never held while waiting for the model lock.
        self._state = threading.Lock()
        self._slots: dict[str, _Slot] = {}  # every adapter peft holds, bound or free
        self._free: OrderedDict[str, None] = OrderedDict()  # unbound slots, oldest first
        self._next_slot = 0
        self._applied: object = None  # slot the layers currently apply, None = base (model lock)
        self._layers_enabled = True
        self._closed = False

    @property
    def base_fingerprint(self) -> str:
        """Fingerprint of the base weights (adapters_store.fingerprint.model_fingerprint)."""
        return self._base_fingerprint

    @property
    def active(self) -> str | None:
        """The adapter new requests use by default; None means the base model."""
        return self._reg.active

    @property
    def max_resident_bytes(self) -> int:
        """Budget of resident adapters' bytes (free slots count against it too)."""
        return self._reg.max_bytes

    def resident(self) -> dict[str, int]:
        """Return resident adapters and their weight bytes, least recently used first."""
        return self._reg.sizes()

    def _free_slots(self, slots: list[str | None]) -> None:
        """Slots the registry let go become reusable (trimmed by the next model-lock holder)."""
        with self._state:
            for slot in slots:
                if slot is not None:
                    self._free[slot] = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosed("the adapter runtime is closed")

    def load(self, name: str, adapter_dir: Path, *, expected_fingerprint_check: bool = True) -> int:
        """Load an adapter from a peft folder (safetensors only) without activating it; return bytes."""
        self._check_open()
        adapter_dir = Path(adapter_dir)
        weights, config_key = check_adapter_dir(name, adapter_dir)
        if expected_fingerprint_check:
            theirs = manifest_fingerprint(name, adapter_dir)
            if theirs is not None and strip_sha(theirs) != strip_sha(self._base_fingerprint):
                raise IncompatibleAdapter(name, theirs, self._base_fingerprint)
        nbytes = weights.stat().st_size
        with self._model_lock:
            self._check_open()
            self._reg.check_free(name)
            with self._state:
                slot = next((s for s in self._free if self._slots[s].config_key == config_key), None)
                if slot is not None:
                    del self._free[slot]
            if slot is not None:
                self._overwrite_locked(name, slot, weights)
            else:
                slot = self._new_slot_locked(name, adapter_dir, weights, config_key)
            self._slots[slot].nbytes = nbytes
            self._free_slots(list(self._reg.add(name, slot, nbytes)))
            self._trim_locked()
        return nbytes

    def _new_slot_locked(self, name: str, adapter_dir: Path, weights: Path, config_key: str) -> str:
        """Inject a new peft adapter from the folder and map its tensors (model lock held)."""
        from peft import PeftModel, get_peft_model_state_dict

        slot = f"pl_{self._next_slot}"  # never collides with peft's "lora_" prefix check
        self._next_slot += 1
        # peft picks adapter_model.safetensors over a .bin (load_peft_weights) and we checked it
        # exists, so torch.load is never reached.
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self._model, str(adapter_dir), adapter_name=slot, is_trainable=False
                )
            else:
                self._peft.load_adapter(str(adapter_dir), adapter_name=slot, is_trainable=False)
            tensors = get_peft_model_state_dict(self._peft, adapter_name=slot)
            saved = set(read_safetensors_header(weights)) - {"__metadata__"}
            if saved != set(tensors):
                # peft loads with strict=False: a missing key would silently stay random.
                missing, extra = sorted(set(tensors) - saved), sorted(saved - set(tensors))
                raise AdapterLoadError(
                    f"adapter {name!r}: weights do not match its config (missing {missing[:3]}, unexpected {extra[:3]})"
                )
        except (ValueError, RuntimeError, KeyError, OSError, TypeError, AdapterLoadError) as exc:
            self._delete_slot_locked(slot)
            if isinstance(exc, AdapterLoadError):
                raise
            raise AdapterLoadError(f"adapter {name!r} from {adapter_dir}: {exc}") from exc
        finally:
            # Loading may change which adapter peft considers active; re-apply before next use.
            self._applied = _UNKNOWN
        self._slots[slot] = _Slot(config_key, tensors, 0)
        return slot

    def _overwrite_locked(self, name: str, slot: str, weights: Path) -> None:
        """Copy an adapter's weights into a free slot of the same config (model lock held)."""
        from safetensors.torch import load_file

        targets = self._slots[slot].tensors
        try:
            new = load_file(str(weights))
        except (OSError, RuntimeError, ValueError) as exc:
            with self._state:
                self._free[slot] = None  # untouched: still reusable
            raise AdapterLoadError(f"adapter {name!r}: cannot read {weights}: {exc}") from exc
        bad = sorted(k for k in targets if k not in new or new[k].shape != targets[k].shape)
        if bad or len(new) != len(targets):
            with self._state:
                self._free[slot] = None
            raise AdapterLoadError(f"adapter {name!r}: weights do not match its config (first bad tensors {bad[:3]})")
        with self._torch.no_grad():
            for key, tensor in targets.items():
                tensor.copy_(new[key])  # casts to the slot's dtype (fp32), as peft's autocast does

    def _delete_slot_locked(self, slot: str) -> None:
        """Remove a peft adapter (model lock held)."""
        self._slots.pop(slot, None)
        if self._peft is not None and slot in self._peft.peft_config:
            with warnings.catch_warnings():
                # peft re-points layers at a remaining adapter and says so; we re-apply the
                # right one before the next use anyway.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now")
                self._peft.delete_adapter(slot)
        self._applied = _UNKNOWN

    def _trim_locked(self) -> None:
        """Delete free slots beyond the count cap or the byte budget (model lock held)."""
        bound = sum(self._reg.sizes().values())
        with self._state:
            doomed = []
            free_bytes = sum(self._slots[s].nbytes for s in self._free)
            while self._free and (len(self._free) > _MAX_FREE_SLOTS or bound + free_bytes > self.max_resident_bytes):
                slot, _ = self._free.popitem(last=False)
                free_bytes -= self._slots[slot].nbytes
                doomed.append(slot)
        for slot in doomed:
            self._delete_slot_locked(slot)

    def _trim_nowait(self) -> None:
        # Never wait on a generation: whoever holds the model lock next trims for us.
        if self._model_lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._trim_locked()
            finally:
                self._model_lock.release()

    def activate(self, name: str | None) -> None:
        """Make a resident adapter (or None, the base) the default for new requests."""
        self._check_open()
        self._reg.activate(name)
        # Apply now if the model is idle, so the next request starts without the switch cost;
        # if a request is running, the next request applies its own pinned adapter anyway.
        if self._model_lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._apply_locked(self._reg.active_handle())
            finally:
                self._model_lock.release()

    def unload(self, name: str) -> None:
        """Drop a resident adapter; refuses the active one (AdapterBusy)."""
        self._check_open()
        self._free_slots([self._reg.remove(name)])  # None while pinned: the last request frees it
        self._trim_nowait()

    def _apply_locked(self, slot: str | None) -> None:
        """Point every LoRA layer at `slot`, or disable them for the base (model lock held)."""
        if self._applied is not _UNKNOWN and self._applied == slot:
            return
        if self._peft is not None:
            if slot is None:
                self._peft.base_model.disable_adapter_layers()
                self._layers_enabled = False
            else:
                if not self._layers_enabled:
                    self._peft.base_model.enable_adapter_layers()
                    self._layers_enabled = True
                self._peft.set_adapter(slot, inference_mode=True)
        self._applied = slot

    def _pin(self, adapter: str | EllipsisType | None) -> tuple[str | None, Resident | None]:
        """Resolve and pin a request's adapter at admission (default: the active one)."""
        self._check_open()
        return self._reg.pin(adapter)

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
        name, res = self._pin(adapter)
        try:
            with self._model_lock:
                self._check_open()
                self._apply_locked(None if res is None else res.handle)
                text, ids = self._generate_locked(prompt, max_new_tokens, chat)
                self._unpin(res)
                res = None
                self._trim_locked()
        finally:
            self._unpin(res)  # only when the generation raised
        eos = self._tokenizer.eos_token_id
        kept = tuple(i for i in ids if i != eos)
        finish = "eos" if len(kept) < len(ids) else "length"
        return GenerationResult(
            text, name, len(ids), time.perf_counter() - started, finish_reason=finish, token_ids=kept
        )

    def stream(self, request: GenerateRequest) -> Iterator[StreamChunk]:
        """Stream a reply token by token; the adapter is pinned when iteration starts, and the
        model stays with this request until the stream ends or is closed."""
        from agent.torch_stream import stream_tokens

        name, res = self._pin(request.adapter)
        try:
            with self._model_lock:
                self._check_open()
                self._apply_locked(None if res is None else res.handle)
                yield from stream_tokens(self._model, self._tokenizer, request, name)
        finally:
            self._unpin(res)
            self._trim_nowait()

    def _unpin(self, res: Resident | None) -> None:
        self._free_slots([self._reg.unpin(res)])

    def _generate_locked(self, prompt: str, max_new_tokens: int, chat: bool) -> tuple[str, list[int]]:
        """Tokenize, generate greedily and decode (model lock held; fast tokenizers are not
        safe to share between threads either)."""
        from transformers import GenerationConfig

        tok: Any = self._tokenizer
        if chat and tok.chat_template:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            enc = tok(text, add_special_tokens=False, return_tensors="pt")
        else:
            enc = tok(prompt, return_tensors="pt")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        n_in = enc["input_ids"].shape[1]
        # The HF model carries the injected LoRA layers; PeftModel.generate adds nothing for LoRA.
        with self._torch.inference_mode():
            out = self._model.generate(**enc, generation_config=config)
        new = out[0, n_in:]
        return str(tok.decode(new, skip_special_tokens=True)), [int(i) for i in new]

    def close(self) -> None:
        """Release the model; later calls raise RuntimeClosed."""
        with self._model_lock:
            self._closed = True
            self._peft = None
            self._model = None
            self._reg.clear()
            with self._state:
                self._slots.clear()
                self._free.clear()

    def __enter__(self) -> AdapterRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
