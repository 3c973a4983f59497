"""PostgreSQL backend: shared by several orchestrator replicas."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row

from orchestrator import metrics
from orchestrator.state.base import StateStore, Tx
from orchestrator.state.schema import LATEST, MIGRATIONS, PostgresOnly
from orchestrator.state.sql import SqlTx
from orchestrator.state.sql_base import Dialect

# Serialises migrations across replicas starting at once (an arbitrary, fixed advisory-lock key).
_MIGRATION_LOCK = 0x706F636B6C6F7261


class PostgresDialect(Dialect):
    """PostgreSQL's flavour: row locks, SKIP LOCKED for claiming, a sequence for change_seq."""

    placeholder = "%s"
    for_update = " FOR UPDATE"
    skip_locked = " SKIP LOCKED"
    next_change_seq = "nextval('job_change_seq')"
    change_xid = "pg_current_xact_id()::text::bigint"
    xid_horizon = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    unique_errors = (psycopg.errors.UniqueViolation,)

    def minute_of(self, column: str) -> str:
        return f"FLOOR({column} / 60)::bigint"

    def json_text(self, column: str, key: str) -> str:
        return f"({column}::json ->> '{key}')"


class PostgresStore(StateStore):
    """State in PostgreSQL; one connection per thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self._conns: list[psycopg.Connection[Any]] = []
        self._conns_lock = threading.Lock()
        self._dialect = PostgresDialect()

    def _conn(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, row_factory=dict_row, autocommit=False)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One READ COMMITTED transaction; rows read for update stay locked until it ends."""
        started = time.perf_counter()
        conn = self._conn()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield SqlTx(cur, self._dialect)
        except psycopg.OperationalError:
            # A broken connection is dropped so the next call reconnects.
            conn.close()
            raise
        finally:
            metrics.transaction_seconds("postgresql", time.perf_counter() - started)

    def migrate(self, target: int = 0) -> int:
        """Apply pending migrations under an advisory lock so replicas can start together."""
        conn = self._conn()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("CREATE SEQUENCE IF NOT EXISTS job_change_seq")
            cur.execute("SELECT MAX(version) AS v FROM schema_version")
            row = cur.fetchone()
            current = int(row["v"] or 0) if row else 0
            for version in range(current + 1, (target or LATEST) + 1):
                for stmt in MIGRATIONS[version - 1]:
                    if isinstance(stmt, PostgresOnly):
                        cur.execute(stmt.sql)
                    else:
                        cur.execute(stmt.format(bigint="BIGINT", float="DOUBLE PRECISION"))
                cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        return max(current, target or LATEST)

    def close(self) -> None:
        """Close every thread's connection."""
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
