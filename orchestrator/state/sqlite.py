"""SQLite backend: one file, WAL, the embedded default for one orchestrator process."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.state.base import StateStore, Tx
from orchestrator.state.schema import LATEST, MIGRATIONS
from orchestrator.state.sql import Dialect, SqlTx


class SqliteDialect(Dialect):
    """SQLite's flavour: `?` placeholders, whole-database write locks."""

    unique_errors = (sqlite3.IntegrityError,)


def _dict_factory(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


class SqliteStore(StateStore):
    """State in one SQLite file, shared by the threads of one process."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self.url = f"sqlite:///{self.path}"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # One connection serialised by a lock: SQLite admits one writer at a time anyway, and
        # BEGIN IMMEDIATE below makes every transaction a writer so read-modify-write is safe.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = _dict_factory
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a transaction acknowledged to a client survives power loss, not only kill -9.
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._dialect = SqliteDialect()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One BEGIN IMMEDIATE ... COMMIT, rolled back on an exception."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield SqlTx(cur, self._dialect)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def migrate(self) -> int:
        """Apply pending migrations, each in its own transaction."""
        with self._lock:
            self._conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._conn.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
            current = int(row["v"] or 0)
            for version in range(current + 1, LATEST + 1):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in MIGRATIONS[version - 1]:
                        self._conn.execute(stmt.format(bigint="INTEGER", float="REAL"))
                    self._conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            return LATEST

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
