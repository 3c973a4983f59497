"""The audit log: every mutating call appends who, when, what, on what, and how it ended.

A change and its audit event are written in the same transaction, so one never exists without
the other. A call that is refused (a role too low, a takeover attempt, a bad argument) changes
nothing; its refusal is appended in a transaction of its own. Calls without a proven identity
(a wrong token) are not recorded here: they are bounded by rate limits and logged instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from orchestrator import validation
from orchestrator.access_records import AuditEvent, AuditFilter
from orchestrator.domain import new_id
from orchestrator.errors import OrchestratorError
from orchestrator.state.base import StateStore, Tx


@dataclass(frozen=True)
class Actor:
    """Who is acting: an operator (by name), a device (by id) or the bootstrap token."""

    kind: str  # operator | device | bootstrap
    name: str


def record(tx: Tx, at: float, actor: Actor, action: str, target: str, result: str = "OK", detail: str = "") -> None:
    """Append an event in the caller's transaction."""
    # Refusals record what the caller sent, control characters and all: cleaned, never refused.
    clean = validation.device_text
    event = AuditEvent(
        new_id("aud"), at, clean(actor.name, 200), actor.kind, action, clean(target, 200), result, clean(detail, 500)
    )
    tx.append_audit(event)


def result_of(exc: OrchestratorError) -> str:
    """The result an audit event records for a refused call (the error's class name)."""
    return type(exc).__name__


class AuditLog:
    """Reading the log, and recording refusals."""

    def __init__(self, state: StateStore, clock: Callable[[], float]) -> None:
        self.state = state
        self.clock = clock

    def refused(self, actor: Actor, action: str, target: str, exc: OrchestratorError) -> None:
        """Append a refused call in a transaction of its own."""
        with self.state.transaction() as tx:
            record(tx, self.clock(), actor, action, target, result_of(exc), str(exc))

    def list(self, flt: AuditFilter, page_size: int, page_token: str) -> tuple[list[AuditEvent], str]:
        """A page of events, newest first; the token is the last event id of the previous page."""
        size = validation.page_size(page_size)
        validation.optional_object_id(page_token, "page_token")
        for field in ("actor", "action", "target"):
            validation.text(getattr(flt, field), f"filter.{field}", 200)
        with self.state.transaction() as tx:
            events = tx.list_audit(flt, size + 1, page_token)
        return events[:size], (events[size - 1].event_id if len(events) > size else "")
