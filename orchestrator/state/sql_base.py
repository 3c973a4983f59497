"""What every SQL table module shares: the dialect and the statement helpers over a DB-API cursor."""

from __future__ import annotations

from typing import Any

from orchestrator.errors import AlreadyExists


class Dialect:
    """What differs between SQL backends."""

    placeholder = "?"
    for_update = ""  # SQLite locks the whole database for the transaction instead
    skip_locked = ""
    # change_seq must grow with every write; PostgreSQL uses a sequence shared by replicas.
    next_change_seq = "(SELECT COALESCE(MAX(change_seq), 0) + 1 FROM jobs)"
    # Watches follow (change_xid, job_id) below the oldest running transaction where commits can
    # land out of change_seq order (PostgreSQL); otherwise change_seq.
    change_xid = ""  # the expression for the writing transaction's id, when watches use it
    xid_horizon = ""  # the oldest transaction id still running
    unique_errors: tuple[type[BaseException], ...] = ()

    def minute_of(self, column: str) -> str:
        """The whole minutes (UNIX seconds / 60, rounded down) of a time column."""
        return f"CAST({column} / 60 AS INTEGER)"

    def json_text(self, column: str, key: str) -> str:
        """A top-level text field of a JSON column."""
        return f"json_extract({column}, '$.{key}')"


class SqlBase:
    """A DB-API cursor whose rows are dicts, and the dialect its statements are written in."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self.cur = cursor
        self.d = dialect

    def _q(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        self.cur.execute(sql.replace("?", self.d.placeholder), params)
        return list(self.cur.fetchall()) if self.cur.description else []

    def _insert(self, table: str, row: dict[str, Any], what: str) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        try:
            self._q(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(row.values()))
        except self.d.unique_errors as exc:
            raise AlreadyExists(f"{what} already exists") from exc

    def _lock(self, for_update: bool) -> str:
        return self.d.for_update if for_update else ""
