-- Cron triggers: handlers that run on a schedule (docs/sql-api.md, "Cron triggers").
--
-- Where ticks are made, and why each is enqueued exactly once: the housekeeper (the background
-- worker inside Postgres, extension/src/worker.rs) calls picloud._cron_fire as soon as the
-- earliest next_fire_at is within 200 ms. For each such trigger it locks the trigger's
-- cron_trigger_details row, inserts the tick's outbox event, due at the tick's time (so the
-- time the firing takes is not the handler's lateness), and moves next_fire_at past it in
-- the same transaction. The tick and the move commit together or not at all (a crash, a killed
-- housekeeper, a failover that loses the commit lose both, and the tick is made again from the
-- state that survived); a second firer skips the locked row, and after the commit the row no
-- longer qualifies (next_fire_at is in the future). Supervisors make no ticks, so their number
-- does not matter. A clock that moves back makes no tick twice (next_fire_at only moves
-- forward); a clock that jumps forward makes the skipped ticks missed ones, handled by the
-- trigger's catch-up policy.

-- A tick's time, or NULL past the outbox's time window (picloud.event_time): no further tick.
-- (PL/pgSQL: a SQL function with a fixed search_path is planned again by every statement that
-- calls it, and the housekeeper calls this once per trigger and tick.)
CREATE FUNCTION picloud._cron_arm(p_schedule text, p_timezone text, p_after timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_next timestamptz := picloud._cron_next_after(p_schedule, p_timezone, p_after);
BEGIN
    RETURN CASE WHEN v_next < '2200-01-01 00:00:00+00' THEN v_next END;
END
$$;

CREATE FUNCTION picloud._check_cron_options(p_catch_up text, p_catch_up_limit integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_catch_up NOT IN ('none', 'last', 'all') THEN
        PERFORM picloud._invalid(format('catch_up must be none, last or all, got %L', left(p_catch_up, 100)));
    END IF;
    IF p_catch_up_limit NOT BETWEEN 1 AND 10000 THEN
        PERFORM picloud._invalid(format('catch_up_limit must be between 1 and 10000, got %s', p_catch_up_limit));
    END IF;
END
$$;

-- Registers a cron trigger: the handler runs, as the calling role, once per tick of the
-- schedule, with the payload {"trigger_id", "scheduled_for", "payload"}.
CREATE FUNCTION picloud.picloud_create_cron_trigger(
    p_app_id uuid,
    p_schedule text,
    p_script_id uuid,
    p_timezone text DEFAULT 'UTC',
    p_payload jsonb DEFAULT '{}',
    p_catch_up text DEFAULT 'last',
    p_catch_up_limit integer DEFAULT 100,
    p_skip_if_running boolean DEFAULT false,
    p_enabled boolean DEFAULT true)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_trigger_id uuid := gen_random_uuid();
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_schedule IS NULL OR p_script_id IS NULL OR p_timezone IS NULL OR p_payload IS NULL
       OR p_catch_up IS NULL OR p_catch_up_limit IS NULL OR p_skip_if_running IS NULL OR p_enabled IS NULL THEN
        PERFORM picloud._null_argument(
            '{schedule,script_id,timezone,payload,catch_up,catch_up_limit,skip_if_running,enabled}',
            ARRAY[p_schedule IS NULL, p_script_id IS NULL, p_timezone IS NULL, p_payload IS NULL,
                  p_catch_up IS NULL, p_catch_up_limit IS NULL, p_skip_if_running IS NULL, p_enabled IS NULL]);
    END IF;
    PERFORM picloud._cron_check(p_schedule, p_timezone);
    PERFORM picloud._check_cron_options(p_catch_up, p_catch_up_limit);
    PERFORM picloud._check_payload(p_payload);
    PERFORM picloud._require_script(p_app_id, p_script_id);
    INSERT INTO picloud.triggers (app_id, trigger_id, kind, script_id, enabled)
    VALUES (p_app_id, v_trigger_id, 'cron', p_script_id, p_enabled);
    INSERT INTO picloud.cron_trigger_details (
        app_id, trigger_id, schedule, timezone, payload, catch_up, catch_up_limit, skip_if_running,
        next_fire_at)
    VALUES (
        p_app_id, v_trigger_id, p_schedule, p_timezone, p_payload, p_catch_up, p_catch_up_limit,
        p_skip_if_running, picloud._cron_arm(p_schedule, p_timezone, now()));
    PERFORM picloud._wake_housekeeper_at_commit();
    RETURN v_trigger_id;
END
$$;

-- Changes what is given of a cron trigger (NULL keeps a value). A new schedule or time zone
-- starts from now: its next tick is the first one after the call.
CREATE FUNCTION picloud.picloud_alter_cron_trigger(
    p_app_id uuid,
    p_trigger_id uuid,
    p_schedule text DEFAULT NULL,
    p_timezone text DEFAULT NULL,
    p_payload jsonb DEFAULT NULL,
    p_catch_up text DEFAULT NULL,
    p_catch_up_limit integer DEFAULT NULL,
    p_skip_if_running boolean DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d picloud.cron_trigger_details;
    v_schedule text;
    v_timezone text;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_trigger_id IS NULL THEN PERFORM picloud._null_argument('{trigger_id}', '{t}'); END IF;
    SELECT * INTO d FROM picloud.cron_trigger_details c
    WHERE c.app_id = p_app_id AND c.trigger_id = p_trigger_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cron trigger % does not exist in app %', p_trigger_id, p_app_id USING ERRCODE = 'P0002';
    END IF;
    v_schedule := coalesce(p_schedule, d.schedule);
    v_timezone := coalesce(p_timezone, d.timezone);
    PERFORM picloud._cron_check(v_schedule, v_timezone);
    PERFORM picloud._check_cron_options(coalesce(p_catch_up, d.catch_up), coalesce(p_catch_up_limit, d.catch_up_limit));
    IF p_payload IS NOT NULL THEN
        PERFORM picloud._check_payload(p_payload);
    END IF;
    UPDATE picloud.cron_trigger_details c SET
        schedule = v_schedule,
        timezone = v_timezone,
        payload = coalesce(p_payload, c.payload),
        catch_up = coalesce(p_catch_up, c.catch_up),
        catch_up_limit = coalesce(p_catch_up_limit, c.catch_up_limit),
        skip_if_running = coalesce(p_skip_if_running, c.skip_if_running),
        next_fire_at = CASE WHEN v_schedule IS DISTINCT FROM d.schedule OR v_timezone IS DISTINCT FROM d.timezone
                            THEN picloud._cron_arm(v_schedule, v_timezone, now())
                            ELSE c.next_fire_at END
    WHERE c.app_id = p_app_id AND c.trigger_id = p_trigger_id;
    UPDATE picloud.triggers t SET updated_at = now()
    WHERE t.app_id = p_app_id AND t.trigger_id = p_trigger_id;
    PERFORM picloud._wake_housekeeper_at_commit();
END
$$;

-- The cron triggers of an app with where each stands: when it fires next, when it last fired
-- and for which tick, whether that tick's event is still pending (queued, running or retrying),
-- and how many ticks it fired and skipped. The rest of its story is in the stats, the outbox
-- and the dead letters (trigger_id).
CREATE FUNCTION picloud.picloud_list_cron_triggers(p_app_id uuid)
RETURNS TABLE (
    trigger_id uuid, script_id uuid, enabled boolean, schedule text, timezone text, payload jsonb,
    catch_up text, catch_up_limit integer, skip_if_running boolean, next_fire_at timestamptz,
    last_scheduled_for timestamptz, last_fired_at timestamptz, last_event_id uuid,
    last_event_pending boolean, fired_count bigint, skipped_count bigint,
    registered_by_principal name, created_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    RETURN QUERY
    SELECT d.trigger_id, t.script_id, t.enabled, d.schedule, d.timezone, d.payload, d.catch_up,
           d.catch_up_limit, d.skip_if_running, d.next_fire_at::timestamptz, d.last_scheduled_for,
           d.last_fired_at, d.last_event_id,
           EXISTS (SELECT 1 FROM picloud.outbox o
                   WHERE o.app_id = d.app_id AND o.event_id = d.last_event_id),
           d.fired_count, d.skipped_count, t.registered_by_principal, t.created_at
    FROM picloud.cron_trigger_details d
    JOIN picloud.triggers t ON t.app_id = d.app_id AND t.trigger_id = d.trigger_id
    WHERE d.app_id = p_app_id
    ORDER BY t.created_at, d.trigger_id;
END
$$;

-- Milliseconds until the earliest tick of an enabled trigger (negative if one is due), or NULL
-- when none is armed: the housekeeper sleeps until 200 ms before it (see _cron_fire).
CREATE FUNCTION picloud._cron_next_fire_in_ms() RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT extract(epoch FROM d.next_fire_at - clock_timestamp())::double precision * 1000
    FROM picloud.cron_trigger_details d
    WHERE d.next_fire_at IS NOT NULL
      AND EXISTS (SELECT 1 FROM picloud.triggers t
                  WHERE t.app_id = d.app_id AND t.trigger_id = d.trigger_id AND t.enabled)
    ORDER BY d.next_fire_at
    LIMIT 1
$$;

-- Enqueues the due ticks of up to p_batch triggers, each with its catch-up policy, and moves
-- their next_fire_at past them (see the top of this file). Returns how many triggers it
-- handled. A tick is due 200 ms before its time (its event is then due at the tick's time);
-- which of several due ticks fire:
--   'all'  every one, the latest catch_up_limit of them (older ones are counted as skipped);
--   'last' only the latest (the others are counted as skipped);
--   'none' only the latest, and only if it is at most 10 seconds late (a tick due while the
--          housekeeper was away is skipped; 10 seconds absorbs a busy housekeeper's delay).
-- With skip_if_running, ticks are skipped while the trigger's last event is still pending
-- (queued, running or retrying) 200 ms before the tick.
CREATE FUNCTION picloud._cron_fire(p_batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_ticks timestamptz[];
    v_earlier bigint;
    v_fire timestamptz[];
    v_last_event uuid;
    v_handled bigint := 0;
    v_fired bigint := 0;
    -- How early a tick is enqueued, due at its time: keep in step with CRON_LEAD in
    -- extension/src/worker.rs.
    v_until timestamptz := now() + interval '200 milliseconds';
BEGIN
    FOR r IN
        SELECT d.app_id, d.trigger_id, d.schedule, d.timezone, d.payload, d.catch_up,
               d.catch_up_limit, d.skip_if_running, d.next_fire_at, d.last_event_id, t.script_id
        FROM picloud.cron_trigger_details d
        JOIN picloud.triggers t ON t.app_id = d.app_id AND t.trigger_id = d.trigger_id
        WHERE d.next_fire_at <= v_until AND t.enabled
        ORDER BY d.next_fire_at
        LIMIT p_batch
        FOR UPDATE OF d SKIP LOCKED
    LOOP
        SELECT c.ticks, c.earlier INTO v_ticks, v_earlier
        FROM picloud._cron_due(r.schedule, r.timezone, r.next_fire_at, v_until,
                               CASE WHEN r.catch_up = 'all' THEN r.catch_up_limit ELSE 1 END) AS c;
        v_fire := v_ticks;
        IF r.catch_up = 'none' AND cardinality(v_ticks) > 0
           AND v_ticks[cardinality(v_ticks)] < now() - interval '10 seconds' THEN
            v_fire := '{}';
        END IF;
        IF r.skip_if_running AND r.last_event_id IS NOT NULL AND EXISTS (
            SELECT 1 FROM picloud.outbox o WHERE o.app_id = r.app_id AND o.event_id = r.last_event_id) THEN
            v_fire := '{}';
        END IF;
        v_last_event := NULL;
        IF cardinality(v_fire) > 0 THEN
            WITH inserted AS (
                INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth, due_at,
                                            priority)
                SELECT r.app_id, picloud._new_event_id(), 'cron', 'tick', r.trigger_id, r.script_id,
                       jsonb_build_object('trigger_id', r.trigger_id, 'scheduled_for', f.tick,
                                          'payload', r.payload),
                       0, greatest(f.tick, now()), picloud._trigger_priority(r.app_id, r.trigger_id)
                FROM unnest(v_fire) WITH ORDINALITY AS f(tick, n)
                ORDER BY f.n
                RETURNING event_id
            )
            -- Event ids grow with time: the greatest is the last tick's.
            SELECT (array_agg(i.event_id ORDER BY i.event_id DESC))[1] INTO v_last_event FROM inserted i;
        END IF;
        UPDATE picloud.cron_trigger_details d SET
            next_fire_at = picloud._cron_arm(r.schedule, r.timezone, v_until),
            last_scheduled_for = CASE WHEN cardinality(v_fire) > 0 THEN v_fire[cardinality(v_fire)]
                                      ELSE d.last_scheduled_for END,
            last_fired_at = CASE WHEN cardinality(v_fire) > 0 THEN now() ELSE d.last_fired_at END,
            last_event_id = coalesce(v_last_event, d.last_event_id),
            fired_count = d.fired_count + cardinality(v_fire),
            skipped_count = d.skipped_count + v_earlier + cardinality(v_ticks) - cardinality(v_fire)
        WHERE d.app_id = r.app_id AND d.trigger_id = r.trigger_id;
        v_handled := v_handled + 1;
        v_fired := v_fired + cardinality(v_fire);
    END LOOP;
    IF v_fired > 0 THEN
        PERFORM picloud._wake_at_commit();
    END IF;
    RETURN v_handled;
END
$$;
