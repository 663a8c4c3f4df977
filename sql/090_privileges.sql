-- Privileges and row-level security. Runs last, once every object exists.
--
-- Nothing is granted to PUBLIC. Tenant roles reach picloud through picloud_user (granted by
-- picloud_grant_app_role), and row-level security narrows every table to the apps the role
-- holds a capability in. Superusers and picloud_admin members pass every policy.
--
-- The one door (docs/security.md): tenants read through row-level security and write only
-- what the API's own statements write, with column privileges that leave out everything the
-- API never writes at enqueue (claims, leases, attempt counts); explicit table locks on
-- picloud's tables are refused to them (extension/src/table_locks.rs). The supervisor's role
-- holds no table rights at all: it calls the claim/report/lane functions, which run as
-- picloud_owner (SECURITY DEFINER), and switches to a principal only through the event it runs
-- (picloud._become_event). Every function runs with a fixed search_path (end of this file).

REVOKE ALL ON SCHEMA picloud FROM PUBLIC;
GRANT USAGE ON SCHEMA picloud TO picloud_user, picloud_admin, picloud_supervisor, picloud_owner;

REVOKE ALL ON ALL TABLES IN SCHEMA picloud FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA picloud FROM PUBLIC;

-- Tenants get only the writes the API functions make with their rights (row-level security
-- narrows each to the tenant's apps): no UPDATE of who a trigger or handler runs as, and no
-- writes at all to claims, dead-lettering or abandoned executions.
GRANT SELECT ON ALL TABLES IN SCHEMA picloud TO picloud_user;
GRANT INSERT, DELETE ON picloud.scripts, picloud.triggers, picloud.kv_trigger_details,
    picloud.dead_letter_trigger_details, picloud.cron_trigger_details, picloud.inboxes TO picloud_user;
-- A cron trigger's settings; where it stands (last tick, counts) is the housekeeper's to write.
GRANT UPDATE (schedule, timezone, payload, catch_up, catch_up_limit, skip_if_running, next_fire_at)
    ON picloud.cron_trigger_details TO picloud_user;
GRANT UPDATE (enabled, updated_at, priority) ON picloud.triggers TO picloud_user;
-- Handler concurrency limits are app admins' to set (row-level security below).
GRANT INSERT, UPDATE (max_concurrency, set_by, set_at), DELETE ON picloud.handler_limits TO picloud_user;
-- The outbox columns an enqueue writes, and no others: a claim, a lease, an attempt count or a
-- creation time is never the producer's to choose.
GRANT INSERT (app_id, event_id, source, op, trigger_id, script_id, payload, depth, due_at, reply_to,
               ordering_key, ordering_seq, ordering_blocks, priority)
    ON picloud.outbox TO picloud_user;
-- An ordered enqueue takes its place in picloud.ordering_seq with the caller's rights.
GRANT USAGE ON SEQUENCE picloud.ordering_seq TO picloud_user, picloud_admin, picloud_owner;
-- Resolving a dead letter releases the key it blocked, with the resolver's rights.
GRANT DELETE ON picloud.key_blocks TO picloud_user;
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

-- Functions every tenant may call; each checks the app capability it needs itself.
GRANT EXECUTE ON FUNCTION
    picloud.picloud_collection_matches(text, text),
    picloud.picloud_has_capability(uuid, text),
    picloud.picloud_current_depth(),
    picloud.picloud_supervisor_idle(),
    picloud.picloud_create_app(text),
    picloud.picloud_list_apps(),
    picloud.picloud_drop_app(uuid),
    picloud.picloud_grant_app_role(uuid, name, text),
    picloud.picloud_revoke_app_role(uuid, name, text),
    picloud.picloud_create_script(uuid, text, text, text, integer),
    picloud.picloud_list_scripts(uuid),
    picloud.picloud_drop_script(uuid, uuid),
    picloud.picloud_create_kv_trigger(uuid, text, uuid, text[], boolean, boolean, text),
    picloud.picloud_create_dead_letter_trigger(uuid, uuid, text, uuid, boolean),
    picloud.picloud_get_trigger(uuid, uuid),
    picloud.picloud_list_triggers(uuid),
    picloud.picloud_set_trigger_enabled(uuid, uuid, boolean),
    picloud.picloud_set_trigger_priority(uuid, uuid, smallint),
    picloud.picloud_set_handler_max_concurrency(uuid, uuid, integer),
    picloud.picloud_enable_trigger(uuid, uuid),
    picloud.picloud_disable_trigger(uuid, uuid),
    picloud.picloud_drop_trigger(uuid, uuid),
    picloud.picloud_create_cron_trigger(uuid, text, uuid, text, jsonb, text, integer, boolean, boolean),
    picloud.picloud_alter_cron_trigger(uuid, uuid, text, text, jsonb, text, integer, boolean),
    picloud.picloud_list_cron_triggers(uuid),
    picloud.picloud_cron_next(text, text, timestamptz, integer),
    picloud.picloud_match_kv_triggers(uuid, text, text),
    picloud.picloud_match_dead_letter_triggers(uuid, text, uuid),
    picloud.picloud_enqueue(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text, text, text, smallint),
    picloud.picloud_enqueue_bulk(uuid, text, text, jsonb[], uuid, uuid, integer, timestamptz, text[], text, smallint),
    picloud.picloud_emit_kv(uuid, text, text, text, jsonb, integer),
    picloud.capture(),
    picloud.picloud_retry_delay(integer),
    picloud.picloud_list_outbox(uuid, integer, integer),
    picloud.picloud_open_inbox(uuid, interval),
    picloud.picloud_close_inbox(uuid, text),
    picloud.picloud_list_dead_letters(uuid, boolean, integer, integer),
    picloud.picloud_get_dead_letter(uuid, uuid),
    picloud.picloud_dead_letter_count(uuid),
    picloud.picloud_resolve_dead_letter(uuid, uuid, text),
    picloud.picloud_replay_dead_letter(uuid, uuid),
    picloud.picloud_replay_dead_letters(uuid, text, uuid, timestamptz),
    picloud.picloud_ignore_dead_letters(uuid, text, uuid, timestamptz),
    picloud.picloud_list_abandoned_executions(uuid, integer, integer),
    picloud.picloud_gc_pass(),
    -- Helpers the functions above call with the tenant's rights.
    picloud._null_argument(text[], boolean[]),
    picloud._invalid(text, text),
    picloud._is_owner(),
    picloud._require(uuid, text),
    picloud._require_owner(text),
    picloud._require_app(uuid),
    picloud._require_script(uuid, uuid),
    picloud._pattern_match_key(text),
    picloud._collection_match_keys(text),
    picloud._trigger_infos(uuid),
    picloud._cron_check(text, text),
    picloud._cron_arm(text, text, timestamptz),
    picloud._cron_next_after(text, text, timestamptz),
    picloud._check_cron_options(text, integer),
    picloud._wake_housekeeper_at_commit(),
    picloud._event_depth(integer),
    picloud._check_payload(jsonb),
    picloud._check_event_shape(text, text),
    picloud._event_sources(),
    picloud._resolve_handler(uuid, uuid, uuid),
    picloud._check_run_at(timestamptz),
    picloud._payload_bytes(anyelement),
    picloud._oversized_payload(jsonb[], integer),
    -- In the outbox's index predicates, which every writer of a row evaluates.
    picloud._unclaimed(text),
    picloud._enqueue_fast(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text, text, text, smallint),
    picloud._enqueue_general(uuid, text, text, jsonb, uuid, uuid, integer, timestamptz, text, text, text, text, smallint),
    picloud._trigger_priority(uuid, uuid),
    picloud._check_ordering(text, text),
    picloud._order_event(uuid, text),
    picloud._release_key(),
    picloud._check_page(integer, integer),
    picloud._wake_at_commit(),
    picloud._new_event_id(),
    picloud._new_event_ids(integer),
    picloud._admit(integer, integer),
    picloud._lock_unresolved(uuid, uuid),
    picloud._replay(picloud.dead_letters),
    picloud._check_resolution(text),
    picloud.picloud_stats(interval),
    picloud.picloud_error_class(text),
    picloud.picloud_resolve_dead_letters(uuid, text, text, uuid, uuid, text, timestamptz, integer, boolean),
    picloud.picloud_wait_idle(uuid, interval),
    -- The caller's own backend start, recorded when it opens an inbox.
    picloud._my_backend_start(),
    -- Runs as the handler's principal; useless without the token _become returned.
    picloud._unbecome(bigint),
    picloud.picloud_set_handler_secret(uuid, uuid, text, interval),
    picloud.picloud_clear_handler_secrets(uuid, uuid)
TO picloud_user, picloud_supervisor;

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
-- Housekeeping on demand (picloud_gc_pass) for picloud_admin.
GRANT EXECUTE ON FUNCTION
    picloud._gc_steps(),
    picloud._gc_step(text, integer),
    picloud._backend_started(integer),
    picloud._count_outcome(uuid, text, integer, integer, integer),
    picloud._settle_failure(picloud.outbox, text, interval, timestamptz),
    picloud._dead_letter(picloud.outbox, text),
    picloud._reply(picloud.outbox, boolean, jsonb, text),
    picloud._record_abandoned(picloud.outbox, boolean, jsonb, text, text),
    picloud.picloud_match_dead_letter_triggers(uuid, text, uuid)
TO picloud_admin;

-- The signing secrets' bookkeeping follows the app's triggers.
ALTER TABLE picloud.handler_secrets ENABLE ROW LEVEL SECURITY;
CREATE POLICY handler_secrets_admin ON picloud.handler_secrets FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers'));

-- Row-level security ---------------------------------------------------------------------------

ALTER TABLE picloud.apps ENABLE ROW LEVEL SECURITY;
CREATE POLICY apps_visible ON picloud.apps FOR SELECT
    USING (picloud._is_owner() OR EXISTS (
        SELECT 1 FROM picloud.app_roles r WHERE r.app_id = apps.app_id AND r.role_name = current_user));
CREATE POLICY apps_owner_writes ON picloud.apps FOR ALL
    USING (picloud._is_owner()) WITH CHECK (picloud._is_owner());

ALTER TABLE picloud.app_roles ENABLE ROW LEVEL SECURITY;
CREATE POLICY app_roles_visible ON picloud.app_roles FOR SELECT
    USING (role_name = current_user OR picloud._is_owner());
CREATE POLICY app_roles_owner_writes ON picloud.app_roles FOR ALL
    USING (picloud._is_owner()) WITH CHECK (picloud._is_owner());

-- Handlers and triggers: producers see them (enqueue resolves handlers and matches
-- triggers with the caller's rights); only admins change them, and only as themselves.
ALTER TABLE picloud.scripts ENABLE ROW LEVEL SECURITY;
CREATE POLICY scripts_visible ON picloud.scripts FOR SELECT
    USING (picloud.picloud_has_capability(app_id, 'enqueue'));
CREATE POLICY scripts_insert ON picloud.scripts FOR INSERT
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers') AND registered_by_principal = current_user);
CREATE POLICY scripts_update ON picloud.scripts FOR UPDATE
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers') AND registered_by_principal = current_user);
CREATE POLICY scripts_delete ON picloud.scripts FOR DELETE
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'));

ALTER TABLE picloud.handler_limits ENABLE ROW LEVEL SECURITY;
CREATE POLICY handler_limits_visible ON picloud.handler_limits FOR SELECT
    USING (picloud.picloud_has_capability(app_id, 'enqueue'));
CREATE POLICY handler_limits_writes ON picloud.handler_limits FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers'));

ALTER TABLE picloud.triggers ENABLE ROW LEVEL SECURITY;
CREATE POLICY triggers_visible ON picloud.triggers FOR SELECT
    USING (picloud.picloud_has_capability(app_id, 'enqueue'));
CREATE POLICY triggers_insert ON picloud.triggers FOR INSERT
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers') AND registered_by_principal = current_user);
-- Tenants may update only enabled/priority/updated_at (column privileges above).
CREATE POLICY triggers_update ON picloud.triggers FOR UPDATE
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers'));
CREATE POLICY triggers_delete ON picloud.triggers FOR DELETE
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'));

ALTER TABLE picloud.kv_trigger_details ENABLE ROW LEVEL SECURITY;
CREATE POLICY kv_trigger_details_visible ON picloud.kv_trigger_details FOR SELECT
    USING (picloud.picloud_has_capability(app_id, 'enqueue'));
CREATE POLICY kv_trigger_details_writes ON picloud.kv_trigger_details FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers'));

ALTER TABLE picloud.cron_trigger_details ENABLE ROW LEVEL SECURITY;
CREATE POLICY cron_trigger_details_visible ON picloud.cron_trigger_details FOR SELECT
    USING (picloud.picloud_has_capability(app_id, 'enqueue'));
CREATE POLICY cron_trigger_details_writes ON picloud.cron_trigger_details FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers'));

ALTER TABLE picloud.dead_letter_trigger_details ENABLE ROW LEVEL SECURITY;
CREATE POLICY dead_letter_trigger_details_visible ON picloud.dead_letter_trigger_details FOR SELECT
    USING (picloud.picloud_has_capability(app_id, 'enqueue'));
CREATE POLICY dead_letter_trigger_details_writes ON picloud.dead_letter_trigger_details FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_triggers'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_triggers'));

-- The outbox: producers insert; admins see and manage pending events.
ALTER TABLE picloud.outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY outbox_insert ON picloud.outbox FOR INSERT
    WITH CHECK (picloud.picloud_has_capability(app_id, 'enqueue'));
CREATE POLICY outbox_admin ON picloud.outbox FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_dead_letters'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_dead_letters'));
-- Whoever writes a row (the policies above allow), it is claimed exactly when it has a lease:
-- a claim without one would never be rescued. (Roles that bypass row-level security write the
-- outbox only through picloud's functions, which set both together.)
CREATE POLICY outbox_claim_has_lease ON picloud.outbox AS RESTRICTIVE FOR ALL
    USING (true)
    WITH CHECK ((claimed_by IS NULL) = (lease_expires_at IS NULL));

ALTER TABLE picloud.idempotency_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY idempotency_keys_producer ON picloud.idempotency_keys FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'enqueue'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'enqueue'));

ALTER TABLE picloud.dead_letters ENABLE ROW LEVEL SECURITY;
CREATE POLICY dead_letters_admin ON picloud.dead_letters FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_dead_letters'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_dead_letters'));

-- Blocked ordering keys: seen and released by those who manage the app's dead letters.
ALTER TABLE picloud.key_blocks ENABLE ROW LEVEL SECURITY;
CREATE POLICY key_blocks_admin ON picloud.key_blocks FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_dead_letters'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_dead_letters'));

ALTER TABLE picloud.abandoned_executions ENABLE ROW LEVEL SECURITY;
CREATE POLICY abandoned_executions_admin ON picloud.abandoned_executions FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_dead_letters'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_dead_letters'));

-- Outcome counts: written by the supervisor's and housekeeper's paths, read through
-- picloud.stats by those who manage the app.
ALTER TABLE picloud.event_counts ENABLE ROW LEVEL SECURITY;
CREATE POLICY event_counts_admin ON picloud.event_counts FOR ALL
    USING (picloud.picloud_has_capability(app_id, 'manage_dead_letters'))
    WITH CHECK (picloud.picloud_has_capability(app_id, 'manage_dead_letters'));

-- Inboxes: each caller sees and manages its own.
ALTER TABLE picloud.inboxes ENABLE ROW LEVEL SECURITY;
CREATE POLICY inboxes_owner ON picloud.inboxes FOR ALL
    USING (picloud._is_owner() OR (owner_role = current_user AND picloud.picloud_has_capability(app_id, 'enqueue')))
    WITH CHECK (picloud._is_owner() OR (owner_role = current_user AND picloud.picloud_has_capability(app_id, 'enqueue')));

-- pg_dump keeps the data of these tables with the extension.
SELECT pg_catalog.pg_extension_config_dump('picloud.apps', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.app_roles', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.scripts', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.handler_limits', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.triggers', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.kv_trigger_details', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.dead_letter_trigger_details', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.cron_trigger_details', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.abandoned_executions', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.handler_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.key_blocks', '');
SELECT pg_catalog.pg_extension_config_dump('picloud.ordering_seq', '');

-- A fixed search_path for every function written in SQL or PL/pgSQL: names they do not qualify
-- resolve in pg_catalog and picloud only, never in a schema a tenant can create objects in,
-- whoever calls them (a tenant, the supervisor, the housekeeper as the bootstrap superuser).
-- The C functions (Rust) qualify every name and operator of the few statements they run.
-- A function in SQL with a SET clause is never inlined and keeps no plan between calls: it is
-- parsed and planned on every call (up to PostgreSQL 17). So the functions a claim, a
-- completion or a sql lane batch calls are PL/pgSQL, whose plans the session keeps.
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
