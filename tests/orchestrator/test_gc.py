"""Garbage collection: unreferenced blobs and stale uploads go; wanted versions never do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from adapters_store import upload_key, upload_to_url
from orchestrator.gc import run_gc
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from tests.support.api import enroll, lease, submit, train
from tests.support.orch import FakeClock, ServerThread, fake_adapter_blob, op_md

ROOT = Path(__file__).resolve().parents[2]


def test_gc_keeps_what_devices_need_and_removes_the_rest(tmp_path: Path) -> None:
    with ServerThread(tmp_path, clock=FakeClock(), lease_s=30.0) as srv:
        md = enroll(srv, "phone-1")
        versions = []
        for seed in range(4):
            submit(srv, "phone-1")
            versions.append(train(srv, tmp_path, "phone-1", md, seed=seed).adapter)
        srv.operator.ActivateAdapter(opb.ActivateAdapterRequest(adapter_id=versions[0].adapter_id), metadata=op_md())
        # A failed attempt's upload that nobody promoted.
        submit(srv, "phone-1")
        a = lease(srv, "phone-1", md)
        assert a is not None
        blob, _ = fake_adapter_blob(tmp_path, device_id="phone-1", job_id=a.job_id, attempt=a.attempt, seed=9)
        upload_to_url(a.upload_url, blob)
        srv.agent.FailJob(apb.FailJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, error_class=1), metadata=md)
        stale = upload_key(a.job_id, a.attempt)

        dry = run_gc(srv.orch.state, srv.store, keep_versions=1, dry_run=True, upload_grace_s=0, blob_grace_s=0)
        # v4 is the newest (kept), v1 is desired (pinned); v2 and v3 are superseded.
        assert sorted(dry.pruned_adapters) == sorted([versions[1].adapter_id, versions[2].adapter_id])
        assert sorted(dry.deleted_keys) == sorted([versions[1].blob_key, versions[2].blob_key, stale])
        assert srv.store.stat(versions[1].blob_key) is not None  # a dry run deletes nothing

        done = run_gc(srv.orch.state, srv.store, keep_versions=1, dry_run=False, upload_grace_s=0, blob_grace_s=0)
        assert sorted(done.deleted_keys) == sorted(dry.deleted_keys)
        for kept in (versions[0], versions[3]):
            assert srv.store.stat(kept.blob_key) is not None
        assert srv.store.stat(stale) is None
        listed = srv.operator.ListAdapters(opb.ListAdaptersRequest(device_id="phone-1"), metadata=op_md()).adapters
        assert sorted(x.version for x in listed) == [1, 4]
        again = run_gc(srv.orch.state, srv.store, keep_versions=1, dry_run=False, upload_grace_s=0, blob_grace_s=0)
        assert again.deleted_keys == [] and again.pruned_adapters == []


def test_gc_cli_dry_run_lists(tmp_path: Path) -> None:
    with ServerThread(tmp_path, clock=FakeClock()) as srv:
        srv.store.put_file("uploads/job-x/1/adapter.safetensors", Path(__file__))
        db, store = srv.orch.state.url, f"file://{tmp_path / 'blobs'}"
        env = {**os.environ, "COLUMNS": "200"}
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pocketlora",
                "adapter",
                "gc",
                "--db",
                db,
                "--store",
                store,
                "--upload-grace-hours",
                "0",
                "--json",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["dry_run"] and report["deleted_keys"] == ["uploads/job-x/1/adapter.safetensors"]
        assert srv.store.stat("uploads/job-x/1/adapter.safetensors") is not None
