"""Enrollment against a real orchestrator that sheds load: "not now" statuses are retried with
backoff, "no" statuses end enrollment with one line for the user."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from safetensors.numpy import save_file

from agent.agent import Agent, AgentConfig, EnrollmentError
from agent.gate import Gate, GatePolicy
from agent.sensors import TraceSensors
from protos.pocketlora.v1 import operator_service_pb2 as opb
from tests.support.orch import ENROLL_TOKEN, ServerThread, op_md


class ShedEnrolls(grpc.aio.ServerInterceptor):
    """Answers the first Enroll calls with the given statuses, as an overloaded server would."""

    def __init__(self, codes: list[grpc.StatusCode]) -> None:
        self.codes = list(codes)
        self.enrolls = 0

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any) -> Any:
        if handler_call_details.method.endswith("/Enroll"):
            self.enrolls += 1
            if self.codes:
                code = self.codes.pop(0)

                async def shed(request: bytes, context: grpc.aio.ServicerContext) -> None:
                    await context.abort(code, "overloaded (shed by the test)")

                return grpc.unary_unary_rpc_method_handler(shed)
        return await continuation(handler_call_details)


def _agent(srv: ServerThread, tmp: Path, token: str = ENROLL_TOKEN) -> Agent:
    base = tmp / "base"
    base.mkdir(exist_ok=True)
    save_file({"w": np.zeros((2, 2), np.float32)}, str(base / "model.safetensors"))  # enough to fingerprint
    trace = tmp / "trace.jsonl"
    trace.write_text(json.dumps({"t": 0, "charging": True, "battery": 90, "temp_c": 30}) + "\n")
    cfg = AgentConfig(
        orchestrator=srv.address,
        device_id="busy-phone",
        work_dir=tmp / "work",
        base_model_dir=base,
        base_model_id="tiny",
        datasets_dir=tmp / "datasets",
        enrollment_token=token,
        serve_adapters=False,
    )
    return Agent(cfg, TraceSensors(trace), Gate(GatePolicy()))


def test_enrollment_waits_out_an_orchestrator_shedding_a_burst(tmp_path: Path) -> None:
    shed = ShedEnrolls([grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED])
    with ServerThread(tmp_path / "orch", interceptors=[shed]) as srv:
        agent = _agent(srv, tmp_path)
        try:
            agent.enroll()
            assert shed.enrolls == 3 and agent.client.enrolled
            devices = srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices
            assert [d.device_id for d in devices] == ["busy-phone"]
        finally:
            agent.client.close()


def test_enrollment_refused_for_good_is_one_error_not_a_retry_loop(tmp_path: Path) -> None:
    shed = ShedEnrolls([grpc.StatusCode.PERMISSION_DENIED])
    with ServerThread(tmp_path / "orch", interceptors=[shed]) as srv:
        agent = _agent(srv, tmp_path)
        try:
            with pytest.raises(EnrollmentError, match="PERMISSION_DENIED"):
                agent.enroll()
            assert shed.enrolls == 1
        finally:
            agent.client.close()
