-- Claims and their reports (what the supervisor calls): the retry policy, claim under a
-- lease, complete, fail with retry or dead-lettering, extend, release; outcome counting and
-- the outbox listing.

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
-- (A dropped trigger leaves the handler's registrant.) A SQL function that qualifies every name
-- and operator and has no SET clause, so the planner inlines it into the query that calls it:
-- a lane batch or a claim of the ticks of a hundred cron triggers looks their principals up
-- with two joins instead of a hundred PL/pgSQL calls (about 40 us each).
CREATE FUNCTION picloud._handler_principal(p_app_id uuid, p_trigger_id uuid, p_script_id uuid)
RETURNS TABLE (principal name, problem text)
LANGUAGE sql STABLE AS $$
    SELECT r.principal, coalesce(r.mismatch, picloud._principal_problem(p_app_id, r.principal))
    FROM (SELECT CASE WHEN s.script_id IS NULL THEN NULL
                      WHEN t.trigger_id IS NULL THEN s.registered_by_principal
                      WHEN t.script_id OPERATOR(pg_catalog.<>) p_script_id THEN NULL
                      ELSE t.registered_by_principal
                 END AS principal,
                 CASE WHEN s.script_id IS NOT NULL
                       AND t.script_id OPERATOR(pg_catalog.<>) p_script_id
                      THEN pg_catalog.format('handler %s is not the handler of trigger %s',
                                             p_script_id, p_trigger_id)
                 END AS mismatch
          FROM (VALUES (1)) AS one (x)
          LEFT JOIN picloud.scripts s
            ON s.app_id OPERATOR(pg_catalog.=) p_app_id
           AND s.script_id OPERATOR(pg_catalog.=) p_script_id
          LEFT JOIN picloud.triggers t
            ON t.app_id OPERATOR(pg_catalog.=) p_app_id
           AND t.trigger_id OPERATOR(pg_catalog.=) p_trigger_id) r
$$;

-- The JSON document a handler receives for an event: event_id, app_id, source, op, payload,
-- depth, attempt, trigger_id, script_id (internal). A SQL function that qualifies every name
-- and has no SET clause, so the planner inlines it into the query that calls it: one
-- jsonb_build_object per event, which measured 8.4 µs an event in a claim's answer against
-- 11.3 µs for the Rust builder (api/event_json.rs) that it replaced in 0.4.0 (each of the
-- builder's thirty calls into the server pays pgrx's error guard).
CREATE FUNCTION picloud._event_jsonb(
    p_event_id uuid, p_app_id uuid, p_source text, p_op text, p_payload jsonb,
    p_depth integer, p_attempt integer, p_trigger_id uuid, p_script_id uuid)
RETURNS jsonb
-- STABLE as jsonb_build_object is (a function declared IMMUTABLE over it is not inlined).
LANGUAGE sql STABLE PARALLEL SAFE
RETURN pg_catalog.jsonb_build_object(
    'event_id', p_event_id, 'app_id', p_app_id, 'source', p_source, 'op', p_op,
    'payload', p_payload, 'depth', p_depth, 'attempt', p_attempt,
    'trigger_id', p_trigger_id, 'script_id', p_script_id);

CREATE FUNCTION picloud._event_json(r picloud.outbox) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN picloud._event_jsonb(r.event_id, r.app_id, r.source, r.op, r.payload, r.depth,
                                r.attempt_count, r.trigger_id, r.script_id);
END
$$;

-- The claimed event, as every claim answers it (picloud_claim, picloud_claim_events): the
-- event, the document its handler receives (`event`, built here once; the supervisor hands it
-- to http and command handlers as it is), its handler (kind, target - the function for sql,
-- the URL or command name otherwise - and timeout, 30 s if the handler is gone), the
-- principal it runs as, or why it cannot run, and its priority (a supervisor that claims ahead
-- starts an app's waiting events by it).
CREATE TYPE picloud.claimed_event AS (
    app_id uuid, event_id uuid, source text, op text, trigger_id uuid, script_id uuid,
    payload jsonb, depth integer, attempt_count integer, reply_to text,
    handler_kind text, handler_target text, timeout_ms integer,
    principal name, principal_error text, event jsonb, priority smallint);

-- What a claim answers for the rows it claimed, in their order; with p_attempts_ahead, for the
-- attempt that many after the rows' attempt_count (an http lane answers rows it has not
-- updated, sql/036_http_lane.sql).
CREATE FUNCTION picloud._claim_answers(p_claimed picloud.outbox[], p_attempts_ahead integer DEFAULT 0)
RETURNS SETOF picloud.claimed_event
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    -- The principal once per handler and trigger, not once per event: a claim's events mostly
    -- share a few. (Materialized: joined in, the planner ran it again for every event.)
    WITH principals AS MATERIALIZED (
        SELECT k.app_id, k.trigger_id, k.script_id, p.principal, p.problem
        FROM (SELECT DISTINCT d.app_id, d.trigger_id, d.script_id FROM unnest(p_claimed) d) k
        CROSS JOIN LATERAL picloud._handler_principal(k.app_id, k.trigger_id, k.script_id) p)
    SELECT c.app_id, c.event_id, c.source::text, c.op::text, c.trigger_id, c.script_id, c.payload,
           c.depth::integer, c.attempt_count::integer + p_attempts_ahead, c.reply_to, s.kind::text,
           CASE WHEN s.kind = 'sql' THEN s.sql_function::text ELSE s.target END,
           coalesce(s.timeout_ms, 30000)::integer,
           h.principal,
           h.problem,
           picloud._event_jsonb(c.event_id, c.app_id, c.source, c.op, c.payload, c.depth,
                                c.attempt_count + p_attempts_ahead, c.trigger_id, c.script_id),
           c.priority
    FROM unnest(p_claimed) WITH ORDINALITY AS c
    LEFT JOIN picloud.scripts s ON s.app_id = c.app_id AND s.script_id = c.script_id
    JOIN principals h
      ON h.app_id = c.app_id AND h.script_id = c.script_id
     AND h.trigger_id IS NOT DISTINCT FROM c.trigger_id
    ORDER BY c.ordinality;
END
$$;

-- Claims up to p_batch due events for p_worker under a lease of p_lease_ms and returns each
-- with its handler and the principal it runs as.
--
-- Which events, fairly between apps (README, "Fairness between apps"):
--   1. an equal share of the batch from each app that has a due one (at least one event each;
--      round robin, starting from a random app, at most p_batch apps): the app's best by
--      priority, then due time, among its first 64 waiting rows in that order
--      (outbox_app_priority_idx), taken in turns (each app's first, then each app's second...);
--   2. then, to fill the batch, as many more events of each app as the app has among the
--      oldest due events (by due time, all apps together), each app's taken by priority, then
--      due time. So priority orders events within an app and never between apps: an app
--      cannot jump other apps' queues by raising its own priority.
-- Events with an ordering key take neither way: a key's events may only run one at a time, so
-- most of a keyed backlog waits for its turn, and scanning it in due order would cost every
-- claim the whole backlog. Instead each claim visits up to p_batch * 4 keys in key order
-- (outbox_ordering_idx), from where this session's previous claim stopped (a cursor kept in
-- the session's settings, wrapping around), and takes each key's first event (by place,
-- ordering_seq) when it is unclaimed and due and the key is not blocked by a dead letter. So
-- an ordered event runs only when no earlier event of its key is in the outbox (claimed,
-- retrying or waiting); the sql lanes keep the same rule (sql/035_sql_lane.sql).
-- A handler with a concurrency limit (picloud.handler_limits) has at most that many events claimed at once, by every
-- worker together: a claim passes over the events of a handler at its limit, and takes at
-- most what is left of a limit under the handler's lock (picloud._handler_room).
-- With p_app_cap, an app that already has p_app_cap events claimed by p_worker gets no more
-- from it, and one claim gives an app at most what is left of its cap: one app's slow handlers
-- cannot hold every executor of a supervisor. (Per worker, not in total: the cap is a share of
-- one supervisor's executors, and adding supervisors adds capacity for every app.)
-- With p_leave_sql_lane a supervisor that runs SQL lanes (sql/035_sql_lane.sql) leaves the
-- lanes their events - first attempts of asynchronous events whose sql handler has no
-- concurrency limit - and p_leave_http_lane does the same for http handlers and the http
-- lanes (sql/036_http_lane.sql). With either, step 2 looks at no more than the oldest
-- p_batch * 4 + 100 due rows, so a backlog of lane events costs it a bounded scan. (Without lanes, step 2 passes over
-- the rows of apps at their cap and of handlers at their limit: a claim beside a large
-- backlog of those costs a scan of it.)
CREATE FUNCTION picloud.picloud_claim(
    p_worker text, p_batch integer, p_lease_ms integer, p_leave_sql_lane boolean DEFAULT false,
    p_app_cap integer DEFAULT NULL, p_leave_http_lane boolean DEFAULT false)
RETURNS SETOF picloud.claimed_event
LANGUAGE plpgsql
-- A backlog makes the planner's estimates for the claim large enough to JIT-compile it, which
-- costs a hundred times more than running it (measured: 120 ms against 4 ms).
SET jit = off
-- Left to choose, PL/pgSQL plans the claim's statement afresh on every call (its estimates make
-- each custom plan look cheaper than the generic one), and planning is most of a claim's cost:
-- with one plan kept per session a claim of 4 from a 20,000-event backlog took 1.3 ms, not 3.2.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_claimed integer;
    v_running_apps uuid[] := '{}';
    v_running_counts integer[] := '{}';
    v_start uuid := gen_random_uuid();
    v_first_app uuid;
    v_after_app uuid;
    v_after_key text;
    v_key_apps uuid[];
    v_keys text[];
    v_full uuid[] := '{}';
    -- How many of the oldest due rows step 2 looks at (NULL: no bound).
    v_look integer;
BEGIN
    IF p_worker IS NULL OR p_batch IS NULL OR p_lease_ms IS NULL OR p_leave_sql_lane IS NULL
       OR p_leave_http_lane IS NULL THEN
        PERFORM picloud._null_argument('{worker,batch,lease_ms,leave_sql_lane,leave_http_lane}',
            ARRAY[p_worker IS NULL, p_batch IS NULL, p_lease_ms IS NULL, p_leave_sql_lane IS NULL,
                  p_leave_http_lane IS NULL]);
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
    -- Lanes of a kind no handler has take nothing: leaving them their events would only cost
    -- each row of the scans below a handler lookup (scripts_kind_idx answers this).
    IF p_leave_sql_lane AND NOT EXISTS (SELECT 1 FROM picloud.scripts s WHERE s.kind = 'sql') THEN
        p_leave_sql_lane := false;
    END IF;
    IF p_leave_http_lane AND NOT EXISTS (SELECT 1 FROM picloud.scripts s WHERE s.kind = 'http') THEN
        p_leave_http_lane := false;
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
        -- When every app with events in the outbox is at its cap, nothing can be claimed: say
        -- so at once. (Otherwise the fill below would pass over each of those apps' due rows,
        -- a whole backlog when one busy app is alone.) One outbox_pkey probe per app at its cap.
        IF EXISTS (SELECT 1 FROM unnest(v_running_counts) n WHERE n >= p_app_cap)
           AND NOT EXISTS (
               WITH RECURSIVE walk (app_id) AS (
                   SELECT (SELECT o.app_id FROM picloud.outbox o ORDER BY o.app_id DESC LIMIT 1)
                   UNION ALL
                   SELECT (SELECT o.app_id FROM picloud.outbox o WHERE o.app_id < w.app_id
                           ORDER BY o.app_id DESC LIMIT 1)
                   FROM walk w
                   WHERE w.app_id IS NOT NULL
                     AND coalesce(v_running_counts[array_position(v_running_apps, w.app_id)], 0) >= p_app_cap)
               SELECT 1 FROM walk w
               WHERE w.app_id IS NOT NULL
                 AND coalesce(v_running_counts[array_position(v_running_apps, w.app_id)], 0) < p_app_cap) THEN
            PERFORM picloud._note_claim(0);
            RETURN;
        END IF;
    END IF;
    -- Handlers with a concurrency limit at their limit now (by the claimed rows, a few per
    -- running handler): the scans below pass over their events.
    IF EXISTS (SELECT 1 FROM picloud.handler_limits) THEN
        SELECT coalesce(array_agg(r.script_id), '{}') INTO v_full
        FROM (SELECT o.app_id, o.script_id, count(*) AS n FROM picloud.outbox o
              WHERE o.claimed_by IS NOT NULL GROUP BY o.app_id, o.script_id) r
        JOIN picloud.handler_limits l ON l.app_id = r.app_id AND l.script_id = r.script_id
        WHERE r.n >= l.max_concurrency;
    END IF;
    IF p_leave_sql_lane OR p_leave_http_lane THEN
        -- The bounded look of step 2 (see above): that many rows however many share one due
        -- time (a bulk enqueue gives all its events the same; a bound on the due time let the
        -- look pass over all of them). Only then: without it, step 2 must be free to pass over
        -- the rows of apps at their cap to reach other apps' events (a flood of one app's slow
        -- events would otherwise leave the others one event per claim).
        v_look := p_batch * 4 + 100;
    END IF;
    -- The ordering keys this claim visits (see above), and the cursor moved past them.
    BEGIN
        v_after_app := nullif(current_setting('picloud.claim_after_app', true), '')::uuid;
    EXCEPTION WHEN invalid_text_representation THEN
        v_after_app := NULL;
    END;
    v_after_key := coalesce(current_setting('picloud.claim_after_key', true), '');
    WITH RECURSIVE keys (app_id, ordering_key, n) AS (
        SELECT f.app_id, f.ordering_key, 1
        FROM (SELECT x.app_id, x.ordering_key FROM (
                 (SELECT o.app_id, o.ordering_key FROM picloud.outbox o
                  WHERE o.ordering_key IS NOT NULL
                    AND (o.app_id, o.ordering_key) > (coalesce(v_after_app, '00000000-0000-0000-0000-000000000000'::uuid), v_after_key)
                  ORDER BY o.app_id, o.ordering_key LIMIT 1)
                 UNION ALL
                 (SELECT o.app_id, o.ordering_key FROM picloud.outbox o
                  WHERE o.ordering_key IS NOT NULL
                  ORDER BY o.app_id, o.ordering_key LIMIT 1)) x
              LIMIT 1) f
        UNION ALL
        SELECT nxt.app_id, nxt.ordering_key, k.n + 1
        FROM keys k
        CROSS JOIN LATERAL (SELECT o.app_id, o.ordering_key FROM picloud.outbox o
                            WHERE o.ordering_key IS NOT NULL
                              AND (o.app_id, o.ordering_key) > (k.app_id, k.ordering_key)
                            ORDER BY o.app_id, o.ordering_key LIMIT 1) nxt
        WHERE k.n < p_batch * 4
    )
    SELECT array_agg(k.app_id ORDER BY k.n), array_agg(k.ordering_key ORDER BY k.n)
    INTO v_key_apps, v_keys
    FROM keys k;
    PERFORM pg_catalog.set_config('picloud.claim_after_app', coalesce(v_key_apps[cardinality(v_key_apps)]::text, ''), false);
    PERFORM pg_catalog.set_config('picloud.claim_after_key', coalesce(v_keys[cardinality(v_keys)], ''), false);
    -- The apps' round robin below starts here (computed once: within the query it was planned
    -- as one subquery per use).
    v_first_app := coalesce(
        (SELECT o.app_id FROM picloud.outbox o WHERE o.app_id < v_start ORDER BY o.app_id DESC LIMIT 1),
        (SELECT o.app_id FROM picloud.outbox o ORDER BY o.app_id DESC LIMIT 1));
    RETURN QUERY
    WITH RECURSIVE apps (app_id, n) AS (
        -- Apps with rows in the outbox, from a random one on, wrapping around: one index probe
        -- of outbox_pkey each, downwards, so that each lands on an app's newest entries (a
        -- drain empties an app's part of the index from its oldest end: see picloud._lock_lane).
        SELECT v_first_app, 1 WHERE v_first_app IS NOT NULL
        UNION ALL
        SELECT nxt.app_id, a.n + 1
        FROM apps a
        CROSS JOIN LATERAL (SELECT coalesce(
                  (SELECT o.app_id FROM picloud.outbox o WHERE o.app_id < a.app_id ORDER BY o.app_id DESC LIMIT 1),
                  (SELECT o.app_id FROM picloud.outbox o ORDER BY o.app_id DESC LIMIT 1)) AS app_id) nxt
        WHERE a.n < p_batch AND nxt.app_id <> v_first_app
    ), room AS (
        -- How many more events each app may have claimed (NULL: no cap).
        SELECT a.app_id,
               p_app_cap - coalesce(v_running_counts[array_position(v_running_apps, a.app_id)], 0) AS left_
        FROM apps a
    ), share AS (
        -- Each app's share of the batch: the batch over the apps with rows in the outbox (one
        -- when an app is alone: the fill takes the rest in the same order, at less cost).
        SELECT CASE WHEN count(*) <= 1 THEN 1 ELSE p_batch / count(*) END::integer AS n
        FROM apps
    ), heads AS (
        -- Each app's best claimable events by priority, then due time (its share, within its
        -- cap), among its first 64 rows of a priority other than 0 (outbox_app_priority_idx) and
        -- its first 64 rows by enqueue order (outbox_pkey): two short index scans however the
        -- app's rows lie in due order.
        SELECT h.app_id, h.event_id, h.due_at
        FROM room r
        CROSS JOIN share
        CROSS JOIN LATERAL (
            SELECT w.app_id, w.event_id, w.due_at
            FROM ((SELECT o.app_id, o.event_id, o.due_at, o.priority, o.attempt_count, o.first_attempt_at, o.ctid AS tid,
                          o.reply_to, o.script_id, o.claimed_by, o.ordering_key
                   FROM picloud.outbox o
                   WHERE o.app_id = r.app_id AND picloud._unclaimed(o.claimed_by) AND o.ordering_key IS NULL
                     AND o.priority <> 0 AND o.due_at <= now()
                   ORDER BY o.priority, o.due_at LIMIT 64)
                  UNION ALL
                  (SELECT o.app_id, o.event_id, o.due_at, o.priority, o.attempt_count, o.first_attempt_at, o.ctid,
                          o.reply_to, o.script_id, o.claimed_by, o.ordering_key
                   FROM picloud.outbox o WHERE o.app_id = r.app_id ORDER BY o.event_id LIMIT 64)) w
            WHERE picloud._unclaimed(w.claimed_by) AND w.ordering_key IS NULL AND w.due_at <= now()
              AND w.script_id <> ALL (v_full)
              AND NOT ((p_leave_sql_lane OR p_leave_http_lane) AND w.attempt_count = 0 AND w.first_attempt_at IS NULL AND w.reply_to IS NULL
                       AND coalesce((SELECT s.kind = 'sql' AND p_leave_sql_lane OR s.kind = 'http' AND p_leave_http_lane
                                     FROM picloud.scripts s
                                     WHERE s.app_id = w.app_id AND s.script_id = w.script_id), false)
                       AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                                       WHERE l.app_id = w.app_id AND l.script_id = w.script_id))
            ORDER BY w.priority, w.due_at, w.tid
            LIMIT least(share.n, coalesce(r.left_, share.n))) h
        WHERE r.left_ IS NULL OR r.left_ > 0
    ), locked_heads AS (
        SELECT o.app_id, o.event_id, o.due_at, o.priority, o.script_id, o.ctid AS tid
        FROM picloud.outbox o JOIN heads h ON o.app_id = h.app_id AND o.event_id = h.event_id
        WHERE picloud._unclaimed(o.claimed_by) AND o.due_at <= now()
        FOR UPDATE OF o SKIP LOCKED
    ), fill_slots AS (
        -- How many rows of each app are among the oldest due rows: one index scan of
        -- outbox_due_idx (bounded with p_leave_sql_lane, see above).
        SELECT c.app_id,
               greatest(0, count(*) - (SELECT count(*) FROM heads h WHERE h.app_id = c.app_id))::integer AS n
        FROM (SELECT o.app_id
              FROM (SELECT w.app_id, w.script_id, w.due_at, w.attempt_count, w.first_attempt_at,
                           w.reply_to
                    FROM picloud.outbox w
                    WHERE picloud._unclaimed(w.claimed_by) AND w.due_at <= now() AND w.ordering_key IS NULL
                    ORDER BY w.due_at
                    LIMIT v_look) o
              WHERE NOT (p_app_cap IS NOT NULL AND o.app_id = ANY (v_running_apps)
                         AND v_running_counts[array_position(v_running_apps, o.app_id)] >= p_app_cap)
                AND o.script_id <> ALL (v_full)
                AND NOT ((p_leave_sql_lane OR p_leave_http_lane) AND o.attempt_count = 0 AND o.first_attempt_at IS NULL AND o.reply_to IS NULL
                         AND coalesce((SELECT s.kind = 'sql' AND p_leave_sql_lane OR s.kind = 'http' AND p_leave_http_lane
                                     FROM picloud.scripts s
                                     WHERE s.app_id = o.app_id AND s.script_id = o.script_id), false)
                       AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                                       WHERE l.app_id = o.app_id AND l.script_id = o.script_id))
              ORDER BY o.due_at
              LIMIT p_batch) c
        GROUP BY c.app_id
    ), fill_prioritized AS (
        -- Each app's share (see ranked for the cut): its best rows of a priority other than 0
        -- (outbox_app_priority_idx), passing over rows other claimers hold ...
        SELECT f.app_id, f.event_id, f.due_at, f.priority, f.script_id, f.tid
        FROM fill_slots s
        CROSS JOIN LATERAL (
            SELECT o.app_id, o.event_id, o.due_at, o.priority, o.script_id, o.ctid AS tid
            FROM picloud.outbox o
            WHERE o.app_id = s.app_id AND picloud._unclaimed(o.claimed_by) AND o.ordering_key IS NULL
              AND o.priority <> 0 AND o.due_at <= now()
              AND o.script_id <> ALL (v_full)
              AND NOT ((p_leave_sql_lane OR p_leave_http_lane) AND o.attempt_count = 0 AND o.first_attempt_at IS NULL AND o.reply_to IS NULL
                       AND coalesce((SELECT s.kind = 'sql' AND p_leave_sql_lane OR s.kind = 'http' AND p_leave_http_lane
                                     FROM picloud.scripts s
                                     WHERE s.app_id = o.app_id AND s.script_id = o.script_id), false)
                       AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                                       WHERE l.app_id = o.app_id AND l.script_id = o.script_id))
              AND NOT EXISTS (SELECT 1 FROM heads l WHERE l.app_id = o.app_id AND l.event_id = o.event_id)
            ORDER BY o.priority, o.due_at
            LIMIT s.n
            FOR UPDATE OF o SKIP LOCKED) f
    ), fill_usual AS (
        -- ... and its oldest rows of priority 0 (outbox_due_idx, where fill_slots found them).
        SELECT f.app_id, f.event_id, f.due_at, f.priority, f.script_id, f.tid
        FROM fill_slots s
        CROSS JOIN LATERAL (
            SELECT o.app_id, o.event_id, o.due_at, o.priority, o.script_id, o.ctid AS tid
            FROM picloud.outbox o
            WHERE o.app_id = s.app_id AND picloud._unclaimed(o.claimed_by) AND o.ordering_key IS NULL
              AND o.priority = 0 AND o.due_at <= now()
              AND o.script_id <> ALL (v_full)
              AND NOT ((p_leave_sql_lane OR p_leave_http_lane) AND o.attempt_count = 0 AND o.first_attempt_at IS NULL AND o.reply_to IS NULL
                       AND coalesce((SELECT s.kind = 'sql' AND p_leave_sql_lane OR s.kind = 'http' AND p_leave_http_lane
                                     FROM picloud.scripts s
                                     WHERE s.app_id = o.app_id AND s.script_id = o.script_id), false)
                       AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                                       WHERE l.app_id = o.app_id AND l.script_id = o.script_id))
              AND NOT EXISTS (SELECT 1 FROM heads l WHERE l.app_id = o.app_id AND l.event_id = o.event_id)
            ORDER BY o.due_at
            LIMIT s.n
            FOR UPDATE OF o SKIP LOCKED) f
    ), key_heads AS (
        -- The first event of each visited key, when it may run.
        SELECT h.app_id, h.event_id
        FROM unnest(v_key_apps, v_keys) AS k(app_id, ordering_key)
        CROSS JOIN LATERAL (SELECT o.app_id, o.event_id, o.due_at, o.claimed_by, o.script_id,
                                   o.attempt_count, o.first_attempt_at, o.reply_to
                            FROM picloud.outbox o
                            WHERE o.app_id = k.app_id AND o.ordering_key = k.ordering_key
                            ORDER BY o.ordering_seq LIMIT 1) h
        WHERE picloud._unclaimed(h.claimed_by) AND h.due_at <= now()
          AND h.script_id <> ALL (v_full)
          -- The lanes run a key's first event when it is theirs (as for unordered events).
          AND NOT ((p_leave_sql_lane OR p_leave_http_lane) AND h.attempt_count = 0 AND h.first_attempt_at IS NULL AND h.reply_to IS NULL
                   AND coalesce((SELECT s.kind = 'sql' AND p_leave_sql_lane OR s.kind = 'http' AND p_leave_http_lane
                                     FROM picloud.scripts s
                                 WHERE s.app_id = h.app_id AND s.script_id = h.script_id), false)
                   AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                                   WHERE l.app_id = h.app_id AND l.script_id = h.script_id))
          AND NOT (p_app_cap IS NOT NULL AND h.app_id = ANY (v_running_apps)
                   AND v_running_counts[array_position(v_running_apps, h.app_id)] >= p_app_cap)
          AND NOT EXISTS (SELECT 1 FROM picloud.key_blocks b
                          WHERE b.app_id = k.app_id AND b.ordering_key = k.ordering_key)
    ), locked_keyed AS (
        SELECT o.app_id, o.event_id, o.due_at, o.priority, o.script_id, o.ctid AS tid
        FROM picloud.outbox o JOIN key_heads h ON o.app_id = h.app_id AND o.event_id = h.event_id
        WHERE picloud._unclaimed(o.claimed_by) AND o.due_at <= now()
        FOR UPDATE OF o SKIP LOCKED
    ), ranked AS (
        -- Within its cap, each app's rows in order: its heads first, then by priority and due
        -- time, and rows due at the same time (enqueued by one statement) in the order they were
        -- written; within a limited handler's room, the handler's rows in the same order.
        SELECT c.app_id, c.event_id, c.rank_, c.due_at, c.script_id,
               row_number() OVER (PARTITION BY c.app_id ORDER BY c.rank_, c.priority, c.due_at, c.tid) AS nth,
               row_number() OVER (PARTITION BY c.script_id ORDER BY c.rank_, c.priority, c.due_at, c.tid) AS nth_of_handler
        FROM (SELECT l.app_id, l.event_id, 0 AS rank_, l.due_at, l.priority, l.script_id, l.tid FROM locked_heads l
              UNION ALL
              SELECT f.app_id, f.event_id, 1, f.due_at, f.priority, f.script_id, f.tid FROM fill_prioritized f
              UNION ALL
              SELECT f.app_id, f.event_id, 1, f.due_at, f.priority, f.script_id, f.tid FROM fill_usual f
              UNION ALL
              SELECT k.app_id, k.event_id, 1, k.due_at, k.priority, k.script_id, k.tid FROM locked_keyed k) c
    ), rooms AS (
        -- What is left of each limited handler's limit (see picloud._handler_room), once per
        -- handler (a CTE with a volatile function is evaluated once).
        SELECT l.script_id, picloud._handler_room(l.app_id, l.script_id, l.max_concurrency) AS room
        FROM (SELECT DISTINCT k.app_id, k.script_id, h.max_concurrency
              FROM ranked k
              JOIN picloud.handler_limits h ON h.app_id = k.app_id AND h.script_id = k.script_id) l
    ), due AS (
        -- Heads first, then the apps' next rows in turn; the answer keeps this order.
        SELECT k.app_id, k.event_id,
               row_number() OVER (ORDER BY k.rank_, k.nth, k.due_at) AS place
        FROM ranked k
        LEFT JOIN rooms m ON m.script_id = k.script_id
        WHERE (p_app_cap IS NULL
               OR k.nth <= p_app_cap - coalesce(v_running_counts[array_position(v_running_apps, k.app_id)], 0))
          AND (m.script_id IS NULL OR k.nth_of_handler <= m.room)
        ORDER BY k.rank_, k.nth, k.due_at
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
        RETURNING o AS claimed_row, due.place
    )
    SELECT a.* FROM picloud._claim_answers(ARRAY(SELECT c.claimed_row FROM claimed c ORDER BY c.place)) a;
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    PERFORM picloud._note_claim(v_claimed);
END
$$;

-- What is left of a limited handler's max_concurrency for the calling claim: its limit less
-- the events claimed now by every worker, counted under the handler's advisory lock (held to
-- the end of the claim's transaction) so that two claims never both take the last places.
-- Volatile, so its count sees every claim committed before the lock was granted. A claim that
-- finds the lock taken gets no room (0) rather than waiting: another claim is taking the
-- handler's places right now, and waiting for locks taken in no fixed order could deadlock.
CREATE FUNCTION picloud._handler_room(p_app_id uuid, p_script_id uuid, p_max_concurrency integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT pg_catalog.pg_try_advisory_xact_lock(1885954925,
             pg_catalog.hashtext(p_app_id::text || ':' || p_script_id::text)) THEN
        RETURN 0;
    END IF;
    RETURN p_max_concurrency - (SELECT count(*)::integer FROM picloud.outbox o
                                WHERE o.claimed_by IS NOT NULL AND o.app_id = p_app_id
                                  AND o.script_id = p_script_id);
END
$$;

-- When the next unclaimed event becomes due (NULL when none is waiting). An idle supervisor
-- sleeps until then rather than a whole poll interval, so retries and events scheduled with
-- run_at start on time: no notification announces them. One probe of outbox_due_idx.
CREATE FUNCTION picloud.picloud_next_due_at() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT min(o.due_at) FROM picloud.outbox o WHERE picloud._unclaimed(o.claimed_by));
END
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

-- Counts one outcome in picloud.event_counts (see there). Called where an event completes,
-- fails an attempt, or is dead-lettered; the row belongs to this backend, so the upsert never
-- waits on another session.
CREATE FUNCTION picloud._count_outcome(
    p_app_id uuid, p_source text, p_completed integer, p_failed integer, p_dead_lettered integer)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO picloud.event_counts AS c
        (app_id, source, minute, backend_pid, completed, failed, dead_lettered)
    VALUES (p_app_id, p_source, date_trunc('minute', now()), pg_backend_pid(),
            p_completed, p_failed, p_dead_lettered)
    ON CONFLICT ON CONSTRAINT event_counts_pkey DO UPDATE
    SET completed = c.completed + EXCLUDED.completed,
        failed = c.failed + EXCLUDED.failed,
        dead_lettered = c.dead_lettered + EXCLUDED.dead_lettered;
END
$$;

-- Completes claimed events whose handlers ran outside the database (http, command) in one
-- transaction, so that a supervisor pays one commit for all the events that finished while it
-- claimed. Returns the ids of the events completed; an event this worker no longer holds (its
-- lease expired: the row went back to the queue or to another worker) is left out, and nothing
-- is done for it. p_results, when given, holds each event's handler reply (for a synchronous
-- call's inbox), element for element.
-- Counts deleted outbox rows as completed; when one had an ordering key, wakes an idle
-- supervisor at commit: the key's next event can run now, and no enqueue announces it.
CREATE FUNCTION picloud._count_completed(p_done picloud.outbox[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._count_outcome(c.app_id, c.source, c.n, 0, 0)
    FROM (SELECT u.app_id, u.source, count(*)::integer AS n
          FROM unnest(p_done) u GROUP BY u.app_id, u.source) c;
    IF EXISTS (SELECT 1 FROM unnest(p_done) u WHERE u.ordering_key IS NOT NULL) THEN
        PERFORM picloud._wake_at_commit();
    END IF;
END
$$;

CREATE FUNCTION picloud.picloud_complete_many(p_app_ids uuid[], p_event_ids uuid[], p_worker text,
                                              p_results jsonb[] DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_done picloud.outbox[];
    r picloud.outbox;
BEGIN
    IF p_app_ids IS NULL OR p_event_ids IS NULL OR p_worker IS NULL THEN
        PERFORM picloud._null_argument('{app_ids,event_ids,worker}',
            ARRAY[p_app_ids IS NULL, p_event_ids IS NULL, p_worker IS NULL]);
    END IF;
    IF cardinality(p_app_ids) <> cardinality(p_event_ids)
       OR cardinality(p_results) <> cardinality(p_event_ids) THEN
        PERFORM picloud._invalid(format(
            'app_ids, event_ids and results must have one element per event, got %s, %s and %s',
            cardinality(p_app_ids), cardinality(p_event_ids), coalesce(cardinality(p_results)::text, 'none')));
    END IF;
    IF cardinality(p_event_ids) > 10000 THEN
        PERFORM picloud._invalid(format('at most 10000 events at once, got %s', cardinality(p_event_ids)));
    END IF;
    WITH done AS (
        DELETE FROM picloud.outbox o
        USING unnest(p_app_ids, p_event_ids) AS k(app_id, event_id)
        WHERE o.app_id = k.app_id AND o.event_id = k.event_id AND o.claimed_by = p_worker
        RETURNING o AS row)
    SELECT coalesce(array_agg(done.row), '{}') INTO v_done FROM done;
    PERFORM picloud._count_completed(v_done);
    FOR r IN SELECT * FROM unnest(v_done) u WHERE u.reply_to IS NOT NULL LOOP
        PERFORM picloud._reply(r, true, p_results[array_position(p_event_ids, r.event_id)], NULL);
    END LOOP;
    RETURN QUERY SELECT u.event_id FROM unnest(v_done) u;
END
$$;

-- Completes one claimed event whose handler ran outside the database; PC002 if this worker no
-- longer holds it.
CREATE FUNCTION picloud.picloud_complete(p_app_id uuid, p_event_id uuid, p_worker text, p_result jsonb DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_app_id IS NULL OR p_event_id IS NULL OR p_worker IS NULL THEN
        PERFORM picloud._null_argument('{app_id,event_id,worker}',
            ARRAY[p_app_id IS NULL, p_event_id IS NULL, p_worker IS NULL]);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM picloud.picloud_complete_many(
                       ARRAY[p_app_id], ARRAY[p_event_id], p_worker, ARRAY[p_result])) THEN
        PERFORM picloud._lease_lost(p_app_id, p_event_id, p_worker);
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
