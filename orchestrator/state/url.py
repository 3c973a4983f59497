"""Open a state store from a URL: sqlite:///path (default) or postgresql://..."""

from __future__ import annotations

from orchestrator.errors import InvalidArgument
from orchestrator.state.base import StateStore


def open_state(url: str, *, migrate: bool = True) -> StateStore:
    """Open (and by default migrate) the store a URL names."""
    store: StateStore
    if url.startswith("sqlite:///"):
        from orchestrator.state.sqlite import SqliteStore

        path = url.removeprefix("sqlite:///")
        if not path:
            raise InvalidArgument("db", "sqlite URL needs a path: sqlite:///path/to/state.db")
        # SQLAlchemy's convention: sqlite:///relative/path and sqlite:////absolute/path.
        store = SqliteStore(path)
    elif url.startswith(("postgresql://", "postgres://")):
        from orchestrator.state.postgres import PostgresStore

        store = PostgresStore(url)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url
        raise InvalidArgument("db", f"unsupported database URL scheme {scheme!r}; use sqlite:///path or postgresql://...")
    if migrate:
        store.migrate()
    return store
