"""Orchestrator settings (typed data, validated once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.domain import RetryPolicy
from orchestrator.pace import PacePolicy


@dataclass
class OrchestratorConfig:
    """Tunables of leases, retries and URLs."""

    lease_s: float = 60.0
    retry_base_s: float = 5.0
    retry_max_s: float = 600.0
    upload_url_s: float = 600.0
    download_url_s: float = 300.0
    reap_interval_s: float = 1.0
    # Device credential hashes are cached this long. Credentials rotate only on enroll, which
    # refreshes this replica's cache at once; on other replicas an old credential may still be
    # accepted for up to this long. 0 reads the store on every call.
    credential_cache_s: float = 5.0
    # A poll that changes nothing else rewrites the device row (last_seen) at most this often:
    # last_seen may lag by this much, and polls stay read-only transactions. 0 writes every poll.
    last_seen_write_s: float = 5.0
    pace: PacePolicy = field(default_factory=PacePolicy)
    # Bootstrap enrollment token (e.g. from POCKETLORA_ENROLLMENT_TOKEN); empty means none.
    enrollment_token: str = ""
    # Operator token; operator calls need it.
    operator_token: str = ""

    @property
    def retry(self) -> RetryPolicy:
        """Backoff between attempts."""
        return RetryPolicy(self.retry_base_s, self.retry_max_s)

    def __post_init__(self) -> None:
        for name in ("lease_s", "retry_base_s", "retry_max_s", "upload_url_s", "download_url_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("credential_cache_s", "last_seen_write_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.operator_token:
            raise ValueError("operator_token is required")
