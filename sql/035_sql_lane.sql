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
-- way. Only first attempts of asynchronous events whose sql handler has no concurrency limit
-- enter the lane (no attempt counted, no first_attempt_at), and of an ordered key only its
-- first event; retries and synchronous calls never do, nor events a lane gave up on
-- (picloud_leave_sql_lane).

-- Locks up to p_batch events that may run in a lane of handlers of kind p_kind (the sql lanes
-- here, the http lanes in sql/036_http_lane.sql), by priority, then oldest first, in the
-- caller's transaction, and returns them with their row address (valid while the lock is held: the
-- lane never updates a locked row) and their handler's timeout.
--
-- A batch holds the events of one app, and apps take turns (README, "Fairness between apps"):
-- the apps with lane events are visited from a random one on, and the first whose lane lock is
-- free gets the batch. The lane lock is the app's row in picloud.apps, locked FOR NO KEY
-- UPDATE for the batch's transaction: no tenant can lock it (tenants have no UPDATE on apps),
-- and enqueues never touch it. So one app's slow handlers hold at most one lane while another
-- app has lane events; when every app with lane events is in a lane already, a lane shares the
-- first one, so a single busy app still gets every lane.
CREATE FUNCTION picloud._lock_lane(p_batch integer, p_kind text)
RETURNS TABLE (app_id uuid, event_id uuid, row_tid tid, timeout_ms integer)
LANGUAGE plpgsql
-- A backlog makes the planner's estimates large enough to JIT-compile this small query,
-- which costs more than running it.
SET jit = off
-- An index-ordered scan (outbox_due_idx) must drive the plan: a hash
-- or merge join, or a sort, would read and sort the whole backlog for each batch. With these
-- off (only inside this function, where no handler runs) the handler is looked up in a nested
-- loop behind a memoize node: one lookup per distinct handler in the batch, not one per event.
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_sort = off
-- One plan per statement kept per session, not one per call (see picloud_claim).
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_locked integer;
    v_app uuid;
    v_candidate uuid;
    v_shared uuid;
    v_start uuid := gen_random_uuid();
    v_first_app uuid;
    v_after_key text;
    v_keys text[];
    v_keyed integer;
BEGIN
    IF p_batch IS NULL OR p_kind IS NULL THEN
        PERFORM picloud._null_argument('{batch,kind}', ARRAY[p_batch IS NULL, p_kind IS NULL]);
    END IF;
    IF p_batch NOT BETWEEN 1 AND 10000 THEN
        PERFORM picloud._invalid(format('batch must be between 1 and 10000, got %s', p_batch));
    END IF;
    -- A lane of a kind no handler has (http lanes in a database of sql handlers) looks no
    -- further: the walk below would scan the oldest rows of every app for nothing.
    IF NOT EXISTS (SELECT 1 FROM picloud.scripts s WHERE s.kind = p_kind) THEN
        PERFORM picloud._note_claim(0);
        RETURN;
    END IF;
    -- Apps with rows in the outbox, from a random one on (one probe of outbox_pkey each, at
    -- most 100 apps per batch), that have a lane event among their newest 1,000 rows. Both walk
    -- outbox_pkey downwards, so each probe lands on an app's newest entries: a drain empties an
    -- app's part of the index from its oldest end (event ids are time-ordered), and until VACUUM
    -- removes the entries of the deleted rows, a probe from that end passes over every one
    -- (in a 300,000-event drain, most of a lane's time: perf and EXPLAIN's buffer counts).
    v_first_app := coalesce(
        (SELECT o.app_id FROM picloud.outbox o WHERE o.app_id < v_start ORDER BY o.app_id DESC LIMIT 1),
        (SELECT o.app_id FROM picloud.outbox o ORDER BY o.app_id DESC LIMIT 1));
    FOR v_candidate IN
        WITH RECURSIVE apps (app_id, n) AS (
            SELECT v_first_app, 1 WHERE v_first_app IS NOT NULL
            UNION ALL
            SELECT nxt.app_id, a.n + 1
            FROM apps a
            CROSS JOIN LATERAL (SELECT coalesce(
                      (SELECT o.app_id FROM picloud.outbox o WHERE o.app_id < a.app_id ORDER BY o.app_id DESC LIMIT 1),
                      (SELECT o.app_id FROM picloud.outbox o ORDER BY o.app_id DESC LIMIT 1)) AS app_id) nxt
            WHERE a.n < 100 AND nxt.app_id <> v_first_app
        )
        SELECT a.app_id FROM apps a
        WHERE EXISTS (
            SELECT 1
            FROM (SELECT o.script_id, o.claimed_by, o.due_at, o.attempt_count, o.first_attempt_at,
                         o.reply_to, o.ordering_key
                  FROM picloud.outbox o WHERE o.app_id = a.app_id ORDER BY o.event_id DESC LIMIT 1000) w
            JOIN picloud.scripts s ON s.app_id = a.app_id AND s.script_id = w.script_id
            WHERE picloud._unclaimed(w.claimed_by) AND w.due_at <= now() AND w.attempt_count = 0
              AND w.first_attempt_at IS NULL AND w.reply_to IS NULL
              AND s.kind = p_kind
              AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                              WHERE l.app_id = a.app_id AND l.script_id = w.script_id))
    LOOP
        PERFORM FROM picloud.apps ap WHERE ap.app_id = v_candidate FOR NO KEY UPDATE SKIP LOCKED;
        IF FOUND THEN
            v_app := v_candidate;
            EXIT;
        END IF;
        v_shared := coalesce(v_shared, v_candidate);
    END LOOP;
    v_app := coalesce(v_app, v_shared);
    -- The scan passes over other events to find lane events wherever they are in the queue; a
    -- lane that finds none waits longer and longer before looking again (see
    -- supervisor/src/lane.rs).
    v_locked := 0;
    IF v_app IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM picloud.outbox o
        WHERE o.app_id = v_app AND picloud._unclaimed(o.claimed_by) AND o.ordering_key IS NULL AND o.priority <> 0) THEN
        -- The usual case, every waiting event of the app of priority 0: its oldest, in one
        -- index-ordered scan of outbox_due_idx.
        RETURN QUERY
        SELECT o.app_id, o.event_id, o.ctid, s.timeout_ms
        FROM picloud.outbox o
        JOIN picloud.scripts s ON s.app_id = o.app_id AND s.script_id = o.script_id
        WHERE o.app_id = v_app AND picloud._unclaimed(o.claimed_by) AND o.due_at <= now()
          AND o.attempt_count = 0 AND o.first_attempt_at IS NULL AND o.reply_to IS NULL
          -- Ordered events are taken below, one per key.
          AND o.ordering_key IS NULL
          -- A handler with a concurrency limit has its events counted by claims.
          AND s.kind = p_kind
          AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                          WHERE l.app_id = o.app_id AND l.script_id = o.script_id)
        ORDER BY o.due_at
        LIMIT p_batch
        FOR UPDATE OF o SKIP LOCKED;
        GET DIAGNOSTICS v_locked = ROW_COUNT;
    ELSIF v_app IS NOT NULL THEN
        -- Priorities in use: the app's best lane events by priority, then due time - its rows of
        -- other priorities (outbox_app_priority_idx) merged with its rows of priority 0 - twice
        -- as many as wanted for those another lane holds, then locked.
        RETURN QUERY
        WITH best AS MATERIALIZED (
            SELECT w.event_id, w.priority, w.due_at
            FROM (SELECT o.app_id, o.event_id, o.due_at, o.priority, o.script_id, o.attempt_count,
                         o.first_attempt_at, o.reply_to
                  FROM picloud.outbox o
                  WHERE o.app_id = v_app AND picloud._unclaimed(o.claimed_by) AND o.ordering_key IS NULL
                    AND o.priority <> 0 AND o.due_at <= now()
                  UNION ALL
                  SELECT o.app_id, o.event_id, o.due_at, o.priority, o.script_id, o.attempt_count,
                         o.first_attempt_at, o.reply_to
                  FROM picloud.outbox o
                  WHERE o.app_id = v_app AND picloud._unclaimed(o.claimed_by) AND o.ordering_key IS NULL
                    AND o.priority = 0 AND o.due_at <= now()) w
            JOIN picloud.scripts s ON s.app_id = w.app_id AND s.script_id = w.script_id
            WHERE w.attempt_count = 0 AND w.first_attempt_at IS NULL AND w.reply_to IS NULL
              AND s.kind = p_kind
              AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                              WHERE l.app_id = w.app_id AND l.script_id = w.script_id)
            ORDER BY w.priority, w.due_at
            LIMIT p_batch * 2)
        SELECT o.app_id, o.event_id, o.ctid, s.timeout_ms
        FROM best b
        JOIN picloud.outbox o ON o.app_id = v_app AND o.event_id = b.event_id
        JOIN picloud.scripts s ON s.app_id = o.app_id AND s.script_id = o.script_id
        WHERE picloud._unclaimed(o.claimed_by) AND o.due_at <= now()
          AND o.attempt_count = 0 AND o.first_attempt_at IS NULL AND o.reply_to IS NULL
          AND o.ordering_key IS NULL
        ORDER BY b.priority, b.due_at
        LIMIT p_batch
        FOR UPDATE OF o SKIP LOCKED;
        GET DIAGNOSTICS v_locked = ROW_COUNT;
    END IF;
    -- Ordered events: the first event of each of the app's keys (by place, ordering_seq) when
    -- the lane may run it, visiting up to p_batch * 2 keys in key order from where this
    -- session's previous batch of the app stopped. A key's later events are never taken: the
    -- first is still in the outbox (locked by this or another lane, claimed, or waiting) until
    -- the transaction that ran it commits, so a key's events run one at a time, in order.
    IF v_app IS NOT NULL AND v_locked < p_batch AND EXISTS (
        SELECT 1 FROM picloud.outbox o WHERE o.app_id = v_app AND o.ordering_key IS NOT NULL) THEN
        v_after_key := CASE WHEN current_setting('picloud.lane_after_app', true) = v_app::text
                            THEN coalesce(current_setting('picloud.lane_after_key', true), '') ELSE '' END;
        WITH RECURSIVE keys (ordering_key, n) AS (
            SELECT f.ordering_key, 1
            FROM (SELECT coalesce(
                      (SELECT o.ordering_key FROM picloud.outbox o
                       WHERE o.app_id = v_app AND o.ordering_key > v_after_key
                       ORDER BY o.ordering_key LIMIT 1),
                      (SELECT o.ordering_key FROM picloud.outbox o
                       WHERE o.app_id = v_app AND o.ordering_key IS NOT NULL
                       ORDER BY o.ordering_key LIMIT 1)) AS ordering_key) f
            WHERE f.ordering_key IS NOT NULL
            UNION ALL
            SELECT nxt.ordering_key, k.n + 1
            FROM keys k
            CROSS JOIN LATERAL (SELECT o.ordering_key FROM picloud.outbox o
                                WHERE o.app_id = v_app AND o.ordering_key > k.ordering_key
                                ORDER BY o.ordering_key LIMIT 1) nxt
            WHERE k.n < p_batch * 2
        )
        SELECT array_agg(k.ordering_key ORDER BY k.n) INTO v_keys FROM keys k;
        PERFORM pg_catalog.set_config('picloud.lane_after_app', v_app::text, false);
        PERFORM pg_catalog.set_config('picloud.lane_after_key', coalesce(v_keys[cardinality(v_keys)], ''), false);
        RETURN QUERY
        SELECT o.app_id, o.event_id, o.ctid, s.timeout_ms
        FROM unnest(v_keys) WITH ORDINALITY AS k(ordering_key, n)
        CROSS JOIN LATERAL (SELECT w.event_id FROM picloud.outbox w
                            WHERE w.app_id = v_app AND w.ordering_key = k.ordering_key
                            ORDER BY w.ordering_seq LIMIT 1) h
        JOIN picloud.outbox o ON o.app_id = v_app AND o.event_id = h.event_id
        JOIN picloud.scripts s ON s.app_id = o.app_id AND s.script_id = o.script_id
        WHERE picloud._unclaimed(o.claimed_by) AND o.due_at <= now()
          AND o.attempt_count = 0 AND o.first_attempt_at IS NULL AND o.reply_to IS NULL
          AND s.kind = p_kind
          AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                          WHERE l.app_id = o.app_id AND l.script_id = o.script_id)
          AND NOT EXISTS (SELECT 1 FROM picloud.key_blocks b
                          WHERE b.app_id = v_app AND b.ordering_key = k.ordering_key)
        ORDER BY k.n
        LIMIT p_batch - v_locked
        FOR UPDATE OF o SKIP LOCKED;
        GET DIAGNOSTICS v_keyed = ROW_COUNT;
        v_locked := v_locked + v_keyed;
    END IF;
    -- Like an empty claim, an empty batch raises the idle mark that makes enqueues wake us.
    PERFORM picloud._note_claim(v_locked);
END
$$;

-- The sql lane's batch (see picloud._lock_lane).
CREATE FUNCTION picloud.picloud_lock_sql_lane(p_batch integer)
RETURNS TABLE (app_id uuid, event_id uuid, row_tid tid, timeout_ms integer)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM picloud._lock_lane(p_batch, 'sql');
END
$$;

-- Readies a locked sql lane batch for picloud_run_sql_lane_locked later in this transaction:
-- its rows' ids and addresses in the transaction-local settings that function reads, and
-- statement_timeout for the rest of the transaction set to the shortest of its handlers'
-- timeouts (30 s for a handler without one; unchanged for an empty batch). The one writer of
-- those settings, for the lanes' two locks.
CREATE FUNCTION picloud._ready_sql_lane_batch(p_event_ids uuid[], p_row_tids tid[], p_timeouts integer[])
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('picloud.sql_lane_row_tids', coalesce(p_row_tids::text, ''), true);
    PERFORM set_config('picloud.sql_lane_event_ids', coalesce(p_event_ids::text, ''), true);
    IF cardinality(p_row_tids) > 0 THEN
        PERFORM set_config('statement_timeout',
            greatest((SELECT min(coalesce(t.timeout_ms, 30000)) FROM unnest(p_timeouts) AS t(timeout_ms)), 1)::text,
            true);
    END IF;
END
$$;

-- One round trip per batch: locks like picloud_lock_sql_lane and readies the batch for
-- picloud_run_sql_lane_locked, so that a supervisor can send BEGIN, this, the run and COMMIT
-- together. The batch's row addresses and ids are kept in transaction-local settings
-- (picloud.sql_lane_row_tids, picloud.sql_lane_event_ids), and statement_timeout is set for the
-- rest of the transaction to the shortest timeout among the batch's handlers: the next
-- statement, the run, is bounded by it as the separate SET LOCAL used to bound it.
CREATE FUNCTION picloud.picloud_lock_sql_lane_for_run(p_batch integer)
RETURNS TABLE (app_id uuid, event_id uuid, row_tid tid, timeout_ms integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_app_ids uuid[];
    v_event_ids uuid[];
    v_row_tids tid[];
    v_timeouts integer[];
BEGIN
    SELECT array_agg(l.app_id), array_agg(l.event_id), array_agg(l.row_tid), array_agg(l.timeout_ms)
    INTO v_app_ids, v_event_ids, v_row_tids, v_timeouts
    FROM picloud.picloud_lock_sql_lane(p_batch) l;
    PERFORM picloud._ready_sql_lane_batch(v_event_ids, v_row_tids, v_timeouts);
    RETURN QUERY SELECT * FROM unnest(v_app_ids, v_event_ids, v_row_tids, v_timeouts);
END
$$;

-- A lone event's batch: what picloud_lock_sql_lane_for_run readies, for exactly the given event
-- when a sql lane would take it (its first attempt, due and unclaimed, asynchronous, without
-- an ordering key, its handler of kind sql without a concurrency limit), and nothing
-- otherwise. An enqueue that finds a supervisor idle names its event in the wake-up when it is
-- its transaction's only sql-lane event (extension/src/api/wake.rs); the woken lane locks it by
-- its key instead of walking the queue's apps for a batch - on an idle queue there is nothing
-- to share fairly, and the walk was the larger part of the time between the wake-up and the
-- handler's start (docs/benchmarks.md, L1). Like any lane batch it records whether it found
-- anything (the idle mark, picloud._note_claim).
CREATE FUNCTION picloud.picloud_lock_sql_lane_event_for_run(p_app_id uuid, p_event_id uuid)
RETURNS TABLE (app_id uuid, event_id uuid, row_tid tid, timeout_ms integer)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_row_tid tid;
    v_timeout integer;
BEGIN
    IF p_app_id IS NULL OR p_event_id IS NULL THEN
        PERFORM picloud._null_argument('{app_id,event_id}', ARRAY[p_app_id IS NULL, p_event_id IS NULL]);
    END IF;
    SELECT o.ctid, s.timeout_ms INTO v_row_tid, v_timeout
    FROM picloud.outbox o
    JOIN picloud.scripts s ON s.app_id = o.app_id AND s.script_id = o.script_id
    WHERE o.app_id = p_app_id AND o.event_id = p_event_id
      AND picloud._unclaimed(o.claimed_by) AND o.due_at <= now()
      AND o.attempt_count = 0 AND o.first_attempt_at IS NULL AND o.reply_to IS NULL
      AND o.ordering_key IS NULL
      AND s.kind = 'sql'
      AND NOT EXISTS (SELECT 1 FROM picloud.handler_limits l
                      WHERE l.app_id = o.app_id AND l.script_id = o.script_id)
    FOR UPDATE OF o SKIP LOCKED;
    PERFORM picloud._note_claim(CASE WHEN v_row_tid IS NULL THEN 0 ELSE 1 END);
    IF v_row_tid IS NULL THEN
        RETURN;
    END IF;
    PERFORM picloud._ready_sql_lane_batch(ARRAY[p_event_id], ARRAY[v_row_tid], ARRAY[v_timeout]);
    RETURN QUERY SELECT p_app_id, p_event_id, v_row_tid, v_timeout;
END
$$;

-- Runs the batch picloud_lock_sql_lane_for_run locked earlier in this transaction (nothing if
-- it locked none), as picloud_run_sql_lane would, and forgets it.
CREATE FUNCTION picloud.picloud_run_sql_lane_locked()
RETURNS TABLE (ran integer, left_app_ids uuid[], left_event_ids uuid[])
LANGUAGE plpgsql AS $$
DECLARE
    v_row_tids text := coalesce(current_setting('picloud.sql_lane_row_tids', true), '');
    v_event_ids text := coalesce(current_setting('picloud.sql_lane_event_ids', true), '');
BEGIN
    IF v_row_tids = '' THEN
        RETURN QUERY SELECT 0, '{}'::uuid[], '{}'::uuid[];
        RETURN;
    END IF;
    PERFORM set_config('picloud.sql_lane_row_tids', '', true);
    PERFORM set_config('picloud.sql_lane_event_ids', '', true);
    RETURN QUERY SELECT * FROM picloud.picloud_run_sql_lane(v_event_ids::uuid[], v_row_tids::tid[]);
END
$$;

-- The outbox rows at the given addresses, by a TID scan: the rows a lane locked in this
-- transaction (an address still holds the event the lane locked: the lock keeps the row from
-- being updated or removed by anyone else, and the lane itself changes nothing before it
-- deletes). The planner's cost model would rather read the whole table, or walk the whole due
-- index testing every row against the list, than fetch a few hundred rows by address: the
-- second makes draining a queue of n events cost n^2 row visits. So only the TID scan is left
-- to it - in this function alone: a SET clause holds for everything a function calls, and the
-- lanes' other statements (the lock's walk of the apps, the handlers' and principals' lookups)
-- need their indexes. (Planned with them off, the lock's look at an app's newest rows read
-- all 1,000 of them for every http batch.)
-- (PL/pgSQL, whose plan is kept for the session; a SQL function with SET clauses is planned
-- again by every statement that calls it.)
CREATE FUNCTION picloud._outbox_at(p_row_tids tid[])
RETURNS TABLE (row_tid tid, event picloud.outbox)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET enable_indexscan = off
SET enable_bitmapscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY SELECT o.ctid, o FROM picloud.outbox o WHERE o.ctid = ANY(p_row_tids);
END
$$;

-- The events at the given row addresses, grouped by app, handler, depth and the principal they
-- run as, as the JSON their handlers receive, with their ids and addresses in the same order;
-- with the principal, or why it may not run. The principal is picloud._handler_principal's,
-- the rule _become_event applies, worked out once per trigger and handler: the events of
-- different triggers that one role registered share a group, so the ticks of a hundred cron
-- triggers of one app due at the same second run in one statement, not a hundred (a group
-- costs a principal switch and a statement parsed and planned). picloud._outbox_at finds them.
CREATE FUNCTION picloud._sql_lane_groups(p_row_tids tid[])
RETURNS TABLE (app_id uuid, script_id uuid, depth integer, principal name, problem text,
               event_ids uuid[], row_tids tid[], events jsonb[])
LANGUAGE plpgsql STABLE
SET jit = off
-- PL/pgSQL would plan this afresh on every call (each custom plan looks cheaper than the
-- generic one). One plan kept per session, here and in the lane's other functions, took a
-- one-event batch's run and commit from 1.18 ms to 0.93 ms (as for picloud_claim).
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    -- (The rows are tested below, after the join: tested here, the planner would expect a
    -- row or two of this CTE and join it to the principals by comparing every event with
    -- every principal - 500 events of 500 triggers took 90 ms so.)
    WITH locked AS MATERIALIZED (
        SELECT a.row_tid, (a.event).* FROM picloud._outbox_at(p_row_tids) a
    ), principals AS MATERIALIZED (
        SELECT k.app_id, k.trigger_id, k.script_id, h.principal, h.problem
        FROM (SELECT DISTINCT l.app_id, l.trigger_id, l.script_id FROM locked l) k
        CROSS JOIN LATERAL picloud._handler_principal(k.app_id, k.trigger_id, k.script_id) h)
    SELECT o.app_id, o.script_id, o.depth::integer, p.principal, p.problem,
           -- Within a group, by priority then due time, as the batch was taken.
           array_agg(o.event_id ORDER BY o.priority, o.due_at, o.event_id),
           array_agg(o.row_tid ORDER BY o.priority, o.due_at, o.event_id),
           array_agg(picloud._event_jsonb(o.event_id, o.app_id, o.source, o.op, o.payload,
                                          o.depth, o.attempt_count + 1, o.trigger_id, o.script_id)
                     ORDER BY o.priority, o.due_at, o.event_id)
    FROM locked o
    -- The nil uuid stands for "no trigger" in the hash key only; the exact test follows it.
    JOIN principals p
      ON p.app_id = o.app_id AND p.script_id = o.script_id
     AND coalesce(p.trigger_id, '00000000-0000-0000-0000-000000000000'::uuid)
       = coalesce(o.trigger_id, '00000000-0000-0000-0000-000000000000'::uuid)
     AND p.trigger_id IS NOT DISTINCT FROM o.trigger_id
    WHERE picloud._unclaimed(o.claimed_by) AND o.attempt_count = 0 AND o.first_attempt_at IS NULL
      AND o.reply_to IS NULL
    GROUP BY o.app_id, o.script_id, o.depth, p.principal, p.problem;
END
$$;

-- Deletes the lane's events at the given addresses once their handlers ran and counts them as
-- completed; returns how many. Same TID scan as above.
CREATE FUNCTION picloud._sql_lane_complete(p_row_tids tid[]) RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_indexscan = off
SET enable_bitmapscan = off
SET jit = off
-- One plan per session, not one per call (as for the groups above).
SET plan_cache_mode = force_generic_plan
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
          AND picloud._unclaimed(o.claimed_by) AND o.attempt_count = 0 AND o.first_attempt_at IS NULL
      AND o.reply_to IS NULL
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
LANGUAGE plpgsql
-- One plan per statement kept per session, not one per call (see picloud_claim).
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    g record;
    v_function regprocedure;
    v_kind text;
    v_token bigint;
    v_batch_call text;
    v_one_call text;
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
        IF g.problem IS NOT NULL OR v_kind IS DISTINCT FROM 'sql'
           OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc WHERE oid = v_function) THEN
            -- The ordinary path reports exactly why, as each event's error.
            v_left_apps := v_left_apps || array_fill(g.app_id, ARRAY[cardinality(g.event_ids)]);
            v_left := v_left || g.event_ids;
            CONTINUE;
        END IF;
        v_batch_call := format('SELECT pg_catalog.count(r) FROM (SELECT %s(e) AS r FROM pg_catalog.unnest($1) AS e) AS calls',
                               v_function::oid::regproc);
        v_one_call := format('SELECT pg_catalog.count(r) FROM (SELECT %s($1) AS r) AS call',
                             v_function::oid::regproc);
        -- From here until _unbecome this code runs with the principal's rights only, and with
        -- the session's default search_path (see _become_event), where a tenant's schema may
        -- shadow a built-in: every expression evaluated until then names its functions with
        -- their schema and uses no operator. count(r) uses each result, so no handler call is
        -- optimised away whatever its volatility.
        v_token := picloud._become_event(g.app_id, g.event_ids[1]);
        BEGIN
            EXECUTE v_batch_call USING g.events;
            v_done := pg_catalog.array_cat(v_done, g.row_tids);
        EXCEPTION WHEN OTHERS THEN
            -- Some handler call failed; find which, one savepoint per event.
            FOR i IN 1 .. pg_catalog.cardinality(g.events) LOOP
                BEGIN
                    EXECUTE v_one_call USING g.events[i];
                    v_done := pg_catalog.array_append(v_done, g.row_tids[i]);
                EXCEPTION WHEN OTHERS THEN
                    v_left_apps := pg_catalog.array_append(v_left_apps, g.app_id);
                    v_left := pg_catalog.array_append(v_left, g.event_ids[i]);
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
RETURNS SETOF picloud.claimed_event
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
        WHERE picloud._unclaimed(o.claimed_by)
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

-- Refuses event keys given as two arrays (app ids, event ids) that are NULL (22004) or of
-- different lengths (22023).
CREATE FUNCTION picloud._check_event_keys(p_app_ids uuid[], p_event_ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_app_ids IS NULL OR p_event_ids IS NULL THEN
        PERFORM picloud._null_argument('{app_ids,event_ids}', ARRAY[p_app_ids IS NULL, p_event_ids IS NULL]);
    END IF;
    IF cardinality(p_app_ids) <> cardinality(p_event_ids) THEN
        PERFORM picloud._invalid('app_ids and event_ids must have the same length');
    END IF;
END
$$;

-- Takes the given events out of the lanes (those still unclaimed first attempts) and returns
-- how many: what a supervisor does with the events of a lane batch that failed as a whole (its
-- statement timeout, a lost connection) or that failed by themselves. They are marked as tried
-- (first_attempt_at), so no lane takes them again, and the claims then run them one by one,
-- with the per-app cap, instead of the lane handing them all to its executors at once.
CREATE FUNCTION picloud.picloud_leave_sql_lane(p_app_ids uuid[], p_event_ids uuid[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_left integer;
BEGIN
    PERFORM picloud._check_event_keys(p_app_ids, p_event_ids);
    UPDATE picloud.outbox o SET first_attempt_at = now()
    FROM unnest(p_app_ids, p_event_ids) AS k(app_id, event_id)
    WHERE o.app_id = k.app_id AND o.event_id = k.event_id
      AND picloud._unclaimed(o.claimed_by) AND o.attempt_count = 0 AND o.first_attempt_at IS NULL;
    GET DIAGNOSTICS v_left = ROW_COUNT;
    IF v_left > 0 THEN
        PERFORM picloud._wake_at_commit();
    END IF;
    RETURN v_left;
END
$$;
