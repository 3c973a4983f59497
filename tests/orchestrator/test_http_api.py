"""The HTTP API against a real server: the same answers as OperatorService, the same auth and
validation (errors name the query parameter), the event stream fed by the shared change feed."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, OPERATOR_TOKEN, ServerThread, dev_md, op_md

SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(tmp_path_factory.mktemp("http"), http=True, lease_s=600.0) as s:
        caps = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30, labels={"tier": "beta"})
        for device in ("phone-a", "phone-b"):
            reply = s.agent.Enroll(apb.EnrollRequest(device_id=device, capabilities=caps), metadata=op_md(ENROLL_TOKEN))
            s.creds = {**getattr(s, "creds", {}), device: reply.device_credential}  # type: ignore[attr-defined]
        for device in ("phone-a", "phone-a", "phone-b"):
            s.operator.SubmitJob(opb.SubmitJobRequest(device_id=device, training=SPEC), metadata=op_md())
        s.operator.SubmitCampaign(opb.SubmitCampaignRequest(name="all", training=SPEC), metadata=op_md())
        yield s


def call(srv: ServerThread, path: str, *, token: str | None = OPERATOR_TOKEN, method: str = "GET") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(srv.http_url + path, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def grpc_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def test_reads_answer_what_operatorservice_answers(srv: ServerThread) -> None:
    jobs = srv.operator.ListJobs(opb.ListJobsRequest(page_size=2), metadata=op_md())
    assert call(srv, "/api/v1/jobs?page_size=2") == (200, grpc_json(jobs))
    nxt = srv.operator.ListJobs(opb.ListJobsRequest(page_size=2, page_token=jobs.next_page_token), metadata=op_md())
    assert call(srv, f"/api/v1/jobs?page_size=2&page_token={jobs.next_page_token}") == (200, grpc_json(nxt))
    running = opb.ListJobsRequest(filter=tpb.JobFilter(states=[tpb.JOB_STATE_QUEUED], device_id="phone-b"))
    assert call(srv, "/api/v1/jobs?state=QUEUED&device_id=phone-b")[1] == grpc_json(
        srv.operator.ListJobs(running, metadata=op_md())
    )
    job = jobs.jobs[0]
    assert call(srv, f"/api/v1/jobs/{job.job_id}")[1] == grpc_json(
        srv.operator.GetJob(opb.GetJobRequest(job_id=job.job_id), metadata=op_md())
    )
    assert call(srv, f"/api/v1/jobs/{job.job_id}/history")[1] == grpc_json(
        srv.operator.GetJobHistory(opb.GetJobHistoryRequest(job_id=job.job_id), metadata=op_md())
    )
    labelled = opb.ListDevicesRequest(selector=tpb.DeviceSelector(labels={"tier": "beta"}))
    assert call(srv, "/api/v1/devices?label=tier=beta")[1] == grpc_json(
        srv.operator.ListDevices(labelled, metadata=op_md())
    )
    assert call(srv, "/api/v1/devices?label=tier=ga")[1] == {}
    assert call(srv, "/api/v1/devices/phone-a")[1] == grpc_json(
        srv.operator.GetDevice(opb.GetDeviceRequest(device_id="phone-a"), metadata=op_md())
    )
    campaigns = srv.operator.ListCampaigns(opb.ListCampaignsRequest(), metadata=op_md())
    assert call(srv, "/api/v1/campaigns")[1] == grpc_json(campaigns)
    cid = campaigns.campaigns[0].campaign_id
    assert campaigns.campaigns[0].job_count == 2
    assert call(srv, f"/api/v1/campaigns/{cid}")[1] == grpc_json(
        srv.operator.GetCampaign(opb.GetCampaignRequest(campaign_id=cid), metadata=op_md())
    )
    summary = call(srv, "/api/v1/summary")[1]
    assert summary["jobs_by_state"] == {"JOB_STATE_QUEUED": "5"}
    assert summary["queued_by_base_model"] == {"tiny": "5"}
    assert len(summary["finished_per_minute"]) == 30
    assert call(srv, "/api/v1/adapters?device_id=phone-a")[1] == {}


@pytest.mark.parametrize("token", [None, "", "wrong", ENROLL_TOKEN])
def test_every_endpoint_needs_the_operator_token(srv: ServerThread, token: str | None) -> None:
    for path in ("/api/v1/summary", "/api/v1/jobs", "/api/v1/jobs/job-x", "/api/v1/devices", "/api/v1/watch/jobs"):
        status, body = call(srv, path, token=token)
        assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED", path
    for path in ("/api/v1/jobs/job-x/cancel", "/api/v1/devices/phone-a/rollback", "/api/v1/adapters/ad-x/activate"):
        assert call(srv, path, token=token, method="POST")[0] == 401, path
    # Identity first: a malformed request from a stranger learns nothing about what is wrong with it.
    assert call(srv, "/api/v1/jobs?page_size=banana", token=token)[0] == 401


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/jobs?page_size=5000", "page_size"),
        ("/api/v1/jobs?page_size=-1", "page_size"),
        ("/api/v1/jobs?page_size=1e3", "page_size"),
        ("/api/v1/jobs?state=SLEEPING", "state"),
        ("/api/v1/jobs?device_id=phone-a%0A", "device_id"),
        ("/api/v1/jobs?campaign_id=%00", "campaign_id"),
        ("/api/v1/jobs?created_after=yesterday", "created_after"),
        ("/api/v1/jobs?created_after=2026-01-01T00:00:00", "created_after"),
        ("/api/v1/jobs?page_token=..%2F..", "page_token"),
        ("/api/v1/jobs?stat=RUNNING", "stat"),
        ("/api/v1/jobs?device_id=a&device_id=b", "device_id"),
        ("/api/v1/devices?label=tier", "label"),
        ("/api/v1/devices?requires_4bit=maybe", "requires_4bit"),
        ("/api/v1/adapters?name=%20bad%20", "name"),
        ("/api/v1/jobs/job%0A", "job_id"),
        ("/api/v1/devices/%00", "device_id"),
        ("/api/v1/watch/jobs?include_initial=yes", "include_initial"),
    ],
)
def test_bad_parameters_name_the_field(srv: ServerThread, path: str, field: str) -> None:
    status, body = call(srv, path)
    assert status == 400, body
    assert body["error"]["status"] == "INVALID_ARGUMENT"
    assert body["error"]["field"].split("[")[0] == field
    assert body["error"]["message"].startswith(field)


def test_errors_map_like_grpc(srv: ServerThread) -> None:
    assert call(srv, "/api/v1/jobs/job-000")[0] == 404
    assert call(srv, "/api/v1/nothing/here")[1]["error"]["status"] == "NOT_FOUND"
    assert call(srv, "/api/v1/jobs", method="DELETE")[0] == 405
    # The same domain error, the same status name and message on both APIs.
    with pytest.raises(grpc.RpcError) as caught:
        srv.operator.GetJob(opb.GetJobRequest(job_id="job-000"), metadata=op_md())
    status, body = call(srv, "/api/v1/jobs/job-000")
    assert status == 404
    assert (body["error"]["status"], body["error"]["message"]) == (caught.value.code().name, caught.value.details())


def test_writes_go_through_the_same_domain_calls(srv: ServerThread) -> None:
    job = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="phone-b", training=SPEC), metadata=op_md()).job
    status, body = call(srv, f"/api/v1/jobs/{job.job_id}/cancel", method="POST")
    assert status == 200 and body["job"]["state"] == "JOB_STATE_CANCELLED"
    status, body = call(srv, f"/api/v1/jobs/{job.job_id}/cancel", method="POST")
    assert status == 400 and body["error"]["status"] == "FAILED_PRECONDITION"
    status, body = call(srv, "/api/v1/devices/phone-b/rollback", method="POST")
    assert status == 400 and body["error"]["status"] == "FAILED_PRECONDITION"  # no earlier adapter
    assert call(srv, "/api/v1/devices/phone-b/deactivate", method="POST") == (200, {})
    assert call(srv, "/api/v1/adapters/ad-000/activate", method="POST")[0] == 404
    assert call(srv, "/api/v1/jobs", method="POST")[0] == 405


class EventStream:
    """Reads server-sent events from the watch endpoint over a plain HTTP/1.0 socket, in a thread."""

    def __init__(self, srv: ServerThread, query: str) -> None:
        port = int(srv.http_url.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(
            f"GET /api/v1/watch/jobs?{query} HTTP/1.0\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\n\r\n".encode()
        )
        self.events: list[tuple[str, Any]] = []
        self.headers = ""
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        try:
            while chunk := self.sock.recv(65536):
                buffer += chunk
                if not self.headers and b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    self.headers = head.decode()
                while self.headers and b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    fields = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
                    if "data" in fields:
                        with self.cond:
                            self.events.append((fields.get("event", ""), json.loads(fields["data"])))
                            self.cond.notify_all()
        except OSError:  # closed by the test
            return

    def wait(self, predicate: Any, timeout: float = 10.0) -> list[tuple[str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.events), timeout), self.events
            return list(self.events)

    def close(self) -> None:
        assert "text/event-stream" in self.headers
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def test_the_event_stream_and_watchjobs_share_one_feed(srv: ServerThread) -> None:
    a = EventStream(srv, "include_initial=true&device_id=phone-a")
    b = EventStream(srv, "state=LEASED")
    stream = srv.operator.WatchJobs(opb.WatchJobsRequest(filter=tpb.JobFilter(device_id="phone-a")), metadata=op_md())
    try:
        initial = a.wait(lambda ev: any(e == "synced" for e, _ in ev))
        assert [e for e, _ in initial].count("job") == 3  # phone-a's jobs: two submitted, one of the campaign
        b.wait(lambda ev: any(e == "synced" for e, _ in ev))
        feed = srv.running.feed  # type: ignore[union-attr]
        md = dev_md("phone-a", srv.creds["phone-a"])  # type: ignore[attr-defined]
        leased = srv.agent.LeaseJob(apb.LeaseJobRequest(device_id="phone-a"), metadata=md).assignment
        got = a.wait(lambda ev: any(e == "job" and d["job_id"] == leased.job_id for e, d in ev[3:]))
        assert got[-1][1]["state"] == "JOB_STATE_LEASED"
        assert b.wait(lambda ev: any(e == "job" for e, _ in ev))[-1][1]["job_id"] == leased.job_id
        change = next(iter(stream))
        assert change.job.job_id == leased.job_id and change.job.state == tpb.JOB_STATE_LEASED
        # Three watchers on two APIs, one feed polling the store for all of them.
        assert len(feed.subscribers) == 3
    finally:
        stream.cancel()
        a.close()
        b.close()
