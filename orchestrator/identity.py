"""Devices: who is calling, how a device gets and rotates its credential, and what admins can do
to a device's identity.

Devices enroll with an enrollment token (the deployment's bootstrap token, or one issued by an
admin: listed, revocable, optionally single-use or limited to N devices, with labels it fixes on
every device enrolled with it) and receive a 256-bit credential; only its sha256 is stored.
Every later device call names the device (metadata) and carries the credential. An id that is
already enrolled cannot be enrolled again: the device rotates its credential with its current
one, or an admin resets the device first, so no device can take over another's id.

Rotation is crash-safe: the new credential is stored as pending and both are accepted until the
device's first call with the new one, which promotes it.

Labels that selectors target are set by admins (or fixed by the enrollment token); what a device
reports about itself is kept apart (`reported_labels`) and never used to target it. A revoked
device is refused by every replica within `credential_cache_s`, the time a replica trusts its
cache of recently checked credentials.

Under mutual TLS a device's certificate also binds its id: a call (enrollment included) whose
device id is not one its verified client certificate names is refused before anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import audit, validation
from orchestrator.access_records import EnrollmentTokenRecord
from orchestrator.audit import Actor
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import DeviceRecord, JobFilter, JobState, new_id
from orchestrator.errors import InvalidArgument, PermissionDenied, Unauthenticated, found
from orchestrator.state.base import StateStore, Tx

# A fleet larger than this just reads the store more often; the cache never grows past it.
_CACHE_MAX = 200_000
_OPEN_STATES = (JobState.QUEUED, JobState.LEASED, JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING)


def hash_secret(secret: str) -> str:
    """Credentials are 256-bit random strings, so one round of sha256 is enough to store them."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class DeviceCall:
    """Who a device call says it comes from: the device named in its metadata, the credential
    it carries, the device id its request body names (if any), and the device ids its verified
    client certificate names (None: the connection carries no client certificate)."""

    device_id: str
    credential: str
    claimed: str = ""
    certified: tuple[str, ...] | None = None

    @property
    def actor(self) -> Actor:
        """The device as the audit log names it."""
        return Actor("device", self.device_id)


def check_certificate(device_id: str, certified: tuple[str, ...] | None) -> None:
    """Refuse a device id that the caller's client certificate does not name (no I/O, so it
    runs first: it reveals nothing about the device the call names)."""
    if certified is not None and device_id not in certified:
        named = ", ".join(repr(n) for n in certified) or "no device"
        raise PermissionDenied(f"the client certificate is for {named}, not device {device_id!r}")


class Identity:
    """Device authentication, enrollment, credential rotation, and device administration."""

    def __init__(self, state: StateStore, config: OrchestratorConfig, clock: Callable[[], float]) -> None:
        self.state = state
        self.config = config
        self.clock = clock
        # device_id -> (credential hash, when read)
        self._credentials: dict[str, tuple[str, float]] = {}

    # ------------------------------------------------------------------ device calls
    def vouched(self, call: DeviceCall) -> bool:
        """True when the credential matches a hash read recently (no I/O). False means the call
        must be checked against the device row: a miss, an expired entry, or a mismatch (the
        device may have rotated through another replica)."""
        cached = self._credentials.get(call.device_id)
        if cached is None or not call.credential or self.clock() - cached[1] >= self.config.credential_cache_s:
            return False
        return hmac.compare_digest(cached[0], hash_secret(call.credential))

    def check(self, call: DeviceCall, device: DeviceRecord | None, tx: Tx | None = None) -> None:
        """Admit the call against the device row just read in `tx` (or the cache), then refuse a
        request that names another device than the credential's. A pending rotated credential
        is promoted on its first use (written in `tx`). Nothing is revealed before the
        credential is checked."""
        if not call.device_id or not call.credential:
            raise Unauthenticated("device id and credential metadata are required")
        check_certificate(call.device_id, call.certified)
        if not self.vouched(call):
            digest = hash_secret(call.credential)
            if device is None or not device.credential_hash:
                raise Unauthenticated(f"unknown, revoked or reset device {call.device_id!r}")
            if device.next_credential_hash and hmac.compare_digest(device.next_credential_hash, digest) and tx:
                tx.update_device(call.device_id, {"credential_hash": digest, "next_credential_hash": ""})
                device.credential_hash, device.next_credential_hash = digest, ""
            if not hmac.compare_digest(device.credential_hash, digest):
                raise Unauthenticated(f"unknown device or wrong credential for {call.device_id!r}")
            self.remember(call.device_id, device.credential_hash)
        if call.claimed and call.claimed != call.device_id:
            raise PermissionDenied(f"credential is for {call.device_id!r}, request names {call.claimed!r}")

    def admit(self, call: DeviceCall, tx: Tx) -> None:
        """Check the call, reading the device row only when the cache cannot vouch for it."""
        self.check(call, None if self.vouched(call) else tx.get_device(call.device_id), tx)

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
    def enroll(
        self,
        enrollment_token: str,
        device_id: str,
        capabilities: dict[str, Any],
        certified: tuple[str, ...] | None = None,
    ) -> str:
        """Register a new device (or one an admin reset); return its credential. `certified`: the
        device ids the caller's client certificate names (None: no certificate)."""
        caps = dict(capabilities)
        credential = "pldev_" + secrets.token_urlsafe(32)
        now = self.clock()
        with self.state.transaction() as tx:
            token = self._use_token(tx, enrollment_token, now)  # first: a stranger learns nothing
            validation.device_id(device_id)
            check_certificate(device_id, certified)
            raw = caps.pop("labels", {})
            reported = validation.labels({str(k): str(v) for k, v in raw.items()}, "capabilities.labels")
            device = tx.get_device(device_id, for_update=True)
            if device is not None and device.revoked_at:
                raise PermissionDenied(f"device {device_id} was revoked; an admin must reset it before it enrolls")
            if device is not None and device.credential_hash:
                raise PermissionDenied(
                    f"device {device_id} is already enrolled: rotate its credential with the current one,"
                    " or have an admin reset the device"
                )
            device = device or DeviceRecord(device_id=device_id, credential_hash="", enrolled_at=now)
            device.credential_hash, device.next_credential_hash = hash_secret(credential), ""
            device.capabilities, device.reported_labels, device.last_seen = caps, reported, now
            device.profile_at = now  # what campaign selectors match changed: campaigns look again
            if token is not None:
                device.labels = {**device.labels, **token.labels}
            tx.upsert_device(device)
            via = f"token {token.token_id}" if token is not None else "bootstrap token"
            audit.record(tx, now, Actor("device", device_id), "Enroll", device_id, detail=via)
        self.remember(device_id, device.credential_hash)
        return credential

    def _use_token(self, tx: Tx, token: str, now: float) -> EnrollmentTokenRecord | None:
        """Count one use of the enrollment token (None for the bootstrap token)."""
        bootstrap = self.config.enrollment_token
        if token and bootstrap and hmac.compare_digest(token.encode(), bootstrap.encode()):
            return None
        record = tx.get_enrollment_token(hash_secret(token), for_update=True) if token else None
        if (
            record is None
            or record.revoked_at
            or record.expires_at <= now
            or (record.max_devices and record.uses >= record.max_devices)
        ):
            raise Unauthenticated(
                "a valid enrollment token is required to enroll (unknown, expired, revoked or used up)"
            )
        tx.update_enrollment_token(record.token_id, {"uses": record.uses + 1})
        return record

    def rotate_credential(self, call: DeviceCall) -> str:
        """A new credential for the calling device, pending until its first use."""
        credential = "pldev_" + secrets.token_urlsafe(32)
        now = self.clock()
        with self.state.transaction() as tx:
            self.check(call, tx.get_device(call.device_id, for_update=True), tx)
            tx.update_device(call.device_id, {"next_credential_hash": hash_secret(credential)})
            audit.record(tx, now, call.actor, "RotateCredential", call.device_id)
        return credential

    # ------------------------------------------------------------------ enrollment tokens
    def create_enrollment_token(
        self, actor: Actor, ttl_s: float, description: str, max_devices: int = 0, labels: dict[str, str] | None = None
    ) -> tuple[str, EnrollmentTokenRecord]:
        """Issue an enrollment token; only its hash is stored."""
        if ttl_s <= 0 or ttl_s > 366 * 86400:
            raise InvalidArgument("ttl", "must be between 1 second and 366 days")
        if not 0 <= max_devices <= 1_000_000:
            raise InvalidArgument("max_devices", f"{max_devices} is outside 0 (any number) - 1,000,000")
        validation.text(description, "description", 200)
        fixed = validation.labels(dict(labels or {}), "labels")
        secret = "plenr_" + secrets.token_urlsafe(32)
        now = self.clock()
        record = EnrollmentTokenRecord(
            new_id("enr"), hash_secret(secret), description, now, now + ttl_s, max_devices, 0, 0.0, fixed, actor.name
        )
        with self.state.transaction() as tx:
            tx.insert_enrollment_token(record)
            audit.record(tx, now, actor, "CreateEnrollmentToken", record.token_id, detail=description)
        return secret, record

    def list_enrollment_tokens(self, page_size: int, page_token: str) -> tuple[list[EnrollmentTokenRecord], str]:
        """A page of enrollment tokens (never their secrets), by id."""
        size = validation.page_size(page_size)
        validation.optional_object_id(page_token, "page_token")
        with self.state.transaction() as tx:
            tokens = tx.list_enrollment_tokens(size + 1, page_token)
        return tokens[:size], (tokens[size - 1].token_id if len(tokens) > size else "")

    def revoke_enrollment_token(self, actor: Actor, token_id: str) -> None:
        """No device enrolls with this token any more."""
        validation.object_id(token_id, "token_id")
        now = self.clock()
        with self.state.transaction() as tx:
            if not tx.update_enrollment_token(token_id, {"revoked_at": now}):
                found(None, "enrollment token", token_id)
            audit.record(tx, now, actor, "RevokeEnrollmentToken", token_id)

    # ------------------------------------------------------------------ device administration
    def set_device_labels(self, actor: Actor, device_id: str, labels: dict[str, str]) -> DeviceRecord:
        """Replace the labels selectors target."""
        validation.device_id(device_id)
        labels = validation.labels(dict(labels), "labels")
        # profile_at: the device may match campaign selectors it did not before; they look again.
        values = {"labels": labels, "profile_at": self.clock()}
        return self._administer(actor, "SetDeviceLabels", device_id, values, detail=str(sorted(labels)))

    def reset_device(self, actor: Actor, device_id: str) -> DeviceRecord:
        """Drop the device's credential (and a revocation): it may enroll again with a token."""
        validation.device_id(device_id)
        values = {"credential_hash": "", "next_credential_hash": "", "revoked_at": 0.0}
        return self._administer(actor, "ResetDevice", device_id, values)

    def revoke_device(self, actor: Actor, device_id: str) -> DeviceRecord:
        """Refuse the device from now on (every replica within credential_cache_s) until reset."""
        validation.device_id(device_id)
        values = {"credential_hash": "", "next_credential_hash": "", "revoked_at": self.clock()}
        return self._administer(actor, "RevokeDevice", device_id, values)

    def delete_device(self, actor: Actor, device_id: str) -> int:
        """Forget the device and cancel its unfinished jobs; returns how many were cancelled."""
        validation.device_id(device_id)
        now = self.clock()
        with self.state.transaction() as tx:
            found(tx.get_device(device_id, for_update=True), "device", device_id)
            jobs = list(tx.iter_jobs(JobFilter(states=_OPEN_STATES, device_id=device_id)))
            for job in jobs:
                job.cancel(now)
                tx.save_job(job)
            tx.delete_device(device_id)
            audit.record(tx, now, actor, "DeleteDevice", device_id, detail=f"{len(jobs)} jobs cancelled")
        self._credentials.pop(device_id, None)
        return len(jobs)

    def _administer(
        self, actor: Actor, action: str, device_id: str, values: dict[str, Any], detail: str = ""
    ) -> DeviceRecord:
        now = self.clock()
        with self.state.transaction() as tx:
            device = found(tx.get_device(device_id, for_update=True), "device", device_id)
            tx.update_device(device_id, values)
            audit.record(tx, now, actor, action, device_id, detail=detail)
        self._credentials.pop(device_id, None)
        for key, value in values.items():
            setattr(device, key, value)
        return device


def require_device(device: DeviceRecord | None, device_id: str) -> DeviceRecord:
    """The device, or NotFound (a credential the cache vouched for can outlive its row)."""
    return found(device, "device", device_id)
