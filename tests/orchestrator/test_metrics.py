"""The orchestrator's /metrics on a real server: promtool accepts the scrape, the counters move
with what the fleet does, the store gauges match the store, and the number of series does not
grow with the fleet (no job, device or adapter id is ever a label value)."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters_store import upload_to_url
from orchestrator import metrics
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, FakeClock, ServerThread, dev_md, fake_adapter_blob, op_md
from tests.support.promtool import promtool_check, scrape

SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
IDS = re.compile(r"^(job|ad|cmp)-[0-9a-f]{20,}$")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def enroll(srv: ServerThread, device: str) -> tuple[tuple[str, str], ...]:
    caps = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)
    reply = srv.agent.Enroll(apb.EnrollRequest(device_id=device, capabilities=caps), metadata=op_md(ENROLL_TOKEN))
    return dev_md(device, reply.device_credential)


def submit(srv: ServerThread, device: str) -> str:
    return str(
        srv.operator.SubmitJob(opb.SubmitJobRequest(device_id=device, training=SPEC), metadata=op_md()).job.job_id
    )


def lease(srv: ServerThread, device: str, md: tuple[tuple[str, str], ...]) -> apb.Assignment:
    return srv.agent.LeaseJob(apb.LeaseJobRequest(device_id=device), metadata=md).assignment


def test_a_scrape_passes_promtool_and_counts_what_the_fleet_did(tmp_path: Path) -> None:
    clock = FakeClock()
    with ServerThread(tmp_path, http=True, clock=clock, lease_s=60.0, retry_base_s=1.0) as srv:
        url = f"{srv.http_url}/metrics"
        before = scrape(url)
        md = enroll(srv, "phone-a")
        for _ in range(4):
            submit(srv, "phone-a")
        # Job 1 fails and is requeued; leased again, a stale report is fenced and it fails for
        # good. Job 2 completes with bytes that are not an adapter (verification failure, requeued).
        # Job 3 completes. Job 4's lease expires (requeued).
        a = lease(srv, "phone-a", md)
        srv.agent.FailJob(
            apb.FailJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, error_class=tpb.ERROR_CLASS_CRASHED),
            metadata=md,
        )
        clock.advance(5)
        b = lease(srv, "phone-a", md)
        with pytest.raises(grpc.RpcError):
            srv.agent.ReportProgress(
                apb.ReportProgressRequest(job_id=b.job_id, lease_epoch=b.lease_epoch + 7, state=tpb.JOB_STATE_RUNNING),
                metadata=md,
            )
        srv.agent.FailJob(
            apb.FailJobRequest(job_id=b.job_id, lease_epoch=b.lease_epoch, error_class=tpb.ERROR_CLASS_DATASET_INVALID),
            metadata=md,
        )
        c = lease(srv, "phone-a", md)
        junk = tmp_path / "junk.bin"
        junk.write_bytes(b"not an adapter" * 64)
        upload_to_url(c.upload_url, junk)
        from adapters_store import sha256_file

        with pytest.raises(grpc.RpcError):
            srv.agent.CompleteJob(
                apb.CompleteJobRequest(
                    job_id=c.job_id, lease_epoch=c.lease_epoch, sha256=sha256_file(junk), size_bytes=junk.stat().st_size
                ),
                metadata=md,
            )
        d = lease(srv, "phone-a", md)
        blob, info = fake_adapter_blob(tmp_path, device_id="phone-a", job_id=d.job_id, attempt=d.attempt)
        upload_to_url(d.upload_url, blob)
        srv.agent.CompleteJob(
            apb.CompleteJobRequest(
                job_id=d.job_id, lease_epoch=d.lease_epoch, sha256=info.sha256, size_bytes=info.size
            ),
            metadata=md,
        )
        e = lease(srv, "phone-a", md)
        assert b.job_id == a.job_id and len({a.job_id, c.job_id, d.job_id, e.job_id}) == 4
        clock.advance(120)
        assert srv.orch.jobs.reap() == 1
        clock.advance(10)  # past the gauges' cache

        after = scrape(url)
        promtool_check(after)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("pocketlora_attempt_failures_total", error_class="CRASHED", outcome="requeued") == 1
        assert moved("pocketlora_attempt_failures_total", error_class="DATASET_INVALID", outcome="failed") == 1
        assert moved("pocketlora_attempt_failures_total", error_class="INTEGRITY", outcome="requeued") == 1
        assert moved("pocketlora_fenced_reports_total", call="report") == 1
        assert moved("pocketlora_adapter_verifications_total", result="format") == 1
        assert moved("pocketlora_adapter_verifications_total", result="ok") == 1
        assert moved("pocketlora_lease_expiries_total") == 1
        assert moved("pocketlora_job_transitions_total", state="SUCCEEDED") == 1
        assert (
            moved(
                "pocketlora_grpc_server_handled_total",
                grpc_service="AgentService",
                grpc_method="LeaseJob",
                grpc_code="OK",
            )
            == 5
        )
        assert (
            moved(
                "pocketlora_grpc_server_handled_total",
                grpc_service="AgentService",
                grpc_method="ReportProgress",
                grpc_code="FAILED_PRECONDITION",
            )
            == 1
        )
        assert moved("pocketlora_sqlite_commit_batch_transactions_count") >= 1
        assert moved("pocketlora_db_transaction_seconds_count", backend="sqlite") > 10
        assert moved("pocketlora_blob_operation_seconds_count", operation="verify") == 2
        # Store gauges: 4 jobs (2 queued again after the expiry and the bad upload, 1 failed, 1 succeeded).
        assert value(after, "pocketlora_jobs", state="QUEUED") == 2
        assert value(after, "pocketlora_jobs", state="SUCCEEDED") == 1
        assert value(after, "pocketlora_jobs", state="FAILED") == 1
        assert value(after, "pocketlora_queue_depth", base_model="tiny") == 2
        assert value(after, "pocketlora_leases_in_flight") == 0
        assert value(after, "pocketlora_devices_enrolled") == 1
        assert value(after, "pocketlora_adapter_versions") == 1
        assert value(after, "pocketlora_devices_by_adapter_sync", sync="CONVERGED") == 1
        assert value(after, "pocketlora_store_up") == 1


def test_no_label_value_is_an_id_and_series_do_not_grow_with_the_fleet(tmp_path: Path) -> None:
    with ServerThread(tmp_path, http=True) as srv:
        url = f"{srv.http_url}/metrics"
        ids: set[str] = set()

        def grow(devices: range) -> None:
            for n in devices:
                device = f"phone-{n}"
                md = enroll(srv, device)
                ids.add(device)
                ids.add(submit(srv, device))
                ids.add(lease(srv, device, md).job_id)
                ids.add(submit(srv, device))
                srv.agent.Heartbeat(apb.HeartbeatRequest(device_id=device, eligible=True), metadata=md)
            camp = srv.operator.SubmitCampaign(opb.SubmitCampaignRequest(name="c", training=SPEC), metadata=op_md())
            ids.add(camp.campaign.campaign_id)

        grow(range(3))
        small = samples(scrape(url))
        grow(range(3, 40))
        large = samples(scrape(url))
        labels = {v for (_, pairs) in large for _, v in pairs}
        assert not labels & ids, f"ids used as label values: {sorted(labels & ids)[:5]}"
        assert not [v for v in labels if IDS.match(v) or v.startswith("phone-")]
        # The fleet grew from 3 to 40 devices and campaigns; the series are the same ones.
        assert {k for k in large if not k[0].startswith(("process_", "python_"))} == {
            k for k in small if not k[0].startswith(("process_", "python_"))
        }


def test_the_control_loops_counters_add_to_a_front_ends() -> None:
    """The Ray control loop's snapshot is added to this process's counts (same labels add up)."""
    metrics.lease_expired()
    local = samples_of(metrics.DomainCollector())
    remote = [
        ("pocketlora_lease_expiries_total", (), 3.0),
        ("pocketlora_attempt_failures_total", (("error_class", "LEASE_EXPIRED"), ("outcome", "failed")), 2.0),
    ]
    merged = samples_of(metrics.DomainCollector(lambda: remote))
    assert merged[("pocketlora_lease_expiries_total", ())] == local[("pocketlora_lease_expiries_total", ())] + 3
    key = ("pocketlora_attempt_failures_total", (("error_class", "LEASE_EXPIRED"), ("outcome", "failed")))
    assert merged[key] == local.get(key, 0.0) + 2


def samples_of(collector: metrics.DomainCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}
