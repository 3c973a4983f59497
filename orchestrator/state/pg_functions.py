"""Server-side functions that run a device poll in one PostgreSQL round trip (migration 3).

Each mirrors its Python use case in orchestrator/lifecycle.py, which stays the reference (it is
what SQLite and every other path run); tests/orchestrator/test_polls.py runs the same cases
through both and compares the outcomes. A change to lease or heartbeat semantics changes both,
in a new migration (`CREATE OR REPLACE FUNCTION`): released entries are never edited.

Versions: V1 (migration 3); V2 (migration 5): the lease skips jobs of a PAUSED campaign, and the
heartbeat also records the device's adapter refusals and returns the device's labels and
capabilities (the gate policies that match it are merged in Python).

    pocketlora_lease(device, credential hash or NULL, now, lease_s, last_seen_write_s, empty progress)
        -> (outcome, job JSON)
       outcome: 'leased' | 'none' | 'slow' (the oldest due job may not fit: the caller runs the
       full placement in Python) | 'unauthenticated' | 'no_device'
    pocketlora_heartbeat(device, credential hash or NULL, now, lease_s, last_seen_write_s,
                         running job, epoch, state, progress JSON, pause reason,
                         power JSON, eligible, reason, detail, active adapter, free storage
                         [, refusals JSON])
        -> (outcome, lease_expires_at, desired adapter JSON [, labels JSON, capabilities JSON])
       outcome: 'ok' | 'cancel' | 'stale' | 'unauthenticated' | 'no_device'; an illegal
       transition raises SQLSTATE PLF01 with the message FailedPrecondition carries.

A NULL credential hash means the caller's credential cache vouched for it. JSON columns hold the
text Python wrote (json.dumps, sorted keys); they are compared as text, as Python compares the
decoded values, so an unchanged report writes nothing.
"""

from __future__ import annotations

# SQLSTATE of an illegal device-reported transition (mapped to FailedPrecondition).
ILLEGAL_TRANSITION = "PLF01"

LEASE_V1 = r"""
CREATE OR REPLACE FUNCTION pocketlora_lease(
    p_device TEXT, p_cred_hash TEXT, p_now DOUBLE PRECISION, p_lease_s DOUBLE PRECISION,
    p_last_seen_write_s DOUBLE PRECISION, p_empty_progress TEXT
) RETURNS TABLE (outcome TEXT, job_json TEXT) LANGUAGE plpgsql AS $fn$
DECLARE
    d devices%ROWTYPE;
    j jobs%ROWTYPE;
    caps JSONB;
    spec JSONB;
    budget BIGINT;
BEGIN
    SELECT * INTO d FROM devices WHERE device_id = p_device;
    IF NOT FOUND THEN
        RETURN QUERY SELECT CASE WHEN p_cred_hash IS NULL THEN 'no_device' ELSE 'unauthenticated' END, NULL::TEXT;
        RETURN;
    END IF;
    IF p_cred_hash IS NOT NULL AND d.credential_hash <> p_cred_hash THEN
        RETURN QUERY SELECT 'unauthenticated'::TEXT, NULL::TEXT;
        RETURN;
    END IF;
    SELECT * INTO j FROM jobs
        WHERE device_id = p_device AND state = 'QUEUED' AND not_before <= p_now
        ORDER BY created_at, job_id LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF FOUND THEN
        -- placement.placement_problem, conservatively: anything that might not fit goes to
        -- the Python path, which records why in the job's status_message.
        caps := d.capabilities::JSONB;
        spec := j.training::JSONB;
        budget := COALESCE(NULLIF((caps->>'memory_budget_bytes')::BIGINT, 0), (caps->>'ram_bytes')::BIGINT, 0);
        IF (COALESCE(spec->>'base_model_id', '') <> '' AND COALESCE(caps->>'base_model_id', '') <> ''
                AND spec->>'base_model_id' <> caps->>'base_model_id')
            OR (COALESCE(spec->>'quantization', 'QUANTIZATION_NF4') IN ('QUANTIZATION_NF4', 'QUANTIZATION_UNSPECIFIED')
                AND spec->>'on_4bit_unsupported' = 'FOUR_BIT_FALLBACK_FAIL'
                AND NOT COALESCE((caps->>'supports_4bit')::BOOLEAN, FALSE))
            OR (j.memory_estimate_bytes > 0 AND budget > 0 AND j.memory_estimate_bytes > budget) THEN
            RETURN QUERY SELECT 'slow'::TEXT, NULL::TEXT;
            RETURN;
        END IF;
        UPDATE jobs SET state = 'LEASED', attempt = attempt + 1, lease_epoch = lease_epoch + 1,
                lease_expires_at = p_now + p_lease_s, status_message = '', progress = p_empty_progress,
                updated_at = p_now, change_seq = nextval('job_change_seq'),
                change_xid = pg_current_xact_id()::TEXT::BIGINT
            WHERE job_id = j.job_id RETURNING * INTO j;
        UPDATE devices SET last_seen = p_now, running_job_id = j.job_id WHERE device_id = p_device;
        RETURN QUERY SELECT 'leased'::TEXT, row_to_json(j)::TEXT;
        RETURN;
    END IF;
    IF p_now - d.last_seen >= p_last_seen_write_s THEN
        UPDATE devices SET last_seen = p_now WHERE device_id = p_device;
    END IF;
    RETURN QUERY SELECT 'none'::TEXT, NULL::TEXT;
END
$fn$
"""

HEARTBEAT_V1 = r"""
CREATE OR REPLACE FUNCTION pocketlora_heartbeat(
    p_device TEXT, p_cred_hash TEXT, p_now DOUBLE PRECISION, p_lease_s DOUBLE PRECISION,
    p_last_seen_write_s DOUBLE PRECISION, p_job TEXT, p_epoch BIGINT, p_state TEXT, p_progress TEXT,
    p_pause_reason TEXT, p_power TEXT, p_eligible BOOLEAN, p_reason TEXT, p_detail TEXT,
    p_active TEXT, p_free_storage BIGINT
) RETURNS TABLE (outcome TEXT, lease_expires_at DOUBLE PRECISION, adapter_json TEXT) LANGUAGE plpgsql AS $fn$
DECLARE
    d devices%ROWTYPE;
    j jobs%ROWTYPE;
    result TEXT := 'ok';
    expires DOUBLE PRECISION := 0;
    storage BOOLEAN;
    new_caps TEXT;
    allowed TEXT[];
BEGIN
    SELECT * INTO d FROM devices WHERE device_id = p_device;
    IF NOT FOUND THEN
        RETURN QUERY SELECT CASE WHEN p_cred_hash IS NULL THEN 'no_device' ELSE 'unauthenticated' END,
            0::DOUBLE PRECISION, NULL::TEXT;
        RETURN;
    END IF;
    IF p_cred_hash IS NOT NULL AND d.credential_hash <> p_cred_hash THEN
        RETURN QUERY SELECT 'unauthenticated'::TEXT, 0::DOUBLE PRECISION, NULL::TEXT;
        RETURN;
    END IF;

    -- The job part: lifecycle.JobLifecycle._renew_running and JobRecord.move.
    IF p_job <> '' THEN
        SELECT * INTO j FROM jobs WHERE job_id = p_job FOR UPDATE;
        IF NOT FOUND OR j.device_id <> p_device THEN
            result := 'stale';
        ELSIF j.state = 'CANCELLED' THEN
            result := 'cancel';
        ELSIF j.state NOT IN ('LEASED', 'RUNNING', 'PAUSED', 'UPLOADING') OR j.lease_epoch <> p_epoch THEN
            result := 'stale';
        ELSE
            IF p_state IS NOT NULL AND p_state <> j.state THEN
                allowed := CASE j.state WHEN 'UPLOADING' THEN ARRAY['UPLOADING']
                                        ELSE ARRAY['RUNNING', 'PAUSED', 'UPLOADING'] END;
                IF NOT p_state = ANY(allowed) THEN
                    RAISE EXCEPTION USING ERRCODE = 'PLF01',
                        MESSAGE = format('job %s: cannot go from %s to %s', j.job_id, j.state, p_state);
                END IF;
                IF p_state = 'PAUSED' THEN
                    j.paused_since := p_now;
                    j.status_message := format('paused by the device''s gate (%s)',
                                               COALESCE(NULLIF(p_pause_reason, ''), 'reason not given'));
                ELSIF j.state = 'PAUSED' THEN
                    IF j.paused_since > 0 THEN
                        j.paused_s := j.paused_s + p_now - j.paused_since;
                        j.paused_since := 0;
                    END IF;
                    j.status_message := '';
                END IF;
                j.state := p_state;
            END IF;
            UPDATE jobs SET state = j.state, paused_since = j.paused_since, paused_s = j.paused_s,
                    status_message = j.status_message, progress = COALESCE(p_progress, progress),
                    lease_expires_at = p_now + p_lease_s, updated_at = p_now,
                    change_seq = nextval('job_change_seq'), change_xid = pg_current_xact_id()::TEXT::BIGINT
                WHERE job_id = j.job_id;
            expires := p_now + p_lease_s;
        END IF;
    END IF;

    -- The device part: lifecycle.record_device_report (only changed fields are written).
    storage := p_free_storage > 0
        AND p_free_storage IS DISTINCT FROM (d.capabilities::JSONB->>'free_storage_bytes')::BIGINT;
    IF storage OR d.power <> p_power OR d.eligible <> p_eligible::INT OR d.eligibility_reason <> p_reason
            OR d.eligibility_detail <> p_detail OR d.active_adapter_id <> p_active
            OR d.running_job_id <> p_job OR p_now - d.last_seen >= p_last_seen_write_s THEN
        IF storage THEN
            SELECT jsonb_set(capabilities::JSONB, '{free_storage_bytes}', to_jsonb(p_free_storage))::TEXT
                INTO new_caps FROM devices WHERE device_id = p_device FOR UPDATE;
        END IF;
        UPDATE devices SET
                power = CASE WHEN d.power <> p_power THEN p_power ELSE power END,
                eligible = CASE WHEN d.eligible <> p_eligible::INT THEN p_eligible::INT ELSE eligible END,
                eligibility_reason = CASE WHEN d.eligibility_reason <> p_reason THEN p_reason ELSE eligibility_reason END,
                eligibility_detail = CASE WHEN d.eligibility_detail <> p_detail THEN p_detail ELSE eligibility_detail END,
                active_adapter_id = CASE WHEN d.active_adapter_id <> p_active THEN p_active ELSE active_adapter_id END,
                running_job_id = CASE WHEN d.running_job_id <> p_job THEN p_job ELSE running_job_id END,
                capabilities = COALESCE(new_caps, capabilities),
                last_seen = p_now
            WHERE device_id = p_device;
    END IF;

    RETURN QUERY SELECT result, expires,
        (SELECT row_to_json(a)::TEXT FROM adapters a WHERE a.adapter_id = d.desired_adapter_id);
END
$fn$
"""


# Migration 5: the polls also write what dashboards read (state/history.py keeps the same rules
# for every other path): a job_events row when a job's state changes (at most 1000 per job), a
# job_progress row when the step enters a new one of 500 buckets of the attempt's planned steps
# (history.POINTS), and the adapters a device reports refusing. Progress is read from the JSON
# text Python writes (json.dumps of Progress: `"step": 3, "total_steps": 10, ... "loss": 1.5`),
# by pattern, since a NaN loss is not valid JSON.
JOB_EVENT_V1 = r"""
CREATE OR REPLACE FUNCTION pocketlora_job_event(
    p_job TEXT, p_at DOUBLE PRECISION, p_state TEXT, p_attempt INT, p_message TEXT
) RETURNS VOID LANGUAGE plpgsql AS $fn$
BEGIN
    IF (SELECT COUNT(*) FROM job_events WHERE job_id = p_job) < 1000 THEN
        INSERT INTO job_events (job_id, at, state, attempt, message, error_class)
            VALUES (p_job, p_at, p_state, p_attempt, p_message, '');
    END IF;
END
$fn$
"""

PROGRESS_BUCKET_V1 = r"""
CREATE OR REPLACE FUNCTION pocketlora_progress_bucket(p_progress TEXT) RETURNS BIGINT
LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    step BIGINT := COALESCE(substring(p_progress from '"step": ([0-9]+)')::NUMERIC, 0);
    total BIGINT := COALESCE(substring(p_progress from '"total_steps": ([0-9]+)')::NUMERIC, 0);
BEGIN
    IF step <= 0 THEN RETURN 0; END IF;
    IF total <= 0 THEN RETURN 1 + LEAST(step, 500); END IF;
    RETURN 1 + LEAST(step * 500 / total, 500);
END
$fn$
"""

PROGRESS_POINT_V1 = r"""
CREATE OR REPLACE FUNCTION pocketlora_progress_point(
    p_job TEXT, p_attempt INT, p_old TEXT, p_new TEXT, p_at DOUBLE PRECISION
) RETURNS VOID LANGUAGE plpgsql AS $fn$
DECLARE
    loss TEXT := substring(p_new from '"loss": ([^,}]+)');
BEGIN
    IF pocketlora_progress_bucket(p_new) <= pocketlora_progress_bucket(p_old) THEN
        RETURN;
    END IF;
    INSERT INTO job_progress (job_id, attempt, step, total_steps, loss, tokens_seen, at) VALUES (
        p_job, p_attempt,
        COALESCE(substring(p_new from '"step": ([0-9]+)')::NUMERIC, 0),
        COALESCE(substring(p_new from '"total_steps": ([0-9]+)')::NUMERIC, 0),
        CASE WHEN loss IS NULL OR loss IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE loss::DOUBLE PRECISION END,
        LEAST(COALESCE(substring(p_new from '"tokens_seen": ([0-9]+)')::NUMERIC, 0), 4611686018427387904),
        p_at
    ) ON CONFLICT DO NOTHING;
END
$fn$
"""


def _edit(sql: str, *changes: tuple[str, str]) -> str:
    """A function's text with each (old, new) replaced; each old text must occur exactly once."""
    for old, new in changes:
        if sql.count(old) != 1:
            raise AssertionError(f"migration text not found once: {old[:60]!r}")
        sql = sql.replace(old, new)
    return sql


LEASE_V2 = _edit(
    LEASE_V1,
    (
        "        RETURN QUERY SELECT 'leased'::TEXT, row_to_json(j)::TEXT;",
        "        PERFORM pocketlora_job_event(j.job_id, p_now, 'LEASED', j.attempt, '');\n"
        "        RETURN QUERY SELECT 'leased'::TEXT, row_to_json(j)::TEXT;",
    ),
)

# The heartbeat gains the device's adapter refusals (p_refusals, JSON text like the column's).
DROP_HEARTBEAT_V1 = (
    "DROP FUNCTION pocketlora_heartbeat(TEXT, TEXT, DOUBLE PRECISION, DOUBLE PRECISION, DOUBLE PRECISION,"
    " TEXT, BIGINT, TEXT, TEXT, TEXT, TEXT, BOOLEAN, TEXT, TEXT, TEXT, BIGINT)"
)
HEARTBEAT_V2 = _edit(
    HEARTBEAT_V1,
    ("p_active TEXT, p_free_storage BIGINT\n)", "p_active TEXT, p_free_storage BIGINT, p_refusals TEXT\n)"),
    ("    allowed TEXT[];\n", "    allowed TEXT[];\n    old_state TEXT;\n    old_progress TEXT;\n"),
    (
        "        ELSE\n            IF p_state IS NOT NULL AND p_state <> j.state THEN",
        "        ELSE\n            old_state := j.state;\n            old_progress := j.progress;\n"
        "            IF p_state IS NOT NULL AND p_state <> j.state THEN",
    ),
    (
        "                WHERE job_id = j.job_id;\n            expires := p_now + p_lease_s;",
        "                WHERE job_id = j.job_id;\n            expires := p_now + p_lease_s;\n"
        "            IF j.state <> old_state THEN\n"
        "                PERFORM pocketlora_job_event(j.job_id, p_now, j.state, j.attempt, j.status_message);\n"
        "            END IF;\n"
        "            IF p_progress IS NOT NULL THEN\n"
        "                PERFORM pocketlora_progress_point(j.job_id, j.attempt, old_progress, p_progress, p_now);\n"
        "            END IF;",
    ),
    (
        "            OR d.running_job_id <> p_job OR",
        "            OR d.running_job_id <> p_job OR d.adapter_refusals <> p_refusals OR",
    ),
    (
        "                capabilities = COALESCE(new_caps, capabilities),",
        "                capabilities = COALESCE(new_caps, capabilities),\n"
        "                adapter_refusals = CASE WHEN d.adapter_refusals <> p_refusals THEN p_refusals"
        " ELSE adapter_refusals END,",
    ),
)

# Migration 6: leases skip the jobs of paused campaigns, and the heartbeat also returns the
# device's labels and capabilities (what the fleet's gate policies select on). The return type
# changes, so V2 is dropped first (CREATE OR REPLACE cannot change it).
LEASE_V3 = _edit(
    LEASE_V2,
    (
        "WHERE device_id = p_device AND state = 'QUEUED' AND not_before <= p_now\n",
        "WHERE device_id = p_device AND state = 'QUEUED' AND not_before <= p_now\n"
        "            AND (campaign_id = '' OR campaign_id NOT IN\n"
        "                 (SELECT campaign_id FROM campaigns WHERE state = 'PAUSED'))\n",
    ),
)

DROP_HEARTBEAT_V2 = DROP_HEARTBEAT_V1.removesuffix(")") + ", TEXT)"

HEARTBEAT_V3 = _edit(
    HEARTBEAT_V2,
    (
        "RETURNS TABLE (outcome TEXT, lease_expires_at DOUBLE PRECISION, adapter_json TEXT)",
        "RETURNS TABLE (outcome TEXT, lease_expires_at DOUBLE PRECISION, adapter_json TEXT, device_labels TEXT,\n"
        "    device_caps TEXT)",
    ),
    (
        "THEN 'no_device' ELSE 'unauthenticated' END,\n            0::DOUBLE PRECISION, NULL::TEXT;",
        "THEN 'no_device' ELSE 'unauthenticated' END,\n            0::DOUBLE PRECISION, NULL::TEXT, NULL::TEXT, NULL::TEXT;",
    ),
    (
        "RETURN QUERY SELECT 'unauthenticated'::TEXT, 0::DOUBLE PRECISION, NULL::TEXT;",
        "RETURN QUERY SELECT 'unauthenticated'::TEXT, 0::DOUBLE PRECISION, NULL::TEXT, NULL::TEXT, NULL::TEXT;",
    ),
    (
        "(SELECT row_to_json(a)::TEXT FROM adapters a WHERE a.adapter_id = d.desired_adapter_id);",
        "(SELECT row_to_json(a)::TEXT FROM adapters a WHERE a.adapter_id = d.desired_adapter_id),\n"
        "        d.labels, COALESCE(new_caps, d.capabilities);",
    ),
)
