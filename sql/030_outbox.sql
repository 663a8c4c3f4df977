-- The outbox: enqueue (direct, bulk, KV fan-out, table capture), claim under a lease,
-- complete, fail with retry or dead-lettering, and synchronous-call inboxes.
--
-- Project SQLSTATEs (class PC, see README):
--   PC001 depth exceeded      PC002 lease lost       PC003 dead letter already resolved
--   PC004 payload too large   PC005 principal cannot run the handler

-- Depth an event enqueued now gets: at least the depth the caller asks for, and inside a
-- handler at least one more than the event being handled. Raises PC001 past the limit.
CREATE FUNCTION picloud._event_depth(p_requested integer) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_depth integer := greatest(coalesce(p_requested, 0), picloud.picloud_current_depth());
    v_max integer := current_setting('picloud.max_trigger_depth')::integer;
BEGIN
    IF p_requested < 0 THEN
        PERFORM picloud._invalid(format('depth must not be negative, got %s', p_requested));
    END IF;
    IF v_depth > v_max THEN
        RAISE EXCEPTION 'event depth % exceeds picloud.max_trigger_depth (%)', v_depth, v_max
            USING ERRCODE = 'PC001',
                  DETAIL = 'Each event produced by a handler is one level deeper than the event that ran it.',
                  HINT = 'A trigger chain is probably feeding itself; break the loop or raise picloud.max_trigger_depth.';
    END IF;
    RETURN v_depth;
END
$$;

CREATE FUNCTION picloud._check_payload(p_payload jsonb) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_size integer := picloud._payload_bytes(p_payload);
    v_max integer := current_setting('picloud.max_payload_bytes')::integer;
BEGIN
    IF v_size > v_max THEN
        RAISE EXCEPTION 'event payload of % bytes exceeds picloud.max_payload_bytes (%)', v_size, v_max
            USING ERRCODE = 'PC004',
                  HINT = 'Store large data in a table and put its key in the payload.';
    END IF;
END
$$;

CREATE FUNCTION picloud._check_event_shape(p_source text, p_op text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_source NOT IN ('kv', 'cron', 'pubsub', 'queue', 'email', 'dead_letter', 'enqueue') THEN
        PERFORM picloud._invalid(format('unknown source %L', left(p_source, 200)),
            'Sources are kv, cron, pubsub, queue, email, dead_letter and enqueue.');
    END IF;
    IF length(p_op) NOT BETWEEN 1 AND 200 THEN
        PERFORM picloud._invalid(format('op must be 1 to 200 characters long, got %s', length(p_op)));
    END IF;
END
$$;

-- A requested due time is finite and within 100 years of now: the outbox's readers do
-- arithmetic on it, and nothing sensible is scheduled further away.
CREATE FUNCTION picloud._check_run_at(p_run_at timestamptz) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT isfinite(p_run_at)
       OR p_run_at NOT BETWEEN now() - interval '100 years' AND now() + interval '100 years' THEN
        PERFORM picloud._invalid(format('run_at must be within 100 years of now, got %s', p_run_at));
    END IF;
END
$$;

-- The handler an event runs: the given script, or the given trigger's script.
CREATE FUNCTION picloud._resolve_handler(p_app_id uuid, p_script_id uuid, p_trigger_id uuid) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_script_id uuid;
BEGIN
    IF p_trigger_id IS NOT NULL THEN
        SELECT t.script_id INTO v_script_id FROM picloud.triggers t
        WHERE t.app_id = p_app_id AND t.trigger_id = p_trigger_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'trigger % does not exist in app %', p_trigger_id, p_app_id USING ERRCODE = 'P0002';
        END IF;
        IF p_script_id IS NOT NULL AND p_script_id <> v_script_id THEN
            PERFORM picloud._invalid(format('handler %s is not the handler of trigger %s', p_script_id, p_trigger_id));
        END IF;
        RETURN v_script_id;
    END IF;
    IF p_script_id IS NULL THEN
        PERFORM picloud._invalid('an event needs a handler: pass script_id or trigger_id');
    END IF;
    PERFORM picloud._require_script(p_app_id, p_script_id);
    RETURN p_script_id;
END
$$;

-- The whole contract of picloud_enqueue (below), every error included: every call that
-- picloud._enqueue_fast does not write comes here (internal).
CREATE FUNCTION picloud._enqueue_general(
    p_app_id uuid,
    p_source text,
    p_op text,
    p_payload jsonb,
    p_script_id uuid,
    p_trigger_id uuid,
    p_depth integer,
    p_run_at timestamptz,
    p_reply_to text,
    p_idempotency_key text)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_event_id uuid := picloud._new_event_id();
    v_existing uuid;
    v_script_id uuid := p_script_id;
    v_depth integer;
    v_wake_pending boolean;
BEGIN
    -- Still a hot path (trigger ids, inboxes, idempotency keys): each check below is a plain
    -- expression that PL/pgSQL evaluates without running a query, and the helper that raises
    -- the precise error is called only when a check fails.
    IF p_app_id IS NULL OR p_source IS NULL OR p_op IS NULL OR p_payload IS NULL THEN
        PERFORM picloud._null_argument('{app_id,source,op,payload}',
            ARRAY[p_app_id IS NULL, p_source IS NULL, p_op IS NULL, p_payload IS NULL]);
    END IF;
    IF NOT picloud._is_owner() THEN
        PERFORM picloud._require(p_app_id, 'enqueue');
    END IF;
    IF p_source NOT IN ('kv', 'cron', 'pubsub', 'queue', 'email', 'dead_letter', 'enqueue')
       OR length(p_op) NOT BETWEEN 1 AND 200 THEN
        PERFORM picloud._check_event_shape(p_source, p_op);
    END IF;
    v_depth := picloud._admit(picloud._payload_bytes(p_payload), p_depth);
    IF v_depth < 0 THEN
        PERFORM picloud._check_payload(p_payload);
        v_depth := picloud._event_depth(p_depth);
    END IF;
    IF p_run_at IS NOT NULL THEN
        PERFORM picloud._check_run_at(p_run_at);
    END IF;
    IF p_trigger_id IS NULL AND p_script_id IS NOT NULL THEN
        PERFORM FROM picloud.scripts s WHERE s.app_id = p_app_id AND s.script_id = p_script_id;
        IF NOT FOUND THEN
            PERFORM picloud._require_app(p_app_id);
            PERFORM picloud._require_script(p_app_id, p_script_id);
        END IF;
    ELSE
        v_script_id := picloud._resolve_handler(p_app_id, p_script_id, p_trigger_id);
    END IF;
    IF p_reply_to IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM picloud.inboxes i WHERE i.app_id = p_app_id AND i.channel = p_reply_to) THEN
        PERFORM picloud._invalid(format('reply_to %L is not an open inbox of app %s', left(p_reply_to, 200), p_app_id),
            'Open one with picloud_open_inbox and LISTEN on the channel it returns.');
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        IF length(p_idempotency_key) NOT BETWEEN 1 AND 512 THEN
            PERFORM picloud._invalid(format('idempotency_key must be 1 to 512 characters long, got %s', length(p_idempotency_key)));
        END IF;
        INSERT INTO picloud.idempotency_keys (app_id, idempotency_key, event_id)
        VALUES (p_app_id, p_idempotency_key, v_event_id)
        ON CONFLICT ON CONSTRAINT idempotency_keys_pkey DO NOTHING;
        IF NOT FOUND THEN
            SELECT k.event_id INTO v_existing FROM picloud.idempotency_keys k
            WHERE k.app_id = p_app_id AND k.idempotency_key = p_idempotency_key;
            RETURN v_existing;
        END IF;
    END IF;
    INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth, due_at, reply_to)
    VALUES (p_app_id, v_event_id, p_source, p_op, p_trigger_id, v_script_id, p_payload, v_depth,
            coalesce(p_run_at, now()), p_reply_to);
    v_wake_pending := picloud._wake_at_commit();
    RETURN v_event_id;
END
$$;

-- The common case of picloud_enqueue in Rust (extension/src/api/enqueue.rs): writes the
-- event with a kept plan and returns its id, or writes nothing and returns NULL for anything
-- else, which picloud._enqueue_general then handles (internal).
CREATE FUNCTION picloud._enqueue_fast(
    p_app_id uuid,
    p_source text,
    p_op text,
    p_payload jsonb,
    p_script_id uuid,
    p_trigger_id uuid,
    p_depth integer,
    p_run_at timestamptz,
    p_reply_to text,
    p_idempotency_key text)
RETURNS uuid
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'picloud_enqueue_fast';

-- Enqueues one event in the caller's transaction and returns its id. It is delivered when
-- (and only if) the transaction commits. run_at delays it; reply_to names the caller's
-- inbox for a synchronous call (never retried); a repeated idempotency_key returns the first
-- event's id and enqueues nothing.
-- The common case costs one call of Rust (picloud._enqueue_fast's) and no PL/pgSQL; every
-- other call runs picloud._enqueue_general with the same arguments (see api/enqueue.rs).
CREATE FUNCTION picloud.picloud_enqueue(
    p_app_id uuid,
    p_source text,
    p_op text,
    p_payload jsonb,
    p_script_id uuid DEFAULT NULL,
    p_trigger_id uuid DEFAULT NULL,
    p_depth integer DEFAULT NULL,
    p_run_at timestamptz DEFAULT NULL,
    p_reply_to text DEFAULT NULL,
    p_idempotency_key text DEFAULT NULL)
RETURNS uuid
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'picloud_enqueue';

-- Enqueues one event per payload, all for the same handler, in one statement. Returns the
-- new event ids in payload order.
CREATE FUNCTION picloud.picloud_enqueue_bulk(
    p_app_id uuid,
    p_source text,
    p_op text,
    p_payloads jsonb[],
    p_script_id uuid DEFAULT NULL,
    p_trigger_id uuid DEFAULT NULL,
    p_depth integer DEFAULT NULL,
    p_run_at timestamptz DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_script_id uuid;
    v_depth integer;
    v_max integer := current_setting('picloud.max_payload_bytes')::integer;
    v_too_big integer;
    v_ids uuid[];
BEGIN
    IF p_app_id IS NULL OR p_source IS NULL OR p_op IS NULL OR p_payloads IS NULL THEN
        PERFORM picloud._null_argument('{app_id,source,op,payloads}',
            ARRAY[p_app_id IS NULL, p_source IS NULL, p_op IS NULL, p_payloads IS NULL]);
    END IF;
    PERFORM picloud._require(p_app_id, 'enqueue');
    PERFORM picloud._check_event_shape(p_source, p_op);
    IF array_position(p_payloads, NULL) IS NOT NULL THEN
        PERFORM picloud._null_argument('{"payloads element"}', '{t}');
    END IF;
    SELECT ord INTO v_too_big FROM unnest(p_payloads) WITH ORDINALITY AS p(payload, ord)
    WHERE picloud._payload_bytes(payload) > v_max LIMIT 1;
    IF v_too_big IS NOT NULL THEN
        PERFORM picloud._check_payload(p_payloads[v_too_big]);
    END IF;
    IF p_run_at IS NOT NULL THEN
        PERFORM picloud._check_run_at(p_run_at);
    END IF;
    v_depth := picloud._event_depth(p_depth);
    v_script_id := picloud._resolve_handler(p_app_id, p_script_id, p_trigger_id);
    -- Ids are made here rather than taken with RETURNING: RETURNING would need producers to
    -- be allowed to read the outbox, which shows other producers' events.
    v_ids := ARRAY(SELECT picloud._new_event_id() FROM generate_series(1, cardinality(p_payloads)));
    INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth, due_at)
    SELECT p_app_id, p.event_id, p_source, p_op, p_trigger_id, v_script_id, p.payload, v_depth,
           coalesce(p_run_at, now())
    FROM unnest(p_payloads, v_ids) AS p(payload, event_id);
    IF cardinality(p_payloads) > 0 THEN
        PERFORM picloud._wake_at_commit();
    END IF;
    RETURN QUERY SELECT unnest(v_ids);
END
$$;

-- Emits a KV event: one outbox row per enabled KV trigger of the app matching (collection,
-- op), in the caller's transaction. Returns how many were enqueued.
CREATE FUNCTION picloud.picloud_emit_kv(
    p_app_id uuid,
    p_collection text,
    p_op text,
    p_key text,
    p_value jsonb,
    p_depth integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
-- The matching statement's best plan is the same for every call (an index probe on
-- (app_id, match_key)); without this, an app with many triggers makes PL/pgSQL re-plan it on
-- every call.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_enqueued integer;
    v_depth integer;
    v_payload jsonb;
    v_wake_pending boolean;
BEGIN
    IF p_app_id IS NULL OR p_collection IS NULL OR p_op IS NULL THEN
        PERFORM picloud._null_argument('{app_id,collection,op}',
            ARRAY[p_app_id IS NULL, p_collection IS NULL, p_op IS NULL]);
    END IF;
    IF NOT picloud._is_owner() THEN
        PERFORM picloud._require(p_app_id, 'enqueue');
    END IF;
    IF length(p_collection) NOT BETWEEN 1 AND 1024 THEN
        PERFORM picloud._invalid(format('collection name must be 1 to 1024 characters long, got %s', length(p_collection)));
    END IF;
    IF p_op NOT IN ('insert', 'update', 'delete', 'set') THEN
        PERFORM picloud._invalid(format('unknown KV op %L', left(p_op, 200)), 'KV ops are insert, update, delete and set.');
    END IF;
    IF length(p_key) > 1024 THEN
        PERFORM picloud._invalid(format('key must be at most 1024 characters long, got %s', length(p_key)));
    END IF;
    v_payload := jsonb_build_object('collection', p_collection, 'op', p_op, 'key', p_key, 'value', p_value);
    IF picloud._payload_bytes(v_payload) > current_setting('picloud.max_payload_bytes')::integer THEN
        PERFORM picloud._check_payload(v_payload);
    END IF;
    -- The depth check only matters when something would be enqueued: writing a captured table
    -- that no trigger listens to is never an error.
    IF p_depth < 0 THEN
        PERFORM picloud._event_depth(p_depth);
    END IF;
    v_depth := greatest(coalesce(p_depth, 0), picloud.picloud_current_depth());
    INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth)
    SELECT p_app_id, picloud._new_event_id(), 'kv', p_op, m.trigger_id, m.script_id, v_payload, v_depth
    FROM picloud.picloud_match_kv_triggers(p_app_id, p_collection, p_op) m;
    GET DIAGNOSTICS v_enqueued = ROW_COUNT;
    IF v_enqueued > 0 THEN
        IF v_depth > current_setting('picloud.max_trigger_depth')::integer THEN
            PERFORM picloud._event_depth(p_depth);
        END IF;
        v_wake_pending := picloud._wake_at_commit();
    END IF;
    RETURN v_enqueued;
END
$$;

-- Row trigger function that turns INSERT/UPDATE/DELETE on any table into KV events:
--   CREATE TRIGGER t AFTER INSERT OR UPDATE OR DELETE ON my_table
--     FOR EACH ROW EXECUTE FUNCTION picloud.capture('<app uuid>' [, '<key column>']);
-- collection = the table's name, op = insert/update/delete, key = the key column (default
-- 'id'), value = {"old": row-or-null, "new": row-or-null}.
CREATE FUNCTION picloud.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_app_id uuid;
    v_key_column text := 'id';
    v_old jsonb;
    v_new jsonb;
BEGIN
    IF TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' THEN
        PERFORM picloud._invalid('picloud.capture must be an AFTER ... FOR EACH ROW trigger');
    END IF;
    IF TG_NARGS < 1 THEN
        PERFORM picloud._invalid('picloud.capture needs the app id as its first argument');
    END IF;
    v_app_id := TG_ARGV[0]::uuid;
    IF TG_NARGS >= 2 THEN
        v_key_column := TG_ARGV[1];
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        v_old := to_jsonb(OLD);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        v_new := to_jsonb(NEW);
    END IF;
    PERFORM picloud.picloud_emit_kv(v_app_id, TG_TABLE_NAME::text, lower(TG_OP),
        coalesce(v_new, v_old) ->> v_key_column, jsonb_build_object('old', v_old, 'new', v_new));
    RETURN NULL;
END
$$;

-- Retry policy ----------------------------------------------------------------------------

-- Delay before the attempt after `p_attempt` failed attempts: base * 2^(attempt-1), plus up
-- to 25% jitter, capped by picloud.retry_max_delay. Non-decreasing in the attempt number.
CREATE FUNCTION picloud.picloud_retry_delay(p_attempt integer) RETURNS interval
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_base_ms double precision := extract(epoch FROM current_setting('picloud.retry_base_delay')::interval) * 1000;
    v_max_ms double precision := extract(epoch FROM current_setting('picloud.retry_max_delay')::interval) * 1000;
    v_exponent integer := least(greatest(coalesce(p_attempt, 1), 1) - 1, 40);
BEGIN
    RETURN make_interval(secs => least(v_max_ms, v_base_ms * power(2, v_exponent) * (1 + random() * 0.25)) / 1000);
END
$$;

-- Claim, complete, fail (what the supervisor calls) -----------------------------------------

-- Who a claimed event's handler runs as, or why it cannot run. The role comes from the
-- trigger only when the event's handler is that trigger's handler: a row that pairs one
-- registrant's trigger with another's handler must never borrow the trigger's rights.
CREATE FUNCTION picloud._handler_principal(p_app_id uuid, p_trigger_id uuid, p_script_id uuid)
RETURNS TABLE (principal name, problem text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_script_principal name;
    v_trigger_principal name;
    v_trigger_script uuid;
BEGIN
    SELECT s.registered_by_principal INTO v_script_principal
    FROM picloud.scripts s WHERE s.app_id = p_app_id AND s.script_id = p_script_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::name, 'the handler no longer exists'::text;
        RETURN;
    END IF;
    IF p_trigger_id IS NOT NULL THEN
        SELECT t.registered_by_principal, t.script_id INTO v_trigger_principal, v_trigger_script
        FROM picloud.triggers t WHERE t.app_id = p_app_id AND t.trigger_id = p_trigger_id;
        IF FOUND THEN
            IF v_trigger_script <> p_script_id THEN
                RETURN QUERY SELECT NULL::name, format('handler %s is not the handler of trigger %s', p_script_id, p_trigger_id);
                RETURN;
            END IF;
            RETURN QUERY SELECT v_trigger_principal, picloud._principal_problem(p_app_id, v_trigger_principal);
            RETURN;
        END IF;
        -- The trigger was dropped after the event was enqueued: the handler's registrant runs it.
    END IF;
    RETURN QUERY SELECT v_script_principal, picloud._principal_problem(p_app_id, v_script_principal);
END
$$;

-- What a claim answers for each row it claimed: the event, its handler (kind, target - the
-- function for sql, the URL or command name otherwise - and timeout, 30 s if the handler is
-- gone) and the principal it runs as, or why it cannot run. Shared by picloud_claim and
-- picloud_claim_events.
CREATE FUNCTION picloud._claim_answers(p_claimed picloud.outbox[])
RETURNS TABLE (
    app_id uuid, event_id uuid, source text, op text, trigger_id uuid, script_id uuid,
    payload jsonb, depth integer, attempt_count integer, reply_to text,
    handler_kind text, handler_target text, timeout_ms integer,
    principal name, principal_error text)
LANGUAGE sql STABLE AS $$
    SELECT c.app_id, c.event_id, c.source, c.op, c.trigger_id, c.script_id, c.payload, c.depth,
           c.attempt_count, c.reply_to, s.kind,
           CASE WHEN s.kind = 'sql' THEN s.sql_function::text ELSE s.target END,
           coalesce(s.timeout_ms, 30000),
           h.principal,
           h.problem
    FROM unnest(p_claimed) AS c
    LEFT JOIN picloud.scripts s ON s.app_id = c.app_id AND s.script_id = c.script_id
    CROSS JOIN LATERAL picloud._handler_principal(c.app_id, c.trigger_id, c.script_id) h
$$;

-- Claims up to p_batch due events for p_worker under a lease of p_lease_ms and returns each
-- with its handler and the principal it runs as.
--
-- Which events, fairly between apps (README, "Fairness between apps"):
--   1. one event of each app that has a due one (round robin, starting from a random app, at
--      most p_batch apps), the app's oldest by enqueue order (event_id) among its first 64
--      rows: an app cannot jump the queue by backdating run_at, nor hide another app's events
--      behind a backlog of its own;
--   2. then the oldest due events by due time, to fill the batch.
-- With p_app_cap, an app that already has p_app_cap events claimed by p_worker gets no more
-- from it, and one claim gives an app at most what is left of its cap: one app's slow handlers
-- cannot hold every executor of a supervisor. (Per worker, not in total: the cap is a share of
-- one supervisor's executors, and adding supervisors adds capacity for every app.)
-- With p_leave_sql_lane a supervisor that runs SQL lanes (sql/035_sql_lane.sql) leaves the
-- lanes their events - first attempts of asynchronous events with a sql handler - and looks at
-- no more than the oldest p_batch * 4 + 100 due rows in step 2, so a backlog of lane events
-- costs it a bounded scan.
CREATE FUNCTION picloud.picloud_claim(
    p_worker text, p_batch integer, p_lease_ms integer, p_leave_sql_lane boolean DEFAULT false,
    p_app_cap integer DEFAULT NULL)
RETURNS TABLE (
    app_id uuid, event_id uuid, source text, op text, trigger_id uuid, script_id uuid,
    payload jsonb, depth integer, attempt_count integer, reply_to text,
    handler_kind text, handler_target text, timeout_ms integer,
    principal name, principal_error text)
LANGUAGE plpgsql AS $$
DECLARE
    v_claimed integer;
    v_running_apps uuid[] := '{}';
    v_running_counts integer[] := '{}';
    v_start uuid := gen_random_uuid();
BEGIN
    IF p_worker IS NULL OR p_batch IS NULL OR p_lease_ms IS NULL OR p_leave_sql_lane IS NULL THEN
        PERFORM picloud._null_argument('{worker,batch,lease_ms,leave_sql_lane}',
            ARRAY[p_worker IS NULL, p_batch IS NULL, p_lease_ms IS NULL, p_leave_sql_lane IS NULL]);
    END IF;
    IF length(p_worker) NOT BETWEEN 1 AND 200 THEN
        PERFORM picloud._invalid('worker name must be 1 to 200 characters long');
    END IF;
    IF p_batch NOT BETWEEN 1 AND 10000 THEN
        PERFORM picloud._invalid(format('batch must be between 1 and 10000, got %s', p_batch));
    END IF;
    IF p_lease_ms NOT BETWEEN 100 AND 86400000 THEN
        PERFORM picloud._invalid(format('lease_ms must be between 100 and 86400000, got %s', p_lease_ms));
    END IF;
    IF p_app_cap IS NOT NULL AND p_app_cap NOT BETWEEN 1 AND 100000 THEN
        PERFORM picloud._invalid(format('app_cap must be between 1 and 100000, got %s', p_app_cap));
    END IF;
    -- A claim need not wait for its WAL to reach disk: if a crash loses it, the rows are
    -- simply unclaimed again, and the supervisor that made it lost its connection anyway. This
    -- takes a disk flush off the path from enqueue to handler. (It applies to the rest of the
    -- caller's transaction, which for the supervisor is this statement alone.)
    PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);
    IF p_app_cap IS NOT NULL THEN
        -- What runs now, per app: the claimed rows, a few per running handler.
        SELECT coalesce(array_agg(r.app_id), '{}'), coalesce(array_agg(r.n), '{}')
        INTO v_running_apps, v_running_counts
        FROM (SELECT o.app_id, count(*)::integer AS n FROM picloud.outbox o
              WHERE o.claimed_by = p_worker GROUP BY o.app_id) r;
    END IF;
    RETURN QUERY
    WITH RECURSIVE apps (app_id, first_app, n) AS (
        -- Apps with rows in the outbox, from a random one on, wrapping around: one index probe
        -- of outbox_pkey each.
        SELECT s.app_id, s.app_id, 1
        FROM (SELECT coalesce(
                  (SELECT o.app_id FROM picloud.outbox o WHERE o.app_id > v_start ORDER BY o.app_id LIMIT 1),
                  (SELECT o.app_id FROM picloud.outbox o ORDER BY o.app_id LIMIT 1)) AS app_id) s
        WHERE s.app_id IS NOT NULL
        UNION ALL
        SELECT nxt.app_id, a.first_app, a.n + 1
        FROM apps a
        CROSS JOIN LATERAL (SELECT coalesce(
                  (SELECT o.app_id FROM picloud.outbox o WHERE o.app_id > a.app_id ORDER BY o.app_id LIMIT 1),
                  (SELECT o.app_id FROM picloud.outbox o ORDER BY o.app_id LIMIT 1)) AS app_id) nxt
        WHERE a.n < p_batch AND nxt.app_id <> a.first_app
    ), room AS (
        -- How many more events each app may have claimed (NULL: no cap).
        SELECT a.app_id,
               p_app_cap - coalesce(v_running_counts[array_position(v_running_apps, a.app_id)], 0) AS left_
        FROM apps a
    ), heads AS (
        -- Each app's oldest claimable event by enqueue order, among its first 64 rows.
        SELECT h.app_id, h.event_id, h.due_at
        FROM room r
        CROSS JOIN LATERAL (
            SELECT w.app_id, w.event_id, w.due_at
            FROM (SELECT o.app_id, o.event_id, o.due_at, o.claimed_by, o.attempt_count,
                         o.first_attempt_at, o.reply_to, o.script_id
                  FROM picloud.outbox o WHERE o.app_id = r.app_id ORDER BY o.event_id LIMIT 64) w
            WHERE w.claimed_by IS NULL AND w.due_at <= now()
              AND NOT (p_leave_sql_lane AND w.attempt_count = 0 AND w.first_attempt_at IS NULL AND w.reply_to IS NULL
                       AND coalesce((SELECT s.kind FROM picloud.scripts s
                                     WHERE s.app_id = w.app_id AND s.script_id = w.script_id) = 'sql',
                                    false))
            ORDER BY w.event_id
            LIMIT 1) h
        WHERE r.left_ IS NULL OR r.left_ > 0
    ), locked_heads AS (
        SELECT o.app_id, o.event_id, o.due_at
        FROM picloud.outbox o JOIN heads h ON o.app_id = h.app_id AND o.event_id = h.event_id
        WHERE o.claimed_by IS NULL AND o.due_at <= now()
        FOR UPDATE OF o SKIP LOCKED
    ), fill AS (
        -- The oldest due rows by due time, for the rest of the batch: one index scan, which
        -- passes over rows other claimers hold.
        SELECT o.app_id, o.event_id, o.due_at
        FROM picloud.outbox o
        WHERE o.claimed_by IS NULL AND o.due_at <= now()
          AND NOT (p_app_cap IS NOT NULL AND o.app_id = ANY (v_running_apps)
                   AND v_running_counts[array_position(v_running_apps, o.app_id)] >= p_app_cap)
          AND NOT (p_leave_sql_lane AND o.attempt_count = 0 AND o.first_attempt_at IS NULL AND o.reply_to IS NULL
                   AND coalesce((SELECT s.kind FROM picloud.scripts s
                                 WHERE s.app_id = o.app_id AND s.script_id = o.script_id) = 'sql',
                                false))
          AND NOT EXISTS (SELECT 1 FROM locked_heads l WHERE l.app_id = o.app_id AND l.event_id = o.event_id)
          -- With p_leave_sql_lane, a bounded look: at most the oldest p_batch * 4 + 100 due rows.
          AND (NOT p_leave_sql_lane OR o.due_at <= coalesce(
                (SELECT w.due_at FROM picloud.outbox w
                 WHERE w.claimed_by IS NULL AND w.due_at <= now()
                 ORDER BY w.due_at OFFSET p_batch * 4 + 100 LIMIT 1),
                'infinity'))
        ORDER BY o.due_at
        LIMIT p_batch
        FOR UPDATE OF o SKIP LOCKED
    ), ranked AS (
        -- Within its cap, each app's rows in order: its head first, then by due time.
        SELECT c.app_id, c.event_id, c.rank_, c.due_at,
               row_number() OVER (PARTITION BY c.app_id ORDER BY c.rank_, c.due_at, c.event_id) AS nth
        FROM (SELECT l.app_id, l.event_id, 0 AS rank_, l.due_at FROM locked_heads l
              UNION ALL
              SELECT f.app_id, f.event_id, 1, f.due_at FROM fill f) c
    ), due AS (
        SELECT k.app_id, k.event_id
        FROM ranked k
        WHERE p_app_cap IS NULL
           OR k.nth <= p_app_cap - coalesce(v_running_counts[array_position(v_running_apps, k.app_id)], 0)
        ORDER BY k.rank_, k.due_at
        LIMIT p_batch
    ), claimed AS (
        UPDATE picloud.outbox o
        SET claimed_by = p_worker,
            lease_expires_at = now() + make_interval(secs => p_lease_ms / 1000.0),
            attempt_count = o.attempt_count + 1,
            first_attempt_at = coalesce(o.first_attempt_at, now()),
            last_attempt_at = now()
        FROM due
        WHERE o.app_id = due.app_id AND o.event_id = due.event_id
        RETURNING o.*
    )
    SELECT a.* FROM picloud._claim_answers(ARRAY(SELECT c::picloud.outbox FROM claimed c)) a;
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    PERFORM picloud._note_claim(v_claimed);
END
$$;

-- The event as a handler sees it.
-- When the next unclaimed event becomes due (NULL when none is waiting). An idle supervisor
-- sleeps until then rather than a whole poll interval, so retries and events scheduled with
-- run_at start on time: no notification announces them. One probe of outbox_due_idx.
CREATE FUNCTION picloud.picloud_next_due_at() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(o.due_at) FROM picloud.outbox o WHERE o.claimed_by IS NULL
$$;

-- The JSON document a handler receives for an event: event_id, app_id, source, op, payload,
-- depth, attempt, trigger_id, script_id. Built in Rust (api/event_json.rs) because
-- jsonb_build_object looks up each argument's type on every call, which was the largest
-- per-event cost of a sql lane batch; the document is the same (internal).
CREATE FUNCTION picloud._event_jsonb(
    p_event_id uuid, p_app_id uuid, p_source text, p_op text, p_payload jsonb,
    p_depth integer, p_attempt integer, p_trigger_id uuid, p_script_id uuid)
RETURNS jsonb
LANGUAGE c IMMUTABLE PARALLEL SAFE
AS 'MODULE_PATHNAME', 'picloud_event_jsonb';

CREATE FUNCTION picloud._event_json(r picloud.outbox) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT picloud._event_jsonb(r.event_id, r.app_id, r.source, r.op, r.payload, r.depth,
                                r.attempt_count, r.trigger_id, r.script_id)
$$;

CREATE FUNCTION picloud._lease_lost(p_app_id uuid, p_event_id uuid, p_worker text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'worker "%" no longer holds the lease on event % of app %', p_worker, p_event_id, p_app_id
        USING ERRCODE = 'PC002',
              HINT = 'The lease expired and the event was returned to the queue or claimed by another worker.';
END
$$;

-- Locks a claimed outbox row for its worker; PC002 if the worker no longer holds it.
CREATE FUNCTION picloud._lock_claimed(p_app_id uuid, p_event_id uuid, p_worker text) RETURNS picloud.outbox
LANGUAGE plpgsql AS $$
DECLARE
    r picloud.outbox;
BEGIN
    IF p_app_id IS NULL OR p_event_id IS NULL OR p_worker IS NULL THEN
        PERFORM picloud._null_argument('{app_id,event_id,worker}',
            ARRAY[p_app_id IS NULL, p_event_id IS NULL, p_worker IS NULL]);
    END IF;
    SELECT * INTO r FROM picloud.outbox o
    WHERE o.app_id = p_app_id AND o.event_id = p_event_id FOR UPDATE;
    IF NOT FOUND OR r.claimed_by IS DISTINCT FROM p_worker THEN
        PERFORM picloud._lease_lost(p_app_id, p_event_id, p_worker);
    END IF;
    RETURN r;
END
$$;

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

-- Completes a claimed event whose handler ran outside the database (http, command).
CREATE FUNCTION picloud.picloud_complete(p_app_id uuid, p_event_id uuid, p_worker text, p_result jsonb DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r picloud.outbox;
BEGIN
    IF p_app_id IS NULL OR p_event_id IS NULL OR p_worker IS NULL THEN
        PERFORM picloud._null_argument('{app_id,event_id,worker}',
            ARRAY[p_app_id IS NULL, p_event_id IS NULL, p_worker IS NULL]);
    END IF;
    DELETE FROM picloud.outbox o
    WHERE o.app_id = p_app_id AND o.event_id = p_event_id AND o.claimed_by = p_worker
    RETURNING * INTO r;
    IF NOT FOUND THEN
        PERFORM picloud._lease_lost(p_app_id, p_event_id, p_worker);
    END IF;
    PERFORM picloud._count_outcome(r.app_id, r.source, 1, 0, 0);
    IF r.reply_to IS NOT NULL THEN
        PERFORM picloud._reply(r, true, p_result, NULL);
    END IF;
END
$$;

-- Settles a failed attempt of a locked outbox row: reschedule after p_delay, or - after the
-- last attempt, or at once for a synchronous event - move it to the dead letters.
CREATE FUNCTION picloud._settle_failure(r picloud.outbox, p_error text, p_delay interval,
                                        p_not_before timestamptz DEFAULT NULL)
RETURNS TABLE (outcome text, next_due_at timestamptz, dead_letter_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
    v_error text := left(coalesce(p_error, 'unknown error'), 4000);
    v_due timestamptz;
    v_dead_letter_id uuid;
BEGIN
    IF r.reply_to IS NOT NULL
       OR r.attempt_count >= current_setting('picloud.retry_max_attempts')::integer THEN
        v_dead_letter_id := picloud._dead_letter(r, v_error);
        PERFORM picloud._count_outcome(r.app_id, r.source, 0, 1, 1);
        IF r.reply_to IS NOT NULL THEN
            PERFORM picloud._reply(r, false, NULL, v_error);
        END IF;
        RETURN QUERY SELECT 'dead_letter'::text, NULL::timestamptz, v_dead_letter_id;
        RETURN;
    END IF;
    PERFORM picloud._count_outcome(r.app_id, r.source, 0, 1, 0);
    -- A server that asked to be left alone until p_not_before (HTTP Retry-After) gets that.
    v_due := greatest(now() + p_delay, p_not_before);
    UPDATE picloud.outbox o
    SET claimed_by = NULL, lease_expires_at = NULL, due_at = v_due, last_error = v_error
    WHERE o.app_id = r.app_id AND o.event_id = r.event_id;
    RETURN QUERY SELECT 'retry'::text, v_due, NULL::uuid;
END
$$;

-- Reports a failed attempt. Returns 'retry' with the next due time, or 'dead_letter' with
-- the new dead letter's id. p_retry_at, when given, is the earliest time the next attempt may
-- run (what an HTTP server asked for with Retry-After); the retry policy's own delay applies
-- when it is later.
CREATE FUNCTION picloud.picloud_fail(p_app_id uuid, p_event_id uuid, p_worker text, p_error text,
                                     p_retry_at timestamptz DEFAULT NULL)
RETURNS TABLE (outcome text, next_due_at timestamptz, dead_letter_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
    r picloud.outbox;
BEGIN
    IF p_retry_at IS NOT NULL THEN
        PERFORM picloud._check_run_at(p_retry_at);
    END IF;
    r := picloud._lock_claimed(p_app_id, p_event_id, p_worker);
    RETURN QUERY SELECT * FROM picloud._settle_failure(r, p_error,
        picloud.picloud_retry_delay(r.attempt_count), p_retry_at);
END
$$;

-- Extends the lease of a claimed event; false when the worker no longer holds it.
CREATE FUNCTION picloud.picloud_extend_lease(p_app_id uuid, p_event_id uuid, p_worker text, p_lease_ms integer)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_app_id IS NULL OR p_event_id IS NULL OR p_worker IS NULL OR p_lease_ms IS NULL THEN
        PERFORM picloud._null_argument('{app_id,event_id,worker,lease_ms}',
            ARRAY[p_app_id IS NULL, p_event_id IS NULL, p_worker IS NULL, p_lease_ms IS NULL]);
    END IF;
    IF p_lease_ms NOT BETWEEN 100 AND 86400000 THEN
        PERFORM picloud._invalid(format('lease_ms must be between 100 and 86400000, got %s', p_lease_ms));
    END IF;
    UPDATE picloud.outbox o
    SET lease_expires_at = now() + make_interval(secs => p_lease_ms / 1000.0)
    WHERE o.app_id = p_app_id AND o.event_id = p_event_id AND o.claimed_by = p_worker;
    RETURN FOUND;
END
$$;

-- Gives a claimed event back to the queue without counting the attempt (graceful shutdown).
CREATE FUNCTION picloud.picloud_release(p_app_id uuid, p_event_id uuid, p_worker text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE picloud.outbox o
    SET claimed_by = NULL, lease_expires_at = NULL, due_at = now(),
        attempt_count = greatest(o.attempt_count - 1, 0)
    WHERE o.app_id = p_app_id AND o.event_id = p_event_id AND o.claimed_by = p_worker;
    IF FOUND THEN
        PERFORM picloud._wake_at_commit();
    END IF;
    RETURN FOUND;
END
$$;

-- Pending events of an app (admins), soonest first.
CREATE FUNCTION picloud.picloud_list_outbox(p_app_id uuid, p_limit integer DEFAULT 50, p_offset integer DEFAULT 0)
RETURNS SETOF picloud.outbox
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    PERFORM picloud._check_page(p_limit, p_offset);
    RETURN QUERY SELECT * FROM picloud.outbox o WHERE o.app_id = p_app_id
    ORDER BY o.due_at, o.event_id LIMIT p_limit OFFSET p_offset;
END
$$;

CREATE FUNCTION picloud._check_page(p_limit integer, p_offset integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_limit IS NULL OR p_offset IS NULL THEN
        PERFORM picloud._null_argument('{limit,offset}', ARRAY[p_limit IS NULL, p_offset IS NULL]);
    END IF;
    IF p_limit NOT BETWEEN 0 AND 10000 THEN
        PERFORM picloud._invalid(format('limit must be between 0 and 10000, got %s', p_limit));
    END IF;
    IF p_offset < 0 THEN
        PERFORM picloud._invalid(format('offset must not be negative, got %s', p_offset));
    END IF;
END
$$;

-- Synchronous calls ----------------------------------------------------------------------------

-- Opens an inbox for synchronous calls into an app and returns its channel: LISTEN on it and
-- pass it as reply_to. The answer arrives as a notification with a JSON payload
-- {"event_id", "ok", "result", "error"}. The inbox lives until ttl passes or the session ends.
CREATE FUNCTION picloud.picloud_open_inbox(p_app_id uuid, p_ttl interval DEFAULT '60 seconds') RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_channel text := 'picloud_inbox_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
    PERFORM picloud._require(p_app_id, 'enqueue');
    IF p_ttl IS NULL OR p_ttl <= interval '0' OR p_ttl > interval '1 day' THEN
        PERFORM picloud._invalid(format('ttl must be positive and at most 1 day, got %s', p_ttl));
    END IF;
    INSERT INTO picloud.inboxes (app_id, channel, owner_pid, owner_started, expires_at)
    VALUES (p_app_id, v_channel, pg_catalog.pg_backend_pid(), picloud._my_backend_start(), now() + p_ttl);
    RETURN v_channel;
END
$$;

CREATE FUNCTION picloud.picloud_close_inbox(p_app_id uuid, p_channel text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require(p_app_id, 'enqueue');
    DELETE FROM picloud.inboxes WHERE app_id = p_app_id AND channel = p_channel;
    RETURN FOUND;
END
$$;

-- Delivers a synchronous event's answer to its caller's inbox, exactly once; if the inbox is
-- gone, expired or its session has ended, records an abandoned execution instead.
CREATE FUNCTION picloud._reply(r picloud.outbox, p_ok boolean, p_result jsonb, p_error text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_inbox picloud.inboxes;
    v_reason text;
    v_message text;
BEGIN
    SELECT * INTO v_inbox FROM picloud.inboxes i WHERE i.app_id = r.app_id AND i.channel = r.reply_to;
    IF NOT FOUND THEN
        v_reason := 'inbox does not exist';
    ELSIF v_inbox.expires_at <= now() THEN
        v_reason := 'inbox expired';
    -- Not pg_stat_activity: it hides other roles' sessions from the supervisor's role.
    ELSIF picloud._backend_started(v_inbox.owner_pid) IS DISTINCT FROM v_inbox.owner_started THEN
        v_reason := 'caller disconnected';
    END IF;
    IF v_reason IS NOT NULL THEN
        PERFORM picloud._record_abandoned(r, p_ok, p_result, p_error, v_reason);
        RETURN;
    END IF;
    v_message := jsonb_build_object('event_id', r.event_id, 'ok', p_ok, 'result', p_result, 'error', p_error)::text;
    -- A notification payload holds at most 8000 bytes.
    IF octet_length(v_message) > 7900 THEN
        v_message := jsonb_build_object('event_id', r.event_id, 'ok', false, 'result', NULL,
            'error', format('answer of %s bytes is too large for a notification', octet_length(v_message)))::text;
    END IF;
    PERFORM pg_catalog.pg_notify(r.reply_to, v_message);
END
$$;
