"""The web console in a real headless Chromium (Debian's, driven by Playwright): a real gRPC and
HTTP server on loopback, a device driven through the real AgentService, and the pages as an
operator sees them.

- every page loads without a console error;
- a job submitted through gRPC appears in the jobs table, and its state changes appear in place
  without a reload (the event stream);
- the job page draws the loss curve with exactly the reported points, and its timeline shows
  the pause;
- the devices page says why a device does not run the adapter it should (it refused it);
- a screenshot of each page is saved and checked not blank (size, and pixels that differ).

`POCKETLORA_UPDATE_SCREENSHOT=1` also writes the job page's screenshot to docs/console.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, OPERATOR_TOKEN, ServerThread, dev_md, fake_adapter_blob, op_md

DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"
LOSSES = [2.41, 2.02, 1.73, 1.55, 1.38, 1.30]


def find_chromium() -> str | None:
    """Debian's chromium binary (the real one, not the shell wrapper), if installed."""
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is required in CI (scripts/test.sh installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    p = context.new_page()
    p.errors = []  # type: ignore[attr-defined]
    p.on("console", lambda msg: p.errors.append(msg.text) if msg.type == "error" else None)  # type: ignore[attr-defined]
    p.on("pageerror", lambda exc: p.errors.append(str(exc)))  # type: ignore[attr-defined]
    yield p
    context.close()


def check_screenshot(path: Path) -> None:
    """The PNG is a real picture: big enough, and not one flat colour."""
    from PIL import Image

    assert path.stat().st_size > 10_000, f"{path} is only {path.stat().st_size} bytes"
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        width, height = rgb.size
        assert (width, height) == (1280, 860)
        colours = {rgb.getpixel((x, y)) for x in range(0, width, 37) for y in range(0, height, 23)}
        assert len(colours) >= 5, f"{path} looks blank: {colours}"
        # The header bar is dark, the page body light.
        assert sum(rgb.getpixel((5, 5))) < 200 and sum(rgb.getpixel((width // 2, height - 5))) > 600


def test_console_shows_the_fleet_live(page: Any, tmp_path: Path) -> None:
    with ServerThread(tmp_path, http=True, lease_s=600.0) as srv:
        caps = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)
        credential = srv.agent.Enroll(
            apb.EnrollRequest(device_id="phone-a", capabilities=caps), metadata=op_md(ENROLL_TOKEN)
        ).device_credential
        md = dev_md("phone-a", credential)

        page.goto(f"{srv.http_url}/#token={OPERATOR_TOKEN}")
        page.wait_for_selector("#jobs-by-state")
        assert page.inner_text("#card-devices").startswith("1")
        page.screenshot(path=tmp_path / "overview.png")

        # A job submitted through gRPC appears in the live table.
        page.goto(f"{srv.http_url}/#/jobs")
        page.wait_for_selector("#jobs-count >> text=live")
        page.evaluate("window.__noReload = true")
        spec = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
        job = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="phone-a", training=spec), metadata=op_md()).job
        row = f'tr[data-job-id="{job.job_id}"] td.state'
        page.wait_for_selector(f"{row} >> text=QUEUED")

        # The device leases, runs, reports progress and pauses: each state shows up in place.
        a = srv.agent.LeaseJob(apb.LeaseJobRequest(device_id="phone-a"), metadata=md).assignment
        page.wait_for_selector(f"{row} >> text=LEASED")
        for step, loss in enumerate(LOSSES, start=1):
            srv.agent.ReportProgress(
                apb.ReportProgressRequest(
                    job_id=a.job_id,
                    lease_epoch=a.lease_epoch,
                    state=tpb.JOB_STATE_RUNNING,
                    progress=tpb.JobProgress(step=step, total_steps=len(LOSSES), loss=loss, tokens_seen=step * 512),
                ),
                metadata=md,
            )
        page.wait_for_selector(f"{row} >> text=RUNNING")
        srv.agent.ReportProgress(
            apb.ReportProgressRequest(
                job_id=a.job_id,
                lease_epoch=a.lease_epoch,
                state=tpb.JOB_STATE_PAUSED,
                progress=tpb.JobProgress(step=len(LOSSES), total_steps=len(LOSSES), loss=LOSSES[-1]),
                pause_reason=tpb.ELIGIBILITY_REASON_TOO_HOT,
            ),
            metadata=md,
        )
        page.wait_for_selector(f"{row} >> text=PAUSED")
        assert page.evaluate("window.__noReload") is True, "the page reloaded"
        assert page.locator(f'tr[data-job-id="{job.job_id}"]').count() == 1
        page.screenshot(path=tmp_path / "jobs.png")

        # The job page: the loss curve has exactly the reported points, the timeline the pause.
        page.goto(f"{srv.http_url}/#/jobs/{job.job_id}")
        page.wait_for_selector("#loss-chart circle.point")
        losses = page.eval_on_selector_all("#loss-chart circle.point", "els => els.map(e => Number(e.dataset.loss))")
        assert losses == pytest.approx(LOSSES, abs=1e-5)
        assert "TOO_HOT" in page.inner_text("#timeline")
        # Still live: the job resumes and the page follows.
        srv.agent.ReportProgress(
            apb.ReportProgressRequest(
                job_id=a.job_id,
                lease_epoch=a.lease_epoch,
                state=tpb.JOB_STATE_RUNNING,
                progress=tpb.JobProgress(step=len(LOSSES), total_steps=len(LOSSES), loss=LOSSES[-1]),
            ),
            metadata=md,
        )
        page.wait_for_selector("#job-state >> text=RUNNING")
        page.screenshot(path=tmp_path / "job.png")

        # The adapter it produces is wanted on the device, which refuses it: the devices page says why.
        blob, info = fake_adapter_blob(tmp_path, device_id="phone-a", job_id=a.job_id, attempt=a.attempt)
        from adapters_store import upload_to_url

        upload_to_url(a.upload_url, blob)
        done = srv.agent.CompleteJob(
            apb.CompleteJobRequest(
                job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size
            ),
            metadata=md,
        )
        srv.operator.ActivateAdapter(opb.ActivateAdapterRequest(adapter_id=done.adapter.adapter_id), metadata=op_md())
        why = "base fingerprint differs from this device's base model"
        srv.agent.Heartbeat(
            apb.HeartbeatRequest(
                device_id="phone-a",
                eligible=True,
                eligibility_reason=tpb.ELIGIBILITY_REASON_ELIGIBLE,
                adapter_refusals=[tpb.AdapterRefusal(adapter_id=done.adapter.adapter_id, reason=why)],
            ),
            metadata=md,
        )
        page.goto(f"{srv.http_url}/#/devices")
        cell = page.wait_for_selector('tr[data-device-id="phone-a"] td.sync')
        assert "REFUSED" in cell.inner_text() and why in cell.inner_text()
        page.screenshot(path=tmp_path / "devices.png")

        page.goto(f"{srv.http_url}/#/adapters")
        page.wait_for_selector(f'tr[data-adapter-id="{done.adapter.adapter_id}"]')
        assert "1 wanted" in page.inner_text(f'tr[data-adapter-id="{done.adapter.adapter_id}"]')
        page.screenshot(path=tmp_path / "adapters.png")

        assert page.errors == []  # type: ignore[attr-defined]
    for name in ("overview", "jobs", "job", "devices", "adapters"):
        check_screenshot(tmp_path / f"{name}.png")
    if os.environ.get("POCKETLORA_UPDATE_SCREENSHOT"):
        shutil.copy(tmp_path / "job.png", DOCS_SHOT)


def test_console_asks_for_a_token_and_refuses_a_wrong_one(page: Any, tmp_path: Path) -> None:
    with ServerThread(tmp_path, http=True) as srv:
        page.goto(f"{srv.http_url}/")
        page.wait_for_selector("#login:not([hidden])")
        page.fill("#token", "not-the-token")
        page.click("#login button")
        page.wait_for_selector("#login-error >> text=refused")
        page.fill("#token", OPERATOR_TOKEN)
        page.click("#login button")
        page.wait_for_selector("#jobs-by-state")
        # The refused token's 401 is the one expected browser error.
        assert all("401" in e for e in page.errors), page.errors  # type: ignore[attr-defined]
