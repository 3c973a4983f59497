"""Schema migrations, shared by SQLite and PostgreSQL (dialect differences are substituted).

Each entry upgrades the schema by one version. Never edit a released entry: append a new one.
`{bigint}` and `{float}` are filled in per dialect. A `PostgresOnly` statement runs verbatim on
PostgreSQL and is skipped elsewhere (server-side functions).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.state import pg_functions


@dataclass(frozen=True)
class PostgresOnly:
    """A statement only PostgreSQL runs, verbatim (no placeholders are filled in)."""

    sql: str


MIGRATIONS: list[list[str | PostgresOnly]] = [
    # 1: the first schema.
    [
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            credential_hash TEXT NOT NULL,
            capabilities TEXT NOT NULL,
            labels TEXT NOT NULL,
            power TEXT NOT NULL,
            eligible INTEGER NOT NULL,
            eligibility_reason TEXT NOT NULL,
            eligibility_detail TEXT NOT NULL,
            active_adapter_id TEXT NOT NULL,
            desired_adapter_id TEXT NOT NULL,
            adapter_history TEXT NOT NULL,
            last_seen {float} NOT NULL,
            enrolled_at {float} NOT NULL,
            running_job_id TEXT NOT NULL
        )""",
        """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            device_id TEXT NOT NULL,
            campaign_id TEXT NOT NULL,
            state TEXT NOT NULL,
            training TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            max_attempts INTEGER NOT NULL,
            lease_epoch {bigint} NOT NULL,
            lease_expires_at {float} NOT NULL,
            progress TEXT NOT NULL,
            last_error_class TEXT NOT NULL,
            last_error TEXT NOT NULL,
            status_message TEXT NOT NULL,
            created_at {float} NOT NULL,
            updated_at {float} NOT NULL,
            deadline {float} NOT NULL,
            adapter_id TEXT NOT NULL,
            not_before {float} NOT NULL,
            paused_s {float} NOT NULL,
            paused_since {float} NOT NULL,
            request_id TEXT,
            memory_estimate_bytes {bigint} NOT NULL,
            change_seq {bigint} NOT NULL
        )""",
        "CREATE UNIQUE INDEX jobs_request ON jobs (request_id)",
        "CREATE INDEX jobs_claim ON jobs (device_id, state, not_before)",
        "CREATE INDEX jobs_lease ON jobs (state, lease_expires_at)",
        "CREATE INDEX jobs_campaign ON jobs (campaign_id, job_id)",
        "CREATE INDEX jobs_change ON jobs (change_seq)",
        """CREATE TABLE campaigns (
            campaign_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            selector TEXT NOT NULL,
            request_id TEXT,
            created_at {float} NOT NULL,
            job_count INTEGER NOT NULL
        )""",
        "CREATE UNIQUE INDEX campaigns_request ON campaigns (request_id)",
        """CREATE TABLE adapters (
            adapter_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            size_bytes {bigint} NOT NULL,
            base_model_id TEXT NOT NULL,
            base_fingerprint TEXT NOT NULL,
            manifest TEXT NOT NULL,
            created_at {float} NOT NULL,
            blob_key TEXT NOT NULL,
            UNIQUE (device_id, name, version)
        )""",
        """CREATE TABLE enrollment_tokens (
            token_hash TEXT PRIMARY KEY,
            expires_at {float} NOT NULL,
            description TEXT NOT NULL
        )""",
    ],
    # 2: the writing transaction's id on every job change. A watch on PostgreSQL follows it
    # instead of change_seq: sequence values are taken in one order and committed in another,
    # so a watcher that had passed seq 7 could miss a seq 6 committed after it. Transactions
    # below the oldest running one are all finished, so below that horizon nothing new can
    # appear. SQLite (one writer, commits in seq order) leaves the column 0.
    [
        "ALTER TABLE jobs ADD COLUMN change_xid {bigint} NOT NULL DEFAULT 0",
        "CREATE INDEX jobs_change_xid ON jobs (change_xid, job_id)",
    ],
    # 3: device polls in one round trip on PostgreSQL (orchestrator/state/pg_functions.py).
    [PostgresOnly(pg_functions.LEASE_V1), PostgresOnly(pg_functions.HEARTBEAT_V1)],
    # 4: operators with roles and revocable tokens, richer enrollment tokens, device labels set
    # by operators apart from what devices report, credential rotation and revocation, the
    # audit log. Existing device labels stay operator labels (they were all that selectors saw).
    [
        """CREATE TABLE operators (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            created_at {float} NOT NULL,
            created_by TEXT NOT NULL
        )""",
        """CREATE TABLE operator_tokens (
            token_id TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            operator TEXT NOT NULL,
            role TEXT NOT NULL,
            description TEXT NOT NULL,
            created_at {float} NOT NULL,
            expires_at {float} NOT NULL,
            revoked_at {float} NOT NULL
        )""",
        "CREATE INDEX operator_tokens_operator ON operator_tokens (operator, token_id)",
        "ALTER TABLE enrollment_tokens ADD COLUMN token_id TEXT",
        "UPDATE enrollment_tokens SET token_id = 'enr-' || substr(token_hash, 1, 24) WHERE token_id IS NULL",
        "CREATE UNIQUE INDEX enrollment_tokens_id ON enrollment_tokens (token_id)",
        "ALTER TABLE enrollment_tokens ADD COLUMN created_at {float} NOT NULL DEFAULT 0",
        "ALTER TABLE enrollment_tokens ADD COLUMN max_devices INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE enrollment_tokens ADD COLUMN uses INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE enrollment_tokens ADD COLUMN revoked_at {float} NOT NULL DEFAULT 0",
        "ALTER TABLE enrollment_tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '{{}}'",
        "ALTER TABLE enrollment_tokens ADD COLUMN created_by TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE devices ADD COLUMN reported_labels TEXT NOT NULL DEFAULT '{{}}'",
        "ALTER TABLE devices ADD COLUMN next_credential_hash TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE devices ADD COLUMN revoked_at {float} NOT NULL DEFAULT 0",
        """CREATE TABLE audit_events (
            event_id TEXT PRIMARY KEY,
            at {float} NOT NULL,
            actor TEXT NOT NULL,
            actor_kind TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            result TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
        "CREATE INDEX audit_events_actor ON audit_events (actor, event_id)",
        "CREATE INDEX audit_events_target ON audit_events (target, event_id)",
    ],
    # 5: what dashboards show. Each job's state changes (its timeline, and jobs ended per
    # minute) and a bounded sample of its progress reports (the loss curve), written in the
    # transaction that saves the job (state/history.py); and why a device refused adapters.
    [
        """CREATE TABLE job_events (
            job_id TEXT NOT NULL,
            at {float} NOT NULL,
            state TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            message TEXT NOT NULL,
            error_class TEXT NOT NULL
        )""",
        "CREATE INDEX job_events_job ON job_events (job_id, at)",
        "CREATE INDEX job_events_at ON job_events (at, state)",
        """CREATE TABLE job_progress (
            job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            step {bigint} NOT NULL,
            total_steps {bigint} NOT NULL,
            loss {float},
            tokens_seen {bigint} NOT NULL,
            at {float} NOT NULL,
            PRIMARY KEY (job_id, attempt, step)
        )""",
        "ALTER TABLE devices ADD COLUMN adapter_refusals TEXT NOT NULL DEFAULT '{{}}'",
        # The PostgreSQL polls write the same history (and take the refusals).
        PostgresOnly(pg_functions.JOB_EVENT_V1),
        PostgresOnly(pg_functions.PROGRESS_BUCKET_V1),
        PostgresOnly(pg_functions.PROGRESS_POINT_V1),
        PostgresOnly(pg_functions.LEASE_V2),
        PostgresOnly(pg_functions.DROP_HEARTBEAT_V1),
        PostgresOnly(pg_functions.HEARTBEAT_V2),
    ],
    # 6: living campaigns, staged rollouts, fleet gate policies, adapter refusals (their column
    # came with 5).
    # Campaigns keep their spec so devices enrolling later get a job; campaigns created before
    # this version have no spec and stay CLOSED (a one-time snapshot, as they were made).
    # One job per device per campaign is a unique index, so a fan-out that runs twice (two
    # control loops, a retried tick) cannot create a second job. profile_at is when a device's
    # labels and capabilities were last written: the fan-out looks only at devices changed
    # since its last pass.
    [
        "ALTER TABLE campaigns ADD COLUMN state TEXT NOT NULL DEFAULT 'CLOSED'",
        "ALTER TABLE campaigns ADD COLUMN training TEXT NOT NULL DEFAULT '{{}}'",
        "ALTER TABLE campaigns ADD COLUMN max_attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN deadline {float} NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN target_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN scanned_until {float} NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN updated_at {float} NOT NULL DEFAULT 0",
        "CREATE INDEX campaigns_state ON campaigns (state)",
        "CREATE UNIQUE INDEX jobs_campaign_device ON jobs (campaign_id, device_id) WHERE campaign_id <> ''",
        "ALTER TABLE devices ADD COLUMN profile_at {float} NOT NULL DEFAULT 0",
        "CREATE INDEX devices_profile ON devices (profile_at)",
        """CREATE TABLE rollouts (
            rollout_id TEXT PRIMARY KEY,
            campaign_id TEXT NOT NULL,
            state TEXT NOT NULL,
            steps TEXT NOT NULL,
            current_step INTEGER NOT NULL,
            assigned_step INTEGER NOT NULL,
            eval_gate TEXT NOT NULL,
            min_healthy_share {float} NOT NULL,
            max_failure_share {float} NOT NULL,
            bake_s {float} NOT NULL,
            message TEXT NOT NULL,
            request_id TEXT,
            created_at {float} NOT NULL,
            updated_at {float} NOT NULL,
            step_started_at {float} NOT NULL,
            eligible_devices INTEGER NOT NULL,
            gate_refused_devices INTEGER NOT NULL
        )""",
        "CREATE UNIQUE INDEX rollouts_request ON rollouts (request_id)",
        "CREATE INDEX rollouts_campaign ON rollouts (campaign_id, rollout_id)",
        "CREATE INDEX rollouts_state ON rollouts (state)",
        """CREATE TABLE rollout_targets (
            rollout_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            adapter_id TEXT NOT NULL,
            step INTEGER NOT NULL,
            previous_adapter_id TEXT NOT NULL,
            outcome TEXT NOT NULL,
            reason TEXT NOT NULL,
            changed_at {float} NOT NULL,
            PRIMARY KEY (rollout_id, device_id)
        )""",
        """CREATE TABLE gate_policies (
            name TEXT PRIMARY KEY,
            selector TEXT NOT NULL,
            policy TEXT NOT NULL,
            priority INTEGER NOT NULL,
            updated_at {float} NOT NULL
        )""",
        # The poll functions skip paused campaigns and return what gate policies select on (V3).
        PostgresOnly(pg_functions.LEASE_V3),
        PostgresOnly(pg_functions.DROP_HEARTBEAT_V2),
        PostgresOnly(pg_functions.HEARTBEAT_V3),
    ],
]

LATEST = len(MIGRATIONS)
