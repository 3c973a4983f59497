"""Query parameters -> the domain's request types, with the same checks as the gRPC conversion.

Each problem is an InvalidArgument naming the query parameter. Unknown parameters and repeated
single-valued ones are refused rather than ignored, so a typo (`?stat=RUNNING`) is an error and
not a silently unfiltered list.
"""

from __future__ import annotations

import datetime as dt
import re

from multidict import MultiMapping

from orchestrator import validation
from orchestrator.domain import DeviceSelector, JobFilter, JobState
from orchestrator.errors import InvalidArgument
from protos import wire

_INT = re.compile(r"[0-9]{1,19}")
_MAX_TS = dt.datetime(9999, 1, 1, tzinfo=dt.UTC).timestamp()
PAGING = ("page_size", "page_token")
JOB_FILTER = ("state", "device_id", "campaign_id", "created_after", "created_before")
SELECTOR = ("label", "base_model_id", "requires_4bit", "min_ram_bytes")
REPEATED = ("state", "label")


class Query:
    """The query string of one request, checked against the parameters its endpoint takes."""

    def __init__(self, query: MultiMapping[str], allowed: tuple[str, ...]) -> None:
        for key in query:
            if key not in allowed:
                shown = ", ".join(allowed) or "none"
                raise InvalidArgument(key[:64], f"unknown query parameter (this endpoint takes: {shown})")
            if key not in REPEATED and len(query.getall(key)) > 1:
                raise InvalidArgument(key, "given more than once")
        self.query = query

    def text(self, name: str) -> str:
        """A string parameter ("" when absent)."""
        return str(self.query.get(name, ""))

    def integer(self, name: str, maximum: int = 2**63 - 1) -> int:
        """A non-negative whole number (0 when absent)."""
        raw = self.text(name)
        if not raw:
            return 0
        if not _INT.fullmatch(raw) or int(raw) > maximum:
            raise InvalidArgument(name, f"{raw[:32]!r} is not a whole number between 0 and {maximum}")
        return int(raw)

    def flag(self, name: str) -> bool:
        """true/false/1/0 (false when absent)."""
        raw = self.text(name).lower()
        if raw in ("", "false", "0"):
            return False
        if raw in ("true", "1"):
            return True
        raise InvalidArgument(name, f"{raw[:32]!r} is not true or false")

    def time(self, name: str) -> float:
        """An RFC 3339 time (e.g. 2026-11-30T12:00:00Z) as UNIX seconds (0 when absent)."""
        raw = self.text(name)
        if not raw:
            return 0.0
        try:
            parsed = dt.datetime.fromisoformat(raw)
        except ValueError:
            raise InvalidArgument(name, f"{raw[:40]!r} is not an RFC 3339 time") from None
        if parsed.tzinfo is None:
            raise InvalidArgument(name, "needs a time zone (e.g. Z)")
        seconds = parsed.timestamp()
        if not 0 < seconds < _MAX_TS:
            raise InvalidArgument(name, "is out of range")
        return seconds

    def page(self) -> tuple[int, str]:
        """page_size and page_token."""
        return self.integer("page_size", 2**31), self.text("page_token")

    def job_filter(self) -> JobFilter:
        """The filter ListJobs and WatchJobs take: state (repeatable), device_id, campaign_id, created_after/before."""
        states = []
        for raw in self.query.getall("state", []):
            state = wire.from_pb_name(JobState, str(raw))
            if state is None:
                raise InvalidArgument("state", f"{str(raw)[:32]!r} is not one of {', '.join(JobState)}")
            states.append(state)
        return JobFilter(
            states=tuple(states),
            device_id=validation.optional_device_id(self.text("device_id"), "device_id"),
            campaign_id=validation.optional_object_id(self.text("campaign_id"), "campaign_id"),
            created_after=self.time("created_after"),
            created_before=self.time("created_before"),
        )

    def selector(self) -> DeviceSelector:
        """A device selector: label=KEY=VALUE (repeatable), base_model_id, requires_4bit, min_ram_bytes."""
        labels: dict[str, str] = {}
        for pair in self.query.getall("label", []):
            key, sep, value = str(pair).partition("=")
            if not sep:
                raise InvalidArgument("label", f"{str(pair)[:64]!r} must be KEY=VALUE")
            labels[key] = value
        return DeviceSelector(
            labels=validation.labels(labels, "label"),
            min_ram_bytes=self.integer("min_ram_bytes"),
            requires_4bit=self.flag("requires_4bit"),
            base_model_id=validation.text(self.text("base_model_id"), "base_model_id", 200),
        )
