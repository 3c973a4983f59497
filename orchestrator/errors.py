"""The orchestrator's error tree, mapped to gRPC status codes in one place (servicers/errors.py).

OrchestratorError
├── InvalidArgument      a request field is missing or malformed (names the field)
├── NotFound             an unknown job, device, adapter or campaign id
├── AlreadyExists        a conflicting create
├── FailedPrecondition   an illegal transition, e.g. a report carrying a stale lease epoch
├── Unauthenticated      no or wrong credential
├── PermissionDenied     a valid caller acting on what is not theirs
├── ResourceExhausted    the caller is over one of its limits (too many calls, a watch that
│                        fell behind): retry later
└── Unavailable          a dependency (the adapter store, the verification task) is down, the
                         server is stopping, or what was asked for is still being made (a
                         runtime form): nothing was decided, the caller should retry the same
                         call later (maybe elsewhere)

Every error pickles to the same class and fields (PortableError), so it crosses Ray task and
actor boundaries intact.
"""

from __future__ import annotations

from typing import TypeVar

from adapters_store.errors import PortableError


class OrchestratorError(PortableError):
    """Base of every error the orchestrator reports to a caller."""


class InvalidArgument(OrchestratorError):
    """A request field is missing or malformed."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(OrchestratorError):
    """An id names nothing the orchestrator knows."""


class AlreadyExists(OrchestratorError):
    """The thing being created exists already."""


class FailedPrecondition(OrchestratorError):
    """The request is well formed but illegal in the current state."""


class Unauthenticated(OrchestratorError):
    """The caller did not prove who it is."""


class PermissionDenied(OrchestratorError):
    """The caller may not do this."""


class ResourceExhausted(OrchestratorError):
    """The caller is over one of its limits; it may retry later."""


class Unavailable(OrchestratorError):
    """Something the call needs is down for now, still being made, or the server is stopping;
    the same call may succeed later, maybe on another replica."""


T = TypeVar("T")


def found(value: T | None, what: str, ident: str) -> T:
    """The looked-up value, or NotFound naming what was looked for."""
    if value is None:
        raise NotFound(f"{what} {ident} not found")
    return value
