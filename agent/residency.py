"""Which adapters a runtime holds: names, least-recently-used order, the active one and pins.

Both runtimes (agent.runtime: peft slots; agent.ort_runtime: onnxruntime-genai adapters) keep
their adapters here by name, each with the backend's own handle for it. The registry decides;
the backend frees: every method that lets an adapter go returns the handles the caller must
now release, and it never calls the backend itself (so it never waits on a model lock).

Rules: a name is loaded once (unload it first); `unload` refuses the active adapter; a request
pins its adapter when admitted, and an adapter unloaded while pinned is released when its last
pin goes; over `max_bytes`, least recently used adapters are released, never the active one, a
pinned one, nor the one just loaded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from types import EllipsisType

from agent.runtime_base import AdapterBusy, AdapterLoadError, AdapterNotLoaded


@dataclass
class Resident:
    """One loaded adapter."""

    name: str
    handle: str  # the backend's name for it (a peft adapter slot, an onnxruntime-genai adapter)
    nbytes: int
    pins: int = 0
    draining: bool = False  # unloaded while pinned: released when the last pin goes


class Residency:
    """The adapters of one runtime (thread-safe; see the module docstring)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._residents: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self._active: str | None = None

    @property
    def active(self) -> str | None:
        """The adapter new requests use by default; None means the base model."""
        return self._active

    def sizes(self) -> dict[str, int]:
        """Resident adapters and their bytes, least recently used first."""
        with self._lock:
            return {r.name: r.nbytes for r in self._residents.values()}

    def get(self, name: str) -> Resident | None:
        """The resident adapter of that name, if any."""
        with self._lock:
            return self._residents.get(name)

    def check_free(self, name: str) -> None:
        """Refuse a name that is loaded already."""
        with self._lock:
            if name in self._residents:
                raise AdapterLoadError(f"adapter {name!r} is already loaded; unload it first")

    def add(self, name: str, handle: str, nbytes: int) -> list[str]:
        """Register a loaded adapter; returns the handles evicted to stay within budget."""
        with self._lock:
            if name in self._residents:
                raise AdapterLoadError(f"adapter {name!r} is already loaded; unload it first")
            self._residents[name] = Resident(name, handle, nbytes)
            total = sum(r.nbytes for r in self._residents.values())
            evicted = []
            for res in list(self._residents.values()):
                if total <= self.max_bytes:
                    break
                if res.name in (name, self._active) or res.pins > 0:
                    continue
                del self._residents[res.name]
                evicted.append(res.handle)
                total -= res.nbytes
            return evicted

    def activate(self, name: str | None) -> str | None:
        """Make a resident adapter (or None, the base) the default; returns its handle."""
        with self._lock:
            handle = None
            if name is not None:
                res = self._residents.get(name)
                if res is None:
                    raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
                self._residents.move_to_end(name)
                handle = res.handle
            self._active = name
            return handle

    def active_handle(self) -> str | None:
        """The handle of the active adapter (None for the base)."""
        with self._lock:
            return None if self._active is None else self._residents[self._active].handle

    def remove(self, name: str) -> str | None:
        """Unload by name; returns the handle to release now (None while requests still pin it)."""
        with self._lock:
            res = self._residents.get(name)
            if res is None:
                raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
            if name == self._active:
                raise AdapterBusy(f"adapter {name!r} is active; activate another adapter or None first")
            del self._residents[name]
            if res.pins > 0:
                res.draining = True
                return None
            return res.handle

    def pin(self, adapter: str | EllipsisType | None) -> tuple[str | None, Resident | None]:
        """Resolve a request's adapter (... = the active one) and pin it for the request."""
        with self._lock:
            name = self._active if adapter is ... else adapter
            if name is None:
                return None, None
            res = self._residents.get(name)
            if res is None:
                raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
            res.pins += 1
            self._residents.move_to_end(name)
            return name, res

    def unpin(self, res: Resident | None) -> str | None:
        """End a request's pin; returns the handle to release when it was the last of a drained one."""
        if res is None:
            return None
        with self._lock:
            res.pins -= 1
            return res.handle if res.draining and res.pins == 0 else None

    def clear(self) -> None:
        """Forget everything (the runtime is closing)."""
        with self._lock:
            self._residents.clear()
            self._active = None
