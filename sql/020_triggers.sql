-- Handlers (scripts) and triggers: registration and the matching hot paths.

-- Registers a handler. kind 'sql': target names a function taking one jsonb argument,
-- which the caller must be allowed to execute; 'http': an http:// or https:// URL; 'command':
-- a command name the supervisor's configuration defines. Returns the script id.
CREATE FUNCTION picloud.picloud_create_script(
    p_app_id uuid, p_name text, p_kind text, p_target text, p_timeout_ms integer DEFAULT 30000)
RETURNS uuid
LANGUAGE plpgsql AS $$
-- The one picloud function without a fixed search_path: a sql handler's function is named as
-- the caller would name it, so it is looked up in the caller's search_path. Every other name
-- here is qualified (sql/090_privileges.sql leaves this function out of the pinning, and the
-- search_path test holds it to qualified built-ins).
DECLARE
    v_script_id uuid := pg_catalog.gen_random_uuid();
    v_function regprocedure;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_name IS NULL OR p_kind IS NULL OR p_target IS NULL OR p_timeout_ms IS NULL THEN
        PERFORM picloud._null_argument('{name,kind,target,timeout_ms}',
            ARRAY[p_name IS NULL, p_kind IS NULL, p_target IS NULL, p_timeout_ms IS NULL]);
    END IF;
    PERFORM picloud._require_app(p_app_id);
    IF pg_catalog.length(p_name) NOT BETWEEN 1 AND 200 THEN
        PERFORM picloud._invalid(pg_catalog.format('handler name must be 1 to 200 characters long, got %s', pg_catalog.length(p_name)));
    END IF;
    IF p_timeout_ms NOT BETWEEN 1 AND 3600000 THEN
        PERFORM picloud._invalid(pg_catalog.format('timeout_ms must be between 1 and 3600000, got %s', p_timeout_ms));
    END IF;
    IF pg_catalog.length(p_target) NOT BETWEEN 1 AND 2048 THEN
        PERFORM picloud._invalid(pg_catalog.format('handler target must be 1 to 2048 characters long, got %s', pg_catalog.length(p_target)));
    END IF;
    CASE p_kind
    WHEN 'sql' THEN
        v_function := pg_catalog.to_regprocedure(p_target OPERATOR(pg_catalog.||) '(jsonb)');
        IF v_function IS NULL THEN
            RAISE EXCEPTION 'handler function %(jsonb) does not exist', p_target
                USING ERRCODE = '42883',
                      HINT = 'A SQL handler is a function taking one jsonb argument (the event).';
        END IF;
        IF NOT pg_catalog.has_function_privilege(current_user, v_function, 'EXECUTE') THEN
            RAISE EXCEPTION 'permission denied: role "%" may not execute %', current_user, v_function
                USING ERRCODE = '42501';
        END IF;
    WHEN 'http' THEN
        IF p_target !~ '^https?://[^/\s]+' THEN
            PERFORM picloud._invalid(pg_catalog.format('http handler target %L is not an http:// or https:// URL', pg_catalog.left(p_target, 200)));
        END IF;
    WHEN 'command' THEN
        IF p_target !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
            PERFORM picloud._invalid(
                pg_catalog.format('command name %L may only contain letters, digits, ''_'', ''.'' and ''-'' (at most 64)', pg_catalog.left(p_target, 200)),
                'A command handler names a command defined in the supervisor''s configuration.');
        END IF;
    ELSE
        PERFORM picloud._invalid(pg_catalog.format('unknown handler kind %L', pg_catalog.left(p_kind, 200)),
            'Use ''sql'', ''http'' or ''command''.');
    END CASE;
    INSERT INTO picloud.scripts (app_id, script_id, name, kind, target, sql_function, timeout_ms)
    VALUES (p_app_id, v_script_id, p_name, p_kind, p_target, v_function, p_timeout_ms);
    RETURN v_script_id;
END
$$;

CREATE FUNCTION picloud.picloud_list_scripts(p_app_id uuid)
RETURNS SETOF picloud.scripts
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    RETURN QUERY SELECT * FROM picloud.scripts s WHERE s.app_id = p_app_id ORDER BY s.created_at, s.script_id;
END
$$;

-- Drops a handler. Refused (23503) while a trigger still uses it; pending events for it
-- then fail with a clear error and end in the dead letters rather than vanish.
CREATE FUNCTION picloud.picloud_drop_script(p_app_id uuid, p_script_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_script_id IS NULL THEN PERFORM picloud._null_argument('{script_id}', '{t}'); END IF;
    DELETE FROM picloud.scripts WHERE app_id = p_app_id AND script_id = p_script_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'handler % does not exist in app %', p_script_id, p_app_id USING ERRCODE = 'P0002';
    END IF;
END
$$;

CREATE FUNCTION picloud._require_script(p_app_id uuid, p_script_id uuid) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM picloud.scripts WHERE app_id = p_app_id AND script_id = p_script_id) THEN
        RAISE EXCEPTION 'handler % does not exist in app %', p_script_id, p_app_id USING ERRCODE = 'P0002';
    END IF;
END
$$;

-- Triggers ---------------------------------------------------------------------------------

-- Registers a KV trigger: events on collections matching the pattern ('*', 'prefix:*' or an
-- exact name) with one of the ops run the handler, as the calling role.
CREATE FUNCTION picloud.picloud_create_kv_trigger(
    p_app_id uuid,
    p_collection_pattern text,
    p_script_id uuid,
    p_ops text[] DEFAULT ARRAY['insert', 'update', 'delete', 'set'],
    p_enabled boolean DEFAULT true,
    p_ordered boolean DEFAULT false,
    p_on_dead_letter text DEFAULT 'continue')
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_trigger_id uuid := gen_random_uuid();
    v_match_key text;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_collection_pattern IS NULL OR p_script_id IS NULL OR p_ops IS NULL OR p_enabled IS NULL
       OR p_ordered IS NULL OR p_on_dead_letter IS NULL THEN
        PERFORM picloud._null_argument('{collection_pattern,script_id,ops,enabled,ordered,on_dead_letter}',
            ARRAY[p_collection_pattern IS NULL, p_script_id IS NULL, p_ops IS NULL, p_enabled IS NULL,
                  p_ordered IS NULL, p_on_dead_letter IS NULL]);
    END IF;
    IF p_on_dead_letter NOT IN ('continue', 'block') THEN
        PERFORM picloud._check_ordering(NULL, p_on_dead_letter);
    END IF;
    v_match_key := picloud._pattern_match_key(p_collection_pattern);
    IF cardinality(p_ops) = 0 OR array_position(p_ops, NULL) IS NOT NULL
       OR NOT p_ops <@ ARRAY['insert', 'update', 'delete', 'set'] THEN
        PERFORM picloud._invalid(format('ops %s must be a non-empty list of insert, update, delete, set', p_ops));
    END IF;
    PERFORM picloud._require_script(p_app_id, p_script_id);
    INSERT INTO picloud.triggers (app_id, trigger_id, kind, script_id, enabled)
    VALUES (p_app_id, v_trigger_id, 'kv', p_script_id, p_enabled);
    INSERT INTO picloud.kv_trigger_details (app_id, trigger_id, collection_pattern, match_key, ops,
                                            ordered, on_dead_letter)
    VALUES (p_app_id, v_trigger_id, p_collection_pattern, v_match_key,
            ARRAY(SELECT DISTINCT unnest(p_ops) ORDER BY 1), p_ordered, p_on_dead_letter);
    RETURN v_trigger_id;
END
$$;

-- Registers a dead-letter trigger: when an event of this app is dead-lettered (optionally
-- only from one source and/or one handler), the handler runs with the dead letter.
CREATE FUNCTION picloud.picloud_create_dead_letter_trigger(
    p_app_id uuid,
    p_script_id uuid,
    p_source_filter text DEFAULT NULL,
    p_script_filter uuid DEFAULT NULL,
    p_enabled boolean DEFAULT true)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_trigger_id uuid := gen_random_uuid();
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_script_id IS NULL OR p_enabled IS NULL THEN
        PERFORM picloud._null_argument('{script_id,enabled}', ARRAY[p_script_id IS NULL, p_enabled IS NULL]);
    END IF;
    IF p_source_filter IS NOT NULL AND p_source_filter <> ALL (picloud._event_sources()) THEN
        PERFORM picloud._invalid(format('unknown source %L', left(p_source_filter, 200)),
            format('Sources are %s.', array_to_string(picloud._event_sources(), ', ')));
    END IF;
    PERFORM picloud._require_script(p_app_id, p_script_id);
    INSERT INTO picloud.triggers (app_id, trigger_id, kind, script_id, enabled)
    VALUES (p_app_id, v_trigger_id, 'dead_letter', p_script_id, p_enabled);
    INSERT INTO picloud.dead_letter_trigger_details (app_id, trigger_id, source_filter, script_filter)
    VALUES (p_app_id, v_trigger_id, p_source_filter, p_script_filter);
    RETURN v_trigger_id;
END
$$;

CREATE TYPE picloud.trigger_info AS (
    app_id uuid,
    trigger_id uuid,
    kind text,
    script_id uuid,
    enabled boolean,
    registered_by_principal name,
    collection_pattern text,
    ops text[],
    source_filter text,
    script_filter uuid,
    created_at timestamptz,
    updated_at timestamptz
);

CREATE FUNCTION picloud._trigger_infos(p_app_id uuid) RETURNS SETOF picloud.trigger_info
LANGUAGE sql STABLE AS $$
    SELECT t.app_id, t.trigger_id, t.kind, t.script_id, t.enabled, t.registered_by_principal,
           k.collection_pattern, k.ops, d.source_filter, d.script_filter, t.created_at, t.updated_at
    FROM picloud.triggers t
    LEFT JOIN picloud.kv_trigger_details k ON k.app_id = t.app_id AND k.trigger_id = t.trigger_id
    LEFT JOIN picloud.dead_letter_trigger_details d ON d.app_id = t.app_id AND d.trigger_id = t.trigger_id
    WHERE t.app_id = p_app_id
$$;

CREATE FUNCTION picloud.picloud_get_trigger(p_app_id uuid, p_trigger_id uuid)
RETURNS picloud.trigger_info
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_info picloud.trigger_info;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_trigger_id IS NULL THEN PERFORM picloud._null_argument('{trigger_id}', '{t}'); END IF;
    SELECT * INTO v_info FROM picloud._trigger_infos(p_app_id) i WHERE i.trigger_id = p_trigger_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'trigger % does not exist in app %', p_trigger_id, p_app_id USING ERRCODE = 'P0002';
    END IF;
    RETURN v_info;
END
$$;

CREATE FUNCTION picloud.picloud_list_triggers(p_app_id uuid)
RETURNS SETOF picloud.trigger_info
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    RETURN QUERY SELECT * FROM picloud._trigger_infos(p_app_id) i ORDER BY i.created_at, i.trigger_id;
END
$$;

CREATE FUNCTION picloud.picloud_set_trigger_enabled(p_app_id uuid, p_trigger_id uuid, p_enabled boolean)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_was_enabled boolean;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_trigger_id IS NULL OR p_enabled IS NULL THEN
        PERFORM picloud._null_argument('{trigger_id,enabled}', ARRAY[p_trigger_id IS NULL, p_enabled IS NULL]);
    END IF;
    SELECT t.enabled INTO v_was_enabled FROM picloud.triggers t
    WHERE t.app_id = p_app_id AND t.trigger_id = p_trigger_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'trigger % does not exist in app %', p_trigger_id, p_app_id USING ERRCODE = 'P0002';
    END IF;
    UPDATE picloud.triggers SET enabled = p_enabled, updated_at = now()
    WHERE app_id = p_app_id AND trigger_id = p_trigger_id;
    IF p_enabled AND NOT v_was_enabled THEN
        -- A cron trigger starts again from now: ticks due while it was disabled are not caught up.
        UPDATE picloud.cron_trigger_details d
        SET next_fire_at = picloud._cron_arm(d.schedule, d.timezone, now())
        WHERE d.app_id = p_app_id AND d.trigger_id = p_trigger_id;
        IF FOUND THEN
            PERFORM picloud._wake_housekeeper_at_commit();
        END IF;
    END IF;
END
$$;

CREATE FUNCTION picloud.picloud_enable_trigger(p_app_id uuid, p_trigger_id uuid) RETURNS void
LANGUAGE sql AS $$ SELECT picloud.picloud_set_trigger_enabled(p_app_id, p_trigger_id, true) $$;

CREATE FUNCTION picloud.picloud_disable_trigger(p_app_id uuid, p_trigger_id uuid) RETURNS void
LANGUAGE sql AS $$ SELECT picloud.picloud_set_trigger_enabled(p_app_id, p_trigger_id, false) $$;

-- Sets the priority of the events a trigger enqueues from now on (lower runs first within the
-- app; default 0). Events already enqueued keep theirs; a producer's p_priority overrides it.
CREATE FUNCTION picloud.picloud_set_trigger_priority(p_app_id uuid, p_trigger_id uuid, p_priority smallint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_trigger_id IS NULL OR p_priority IS NULL THEN
        PERFORM picloud._null_argument('{trigger_id,priority}', ARRAY[p_trigger_id IS NULL, p_priority IS NULL]);
    END IF;
    UPDATE picloud.triggers SET priority = p_priority, updated_at = now()
    WHERE app_id = p_app_id AND trigger_id = p_trigger_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'trigger % does not exist in app %', p_trigger_id, p_app_id USING ERRCODE = 'P0002';
    END IF;
END
$$;

-- Limits how many of a handler's events run at once, across every supervisor (NULL: no
-- limit). Claims pass over the handler's events while it is at its limit; events already
-- running finish. Takes effect at the next claim.
CREATE FUNCTION picloud.picloud_set_handler_max_concurrency(
    p_app_id uuid, p_script_id uuid, p_max_concurrency integer)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_script_id IS NULL THEN PERFORM picloud._null_argument('{script_id}', '{t}'); END IF;
    IF p_max_concurrency NOT BETWEEN 1 AND 100000 THEN
        PERFORM picloud._invalid(format('max_concurrency must be between 1 and 100000 (or NULL for no limit), got %s',
            p_max_concurrency));
    END IF;
    PERFORM picloud._require_script(p_app_id, p_script_id);
    IF p_max_concurrency IS NULL THEN
        DELETE FROM picloud.handler_limits WHERE app_id = p_app_id AND script_id = p_script_id;
    ELSE
        INSERT INTO picloud.handler_limits AS l (app_id, script_id, max_concurrency)
        VALUES (p_app_id, p_script_id, p_max_concurrency)
        ON CONFLICT ON CONSTRAINT handler_limits_pkey DO UPDATE
        SET max_concurrency = EXCLUDED.max_concurrency, set_by = current_user, set_at = now();
    END IF;
END
$$;

-- Drops a trigger; its details go with it (ON DELETE CASCADE). Events it already enqueued
-- still run.
CREATE FUNCTION picloud.picloud_drop_trigger(p_app_id uuid, p_trigger_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_trigger_id IS NULL THEN PERFORM picloud._null_argument('{trigger_id}', '{t}'); END IF;
    DELETE FROM picloud.triggers WHERE app_id = p_app_id AND trigger_id = p_trigger_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'trigger % does not exist in app %', p_trigger_id, p_app_id USING ERRCODE = 'P0002';
    END IF;
END
$$;

-- Matching hot paths --------------------------------------------------------------------------

-- The enabled KV triggers of an app that fire for (collection, op). One index probe per
-- candidate match key (see kv_trigger_details.match_key), never a scan of all patterns.
CREATE FUNCTION picloud.picloud_match_kv_triggers(p_app_id uuid, p_collection text, p_op text)
RETURNS TABLE (trigger_id uuid, script_id uuid, registered_by_principal name)
LANGUAGE sql STABLE AS $$
    -- Inlined into its callers' statements (the index probe on (app_id, match_key) is then
    -- planned with them), so no fixed search_path, which would stop the inlining: every
    -- operator is named with its schema instead.
    SELECT t.trigger_id, t.script_id, t.registered_by_principal
    FROM picloud.kv_trigger_details d
    JOIN picloud.triggers t ON t.app_id OPERATOR(pg_catalog.=) d.app_id
                           AND t.trigger_id OPERATOR(pg_catalog.=) d.trigger_id
    WHERE d.app_id OPERATOR(pg_catalog.=) p_app_id
      AND d.match_key OPERATOR(pg_catalog.=) ANY (picloud._collection_match_keys(p_collection))
      AND p_op OPERATOR(pg_catalog.=) ANY (d.ops)
      AND t.enabled
$$;

-- The enabled dead-letter triggers of an app that fire for a dead letter from a source and
-- a handler.
CREATE FUNCTION picloud.picloud_match_dead_letter_triggers(p_app_id uuid, p_source text, p_script_id uuid)
RETURNS TABLE (trigger_id uuid, script_id uuid, registered_by_principal name)
LANGUAGE sql STABLE AS $$
    -- Inlined into its callers, like picloud_match_kv_triggers: operators named with their schema.
    SELECT t.trigger_id, t.script_id, t.registered_by_principal
    FROM picloud.dead_letter_trigger_details d
    JOIN picloud.triggers t ON t.app_id OPERATOR(pg_catalog.=) d.app_id
                           AND t.trigger_id OPERATOR(pg_catalog.=) d.trigger_id
    WHERE d.app_id OPERATOR(pg_catalog.=) p_app_id
      AND (d.source_filter IS NULL OR d.source_filter OPERATOR(pg_catalog.=) p_source)
      AND (d.script_filter IS NULL OR d.script_filter OPERATOR(pg_catalog.=) p_script_id)
      AND t.enabled
$$;
