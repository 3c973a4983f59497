"""Property-based: arbitrary query parameters and path ids at every HTTP API endpoint never break
the server (the HTTP twin of test_fuzz.py).

Parameters are drawn from each endpoint's own names plus unknown ones, repeated or not, with
values from a pool of real ids, hostile strings (NULs, newlines, path tricks, odd unicode, SQL),
numbers at and past their limits, and long strings; each request goes out with a valid or an
invalid token. The properties:

- never a 500: every failure is a mapped error with a JSON body;
- without the operator token the answer is 401, whatever else is wrong;
- a 400 names the query parameter (or path id) at fault, and the message starts with it;
- the server stays up: the summary and /metrics answer after the run.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.http.params import JOB_FILTER, PAGING, SELECTOR
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, OPERATOR_TOKEN, ServerThread, op_md

SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
# (method, path with {id}, the query parameters it takes, the name its path id goes by)
ENDPOINTS = [
    ("GET", "/api/v1/summary", (), ""),
    ("GET", "/api/v1/jobs", (*JOB_FILTER, *PAGING), ""),
    ("GET", "/api/v1/jobs/{id}", (), "job_id"),
    ("GET", "/api/v1/jobs/{id}/history", (), "job_id"),
    ("GET", "/api/v1/watch/jobs", (*JOB_FILTER, "include_initial"), ""),
    ("GET", "/api/v1/devices", (*SELECTOR, *PAGING), ""),
    ("GET", "/api/v1/devices/{id}", (), "device_id"),
    ("GET", "/api/v1/adapters", ("device_id", "name", *PAGING), ""),
    ("GET", "/api/v1/adapters/{id}", (), "adapter_id"),
    ("GET", "/api/v1/campaigns", PAGING, ""),
    ("GET", "/api/v1/campaigns/{id}", (), "campaign_id"),
    ("POST", "/api/v1/jobs/{id}/cancel", (), "job_id"),
    ("POST", "/api/v1/devices/{id}/rollback", (), "device_id"),
    ("POST", "/api/v1/devices/{id}/deactivate", (), "device_id"),
    ("POST", "/api/v1/adapters/{id}/activate", (), "adapter_id"),
]
HOSTILE = ["", "\x00", "a\x00b", "phone-a\n", "../../etc/passwd", "ﬁ\u202e\u200b🙂", "' OR 1=1; --", "%s%n", "Ω" * 70]
NUMBERS = ["0", "1", "1000", "1001", "-1", "1e3", "0x10", "9" * 30, "٣", " 5", "true", "NaN"]
TIMES = ["2026-11-30T12:00:00Z", "2026-11-30T12:00:00", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59+00:00", "now"]
# Past aiohttp's request-line limit the HTTP parser itself answers (not JSON, never a 500).
TRANSPORT = {400, 414, 431}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, list[str]]]:
    db_url = "" if request.param == "sqlite" else str(request.getfixturevalue("postgres_server").create_database())
    with ServerThread(tmp_path_factory.mktemp("http-fuzz"), db_url=db_url, http=True, lease_s=600.0) as srv:
        ids = []
        for device in ("phone-a", "phone-b"):
            caps = tpb.Capabilities(base_model_id="tiny", ram_bytes=2**33, labels={"tier": "beta"})
            srv.agent.Enroll(apb.EnrollRequest(device_id=device, capabilities=caps), metadata=op_md(ENROLL_TOKEN))
            job = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id=device, training=SPEC), metadata=op_md()).job
            ids += [device, job.job_id]
        camp = srv.operator.SubmitCampaign(opb.SubmitCampaignRequest(name="c", training=SPEC), metadata=op_md())
        ids.append(camp.campaign.campaign_id)
        yield srv, ids
        # Still up and answering.
        assert _call(srv, "GET", "/api/v1/summary", OPERATOR_TOKEN)[0] == 200
        with urllib.request.urlopen(f"{srv.http_url}/metrics", timeout=10) as reply:
            assert reply.status == 200


def _call(srv: ServerThread, method: str, path: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(srv.http_url + path, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            if reply.headers.get("Content-Type", "").startswith("text/event-stream"):
                return reply.status, {}  # a watch that was accepted: it would stream forever
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, {"raw": body[:200]}


def _values(ids: list[str]) -> st.SearchStrategy[str]:
    pool = st.sampled_from(ids)
    return st.one_of(
        pool,
        st.sampled_from(HOSTILE),
        st.sampled_from(NUMBERS),
        st.sampled_from(TIMES),
        st.sampled_from(["QUEUED", "job_state_running", "RUNNING ", "tier=beta", "tier", "=x", "true", "false"]),
        st.tuples(pool, st.sampled_from(HOSTILE)).map("".join),
        st.text(max_size=30),
        st.integers(200, 9000).map(lambda n: "x" * n),
    )


@pytest.mark.parametrize(("method", "template", "params", "path_name"), ENDPOINTS, ids=[e[1] for e in ENDPOINTS])
def test_arbitrary_parameters_get_typed_errors(
    world: tuple[ServerThread, list[str]], method: str, template: str, params: tuple[str, ...], path_name: str
) -> None:
    srv, ids = world
    unknown = st.text(min_size=1, max_size=12)
    names = st.one_of(st.sampled_from(params), st.sampled_from(params), unknown) if params else unknown
    query = st.lists(st.tuples(names, _values(ids)), max_size=4)
    # Most examples carry the token so they get past identity into validation and the domain.
    tokens = st.sampled_from([OPERATOR_TOKEN, OPERATOR_TOKEN, OPERATOR_TOKEN, None, "", "wrong", ENROLL_TOKEN])
    # Without query parameters an endpoint has nothing to vary but its path id and the token.
    query = query if params else st.one_of(st.just([]), query)

    examples = 40 if srv.orch.state.url.startswith("sqlite") else 25

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(pairs=query, ident=_values(ids), token=tokens)
    def check(pairs: list[tuple[str, str]], ident: str, token: str | None) -> None:
        path = template.replace("{id}", urllib.parse.quote(ident, safe=""))
        url = path + ("?" + urllib.parse.urlencode(pairs) if pairs else "")
        status, body = _call(srv, method, url, token)
        assert status != 500 and status < 500, f"{method} {url[:200]} -> {status} {body}"
        if len(url) > 8000:
            assert status in TRANSPORT | {401, 400, 404, 200}
            return
        if "{id}" in template and (
            ident in ("", ".", "..") or str(body.get("error", {}).get("message", "")).startswith("Not Found: ")
        ):
            assert status in (404, 405), body
            return  # the id makes the path name another route or none (aiohttp ids exclude braces)
        if token != OPERATOR_TOKEN:
            assert status == 401, f"{method} {url[:200]} with token {token!r} -> {status} {body}"
            return
        assert status in (200, 400, 404), f"{method} {url[:200]} -> {status} {body}"
        if status == 400:
            error = body["error"]
            field = error.get("field", "")
            if error["status"] == "INVALID_ARGUMENT":
                allowed = {name for name, _ in pairs} | {path_name}
                # label[tier] names the label parameter's tier entry
                assert field in allowed or field.split("[")[0] in allowed, f"{url[:200]}: names {field!r}: {error}"
                assert error["message"].startswith(error["field"])
            else:
                assert error["status"] == "FAILED_PRECONDITION"

    check()


def test_the_api_survives_an_open_and_abandoned_watch(world: tuple[ServerThread, list[str]], tmp_path: Path) -> None:
    srv, _ = world
    for _ in range(20):
        request = urllib.request.Request(
            f"{srv.http_url}/api/v1/watch/jobs?include_initial=true",
            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        )
        urllib.request.urlopen(request, timeout=10).close()
    assert _call(srv, "GET", "/api/v1/summary", OPERATOR_TOKEN)[0] == 200
