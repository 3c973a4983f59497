"""Operators: named identities with roles, and the bearer tokens they call with.

    viewer    read and watch
    operator  submit, cancel, activate, roll back, campaigns
    admin     tokens, devices, operators, the audit log

Tokens are random 256-bit strings shown once and stored as their sha256, with an expiry and a
revocation time; a token may carry a role below its operator's (a read-only token for a
dashboard). Recently checked tokens are cached per replica for `credential_cache_s`, so a
revoked token is refused by every replica within that time.

The bootstrap token (from the deployment's environment) exists only to create the first admin:
when no admin exists, the server registers it as the token of an admin named `admin`. Once any
admin exists it is never registered again; it is disabled by leaving it empty.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator import audit, validation
from orchestrator.access_records import OperatorRecord, OperatorTokenRecord
from orchestrator.audit import Actor
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import Role, new_id
from orchestrator.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    found,
)
from orchestrator.identity import hash_secret
from orchestrator.state.base import StateStore

BOOTSTRAP_ADMIN = "admin"
_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Principal:
    """An authenticated operator call: who, with which role, through which token."""

    name: str
    role: Role
    token_id: str

    @property
    def actor(self) -> Actor:
        """The principal as the audit log names it."""
        return Actor("operator", self.name)


class Operators:
    """Operator authentication, authorization, and operator and token administration."""

    def __init__(self, state: StateStore, config: OrchestratorConfig, clock: Callable[[], float]) -> None:
        self.state = state
        self.config = config
        self.clock = clock
        # token hash -> (principal, token expiry, when read)
        self._cache: dict[str, tuple[Principal, float, float]] = {}

    # ------------------------------------------------------------------ calls
    def cached(self, token: str) -> Principal | None:
        """The principal of a token checked recently (no I/O), or None: ask `authenticate`."""
        if not token:
            return None
        now = self.clock()
        cached = self._cache.get(hash_secret(token))
        if cached is not None and now - cached[2] < self.config.credential_cache_s and _live(cached[1], now):
            return cached[0]
        return None

    def authenticate(self, token: str) -> Principal:
        """The principal a bearer token stands for; Unauthenticated when none."""
        if not token:
            raise Unauthenticated("an operator token is required (authorization: Bearer <token>)")
        principal = self.cached(token)
        if principal is not None:
            return principal
        digest = hash_secret(token)
        now = self.clock()
        with self.state.transaction() as tx:
            record = tx.get_operator_token(digest)
        if record is None or record.revoked_at or not _live(record.expires_at, now):
            raise Unauthenticated("the operator token is unknown, expired or revoked")
        principal = Principal(record.operator, record.role, record.token_id)
        if self.config.credential_cache_s:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (principal, record.expires_at, now)
        return principal

    @staticmethod
    def authorize(principal: Principal, needed: Role, action: str) -> None:
        """PermissionDenied unless the principal's role includes `needed`."""
        if not principal.role.allows(needed):
            raise PermissionDenied(
                f"{action} needs the {needed.value} role; {principal.name} has {principal.role.value}"
            )

    # ------------------------------------------------------------------ bootstrap
    def ensure_bootstrap_admin(self) -> bool:
        """Register the bootstrap token as the first admin's when no admin exists; True if it did."""
        token = self.config.bootstrap_token
        if not token:
            return False
        now = self.clock()
        try:
            with self.state.transaction() as tx:
                if any(op.role == Role.ADMIN for op in tx.list_operators()):
                    return False
                tx.insert_operator(OperatorRecord(BOOTSTRAP_ADMIN, Role.ADMIN, now, created_by="bootstrap"))
                record = _token_record(BOOTSTRAP_ADMIN, Role.ADMIN, token, "bootstrap token", now, 0.0)
                tx.insert_operator_token(record)
                audit.record(tx, now, Actor("bootstrap", "bootstrap"), "CreateOperator", BOOTSTRAP_ADMIN)
        except AlreadyExists:
            return False  # another replica registered it at the same moment
        return True

    # ------------------------------------------------------------------ administration
    def create_operator(self, actor: Actor, name: str, role: Role) -> OperatorRecord:
        """A new named operator (without tokens yet)."""
        validation.name(name, "name")
        now = self.clock()
        operator = OperatorRecord(name, role, now, created_by=actor.name)
        with self.state.transaction() as tx:
            tx.insert_operator(operator)
            audit.record(tx, now, actor, "CreateOperator", name, detail=f"role {role.value}")
        return operator

    def list_operators(self) -> list[OperatorRecord]:
        """Every operator."""
        with self.state.transaction() as tx:
            return tx.list_operators()

    def create_token(
        self, actor: Actor, operator: str, role: Role | None, ttl_s: float, description: str
    ) -> tuple[str, OperatorTokenRecord]:
        """A new token for an operator (its role by default, or one below it); shown once."""
        validation.name(operator, "operator")
        validation.text(description, "description", 200)
        if ttl_s < 0 or ttl_s > 366 * 86400:
            raise InvalidArgument("ttl", "must be between 0 (no expiry) and 366 days")
        now = self.clock()
        secret = "plop_" + secrets.token_urlsafe(32)
        with self.state.transaction() as tx:
            owner = found(tx.get_operator(operator), "operator", operator)
            granted = role or owner.role
            if not owner.role.allows(granted):
                raise FailedPrecondition(f"operator {operator} has role {owner.role.value}, below {granted.value}")
            record = _token_record(operator, granted, secret, description, now, now + ttl_s if ttl_s else 0.0)
            tx.insert_operator_token(record)
            audit.record(tx, now, actor, "CreateOperatorToken", operator, detail=f"{record.token_id} {granted.value}")
        return secret, record

    def list_tokens(self, operator: str, page_size: int, page_token: str) -> tuple[list[OperatorTokenRecord], str]:
        """A page of tokens (never their secrets), of one operator when given."""
        size = validation.page_size(page_size)
        if operator:
            validation.name(operator, "operator")
        validation.optional_object_id(page_token, "page_token")
        with self.state.transaction() as tx:
            tokens = tx.list_operator_tokens(operator, size + 1, page_token)
        return tokens[:size], (tokens[size - 1].token_id if len(tokens) > size else "")

    def revoke_token(self, actor: Actor, token_id: str) -> None:
        """Revoke a token; every replica refuses it within the credential cache time."""
        validation.object_id(token_id, "token_id")
        now = self.clock()
        with self.state.transaction() as tx:
            if not tx.revoke_operator_token(token_id, now):
                found(None, "operator token", token_id)
            audit.record(tx, now, actor, "RevokeOperatorToken", token_id)
        self._cache = {k: v for k, v in self._cache.items() if v[0].token_id != token_id}


def _live(expires_at: float, now: float) -> bool:
    return not expires_at or expires_at > now


def _token_record(
    operator: str, role: Role, secret: str, description: str, now: float, expires_at: float
) -> OperatorTokenRecord:
    return OperatorTokenRecord(new_id("tok"), hash_secret(secret), operator, role, description, now, expires_at)
