-- picloud 0.1.0 -> 0.2.0: the stats view and outcome counts, the dead-letter runbook views,
-- bulk dead-letter resolution with a dry run.
-- Frozen once released: later changes go in a new picloud--0.2.0--X.sql.
\echo Use "ALTER EXTENSION picloud UPDATE TO '0.2.0'" to load this file. \quit

-- The outbox's five row checks become one function call: Postgres prepares CHECK expressions
-- afresh for every INSERT statement, and the five cost an enqueue about a quarter of its time.
CREATE FUNCTION picloud._outbox_row_valid(
	"source" TEXT, /* & str */
	"op" TEXT, /* & str */
	"depth" INT, /* i32 */
	"attempt_count" INT, /* i32 */
	"unclaimed" bool, /* bool */
	"unleased" bool /* bool */
) RETURNS bool /* bool */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_outbox_row_valid_wrapper';
ALTER TABLE picloud.outbox
    DROP CONSTRAINT outbox_source_valid,
    DROP CONSTRAINT outbox_op_length,
    DROP CONSTRAINT outbox_depth_nonnegative,
    DROP CONSTRAINT outbox_attempt_count_nonnegative,
    DROP CONSTRAINT outbox_claim_has_lease,
    -- A known source, an op of 1 to 200 characters, depth and attempt count not negative, and a
    -- claim exactly when there is a lease: one call (see api/admission.rs for why).
    ADD CONSTRAINT outbox_row_valid CHECK (picloud._outbox_row_valid(
        source, op, depth, attempt_count, claimed_by IS NULL, lease_expires_at IS NULL));

-- Outcome counts for picloud.stats: how many events completed, failed an attempt or were
-- dead-lettered, per app, source and minute. One row per writing backend (backend_pid), so
-- concurrent supervisor connections never wait on each other's counter rows. Unlogged: the
-- counts are for watching a running system, cost no WAL, and are empty after a crash.
-- The housekeeper drops minutes older than a day.
CREATE UNLOGGED TABLE picloud.event_counts (
    app_id         uuid        NOT NULL,
    source         text        NOT NULL,
    minute         timestamptz NOT NULL,
    backend_pid    integer     NOT NULL,
    completed      bigint      NOT NULL DEFAULT 0,
    failed         bigint      NOT NULL DEFAULT 0,
    dead_lettered  bigint      NOT NULL DEFAULT 0,
    CONSTRAINT event_counts_pkey PRIMARY KEY (app_id, source, minute, backend_pid)
);
CREATE INDEX event_counts_minute_idx ON picloud.event_counts (minute);

-- One check of a resolution, shared by the single and the bulk resolution.
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

CREATE OR REPLACE FUNCTION picloud.picloud_resolve_dead_letter(p_app_id uuid, p_dead_letter_id uuid, p_resolution text)
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

-- What an operator reads and runs from psql: outcome counting, the stats view, the
-- dead-letter runbook views and bulk resolution with a dry run.
--
-- Every view is security_invoker: a tenant role sees only the apps it may manage (the
-- row-level security of the tables underneath applies to the caller, not to the view's owner).

-- Counts one outcome in picloud.event_counts (see there). Called where an event completes,
-- fails an attempt, or is dead-lettered; the row belongs to this backend, so the upsert never
-- waits on another session.
CREATE FUNCTION picloud._count_outcome(
    p_app_id uuid, p_source text, p_completed integer, p_failed integer, p_dead_lettered integer)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO picloud.event_counts AS c
        (app_id, source, minute, backend_pid, completed, failed, dead_lettered)
    VALUES (p_app_id, p_source, date_trunc('minute', now()), pg_backend_pid(),
            p_completed, p_failed, p_dead_lettered)
    ON CONFLICT ON CONSTRAINT event_counts_pkey DO UPDATE
    SET completed = c.completed + EXCLUDED.completed,
        failed = c.failed + EXCLUDED.failed,
        dead_lettered = c.dead_lettered + EXCLUDED.dead_lettered
$$;

-- Stats --------------------------------------------------------------------------------------

-- Per app and source: the queue right now and the outcomes of the last p_interval (counted in
-- whole minutes: from the start of the minute p_interval ago).
--   due        unclaimed and due now (waiting for a supervisor)
--   claimed    held by a supervisor under a lease
--   delayed    unclaimed and due later (scheduled with run_at, or waiting out a retry backoff)
--   retrying   unclaimed events that already failed at least once (due or delayed)
--   oldest_due_age  how long the oldest due event has waited past its due time
-- One pass over the outbox (a sequential scan: 24-31 ms per 100,000 pending events here),
-- the partial index of unresolved dead letters, and the counts of the interval.
CREATE FUNCTION picloud.picloud_stats(p_interval interval DEFAULT interval '5 minutes')
RETURNS TABLE (
    app_id uuid, app_name text, source text,
    due bigint, claimed bigint, delayed bigint, retrying bigint, oldest_due_age interval,
    dead_letters_unresolved bigint,
    completed bigint, failed bigint, dead_lettered bigint, counted_since timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_since timestamptz;
BEGIN
    IF p_interval IS NULL THEN PERFORM picloud._null_argument('{interval}', '{t}'); END IF;
    IF p_interval <= interval '0' OR p_interval > interval '1 day' THEN
        PERFORM picloud._invalid(format('interval %s is out of range', p_interval),
            'The interval is more than 0 and at most 1 day (outcome counts are kept for a day).');
    END IF;
    v_since := date_trunc('minute', now() - p_interval);
    RETURN QUERY
    WITH queue AS (
        SELECT o.app_id, o.source,
               count(*) FILTER (WHERE o.claimed_by IS NULL AND o.due_at <= now()) AS due,
               count(*) FILTER (WHERE o.claimed_by IS NOT NULL) AS claimed,
               count(*) FILTER (WHERE o.claimed_by IS NULL AND o.due_at > now()) AS delayed,
               count(*) FILTER (WHERE o.claimed_by IS NULL AND o.attempt_count > 0) AS retrying,
               now() - min(o.due_at) FILTER (WHERE o.claimed_by IS NULL AND o.due_at <= now()) AS oldest_due_age
        FROM picloud.outbox o
        GROUP BY o.app_id, o.source
    ), dead AS (
        SELECT d.app_id, d.source, count(*) AS unresolved
        FROM picloud.dead_letters d
        WHERE d.resolved_at IS NULL
        GROUP BY d.app_id, d.source
    ), counted AS (
        SELECT c.app_id, c.source, sum(c.completed)::bigint AS completed,
               sum(c.failed)::bigint AS failed, sum(c.dead_lettered)::bigint AS dead_lettered
        FROM picloud.event_counts c
        WHERE c.minute >= v_since
        GROUP BY c.app_id, c.source
    ), keys AS (
        SELECT q.app_id, q.source FROM queue q
        UNION SELECT d.app_id, d.source FROM dead d
        UNION SELECT c.app_id, c.source FROM counted c
    )
    SELECT k.app_id, a.name, k.source,
           coalesce(q.due, 0), coalesce(q.claimed, 0), coalesce(q.delayed, 0), coalesce(q.retrying, 0),
           q.oldest_due_age,
           coalesce(d.unresolved, 0),
           coalesce(c.completed, 0), coalesce(c.failed, 0), coalesce(c.dead_lettered, 0),
           v_since
    FROM keys k
    JOIN picloud.apps a ON a.app_id = k.app_id
    LEFT JOIN queue q ON q.app_id = k.app_id AND q.source = k.source
    LEFT JOIN dead d ON d.app_id = k.app_id AND d.source = k.source
    LEFT JOIN counted c ON c.app_id = k.app_id AND c.source = k.source
    ORDER BY a.name, k.app_id, k.source;
END
$$;

CREATE VIEW picloud.stats WITH (security_invoker = true) AS
    SELECT * FROM picloud.picloud_stats();

-- The dead-letter runbook ---------------------------------------------------------------------

-- An error's first line without the ids that make every occurrence unique, so the same failure
-- groups together.
CREATE FUNCTION picloud.picloud_error_class(p_error text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT left(regexp_replace(split_part(coalesce(p_error, ''), E'\n', 1),
                '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<id>', 'gi'), 200)
$$;

-- Per app: how many dead letters wait for an operator, since when, and the latest error.
CREATE VIEW picloud.dead_letter_summary WITH (security_invoker = true) AS
    SELECT a.app_id,
           a.name AS app_name,
           count(*) AS unresolved,
           min(d.created_at) AS oldest_at,
           now() - min(d.created_at) AS oldest_age,
           max(d.created_at) AS newest_at,
           (array_agg(d.last_error ORDER BY d.created_at DESC, d.dead_letter_id))[1] AS last_error
    FROM picloud.dead_letters d
    JOIN picloud.apps a ON a.app_id = d.app_id
    WHERE d.resolved_at IS NULL
    GROUP BY a.app_id, a.name;

-- The most frequent failures: dead letters grouped by app and error class (order by
-- unresolved DESC to see the worst first).
-- SELECT * FROM picloud.dead_letter_errors ORDER BY unresolved DESC LIMIT 10;
CREATE VIEW picloud.dead_letter_errors WITH (security_invoker = true) AS
    SELECT a.app_id,
           a.name AS app_name,
           picloud.picloud_error_class(d.last_error) AS error_class,
           count(*) FILTER (WHERE d.resolved_at IS NULL) AS unresolved,
           count(*) AS total,
           min(d.created_at) AS first_at,
           max(d.created_at) AS last_at,
           (array_agg(d.dead_letter_id ORDER BY d.created_at DESC, d.dead_letter_id))[1] AS latest_dead_letter_id
    FROM picloud.dead_letters d
    JOIN picloud.apps a ON a.app_id = d.app_id
    GROUP BY a.app_id, a.name, picloud.picloud_error_class(d.last_error);

-- What each trigger (and, for directly enqueued events, each handler) has dead-lettered.
CREATE VIEW picloud.dead_letters_by_trigger WITH (security_invoker = true) AS
    SELECT a.app_id,
           a.name AS app_name,
           d.trigger_id,
           t.kind AS trigger_kind,
           coalesce(k.collection_pattern,
                    CASE WHEN t.kind = 'dead_letter' THEN 'dead letters' END) AS pattern,
           d.script_id,
           s.name AS script_name,
           count(*) FILTER (WHERE d.resolved_at IS NULL) AS unresolved,
           count(*) AS total,
           min(d.created_at) FILTER (WHERE d.resolved_at IS NULL) AS oldest_unresolved_at,
           max(d.created_at) AS last_at,
           (array_agg(d.last_error ORDER BY d.created_at DESC, d.dead_letter_id))[1] AS last_error
    FROM picloud.dead_letters d
    JOIN picloud.apps a ON a.app_id = d.app_id
    LEFT JOIN picloud.triggers t ON t.app_id = d.app_id AND t.trigger_id = d.trigger_id
    LEFT JOIN picloud.kv_trigger_details k ON k.app_id = d.app_id AND k.trigger_id = d.trigger_id
    LEFT JOIN picloud.scripts s ON s.app_id = d.app_id AND s.script_id = d.script_id
    GROUP BY a.app_id, a.name, d.trigger_id, t.kind, k.collection_pattern, d.script_id, s.name;

-- Resolves every unresolved dead letter of an app that matches all the given filters (NULL =
-- any): p_resolution 'replayed' re-enqueues each with fresh attempts; the other three only
-- mark them. Returns one row per dead letter with what was done, or with p_dry_run what would
-- be done: a dry run changes and locks nothing. Rows another session is resolving right now
-- are skipped. p_limit caps how many are taken, oldest first.
CREATE FUNCTION picloud.picloud_resolve_dead_letters(
    p_app_id uuid,
    p_resolution text,
    p_source text DEFAULT NULL,
    p_script_id uuid DEFAULT NULL,
    p_trigger_id uuid DEFAULT NULL,
    p_error_contains text DEFAULT NULL,
    p_created_before timestamptz DEFAULT NULL,
    p_limit integer DEFAULT NULL,
    p_dry_run boolean DEFAULT false)
RETURNS TABLE (
    dead_letter_id uuid, source text, op text, script_id uuid, trigger_id uuid,
    created_at timestamptz, last_error text, resolution text, applied boolean, replay_event_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
    d picloud.dead_letters;
    v_count integer := 0;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    -- A mistyped app id must not look like "nothing to resolve".
    IF NOT EXISTS (SELECT 1 FROM picloud.apps a WHERE a.app_id = p_app_id) THEN
        RAISE EXCEPTION 'app % does not exist', p_app_id USING ERRCODE = 'P0002';
    END IF;
    IF p_resolution IS NULL OR p_dry_run IS NULL THEN
        PERFORM picloud._null_argument('{resolution,dry_run}', ARRAY[p_resolution IS NULL, p_dry_run IS NULL]);
    END IF;
    PERFORM picloud._check_resolution(p_resolution);
    IF p_limit IS NOT NULL AND (p_limit < 1 OR p_limit > 1000000) THEN
        PERFORM picloud._invalid(format('limit %s is out of range', p_limit), 'The limit is between 1 and 1000000, or NULL for all.');
    END IF;
    IF p_error_contains = '' THEN
        PERFORM picloud._invalid('error_contains must not be empty', 'Pass NULL to match any error.');
    END IF;
    FOR d IN
        SELECT * FROM picloud.dead_letters x
        WHERE x.app_id = p_app_id AND x.resolved_at IS NULL
          AND (p_source IS NULL OR x.source = p_source)
          AND (p_script_id IS NULL OR x.script_id = p_script_id)
          AND (p_trigger_id IS NULL OR x.trigger_id = p_trigger_id)
          AND (p_error_contains IS NULL OR strpos(x.last_error, p_error_contains) > 0)
          AND (p_created_before IS NULL OR x.created_at < p_created_before)
        ORDER BY x.created_at, x.dead_letter_id
        LIMIT p_limit
    LOOP
        -- Lock each row only when acting on it; a row resolved meanwhile is skipped.
        IF NOT p_dry_run THEN
            PERFORM 1 FROM picloud.dead_letters x
            WHERE x.app_id = d.app_id AND x.dead_letter_id = d.dead_letter_id AND x.resolved_at IS NULL
            FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
        END IF;
        dead_letter_id := d.dead_letter_id;
        source := d.source;
        op := d.op;
        script_id := d.script_id;
        trigger_id := d.trigger_id;
        created_at := d.created_at;
        last_error := d.last_error;
        resolution := p_resolution;
        applied := NOT p_dry_run;
        replay_event_id := NULL;
        IF p_resolution = 'replayed' AND d.script_id IS NULL THEN
            PERFORM picloud._invalid(format('dead letter %s has no handler to replay', d.dead_letter_id),
                'Resolve it with another resolution, or narrow the filters.');
        END IF;
        IF NOT p_dry_run THEN
            IF p_resolution = 'replayed' THEN
                replay_event_id := picloud._replay(d);
            ELSE
                UPDATE picloud.dead_letters x
                SET resolution = p_resolution, resolved_at = now(), resolved_by = current_user
                WHERE x.app_id = d.app_id AND x.dead_letter_id = d.dead_letter_id;
            END IF;
        END IF;
        v_count := v_count + 1;
        RETURN NEXT;
    END LOOP;
    IF p_dry_run THEN
        RAISE NOTICE 'dry run: % dead letter(s) would be resolved as %; nothing changed', v_count, p_resolution;
    ELSE
        RAISE NOTICE '% dead letter(s) resolved as %', v_count, p_resolution;
    END IF;
END
$$;

-- Waits until the app has no event running and none due before the deadline (now +
-- p_timeout); true when that happened, false on timeout. For scripts, tests and the README
-- tour: "enqueue, wait, look". Each check sees the latest commits (a new snapshot per
-- statement), but the call holds one transaction open while it waits, so keep it short.
CREATE FUNCTION picloud.picloud_wait_idle(p_app_id uuid, p_timeout interval DEFAULT interval '30 seconds')
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_deadline timestamptz;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_dead_letters');
    IF p_timeout IS NULL THEN PERFORM picloud._null_argument('{timeout}', '{t}'); END IF;
    IF p_timeout < interval '0' OR p_timeout > interval '1 hour' THEN
        PERFORM picloud._invalid(format('timeout %s is out of range', p_timeout), 'The timeout is between 0 and 1 hour.');
    END IF;
    v_deadline := clock_timestamp() + p_timeout;
    LOOP
        IF NOT EXISTS (
            SELECT 1 FROM picloud.outbox o
            WHERE o.app_id = p_app_id AND (o.claimed_by IS NOT NULL OR o.due_at <= v_deadline)
        ) THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_catalog.pg_sleep(0.02);
    END LOOP;
END
$$;

-- Completions, failed attempts and dead-lettering now count their outcome.
-- One statement for the common enqueue.
CREATE OR REPLACE FUNCTION picloud.picloud_enqueue(
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
LANGUAGE plpgsql AS $$
DECLARE
    v_event_id uuid := picloud._new_event_id();
    v_existing uuid;
    v_script_id uuid := p_script_id;
    v_depth integer;
    v_wake_pending boolean;
BEGIN
    -- This is the hottest path: each check below is a plain expression that PL/pgSQL
    -- evaluates without running a query, and the helper that raises the precise error is
    -- called only when a check fails.
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
    v_depth := picloud._admit(pg_catalog.pg_column_size(p_payload), p_depth);
    IF v_depth < 0 THEN
        PERFORM picloud._check_payload(p_payload);
        v_depth := picloud._event_depth(p_depth);
    END IF;
    -- The common case in one statement: a handler given directly, no inbox, no idempotency
    -- key. The handler check is the INSERT's own join, so it costs no query of its own.
    IF p_trigger_id IS NULL AND p_script_id IS NOT NULL AND p_reply_to IS NULL
       AND p_idempotency_key IS NULL THEN
        INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth, due_at, reply_to)
        SELECT p_app_id, v_event_id, p_source, p_op, NULL, s.script_id, p_payload, v_depth,
               coalesce(p_run_at, now()), NULL
        FROM picloud.scripts s WHERE s.app_id = p_app_id AND s.script_id = p_script_id;
        IF NOT FOUND THEN
            PERFORM picloud._require_app(p_app_id);
            PERFORM picloud._require_script(p_app_id, p_script_id);
            RAISE EXCEPTION 'handler % does not exist in app %', p_script_id, p_app_id USING ERRCODE = 'P0002';
        END IF;
        v_wake_pending := picloud._wake_at_commit();
        RETURN v_event_id;
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

CREATE OR REPLACE FUNCTION picloud.picloud_run_sql_handler(p_app_id uuid, p_event_id uuid, p_worker text) RETURNS jsonb
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
    v_call := format('SELECT %s($1)::text', v_function::oid::regproc);
    -- From here until _unbecome this code runs with the principal's rights only.
    v_token := picloud._become(v_principal, r.depth);
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

CREATE OR REPLACE FUNCTION picloud.picloud_complete(p_app_id uuid, p_event_id uuid, p_worker text, p_result jsonb DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION picloud._settle_failure(r picloud.outbox, p_error text, p_delay interval)
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
    v_due := now() + p_delay;
    UPDATE picloud.outbox o
    SET claimed_by = NULL, lease_expires_at = NULL, due_at = v_due, last_error = v_error
    WHERE o.app_id = r.app_id AND o.event_id = r.event_id;
    RETURN QUERY SELECT 'retry'::text, v_due, NULL::uuid;
END
$$;

-- Whether an inbox's caller is still connected is read from the backend status table, not
-- pg_stat_activity, which hides other roles' sessions from the supervisor's role.
CREATE FUNCTION picloud._backend_started(
	"pid" INT /* i32 */
) RETURNS timestamp with time zone /* Option < TimestampWithTimeZone > */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_backend_started_wrapper';
CREATE FUNCTION picloud._my_backend_start() RETURNS timestamp with time zone /* Option < TimestampWithTimeZone > */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_my_backend_start_wrapper';
CREATE OR REPLACE FUNCTION picloud.picloud_open_inbox(p_app_id uuid, p_ttl interval DEFAULT '60 seconds') RETURNS text
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

CREATE OR REPLACE FUNCTION picloud._reply(r picloud.outbox, p_ok boolean, p_result jsonb, p_error text) RETURNS void
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

CREATE OR REPLACE FUNCTION picloud.picloud_extend_lease(p_app_id uuid, p_event_id uuid, p_worker text, p_lease_ms integer)
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

-- An idle supervisor sleeps until the next event is due.
CREATE FUNCTION picloud.picloud_next_due_at() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(o.due_at) FROM picloud.outbox o WHERE o.claimed_by IS NULL
$$;

-- SQL lanes: first attempts of sql-handler events run set-based, without claims; a
-- supervisor running lanes leaves them those events when it claims.
DROP FUNCTION picloud.picloud_claim(text, integer, integer);
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

-- Claims up to p_batch due events for p_worker under a lease of p_lease_ms, oldest first, and
-- returns each with its handler and the principal it runs as. With p_leave_sql_lane a
-- supervisor that runs SQL lanes (sql/035_sql_lane.sql) leaves the lanes their events - first
-- attempts of asynchronous events with a sql handler - and looks at no more than the oldest
-- p_batch * 4 + 100 due rows, so a backlog of lane events costs it a bounded scan.
CREATE FUNCTION picloud.picloud_claim(
    p_worker text, p_batch integer, p_lease_ms integer, p_leave_sql_lane boolean DEFAULT false)
RETURNS TABLE (
    app_id uuid, event_id uuid, source text, op text, trigger_id uuid, script_id uuid,
    payload jsonb, depth integer, attempt_count integer, reply_to text,
    handler_kind text, handler_target text, timeout_ms integer,
    principal name, principal_error text)
LANGUAGE plpgsql AS $$
DECLARE
    v_claimed integer;
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
    -- A claim need not wait for its WAL to reach disk: if a crash loses it, the rows are
    -- simply unclaimed again, and the supervisor that made it lost its connection anyway. This
    -- takes a disk flush off the path from enqueue to handler. (It applies to the rest of the
    -- caller's transaction, which for the supervisor is this statement alone.)
    PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH due AS (
        SELECT o.app_id, o.event_id
        FROM picloud.outbox o
        WHERE NOT p_leave_sql_lane AND o.claimed_by IS NULL AND o.due_at <= now()
        ORDER BY o.due_at
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ), due_outside_lane AS (
        -- The window ends at the due time of its last row (one short index scan).
        SELECT o.app_id, o.event_id
        FROM picloud.outbox o
        WHERE p_leave_sql_lane AND o.claimed_by IS NULL AND o.due_at <= now()
          AND o.due_at <= coalesce(
                (SELECT w.due_at FROM picloud.outbox w
                 WHERE w.claimed_by IS NULL AND w.due_at <= now()
                 ORDER BY w.due_at OFFSET p_batch * 4 + 100 LIMIT 1),
                'infinity')
          AND NOT (o.attempt_count = 0 AND o.reply_to IS NULL
                   AND (SELECT s.kind FROM picloud.scripts s
                        WHERE s.app_id = o.app_id AND s.script_id = o.script_id) = 'sql')
        ORDER BY o.due_at
        LIMIT p_batch
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE picloud.outbox o
        SET claimed_by = p_worker,
            lease_expires_at = now() + make_interval(secs => p_lease_ms / 1000.0),
            attempt_count = o.attempt_count + 1,
            first_attempt_at = coalesce(o.first_attempt_at, now()),
            last_attempt_at = now()
        FROM (SELECT * FROM due UNION ALL SELECT * FROM due_outside_lane) AS due
        WHERE o.app_id = due.app_id AND o.event_id = due.event_id
        RETURNING o.*
    )
    SELECT a.* FROM picloud._claim_answers(ARRAY(SELECT c::picloud.outbox FROM claimed c)) a;
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    PERFORM picloud._note_claim(v_claimed);
END
$$;

-- The SQL lane: first attempts of SQL-handler events run set-based, without a claim.
--
-- A claim writes every row twice (the claim, then the completion). For an event whose handler
-- runs inside this database none of that is needed on the happy path: the supervisor locks a
-- batch of ready rows in a transaction (FOR UPDATE SKIP LOCKED: other supervisors and the
-- housekeeper pass them by), runs their handlers, grouped by handler and principal, with one
-- statement per group, deletes the rows, and commits. Handler writes and completions commit
-- together, so SQL handlers still take effect exactly once.
--
-- Anything unusual leaves the lane. A group whose statement fails is run again event by event,
-- each in a savepoint, and the events that fail by themselves are left out: the rest commit,
-- and the supervisor claims the left-out ones with picloud_claim_events and runs them the
-- ordinary way - attempts counted, retries and dead letters as usual. A batch that fails as a
-- whole (its statement timeout, a lost connection) is rolled back and all its events go that
-- way. Only first attempts of asynchronous events with a sql handler enter the lane; retries
-- and synchronous calls never do.

-- Locks up to p_batch events that may run in the lane, oldest first, in the caller's
-- transaction, and returns them with their row address (valid while the lock is held: the
-- lane never updates a locked row) and their handler's timeout.
CREATE FUNCTION picloud.picloud_lock_sql_lane(p_batch integer)
RETURNS TABLE (app_id uuid, event_id uuid, row_tid tid, timeout_ms integer)
LANGUAGE plpgsql
-- A backlog makes the planner's estimates large enough to JIT-compile this small query,
-- which costs more than running it.
SET jit = off
AS $$
DECLARE
    v_locked integer;
BEGIN
    IF p_batch IS NULL THEN PERFORM picloud._null_argument('{batch}', '{t}'); END IF;
    IF p_batch NOT BETWEEN 1 AND 10000 THEN
        PERFORM picloud._invalid(format('batch must be between 1 and 10000, got %s', p_batch));
    END IF;
    -- The same index-ordered scan as picloud_claim (outbox_due_idx); the handler is looked up
    -- per row so the plan cannot turn into a join that sorts the whole backlog. The scan passes
    -- over other events to find lane events wherever they are in the queue; a lane that finds
    -- none waits longer and longer before looking again (see supervisor/src/lane.rs).
    RETURN QUERY
    SELECT o.app_id, o.event_id, o.ctid,
           (SELECT s.timeout_ms FROM picloud.scripts s
            WHERE s.app_id = o.app_id AND s.script_id = o.script_id)
    FROM picloud.outbox o
    WHERE o.claimed_by IS NULL AND o.due_at <= now()
      AND o.attempt_count = 0 AND o.reply_to IS NULL
      AND (SELECT s.kind FROM picloud.scripts s
           WHERE s.app_id = o.app_id AND s.script_id = o.script_id) = 'sql'
    ORDER BY o.due_at
    LIMIT p_batch
    FOR UPDATE SKIP LOCKED;
    GET DIAGNOSTICS v_locked = ROW_COUNT;
    -- Like an empty claim, an empty batch raises the idle mark that makes enqueues wake us.
    PERFORM picloud._note_claim(v_locked);
END
$$;

-- The events at the given row addresses, grouped by handler, trigger and depth, as the JSON
-- their handlers receive, with their ids and addresses in the same order. A TID scan finds
-- them. An address still holds the event the lane locked: the lock keeps the row from being
-- updated or removed by anyone else, and the lane itself changes nothing before it deletes.
-- (The planner's cost model would rather read the whole table than fetch a few hundred rows
-- by address; the setting is local to this function, and no handler runs in it.)
CREATE FUNCTION picloud._sql_lane_groups(p_row_tids tid[])
RETURNS TABLE (app_id uuid, trigger_id uuid, script_id uuid, depth integer,
               event_ids uuid[], row_tids tid[], events jsonb[])
LANGUAGE sql STABLE
SET enable_seqscan = off
SET jit = off
AS $$
    SELECT o.app_id, o.trigger_id, o.script_id, o.depth,
           array_agg(o.event_id),
           array_agg(o.ctid),
           array_agg(jsonb_build_object(
               'event_id', o.event_id, 'app_id', o.app_id, 'source', o.source, 'op', o.op,
               'payload', o.payload, 'depth', o.depth, 'attempt', 1,
               'trigger_id', o.trigger_id, 'script_id', o.script_id))
    FROM picloud.outbox o
    WHERE o.ctid = ANY(p_row_tids)
      AND o.claimed_by IS NULL AND o.attempt_count = 0 AND o.reply_to IS NULL
    GROUP BY o.app_id, o.trigger_id, o.script_id, o.depth
$$;

-- Deletes the lane's events at the given addresses once their handlers ran and counts them as
-- completed; returns how many. Same TID scan as above.
CREATE FUNCTION picloud._sql_lane_complete(p_row_tids tid[]) RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_apps uuid[];
    v_sources text[];
    v_counts integer[];
    v_deleted integer := 0;
BEGIN
    WITH done AS (
        DELETE FROM picloud.outbox o
        WHERE o.ctid = ANY(p_row_tids)
          AND o.claimed_by IS NULL AND o.attempt_count = 0 AND o.reply_to IS NULL
        RETURNING o.app_id, o.source
    ), counted AS (
        SELECT d.app_id, d.source, count(*)::integer AS n FROM done d GROUP BY d.app_id, d.source
    )
    SELECT array_agg(c.app_id), array_agg(c.source), array_agg(c.n)
    INTO v_apps, v_sources, v_counts FROM counted c;
    FOR i IN 1 .. coalesce(cardinality(v_apps), 0) LOOP
        PERFORM picloud._count_outcome(v_apps[i], v_sources[i], v_counts[i], 0, 0);
        v_deleted := v_deleted + v_counts[i];
    END LOOP;
    RETURN v_deleted;
END
$$;

-- Runs the handlers of events locked by picloud_lock_sql_lane in this transaction and deletes
-- the events that ran. Each group of events with the same handler, principal and depth runs in
-- one statement as that principal; a group whose statement fails runs again event by event,
-- each in a savepoint. Returns how many ran, and the events left for the ordinary path: those
-- that failed by themselves, and every event of a group whose principal may not run it.
CREATE FUNCTION picloud.picloud_run_sql_lane(p_event_ids uuid[], p_row_tids tid[])
RETURNS TABLE (ran integer, left_app_ids uuid[], left_event_ids uuid[])
LANGUAGE plpgsql AS $$
DECLARE
    g record;
    v_function regprocedure;
    v_kind text;
    v_principal name;
    v_problem text;
    v_token bigint;
    v_done tid[] := '{}';
    v_left_apps uuid[] := '{}';
    v_left uuid[] := '{}';
    v_completed integer;
BEGIN
    IF p_event_ids IS NULL OR p_row_tids IS NULL THEN
        PERFORM picloud._null_argument('{event_ids,row_tids}', ARRAY[p_event_ids IS NULL, p_row_tids IS NULL]);
    END IF;
    IF cardinality(p_event_ids) <> cardinality(p_row_tids) THEN
        PERFORM picloud._invalid('event_ids and row_tids must have the same length');
    END IF;
    FOR g IN SELECT * FROM picloud._sql_lane_groups(p_row_tids) LOOP
        SELECT s.sql_function, s.kind INTO v_function, v_kind
        FROM picloud.scripts s WHERE s.app_id = g.app_id AND s.script_id = g.script_id;
        SELECT h.principal, h.problem INTO v_principal, v_problem
        FROM picloud._handler_principal(g.app_id, g.trigger_id, g.script_id) h;
        IF v_problem IS NOT NULL OR v_kind IS DISTINCT FROM 'sql'
           OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc WHERE oid = v_function) THEN
            -- The ordinary path reports exactly why, as each event's error.
            v_left_apps := v_left_apps || array_fill(g.app_id, ARRAY[cardinality(g.event_ids)]);
            v_left := v_left || g.event_ids;
            CONTINUE;
        END IF;
        -- From here until _unbecome this code runs with the principal's rights only. count(r)
        -- uses each result, so no handler call is optimised away whatever its volatility.
        v_token := picloud._become(v_principal, g.depth);
        BEGIN
            EXECUTE format('SELECT count(r) FROM (SELECT %s(e) AS r FROM unnest($1) AS e) AS calls',
                           v_function::oid::regproc)
            USING g.events;
            v_done := v_done || g.row_tids;
        EXCEPTION WHEN OTHERS THEN
            -- Some handler call failed; find which, one savepoint per event.
            FOR i IN 1 .. cardinality(g.events) LOOP
                BEGIN
                    EXECUTE format('SELECT count(r) FROM (SELECT %s($1) AS r) AS call',
                                   v_function::oid::regproc)
                    USING g.events[i];
                    v_done := v_done || g.row_tids[i];
                EXCEPTION WHEN OTHERS THEN
                    v_left_apps := v_left_apps || g.app_id;
                    v_left := v_left || g.event_ids[i];
                END;
            END LOOP;
        END;
        PERFORM picloud._unbecome(v_token);
    END LOOP;
    v_completed := picloud._sql_lane_complete(v_done);
    IF v_completed <> cardinality(v_done) THEN
        -- Cannot happen while the rows stay locked; refuse rather than half-complete.
        RAISE EXCEPTION 'sql lane ran % handlers but completed % events', cardinality(v_done), v_completed
            USING ERRCODE = 'XX000';
    END IF;
    RETURN QUERY SELECT cardinality(v_done), v_left_apps, v_left;
END
$$;

-- Claims exactly the given events (those still unclaimed) for p_worker, as picloud_claim does
-- for due rows: the way out of the lane for a batch that failed. Returns the claimed rows in
-- picloud_claim's shape.
CREATE FUNCTION picloud.picloud_claim_events(
    p_worker text, p_app_ids uuid[], p_event_ids uuid[], p_lease_ms integer)
RETURNS TABLE (
    app_id uuid, event_id uuid, source text, op text, trigger_id uuid, script_id uuid,
    payload jsonb, depth integer, attempt_count integer, reply_to text,
    handler_kind text, handler_target text, timeout_ms integer,
    principal name, principal_error text)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_worker IS NULL OR p_app_ids IS NULL OR p_event_ids IS NULL OR p_lease_ms IS NULL THEN
        PERFORM picloud._null_argument('{worker,app_ids,event_ids,lease_ms}',
            ARRAY[p_worker IS NULL, p_app_ids IS NULL, p_event_ids IS NULL, p_lease_ms IS NULL]);
    END IF;
    IF cardinality(p_app_ids) <> cardinality(p_event_ids) THEN
        PERFORM picloud._invalid('app_ids and event_ids must have the same length');
    END IF;
    IF length(p_worker) NOT BETWEEN 1 AND 200 THEN
        PERFORM picloud._invalid('worker name must be 1 to 200 characters long');
    END IF;
    IF p_lease_ms NOT BETWEEN 100 AND 86400000 THEN
        PERFORM picloud._invalid(format('lease_ms must be between 100 and 86400000, got %s', p_lease_ms));
    END IF;
    RETURN QUERY
    WITH wanted AS (
        SELECT o.app_id, o.event_id
        FROM unnest(p_app_ids, p_event_ids) AS k(app_id, event_id)
        JOIN picloud.outbox o ON o.app_id = k.app_id AND o.event_id = k.event_id
        WHERE o.claimed_by IS NULL
        FOR UPDATE OF o SKIP LOCKED
    ), claimed AS (
        UPDATE picloud.outbox o
        SET claimed_by = p_worker,
            lease_expires_at = now() + make_interval(secs => p_lease_ms / 1000.0),
            attempt_count = o.attempt_count + 1,
            first_attempt_at = coalesce(o.first_attempt_at, now()),
            last_attempt_at = now()
        FROM wanted
        WHERE o.app_id = wanted.app_id AND o.event_id = wanted.event_id
        RETURNING o.*
    )
    SELECT a.* FROM picloud._claim_answers(ARRAY(SELECT c::picloud.outbox FROM claimed c)) a;
END
$$;

-- Housekeeping drops outcome counts older than a day.
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

CREATE OR REPLACE FUNCTION picloud.picloud_gc_pass()
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

-- Privileges and row-level security of the new objects, as sql/090_privileges.sql sets them
-- on a fresh install.
REVOKE ALL ON picloud.event_counts, picloud.stats, picloud.dead_letter_summary,
    picloud.dead_letter_errors, picloud.dead_letters_by_trigger FROM PUBLIC;
REVOKE ALL ON FUNCTION
    picloud._count_outcome(uuid, text, integer, integer, integer),
    picloud.picloud_stats(interval),
    picloud.picloud_error_class(text),
    picloud.picloud_resolve_dead_letters(uuid, text, text, uuid, uuid, text, timestamptz, integer, boolean),
    picloud.picloud_wait_idle(uuid, interval),
    picloud.picloud_next_due_at(),
    picloud._gc_event_counts(integer),
    picloud._backend_started(integer),
    picloud._my_backend_start(),
    picloud._outbox_row_valid(text, text, integer, integer, boolean, boolean),
    picloud._check_resolution(text),
    picloud.picloud_claim(text, integer, integer, boolean),
    picloud._claim_answers(picloud.outbox[]),
    picloud.picloud_lock_sql_lane(integer),
    picloud._sql_lane_groups(tid[]),
    picloud._sql_lane_complete(tid[]),
    picloud.picloud_run_sql_lane(uuid[], tid[]),
    picloud.picloud_claim_events(text, uuid[], uuid[], integer)
FROM PUBLIC;
GRANT SELECT ON picloud.event_counts, picloud.stats, picloud.dead_letter_summary,
    picloud.dead_letter_errors, picloud.dead_letters_by_trigger TO picloud_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON picloud.event_counts, picloud.stats, picloud.dead_letter_summary,
    picloud.dead_letter_errors, picloud.dead_letters_by_trigger TO picloud_admin, picloud_supervisor;
GRANT EXECUTE ON FUNCTION
    picloud.picloud_stats(interval),
    picloud.picloud_error_class(text),
    picloud.picloud_resolve_dead_letters(uuid, text, text, uuid, uuid, text, timestamptz, integer, boolean),
    picloud.picloud_wait_idle(uuid, interval),
    picloud._outbox_row_valid(text, text, integer, integer, boolean, boolean),
    picloud._check_resolution(text),
    picloud._my_backend_start()
TO picloud_user, picloud_supervisor;
GRANT EXECUTE ON FUNCTION
    picloud._count_outcome(uuid, text, integer, integer, integer),
    picloud._gc_event_counts(integer),
    picloud._backend_started(integer)
TO picloud_admin, picloud_supervisor;
GRANT EXECUTE ON FUNCTION
    picloud.picloud_next_due_at(),
    picloud.picloud_claim(text, integer, integer, boolean),
    picloud._claim_answers(picloud.outbox[]),
    picloud.picloud_lock_sql_lane(integer),
    picloud._sql_lane_groups(tid[]),
    picloud._sql_lane_complete(tid[]),
    picloud.picloud_run_sql_lane(uuid[], tid[]),
    picloud.picloud_claim_events(text, uuid[], uuid[], integer)
TO picloud_supervisor;

ALTER TABLE picloud.event_counts ENABLE ROW LEVEL SECURITY;
CREATE POLICY event_counts_admin ON picloud.event_counts FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_dead_letters'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_dead_letters'));
