-- Enqueueing: direct, bulk, KV fan-out and table capture, all in the caller's transaction.
-- Claims and their reports are in 031_claims.sql, handlers run in the database in
-- 032_sql_handlers.sql, synchronous-call inboxes in 033_inboxes.sql.
--
-- Project SQLSTATEs (class PC, see docs/sql-api.md, "Errors"):
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
    IF p_source <> ALL (picloud._event_sources()) THEN
        PERFORM picloud._invalid(format('unknown source %L', left(p_source, 200)),
            format('Sources are %s.', array_to_string(picloud._event_sources(), ', ')));
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

-- The priority a trigger gives its events (0 without a trigger).
-- (PL/pgSQL for its kept plan, as picloud_has_capability.)
CREATE FUNCTION picloud._trigger_priority(p_app_id uuid, p_trigger_id uuid) RETURNS smallint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT t.priority FROM picloud.triggers t
                     WHERE t.app_id = p_app_id AND t.trigger_id = p_trigger_id), 0::smallint);
END
$$;

-- The whole contract of picloud_enqueue (below), every error included: every call that
-- picloud._enqueue_fast does not write comes here (internal).
-- Refuses an ordering key that is not 1 to 4096 characters long and an on_dead_letter that
-- is not 'continue' or 'block', or given without a key (22023).
CREATE FUNCTION picloud._check_ordering(p_ordering_key text, p_on_dead_letter text) RETURNS void
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

-- The next place in an ordering key (internal). Waits for the key's lock, held until the
-- caller's transaction ends, so that the places of one key's events follow the order in
-- which their transactions commit, and no event can run before an earlier one of its key
-- that had not yet committed. (Two transactions that take the same two keys in opposite
-- orders can deadlock, 40P01, as with row locks.) The two-integer lock form with picloud's
-- own class keeps these locks apart from an application's advisory locks.
CREATE FUNCTION picloud._order_event(p_app_id uuid, p_ordering_key text) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(1885954924, pg_catalog.hashtext(p_app_id::text || ':' || p_ordering_key));
    RETURN pg_catalog.nextval('picloud.ordering_seq');
END
$$;

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
    p_idempotency_key text,
    p_ordering_key text,
    p_on_dead_letter text,
    p_priority smallint)
RETURNS uuid
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'picloud_enqueue_fast';

-- Enqueues one event in the caller's transaction and returns its id. It is delivered when
-- (and only if) the transaction commits. run_at delays it; reply_to names the caller's
-- inbox for a synchronous call (never retried); a repeated idempotency_key returns the first
-- event's id and enqueues nothing; events of one ordering_key run one at a time in enqueue
-- order, and on_dead_letter ('continue' or 'block') says what a dead letter does to the key;
-- priority (lower first, within the app) overrides the trigger's (default 0).
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
    p_idempotency_key text DEFAULT NULL,
    p_ordering_key text DEFAULT NULL,
    p_on_dead_letter text DEFAULT NULL,
    p_priority smallint DEFAULT NULL)
RETURNS uuid
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'picloud_enqueue';

-- The position of the first of a bulk enqueue's payloads larger than p_max_bytes (as
-- picloud._payload_bytes measures it), or NULL; refuses one nested too deep (Rust,
-- extension/src/api/admission.rs: one call for the whole array).
CREATE FUNCTION picloud._oversized_payload(p_payloads jsonb[], p_max_bytes integer)
RETURNS integer
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'picloud_oversized_payload';

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
