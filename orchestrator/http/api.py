"""The JSON API for dashboards: OperatorService's reads (and the few writes the console offers)
over HTTP, through the same domain calls as the gRPC servicer.

Replies are the OperatorService reply messages in their canonical JSON form (proto field names,
enums by name, times in RFC 3339, 64-bit integers as strings), converted by the same code as
the gRPC replies, so a dashboard sees on both APIs the same shapes and, on failure, the same
errors (errors.py). Every endpoint needs `Authorization: Bearer <operator token>`.

    GET  /api/v1/summary                     GetFleetSummary
    GET  /api/v1/jobs                        ListJobs (state, device_id, campaign_id, created_after,
                                             created_before, page_size, page_token)
    GET  /api/v1/jobs/{job_id}               GetJob
    GET  /api/v1/jobs/{job_id}/history       GetJobHistory
    POST /api/v1/jobs/{job_id}/cancel        CancelJob
    GET  /api/v1/watch/jobs                  WatchJobs as server-sent events (the job filter, include_initial)
    GET  /api/v1/devices                     ListDevices (label=KEY=VALUE, base_model_id, requires_4bit,
                                             min_ram_bytes, page_size, page_token)
    GET  /api/v1/devices/{device_id}         GetDevice
    POST /api/v1/devices/{device_id}/rollback     RollbackAdapter
    POST /api/v1/devices/{device_id}/deactivate   DeactivateAdapter
    GET  /api/v1/adapters                    ListAdapters (device_id, name, page_size, page_token)
    GET  /api/v1/adapters/{adapter_id}       GetAdapter
    POST /api/v1/adapters/{adapter_id}/activate   ActivateAdapter (on the device that trained it)
    GET  /api/v1/campaigns                   ListCampaigns (page_size, page_token)
    GET  /api/v1/campaigns/{campaign_id}     GetCampaign
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from orchestrator.errors import OrchestratorError
from orchestrator.feed import ChangeFeed
from orchestrator.http.errors import error_body
from orchestrator.http.params import JOB_FILTER, PAGING, SELECTOR, Query
from orchestrator.limits import Gatekeeper
from orchestrator.operators import Principal
from orchestrator.service import Orchestrator
from orchestrator.servicers import convert
from orchestrator.servicers import convert_fleet as cf
from orchestrator.servicers.base import change_as, principal_for
from orchestrator.servicers.errors import status_for
from protos.pocketlora.v1 import operator_service_pb2 as pb

Runner = Callable[..., Awaitable[Any]]
KEEPALIVE_S = 15.0
INITIAL_MAX = 1000


def as_json(message: Message) -> dict[str, Any]:
    """A reply message in its canonical JSON form."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def reply(message: Message) -> web.Response:
    """A 200 answer carrying a reply message."""
    return web.json_response(as_json(message))


class Api:
    """The endpoints, over one orchestrator, its change feed and its executor."""

    def __init__(self, orch: Orchestrator, feed: ChangeFeed, run: Runner, gate: Gatekeeper) -> None:
        self.orch = orch
        self.feed = feed
        self.run = run
        self.gate = gate

    def routes(self) -> list[web.RouteDef]:
        """Every endpoint of the API."""
        return [
            web.get("/api/v1/summary", self.summary),
            web.get("/api/v1/jobs", self.list_jobs),
            web.get("/api/v1/jobs/{job_id}", self.get_job),
            web.get("/api/v1/jobs/{job_id}/history", self.job_history),
            web.post("/api/v1/jobs/{job_id}/cancel", self.cancel_job),
            web.get("/api/v1/watch/jobs", self.watch_jobs),
            web.get("/api/v1/devices", self.list_devices),
            web.get("/api/v1/devices/{device_id}", self.get_device),
            web.post("/api/v1/devices/{device_id}/rollback", self.rollback),
            web.post("/api/v1/devices/{device_id}/deactivate", self.deactivate),
            web.get("/api/v1/adapters", self.list_adapters),
            web.get("/api/v1/adapters/{adapter_id}", self.get_adapter),
            web.post("/api/v1/adapters/{adapter_id}/activate", self.activate),
            web.get("/api/v1/campaigns", self.list_campaigns),
            web.get("/api/v1/campaigns/{campaign_id}", self.get_campaign),
        ]

    async def operator(self, request: web.Request, action: str) -> Principal:
        """The caller, checked as the gRPC API checks it: an operator token whose role allows
        the OperatorService method this endpoint mirrors (roles.REQUIRED_ROLE)."""
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        return await principal_for(self.orch, self.run, token, action)

    async def _query(self, request: web.Request, action: str, *allowed: str) -> Query:
        await self.operator(request, action)
        return Query(request.query, allowed)

    # ------------------------------------------------------------------ reads
    async def summary(self, request: web.Request) -> web.Response:
        await self._query(request, "GetFleetSummary")
        return reply(convert.summary_pb(await self.run(self.orch.fleet.fleet_summary)))

    async def list_jobs(self, request: web.Request) -> web.Response:
        q = await self._query(request, "ListJobs", *JOB_FILTER, *PAGING)
        jobs, token = await self.run(self.orch.queries.list_jobs, q.job_filter(), *q.page())
        return reply(pb.ListJobsResponse(jobs=[convert.job_pb(j) for j in jobs], next_page_token=token))

    async def get_job(self, request: web.Request) -> web.Response:
        await self._query(request, "GetJob")
        job = await self.run(self.orch.queries.get_job, request.match_info["job_id"])
        return reply(pb.GetJobResponse(job=convert.job_pb(job)))

    async def job_history(self, request: web.Request) -> web.Response:
        await self._query(request, "GetJobHistory")
        return reply(convert.history_pb(await self.run(self.orch.queries.job_history, request.match_info["job_id"])))

    async def list_devices(self, request: web.Request) -> web.Response:
        q = await self._query(request, "ListDevices", *SELECTOR, *PAGING)
        devices, token = await self.run(self.orch.queries.list_devices, q.selector(), *q.page())
        return reply(pb.ListDevicesResponse(devices=[convert.device_pb(d) for d in devices], next_page_token=token))

    async def get_device(self, request: web.Request) -> web.Response:
        await self._query(request, "GetDevice")
        device = await self.run(self.orch.queries.get_device, request.match_info["device_id"])
        return reply(pb.GetDeviceResponse(device=convert.device_pb(device)))

    async def list_adapters(self, request: web.Request) -> web.Response:
        q = await self._query(request, "ListAdapters", "device_id", "name", *PAGING)
        adapters, token = await self.run(
            self.orch.queries.list_adapters, q.text("device_id"), q.text("name"), *q.page()
        )
        return reply(pb.ListAdaptersResponse(adapters=[convert.adapter_pb(a) for a in adapters], next_page_token=token))

    async def get_adapter(self, request: web.Request) -> web.Response:
        await self._query(request, "GetAdapter")
        adapter = await self.run(self.orch.queries.get_adapter, request.match_info["adapter_id"])
        return reply(pb.GetAdapterResponse(adapter=convert.adapter_pb(adapter)))

    async def list_campaigns(self, request: web.Request) -> web.Response:
        q = await self._query(request, "ListCampaigns", *PAGING)
        views, token = await self.run(self.orch.campaigns.list_campaigns, (), *q.page())
        return reply(pb.ListCampaignsResponse(campaigns=[cf.campaign_pb(v) for v in views], next_page_token=token))

    async def get_campaign(self, request: web.Request) -> web.Response:
        await self._query(request, "GetCampaign")
        view = await self.run(self.orch.campaigns.get, request.match_info["campaign_id"])
        return reply(pb.GetCampaignResponse(campaign=cf.campaign_pb(view)))

    # ------------------------------------------------------------------ writes
    async def _write(self, request: web.Request, action: str, target: str, fn: Any, *args: Any) -> Any:
        """A change as the caller, audited like the gRPC API's (refusals too)."""
        principal = await self.operator(request, action)
        Query(request.query, ())
        return await change_as(self.orch, self.run, principal, action, target, fn, *args)

    async def cancel_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        job = await self._write(request, "CancelJob", job_id, self.orch.fleet.cancel_job, job_id)
        return reply(pb.CancelJobResponse(job=convert.job_pb(job)))

    async def activate(self, request: web.Request) -> web.Response:
        adapter_id = request.match_info["adapter_id"]
        devices = await self._write(
            request, "ActivateAdapter", adapter_id, self.orch.fleet.activate_adapter, adapter_id
        )
        return reply(pb.ActivateAdapterResponse(device_ids=devices))

    async def rollback(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        desired = await self._write(request, "RollbackAdapter", device_id, self.orch.fleet.rollback_adapter, device_id)
        return reply(pb.RollbackAdapterResponse(desired_adapter_id=desired))

    async def deactivate(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        devices = await self._write(
            request, "DeactivateAdapter", device_id, self.orch.fleet.deactivate_adapter, device_id
        )
        return reply(pb.DeactivateAdapterResponse(device_ids=devices))

    # ------------------------------------------------------------------ the event stream
    async def watch_jobs(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `job` for each change (a WatchJobsResponse's job), `synced` once the
        initial jobs (include_initial=true) are sent, `error` before the server ends the stream."""
        principal = await self.operator(request, "WatchJobs")
        q = Query(request.query, (*JOB_FILTER, "include_initial"))
        flt, initial = q.job_filter(), q.flag("include_initial")
        with self.gate.watch(principal.name):
            return await self._stream(request, flt, initial)

    async def _stream(self, request: web.Request, flt: Any, initial: bool) -> web.StreamResponse:
        async with self.feed.subscribe(flt) as changes:
            first = await self.run(self.orch.queries.list_jobs, flt, INITIAL_MAX, "") if initial else ([], "")
            stream = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
            await stream.prepare(request)
            for job in reversed(first[0]):
                await _send(stream, "job", as_json(convert.job_pb(job)))
            await _send(stream, "synced", {})
            try:
                while True:
                    job = await changes.next(KEEPALIVE_S)
                    if job is None:
                        await stream.write(b": keep-alive\n\n")
                    else:
                        await _send(stream, "job", as_json(convert.job_pb(job)))
            except (ConnectionResetError, ConnectionError):
                return stream
            except OrchestratorError as exc:  # the feed dropped this watcher or is closing
                await _send(stream, "error", error_body(status_for(exc), str(exc)))
                return stream


async def _send(stream: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    await stream.write(f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())
