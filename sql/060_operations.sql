-- What an operator reads and runs from psql: the stats view, the dead-letter runbook views and
-- bulk resolution with a dry run. (Outcomes are counted by sql/031_claims.sql.)
--
-- Every view is security_invoker: a tenant role sees only the apps it may manage (the
-- row-level security of the tables underneath applies to the caller, not to the view's owner).

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

-- Ordering keys held back by a dead letter (on_dead_letter 'block'), with how many events wait
-- behind each and the dead letter to resolve or replay to release it. (A block whose dead letter
-- was deleted by hand, unresolved, shows with a NULL last_error; delete the block to release it.)
CREATE VIEW picloud.blocked_keys WITH (security_invoker = true) AS
    SELECT b.app_id,
           a.name AS app_name,
           b.ordering_key,
           b.dead_letter_id,
           b.blocked_at,
           d.last_error,
           (SELECT count(*) FROM picloud.outbox o
            WHERE o.app_id = b.app_id AND o.ordering_key = b.ordering_key) AS held_events
    FROM picloud.key_blocks b
    JOIN picloud.apps a ON a.app_id = b.app_id
    LEFT JOIN picloud.dead_letters d ON d.app_id = b.app_id AND d.dead_letter_id = b.dead_letter_id;

-- Handlers with a concurrency limit: how many of their events run now (claimed, by every
-- worker) and how many are due and wait; at_limit says claims pass over them for now.
CREATE VIEW picloud.limited_handlers WITH (security_invoker = true) AS
    SELECT l.app_id,
           a.name AS app_name,
           l.script_id,
           s.name AS script_name,
           l.max_concurrency,
           r.running,
           w.waiting,
           r.running >= l.max_concurrency AS at_limit
    FROM picloud.handler_limits l
    JOIN picloud.apps a ON a.app_id = l.app_id
    JOIN picloud.scripts s ON s.app_id = l.app_id AND s.script_id = l.script_id
    CROSS JOIN LATERAL (SELECT count(*) AS running FROM picloud.outbox o
                        WHERE o.claimed_by IS NOT NULL AND o.app_id = l.app_id
                          AND o.script_id = l.script_id) r
    CROSS JOIN LATERAL (SELECT count(*) AS waiting FROM picloud.outbox o
                        WHERE picloud._unclaimed(o.claimed_by) AND o.due_at <= now() AND o.app_id = l.app_id
                          AND o.script_id = l.script_id) w;

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
