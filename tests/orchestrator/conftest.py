"""Fixtures: every state backend, so one contract suite runs against each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.state import StateStore, open_state
from tests.support.orch import FakeClock, ServerThread


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of a fresh, empty database for each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def state(state_url: str) -> Iterator[StateStore]:
    """A migrated store."""
    store = open_state(state_url)
    yield store
    store.close()


@pytest.fixture
def clock() -> FakeClock:
    """A clock the test moves by hand."""
    return FakeClock()


@pytest.fixture
def srv(tmp_path: Path, clock: FakeClock, state_url: str) -> Iterator[ServerThread]:
    """A real server on each backend: on PostgreSQL the polls run as server-side functions."""
    with ServerThread(tmp_path, db_url=state_url, clock=clock, lease_s=30.0, retry_base_s=10.0) as s:
        yield s
