"""Credential rotation on the device survives a crash at any point of it (real server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import client as client_mod
from agent.client import DeviceClient, Refused
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, ServerThread


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "server", credential_cache_s=0) as s:
        yield s


def enrolled(srv: ServerThread, work: Path) -> DeviceClient:
    work.mkdir(exist_ok=True)
    c = DeviceClient(srv.address, "phone-1", work)
    c.enroll(ENROLL_TOKEN, tpb.Capabilities(base_model_id="tiny"))
    return c


def test_a_crash_before_the_new_credential_is_saved_keeps_the_old_one(
    srv: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = enrolled(srv, tmp_path / "phone")
    saved = (tmp_path / "phone" / "credential.json").read_text()

    def power_cut(*_: object) -> None:
        raise OSError("power cut while saving")

    monkeypatch.setattr(client_mod.os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        device.rotate_credential()
    monkeypatch.undo()

    restarted = DeviceClient(srv.address, "phone-1", tmp_path / "phone")
    assert (tmp_path / "phone" / "credential.json").read_text() == saved
    assert not restarted.lease_job().HasField("assignment")  # the old credential still works
    restarted.rotate_credential()  # and rotating again succeeds
    assert not restarted.lease_job().HasField("assignment")


def test_a_crash_after_the_new_credential_is_saved_uses_the_new_one(srv: ServerThread, tmp_path: Path) -> None:
    device = enrolled(srv, tmp_path / "phone")
    old = DeviceClient(srv.address, "phone-1", tmp_path / "phone")  # holds the old credential in memory

    device.rotate_credential()  # saved; "crash" before any call with it
    restarted = DeviceClient(srv.address, "phone-1", tmp_path / "phone")

    assert not old.lease_job().HasField("assignment")  # not yet used: the old one still works
    assert not restarted.lease_job().HasField("assignment")  # first use promotes the new one
    with pytest.raises(Refused):
        old.lease_job()
    assert oct((tmp_path / "phone" / "credential.json").stat().st_mode & 0o777) == "0o600"
