"""Overload degrades gracefully: a flood of unverified calls from one address, too many calls
of one device, and too many watch streams are refused with RESOURCE_EXHAUSTED while everyone
else carries on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.config import Limits
from orchestrator.limits import TokenBucket
from protos.pocketlora.v1 import admin_service_pb2 as adpb
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.api import enroll, lease, submit
from tests.support.orch import ServerThread, dev_md, op_md


def code(fn: Any, request: Any, md: Any) -> grpc.StatusCode:
    try:
        fn(request, metadata=md, timeout=20)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])

    first = [bucket.take() for _ in range(4)]
    now[0] += 1.0
    refilled = [bucket.take() for _ in range(3)]
    now[0] += 100.0
    capped = [bucket.take() for _ in range(4)]

    assert first == [True, True, True, False]
    assert refilled == [True, True, False]
    assert capped == [True, True, True, False]


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    limits = Limits(
        unverified_per_s=0.5, unverified_burst=20, calls_per_device=4, watch_streams=3, watch_streams_per_operator=2
    )
    with ServerThread(tmp_path, limits=limits) as s:
        yield s


def test_a_flood_of_forged_credentials_is_cut_off_while_known_devices_carry_on(srv: ServerThread) -> None:
    md = enroll(srv, "phone-1")
    assert lease(srv, "phone-1", md) is None  # checked once: from now on its credential is cached
    assert code(srv.operator.ListJobs, opb.ListJobsRequest(), op_md()) == grpc.StatusCode.OK  # the operator's too
    forged = dev_md("phone-1", "pldev_forged")
    request = apb.HeartbeatRequest(device_id="phone-1")

    codes = [code(srv.agent.Heartbeat, request, forged) for _ in range(60)]
    during = code(srv.agent.Heartbeat, request, md)

    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) <= 21 and refused >= 39  # the burst, then the rate
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert during == grpc.StatusCode.OK
    assert code(srv.operator.ListJobs, opb.ListJobsRequest(), op_md()) == grpc.StatusCode.OK


def test_one_device_may_only_have_a_few_calls_in_flight(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    md = enroll(srv, "phone-1")
    submit(srv, "phone-1")
    a = lease(srv, "phone-1", md)
    assert a is not None
    slow = srv.orch.jobs.report_progress
    entered = threading.Semaphore(0)

    def held(*args: Any) -> Any:
        entered.release()
        time.sleep(1.5)
        return slow(*args)

    monkeypatch.setattr(srv.orch.jobs, "report_progress", held)
    report = apb.ReportProgressRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_RUNNING)

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: code(srv.agent.ReportProgress, report, md), range(6)))

    assert codes.count(grpc.StatusCode.OK) == 4 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2
    assert code(srv.agent.ReportProgress, report, md) == grpc.StatusCode.OK  # slots are given back


def test_watch_streams_are_capped_per_operator_and_in_all(srv: ServerThread) -> None:
    srv.admin.CreateOperator(adpb.CreateOperatorRequest(name="dash"), metadata=op_md())
    dash = srv.admin.CreateOperatorToken(adpb.CreateOperatorTokenRequest(operator="dash"), metadata=op_md()).token

    def open_stream(token: str) -> Any:
        stream = srv.operator.WatchJobs(opb.WatchJobsRequest(include_initial=True), metadata=op_md(token), timeout=30)
        return stream

    def first_code(stream: Any) -> grpc.StatusCode:
        try:
            next(stream, None)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    enroll(srv, "phone-1")
    submit(srv, "phone-1")  # so that an open stream yields a first message at once
    mine = [open_stream(op_md()[0][1].removeprefix("Bearer ")) for _ in range(2)]
    assert [first_code(s) for s in mine] == [grpc.StatusCode.OK] * 2
    assert first_code(open_stream(op_md()[0][1].removeprefix("Bearer "))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    theirs = open_stream(dash)
    assert first_code(theirs) == grpc.StatusCode.OK
    assert first_code(open_stream(dash)) == grpc.StatusCode.RESOURCE_EXHAUSTED  # 3 open in all

    mine[0].cancel()
    time.sleep(0.5)
    assert first_code(open_stream(dash)) == grpc.StatusCode.OK
