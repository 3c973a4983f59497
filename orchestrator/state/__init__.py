"""Durable orchestrator state behind one contract (base.StateStore), with SQLite and PostgreSQL."""

from orchestrator.state.base import StateStore, Tx, WatchCursor
from orchestrator.state.url import open_state

__all__ = ["StateStore", "Tx", "WatchCursor", "open_state"]
