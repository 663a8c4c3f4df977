-- Running a claimed event's SQL handler in the database, as its principal, with its
-- completion in the same transaction. The sql lanes' set-based path, which runs first attempts,
-- is in 035_sql_lane.sql; these two are the only ways a SQL handler runs.

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
