-- Dead letters: moving an exhausted event out of the outbox, fan-out to dead-letter
-- triggers, and the operator's tools (list, get, count, resolve, replay, bulk).

-- Moves a locked outbox row to the dead letters and fans out to the app's matching
-- dead-letter triggers one level deeper. Fan-out that would pass the depth limit is skipped
-- with a WARNING: failing here would put the event back in the outbox forever.
CREATE FUNCTION picloud._dead_letter(r picloud.outbox, p_error text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_dead_letter_id uuid := gen_random_uuid();
    v_depth integer := r.depth + 1;
    v_fanned integer;
BEGIN
    INSERT INTO picloud.dead_letters (
        app_id, dead_letter_id, original_event_id, source, op, trigger_id, script_id, payload, depth,
        attempt_count, first_attempt_at, last_attempt_at, last_error, reply_to,
        ordering_key, ordering_seq, ordering_blocks, priority)
    VALUES (
        r.app_id, v_dead_letter_id, r.event_id, r.source, r.op, r.trigger_id, r.script_id, r.payload, r.depth,
        r.attempt_count, r.first_attempt_at, r.last_attempt_at, p_error, r.reply_to,
        r.ordering_key, r.ordering_seq, r.ordering_blocks, r.priority);
    DELETE FROM picloud.outbox o WHERE o.app_id = r.app_id AND o.event_id = r.event_id;
    IF r.ordering_key IS NOT NULL THEN
        IF r.ordering_blocks THEN
            -- The key waits for this dead letter's resolution (picloud.blocked_keys).
            INSERT INTO picloud.key_blocks (app_id, ordering_key, dead_letter_id)
            VALUES (r.app_id, r.ordering_key, v_dead_letter_id)
            ON CONFLICT ON CONSTRAINT key_blocks_pkey DO NOTHING;
        ELSE
            -- The key goes on: its next event can run now.
            PERFORM picloud._wake_at_commit();
        END IF;
    END IF;

    IF v_depth > current_setting('picloud.max_trigger_depth')::integer THEN
        IF EXISTS (SELECT 1 FROM picloud.picloud_match_dead_letter_triggers(r.app_id, r.source, r.script_id)) THEN
            RAISE WARNING 'dead letter % of app % not fanned out: depth % exceeds picloud.max_trigger_depth',
                v_dead_letter_id, r.app_id, v_depth;
        END IF;
        RETURN v_dead_letter_id;
    END IF;
    INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth, priority)
    SELECT r.app_id, picloud._new_event_id(), 'dead_letter', r.op, m.trigger_id, m.script_id,
           jsonb_build_object(
               'dead_letter_id', v_dead_letter_id, 'original_event_id', r.event_id,
               'source', r.source, 'op', r.op, 'trigger_id', r.trigger_id, 'script_id', r.script_id,
               'payload', r.payload, 'attempt_count', r.attempt_count, 'last_error', p_error),
           v_depth, picloud._trigger_priority(r.app_id, m.trigger_id)
    FROM picloud.picloud_match_dead_letter_triggers(r.app_id, r.source, r.script_id) m;
    GET DIAGNOSTICS v_fanned = ROW_COUNT;
    IF v_fanned > 0 THEN
        PERFORM picloud._wake_at_commit();
    END IF;
    RETURN v_dead_letter_id;
END
$$;

CREATE FUNCTION picloud.picloud_list_dead_letters(
    p_app_id uuid, p_unresolved_only boolean DEFAULT true, p_limit integer DEFAULT 50, p_offset integer DEFAULT 0)
RETURNS SETOF picloud.dead_letters
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    IF p_unresolved_only IS NULL THEN PERFORM picloud._null_argument('{unresolved_only}', '{t}'); END IF;
    PERFORM picloud._check_page(p_limit, p_offset);
    IF p_unresolved_only THEN
        RETURN QUERY SELECT * FROM picloud.dead_letters d
        WHERE d.app_id = p_app_id AND d.resolved_at IS NULL
        ORDER BY d.created_at DESC, d.dead_letter_id LIMIT p_limit OFFSET p_offset;
    ELSE
        RETURN QUERY SELECT * FROM picloud.dead_letters d
        WHERE d.app_id = p_app_id
        ORDER BY d.created_at DESC, d.dead_letter_id LIMIT p_limit OFFSET p_offset;
    END IF;
END
$$;

CREATE FUNCTION picloud.picloud_get_dead_letter(p_app_id uuid, p_dead_letter_id uuid)
RETURNS picloud.dead_letters
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_row picloud.dead_letters;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    IF p_dead_letter_id IS NULL THEN PERFORM picloud._null_argument('{dead_letter_id}', '{t}'); END IF;
    SELECT * INTO v_row FROM picloud.dead_letters d
    WHERE d.app_id = p_app_id AND d.dead_letter_id = p_dead_letter_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dead letter % does not exist in app %', p_dead_letter_id, p_app_id USING ERRCODE = 'P0002';
    END IF;
    RETURN v_row;
END
$$;

-- The unresolved-count badge (served by the partial index on unresolved rows).
CREATE FUNCTION picloud.picloud_dead_letter_count(p_app_id uuid) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    RETURN (SELECT count(*) FROM picloud.dead_letters d WHERE d.app_id = p_app_id AND d.resolved_at IS NULL);
END
$$;

-- Locks an unresolved dead letter for resolution; P0002 if unknown, PC003 if resolved.
CREATE FUNCTION picloud._lock_unresolved(p_app_id uuid, p_dead_letter_id uuid) RETURNS picloud.dead_letters
LANGUAGE plpgsql AS $$
DECLARE
    v_row picloud.dead_letters;
BEGIN
    SELECT * INTO v_row FROM picloud.dead_letters d
    WHERE d.app_id = p_app_id AND d.dead_letter_id = p_dead_letter_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dead letter % does not exist in app %', p_dead_letter_id, p_app_id USING ERRCODE = 'P0002';
    END IF;
    IF v_row.resolved_at IS NOT NULL THEN
        RAISE EXCEPTION 'dead letter % was already resolved as % at %', p_dead_letter_id, v_row.resolution, v_row.resolved_at
            USING ERRCODE = 'PC003';
    END IF;
    RETURN v_row;
END
$$;

-- Raises 23514 unless p_resolution is one of the four resolutions (the same rule as the
-- dead_letters_resolution_valid CHECK, but with a hint and before anything is locked).
CREATE FUNCTION picloud._check_resolution(p_resolution text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_resolution NOT IN ('replayed', 'ignored', 'handled_by_script', 'handler_failed') THEN
        RAISE EXCEPTION 'invalid dead letter resolution %', quote_literal(left(p_resolution, 200))
            USING ERRCODE = '23514',
                  HINT = 'A resolution is one of replayed, ignored, handled_by_script, handler_failed.';
    END IF;
END
$$;

CREATE FUNCTION picloud.picloud_resolve_dead_letter(p_app_id uuid, p_dead_letter_id uuid, p_resolution text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    IF p_dead_letter_id IS NULL OR p_resolution IS NULL THEN
        PERFORM picloud._null_argument('{dead_letter_id,resolution}',
            ARRAY[p_dead_letter_id IS NULL, p_resolution IS NULL]);
    END IF;
    PERFORM picloud._check_resolution(p_resolution);
    PERFORM picloud._lock_unresolved(p_app_id, p_dead_letter_id);
    UPDATE picloud.dead_letters
    SET resolution = p_resolution, resolved_at = now(), resolved_by = current_user
    WHERE app_id = p_app_id AND dead_letter_id = p_dead_letter_id;
END
$$;

-- Re-enqueues a locked, unresolved dead letter with fresh attempts and marks it replayed.
-- An ordered event keeps its key: if it blocks the key it keeps its place too (it runs before
-- the events it held back, and resolving it releases the key); under 'continue' it takes a
-- new place at the end of its key.
CREATE FUNCTION picloud._replay(d picloud.dead_letters) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_event_id uuid := picloud._new_event_id();
    v_ordering_seq bigint := d.ordering_seq;
BEGIN
    IF d.script_id IS NULL THEN
        PERFORM picloud._invalid(format('dead letter %s has no handler to replay', d.dead_letter_id));
    END IF;
    IF d.ordering_key IS NOT NULL AND NOT d.ordering_blocks THEN
        v_ordering_seq := picloud._order_event(d.app_id, d.ordering_key);
    END IF;
    -- A synchronous caller is long gone: the replay runs asynchronously.
    INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth,
                                ordering_key, ordering_seq, ordering_blocks, priority)
    VALUES (d.app_id, v_event_id, d.source, d.op, d.trigger_id, d.script_id, d.payload, d.depth,
            d.ordering_key, v_ordering_seq, d.ordering_blocks, d.priority);
    UPDATE picloud.dead_letters
    SET resolution = 'replayed', resolved_at = now(), resolved_by = current_user
    WHERE app_id = d.app_id AND dead_letter_id = d.dead_letter_id;
    PERFORM picloud._wake_at_commit();
    RETURN v_event_id;
END
$$;

-- Replays one dead letter; returns the new event id. Refused (PC003) once resolved.
CREATE FUNCTION picloud.picloud_replay_dead_letter(p_app_id uuid, p_dead_letter_id uuid) RETURNS uuid
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    IF p_dead_letter_id IS NULL THEN PERFORM picloud._null_argument('{dead_letter_id}', '{t}'); END IF;
    RETURN picloud._replay(picloud._lock_unresolved(p_app_id, p_dead_letter_id));
END
$$;

-- Replays every unresolved dead letter of an app matching the filters (NULL = any);
-- returns how many. Rows another session is resolving right now are skipped.
CREATE FUNCTION picloud.picloud_replay_dead_letters(
    p_app_id uuid, p_source text DEFAULT NULL, p_script_id uuid DEFAULT NULL, p_created_before timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    d picloud.dead_letters;
    v_count integer := 0;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    FOR d IN
        SELECT * FROM picloud.dead_letters x
        WHERE x.app_id = p_app_id AND x.resolved_at IS NULL
          AND (p_source IS NULL OR x.source = p_source)
          AND (p_script_id IS NULL OR x.script_id = p_script_id)
          AND (p_created_before IS NULL OR x.created_at < p_created_before)
        ORDER BY x.created_at
        FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM picloud._replay(d);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END
$$;

-- Marks every unresolved dead letter of an app matching the filters as ignored.
CREATE FUNCTION picloud.picloud_ignore_dead_letters(
    p_app_id uuid, p_source text DEFAULT NULL, p_script_id uuid DEFAULT NULL, p_created_before timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    WITH target AS (
        SELECT x.app_id, x.dead_letter_id FROM picloud.dead_letters x
        WHERE x.app_id = p_app_id AND x.resolved_at IS NULL
          AND (p_source IS NULL OR x.source = p_source)
          AND (p_script_id IS NULL OR x.script_id = p_script_id)
          AND (p_created_before IS NULL OR x.created_at < p_created_before)
        FOR UPDATE SKIP LOCKED
    )
    UPDATE picloud.dead_letters d
    SET resolution = 'ignored', resolved_at = now(), resolved_by = current_user
    FROM target WHERE d.app_id = target.app_id AND d.dead_letter_id = target.dead_letter_id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

-- Resolving a dead letter, by any path (the functions above, picloud_resolve_dead_letters, an
-- UPDATE of the table), releases the ordering key it blocked. A replay has put the event back
-- at its place first, so it still runs before the events it held back.
CREATE FUNCTION picloud._release_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM picloud.key_blocks b
    WHERE b.app_id = NEW.app_id AND b.dead_letter_id = NEW.dead_letter_id;
    IF FOUND THEN
        PERFORM picloud._wake_at_commit();
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER dead_letters_release_key
    AFTER UPDATE OF resolved_at ON picloud.dead_letters
    FOR EACH ROW WHEN (NEW.resolved_at IS NOT NULL AND NEW.ordering_blocks)
    EXECUTE FUNCTION picloud._release_key();

-- Abandoned executions ------------------------------------------------------------------------

CREATE FUNCTION picloud._record_abandoned(r picloud.outbox, p_ok boolean, p_result jsonb, p_error text, p_reason text)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid := gen_random_uuid();
BEGIN
    INSERT INTO picloud.abandoned_executions (
        app_id, abandoned_id, event_id, trigger_id, script_id, reply_to, succeeded, result, error, reason)
    VALUES (r.app_id, v_id, r.event_id, r.trigger_id, r.script_id, r.reply_to, p_ok, p_result, p_error, p_reason);
    RETURN v_id;
END
$$;

-- Records an abandoned execution reported by a supervisor (for callers it tracks itself).
CREATE FUNCTION picloud.picloud_record_abandoned_execution(
    p_app_id uuid, p_event_id uuid, p_reply_to text, p_succeeded boolean, p_result jsonb, p_error text, p_reason text)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    r picloud.outbox;
BEGIN
    IF p_app_id IS NULL OR p_event_id IS NULL OR p_reply_to IS NULL OR p_succeeded IS NULL OR p_reason IS NULL THEN
        PERFORM picloud._null_argument('{app_id,event_id,reply_to,succeeded,reason}',
            ARRAY[p_app_id IS NULL, p_event_id IS NULL, p_reply_to IS NULL, p_succeeded IS NULL, p_reason IS NULL]);
    END IF;
    r.app_id := p_app_id;
    r.event_id := p_event_id;
    r.reply_to := p_reply_to;
    RETURN picloud._record_abandoned(r, p_succeeded, p_result, p_error, p_reason);
END
$$;

CREATE FUNCTION picloud.picloud_list_abandoned_executions(p_app_id uuid, p_limit integer DEFAULT 50, p_offset integer DEFAULT 0)
RETURNS SETOF picloud.abandoned_executions
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    PERFORM picloud._check_page(p_limit, p_offset);
    RETURN QUERY SELECT * FROM picloud.abandoned_executions a WHERE a.app_id = p_app_id
    ORDER BY a.created_at DESC, a.abandoned_id LIMIT p_limit OFFSET p_offset;
END
$$;
