"""Orchestrator settings (typed data, validated once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters_store.limits import MAX_BLOB_BYTES
from orchestrator.domain import RetryPolicy
from orchestrator.pace import PacePolicy


@dataclass(frozen=True)
class Limits:
    """What one caller may cost (orchestrator/limits.py enforces them)."""

    unverified_per_s: float = 200.0  # per peer address
    unverified_burst: int = 2_000
    calls_per_device: int = 4  # in flight at once
    watch_streams: int = 10_000  # in all, on one replica
    watch_streams_per_operator: int = 100


@dataclass
class OrchestratorConfig:
    """Tunables of leases, retries and URLs."""

    lease_s: float = 60.0
    retry_base_s: float = 5.0
    retry_max_s: float = 600.0
    upload_url_s: float = 600.0
    download_url_s: float = 300.0
    reap_interval_s: float = 1.0
    # Largest adapter blob a device may upload: the store refuses larger bodies (S3 through the
    # POST policy's content-length-range) and CompleteJob refuses to announce one.
    max_adapter_bytes: int = MAX_BLOB_BYTES
    # Device credential hashes are cached this long. Credentials rotate only on enroll, which
    # refreshes this replica's cache at once; on other replicas an old credential may still be
    # accepted for up to this long. 0 reads the store on every call.
    credential_cache_s: float = 5.0
    # A poll that changes nothing else rewrites the device row (last_seen) at most this often:
    # last_seen may lag by this much, and polls stay read-only transactions. 0 writes every poll.
    last_seen_write_s: float = 5.0
    # The campaign fan-out looks again at devices changed this long before its last pass, so an
    # enrollment in flight then (or stamped by a replica whose clock runs behind) is not missed.
    campaign_rescan_s: float = 10.0
    # Each replica re-reads the operators' gate policies at most this often; a policy set through
    # a replica reaches the devices polling that replica at once, the others within this long.
    gate_policy_refresh_s: float = 2.0
    pace: PacePolicy = field(default_factory=PacePolicy)
    limits: Limits = field(default_factory=Limits)
    # Bootstrap enrollment token (e.g. from POCKETLORA_ENROLLMENT_TOKEN); empty means none.
    enrollment_token: str = ""
    # Bootstrap operator token (e.g. from POCKETLORA_OPERATOR_TOKEN): registered as the token of
    # an admin named `admin` when no admin exists yet, never after; empty disables it.
    bootstrap_token: str = ""
    # Base models whose runtime bundles this orchestrator exports for the on-device ONNX
    # runtime: base model id -> local Hugging Face folder. Empty: devices get NOT_FOUND.
    runtime_bases: dict[str, str] = field(default_factory=dict)
    # Weight precision of exported bundles: "int4" (what devices run) or "fp32" (exact).
    bundle_precision: str = "int4"

    @property
    def retry(self) -> RetryPolicy:
        """Backoff between attempts."""
        return RetryPolicy(self.retry_base_s, self.retry_max_s)

    def __post_init__(self) -> None:
        for name in ("lease_s", "retry_base_s", "retry_max_s", "upload_url_s", "download_url_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.max_adapter_bytes <= MAX_BLOB_BYTES:
            raise ValueError(f"max_adapter_bytes must be between 1 and {MAX_BLOB_BYTES}, got {self.max_adapter_bytes}")
        for name in ("credential_cache_s", "last_seen_write_s", "campaign_rescan_s", "gate_policy_refresh_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.bundle_precision not in ("int4", "fp32"):
            raise ValueError(f"bundle_precision must be int4 or fp32, got {self.bundle_precision!r}")
