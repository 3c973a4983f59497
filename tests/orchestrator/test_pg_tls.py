"""PostgreSQL over SSL: the database URL's sslmode and sslrootcert reach every connection the
orchestrator opens (the store's, and the poll runner's async ones), against a server that
refuses TCP connections without SSL and holds a certificate from a CA made for the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orchestrator.state import open_state
from protos.pocketlora.v1 import agent_service_pb2 as apb
from tests.support.api import enroll, lease, submit
from tests.support.certs import TestCA
from tests.support.orch import ServerThread
from tests.support.postgres import PostgresServer, find_pg_bin

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pg-ca"))


@pytest.fixture(scope="module")
def ssl_postgres(ca: TestCA) -> Iterator[PostgresServer]:
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb) not found")
    issued = ca.issue("pg", cn="postgres", server=True)
    with PostgresServer(ssl=(issued.cert, issued.key)) as server:
        yield server


def test_sslmode_and_root_certificate_reach_every_connection(
    ssl_postgres: PostgresServer, ca: TestCA, tmp_path: Path
) -> None:
    db = ssl_postgres.create_database()
    url = f"{db}?sslmode=verify-full&sslrootcert={ca.cert_path}"
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True,)
    # The whole server, polls included (server-side functions on async connections).
    with ServerThread(tmp_path, db_url=url, lease_s=30.0) as srv:
        md = enroll(srv, "phone-1")
        job = submit(srv, "phone-1").job
        got = lease(srv, "phone-1", md)
        assert got is not None and got.job_id == job.job_id
        srv.agent.Heartbeat(apb.HeartbeatRequest(device_id="phone-1", eligible=True), metadata=md)


def test_the_url_decides_ssl_nothing_strips_it(ssl_postgres: PostgresServer, tmp_path: Path) -> None:
    db = ssl_postgres.create_database()
    # The server refuses plaintext: a store told sslmode=disable cannot connect...
    with pytest.raises(psycopg.OperationalError, match=r"no encryption|pg_hba\.conf rejects"):
        open_state(f"{db}?sslmode=disable")
    # ...and one told to verify against another CA refuses the server's certificate.
    stranger = TestCA(tmp_path / "stranger", "another CA")
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        open_state(f"{db}?sslmode=verify-full&sslrootcert={stranger.cert_path}")
