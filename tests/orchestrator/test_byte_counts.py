"""Byte counts a device reports arrive as uint64; the stores hold (and PostgreSQL's poll
functions compare) signed 64-bit integers. The largest uint64 must be clamped, never INTERNAL."""

from __future__ import annotations

from protos.pocketlora.v1 import agent_service_pb2 as apb
from tests.support.api import enroll, lease, submit
from tests.support.orch import ServerThread

HUGE = 2**64 - 1


def test_the_largest_byte_counts_are_clamped_on_every_backend(srv: ServerThread) -> None:
    md = enroll(srv, "phone-1", ram_bytes=HUGE, free_storage_bytes=HUGE, memory_budget_bytes=HUGE)
    for free in (HUGE, 1000, HUGE):  # a change in each direction is written
        srv.agent.Heartbeat(apb.HeartbeatRequest(device_id="phone-1", free_storage_bytes=free), metadata=md)
    submit(srv, "phone-1")

    assert lease(srv, "phone-1", md) is not None
