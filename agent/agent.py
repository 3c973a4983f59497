"""The device agent's polling loop. It never imports torch: training and inference run in
child processes (agent.training.worker, agent.runtime_host).

One thread, one loop, a tick every `tick_s`:
  read sensors -> gate -> (training child events) -> pause/resume/finish -> lease when idle
  -> heartbeat when due (renews the lease, learns cancellations and the desired adapter).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_store.errors import StoreError
from adapters_store.fingerprint import model_fingerprint
from agent import handin
from agent.adapters import AdapterSwitcher
from agent.client import CallError, DeviceClient, Gone, Invalid, Refused, Transient, detect_capabilities
from agent.fleet_gate import FleetGate, fleet_fields
from agent.gate import Eligibility, Gate
from agent.jobs import (
    JobSetupError,
    LocalJob,
    UntrustedId,
    fetch_shipped_dataset,
    public_message,
    resolve_dataset,
    training_spec,
)
from agent.reports import heartbeat_request, progress_pb
from agent.sensors import SensorReading, SensorSource
from agent.training.runner import Outcome, TrainingProcess, write_spec
from pocketlora.tls import TlsConfig
from protos.pocketlora.v1 import agent_service_pb2 as pb
from protos.wire import EligibilityReason, ErrorClass, JobState

log = logging.getLogger("pocketlora.agent")

# The states a device reports for the job it holds.
_REPORTED = (JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING)


@dataclass
class AgentConfig:
    """Settings of one device agent."""

    orchestrator: str
    device_id: str
    work_dir: Path
    base_model_dir: Path
    base_model_id: str
    datasets_dir: Path
    enrollment_token: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    tick_s: float = 0.5
    progress_every_s: float = 2.0
    memory_budget_mb: int = 0
    torch_threads: int = 0
    serve_adapters: bool = True  # run the inference runtime child that loads and activates desired adapters
    rotate_credential_after_s: float = 30 * 86400  # rotate the device credential once it is this old (0: never)
    runtime: str = "auto"  # onnx | torch | auto (agent.serving)
    inference_listen: str = ""  # DeviceInferenceService address for apps; "" = none
    tls: TlsConfig | None = None  # to the orchestrator (None: plaintext)
    store_tls: TlsConfig | None = None  # the CA presigned-URL transfers trust (None: the system's roots)
    local_veto: bool = False  # the fleet's gate policy may only tighten the local one, never loosen it


Listener = Callable[[str, dict[str, Any]], None]


class EnrollmentError(Exception):
    """The device cannot enroll (no token, or the orchestrator refused it); one line for the user."""


class Agent:
    """Polls the orchestrator, gates on power/thermal state, trains, uploads, hot-swaps adapters."""

    def __init__(
        self, config: AgentConfig, sensors: SensorSource, gate: Gate, *, listener: Listener | None = None
    ) -> None:
        self.cfg = config
        self.sensors = sensors
        self.gate = gate
        self.listener = listener
        config.work_dir.mkdir(parents=True, exist_ok=True)
        self.client = DeviceClient(config.orchestrator, config.device_id, config.work_dir, tls=config.tls)
        self.transfer_ssl = config.store_tls.ssl_context() if config.store_tls is not None else None
        self.base_fingerprint = model_fingerprint(config.base_model_dir)
        self.job: LocalJob | None = LocalJob.load(config.work_dir)
        self.proc: TrainingProcess | None = None
        self.pausing = False
        self.pause_reason: EligibilityReason | None = None  # why the gate asked for the running pause
        self.next_heartbeat = 0.0
        self.next_lease = 0.0
        self.completion = handin.Completion()
        self.last_progress_report = 0.0
        self.eligibility: Eligibility | None = None
        self.reading: SensorReading | None = None
        self.adapters = AdapterSwitcher(
            self.client,
            config.work_dir,
            config.base_model_dir,
            self.base_fingerprint,
            self._emit,
            torch_threads=config.torch_threads,
            runtime=config.runtime,
            listen=config.inference_listen,
            ssl_context=self.transfer_ssl,
        )
        self.fleet_gate = FleetGate(gate, veto=config.local_veto)
        self._events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        if self.job is not None:
            # Restarted mid-job: resume from the checkpoint once the gate allows, or, when the
            # adapter was already uploaded, ask again for it to be completed.
            self.job.state = JobState.UPLOADING if self.job.uploaded_sha256 else JobState.PAUSED
            self._emit("resumed_after_restart", job_id=self.job.job_id)

    # ------------------------------------------------------------------ plumbing
    def _emit(self, kind: str, **data: Any) -> None:
        log.info("%s %s", kind, data)
        if self.listener is not None:
            self.listener(kind, data)

    def _on_worker_event(self, event: dict[str, Any]) -> None:
        # Called from the runner's reader thread; handled on the loop thread.
        with self._events_lock:
            self._events.append(event)

    def enroll(self, stop: threading.Event | None = None, *, force: bool = False) -> None:
        """Enroll unless a credential is held; waits out an unreachable orchestrator."""
        if self.client.enrolled and not force:
            return
        if not self.cfg.enrollment_token:
            raise EnrollmentError(
                "not enrolled and no enrollment token given (--enrollment-token or POCKETLORA_ENROLLMENT_TOKEN)"
            )
        cfg = self.cfg
        caps = detect_capabilities(cfg.work_dir, cfg.base_model_id, self.base_fingerprint, cfg.labels,
                                   cfg.memory_budget_mb * 2**20, base_model_dir=cfg.base_model_dir)  # fmt: skip
        caps.inference_runtimes.extend(self.adapters.serving.advertised())  # type: ignore[arg-type]
        delay = 1.0
        while True:
            try:
                self.client.enroll(self.cfg.enrollment_token, caps)
                break
            except Transient as exc:
                log.warning(
                    "orchestrator %s unreachable or busy (%s: %s); retrying in %.0f s",
                    self.cfg.orchestrator,
                    exc.code.name,
                    exc.details,
                    delay,
                )
            except CallError as exc:
                raise EnrollmentError(
                    f"enrollment refused by {self.cfg.orchestrator}: {exc.code.name}: {exc.details}"
                ) from None
            if stop is not None and stop.wait(delay):
                return
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, 60.0)
        self._emit("enrolled", device_id=self.cfg.device_id)

    def run(self, stop: threading.Event | None = None) -> None:
        """Run until stop is set."""
        stop = stop or threading.Event()
        self.enroll(stop)
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except Refused:
                    # The orchestrator no longer knows this credential (e.g. its state was
                    # reset): enroll again with the token, or stop if there is none.
                    log.warning("credential refused; enrolling again")
                    self.enroll(stop, force=True)
                    continue
                except CallError as exc:
                    log.warning("orchestrator call failed: %s", exc)
                    self.next_heartbeat = time.monotonic() + 2.0
                except Exception:
                    # A daemon on someone's phone must outlive its own bugs: log, back off, go on.
                    log.exception("agent tick failed")
                    self._emit("tick_error")
                    stop.wait(5.0)
                stop.wait(self.cfg.tick_s)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop children: training checkpoints and exits (it resumes on the next start)."""
        self._stop_training(checkpoint=True)
        self.adapters.close()
        self.client.close()

    def _stop_training(self, *, checkpoint: bool) -> None:
        """End a running training child: after a checkpoint (kept for a resume), or at once."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if checkpoint:
            self.proc.request_pause()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        self.proc.kill()  # no-op once it exited
        self.proc.wait(timeout=30)  # reap it and let the event readers finish

    # ------------------------------------------------------------------ the loop
    def tick(self) -> None:
        """One iteration of the loop."""
        now = time.monotonic()
        self.reading = self.sensors.read()
        elig = self.gate.evaluate(self.reading)
        if self.eligibility is None or elig.reason != self.eligibility.reason:
            self._emit("gate", eligible=elig.eligible, reason=elig.reason.value, detail=elig.detail)
            self.next_heartbeat = 0.0  # tell the orchestrator now, not at the next paced poll
        self.eligibility = elig
        self._drain_events()
        if self.job is not None:
            self._drive_job(elig)
        elif elig.eligible and now >= self.next_lease:
            self._lease()
        if time.monotonic() >= self.next_heartbeat:
            self._heartbeat()
        if self.cfg.rotate_credential_after_s and self.client.credential_age_s >= self.cfg.rotate_credential_after_s:
            self.client.rotate_credential()
            self._emit("credential_rotated")

    def _drain_events(self) -> None:
        with self._events_lock:
            events, self._events = self._events, []
        for ev in events:
            if ev.get("event") == "progress" and self.job is not None:
                self.job.progress = {k: ev.get(k, 0) for k in ("step", "total_steps", "epoch", "loss", "tokens_seen")}
                self._emit("progress", job_id=self.job.job_id, **self.job.progress)
            elif ev.get("event") in ("plan", "checkpoint", "resumed", "evaluated"):
                self._emit(ev["event"], **{k: v for k, v in ev.items() if k != "event"})

    def _report(
        self, state: JobState, pause_reason: EligibilityReason | None = None
    ) -> pb.ReportProgressResponse | None:
        """Report state/progress; on a stale lease or cancellation, drop the job."""
        assert self.job is not None
        try:
            reply = self.client.report_progress(
                self.job.job_id, self.job.lease_epoch, state, progress_pb(self.job.progress), pause_reason
            )
        except Gone as exc:
            self._abandon(f"orchestrator refused the report: {exc.details}", keep_folder=True)
            return None
        self.last_progress_report = time.monotonic()
        if reply.cancel_requested:
            self._abandon("cancelled by an operator", keep_folder=False)
            return None
        self.job.state = state
        return reply

    def _abandon(self, why: str, *, keep_folder: bool) -> None:
        """Stop working on the current job (cancelled, or re-leased elsewhere / under a new epoch)."""
        assert self.job is not None
        self._stop_training(checkpoint=keep_folder)
        self._emit("job_dropped", job_id=self.job.job_id, reason=why)
        LocalJob.forget(self.cfg.work_dir, self.job.job_id, keep_folder=keep_folder)
        self.job, self.proc, self.pausing = None, None, False
        self.next_lease = time.monotonic() + 1.0

    def _lease(self) -> None:
        reply = self.client.lease_job()
        wait = reply.next_poll_after.ToNanoseconds() / 1e9
        self.next_lease = time.monotonic() + max(wait, 0.5)
        if not reply.HasField("assignment"):
            return
        a = reply.assignment
        try:
            self.job = LocalJob.from_assignment(a)
        except UntrustedId as exc:  # its id would name a folder: never used
            self._emit("assignment_refused", reason=str(exc))
            return
        self.job.save(self.cfg.work_dir)
        adapter = self.job.training.get("adapter_name")
        self._emit("leased", job_id=a.job_id, attempt=a.attempt, epoch=a.lease_epoch, adapter=adapter)
        self._start_training()

    def _start_training(self) -> None:
        """Start (or resume) the training child for the current job."""
        assert self.job is not None
        job_dir = LocalJob.folder(self.cfg.work_dir, self.job.job_id)
        try:
            if self.job.training.get("base_model_id") != self.cfg.base_model_id:
                raise JobSetupError(
                    ErrorClass.INCOMPATIBLE_BASE,
                    f"job needs base {self.job.training.get('base_model_id')!r}, device has {self.cfg.base_model_id!r}",
                )
            if self.job.training.get("dataset_object"):
                dataset = fetch_shipped_dataset(self.job, job_dir, ssl_context=self.transfer_ssl)
            else:
                dataset = resolve_dataset(self.cfg.datasets_dir, str(self.job.training.get("dataset", "")))
            spec = training_spec(
                self.job, job_dir, self.cfg.base_model_dir, dataset, self.cfg.memory_budget_mb, self.cfg.torch_threads
            )
        except JobSetupError as exc:
            self._fail(exc.error_class, str(exc))
            return
        job_dir.mkdir(parents=True, exist_ok=True)
        write_spec(job_dir, spec)
        self.proc = TrainingProcess(job_dir, on_event=self._on_worker_event)
        self.proc.clear_pause()
        self.proc.start()
        self.pausing = False
        if self._report(JobState.RUNNING) is not None:
            self._emit("training", job_id=self.job.job_id)

    def _drive_job(self, elig: Eligibility) -> None:
        assert self.job is not None
        if self.job.uploaded_sha256:
            if self.completion.due():
                self._complete()
            return
        if self.job.state == JobState.PAUSED and self.proc is None:
            if elig.eligible:
                self._emit("resuming", job_id=self.job.job_id)
                self._start_training()
            return
        if self.proc is None:
            if self.job.state == JobState.LEASED:
                self._start_training()
            return
        outcome = self.proc.poll()
        if outcome is None:
            if not elig.eligible and not self.pausing:
                # Gate closed: the child finishes its optimizer step, checkpoints and exits.
                self.pausing = True
                self.pause_reason = elig.reason  # the gate may reopen before the child stops
                requested_at = time.monotonic()
                self.proc.request_pause()
                self._emit(
                    "pausing", job_id=self.job.job_id, reason=elig.reason.value, detail=elig.detail, t=requested_at
                )
            elif time.monotonic() - self.last_progress_report >= self.cfg.progress_every_s:
                self._report(self.job.state if self.job.state in _REPORTED else JobState.RUNNING)
            return
        self._drain_events()
        self._finish_run(outcome, elig)

    def _finish_run(self, outcome: Outcome, elig: Eligibility) -> None:
        assert self.job is not None
        self.proc = None
        self.pausing = False
        if outcome.kind == "paused":
            reason = elig.reason if not elig.eligible else self.pause_reason
            if self._report(JobState.PAUSED, reason) is not None:
                self.job.save(self.cfg.work_dir)
                self._emit("paused", job_id=self.job.job_id, step=self.job.progress.get("step", 0))
        elif outcome.kind == "done":
            self._upload_and_complete()
        else:
            error = outcome.error_class or ErrorClass.CRASHED
            self._fail(error, outcome.message or f"training exited with {outcome.exit_code}")

    def _upload_and_complete(self) -> None:
        assert self.job is not None
        reply = self._report(JobState.UPLOADING)
        if reply is None:
            return
        job_dir = LocalJob.folder(self.cfg.work_dir, self.job.job_id)
        try:
            handin.upload(
                self.job, job_dir, self.cfg.device_id, self.cfg.base_model_id, reply, ssl_context=self.transfer_ssl
            )
        except (StoreError, OSError, KeyError, ValueError) as exc:
            self._fail(ErrorClass.UPLOAD_FAILED, f"upload failed: {exc}")
            return
        self.job.save(self.cfg.work_dir)
        self._emit("uploaded", job_id=self.job.job_id, sha256=self.job.uploaded_sha256, size=self.job.uploaded_size)
        self.completion.reset()
        self._complete()

    def _complete(self) -> None:
        """CompleteJob for the uploaded adapter; "not now" is retried (handin.Completion)."""
        assert self.job is not None
        try:
            done = self.completion.call(self.client, self.job, LocalJob.folder(self.cfg.work_dir, self.job.job_id))
        except Gone as exc:
            self._abandon(f"completion refused: {exc.details}", keep_folder=False)
            return
        except Invalid as exc:
            self._fail(ErrorClass.UPLOAD_FAILED, f"completion refused: {exc.details}")
            return
        job_id = self.job.job_id
        if done is None:
            self._emit(
                "complete_retry", job_id=job_id, reason=self.completion.last_reason, retry_in_s=self.completion.delay
            )
            return
        self._emit("completed", job_id=job_id, adapter_id=done.adapter.adapter_id, version=done.adapter.version)
        LocalJob.forget(self.cfg.work_dir, job_id)
        self.job = None
        self.next_lease = time.monotonic() + 1.0

    def _fail(self, error: ErrorClass, message: str) -> None:
        assert self.job is not None
        retry = False
        message = public_message(message)  # no local paths or tracebacks leave the device
        with contextlib.suppress(Gone):  # the job moved on without us: nothing left to report
            retry = self.client.fail_job(self.job.job_id, self.job.lease_epoch, error, message).will_retry
        self._emit("failed", job_id=self.job.job_id, error_class=error.value, message=message, will_retry=retry)
        # Keep the folder when the job will come back: the retry resumes from its checkpoint.
        LocalJob.forget(self.cfg.work_dir, self.job.job_id, keep_folder=retry)
        self.job = None
        self.next_lease = time.monotonic() + 1.0

    # ------------------------------------------------------------------ heartbeat and adapters
    def _heartbeat(self) -> None:
        assert self.reading is not None and self.eligibility is not None
        running = self.job if self.job is not None and self.job.state in _REPORTED else None
        req = heartbeat_request(
            self.cfg.device_id,
            self.reading,
            self.eligibility,
            self.adapters.active_adapter_id,
            running,
            self.adapters.refused,
        )
        reply = self.client.heartbeat(req)
        self.next_heartbeat = time.monotonic() + max(reply.next_poll_after.ToNanoseconds() / 1e9, 0.2)
        fleet = fleet_fields(reply.gate_policy if reply.HasField("gate_policy") else None)
        changed = self.fleet_gate.apply(fleet, list(reply.gate_policy_names))
        if changed:
            self._emit("gate_policy", detail=changed, **fleet)
        if self.job is not None and self.job.job_id in reply.cancel_job_ids:
            self._abandon("cancelled by an operator", keep_folder=False)
        elif self.job is not None and self.job.job_id in reply.stale_job_ids:
            # The lease expired or moved on: the job may come back here, and then it resumes
            # from the checkpoint kept in its folder (as on a refused ReportProgress).
            self._abandon("no longer leased to this device", keep_folder=True)
        if self.cfg.serve_adapters:
            refused = len(self.adapters.refused)
            self.adapters.want(reply.desired_adapter if reply.HasField("desired_adapter") else None)
            if len(self.adapters.refused) != refused:
                self.next_heartbeat = 0.0  # tell the orchestrator now: a rollout may be waiting on it
            elif self.adapters.serving.loading:  # look again soon: the desired adapter waits for it
                self.next_heartbeat = min(self.next_heartbeat, time.monotonic() + 2.0)
