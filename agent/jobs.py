"""A leased job on the device: its folder, its persisted assignment, its spec and its adapter blob.

Job folders are keyed by job id (not attempt): when an agent is killed and its lease expires, the
job comes back to this device under a new epoch and training resumes from the checkpoint left
in the same folder. Ids come from the server: one that is not a well-formed id (protos.wire)
never becomes a path, so no reply can make the agent write or delete outside its work dir.
Messages that leave the device go through `public_message` (no local paths, no tracebacks).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import ssl
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters_store import AdapterManifest, BlobInfo, pack_adapter
from agent.training.spec import TrainingSpec
from protos.pocketlora.v1 import agent_service_pb2 as pb
from protos.wire import ErrorClass, JobState, is_id, is_name

_QUANT = {"QUANTIZATION_NONE": "none"}
_FALLBACK = {"FOUR_BIT_FALLBACK_FAIL": "fail"}
_CKPT = {"GRADIENT_CHECKPOINTING_ON": "on", "GRADIENT_CHECKPOINTING_OFF": "off"}


class UntrustedId(ValueError):
    """A server-given id that is not a well-formed id; it never becomes a path."""


def id_path(parent: Path, ident: str, what: str) -> Path:
    """parent / ident, once ident is checked to be a well-formed id (one safe path segment)."""
    if not is_id(ident):
        raise UntrustedId(f"{what} {ident[:64]!r} is not a valid id")
    return parent / ident


# An absolute path in free text (not the path part of a URL or a store key), and ANSI codes.
_LOCAL_PATH = re.compile(r"(?<![\w:/.~-])(?:/[^\s/'\"():,;]+)+/?")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def public_message(text: str) -> str:
    """A message fit to leave the device: a traceback is cut to its last line, ANSI codes are
    dropped, and every absolute local path is cut to its file name."""
    if "Traceback (most recent call last)" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    text = _ANSI.sub("", text)
    return _LOCAL_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", text)


class JobSetupError(Exception):
    """The job cannot start here; error_class says why (sent to the orchestrator)."""

    def __init__(self, error_class: ErrorClass, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


@dataclass
class LocalJob:
    """What the agent remembers about its current job, persisted across agent restarts."""

    job_id: str
    lease_epoch: int
    attempt: int
    training: dict[str, Any]
    state: JobState = JobState.RUNNING  # LEASED, then RUNNING | PAUSED | UPLOADING (the device's view)
    upload_url: str = ""
    dataset_url: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    upload_fields: dict[str, str] = field(default_factory=dict)  # a POST form when set
    # The blob uploaded for this attempt, kept until CompleteJob is answered (retried meanwhile).
    uploaded_sha256: str = ""
    uploaded_size: int = 0

    @staticmethod
    def folder(work_dir: Path, job_id: str) -> Path:
        """The job's folder (checkpoints, output, blob); UntrustedId for a malformed id."""
        return id_path(work_dir / "jobs", job_id, "job id")

    @staticmethod
    def from_assignment(a: pb.Assignment) -> LocalJob:
        """The job a LeaseJob assignment hands over; UntrustedId when its id is malformed."""
        from google.protobuf import json_format

        if not is_id(a.job_id):
            raise UntrustedId(f"job id {a.job_id[:64]!r} is not a valid id")
        training = json_format.MessageToDict(a.training, preserving_proto_field_name=True)
        return LocalJob(
            a.job_id,
            a.lease_epoch,
            a.attempt,
            training,
            state=JobState.LEASED,
            upload_url=a.upload_url,
            dataset_url=a.dataset_url,
            upload_fields=dict(a.upload_fields),
        )

    def save(self, work_dir: Path) -> None:
        """Persist atomically as the agent's current job."""
        path = work_dir / "current_job.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)

    @staticmethod
    def load(work_dir: Path) -> LocalJob | None:
        """The persisted current job, if any."""
        try:
            job = LocalJob(**json.loads((work_dir / "current_job.json").read_text()))
            job.state = JobState(job.state)
        except (FileNotFoundError, json.JSONDecodeError, TypeError, ValueError):
            return None
        return job if is_id(job.job_id) else None

    @staticmethod
    def forget(work_dir: Path, job_id: str, *, keep_folder: bool = False) -> None:
        """Drop the current-job record (and the job folder unless asked to keep it)."""
        (work_dir / "current_job.json").unlink(missing_ok=True)
        if not keep_folder and is_id(job_id):
            shutil.rmtree(LocalJob.folder(work_dir, job_id), ignore_errors=True)


def resolve_dataset(datasets_dir: Path, name: str) -> Path:
    """The local file a job's dataset name refers to (the data never leaves the device, nor does
    the folder it lives in)."""
    if not is_name(name.removesuffix(".jsonl")):
        raise JobSetupError(ErrorClass.DATASET_INVALID, f"dataset name {name[:64]!r} must be a plain name")
    for candidate in (datasets_dir / name, datasets_dir / f"{name}.jsonl"):
        if candidate.is_file():
            return candidate
    raise JobSetupError(ErrorClass.DATASET_INVALID, f"dataset {name!r} not found on this device")


def fetch_shipped_dataset(job: LocalJob, job_dir: Path, *, ssl_context: ssl.SSLContext | None = None) -> Path:
    """Download an operator-shipped dataset once into the job folder, checking its sha256
    (`ssl_context`: how https URLs are verified, None for the system's roots)."""
    from adapters_store import download_from_url
    from adapters_store.errors import IntegrityError, StoreError
    from adapters_store.limits import MAX_DATASET_BYTES

    path = job_dir / "dataset.jsonl"
    if path.is_file():
        return path  # fetched by an earlier run of this job (the download verified it)
    if not job.dataset_url:
        raise JobSetupError(
            ErrorClass.TRANSIENT, "the shipped dataset's download URL is missing; retry with a new lease"
        )
    job_dir.mkdir(parents=True, exist_ok=True)
    try:
        download_from_url(
            job.dataset_url,
            path,
            expected_sha256=str(job.training.get("dataset_sha256", "")).removeprefix("sha256:"),
            max_bytes=MAX_DATASET_BYTES,
            ssl_context=ssl_context,
        )
    except IntegrityError as exc:
        raise JobSetupError(ErrorClass.DATASET_INVALID, f"shipped dataset failed its check: {exc}") from exc
    except StoreError as exc:
        raise JobSetupError(ErrorClass.TRANSIENT, f"shipped dataset download failed: {exc}") from exc
    return path


def training_spec(
    job: LocalJob, job_dir: Path, base_model_dir: Path, dataset_path: Path, memory_budget_mb: int, torch_threads: int
) -> TrainingSpec:
    """Map the API's TrainingSpec (JSON dict) onto the worker's TrainingSpec."""
    t = job.training
    lora = t.get("lora", {})
    kw: dict[str, Any] = {
        "base_model_dir": str(base_model_dir),
        "dataset_path": str(dataset_path),
        "output_dir": str(job_dir / "output"),
        "quantization": _QUANT.get(t.get("quantization", ""), "nf4"),
        "on_4bit_unsupported": _FALLBACK.get(t.get("on_4bit_unsupported", ""), "fallback"),
        "gradient_checkpointing": _CKPT.get(t.get("gradient_checkpointing", ""), "auto"),
        "seed": int(t.get("seed", 0)),
        "memory_budget_mb": memory_budget_mb,
        "torch_threads": torch_threads,
    }
    if lora.get("rank"):
        kw["rank"] = int(lora["rank"])
    if lora.get("alpha"):
        kw["alpha"] = float(lora["alpha"])
    if "dropout" in lora and float(lora["dropout"]) >= 0:
        kw["dropout"] = float(lora["dropout"])
    if lora.get("target_modules"):
        kw["target_modules"] = list(lora["target_modules"])
    if t.get("eval_share"):
        kw["eval_share"] = float(t["eval_share"])
    for api, ours, cast in (
        ("learning_rate", "learning_rate", float),
        ("effective_batch", "effective_batch", int),
        ("micro_batch", "micro_batch", int),
        ("epochs", "epochs", int),
        ("max_steps", "max_steps", int),
        ("max_seq_len", "max_seq_len", int),
        ("checkpoint_every_steps", "checkpoint_every_steps", int),
    ):
        if t.get(api):
            kw[ours] = cast(t[api])
    try:
        return TrainingSpec(**kw)
    except ValueError as exc:
        raise JobSetupError(ErrorClass.INVALID_SPEC, str(exc)) from exc


def eval_figures(job_dir: Path) -> dict[str, float]:
    """The held-out figures the worker wrote next to the adapter (none when it held none out)."""
    try:
        trained = json.loads((job_dir / "output" / "training_manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: float(v) for k, v in (trained.get("eval") or {}).items() if isinstance(v, int | float)}


def pack_output(job: LocalJob, job_dir: Path, device_id: str, base_model_id: str) -> tuple[Path, BlobInfo]:
    """Pack the trained adapter and its lineage manifest into the one blob that is uploaded."""
    out = job_dir / "output"
    trained = json.loads((out / "training_manifest.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    loss_curve = trained.get("loss_curve", [])
    metrics: dict[str, Any] = {
        "final_loss": loss_curve[-1] if loss_curve else None,
        "loss_curve": loss_curve,
        "tokens_seen": trained.get("tokens_seen"),
        "steps": trained.get("steps"),
        "duration_s": trained.get("duration_s"),
        "peak_rss_bytes": trained.get("peak_rss_bytes"),
        **(trained.get("eval") or {}),  # eval_loss_base, eval_loss_adapter, eval_examples
    }
    manifest = AdapterManifest(
        adapter_name=str(job.training.get("adapter_name", "adapter")),
        base_model_id=base_model_id,
        base_fingerprint=str(trained["base_fingerprint"]),
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        target_modules=sorted(config["target_modules"])
        if isinstance(config["target_modules"], list)
        else [str(config["target_modules"])],
        dataset_sha256=str(trained.get("dataset_sha256", "")),
        metrics=metrics,
        training=trained.get("spec", {}),
        device_id=device_id,
        job_id=job.job_id,
        attempt=job.attempt,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    blob = job_dir / "adapter.safetensors"
    return blob, pack_adapter(out, manifest, blob)
