-- Housekeeping steps run by the background worker, one batch per call (each call is its own
-- transaction there), and on demand by picloud_gc_pass(). Rows are picked with
-- FOR UPDATE SKIP LOCKED so housekeeping never waits for, or blocks, dispatch.

-- Returns claims whose lease expired (a crashed or cut-off supervisor) to the queue. The
-- attempt the lost worker made counts: after the last one the event is dead-lettered, so a
-- handler that crashes its supervisor cannot loop forever.
CREATE FUNCTION picloud._gc_rescue_leases(p_batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    r picloud.outbox;
    v_count bigint := 0;
BEGIN
    FOR r IN
        SELECT * FROM picloud.outbox o
        WHERE o.claimed_by IS NOT NULL AND o.lease_expires_at < now()
        ORDER BY o.lease_expires_at
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM picloud._settle_failure(r, format('lease of worker "%s" expired', r.claimed_by), interval '0');
        v_count := v_count + 1;
    END LOOP;
    IF v_count > 0 THEN
        PERFORM picloud._wake_at_commit();
    END IF;
    RETURN v_count;
END
$$;

-- Resolved dead letters past picloud.dead_letter_retention_days (0 = keep forever).
-- Unresolved dead letters are never collected: nothing is dropped before an operator saw it.
CREATE FUNCTION picloud._gc_dead_letters(p_batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_days integer := current_setting('picloud.dead_letter_retention_days')::integer;
    v_count bigint;
BEGIN
    IF v_days = 0 THEN
        RETURN 0;
    END IF;
    WITH doomed AS (
        SELECT d.app_id, d.dead_letter_id FROM picloud.dead_letters d
        WHERE d.resolved_at IS NOT NULL AND d.created_at < now() - make_interval(days => v_days)
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM picloud.dead_letters d USING doomed
    WHERE d.app_id = doomed.app_id AND d.dead_letter_id = doomed.dead_letter_id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- Abandoned executions past picloud.abandoned_executions_retention_days (0 = keep forever).
CREATE FUNCTION picloud._gc_abandoned_executions(p_batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_days integer := current_setting('picloud.abandoned_executions_retention_days')::integer;
    v_count bigint;
BEGIN
    IF v_days = 0 THEN
        RETURN 0;
    END IF;
    WITH doomed AS (
        SELECT a.app_id, a.abandoned_id FROM picloud.abandoned_executions a
        WHERE a.created_at < now() - make_interval(days => v_days)
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM picloud.abandoned_executions a USING doomed
    WHERE a.app_id = doomed.app_id AND a.abandoned_id = doomed.abandoned_id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- Inboxes past their expiry.
CREATE FUNCTION picloud._gc_inboxes(p_batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
BEGIN
    WITH doomed AS (
        SELECT i.app_id, i.channel FROM picloud.inboxes i
        WHERE i.expires_at < now()
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM picloud.inboxes i USING doomed
    WHERE i.app_id = doomed.app_id AND i.channel = doomed.channel;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- Idempotency keys past picloud.idempotency_retention hours.
CREATE FUNCTION picloud._gc_idempotency_keys(p_batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_hours integer := current_setting('picloud.idempotency_retention')::integer;
    v_count bigint;
BEGIN
    WITH doomed AS (
        SELECT k.app_id, k.idempotency_key FROM picloud.idempotency_keys k
        WHERE k.created_at < now() - make_interval(hours => v_hours)
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM picloud.idempotency_keys k USING doomed
    WHERE k.app_id = doomed.app_id AND k.idempotency_key = doomed.idempotency_key;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- One full housekeeping pass on demand, in the caller's transaction. Returns what it did.
-- Outcome counts older than a day (picloud_stats looks back at most one day).
CREATE FUNCTION picloud._gc_event_counts(p_batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
BEGIN
    WITH old AS (
        SELECT c.ctid FROM picloud.event_counts c
        WHERE c.minute < now() - interval '1 day'
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM picloud.event_counts c USING old WHERE c.ctid = old.ctid;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

CREATE FUNCTION picloud.picloud_gc_pass()
RETURNS TABLE (kind text, removed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_batch integer := current_setting('picloud.gc_batch_size')::integer;
    v_step text;
    v_done bigint;
    v_total bigint;
BEGIN
    PERFORM picloud._require_owner('picloud_gc_pass');
    FOREACH v_step IN ARRAY ARRAY['rescue_leases', 'dead_letters', 'abandoned_executions', 'inboxes', 'idempotency_keys', 'event_counts'] LOOP
        v_total := 0;
        LOOP
            EXECUTE format('SELECT picloud._gc_%s($1)', v_step) INTO v_done USING v_batch;
            v_total := v_total + v_done;
            EXIT WHEN v_done < v_batch;
        END LOOP;
        kind := v_step;
        removed := v_total;
        RETURN NEXT;
    END LOOP;
END
$$;
