"""The orchestrator's error tree, mapped to gRPC status codes in one place (servicers/errors.py).

OrchestratorError
├── InvalidArgument      a request field is missing or malformed (names the field)
├── NotFound             an unknown job, device, adapter or campaign id
├── AlreadyExists        a conflicting create
├── FailedPrecondition   an illegal transition, e.g. a report carrying a stale lease epoch
├── Unauthenticated      no or wrong credential
├── PermissionDenied     a valid caller acting on what is not theirs
├── ResourceExhausted    the caller is over one of its limits; it may retry later
└── Unavailable          not ready yet (a runtime form being made): ask again later
"""

from __future__ import annotations

from typing import TypeVar


class OrchestratorError(Exception):
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
    """What was asked for is being produced; the caller should ask again later."""


T = TypeVar("T")


def found(value: T | None, what: str, ident: str) -> T:
    """The looked-up value, or NotFound naming what was looked for."""
    if value is None:
        raise NotFound(f"{what} {ident} not found")
    return value
