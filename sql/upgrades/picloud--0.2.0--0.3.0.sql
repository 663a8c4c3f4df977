-- picloud 0.2.0 -> 0.3.0: picloud_enqueue's common case in Rust. The PL/pgSQL implementation
-- becomes picloud._enqueue_general; picloud_enqueue becomes a C function that writes the
-- common case itself (also callable alone as picloud._enqueue_fast: Rust, a kept plan) and
-- hands every other call to picloud._enqueue_general. SQL lanes lock, run and commit a batch
-- in one round trip, and find their rows by TID scan only (the planner chose a walk of the
-- whole due index per batch). The event document handlers receive is built in Rust. The
-- lane's lock looks each handler up once per batch. The outbox's row check becomes domains on
-- its columns and a restrictive policy.
-- Frozen once released: later changes go in a new picloud--0.3.0--X.sql.
\echo Use "ALTER EXTENSION picloud UPDATE TO '0.3.0'" to load this file. \quit

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
    v_depth := picloud._admit(pg_catalog.pg_column_size(p_payload), p_depth);
    IF v_depth < 0 THEN
        PERFORM picloud._check_payload(p_payload);
        v_depth := picloud._event_depth(p_depth);
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


REVOKE ALL ON FUNCTION picloud._enqueue_general(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION picloud._enqueue_fast(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    picloud._enqueue_general(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text),
    picloud._enqueue_fast(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text)
TO picloud_user, picloud_supervisor;

-- Same signature and defaults: only the implementation changes, so its grants stay.
-- Enqueues one event in the caller's transaction and returns its id. It is delivered when
-- (and only if) the transaction commits. run_at delays it; reply_to names the caller's
-- inbox for a synchronous call (never retried); a repeated idempotency_key returns the first
-- event's id and enqueues nothing.
-- The common case costs one call of Rust (picloud._enqueue_fast's) and no PL/pgSQL; every
-- other call runs picloud._enqueue_general with the same arguments (see api/enqueue.rs).
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
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'picloud_enqueue';

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
    v_shortest integer;
BEGIN
    SELECT array_agg(l.app_id), array_agg(l.event_id), array_agg(l.row_tid), array_agg(l.timeout_ms),
           min(coalesce(l.timeout_ms, 30000))
    INTO v_app_ids, v_event_ids, v_row_tids, v_timeouts, v_shortest
    FROM picloud.picloud_lock_sql_lane(p_batch) l;
    PERFORM set_config('picloud.sql_lane_row_tids', coalesce(v_row_tids::text, ''), true);
    PERFORM set_config('picloud.sql_lane_event_ids', coalesce(v_event_ids::text, ''), true);
    IF v_shortest IS NOT NULL THEN
        PERFORM set_config('statement_timeout', greatest(v_shortest, 1)::text, true);
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_app_ids, v_event_ids, v_row_tids, v_timeouts);
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
REVOKE ALL ON FUNCTION picloud.picloud_lock_sql_lane_for_run(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION picloud.picloud_run_sql_lane_locked() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    picloud.picloud_lock_sql_lane_for_run(integer),
    picloud.picloud_run_sql_lane_locked()
TO picloud_supervisor;

-- The event document built in Rust, for handlers run by claims and by sql lanes.
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

CREATE OR REPLACE FUNCTION picloud._event_json(r picloud.outbox) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT picloud._event_jsonb(r.event_id, r.app_id, r.source, r.op, r.payload, r.depth,
                                r.attempt_count, r.trigger_id, r.script_id)
$$;
REVOKE ALL ON FUNCTION picloud._event_jsonb(uuid, uuid, text, text, jsonb, integer, integer, uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION picloud._event_jsonb(uuid, uuid, text, text, jsonb, integer, integer, uuid, uuid) TO picloud_supervisor;

-- The lane's row lookups: planner settings that leave only the TID scan, and the event
-- document from picloud._event_jsonb (see 035_sql_lane.sql).
-- The events at the given row addresses, grouped by handler, trigger and depth, as the JSON
-- their handlers receive, with their ids and addresses in the same order. A TID scan finds
-- them. An address still holds the event the lane locked: the lock keeps the row from being
-- updated or removed by anyone else, and the lane itself changes nothing before it deletes.
-- (The planner's cost model would rather read the whole table, or walk the whole due index
-- testing every row against the list, than fetch a few hundred rows by address: the second
-- makes draining a queue of n events cost n^2 row visits. So only the TID scan is left to it;
-- the settings are local to this function, and no handler runs in it.)
CREATE OR REPLACE FUNCTION picloud._sql_lane_groups(p_row_tids tid[])
RETURNS TABLE (app_id uuid, trigger_id uuid, script_id uuid, depth integer,
               event_ids uuid[], row_tids tid[], events jsonb[])
LANGUAGE sql STABLE
SET enable_seqscan = off
SET enable_indexscan = off
SET enable_bitmapscan = off
SET jit = off
AS $$
    SELECT o.app_id, o.trigger_id, o.script_id, o.depth,
           array_agg(o.event_id),
           array_agg(o.ctid),
           array_agg(picloud._event_jsonb(o.event_id, o.app_id, o.source, o.op, o.payload,
                                          o.depth, 1, o.trigger_id, o.script_id))
    FROM picloud.outbox o
    WHERE o.ctid = ANY(p_row_tids)
      AND o.claimed_by IS NULL AND o.attempt_count = 0 AND o.reply_to IS NULL
    GROUP BY o.app_id, o.trigger_id, o.script_id, o.depth
$$;

-- Deletes the lane's events at the given addresses once their handlers ran and counts them as
-- completed; returns how many. Same TID scan as above.
CREATE OR REPLACE FUNCTION picloud._sql_lane_complete(p_row_tids tid[]) RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_indexscan = off
SET enable_bitmapscan = off
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

-- The lane's lock looks each handler up once per batch (memoized nested loop), not per event.
-- Locks up to p_batch events that may run in the lane, oldest first, in the caller's
-- transaction, and returns them with their row address (valid while the lock is held: the
-- lane never updates a locked row) and their handler's timeout.
CREATE OR REPLACE FUNCTION picloud.picloud_lock_sql_lane(p_batch integer)
RETURNS TABLE (app_id uuid, event_id uuid, row_tid tid, timeout_ms integer)
LANGUAGE plpgsql
-- A backlog makes the planner's estimates large enough to JIT-compile this small query,
-- which costs more than running it.
SET jit = off
-- The same index-ordered scan as picloud_claim (outbox_due_idx) must drive the plan: a hash
-- or merge join, or a sort, would read and sort the whole backlog for each batch. With these
-- off (only inside this function, where no handler runs) the handler is looked up in a nested
-- loop behind a memoize node: one lookup per distinct handler in the batch, not one per event.
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_sort = off
AS $$
DECLARE
    v_locked integer;
BEGIN
    IF p_batch IS NULL THEN PERFORM picloud._null_argument('{batch}', '{t}'); END IF;
    IF p_batch NOT BETWEEN 1 AND 10000 THEN
        PERFORM picloud._invalid(format('batch must be between 1 and 10000, got %s', p_batch));
    END IF;
    -- The scan passes over other events to find lane events wherever they are in the queue; a
    -- lane that finds none waits longer and longer before looking again (see
    -- supervisor/src/lane.rs).
    RETURN QUERY
    SELECT o.app_id, o.event_id, o.ctid, s.timeout_ms
    FROM picloud.outbox o
    JOIN picloud.scripts s ON s.app_id = o.app_id AND s.script_id = o.script_id
    WHERE o.claimed_by IS NULL AND o.due_at <= now()
      AND o.attempt_count = 0 AND o.reply_to IS NULL
      AND s.kind = 'sql'
    ORDER BY o.due_at
    LIMIT p_batch
    FOR UPDATE OF o SKIP LOCKED;
    GET DIAGNOSTICS v_locked = ROW_COUNT;
    -- Like an empty claim, an empty batch raises the idle mark that makes enqueues wake us.
    PERFORM picloud._note_claim(v_locked);
END
$$;

-- The outbox's row check becomes domains on its columns (see sql/001_schema.sql for why), and
-- a restrictive policy keeps a claim and its lease together for roles under row-level security.
CREATE DOMAIN picloud.event_source AS text
    CHECK (VALUE IN ('kv', 'cron', 'pubsub', 'queue', 'email', 'dead_letter', 'enqueue'));
CREATE DOMAIN picloud.event_op AS text CHECK (length(VALUE) BETWEEN 1 AND 200);
CREATE DOMAIN picloud.non_negative_int AS integer CHECK (VALUE >= 0);
ALTER TABLE picloud.outbox
    DROP CONSTRAINT outbox_row_valid,
    ALTER COLUMN source TYPE picloud.event_source,
    ALTER COLUMN op TYPE picloud.event_op,
    ALTER COLUMN depth TYPE picloud.non_negative_int,
    ALTER COLUMN attempt_count TYPE picloud.non_negative_int;
DROP FUNCTION picloud._outbox_row_valid(text, text, integer, integer, boolean, boolean);
CREATE POLICY outbox_claim_has_lease ON picloud.outbox AS RESTRICTIVE FOR ALL
    USING (true)
    WITH CHECK ((claimed_by IS NULL) = (lease_expires_at IS NULL));
