"""Who is calling: operators by token, devices by the credential they got at enrollment.

Devices enroll with an enrollment token (the deployment's bootstrap token, or one issued by
`create_enrollment_token`) and receive a 256-bit credential; only its sha256 is stored. Every
later device call names the device (metadata) and carries the credential. Recently seen
credential hashes are cached per replica (`OrchestratorConfig.credential_cache_s`): a cache hit
costs no I/O, and a miss is checked against the device row the call reads anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import validation
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import DeviceRecord
from orchestrator.errors import InvalidArgument, PermissionDenied, Unauthenticated, found
from orchestrator.state.base import StateStore, Tx

# A fleet larger than this just reads the store more often; the cache never grows past it.
_CACHE_MAX = 200_000


def hash_secret(secret: str) -> str:
    """Credentials are 256-bit random strings, so one round of sha256 is enough to store them."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class DeviceCall:
    """Who a device call says it comes from: the device named in its metadata, the credential
    it carries, and the device id its request body names (if any)."""

    device_id: str
    credential: str
    claimed: str = ""


class Identity:
    """Operator and device authentication, enrollment and enrollment tokens."""

    def __init__(self, state: StateStore, config: OrchestratorConfig, clock: Callable[[], float]) -> None:
        self.state = state
        self.config = config
        self.clock = clock
        self._operator_hash = hash_secret(config.operator_token)
        # device_id -> (credential hash, when read)
        self._credentials: dict[str, tuple[str, float]] = {}

    # ------------------------------------------------------------------ operators
    def authenticate_operator(self, token: str) -> None:
        """Raise Unauthenticated unless the token is the operator token."""
        if not token or not hmac.compare_digest(hash_secret(token), self._operator_hash):
            raise Unauthenticated("a valid operator token is required")

    # ------------------------------------------------------------------ devices
    def vouched(self, call: DeviceCall) -> bool:
        """True when the credential matches a hash read recently (no I/O). False means the call
        must be checked against the device row: a miss, an expired entry, or a mismatch (the
        device may have re-enrolled through another replica)."""
        cached = self._credentials.get(call.device_id)
        if cached is None or not call.credential or self.clock() - cached[1] >= self.config.credential_cache_s:
            return False
        return hmac.compare_digest(cached[0], hash_secret(call.credential))

    def check(self, call: DeviceCall, device: DeviceRecord | None) -> None:
        """Admit the call against the device row just read (or the cache), then refuse a request
        that names another device than the credential's. Nothing is revealed before the
        credential is checked."""
        if not call.device_id or not call.credential:
            raise Unauthenticated("device id and credential metadata are required")
        if not self.vouched(call):
            if device is None or not hmac.compare_digest(device.credential_hash, hash_secret(call.credential)):
                raise Unauthenticated(f"unknown device or wrong credential for {call.device_id!r}")
            self.remember(call.device_id, device.credential_hash)
        if call.claimed and call.claimed != call.device_id:
            raise PermissionDenied(f"credential is for {call.device_id!r}, request names {call.claimed!r}")

    def admit(self, call: DeviceCall, tx: Tx) -> None:
        """Check the call, reading the device row only when the cache cannot vouch for it."""
        self.check(call, None if self.vouched(call) else tx.get_device(call.device_id))

    def authenticate(self, call: DeviceCall) -> None:
        """Check the call in a transaction of its own (before refusing a malformed request)."""
        with self.state.transaction() as tx:
            self.admit(call, tx)

    def remember(self, device_id: str, credential_hash: str) -> None:
        """Cache a credential hash just checked against the store."""
        if not self.config.credential_cache_s:
            return
        if len(self._credentials) >= _CACHE_MAX:
            self._credentials.clear()
        self._credentials[device_id] = (credential_hash, self.clock())

    # ------------------------------------------------------------------ enrollment
    def create_enrollment_token(self, ttl_s: float, description: str) -> tuple[str, float]:
        """Issue an enrollment token; only its hash is stored."""
        if ttl_s <= 0 or ttl_s > 366 * 86400:
            raise InvalidArgument("ttl", "must be between 1 second and 366 days")
        validation.text(description, "description", 200)
        token = "plenr_" + secrets.token_urlsafe(32)
        expires_at = self.clock() + ttl_s
        with self.state.transaction() as tx:
            tx.add_enrollment_token(hash_secret(token), expires_at, description)
        return token, expires_at

    def _enrollment_token_ok(self, token: str) -> bool:
        if self.config.enrollment_token and hmac.compare_digest(token, self.config.enrollment_token):
            return True
        with self.state.transaction() as tx:
            expiry = tx.enrollment_token_expiry(hash_secret(token))
        return expiry is not None and expiry > self.clock()

    def enroll(self, enrollment_token: str, device_id: str, capabilities: dict[str, Any]) -> str:
        """Register a device (or re-register it, rotating its credential); return the credential."""
        if not enrollment_token or not self._enrollment_token_ok(enrollment_token):
            raise Unauthenticated("a valid enrollment token is required to enroll")
        validation.device_id(device_id)
        caps = dict(capabilities)
        raw_labels = caps.pop("labels", {})
        labels = validation.labels({str(k): str(v) for k, v in raw_labels.items()}, "capabilities.labels")
        if "base_shape" in caps:
            caps["base_shape"] = validation.base_shape(caps["base_shape"])
        credential = "pldev_" + secrets.token_urlsafe(32)
        now = self.clock()
        with self.state.transaction() as tx:
            device = tx.get_device(device_id, for_update=True) or DeviceRecord(
                device_id=device_id, credential_hash="", enrolled_at=now
            )
            device.credential_hash = hash_secret(credential)
            device.capabilities = caps
            device.labels = labels
            device.last_seen = now
            tx.upsert_device(device)
        self.remember(device_id, device.credential_hash)
        return credential


def require_device(device: DeviceRecord | None, device_id: str) -> DeviceRecord:
    """The device, or NotFound (a credential the cache vouched for can outlive its row)."""
    return found(device, "device", device_id)
