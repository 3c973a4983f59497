"""The adapter store's error tree; every failure a caller can act on has its own type.

    StoreError                  base: anything the store refuses or cannot do
    ├── BlobNotFound            the key holds no object
    ├── IntegrityError          an object is missing, too large, or its bytes are not the ones announced
    ├── AdapterFormatError      a file is not a well-formed PocketLoRA adapter (or not safetensors)
    │   └── IncompatibleForm    an adapter cannot take a bundle's runtime form (other base, targets, rank)
    ├── TransferError           a presigned upload/download got a non-2xx HTTP answer
    ├── InvalidKey              a key is malformed (leading '/', '..', empty segment, bad charset)
    ├── StoreConfigError        a store URL or its environment is incomplete or wrong
    └── StoreUnavailable        the store cannot be reached or failed on its side: nothing was
                                decided, the same call may succeed later

Messages name the field or key at fault and never contain credentials, URL signatures or
local paths. Every error survives pickling (PortableError): verification runs as a Ray task,
and its errors must reach the caller as the same class with the same fields.
"""

from __future__ import annotations

from typing import Any, Literal

IntegrityReason = Literal["missing", "size_mismatch", "sha256_mismatch", "too_large"]


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """Recreate a PortableError without its __init__: same class, message and fields."""
    exc = cls.__new__(cls)
    BaseException.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class PortableError(Exception):
    """An error that pickles and unpickles to the same class, message and fields.

    Exception's own pickling calls `cls(*self.args)`, which breaks for any __init__ whose
    parameters are not the message (IntegrityError(key, reason, detail)); Ray then raises a
    wrapper the caller's `except` never matches. This rebuilds the object without __init__.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class StoreError(PortableError):
    """Base class of every adapter store error."""


class BlobNotFound(StoreError):
    """The key holds no object."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no object at key {key!r}")
        self.key = key


class IntegrityError(StoreError):
    """An object is missing or differs from the size/sha256 it was announced with."""

    def __init__(self, key: str, reason: IntegrityReason, detail: str = "") -> None:
        msg = f"integrity check failed for {key!r}: {reason}"
        super().__init__(f"{msg} ({detail})" if detail else msg)
        self.key = key
        self.reason: IntegrityReason = reason


class AdapterFormatError(StoreError):
    """A file is not a well-formed PocketLoRA adapter blob, manifest or safetensors file."""


class IncompatibleForm(AdapterFormatError):
    """A well-formed adapter that a runtime bundle cannot serve; the message says why."""


class TransferError(StoreError):
    """A presigned-URL transfer failed; `status` is the HTTP status (0 if no answer came)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


class InvalidKey(StoreError):
    """A blob key is malformed."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"invalid key {key!r}: {why}")
        self.key = key


class StoreConfigError(StoreError):
    """A store URL or the environment it reads is incomplete or wrong."""


class StoreUnavailable(StoreError):
    """The store is unreachable or failed on its side (an outage, not a verdict on the data)."""
