-- Running a claimed event's SQL handler in the database, as its principal, with its
-- completion in the same transaction (one event, or several in savepoints). The sql lanes'
-- set-based path is in 035_sql_lane.sql.

-- Runs a claimed event's SQL handler as its principal and completes the event, all in the
-- caller's transaction: the handler's writes and the completion commit or roll back together.
-- Returns the handler's result as jsonb for a synchronous event (NULL otherwise).
CREATE FUNCTION picloud.picloud_run_sql_handler(p_app_id uuid, p_event_id uuid, p_worker text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r picloud.outbox;
    v_function regprocedure;
    v_kind text;
    v_principal name;
    v_problem text;
    v_token bigint;
    v_event jsonb;
    v_call text;
    v_text text;
    v_result jsonb;
BEGIN
    r := picloud._lock_claimed(p_app_id, p_event_id, p_worker);
    SELECT s.sql_function, s.kind INTO v_function, v_kind
    FROM picloud.scripts s WHERE s.app_id = r.app_id AND s.script_id = r.script_id;
    SELECT h.principal, h.problem INTO v_principal, v_problem
    FROM picloud._handler_principal(r.app_id, r.trigger_id, r.script_id) h;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'cannot run handler of event %: %', p_event_id, v_problem USING ERRCODE = 'PC005';
    END IF;
    IF v_kind <> 'sql' THEN
        PERFORM picloud._invalid(format('event %s has a %s handler, not a sql one', p_event_id, v_kind));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc WHERE oid = v_function) THEN
        RAISE EXCEPTION 'handler function of event % no longer exists', p_event_id USING ERRCODE = '42883';
    END IF;
    v_event := picloud._event_json(r);
    v_call := format('SELECT %s($1)::pg_catalog.text', v_function::oid::regproc);
    -- From here until _unbecome this code runs with the principal's rights only.
    v_token := picloud._become_event(r.app_id, r.event_id);
    EXECUTE v_call INTO v_text USING v_event;
    PERFORM picloud._unbecome(v_token);
    IF v_text IS NOT NULL AND v_text <> '' AND r.reply_to IS NOT NULL THEN
        BEGIN
            v_result := v_text::jsonb;
        EXCEPTION WHEN invalid_text_representation THEN
            v_result := to_jsonb(v_text);
        END;
    END IF;
    DELETE FROM picloud.outbox o WHERE o.app_id = p_app_id AND o.event_id = p_event_id;
    PERFORM picloud._count_outcome(r.app_id, r.source, 1, 0, 0);
    IF r.reply_to IS NOT NULL THEN
        PERFORM picloud._reply(r, true, v_result, NULL);
    END IF;
    IF r.ordering_key IS NOT NULL THEN
        -- The next event of the key can run now: no enqueue announces it.
        PERFORM picloud._wake_at_commit();
    END IF;
    RETURN v_result;
END
$$;

-- Runs several claimed events' SQL handlers in the caller's transaction, each in a savepoint of
-- its own: a handler's error rolls back only its own writes, and the failure is settled
-- (retry or dead letter) in the same transaction. Every handler's effect and its event's
-- completion or failure commit together, once, which keeps the exactly-once guarantee while
-- paying for one commit per batch instead of one per event. Each handler runs under its own
-- timeout (api/budget.rs). A statement timeout, the batch's or a handler's, is not caught here:
-- it aborts the whole batch, and the supervisor then runs the events one by one.
CREATE FUNCTION picloud.picloud_run_sql_handlers(p_worker text, p_app_ids uuid[], p_event_ids uuid[])
RETURNS TABLE (event_id uuid, outcome text, error text)
LANGUAGE plpgsql AS $$
DECLARE
    v_message text;
    v_detail text;
    v_state text;
    r picloud.outbox;
BEGIN
    IF p_worker IS NULL OR p_app_ids IS NULL OR p_event_ids IS NULL THEN
        PERFORM picloud._null_argument('{worker,app_ids,event_ids}',
            ARRAY[p_worker IS NULL, p_app_ids IS NULL, p_event_ids IS NULL]);
    END IF;
    IF cardinality(p_app_ids) <> cardinality(p_event_ids) THEN
        PERFORM picloud._invalid('app_ids and event_ids must have the same length');
    END IF;
    FOR i IN 1 .. cardinality(p_event_ids) LOOP
        event_id := p_event_ids[i];
        error := NULL;
        BEGIN
            PERFORM picloud.picloud_run_sql_handler(p_app_ids[i], p_event_ids[i], p_worker);
            outcome := 'completed';
        EXCEPTION WHEN OTHERS THEN
            -- The handler's own timeout no longer applies; the rest of the batch has the
            -- statement's.
            PERFORM picloud._after_handler();
            GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL,
                                    v_state = RETURNED_SQLSTATE;
            error := v_message
                || CASE WHEN v_detail <> '' THEN E'\nDETAIL: ' || v_detail ELSE '' END
                || format(' (SQLSTATE %s)', v_state);
            IF v_state = 'PC002' THEN
                outcome := 'lease_lost';
            ELSE
                r := picloud._lock_claimed(p_app_ids[i], p_event_ids[i], p_worker);
                SELECT f.outcome INTO outcome
                FROM picloud._settle_failure(r, error, picloud.picloud_retry_delay(r.attempt_count)) f;
            END IF;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;
