//! #[pg_test]s for the SQL API in `sql/`: every public function called once on its success
//! path and on each of its error paths, asserted by SQLSTATE. Errors are caught inside the
//! database by a PL/pgSQL helper, so project SQLSTATEs (class PC) arrive unchanged.

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Creates the helper and a small fixture: app, SQL handler, KV trigger, one claimed event
    /// and one dead letter. Fixture ids are kept in a temp table `fx`.
    fn fixture() {
        Spi::run(
            "CREATE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN EXECUTE q; RETURN '00000';
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$;
             CREATE FUNCTION pg_temp.value_of(q text) RETURNS text LANGUAGE plpgsql AS $$
             DECLARE v text;
             BEGIN EXECUTE q INTO STRICT v; RETURN coalesce(v, 'NULL');
             EXCEPTION WHEN OTHERS THEN RETURN 'error ' || SQLSTATE || ': ' || SQLERRM; END $$;
             CREATE FUNCTION public.fx_handler(e jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT e $$;
             CREATE TEMP TABLE fx AS
               SELECT a AS app FROM picloud.picloud_create_app('fixture') a;
             ALTER TABLE fx ADD COLUMN script uuid, ADD COLUMN trig uuid, ADD COLUMN dl uuid, ADD COLUMN ev uuid;
             UPDATE fx SET script = picloud.picloud_create_script(app, 'h', 'sql', 'public.fx_handler');
             UPDATE fx SET trig = picloud.picloud_create_kv_trigger(app, 'orders:*', script);
             SET picloud.retry_max_attempts = 1;
             UPDATE fx SET ev = picloud.picloud_enqueue(app, 'queue', 'x', '{}', script);
             SELECT count(*) FROM picloud.picloud_claim('w', 10, 60000);
             UPDATE fx SET dl = (SELECT f.dead_letter_id FROM picloud.picloud_fail(fx.app, fx.ev, 'w', 'boom') f);
             RESET picloud.retry_max_attempts;
             UPDATE fx SET ev = picloud.picloud_enqueue(app, 'queue', 'x', '{}', script);
             SELECT count(*) FROM picloud.picloud_claim('w', 10, 60000);",
        )
        .expect("fixture");
    }

    /// The call with the fixture's ids substituted for {app}, {script}, {trig}, {dl} and {ev},
    /// and the nil uuid for {none}.
    fn with_ids(call: &str) -> String {
        let ids = Spi::get_three::<pgrx::Uuid, pgrx::Uuid, pgrx::Uuid>(
            "SELECT app, script, trig FROM fx",
        )
        .expect("fixture ids");
        let more =
            Spi::get_two::<pgrx::Uuid, pgrx::Uuid>("SELECT dl, ev FROM fx").expect("fixture ids");
        let text = |u: Option<pgrx::Uuid>| u.map(|u| u.to_string()).unwrap_or_default();
        let (app, script, trig) = (text(ids.0), text(ids.1), text(ids.2));
        let (dl, ev) = (text(more.0), text(more.1));
        call.replace("{app}", &format!("'{app}'::uuid"))
            .replace("{script}", &format!("'{script}'::uuid"))
            .replace("{trig}", &format!("'{trig}'::uuid"))
            .replace("{dl}", &format!("'{dl}'::uuid"))
            .replace("{ev}", &format!("'{ev}'::uuid"))
            .replace("{none}", "'00000000-0000-0000-0000-000000000000'::uuid")
    }

    /// Runs each call (fixture ids substituted, see `with_ids`) and asserts its SQLSTATE
    /// ('00000' for success).
    fn expect(cases: &[(&str, &str)]) {
        for (call, expected) in cases {
            let sql = with_ids(call);
            let got = Spi::get_one_with_args::<String>(
                "SELECT pg_temp.sqlstate_of($1)",
                &[sql.clone().into()],
            );
            assert_eq!(got, Ok(Some(expected.to_string())), "{sql}");
        }
    }

    /// Runs each call (fixture ids substituted, see `with_ids`), which must succeed with
    /// exactly one row, and asserts that row's first column as text ('NULL' for NULL). A call
    /// that fails shows as 'error SQLSTATE: message'.
    fn expect_values(cases: &[(&str, &str)]) {
        for (call, expected) in cases {
            let sql = with_ids(call);
            let got = Spi::get_one_with_args::<String>(
                "SELECT pg_temp.value_of($1)",
                &[sql.clone().into()],
            );
            assert_eq!(got, Ok(Some(expected.to_string())), "{sql}");
        }
    }

    #[pg_test]
    fn apps_and_roles() {
        fixture();
        expect_values(&[
            // A new app, not the fixture's, listed by its name.
            (
                "SELECT (picloud.picloud_create_app('x') <> {app})::text",
                "true",
            ),
            (
                "SELECT string_agg(name, ',' ORDER BY name) FROM picloud.picloud_list_apps()",
                "fixture,x",
            ),
        ]);
        expect(&[
            ("SELECT picloud.picloud_create_app(NULL)", "22004"),
            ("SELECT picloud.picloud_create_app('')", "22023"),
        ]);
        expect_values(&[
            // The extension's owner holds every capability.
            (
                "SELECT picloud.picloud_has_capability({app}, 'enqueue')::text",
                "true",
            ),
        ]);
        expect(&[
            (
                "SELECT picloud.picloud_grant_app_role({app}, 'no_such_role_zz', 'admin')",
                "42704",
            ),
            (
                "SELECT picloud.picloud_grant_app_role({app}, current_user, 'root')",
                "22023",
            ),
            (
                "SELECT picloud.picloud_grant_app_role({none}, current_user, 'admin')",
                "P0002",
            ),
        ]);
        expect_values(&[
            // Nothing was granted, so there is nothing to revoke.
            (
                "SELECT picloud.picloud_revoke_app_role({app}, current_user, 'admin')::text",
                "false",
            ),
            (
                "SELECT count(*)::text FROM picloud.app_roles WHERE app_id = {app}",
                "0",
            ),
            // A granted capability is listed, then revoked once.
            (
                "SELECT 'granted' FROM picloud.picloud_grant_app_role({app}, current_user, 'producer')",
                "granted",
            ),
            (
                "SELECT string_agg(capability, ',') FROM picloud.app_roles
                 WHERE app_id = {app} AND role_name = current_user",
                "producer",
            ),
            (
                "SELECT picloud.picloud_revoke_app_role({app}, current_user, 'producer')::text",
                "true",
            ),
            (
                "SELECT picloud.picloud_revoke_app_role({app}, current_user, 'producer')::text",
                "false",
            ),
        ]);
        expect(&[("SELECT picloud.picloud_drop_app({none})", "P0002")]);
        expect_values(&[
            // Every housekeeping step runs, and the fresh fixture leaves nothing to remove.
            (
                "SELECT string_agg(kind || '=' || removed, ',') FROM picloud.picloud_gc_pass()",
                "rescue_leases=0,dead_letters=0,abandoned_executions=0,inboxes=0,\
                 idempotency_keys=0,event_counts=0",
            ),
        ]);
    }

    #[pg_test]
    fn handlers_and_triggers() {
        fixture();
        expect(&[
            ("SELECT picloud.picloud_create_script({app}, 'h2', 'sql', 'no_such_fn')", "42883"),
            ("SELECT picloud.picloud_create_script({app}, 'h2', 'ftp', 'x')", "22023"),
            ("SELECT picloud.picloud_create_script({app}, 'h2', 'http', 'gopher://x')", "22023"),
            ("SELECT picloud.picloud_create_script({app}, 'h2', 'command', 'a b')", "22023"),
            ("SELECT picloud.picloud_create_script({app}, 'h2', 'command', 'ok', 0)", "22023"),
            ("SELECT picloud.picloud_create_script({app}, 'h', 'command', 'ok')", "23505"),
            ("SELECT picloud.picloud_create_script({app}, 'h2', 'command', 'ok')", "00000"),
            ("SELECT * FROM picloud.picloud_list_scripts({app})", "00000"),
            ("SELECT picloud.picloud_drop_script({app}, {script})", "23503"),
            ("SELECT picloud.picloud_drop_script({app}, {none})", "P0002"),
            ("SELECT picloud.picloud_create_kv_trigger({app}, 'a*b', {script})", "22023"),
            ("SELECT picloud.picloud_create_kv_trigger({app}, 'x', {none})", "P0002"),
            ("SELECT picloud.picloud_create_kv_trigger({app}, 'x', {script}, ARRAY['boom'])", "22023"),
            ("SELECT picloud.picloud_create_kv_trigger({app}, NULL, {script})", "22004"),
            ("SELECT picloud.picloud_create_dead_letter_trigger({app}, {script}, 'nowhere')", "22023"),
            ("SELECT picloud.picloud_create_dead_letter_trigger({app}, {script}, 'queue')", "00000"),
            ("SELECT picloud.picloud_get_trigger({app}, {trig})", "00000"),
            ("SELECT picloud.picloud_get_trigger({app}, {none})", "P0002"),
            ("SELECT * FROM picloud.picloud_list_triggers({app})", "00000"),
            ("SELECT picloud.picloud_disable_trigger({app}, {trig})", "00000"),
            ("SELECT picloud.picloud_enable_trigger({app}, {trig})", "00000"),
            ("SELECT picloud.picloud_set_trigger_enabled({app}, {none}, true)", "P0002"),
            ("SELECT * FROM picloud.picloud_match_kv_triggers({app}, 'orders:eu', 'set')", "00000"),
            ("SELECT * FROM picloud.picloud_match_dead_letter_triggers({app}, 'queue', {script})", "00000"),
            ("SELECT picloud.picloud_drop_trigger({app}, {trig})", "00000"),
            ("SELECT picloud.picloud_drop_trigger({app}, {trig})", "P0002"),
        ]);
    }

    #[pg_test]
    fn enqueue_paths() {
        fixture();
        expect(&[
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', '{}', {script})", "00000"),
            ("SELECT picloud.picloud_enqueue({app}, 'nope', 'x', '{}', {script})", "22023"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', NULL, {script})", "22004"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', '{}')", "22023"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', '{}', {none})", "P0002"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', '{}', {script}, p_depth => 99)", "PC001"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', '{}', {script}, p_reply_to => 'x')", "22023"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', jsonb_build_object('b', repeat('x', 2000000)), {script})", "PC004"),
            ("SELECT picloud.picloud_enqueue_bulk({app}, 'queue', 'x', ARRAY['{}'::jsonb, '{}'], {script})", "00000"),
            ("SELECT picloud.picloud_enqueue_bulk({app}, 'queue', 'x', ARRAY['{}'::jsonb, NULL], {script})", "22004"),
            ("SELECT picloud.picloud_emit_kv({app}, 'orders:eu', 'set', 'k', '{}')", "00000"),
            ("SELECT picloud.picloud_emit_kv({app}, 'orders:eu', 'upsert', 'k', '{}')", "22023"),
            ("SELECT picloud.picloud_emit_kv({app}, 'orders:eu', 'set', 'k', '{}', 99)", "PC001"),
            ("SELECT picloud.picloud_emit_kv({app}, 'unwatched', 'set', 'k', '{}', 99)", "00000"),
            ("SELECT picloud.picloud_open_inbox({app})", "00000"),
            ("SELECT picloud.picloud_open_inbox({app}, interval '0')", "22023"),
            ("SELECT picloud.picloud_close_inbox({app}, 'nothing')", "00000"),
            ("SELECT * FROM picloud.picloud_list_outbox({app}, -1)", "22023"),
            ("SELECT * FROM picloud.picloud_list_outbox({app})", "00000"),
            ("SELECT picloud.picloud_retry_delay(3)", "00000"),
            ("SELECT picloud.capture()", "0A000"),
        ]);
    }

    /// picloud_enqueue's Rust path (api/enqueue.rs) against its general path: the same row for
    /// the same call, the edges of every check it makes itself, a producer's call, and
    /// nothing written by any refused call.
    #[pg_test]
    fn enqueue_common_case_in_rust() {
        fixture();
        Spi::run(
            "CREATE TEMP TABLE pair AS SELECT
                 picloud.picloud_enqueue(app, 'kv', 'set', '{\"a\": 1}', script, p_depth => 2,
                     p_run_at => '2030-01-01 00:00+00', p_priority => -3::smallint) AS fast,
                 picloud._enqueue_general(app, 'kv', 'set', '{\"a\": 1}', script, NULL, 2,
                     '2030-01-01 00:00+00', NULL, NULL, NULL, NULL, -3::smallint) AS general
             FROM fx",
        )
        .expect("both paths");
        let same = Spi::get_one::<bool>(
            "SELECT (f.app_id, f.source, f.op, f.trigger_id, f.script_id, f.payload, f.depth,
                     f.attempt_count, f.due_at, f.claimed_by, f.reply_to, f.created_at, f.priority)
                  IS NOT DISTINCT FROM (g.app_id, g.source, g.op, g.trigger_id, g.script_id, g.payload, g.depth,
                     g.attempt_count, g.due_at, g.claimed_by, g.reply_to, g.created_at, g.priority)
                AND f.depth = 2 AND f.due_at = '2030-01-01 00:00+00' AND f.priority = -3
             FROM pair, picloud.outbox f, picloud.outbox g
             WHERE f.event_id = pair.fast AND g.event_id = pair.general",
        );
        assert_eq!(same, Ok(Some(true)));
        Spi::run(
            "CREATE TEMP TABLE plain AS
             SELECT picloud.picloud_enqueue(app, 'queue', 'x', '{}', script) AS id FROM fx",
        )
        .expect("plain enqueue");
        let default_due = Spi::get_one::<bool>(
            "SELECT o.due_at = now() AND o.depth = 0 AND o.priority = 0 FROM plain, picloud.outbox o
             WHERE o.event_id = plain.id",
        );
        assert_eq!(default_due, Ok(Some(true)));

        // The common case is written by the Rust path; anything else is left to the general
        // path (NULL) with nothing written.
        let before = Spi::get_one::<i64>("SELECT count(*) FROM picloud.outbox");
        let answers = Spi::get_one::<Vec<bool>>(
            "SELECT ARRAY[
                 picloud._enqueue_fast(app, 'queue', 'x', '{}', script, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL) IS NOT NULL,
                 picloud._enqueue_fast(app, 'kv', 'set', '{}', NULL, trig, NULL, NULL, NULL, NULL, NULL, NULL, NULL) IS NULL,
                 picloud._enqueue_fast(app, 'queue', 'x', '{}', script, NULL, NULL, NULL, NULL, 'key', NULL, NULL, NULL) IS NULL,
                 picloud._enqueue_fast(app, 'queue', '', '{}', script, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL) IS NULL,
                 picloud._enqueue_fast(app, 'queue', 'x', '{}', trig, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL) IS NULL,
                 picloud._enqueue_fast(app, 'queue', 'x', '{}', script, NULL, 99, NULL, NULL, NULL, NULL, NULL, NULL) IS NULL,
                 picloud._enqueue_fast(app, 'queue', 'x', '{}', script, NULL, NULL, NULL, NULL, NULL, 'k', 'block', NULL) IS NOT NULL,
                 picloud._enqueue_fast(app, 'queue', 'x', '{}', script, NULL, NULL, NULL, NULL, NULL, 'k', 'sometimes', NULL) IS NULL,
                 picloud._enqueue_fast(app, 'queue', 'x', '{}', script, NULL, NULL, NULL, NULL, NULL, NULL, 'block', NULL) IS NULL,
                 picloud._enqueue_fast(app, 'queue', 'x', '{}', script, NULL, NULL, NULL, NULL, NULL, repeat('k', 4097), NULL, NULL) IS NULL]
             FROM fx",
        );
        assert_eq!(answers, Ok(Some(vec![true; 10])));
        let after = Spi::get_one::<i64>("SELECT count(*) FROM picloud.outbox");
        assert_eq!(after.ok().flatten(), before.ok().flatten().map(|n| n + 2));
        // An ordered event written here is the general path's row: its key, its place after the
        // key's earlier events, and on_dead_letter as ordering_blocks (NULL when not given).
        Spi::run(
            "CREATE TEMP TABLE keyed_fast AS
             SELECT picloud.picloud_enqueue(app, 'queue', 'x', '{}', script, p_ordering_key => 'pair') AS id FROM fx",
        )
        .expect("keyed, fast");
        Spi::run(
            "CREATE TEMP TABLE keyed_general AS
             SELECT picloud._enqueue_general(app, 'queue', 'x', '{}', script, NULL, NULL, NULL, NULL, NULL,
                                             'pair', NULL, NULL) AS id FROM fx",
        )
        .expect("keyed, general");
        let keyed = Spi::get_one::<bool>(
            "SELECT a.ordering_key = 'pair' AND b.ordering_key = 'pair' AND a.ordering_seq < b.ordering_seq
                    AND a.ordering_blocks IS NULL AND b.ordering_blocks IS NULL
             FROM keyed_fast f, keyed_general g, picloud.outbox a, picloud.outbox b
             WHERE a.event_id = f.id AND b.event_id = g.id",
        );
        assert_eq!(keyed, Ok(Some(true)));
        // The general path's errors keep their SQLSTATE (raised in PL/pgSQL, passed through
        // picloud_enqueue's Rust unguarded), and the backend stays sound when they are caught
        // again and again: a savepoint per call, each rolled back.
        let caught = Spi::get_one::<String>(
            "DO $$
             DECLARE f record; codes text := '';
             BEGIN
                 SELECT * INTO f FROM fx;
                 FOR i IN 1..300 LOOP
                     BEGIN
                         PERFORM picloud.picloud_enqueue(f.app, 'queue', 'x', '{}', f.script,
                             p_depth => CASE WHEN i % 3 = 0 THEN -1 ELSE 99 END,
                             p_idempotency_key => 'k' || i);
                     EXCEPTION WHEN OTHERS THEN
                         IF i <= 3 THEN codes := codes || SQLSTATE || ' '; END IF;
                     END;
                 END LOOP;
                 PERFORM set_config('picloud_test.codes', codes, true);
             END $$;
             SELECT current_setting('picloud_test.codes')",
        );
        assert_eq!(caught, Ok(Some("PC001 PC001 22023 ".to_string())));
        let after_errors = Spi::get_one::<bool>(
            "SELECT picloud.picloud_enqueue(app, 'queue', 'x', '{}', script) IS NOT NULL FROM fx",
        );
        assert_eq!(after_errors, Ok(Some(true)));
        // A volatile argument is evaluated once, whichever path takes the call.
        Spi::run(
            "CREATE TEMP SEQUENCE enqueue_seq;
             CREATE TEMP TABLE volatile_args AS SELECT
                 picloud.picloud_enqueue(app, 'queue', 'x',
                     jsonb_build_object('n', nextval('enqueue_seq')), script) AS fast,
                 picloud.picloud_enqueue(app, 'queue', 'x',
                     jsonb_build_object('n', nextval('enqueue_seq')), script,
                     p_idempotency_key => 'volatile') AS general
             FROM fx",
        )
        .expect("volatile arguments");
        let payloads = Spi::get_one::<Vec<i64>>(
            "SELECT ARRAY[(f.payload->>'n')::bigint, (g.payload->>'n')::bigint, currval('enqueue_seq')]
             FROM volatile_args v, picloud.outbox f, picloud.outbox g
             WHERE f.event_id = v.fast AND g.event_id = v.general",
        );
        assert_eq!(payloads, Ok(Some(vec![1, 2, 2])));

        let before = Spi::get_one::<i64>("SELECT count(*) FROM picloud.outbox");
        Spi::run("SET picloud.max_payload_bytes = 1024").expect("small payload limit");
        expect(&[
            ("SELECT picloud.picloud_enqueue({app}, 'queue', '', '{}', {script})", "22023"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', repeat('é', 201), '{}', {script})", "22023"),
            ("SELECT picloud.picloud_enqueue({app}, 'Queue', 'x', '{}', {script})", "22023"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', jsonb_build_object('b', repeat('x', 1100)), {script})", "PC004"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', '{}', {script}, p_depth => -1)", "22023"),
            ("SELECT picloud.picloud_enqueue({none}, 'queue', 'x', '{}', {script})", "P0002"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', '{}', {trig})", "P0002"),
            ("SELECT picloud.picloud_enqueue(NULL, 'queue', 'x', '{}', {script})", "22004"),
            ("SELECT picloud.picloud_enqueue({app}, NULL, 'x', '{}', {script})", "22004"),
        ]);
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM picloud.outbox"),
            before,
            "refused calls write nothing"
        );
        expect(&[
            ("SELECT picloud.picloud_enqueue({app}, 'queue', repeat('é', 200), '{}', {script})", "00000"),
            ("SELECT picloud.picloud_enqueue({app}, 'queue', 'x', jsonb_build_object('b', repeat('x', 900)), {script})", "00000"),
            ("SELECT picloud.picloud_enqueue({app}, 'kv', 'set', '{}', p_trigger_id => {trig})", "00000"),
        ]);
        Spi::run("RESET picloud.max_payload_bytes").expect("reset limit");

        // A producer takes the Rust path with its right checked; an outsider is refused.
        Spi::run(
            "CREATE ROLE enqueue_producer; CREATE ROLE enqueue_outsider;
             GRANT picloud_user TO enqueue_outsider;
             SELECT picloud.picloud_grant_app_role(app, 'enqueue_producer', 'producer') FROM fx;
             GRANT SELECT ON fx TO enqueue_producer, enqueue_outsider;",
        )
        .expect("roles");
        let before = Spi::get_one::<i64>("SELECT count(*) FROM picloud.outbox");
        Spi::run("SET ROLE enqueue_producer").expect("producer");
        expect(&[(
            "SELECT picloud.picloud_enqueue({app}, 'queue', 'x', '{}', {script})",
            "00000",
        )]);
        Spi::run("RESET ROLE; SET ROLE enqueue_outsider").expect("outsider");
        expect(&[(
            "SELECT picloud.picloud_enqueue({app}, 'queue', 'x', '{}', {script})",
            "42501",
        )]);
        Spi::run("RESET ROLE").expect("reset role");
        let after = Spi::get_one::<i64>("SELECT count(*) FROM picloud.outbox");
        assert_eq!(
            after.ok().flatten(),
            before.ok().flatten().map(|n| n + 1),
            "the producer's event and nothing else"
        );
    }

    #[pg_test]
    fn claim_complete_fail() {
        fixture();
        expect(&[
            ("SELECT * FROM picloud.picloud_claim('w', 0, 1000)", "22023"),
            (
                "SELECT * FROM picloud.picloud_claim(NULL, 1, 1000)",
                "22004",
            ),
            ("SELECT * FROM picloud.picloud_claim('w', 1, 50)", "22023"),
        ]);
        expect_values(&[
            // The claim holder extends its lease; anyone else extends and releases nothing.
            ("SELECT picloud.picloud_extend_lease({app}, {ev}, 'w', 30000)::text", "true"),
            (
                "SELECT (lease_expires_at > now() + interval '29 seconds')::text
                 FROM picloud.outbox WHERE event_id = {ev}",
                "true",
            ),
            ("SELECT picloud.picloud_extend_lease({app}, {ev}, 'intruder', 30000)::text", "false"),
            ("SELECT picloud.picloud_release({app}, {ev}, 'intruder')::text", "false"),
            ("SELECT picloud.picloud_release({app}, {none}, 'w')::text", "false"),
            (
                "SELECT claimed_by || ' ' || attempt_count FROM picloud.outbox WHERE event_id = {ev}",
                "w 1",
            ),
        ]);
        expect(&[
            (
                "SELECT picloud.picloud_extend_lease({app}, {ev}, 'w', 1)",
                "22023",
            ),
            (
                "SELECT picloud.picloud_extend_lease({app}, {ev}, 'w', NULL)",
                "22004",
            ),
            (
                "SELECT picloud.picloud_extend_lease({app}, NULL, 'w', 30000)",
                "22004",
            ),
            (
                "SELECT picloud.picloud_complete({app}, {ev}, 'intruder')",
                "PC002",
            ),
            (
                "SELECT * FROM picloud.picloud_fail({app}, {ev}, 'intruder', 'x')",
                "PC002",
            ),
            (
                "SELECT picloud.picloud_run_sql_handler({app}, {ev}, 'intruder')",
                "PC002",
            ),
        ]);
        expect_values(&[
            // The handler runs and its event leaves the outbox; without reply_to there is no
            // answer to return.
            (
                "SELECT picloud.picloud_run_sql_handler({app}, {ev}, 'w')::text",
                "NULL",
            ),
            (
                "SELECT count(*)::text FROM picloud.outbox WHERE event_id = {ev}",
                "0",
            ),
        ]);
        expect(&[("SELECT picloud.picloud_complete({app}, {ev}, 'w')", "PC002")]);
        expect_values(&[
            // A completed event is no longer held: nothing to release.
            ("SELECT picloud.picloud_release({app}, {ev}, 'w')::text", "false"),
            (
                "SELECT (picloud.picloud_record_abandoned_execution({app}, {ev}, 'gone', true, NULL, NULL, 'test') IS NOT NULL)::text",
                "true",
            ),
        ]);
        expect(&[(
            "SELECT picloud.picloud_record_abandoned_execution({app}, {ev}, NULL, true, NULL, NULL, 'test')",
            "22004",
        )]);
        expect_values(&[(
            "SELECT string_agg(format('%s %s %s %s %s', event_id = {ev}, reply_to, succeeded,
                                      error IS NULL, reason), ',')
             FROM picloud.picloud_list_abandoned_executions({app})",
            "t gone t t test",
        )]);
    }

    /// Every event in `lane_locked` ran its handler (a row in `lane_seen`) and left the outbox.
    fn assert_locked_batch_ran(expected: i64) {
        assert_eq!(
            Spi::get_one::<i64>(
                "SELECT count(*) FROM lane_seen s JOIN lane_locked l USING (event_id)"
            ),
            Ok(Some(expected))
        );
        assert_eq!(
            Spi::get_one::<i64>(
                "SELECT count(*) FROM picloud.outbox o JOIN lane_locked l USING (event_id)"
            ),
            Ok(Some(0))
        );
    }

    #[pg_test]
    fn sql_lanes() {
        fixture();
        expect(&[
            ("SELECT * FROM picloud.picloud_lock_sql_lane(0)", "22023"),
            ("SELECT * FROM picloud.picloud_lock_sql_lane(NULL)", "22004"),
            (
                "SELECT * FROM picloud.picloud_run_sql_lane(ARRAY[{ev}], '{}'::tid[])",
                "22023",
            ),
            (
                "SELECT * FROM picloud.picloud_run_sql_lane(NULL, '{}'::tid[])",
                "22004",
            ),
            (
                "SELECT * FROM picloud.picloud_claim_events('w', ARRAY[{app}], ARRAY[]::uuid[], 60000)",
                "22023",
            ),
            (
                "SELECT * FROM picloud.picloud_claim_events('w', ARRAY[{app}], ARRAY[{ev}], 1)",
                "22023",
            ),
            (
                "SELECT * FROM picloud.picloud_claim_events(NULL, ARRAY[{app}], ARRAY[{ev}], 60000)",
                "22004",
            ),
            ("SELECT * FROM picloud.picloud_lock_http_lane(10001)", "22023"),
            ("SELECT * FROM picloud.picloud_lock_http_lane(NULL)", "22004"),
            (
                "SELECT picloud.picloud_complete_lane(ARRAY[{app}], ARRAY[]::uuid[])",
                "22023",
            ),
            (
                "SELECT picloud.picloud_complete_lane(NULL, ARRAY[{ev}])",
                "22004",
            ),
            (
                "SELECT picloud.picloud_complete_lane(array_fill({app}, ARRAY[10001]),
                                                      array_fill({ev}, ARRAY[10001]))",
                "22023",
            ),
        ]);
        // Three fresh first attempts: the lane locks them (not the claimed fixture event), runs
        // their handler in one statement and deletes them.
        Spi::run(
            "CREATE TABLE lane_seen (event_id uuid);
             CREATE FUNCTION public.lane_handler(e jsonb) RETURNS void LANGUAGE sql AS $$
                 INSERT INTO lane_seen VALUES ((e->>'event_id')::uuid) $$;
             UPDATE fx SET script = picloud.picloud_create_script(app, 'lane', 'sql', 'public.lane_handler');
             SELECT picloud.picloud_enqueue(app, 'queue', 'x', '{}', script) FROM fx, generate_series(1, 3);
             CREATE TEMP TABLE lane_locked AS SELECT * FROM picloud.picloud_lock_sql_lane(10);",
        )
        .expect("lane fixture");
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM lane_locked"),
            Ok(Some(3))
        );
        let ran = Spi::get_one::<i32>(
            "SELECT ran FROM picloud.picloud_run_sql_lane(
                 (SELECT array_agg(event_id) FROM lane_locked), (SELECT array_agg(row_tid) FROM lane_locked))",
        );
        assert_eq!(ran, Ok(Some(3)));
        assert_locked_batch_ran(3);
        // Claiming by id takes an unclaimed event and counts its attempt.
        Spi::run("UPDATE fx SET ev = picloud.picloud_enqueue(app, 'queue', 'x', '{}', script)")
            .expect("one more event");
        let claimed = Spi::get_one::<i32>(
            "SELECT c.attempt_count FROM fx, picloud.picloud_claim_events('w', ARRAY[fx.app], ARRAY[fx.ev], 60000) c",
        );
        assert_eq!(claimed, Ok(Some(1)));
    }

    /// The one-round-trip pair: the lock remembers its batch and bounds the rest of the
    /// transaction by the shortest handler timeout; the run takes exactly that batch.
    #[pg_test]
    fn sql_lane_in_one_round_trip() {
        fixture();
        expect(&[
            (
                "SELECT * FROM picloud.picloud_lock_sql_lane_for_run(0)",
                "22023",
            ),
            (
                "SELECT * FROM picloud.picloud_lock_sql_lane_for_run(NULL)",
                "22004",
            ),
        ]);
        // Nothing locked yet in this transaction: the run does nothing.
        let idle = Spi::get_one::<i32>("SELECT ran FROM picloud.picloud_run_sql_lane_locked()");
        assert_eq!(idle, Ok(Some(0)));
        Spi::run(
            "CREATE TABLE lane_seen (event_id uuid);
             CREATE FUNCTION public.lane_handler(e jsonb) RETURNS void LANGUAGE sql AS $$
                 INSERT INTO lane_seen VALUES ((e->>'event_id')::uuid) $$;
             UPDATE fx SET script = picloud.picloud_create_script(app, 'lane', 'sql', 'public.lane_handler', 7000);
             SELECT picloud.picloud_create_script(app, 'slow', 'sql', 'public.lane_handler', 9000) FROM fx;
             SELECT picloud.picloud_enqueue(app, 'queue', 'x', '{}', script) FROM fx, generate_series(1, 3);
             SET LOCAL statement_timeout = 0;
             CREATE TEMP TABLE lane_locked AS SELECT * FROM picloud.picloud_lock_sql_lane_for_run(10);",
        )
        .expect("lane fixture");
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM lane_locked"),
            Ok(Some(3))
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT current_setting('statement_timeout')"),
            Ok(Some("7s".to_string())),
            "the shortest timeout of the locked batch"
        );
        let ran = Spi::get_one::<i32>("SELECT ran FROM picloud.picloud_run_sql_lane_locked()");
        assert_eq!(ran, Ok(Some(3)));
        assert_locked_batch_ran(3);
        // The batch is forgotten once run: a second run does nothing.
        let again = Spi::get_one::<i32>("SELECT ran FROM picloud.picloud_run_sql_lane_locked()");
        assert_eq!(again, Ok(Some(0)));
        Spi::run("SET LOCAL statement_timeout = 0").expect("reset timeout");
    }

    /// A lone event's batch: locked by its key only when a sql lane would take it, and run by
    /// the same run as any batch.
    #[pg_test]
    fn sql_lane_lone_event() {
        fixture();
        expect(&[
            (
                "SELECT * FROM picloud.picloud_lock_sql_lane_event_for_run(NULL, {app})",
                "22004",
            ),
            (
                "SELECT * FROM picloud.picloud_lock_sql_lane_event_for_run({app}, NULL)",
                "22004",
            ),
        ]);
        Spi::run(
            "CREATE TABLE lane_seen (event_id uuid);
             CREATE FUNCTION public.lane_handler(e jsonb) RETURNS void LANGUAGE sql AS $$
                 INSERT INTO lane_seen VALUES ((e->>'event_id')::uuid) $$;
             UPDATE fx SET script = picloud.picloud_create_script(app, 'lane', 'sql', 'public.lane_handler', 7000);
             CREATE TEMP TABLE lone (name text, ev uuid);
             INSERT INTO lone SELECT 'due', picloud.picloud_enqueue(app, 'queue', 'x', '{}', script) FROM fx;
             INSERT INTO lone SELECT 'later', picloud.picloud_enqueue(app, 'queue', 'x', '{}', script,
                 p_run_at => now() + interval '1 hour') FROM fx;
             INSERT INTO lone SELECT 'ordered', picloud.picloud_enqueue(app, 'queue', 'x', '{}', script,
                 p_ordering_key => 'k') FROM fx;
             INSERT INTO lone SELECT 'http', picloud.picloud_enqueue(app, 'queue', 'x', '{}',
                 picloud.picloud_create_script(app, 'hook', 'http', 'https://example.com/')) FROM fx;
             INSERT INTO lone SELECT 'limited', picloud.picloud_enqueue(app, 'queue', 'x', '{}',
                 picloud.picloud_create_script(app, 'limited', 'sql', 'public.lane_handler')) FROM fx;
             SELECT picloud.picloud_set_handler_max_concurrency(app, s.script_id, 1)
               FROM fx JOIN picloud.scripts s ON s.app_id = fx.app WHERE s.name = 'limited';
             INSERT INTO lone SELECT 'unknown', gen_random_uuid();
             SET LOCAL statement_timeout = 0;",
        )
        .expect("lone fixture");
        let locks = |name: &str| {
            Spi::get_one::<i64>(&format!(
                "SELECT count(*) FROM fx, lone, picloud.picloud_lock_sql_lane_event_for_run(fx.app, lone.ev) l
                 WHERE lone.name = '{name}'"
            ))
        };
        for name in ["later", "ordered", "http", "limited", "unknown"] {
            assert_eq!(locks(name), Ok(Some(0)), "{name} is not for a sql lane");
        }
        assert_eq!(
            Spi::get_one::<i32>("SELECT ran FROM picloud.picloud_run_sql_lane_locked()"),
            Ok(Some(0)),
            "nothing was readied"
        );
        Spi::run(
            "CREATE TEMP TABLE lane_locked AS
             SELECT l.* FROM fx, lone, picloud.picloud_lock_sql_lane_event_for_run(fx.app, lone.ev) l
             WHERE lone.name = 'due'",
        )
        .expect("lock the due event");
        assert_eq!(
            Spi::get_one::<i64>(
                "SELECT count(*) FROM lane_locked l JOIN lone ON lone.ev = l.event_id
                 WHERE lone.name = 'due'"
            ),
            Ok(Some(1))
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT current_setting('statement_timeout')"),
            Ok(Some("7s".to_string())),
            "its handler's timeout"
        );
        let ran = Spi::get_one::<i32>("SELECT ran FROM picloud.picloud_run_sql_lane_locked()");
        assert_eq!(ran, Ok(Some(1)));
        assert_locked_batch_ran(1);
        Spi::run("SET LOCAL statement_timeout = 0").expect("reset timeout");
    }

    #[pg_test]
    fn operator_views_and_tools() {
        fixture();
        expect(&[
            ("SELECT * FROM picloud.stats", "00000"),
            ("SELECT * FROM picloud.picloud_stats('1 hour')", "00000"),
            ("SELECT * FROM picloud.picloud_stats('0 seconds')", "22023"),
            ("SELECT * FROM picloud.picloud_stats('25 hours')", "22023"),
            ("SELECT * FROM picloud.picloud_stats(NULL)", "22004"),
            ("SELECT * FROM picloud.dead_letter_summary", "00000"),
            ("SELECT * FROM picloud.dead_letter_errors", "00000"),
            ("SELECT * FROM picloud.dead_letters_by_trigger", "00000"),
            ("SELECT picloud.picloud_error_class(NULL)", "00000"),
            ("SELECT picloud.picloud_next_due_at()", "00000"),
            ("SELECT picloud.picloud_wait_idle({app}, '0 seconds')", "00000"),
            ("SELECT picloud.picloud_wait_idle({app}, '2 hours')", "22023"),
            ("SELECT picloud.picloud_wait_idle({app}, NULL)", "22004"),
            ("SELECT picloud.picloud_wait_idle(NULL)", "22004"),
            ("SELECT * FROM picloud.picloud_resolve_dead_letters({app}, 'ignored', p_dry_run => true)", "00000"),
            ("SELECT * FROM picloud.picloud_resolve_dead_letters({app}, 'lost')", "23514"),
            ("SELECT * FROM picloud.picloud_resolve_dead_letters({app}, NULL)", "22004"),
            ("SELECT * FROM picloud.picloud_resolve_dead_letters({app}, 'ignored', p_limit => 0)", "22023"),
            ("SELECT * FROM picloud.picloud_resolve_dead_letters({app}, 'ignored', p_error_contains => '')", "22023"),
            ("SELECT * FROM picloud.picloud_resolve_dead_letters({none}, 'ignored')", "P0002"),
            ("SELECT * FROM picloud.picloud_resolve_dead_letters(NULL, 'ignored')", "22004"),
            ("SELECT * FROM picloud.picloud_resolve_dead_letters({app}, 'replayed')", "00000"),
        ]);
        // The real run above replayed the fixture's dead letter: a new event waits for it.
        let replayed = Spi::get_one::<i64>(
            "SELECT count(*) FROM picloud.dead_letters WHERE resolution = 'replayed'",
        );
        assert_eq!(replayed, Ok(Some(1)));
    }

    #[pg_test]
    fn dead_letter_operations() {
        fixture();
        expect(&[
            (
                "SELECT * FROM picloud.picloud_list_dead_letters({app})",
                "00000",
            ),
            (
                "SELECT * FROM picloud.picloud_list_dead_letters({app}, true, 10, -1)",
                "22023",
            ),
            (
                "SELECT picloud.picloud_get_dead_letter({app}, {dl})",
                "00000",
            ),
            (
                "SELECT picloud.picloud_get_dead_letter({app}, {none})",
                "P0002",
            ),
            ("SELECT picloud.picloud_dead_letter_count({app})", "00000"),
            (
                "SELECT picloud.picloud_resolve_dead_letter({app}, {dl}, 'forgotten')",
                "23514",
            ),
            (
                "SELECT picloud.picloud_resolve_dead_letter({app}, {none}, 'ignored')",
                "P0002",
            ),
            (
                "SELECT picloud.picloud_replay_dead_letter({app}, {dl})",
                "00000",
            ),
            (
                "SELECT picloud.picloud_replay_dead_letter({app}, {dl})",
                "PC003",
            ),
            (
                "SELECT picloud.picloud_resolve_dead_letter({app}, {dl}, 'ignored')",
                "PC003",
            ),
            (
                "SELECT picloud.picloud_replay_dead_letters({app}, 'queue')",
                "00000",
            ),
            ("SELECT picloud.picloud_ignore_dead_letters({app})", "00000"),
        ]);
    }
}
