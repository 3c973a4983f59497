"""A pause keeps the reason the gate gave when it asked for it (agent.agent._finish_run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.agent import test_agent as harness
from tests.agent.test_agent import LONG_SPEC, ManualClock, run_agent, submit
from tests.support.orch import ServerThread, op_md
from tests.support.waiting import wait_for

# The agent harness's fixtures: a tiny base model and a server per test.
base, srv = harness.base, harness.srv


def test_a_pause_keeps_the_gates_reason_when_the_gate_reopens_before_the_child_stops(
    srv: ServerThread, base: Path, tmp_path: Path
) -> None:
    clock = ManualClock()

    def blip(kind: str, _: dict[str, Any]) -> None:
        if kind == "pausing":  # the heat was a blip: cool again before the child has checkpointed
            clock.t = 350

    _, stop, thread, events = run_agent(srv, base, tmp_path / "blip", clock, "blip-phone", on_event=blip)
    try:
        job_id = submit(srv, "blip-phone", LONG_SPEC)
        wait_for(lambda: any(k == "progress" and d["step"] >= 2 for k, d in events), 120, "two optimizer steps")
        clock.t = 150  # 50 °C
        wait_for(lambda: any(k == "paused" for k, _ in events), 60, "the pause")
        history = srv.operator.GetJobHistory(opb.GetJobHistoryRequest(job_id=job_id), metadata=op_md())
        paused = [e.message for e in history.events if e.state == tpb.JOB_STATE_PAUSED]
        assert paused == ["paused by the device's gate (TOO_HOT)"], paused
    finally:
        stop.set()
        thread.join(60)
