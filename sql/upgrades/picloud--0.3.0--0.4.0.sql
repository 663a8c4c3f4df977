-- picloud 0.3.0 -> 0.4.0: one door for tenants.
--   * picloud_owner (not a superuser) owns the supervisor's functions, which become SECURITY
--     DEFINER; picloud_supervisor loses every right on picloud's tables and may call only those
--     functions and what every tenant may call.
--   * picloud._become(name, integer), which switched to any role by name, is replaced by
--     picloud._become_event(app_id, event_id), which switches only to the principal of that
--     event's trigger or handler.
--   * Every SQL and PL/pgSQL function gets a fixed search_path.
--   * Outbox values are bounded whoever writes them: due times and leases finite and between
--     1970 and 2200, depth and attempt count at most 1,000,000; the API takes run_at within
--     100 years of now. Producers may insert only the outbox columns an enqueue writes.
--   * picloud_fail takes the earliest time of the next attempt (HTTP Retry-After).
--   * Signing secrets for webhook deliveries (picloud.handler_secrets, picloud_set_handler_secret,
--     picloud_clear_handler_secrets, picloud_signing_secrets).
--   * Cron triggers (picloud.cron_trigger_details, picloud_create_cron_trigger and its kin).
--   * The outbox's indexes over waiting rows say "unclaimed" as picloud._unclaimed(claimed_by),
--     which the planner takes as opaque (its estimate of claimed_by IS NULL followed the last
--     ANALYZE's snapshot of a churning table), and so do the claims' and lanes' queries.
-- Frozen once released: later changes go in a new picloud--0.4.0--X.sql.
\echo Use "ALTER EXTENSION picloud UPDATE TO '0.4.0'" to load this file. \quit

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'picloud_owner') THEN
        CREATE ROLE picloud_owner NOLOGIN NOINHERIT BYPASSRLS;
    END IF;
END
$roles$;

-- Whether an outbox row waits for a claim, in a form the planner takes as opaque (Rust,
-- extension/src/api/outbox.rs); the indexes over waiting rows are declared with it.
CREATE FUNCTION picloud._unclaimed(claimed_by text) RETURNS boolean
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'picloud_unclaimed';
DROP INDEX picloud.outbox_due_idx;
CREATE INDEX outbox_due_idx ON picloud.outbox (due_at) WHERE picloud._unclaimed(claimed_by);

-- Bounded outbox values. Rows written before the bounds existed are brought inside them
-- first (a row outside them could only have been written by hand).
UPDATE picloud.outbox SET
    depth = least(depth, 1000000),
    attempt_count = least(attempt_count, 1000000),
    due_at = least(greatest(due_at, '1970-01-01 00:00:00+00'), '2200-01-01 00:00:00+00'),
    lease_expires_at = least(greatest(lease_expires_at, '1970-01-01 00:00:00+00'), '2200-01-01 00:00:00+00')
WHERE depth > 1000000 OR attempt_count > 1000000
   OR due_at NOT BETWEEN '1970-01-01 00:00:00+00' AND '2200-01-01 00:00:00+00'
   OR lease_expires_at NOT BETWEEN '1970-01-01 00:00:00+00' AND '2200-01-01 00:00:00+00';
ALTER DOMAIN picloud.non_negative_int DROP CONSTRAINT non_negative_int_check;
ALTER DOMAIN picloud.non_negative_int
    ADD CONSTRAINT non_negative_int_check CHECK (VALUE BETWEEN 0 AND 1000000);
CREATE DOMAIN picloud.event_time AS timestamptz
    CONSTRAINT event_time_check
    CHECK (VALUE BETWEEN '1970-01-01 00:00:00+00' AND '2200-01-01 00:00:00+00');
-- The restrictive policy names lease_expires_at: it goes while the column's type changes.
DROP POLICY outbox_claim_has_lease ON picloud.outbox;
ALTER TABLE picloud.outbox
    ALTER COLUMN due_at TYPE picloud.event_time,
    ALTER COLUMN lease_expires_at TYPE picloud.event_time;
CREATE POLICY outbox_claim_has_lease ON picloud.outbox AS RESTRICTIVE FOR ALL
    USING (true)
    WITH CHECK ((claimed_by IS NULL) = (lease_expires_at IS NULL));

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
CREATE OR REPLACE FUNCTION picloud._check_payload(p_payload jsonb) RETURNS void
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
-- Ordered delivery: ordering keys on the outbox and the dead letters, ordered KV triggers,
-- blocked keys, and the enqueue functions' new arguments (p_ordering_key, p_on_dead_letter).
ALTER TABLE picloud.outbox
    ADD COLUMN ordering_key text,
    ADD COLUMN ordering_seq bigint,
    ADD COLUMN ordering_blocks boolean;
-- The lanes' first question (picloud._lock_lane): is there any handler of their kind at all.
CREATE INDEX scripts_kind_idx ON picloud.scripts (kind);
CREATE INDEX outbox_ordering_idx ON picloud.outbox (app_id, ordering_key, ordering_seq)
    WHERE ordering_key IS NOT NULL;
CREATE SEQUENCE picloud.ordering_seq;
ALTER TABLE picloud.dead_letters
    ADD COLUMN ordering_key text,
    ADD COLUMN ordering_seq bigint,
    ADD COLUMN ordering_blocks boolean;
ALTER TABLE picloud.kv_trigger_details
    ADD COLUMN ordered boolean NOT NULL DEFAULT false,
    ADD COLUMN on_dead_letter text NOT NULL DEFAULT 'continue',
    ADD CONSTRAINT kv_trigger_details_on_dead_letter_valid CHECK (on_dead_letter IN ('continue', 'block'));
CREATE TABLE picloud.key_blocks (
    app_id          uuid        NOT NULL,
    ordering_key    text        NOT NULL,
    dead_letter_id  uuid        NOT NULL,
    blocked_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT key_blocks_pkey PRIMARY KEY (app_id, ordering_key),
    -- No foreign key to the dead letter: one would cost every deleted dead letter a lookup here
    -- (the housekeeper deletes them by the million), and a resolved dead letter, the only kind
    -- it deletes, has released its key already.
    CONSTRAINT key_blocks_app_fkey FOREIGN KEY (app_id)
        REFERENCES picloud.apps (app_id) ON DELETE CASCADE
);
CREATE INDEX key_blocks_dead_letter_idx ON picloud.key_blocks (app_id, dead_letter_id);
-- Priorities (p_priority, a trigger's default) and handler concurrency limits.
ALTER TABLE picloud.outbox ADD COLUMN priority smallint NOT NULL DEFAULT 0;
ALTER TABLE picloud.dead_letters ADD COLUMN priority smallint NOT NULL DEFAULT 0;
ALTER TABLE picloud.triggers ADD COLUMN priority smallint NOT NULL DEFAULT 0;
CREATE INDEX outbox_app_priority_idx ON picloud.outbox (app_id, priority, due_at)
    WHERE priority <> 0 AND ordering_key IS NULL AND picloud._unclaimed(claimed_by);
CREATE TABLE picloud.handler_limits (
    app_id           uuid        NOT NULL,
    script_id        uuid        NOT NULL,
    max_concurrency  integer     NOT NULL,
    set_by           name        NOT NULL DEFAULT current_user,
    set_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT handler_limits_pkey PRIMARY KEY (app_id, script_id),
    CONSTRAINT handler_limits_range CHECK (max_concurrency BETWEEN 1 AND 100000),
    CONSTRAINT handler_limits_script_fkey FOREIGN KEY (app_id, script_id)
        REFERENCES picloud.scripts (app_id, script_id) ON DELETE CASCADE
);
DROP FUNCTION picloud.picloud_enqueue(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text);
DROP FUNCTION picloud._enqueue_fast(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text);
DROP FUNCTION picloud._enqueue_general(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text);
DROP FUNCTION picloud.picloud_enqueue_bulk(uuid, text, text, jsonb[], uuid, uuid, integer, timestamptz);
DROP FUNCTION picloud.picloud_create_kv_trigger(uuid, text, uuid, text[], boolean);

-- Who a claimed event's handler runs as, or why it cannot run. The role comes from the
-- trigger only when the event's handler is that trigger's handler: a row that pairs one
-- registrant's trigger with another's handler must never borrow the trigger's rights.
-- (A dropped trigger leaves the handler's registrant.) A SQL function that qualifies every name
-- and operator and has no SET clause, so the planner inlines it into the query that calls it:
-- a lane batch or a claim of the ticks of a hundred cron triggers looks their principals up
-- with two joins instead of a hundred PL/pgSQL calls (about 40 us each).
CREATE OR REPLACE FUNCTION picloud._handler_principal(p_app_id uuid, p_trigger_id uuid, p_script_id uuid)
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

-- Event ids for a bulk enqueue, made in one call (Rust, extension/src/api/admission.rs).
CREATE FUNCTION picloud."_new_event_ids"(
	"count" INT /* i32 */
) RETURNS uuid[] /* alloc::vec::Vec<pgrx::datum::uuid::Uuid> */
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_new_event_ids_wrapper';

-- The position of the first of a bulk enqueue's payloads larger than p_max_bytes (as
-- picloud._payload_bytes measures it), or NULL; refuses one nested too deep (Rust,
-- extension/src/api/admission.rs: one call for the whole array).
CREATE FUNCTION picloud._oversized_payload(p_payloads jsonb[], p_max_bytes integer)
RETURNS integer
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'picloud_oversized_payload';

-- The whole contract of picloud_enqueue (below), every error included: every call that
-- picloud._enqueue_fast does not write comes here (internal).
CREATE OR REPLACE FUNCTION picloud._enqueue_general(
    p_app_id uuid,
    p_source text,
    p_op text,
    p_payload jsonb,
    p_script_id uuid,
    p_trigger_id uuid,
    p_depth integer,
    p_run_at timestamptz,
    p_reply_to text,
    p_idempotency_key text,
    p_ordering_key text,
    p_on_dead_letter text,
    p_priority smallint)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_event_id uuid := picloud._new_event_id();
    v_ordering_seq bigint;
    v_existing uuid;
    v_script_id uuid := p_script_id;
    v_depth integer;
    v_priority smallint := coalesce(p_priority, 0);
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
    IF p_source <> ALL (picloud._event_sources())
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
        IF p_priority IS NULL THEN
            v_priority := picloud._trigger_priority(p_app_id, p_trigger_id);
        END IF;
    END IF;
    IF p_reply_to IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM picloud.inboxes i WHERE i.app_id = p_app_id AND i.channel = p_reply_to) THEN
        PERFORM picloud._invalid(format('reply_to %L is not an open inbox of app %s', left(p_reply_to, 200), p_app_id),
            'Open one with picloud_open_inbox and LISTEN on the channel it returns.');
    END IF;
    IF p_ordering_key IS NOT NULL OR p_on_dead_letter IS NOT NULL THEN
        PERFORM picloud._check_ordering(p_ordering_key, p_on_dead_letter);
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
    IF p_ordering_key IS NOT NULL THEN
        v_ordering_seq := picloud._order_event(p_app_id, p_ordering_key);
    END IF;
    INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth, due_at, reply_to,
                                ordering_key, ordering_seq, ordering_blocks, priority)
    VALUES (p_app_id, v_event_id, p_source, p_op, p_trigger_id, v_script_id, p_payload, v_depth,
            coalesce(p_run_at, now()), p_reply_to,
            p_ordering_key, v_ordering_seq, CASE WHEN p_ordering_key IS NOT NULL THEN p_on_dead_letter = 'block' END,
            v_priority);
    v_wake_pending := picloud._wake_at_commit();
    RETURN v_event_id;
END
$$;
-- Enqueues one event per payload, all for the same handler, in one statement. Returns the
-- new event ids in payload order.
CREATE OR REPLACE FUNCTION picloud.picloud_enqueue_bulk(
    p_app_id uuid,
    p_source text,
    p_op text,
    p_payloads jsonb[],
    p_script_id uuid DEFAULT NULL,
    p_trigger_id uuid DEFAULT NULL,
    p_depth integer DEFAULT NULL,
    p_run_at timestamptz DEFAULT NULL,
    p_ordering_keys text[] DEFAULT NULL,
    p_on_dead_letter text DEFAULT NULL,
    p_priority smallint DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_ordering_seqs bigint[];
    v_script_id uuid;
    -- The values every row shares, held in the outbox columns' own domains: each domain check
    -- runs once here, where a value of the base type would be checked again for every row.
    v_source picloud.event_source;
    v_op picloud.event_op;
    v_depth picloud.non_negative_int;
    v_due_at picloud.event_time;
    v_max integer := current_setting('picloud.max_payload_bytes')::integer;
    v_too_big integer;
    v_ids uuid[];
    v_priority smallint;
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
    v_too_big := picloud._oversized_payload(p_payloads, v_max);
    IF v_too_big IS NOT NULL THEN
        PERFORM picloud._check_payload(p_payloads[v_too_big]);
    END IF;
    IF p_run_at IS NOT NULL THEN
        PERFORM picloud._check_run_at(p_run_at);
    END IF;
    v_depth := picloud._event_depth(p_depth);
    v_source := p_source;
    v_op := p_op;
    v_due_at := coalesce(p_run_at, now());
    v_script_id := picloud._resolve_handler(p_app_id, p_script_id, p_trigger_id);
    v_priority := coalesce(p_priority, picloud._trigger_priority(p_app_id, p_trigger_id));
    IF p_ordering_keys IS NOT NULL OR p_on_dead_letter IS NOT NULL THEN
        -- Refuses an unknown on_dead_letter, or one without any key.
        IF p_ordering_keys IS NULL OR p_on_dead_letter NOT IN ('continue', 'block') THEN
            PERFORM picloud._check_ordering(NULL, p_on_dead_letter);
        END IF;
        IF cardinality(p_ordering_keys) <> cardinality(p_payloads) THEN
            PERFORM picloud._invalid(format('ordering_keys must have one entry (or NULL) per payload: %s keys for %s payloads',
                cardinality(p_ordering_keys), cardinality(p_payloads)));
        END IF;
        -- Places in payload order, each under its key's lock (a key given twice takes two).
        v_ordering_seqs := array_fill(NULL::bigint, ARRAY[cardinality(p_payloads)]);
        FOR i IN 1 .. cardinality(p_ordering_keys) LOOP
            IF p_ordering_keys[i] IS NOT NULL THEN
                PERFORM picloud._check_ordering(p_ordering_keys[i], p_on_dead_letter);
                v_ordering_seqs[i] := picloud._order_event(p_app_id, p_ordering_keys[i]);
            END IF;
        END LOOP;
    END IF;
    -- Ids are made here rather than taken with RETURNING: RETURNING would need producers to
    -- be allowed to read the outbox, which shows other producers' events.
    v_ids := picloud._new_event_ids(cardinality(p_payloads));
    INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth,
                                due_at, ordering_key, ordering_seq, ordering_blocks, priority)
    SELECT p_app_id, p.event_id, v_source, v_op, p_trigger_id, v_script_id, p.payload, v_depth,
           v_due_at,
           p.ordering_key, p.ordering_seq,
           CASE WHEN p.ordering_key IS NOT NULL THEN p_on_dead_letter IS NOT DISTINCT FROM 'block' END,
           v_priority
    FROM unnest(p_payloads, v_ids, p_ordering_keys, v_ordering_seqs) AS p(payload, event_id, ordering_key, ordering_seq);
    IF cardinality(p_payloads) > 0 THEN
        PERFORM picloud._wake_at_commit();
    END IF;
    RETURN QUERY SELECT unnest(v_ids);
END
$$;
-- Emits a KV event: one outbox row per enabled KV trigger of the app matching (collection,
-- op), in the caller's transaction. Returns how many were enqueued.
CREATE OR REPLACE FUNCTION picloud.picloud_emit_kv(
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
    -- An ordered trigger's event takes the key collection:key, and its place under that key's
    -- lock; the row lock a captured table's writers hold makes that their commit order.
    INSERT INTO picloud.outbox (app_id, event_id, source, op, trigger_id, script_id, payload, depth,
                                ordering_key, ordering_seq, ordering_blocks, priority)
    SELECT p_app_id, picloud._new_event_id(), 'kv', p_op, m.trigger_id, m.script_id, v_payload, v_depth,
           k.ordering_key,
           CASE WHEN k.ordering_key IS NOT NULL THEN picloud._order_event(p_app_id, k.ordering_key) END,
           CASE WHEN k.ordering_key IS NOT NULL THEN d.on_dead_letter = 'block' END,
           t.priority
    FROM picloud.picloud_match_kv_triggers(p_app_id, p_collection, p_op) m
    JOIN picloud.kv_trigger_details d ON d.app_id = p_app_id AND d.trigger_id = m.trigger_id
    JOIN picloud.triggers t ON t.app_id = p_app_id AND t.trigger_id = m.trigger_id
    CROSS JOIN LATERAL (SELECT CASE WHEN d.ordered THEN p_collection || ':' || coalesce(p_key, '') END
                        AS ordering_key) k;
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
-- Runs a claimed event's SQL handler as its principal and completes the event, all in the
-- caller's transaction: the handler's writes and the completion commit or roll back together.
-- Returns the handler's result as jsonb for a synchronous event (NULL otherwise).
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
-- Registers a handler. kind 'sql': target names a function taking one jsonb argument,
-- which the caller must be allowed to execute; 'http': an http:// or https:// URL; 'command':
-- a command name the supervisor's configuration defines. Returns the script id.
CREATE OR REPLACE FUNCTION picloud.picloud_create_script(
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
DROP FUNCTION picloud._settle_failure(picloud.outbox, text, interval);
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
DROP FUNCTION picloud.picloud_claim(text, integer, integer, boolean);
DROP FUNCTION picloud._claim_answers(picloud.outbox[]);
DROP FUNCTION picloud.picloud_claim_events(text, uuid[], uuid[], integer);
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

-- What a claim answers for the rows it claimed.
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
CREATE OR REPLACE FUNCTION picloud.picloud_claim(
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
DROP FUNCTION picloud.picloud_fail(uuid, uuid, text, text);
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
-- Runs the handlers of events locked by picloud_lock_sql_lane in this transaction and deletes
-- the events that ran. Each group of events with the same handler, principal and depth runs in
-- one statement as that principal; a group whose statement fails runs again event by event,
-- each in a savepoint. Returns how many ran, and the events left for the ordinary path: those
-- that failed by themselves, and every event of a group whose principal may not run it.
CREATE OR REPLACE FUNCTION picloud.picloud_run_sql_lane(p_event_ids uuid[], p_row_tids tid[])
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
CREATE OR REPLACE FUNCTION picloud.picloud_lock_sql_lane_for_run(p_batch integer)
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
DROP FUNCTION picloud._sql_lane_groups(tid[]);
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
CREATE OR REPLACE FUNCTION picloud._sql_lane_complete(p_row_tids tid[]) RETURNS integer
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
-- The enabled KV triggers of an app that fire for (collection, op). One index probe per
-- candidate match key (see kv_trigger_details.match_key), never a scan of all patterns.
CREATE OR REPLACE FUNCTION picloud.picloud_match_kv_triggers(p_app_id uuid, p_collection text, p_op text)
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
CREATE OR REPLACE FUNCTION picloud.picloud_match_dead_letter_triggers(p_app_id uuid, p_source text, p_script_id uuid)
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
-- Claimed sql events run one per transaction (picloud_run_sql_handler); a supervisor of an
-- earlier release that still calls this finds it gone, and its fallback runs the events one by
-- one.
DROP FUNCTION picloud.picloud_run_sql_handlers(text, uuid[], uuid[]);
-- Locks up to p_batch events that may run in the lane, oldest first, in the caller's
-- transaction, and returns them with their row address (valid while the lock is held: the
-- lane never updates a locked row) and their handler's timeout.
--
-- A batch holds the events of one app, and apps take turns (README, "Fairness between apps"):
-- the apps with lane events are visited from a random one on, and the first whose lane lock is
-- free gets the batch. The lane lock is the app's row in picloud.apps, locked FOR NO KEY
-- UPDATE for the batch's transaction: no tenant can lock it (tenants have no UPDATE on apps),
-- and enqueues never touch it. So one app's slow handlers hold at most one lane while another
-- app has lane events; when every app with lane events is in a lane already, a lane shares the
-- first one, so a single busy app still gets every lane.
CREATE OR REPLACE FUNCTION picloud.picloud_lock_sql_lane(p_batch integer)
RETURNS TABLE (app_id uuid, event_id uuid, row_tid tid, timeout_ms integer)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM picloud._lock_lane(p_batch, 'sql');
END
$$;
DROP FUNCTION picloud._become(text, integer);
-- Switches to the principal of one event (Rust, extension/src/api/principal.rs).
CREATE FUNCTION picloud."_become_event"(
	"app_id" uuid, /* pgrx :: Uuid */
	"event_id" uuid /* pgrx :: Uuid */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_become_event_wrapper';

-- Ends a failed handler's budget (Rust, extension/src/api/budget.rs).
CREATE FUNCTION picloud."_after_handler"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_after_handler_wrapper';

-- A payload's uncompressed size (Rust, extension/src/api/admission.rs).
CREATE FUNCTION picloud."_payload_bytes"(
	"payload" anyelement /* pgrx :: AnyElement */
) RETURNS INT /* i32 */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_payload_bytes_wrapper';

CREATE TABLE picloud.handler_secrets (
    app_id      uuid        NOT NULL,
    script_id   uuid        NOT NULL,
    secret_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
    -- 'whsec_' followed by the base64 of the key (16 to 128 bytes), as Standard Webhooks
    -- libraries expect it.
    secret      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- NULL: valid until rotated or cleared.
    expires_at  timestamptz,
    CONSTRAINT handler_secrets_pkey PRIMARY KEY (app_id, script_id, secret_id),
    CONSTRAINT handler_secrets_format CHECK (secret ~ '^whsec_[A-Za-z0-9+/]+={0,2}$'
                                             AND length(secret) BETWEEN 28 AND 180),
    CONSTRAINT handler_secrets_script_fkey FOREIGN KEY (app_id, script_id)
        REFERENCES picloud.scripts (app_id, script_id) ON DELETE CASCADE
);

-- Gives an http handler a new signing secret and returns it. NULL generates one (32 random
-- bytes). Secrets it had stay valid for p_previous_valid_for more (0 ends them now), so
-- deliveries carry both signatures while receivers switch.
CREATE FUNCTION picloud.picloud_set_handler_secret(
    p_app_id uuid,
    p_script_id uuid,
    p_secret text DEFAULT NULL,
    p_previous_valid_for interval DEFAULT interval '1 day')
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_secret text := p_secret;
    v_key_bytes integer;
    v_kind text;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_script_id IS NULL OR p_previous_valid_for IS NULL THEN
        PERFORM picloud._null_argument('{script_id,previous_valid_for}',
            ARRAY[p_script_id IS NULL, p_previous_valid_for IS NULL]);
    END IF;
    IF p_previous_valid_for < interval '0' OR p_previous_valid_for > interval '30 days' THEN
        PERFORM picloud._invalid(format('previous_valid_for must be between 0 and 30 days, got %s',
            p_previous_valid_for));
    END IF;
    PERFORM picloud._require_script(p_app_id, p_script_id);
    SELECT s.kind INTO v_kind FROM picloud.scripts s
    WHERE s.app_id = p_app_id AND s.script_id = p_script_id;
    IF v_kind <> 'http' THEN
        PERFORM picloud._invalid(format('handler %s is a %s handler; only http deliveries are signed',
            p_script_id, v_kind));
    END IF;
    IF v_secret IS NULL THEN
        -- Two version-4 UUIDs: 244 random bits from the server's strong random source.
        v_secret := 'whsec_' || encode(decode(replace(gen_random_uuid()::text, '-', '')
                                              || replace(gen_random_uuid()::text, '-', ''), 'hex'), 'base64');
    ELSE
        IF length(v_secret) > 180 OR v_secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$' THEN
            PERFORM picloud._invalid('a signing secret is ''whsec_'' followed by the base64 of 16 to 128 bytes',
                'Pass NULL to have one generated.');
        END IF;
        BEGIN
            v_key_bytes := octet_length(decode(substr(v_secret, 7), 'base64'));
        EXCEPTION WHEN invalid_parameter_value THEN
            v_key_bytes := 0;
        END;
        IF v_key_bytes NOT BETWEEN 16 AND 128 THEN
            PERFORM picloud._invalid('a signing secret is ''whsec_'' followed by the base64 of 16 to 128 bytes',
                'Pass NULL to have one generated.');
        END IF;
    END IF;
    UPDATE picloud.handler_secrets h
    SET expires_at = now() + p_previous_valid_for
    WHERE h.app_id = p_app_id AND h.script_id = p_script_id
      AND (h.expires_at IS NULL OR h.expires_at > now() + p_previous_valid_for);
    INSERT INTO picloud.handler_secrets (app_id, script_id, secret) VALUES (p_app_id, p_script_id, v_secret);
    RETURN v_secret;
END
$$;

-- Ends every secret of a handler now: its deliveries go out unsigned. Returns how many ended.
CREATE FUNCTION picloud.picloud_clear_handler_secrets(p_app_id uuid, p_script_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_ended integer;
BEGIN
    PERFORM picloud._require(p_app_id, 'manage_triggers');
    IF p_script_id IS NULL THEN
        PERFORM picloud._null_argument('{script_id}', '{t}');
    END IF;
    PERFORM picloud._require_script(p_app_id, p_script_id);
    UPDATE picloud.handler_secrets h SET expires_at = now()
    WHERE h.app_id = p_app_id AND h.script_id = p_script_id
      AND (h.expires_at IS NULL OR h.expires_at > now());
    GET DIAGNOSTICS v_ended = ROW_COUNT;
    RETURN v_ended;
END
$$;

-- The valid secrets of the given handlers, newest first, at most three each (supervisor
-- only). Handlers without a valid secret have no row.
CREATE FUNCTION picloud.picloud_signing_secrets(p_app_ids uuid[], p_script_ids uuid[])
RETURNS TABLE (app_id uuid, script_id uuid, secrets text[])
LANGUAGE sql STABLE AS $$
    SELECT k.app_id, k.script_id, (array_agg(h.secret ORDER BY h.created_at DESC, h.secret_id))[1:3]
    FROM (SELECT DISTINCT u.app_id, u.script_id
          FROM unnest(p_app_ids, p_script_ids) AS u(app_id, script_id)) AS k
    JOIN picloud.handler_secrets h
      ON h.app_id = k.app_id AND h.script_id = k.script_id
     AND (h.expires_at IS NULL OR h.expires_at > now())
    GROUP BY k.app_id, k.script_id
$$;

-- Cron triggers (sql/055_cron.sql) -------------------------------------------------------

ALTER TABLE picloud.triggers DROP CONSTRAINT triggers_kind_valid;
ALTER TABLE picloud.triggers ADD CONSTRAINT triggers_kind_valid CHECK (kind IN ('kv', 'dead_letter', 'cron'));

-- Cron trigger details (sql/022_cron.sql): the schedule, and where it stands. next_fire_at is
-- the first tick not yet enqueued (NULL: the schedule has no further tick); the housekeeper
-- enqueues due ticks and moves next_fire_at past them in one transaction, on this row locked,
-- so each tick is enqueued exactly once.
CREATE TABLE picloud.cron_trigger_details (
    app_id              uuid        NOT NULL,
    trigger_id          uuid        NOT NULL,
    schedule            text        NOT NULL,
    timezone            text        NOT NULL,
    payload             jsonb       NOT NULL,
    catch_up            text        NOT NULL,
    catch_up_limit      integer     NOT NULL,
    skip_if_running     boolean     NOT NULL,
    next_fire_at        picloud.event_time,
    last_scheduled_for  timestamptz,
    last_fired_at       timestamptz,
    last_event_id       uuid,
    fired_count         bigint      NOT NULL DEFAULT 0,
    skipped_count       bigint      NOT NULL DEFAULT 0,
    CONSTRAINT cron_trigger_details_pkey PRIMARY KEY (app_id, trigger_id),
    CONSTRAINT cron_trigger_details_catch_up_valid CHECK (catch_up IN ('none', 'last', 'all')),
    CONSTRAINT cron_trigger_details_catch_up_limit_valid CHECK (catch_up_limit BETWEEN 1 AND 10000),
    CONSTRAINT cron_trigger_details_trigger_fkey FOREIGN KEY (app_id, trigger_id)
        REFERENCES picloud.triggers (app_id, trigger_id) ON DELETE CASCADE
);
-- The housekeeper's look for the next due tick.
CREATE INDEX cron_trigger_details_next_idx ON picloud.cron_trigger_details (next_fire_at);

-- Schedules and ticks (Rust, extension/src/api/cron.rs and extension/src/worker.rs).
CREATE FUNCTION picloud."_cron_check"(
	"p_schedule" TEXT, /* Option < & str > */
	"p_timezone" TEXT /* Option < & str > */
) RETURNS void
STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_cron_check_wrapper';

CREATE FUNCTION picloud."_cron_next_after"(
	"p_schedule" TEXT, /* & str */
	"p_timezone" TEXT, /* & str */
	"p_after" timestamp with time zone /* TimestampWithTimeZone */
) RETURNS timestamp with time zone /* Option < TimestampWithTimeZone > */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_cron_next_after_wrapper';

CREATE FUNCTION picloud."_cron_due"(
	"p_schedule" TEXT, /* & str */
	"p_timezone" TEXT, /* & str */
	"p_from" timestamp with time zone, /* TimestampWithTimeZone */
	"p_until" timestamp with time zone, /* TimestampWithTimeZone */
	"p_limit" INT /* i32 */
) RETURNS TABLE (
	"ticks" timestamp with time zone[],  /* Vec < TimestampWithTimeZone > */
	"earlier" bigint  /* i64 */
)
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_cron_due_wrapper';

CREATE FUNCTION picloud."picloud_cron_next"(
	"p_schedule" TEXT, /* Option < & str > */
	"p_timezone" TEXT DEFAULT 'UTC', /* Option < & str > */
	"p_from" timestamp with time zone DEFAULT now(), /* Option < TimestampWithTimeZone > */
	"p_n" INT DEFAULT 5 /* Option < i32 > */
) RETURNS SETOF timestamp with time zone /* TimestampWithTimeZone */
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_cron_next_wrapper';

CREATE FUNCTION picloud."_wake_housekeeper_at_commit"() RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_wake_housekeeper_at_commit_wrapper';

-- The one list of event sources, for the SQL functions that check one (Rust,
-- extension/src/api/admission.rs).
CREATE FUNCTION picloud."_event_sources"() RETURNS TEXT[] /* Vec < String > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'picloud_event_sources_wrapper';

-- Enabling a cron trigger starts it again from now.
CREATE OR REPLACE FUNCTION picloud.picloud_set_trigger_enabled(p_app_id uuid, p_trigger_id uuid, p_enabled boolean)
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

GRANT SELECT, INSERT, DELETE ON picloud.cron_trigger_details TO picloud_user;
GRANT UPDATE (schedule, timezone, payload, catch_up, catch_up_limit, skip_if_running, next_fire_at)
    ON picloud.cron_trigger_details TO picloud_user;
GRANT EXECUTE ON FUNCTION
    picloud.picloud_create_cron_trigger(uuid, text, uuid, text, jsonb, text, integer, boolean, boolean),
    picloud.picloud_alter_cron_trigger(uuid, uuid, text, text, jsonb, text, integer, boolean),
    picloud.picloud_list_cron_triggers(uuid),
    picloud.picloud_cron_next(text, text, timestamptz, integer),
    picloud._cron_check(text, text),
    picloud._cron_arm(text, text, timestamptz),
    picloud._cron_next_after(text, text, timestamptz),
    picloud._check_cron_options(text, integer),
    picloud._wake_housekeeper_at_commit(),
    picloud._event_sources()
TO picloud_user;
ALTER TABLE picloud.cron_trigger_details ENABLE ROW LEVEL SECURITY;
CREATE POLICY cron_trigger_details_visible ON picloud.cron_trigger_details FOR SELECT
    USING (picloud.picloud_has_capability(app_id, 'enqueue'));
CREATE POLICY cron_trigger_details_writes ON picloud.cron_trigger_details FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers'));
SELECT pg_catalog.pg_extension_config_dump('picloud.cron_trigger_details', '');

CREATE OR REPLACE FUNCTION picloud._check_event_shape(p_source text, p_op text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_source <> ALL (picloud._event_sources()) THEN
        PERFORM picloud._invalid(format('unknown source %L', left(p_source, 200)),
            format('Sources are %s.', array_to_string(picloud._event_sources(), ', ')));
    END IF;
    IF length(p_op) NOT BETWEEN 1 AND 200 THEN
        PERFORM picloud._invalid(format('op must be 1 to 200 characters long, got %s', length(p_op)));
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION picloud.picloud_create_dead_letter_trigger(
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

CREATE OR REPLACE FUNCTION picloud.picloud_claim_events(
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

CREATE OR REPLACE FUNCTION picloud.picloud_run_sql_lane_locked()
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

CREATE OR REPLACE FUNCTION picloud._check_ordering(p_ordering_key text, p_on_dead_letter text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_on_dead_letter IS NOT NULL AND p_on_dead_letter NOT IN ('continue', 'block') THEN
        PERFORM picloud._invalid(format('unknown on_dead_letter %L', left(p_on_dead_letter, 200)),
            'on_dead_letter is continue (the key goes on past a dead letter) or block (it waits until the dead letter is resolved).');
    END IF;
    IF p_ordering_key IS NULL THEN
        IF p_on_dead_letter IS NOT NULL THEN
            PERFORM picloud._invalid('on_dead_letter applies only to events with an ordering key');
        END IF;
        RETURN;
    END IF;
    IF length(p_ordering_key) NOT BETWEEN 1 AND 4096 THEN
        PERFORM picloud._invalid(format('ordering_key must be 1 to 4096 characters long, got %s', length(p_ordering_key)));
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION picloud._order_event(p_app_id uuid, p_ordering_key text) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(1885954924, pg_catalog.hashtext(p_app_id::text || ':' || p_ordering_key));
    RETURN pg_catalog.nextval('picloud.ordering_seq');
END
$$;

CREATE OR REPLACE FUNCTION picloud._enqueue_fast(
    p_app_id uuid,
    p_source text,
    p_op text,
    p_payload jsonb,
    p_script_id uuid,
    p_trigger_id uuid,
    p_depth integer,
    p_run_at timestamptz,
    p_reply_to text,
    p_idempotency_key text,
    p_ordering_key text,
    p_on_dead_letter text,
    p_priority smallint)
RETURNS uuid
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'picloud_enqueue_fast';

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
    p_idempotency_key text DEFAULT NULL,
    p_ordering_key text DEFAULT NULL,
    p_on_dead_letter text DEFAULT NULL,
    p_priority smallint DEFAULT NULL)
RETURNS uuid
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'picloud_enqueue';

CREATE OR REPLACE FUNCTION picloud.picloud_create_kv_trigger(
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

CREATE OR REPLACE FUNCTION picloud.picloud_complete(p_app_id uuid, p_event_id uuid, p_worker text, p_result jsonb DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION picloud._dead_letter(r picloud.outbox, p_error text) RETURNS uuid
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

CREATE OR REPLACE FUNCTION picloud._replay(d picloud.dead_letters) RETURNS uuid
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

CREATE OR REPLACE FUNCTION picloud._release_key() RETURNS trigger
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

-- (PL/pgSQL for its kept plan, as picloud_has_capability.)
CREATE OR REPLACE FUNCTION picloud._trigger_priority(p_app_id uuid, p_trigger_id uuid) RETURNS smallint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT t.priority FROM picloud.triggers t
                     WHERE t.app_id = p_app_id AND t.trigger_id = p_trigger_id), 0::smallint);
END
$$;

-- PL/pgSQL rather than SQL: a SQL function that is not inlined (none with a fixed search_path
-- is, see sql/090_privileges.sql) is parsed and planned again by every statement that calls
-- it, about 0.2 ms - most of what an API call that checks a right cost; PL/pgSQL keeps its plan
-- for the session. Every name and operator is qualified instead of a fixed search_path (see
-- sql/090_privileges.sql): it is the outbox's INSERT policy, and a SET clause would cost every
-- enqueue by a tenant role a settings change and its undoing (5-19 percent of such an enqueue).
CREATE OR REPLACE FUNCTION picloud.picloud_has_capability(p_app_id uuid, p_capability text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN picloud._is_owner() OR EXISTS (
        SELECT 1 FROM picloud.app_roles r
        WHERE r.app_id OPERATOR(pg_catalog.=) p_app_id
          AND r.role_name OPERATOR(pg_catalog.=) CURRENT_USER
          AND (r.capability OPERATOR(pg_catalog.=) 'admin'
               OR (p_capability OPERATOR(pg_catalog.=) 'enqueue'
                   AND r.capability OPERATOR(pg_catalog.=) 'producer')));
END
$$;

CREATE OR REPLACE FUNCTION picloud._handler_room(p_app_id uuid, p_script_id uuid, p_max_concurrency integer)
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

CREATE OR REPLACE FUNCTION picloud.picloud_set_trigger_priority(p_app_id uuid, p_trigger_id uuid, p_priority smallint)
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

CREATE OR REPLACE FUNCTION picloud.picloud_set_handler_max_concurrency(
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

-- Housekeeping: one step function and one list of steps instead of a function per step.
DROP FUNCTION picloud._gc_rescue_leases(integer);
DROP FUNCTION picloud._gc_dead_letters(integer);
DROP FUNCTION picloud._gc_abandoned_executions(integer);
DROP FUNCTION picloud._gc_inboxes(integer);
DROP FUNCTION picloud._gc_idempotency_keys(integer);
DROP FUNCTION picloud._gc_event_counts(integer);

CREATE OR REPLACE FUNCTION picloud._gc_steps() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['rescue_leases', 'dead_letters', 'abandoned_executions', 'inboxes',
                 'idempotency_keys', 'event_counts']
$$;

CREATE OR REPLACE FUNCTION picloud._gc_step(p_kind text, p_batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    r picloud.outbox;
    v_count bigint := 0;
    v_days integer;
    v_table text;
    v_key text[];
    v_expired text;
BEGIN
    IF p_kind IS NULL OR p_batch IS NULL THEN
        PERFORM picloud._null_argument('{kind,batch}', ARRAY[p_kind IS NULL, p_batch IS NULL]);
    END IF;
    IF p_kind = 'rescue_leases' THEN
        FOR r IN
            SELECT * FROM picloud.outbox o
            WHERE o.claimed_by IS NOT NULL AND o.lease_expires_at < now()
            ORDER BY o.lease_expires_at
            LIMIT p_batch
            FOR UPDATE SKIP LOCKED
        LOOP
            PERFORM picloud._settle_failure(r, format('lease of worker "%s" expired', r.claimed_by), interval '0');
            v_count := v_count + 1;
        END LOOP;
        IF v_count > 0 THEN
            PERFORM picloud._wake_at_commit();
        END IF;
        RETURN v_count;
    END IF;
    -- The other steps: their table, its key, and which rows have expired (NULL: none, kept).
    CASE p_kind
    WHEN 'dead_letters' THEN
        v_days := current_setting('picloud.dead_letter_retention_days')::integer;
        v_table := 'dead_letters';
        v_key := '{app_id,dead_letter_id}';
        v_expired := CASE WHEN v_days <> 0 THEN
            format('resolved_at IS NOT NULL AND created_at < now() - make_interval(days => %s)', v_days) END;
    WHEN 'abandoned_executions' THEN
        v_days := current_setting('picloud.abandoned_executions_retention_days')::integer;
        v_table := 'abandoned_executions';
        v_key := '{app_id,abandoned_id}';
        v_expired := CASE WHEN v_days <> 0 THEN
            format('created_at < now() - make_interval(days => %s)', v_days) END;
    WHEN 'inboxes' THEN
        v_table := 'inboxes';
        v_key := '{app_id,channel}';
        v_expired := 'expires_at < now()';
    WHEN 'idempotency_keys' THEN
        v_table := 'idempotency_keys';
        v_key := '{app_id,idempotency_key}';
        v_expired := format('created_at < now() - make_interval(hours => %s)',
                            current_setting('picloud.idempotency_retention')::integer);
    WHEN 'event_counts' THEN
        v_table := 'event_counts';
        v_key := '{ctid}';
        v_expired := 'minute < now() - interval ''1 day''';
    ELSE
        PERFORM picloud._invalid(format('unknown housekeeping step %L', left(p_kind, 200)),
            'The steps are listed by picloud._gc_steps().');
    END CASE;
    IF v_expired IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format(
        'WITH doomed AS (SELECT %2$s FROM picloud.%1$I WHERE %3$s LIMIT $1 FOR UPDATE SKIP LOCKED)
         DELETE FROM picloud.%1$I t USING doomed WHERE (%4$s) = (%5$s)',
        v_table,
        array_to_string(v_key, ', '),
        v_expired,
        (SELECT string_agg('t.' || k, ', ') FROM unnest(v_key) k),
        (SELECT string_agg('doomed.' || k, ', ') FROM unnest(v_key) k))
    USING p_batch;
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
    FOREACH v_step IN ARRAY picloud._gc_steps() LOOP
        v_total := 0;
        LOOP
            v_done := picloud._gc_step(v_step, v_batch);
            v_total := v_total + v_done;
            EXIT WHEN v_done < v_batch;
        END LOOP;
        kind := v_step;
        removed := v_total;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION picloud.picloud_complete_many(p_app_ids uuid[], p_event_ids uuid[], p_worker text,
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

CREATE OR REPLACE FUNCTION picloud._event_json(r picloud.outbox) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN picloud._event_jsonb(r.event_id, r.app_id, r.source, r.op, r.payload, r.depth,
                                r.attempt_count, r.trigger_id, r.script_id);
END
$$;

CREATE OR REPLACE FUNCTION picloud.picloud_next_due_at() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT min(o.due_at) FROM picloud.outbox o WHERE picloud._unclaimed(o.claimed_by));
END
$$;

CREATE OR REPLACE FUNCTION picloud._count_outcome(
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

CREATE OR REPLACE FUNCTION picloud._lock_lane(p_batch integer, p_kind text)
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

CREATE OR REPLACE FUNCTION picloud.picloud_lock_http_lane(p_batch integer)
RETURNS SETOF picloud.claimed_event
LANGUAGE plpgsql
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    -- Answered as claims answer the attempt they start (one ahead of the row's count): this is
    -- the event's first. picloud._outbox_at fetches the locked rows by address.
    RETURN QUERY
    SELECT * FROM picloud._claim_answers(ARRAY(
        SELECT a.event
        FROM picloud._outbox_at(ARRAY(SELECT l.row_tid FROM picloud._lock_lane(p_batch, 'http') l)) a
        ORDER BY (a.event).priority, (a.event).due_at, (a.event).event_id), 1);
END
$$;

CREATE OR REPLACE FUNCTION picloud.picloud_complete_lane(p_app_ids uuid[], p_event_ids uuid[])
RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_done picloud.outbox[];
BEGIN
    PERFORM picloud._check_event_keys(p_app_ids, p_event_ids);
    IF cardinality(p_event_ids) > 10000 THEN
        PERFORM picloud._invalid(format('at most 10000 events at once, got %s', cardinality(p_event_ids)));
    END IF;
    WITH done AS (
        DELETE FROM picloud.outbox o
        USING unnest(p_app_ids, p_event_ids) AS k(app_id, event_id)
        WHERE o.app_id = k.app_id AND o.event_id = k.event_id
          AND picloud._unclaimed(o.claimed_by) AND o.attempt_count = 0 AND o.first_attempt_at IS NULL
          AND o.reply_to IS NULL
        RETURNING o AS row)
    SELECT coalesce(array_agg(done.row), '{}') INTO v_done FROM done;
    PERFORM picloud._count_completed(v_done);
    RETURN cardinality(v_done);
END
$$;

CREATE OR REPLACE FUNCTION picloud._event_jsonb(
    p_event_id uuid, p_app_id uuid, p_source text, p_op text, p_payload jsonb,
    p_depth integer, p_attempt integer, p_trigger_id uuid, p_script_id uuid)
RETURNS jsonb
-- STABLE as jsonb_build_object is (a function declared IMMUTABLE over it is not inlined).
LANGUAGE sql STABLE PARALLEL SAFE
RETURN pg_catalog.jsonb_build_object(
    'event_id', p_event_id, 'app_id', p_app_id, 'source', p_source, 'op', p_op,
    'payload', p_payload, 'depth', p_depth, 'attempt', p_attempt,
    'trigger_id', p_trigger_id, 'script_id', p_script_id);

CREATE OR REPLACE FUNCTION picloud._check_event_keys(p_app_ids uuid[], p_event_ids uuid[]) RETURNS void
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

CREATE OR REPLACE FUNCTION picloud._count_completed(p_done picloud.outbox[]) RETURNS void
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

-- Privileges --------------------------------------------------------------------------------

GRANT USAGE ON SCHEMA picloud TO picloud_owner;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA picloud FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA picloud FROM picloud_supervisor;
-- Revoking the table-level right takes the column rights with it; the grants below follow.
REVOKE INSERT ON picloud.outbox FROM picloud_user;
-- The outbox columns an enqueue writes, and no others: a claim, a lease, an attempt count or a
-- creation time is never the producer's to choose.
GRANT INSERT (app_id, event_id, source, op, trigger_id, script_id, payload, depth, due_at, reply_to,
               ordering_key, ordering_seq, ordering_blocks, priority)
    ON picloud.outbox TO picloud_user;
GRANT UPDATE (enabled, updated_at, priority) ON picloud.triggers TO picloud_user;
-- Handler concurrency limits are app admins' to set (row-level security below).
GRANT SELECT, INSERT, UPDATE (max_concurrency, set_by, set_at), DELETE ON picloud.handler_limits TO picloud_user;
GRANT SELECT ON picloud.limited_handlers TO picloud_user;
-- An ordered enqueue takes its place in picloud.ordering_seq with the caller's rights.
GRANT USAGE ON SEQUENCE picloud.ordering_seq TO picloud_user, picloud_admin, picloud_owner;
-- Resolving a dead letter releases the key it blocked, with the resolver's rights.
GRANT SELECT, DELETE ON picloud.key_blocks TO picloud_user;
GRANT SELECT ON picloud.blocked_keys TO picloud_user;
GRANT INSERT ON picloud.idempotency_keys TO picloud_user;
GRANT UPDATE (resolution, resolved_at, resolved_by) ON picloud.dead_letters TO picloud_user;
-- Signing secrets are write-only: admins add and expire them but read back only their
-- bookkeeping (sql/070_signing.sql).
REVOKE SELECT ON picloud.handler_secrets FROM picloud_user;
GRANT SELECT (app_id, script_id, secret_id, created_at, expires_at),
      INSERT (app_id, script_id, secret),
      UPDATE (expires_at)
    ON picloud.handler_secrets TO picloud_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA picloud TO picloud_admin, picloud_owner;
GRANT EXECUTE ON FUNCTION
    picloud._check_run_at(timestamptz),
    picloud._payload_bytes(anyelement),
    picloud._oversized_payload(jsonb[], integer),
    picloud._new_event_ids(integer),
    -- In the outbox's index predicates, which every writer of a row evaluates.
    picloud._unclaimed(text),
    picloud.picloud_create_kv_trigger(uuid, text, uuid, text[], boolean, boolean, text),
    picloud.picloud_enqueue(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text, text, text, smallint),
    picloud.picloud_enqueue_bulk(uuid, text, text, jsonb[], uuid, uuid, integer, timestamptz, text[], text, smallint),
    picloud._enqueue_fast(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text, text, text, smallint),
    picloud._enqueue_general(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text, text, text, smallint),
    picloud._trigger_priority(uuid, uuid),
    picloud.picloud_set_trigger_priority(uuid, uuid, smallint),
    picloud.picloud_set_handler_max_concurrency(uuid, uuid, integer),
    picloud._check_ordering(text, text),
    picloud._order_event(uuid, text),
    picloud._release_key(),
    picloud.picloud_set_handler_secret(uuid, uuid, text, interval),
    picloud.picloud_clear_handler_secrets(uuid, uuid)
TO picloud_user;
GRANT EXECUTE ON FUNCTION picloud._settle_failure(picloud.outbox, text, interval, timestamptz) TO picloud_admin;
GRANT EXECUTE ON FUNCTION picloud._gc_steps(), picloud._gc_step(text, integer) TO picloud_admin;
-- The supervisor keeps what every tenant may call, and loses the rest.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA picloud FROM picloud_supervisor;
DO $tenant_functions$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'picloud'::regnamespace
          AND EXISTS (SELECT 1 FROM pg_catalog.aclexplode(p.proacl) a
                      WHERE a.grantee = 'picloud_user'::regrole AND a.privilege_type = 'EXECUTE')
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO picloud_supervisor', v_function);
    END LOOP;
END
$tenant_functions$;
-- The supervisor's functions: all it may call beyond what every tenant may. Each runs as
-- picloud_owner, which holds the table rights they need; the caller holds none.
DO $supervisor$
DECLARE
    v_function regprocedure;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'picloud.picloud_claim(text, integer, integer, boolean, integer, boolean)',
        'picloud.picloud_claim_events(text, uuid[], uuid[], integer)',
        'picloud.picloud_next_due_at()',
        'picloud.picloud_run_sql_handler(uuid, uuid, text)',
        'picloud.picloud_complete(uuid, uuid, text, jsonb)',
        'picloud.picloud_complete_many(uuid[], uuid[], text, jsonb[])',
        'picloud.picloud_fail(uuid, uuid, text, text, timestamptz)',
        'picloud.picloud_extend_lease(uuid, uuid, text, integer)',
        'picloud.picloud_release(uuid, uuid, text)',
        'picloud.picloud_lock_sql_lane(integer)',
        'picloud.picloud_lock_sql_lane_for_run(integer)',
        'picloud.picloud_lock_sql_lane_event_for_run(uuid, uuid)',
        'picloud.picloud_run_sql_lane_locked()',
        'picloud.picloud_run_sql_lane(uuid[], tid[])',
        'picloud.picloud_leave_sql_lane(uuid[], uuid[])',
        'picloud.picloud_lock_http_lane(integer)',
        'picloud.picloud_complete_lane(uuid[], uuid[])',
        'picloud.picloud_record_abandoned_execution(uuid, uuid, text, boolean, jsonb, text, text)',
        'picloud.picloud_signing_secrets(uuid[], uuid[])'
    ]::regprocedure[] LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SECURITY DEFINER', v_function);
        EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO picloud_owner', v_function);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO picloud_supervisor', v_function);
    END LOOP;
END
$supervisor$;
-- picloud_owner runs the functions above and whatever they call; _become_event, which switches
-- to an event's principal, is granted to nobody else.
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA picloud TO picloud_owner;

-- Blocked ordering keys: seen and released by those who manage the app's dead letters.
ALTER TABLE picloud.key_blocks ENABLE ROW LEVEL SECURITY;
CREATE POLICY key_blocks_admin ON picloud.key_blocks FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_dead_letters'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_dead_letters'));
ALTER TABLE picloud.handler_limits ENABLE ROW LEVEL SECURITY;
CREATE POLICY handler_limits_visible ON picloud.handler_limits FOR SELECT
    USING (picloud.picloud_has_capability(app_id, 'enqueue'));
CREATE POLICY handler_limits_writes ON picloud.handler_limits FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers'));
SELECT pg_catalog.pg_extension_config_dump('picloud.handler_limits', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.key_blocks', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.ordering_seq', '');

-- The signing secrets' bookkeeping follows the app's triggers.
ALTER TABLE picloud.handler_secrets ENABLE ROW LEVEL SECURITY;
CREATE POLICY handler_secrets_admin ON picloud.handler_secrets FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers'));
SELECT pg_catalog.pg_extension_config_dump('picloud.handler_secrets', '');

-- Dropping an app takes its row first (sql lanes hold it during a batch).
CREATE OR REPLACE FUNCTION picloud.picloud_drop_app(p_app_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM picloud._require_owner('picloud_drop_app');
    IF p_app_id IS NULL THEN PERFORM picloud._null_argument('{app_id}', '{t}'); END IF;
    -- The app row first: waits for a sql lane batch of the app to end (it holds this row) and
    -- keeps further lane batches away, instead of deadlocking with one over outbox rows.
    PERFORM 1 FROM picloud.apps WHERE app_id = p_app_id FOR UPDATE;
    DELETE FROM picloud.outbox WHERE app_id = p_app_id;
    DELETE FROM picloud.idempotency_keys WHERE app_id = p_app_id;
    DELETE FROM picloud.triggers WHERE app_id = p_app_id;
    DELETE FROM picloud.apps WHERE app_id = p_app_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'app % does not exist', p_app_id USING ERRCODE = 'P0002';
    END IF;
END
$$;

-- A fixed search_path for every function written in SQL or PL/pgSQL: names they do not qualify
-- resolve in pg_catalog and picloud only, never in a schema a tenant can create objects in,
-- whoever calls them (a tenant, the supervisor, the housekeeper as the bootstrap superuser).
-- The C functions (Rust) qualify every name and operator of the few statements they run.
DO $pin$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_language l ON l.oid = p.prolang
        WHERE p.pronamespace = 'picloud'::regnamespace AND l.lanname IN ('sql', 'plpgsql')
          -- Six functions qualify every name instead: one looks the handler function up in
          -- the caller's search_path, four are inlined into their callers
          -- (sql/020_triggers.sql, and _event_jsonb and _handler_principal in
          -- sql/031_claims.sql), and one is the row-level security policies' test, which a
          -- SET clause would make cost every tenant's enqueue (sql/010_access.sql).
          AND p.oid <> ALL (ARRAY[
              'picloud.picloud_has_capability(uuid, text)',
              'picloud.picloud_create_script(uuid, text, text, text, integer)',
              'picloud.picloud_match_kv_triggers(uuid, text, text)',
              'picloud.picloud_match_dead_letter_triggers(uuid, text, uuid)',
              'picloud._event_jsonb(uuid, uuid, text, text, jsonb, integer, integer, uuid, uuid)',
              'picloud._handler_principal(uuid, uuid, uuid)'
          ]::regprocedure[])
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, picloud, pg_temp', v_function);
    END LOOP;
END
$pin$;
