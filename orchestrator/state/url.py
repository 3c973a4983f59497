"""Open a state store from a URL: sqlite:///path (default) or postgresql://..."""

from __future__ import annotations

from orchestrator.errors import InvalidArgument
from orchestrator.state.base import StateStore


def open_state(url: str, *, migrate: bool = True) -> StateStore:
    """Open (and by default migrate) the store a URL names."""
    store: StateStore
    if url.startswith("sqlite:///"):
        from orchestrator.state.sqlite import SqliteStore

        path, _, query = url.removeprefix("sqlite:///").partition("?")
        if not path:
            raise InvalidArgument("db", "sqlite URL needs a path: sqlite:///path/to/state.db")
        options = dict(part.partition("=")[::2] for part in query.split("&") if part)
        unknown = set(options) - {"synchronous"}
        if unknown:
            raise InvalidArgument("db", f"unknown sqlite URL option(s) {sorted(unknown)}; supported: synchronous")
        # FULL (default): an acknowledged commit survives power loss. NORMAL: in WAL mode it
        # survives a crash of the process (kill -9) but the last commits may be lost with power.
        synchronous = options.get("synchronous", "FULL").upper()
        if synchronous not in ("FULL", "NORMAL"):
            raise InvalidArgument("db", f"synchronous={synchronous!r}: use FULL or NORMAL")
        # SQLAlchemy's convention: sqlite:///relative/path and sqlite:////absolute/path.
        store = SqliteStore(path, synchronous=synchronous)
    elif url.startswith(("postgresql://", "postgres://")):
        from orchestrator.state.postgres import PostgresStore

        store = PostgresStore(url)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url
        raise InvalidArgument(
            "db", f"unsupported database URL scheme {scheme!r}; use sqlite:///path or postgresql://..."
        )
    if migrate:
        store.migrate()
    return store
