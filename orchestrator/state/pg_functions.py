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


def _patched(text: str, *edits: tuple[str, str]) -> str:
    """A later version of a function: `text` with each `old` (found exactly once) replaced."""
    for old, new in edits:
        if text.count(old) != 1:
            raise AssertionError(f"pg function patch: {old[:60]!r} found {text.count(old)} times")
        text = text.replace(old, new)
    return text


LEASE_V2 = _patched(
    LEASE_V1,
    (
        "WHERE device_id = p_device AND state = 'QUEUED' AND not_before <= p_now\n",
        "WHERE device_id = p_device AND state = 'QUEUED' AND not_before <= p_now\n"
        "            AND (campaign_id = '' OR campaign_id NOT IN\n"
        "                 (SELECT campaign_id FROM campaigns WHERE state = 'PAUSED'))\n",
    ),
)

# The argument list changes, so migration 5 drops V1 first (CREATE OR REPLACE would add an overload).
DROP_HEARTBEAT_V1 = (
    "DROP FUNCTION pocketlora_heartbeat(TEXT, TEXT, DOUBLE PRECISION, DOUBLE PRECISION, DOUBLE PRECISION, TEXT,"
    " BIGINT, TEXT, TEXT, TEXT, TEXT, BOOLEAN, TEXT, TEXT, TEXT, BIGINT)"
)

HEARTBEAT_V2 = _patched(
    HEARTBEAT_V1,
    ("p_active TEXT, p_free_storage BIGINT\n)", "p_active TEXT, p_free_storage BIGINT, p_refusals TEXT\n)"),
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
        "OR d.running_job_id <> p_job OR",
        "OR d.running_job_id <> p_job OR d.adapter_refusals <> p_refusals OR",
    ),
    (
        "                capabilities = COALESCE(new_caps, capabilities),\n",
        "                adapter_refusals = CASE WHEN d.adapter_refusals <> p_refusals THEN p_refusals\n"
        "                                   ELSE adapter_refusals END,\n"
        "                capabilities = COALESCE(new_caps, capabilities),\n",
    ),
    (
        "(SELECT row_to_json(a)::TEXT FROM adapters a WHERE a.adapter_id = d.desired_adapter_id);",
        "(SELECT row_to_json(a)::TEXT FROM adapters a WHERE a.adapter_id = d.desired_adapter_id),\n"
        "        d.labels, COALESCE(new_caps, d.capabilities);",
    ),
)
