-- Housekeeping steps run by the background worker, one batch per call (each call is its own
-- transaction there), and on demand by picloud_gc_pass(). Rows are picked with
-- FOR UPDATE SKIP LOCKED so housekeeping never waits for, or blocks, dispatch.

-- The housekeeping steps, in the order a pass runs them (the background worker and
-- picloud_gc_pass): the one list. Lease rescue first: it is what unblocks work.
CREATE FUNCTION picloud._gc_steps() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['rescue_leases', 'dead_letters', 'abandoned_executions', 'inboxes',
                 'idempotency_keys', 'event_counts']
$$;

-- One batch of one housekeeping step; returns how many rows it handled (a batch that comes
-- back short ends the step). Each step takes at most p_batch rows, picked FOR UPDATE SKIP
-- LOCKED.
--   rescue_leases: claims whose lease expired (a crashed or cut-off supervisor) go back to the
--     queue. The attempt the lost worker made counts: after the last one the event is
--     dead-lettered, so a handler that crashes its supervisor cannot loop forever.
--   Every other step deletes rows past their keeping time:
--   dead_letters: resolved ones older than picloud.dead_letter_retention_days (0 = keep
--     forever). Unresolved dead letters are never collected: nothing is dropped before an
--     operator saw it.
--   abandoned_executions: older than picloud.abandoned_executions_retention_days (0 = keep).
--   inboxes: past their expiry.
--   idempotency_keys: older than picloud.idempotency_retention hours.
--   event_counts: minutes older than a day (picloud_stats looks back at most one day).
CREATE FUNCTION picloud._gc_step(p_kind text, p_batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    r picloud.outbox;
    v_count bigint := 0;
    v_days integer;
    v_table text;
    v_key text[];
    v_expired text;
BEGIN
    IF p_kind IS NULL OR p_batch IS NULL THEN
        PERFORM picloud._null_argument('{kind,batch}', ARRAY[p_kind IS NULL, p_batch IS NULL]);
    END IF;
    IF p_kind = 'rescue_leases' THEN
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
    END IF;
    -- The other steps: their table, its key, and which rows have expired (NULL: none, kept).
    CASE p_kind
    WHEN 'dead_letters' THEN
        v_days := current_setting('picloud.dead_letter_retention_days')::integer;
        v_table := 'dead_letters';
        v_key := '{app_id,dead_letter_id}';
        v_expired := CASE WHEN v_days <> 0 THEN
            format('resolved_at IS NOT NULL AND created_at < now() - make_interval(days => %s)', v_days) END;
    WHEN 'abandoned_executions' THEN
        v_days := current_setting('picloud.abandoned_executions_retention_days')::integer;
        v_table := 'abandoned_executions';
        v_key := '{app_id,abandoned_id}';
        v_expired := CASE WHEN v_days <> 0 THEN
            format('created_at < now() - make_interval(days => %s)', v_days) END;
    WHEN 'inboxes' THEN
        v_table := 'inboxes';
        v_key := '{app_id,channel}';
        v_expired := 'expires_at < now()';
    WHEN 'idempotency_keys' THEN
        v_table := 'idempotency_keys';
        v_key := '{app_id,idempotency_key}';
        v_expired := format('created_at < now() - make_interval(hours => %s)',
                            current_setting('picloud.idempotency_retention')::integer);
    WHEN 'event_counts' THEN
        v_table := 'event_counts';
        v_key := '{ctid}';
        v_expired := 'minute < now() - interval ''1 day''';
    ELSE
        PERFORM picloud._invalid(format('unknown housekeeping step %L', left(p_kind, 200)),
            'The steps are listed by picloud._gc_steps().');
    END CASE;
    IF v_expired IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format(
        'WITH doomed AS (SELECT %2$s FROM picloud.%1$I WHERE %3$s LIMIT $1 FOR UPDATE SKIP LOCKED)
         DELETE FROM picloud.%1$I t USING doomed WHERE (%4$s) = (%5$s)',
        v_table,
        array_to_string(v_key, ', '),
        v_expired,
        (SELECT string_agg('t.' || k, ', ') FROM unnest(v_key) k),
        (SELECT string_agg('doomed.' || k, ', ') FROM unnest(v_key) k))
    USING p_batch;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- One full housekeeping pass on demand, in the caller's transaction. Returns what it did.
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
    FOREACH v_step IN ARRAY picloud._gc_steps() LOOP
        v_total := 0;
        LOOP
            v_done := picloud._gc_step(v_step, v_batch);
            v_total := v_total + v_done;
            EXIT WHEN v_done < v_batch;
        END LOOP;
        kind := v_step;
        removed := v_total;
        RETURN NEXT;
    END LOOP;
END
$$;
