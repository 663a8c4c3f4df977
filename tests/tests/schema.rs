//! The schema CREATE EXTENSION lays down, and its constraints.

use picloud_tests::*;
use serde_json::{json, Value};
use uuid::Uuid;

#[test]
fn preloaded_and_schema_complete() {
    let (_db, mut c) = fresh_db("schema");
    let preload: String = c
        .query_one("SHOW shared_preload_libraries", &[])
        .unwrap()
        .get(0);
    assert!(preload.contains("picloud"), "{preload}");
    for table in TABLES {
        let n = count(&mut c, &format!(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'picloud' AND tablename = '{table}'"));
        assert_eq!(n, 1, "table picloud.{table}");
    }
    // registered_by_principal defaults to the creating role.
    let default: String = c
        .query_one(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a
             ON a.attrelid = d.adrelid AND a.attnum = d.adnum
             WHERE d.adrelid = 'picloud.triggers'::regclass AND a.attname = 'registered_by_principal'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(default, "CURRENT_USER");
    // The partial index on unresolved dead letters and the claim index exist.
    let unresolved: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'dead_letters_unresolved_idx'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        unresolved.contains("WHERE (resolved_at IS NULL)"),
        "{unresolved}"
    );
    let claim: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'outbox_due_idx'",
            &[],
        )
        .unwrap()
        .get(0);
    // Unclaimed in the form the planner takes as opaque (extension/src/api/outbox.rs).
    assert!(claim.contains("WHERE _unclaimed(claimed_by)"), "{claim}");
    // Autovacuum tuned for a queue table.
    let options: Vec<String> = c
        .query_one(
            "SELECT reloptions FROM pg_class WHERE oid = 'picloud.outbox'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        options
            .iter()
            .any(|o| o == "autovacuum_vacuum_scale_factor=0.01"),
        "{options:?}"
    );
    // Every setting is registered with its documented default.
    for (name, value) in [
        ("picloud.max_trigger_depth", "8"),
        ("picloud.retry_max_attempts", "5"),
        ("picloud.retry_base_delay", "1s"),
        ("picloud.retry_max_delay", "1h"),
        ("picloud.dead_letter_retention_days", "30"),
        ("picloud.abandoned_executions_retention_days", "7"),
        ("picloud.gc_batch_size", "10000"),
        ("picloud.database", "picloud_it"),
    ] {
        let got: String = c.query_one(&format!("SHOW {name}"), &[]).unwrap().get(0);
        assert_eq!(got, value, "{name}");
    }
    let context: String = c
        .query_one(
            "SELECT context FROM pg_settings WHERE name = 'picloud.gc_interval'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(context, "sighup");
}

#[test]
fn invalid_resolution_is_rejected_by_the_check() {
    let (_db, mut c) = fresh_db("resolution");
    let app: uuid::Uuid = c
        .query_one("SELECT picloud_create_app('a')", &[])
        .unwrap()
        .get(0);
    c.execute(
        "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, attempt_count)
         VALUES ($1, gen_random_uuid(), 'queue', 'x', '{}', 1)",
        &[&app],
    )
    .unwrap();
    let err = c.execute(
        "UPDATE picloud.dead_letters SET resolution = 'forgotten', resolved_at = now()",
        &[],
    );
    assert_eq!(sqlstate(err), "23514");
    for ok in ["replayed", "ignored", "handled_by_script", "handler_failed"] {
        let mut tx = c.transaction().unwrap();
        let n = tx
            .execute(
                "UPDATE picloud.dead_letters SET resolution = $1, resolved_at = now()",
                &[&ok],
            )
            .unwrap();
        assert_eq!(n, 1);
        tx.rollback().unwrap();
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM picloud.dead_letters WHERE resolution IS NULL"
        ),
        1
    );
}

#[test]
fn deleting_a_trigger_removes_its_details() {
    let (_db, mut c) = fresh_db("cascade");
    let (app, script) = ledger_app(&mut c);
    let kv: uuid::Uuid = c
        .query_one(
            "SELECT picloud_create_kv_trigger($1, 'orders:*', $2)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    let dl: uuid::Uuid = c
        .query_one(
            "SELECT picloud_create_dead_letter_trigger($1, $2)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.kv_trigger_details"),
        1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM picloud.dead_letter_trigger_details"
        ),
        1
    );
    c.execute("DELETE FROM picloud.triggers WHERE trigger_id = $1", &[&kv])
        .unwrap();
    c.execute("SELECT picloud_drop_trigger($1, $2)", &[&app, &dl])
        .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.kv_trigger_details"),
        0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM picloud.dead_letter_trigger_details"
        ),
        0
    );
    // A handler still used by a trigger cannot be dropped.
    c.query_one(
        "SELECT picloud_create_kv_trigger($1, '*', $2)",
        &[&app, &script],
    )
    .unwrap();
    assert_eq!(
        sqlstate(c.execute("SELECT picloud_drop_script($1, $2)", &[&app, &script])),
        "23503"
    );
}

/// DROP and CREATE EXTENSION in a session that has already enqueued: the same session then
/// enqueues again, through picloud_enqueue's fast path (whose statements it prepared and kept
/// before the drop) and its general path, and the events are stored, claimed and run as in a
/// fresh database.
#[test]
fn drop_and_create_extension_again() {
    let (_db, mut c) = fresh_db("recreate");
    let uuid_of = |c: &mut postgres::Client,
                   sql: &str,
                   params: &[&(dyn postgres::types::ToSql + Sync)]|
     -> Uuid {
        c.query_one(sql, params)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    };
    let (app, script) = ledger_app(&mut c);
    let before = uuid_of(
        &mut c,
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &script],
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 1);
    c.batch_execute("DROP EXTENSION picloud; CREATE EXTENSION picloud")
        .unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.apps"), 0);

    // The user sees the new app listed under its name, with nothing else left from before.
    let (again, script) = ledger_app(&mut c);
    assert_ne!(again, app);
    let apps: Vec<(Uuid, String)> = c
        .query("SELECT app_id, name FROM picloud_list_apps()", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get("app_id"), r.get("name")))
        .collect();
    assert_eq!(apps, vec![(again, "ledger".to_string())]);

    // Same session: the fast path (its kept plans) and the general path (an idempotency key).
    let fast = uuid_of(
        &mut c,
        "SELECT picloud_enqueue($1, 'queue', 'fast', '{\"n\": 1}', $2)",
        &[&again, &script],
    );
    let general = uuid_of(
        &mut c,
        "SELECT picloud_enqueue($1, 'queue', 'general', '{\"n\": 2}', $2,
                                p_idempotency_key => 'after-recreate')",
        &[&again, &script],
    );
    assert_ne!(fast, before);
    assert_eq!(
        uuid_of(
            &mut c,
            "SELECT picloud_enqueue($1, 'queue', 'general', '{\"n\": 2}', $2,
                                    p_idempotency_key => 'after-recreate')",
            &[&again, &script],
        ),
        general,
        "the idempotency key answers the first event"
    );
    let stored: Vec<(Uuid, Uuid, Uuid, String, String, Value, i32)> = c
        .query(
            "SELECT event_id, app_id, script_id, source, op, payload, attempt_count
             FROM picloud.outbox ORDER BY op",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect();
    assert_eq!(
        stored,
        vec![
            (
                fast,
                again,
                script,
                "queue".into(),
                "fast".into(),
                json!({"n": 1}),
                0
            ),
            (
                general,
                again,
                script,
                "queue".into(),
                "general".into(),
                json!({"n": 2}),
                0
            ),
        ]
    );

    // Both are claimed with their event documents and run by their SQL handler, once.
    let claimed: Vec<(Uuid, Uuid, String, String, Value)> = c
        .query(
            "SELECT event_id, app_id, handler_kind, handler_target, event
             FROM picloud_claim('w', 10, 60000) ORDER BY op",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    for ((id, app_id, kind, target, event), (expected, payload)) in claimed
        .iter()
        .zip([(fast, json!({"n": 1})), (general, json!({"n": 2}))])
    {
        assert_eq!((*id, *app_id), (expected, again));
        assert_eq!(
            (kind.as_str(), target.as_str()),
            ("sql", "public.ledger_handler(jsonb)")
        );
        assert_eq!(event["event_id"], json!(expected.to_string()));
        assert_eq!(event["app_id"], json!(again.to_string()));
        assert_eq!(event["payload"], payload);
        assert_eq!(event["attempt"], json!(1), "{event}");
    }
    for id in [fast, general] {
        let mut tx = c.transaction().unwrap();
        tx.query_one(
            "SELECT picloud_run_sql_handler($1, $2, 'w')",
            &[&again, &id],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let ledger: Vec<(Uuid, Value)> = c
        .query(
            "SELECT event_id, payload FROM ledger ORDER BY payload->>'n'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        ledger,
        vec![(fast, json!({"n": 1})), (general, json!({"n": 2}))]
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
}

#[test]
fn nothing_is_granted_to_public() {
    let (_db, mut c) = fresh_db("public");
    let writable = count(
        &mut c,
        "SELECT count(*) FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace
         WHERE n.nspname = 'picloud' AND cl.relkind = 'r'
           AND (has_table_privilege('public', cl.oid, 'INSERT') OR has_table_privilege('public', cl.oid, 'UPDATE')
                OR has_table_privilege('public', cl.oid, 'DELETE'))",
    );
    assert_eq!(writable, 0);
    let executable = count(
        &mut c,
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'picloud' AND has_function_privilege('public', p.oid, 'EXECUTE')",
    );
    assert_eq!(executable, 0);
    let rls_off = count(
        &mut c,
        "SELECT count(*) FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace
         WHERE n.nspname = 'picloud' AND cl.relkind = 'r' AND NOT cl.relrowsecurity",
    );
    assert_eq!(rls_off, 0);
}

/// An outbox row's values are checked for every writer (domains on its columns), and a claim
/// without its lease, or a lease without its claim, is refused to every role under row-level
/// security (tenants and picloud_admin members). Each refusal writes nothing.
#[test]
fn outbox_rows_hold_valid_values() {
    let (db, mut c) = fresh_db("outbox_values");
    let (app, script) = ledger_app(&mut c);
    let insert = |source: &str, op: &str, depth: i32, attempts: i32| {
        format!(
            "INSERT INTO picloud.outbox (app_id, source, op, script_id, payload, depth, attempt_count)
             VALUES ('{app}', '{source}', '{op}', '{script}', '{{}}', {depth}, {attempts})"
        )
    };
    let long_op = "é".repeat(201);
    for (sql, what) in [
        (insert("mail", "x", 0, 0), "unknown source"),
        (insert("queue", "", 0, 0), "empty op"),
        (insert("queue", &long_op, 0, 0), "op of 201 characters"),
        (insert("queue", "x", -1, 0), "negative depth"),
        (insert("queue", "x", 0, -1), "negative attempt count"),
    ] {
        assert_eq!(sqlstate(c.execute(&sql, &[])), "23514", "{what}");
    }
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
    c.execute(&insert("queue", &"é".repeat(200), 3, 2), &[])
        .expect("the limits themselves are valid");
    assert_eq!(
        sqlstate(c.execute(
            "UPDATE picloud.outbox SET attempt_count = attempt_count - 3",
            &[]
        )),
        "23514"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM picloud.outbox WHERE attempt_count = 2"
        ),
        1
    );

    let (producer, admin) = (
        format!("outbox_producer_{}", std::process::id()),
        format!("outbox_admin_{}", std::process::id()),
    );
    // A producer of the app, and a member of picloud_admin (the one role under row-level
    // security that may update outbox rows).
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {producer}; CREATE ROLE {producer} LOGIN;
         DROP ROLE IF EXISTS {admin}; CREATE ROLE {admin} LOGIN IN ROLE picloud_admin"
    ))
    .expect("roles");
    c.execute(
        "SELECT picloud_grant_app_role($1, $2, 'producer')",
        &[&app, &producer],
    )
    .expect("grant");
    let claimed = |claim: &str, lease: &str| {
        format!(
            "INSERT INTO picloud.outbox (app_id, source, op, script_id, payload, claimed_by, lease_expires_at)
             VALUES ('{app}', 'queue', 'x', '{script}', '{{}}', {claim}, {lease})"
        )
    };
    let mut p = connect_as(&db, &producer);
    for sql in [
        claimed("'me'", "NULL"),
        claimed("NULL", "now() + interval '1 minute'"),
    ] {
        assert_eq!(sqlstate(p.execute(&sql, &[])), "42501", "{sql}");
    }
    // A producer writes only the columns an enqueue writes (claims and leases are refused by
    // privilege above, whatever their values).
    p.execute(
        &format!(
            "INSERT INTO picloud.outbox (app_id, source, op, script_id, payload)
             VALUES ('{app}', 'queue', 'x', '{script}', '{{}}')"
        ),
        &[],
    )
    .expect("an unclaimed row");
    let mut a = connect_as(&db, &admin);
    assert_eq!(
        sqlstate(a.execute("UPDATE picloud.outbox SET claimed_by = 'me'", &[])),
        "42501"
    );
    a.execute(
        "UPDATE picloud.outbox SET claimed_by = 'me', lease_expires_at = now() + interval '1 minute'",
        &[],
    )
    .expect("a claim with its lease");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM picloud.outbox WHERE claimed_by = 'me' AND lease_expires_at IS NOT NULL"
        ),
        2
    );
    drop((p, a));
    c.batch_execute(&format!(
        "DROP OWNED BY {producer}, {admin}; DROP ROLE {producer}; DROP ROLE {admin}"
    ))
    .expect("drop roles");
}

/// What distributing picloud by app (docs/scaling.md) needs of the schema: every primary key,
/// unique constraint or index and foreign key of every picloud table leads with app_id, and every
/// per-event function on the hot paths takes the app id first.
#[test]
fn every_key_and_hot_path_function_leads_with_app_id() {
    let (_db, mut c) = fresh_db("distribution");
    let rows = c
        .query(
            "SELECT r.relname || ' ' || c.conname,
                    (SELECT a.attname FROM pg_attribute a
                     WHERE a.attrelid = c.conrelid AND a.attnum = c.conkey[1])::text
             FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid
             WHERE r.relnamespace = 'picloud'::regnamespace AND c.contype IN ('p', 'u', 'f')
             UNION ALL
             SELECT r.relname || ' ' || i.indexrelid::regclass::text,
                    (SELECT a.attname FROM pg_attribute a
                     WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0])::text
             FROM pg_index i JOIN pg_class r ON r.oid = i.indrelid
             WHERE r.relnamespace = 'picloud'::regnamespace AND i.indisunique",
            &[],
        )
        .unwrap();
    let keys: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let tables: std::collections::BTreeSet<&str> = keys
        .iter()
        .filter_map(|(k, _)| k.split(' ').next())
        .collect();
    for table in TABLES.iter().chain(["handler_secrets"].iter()) {
        assert!(tables.contains(table), "{table} has a key: {keys:?}");
    }
    let off: Vec<&(String, String)> = keys.iter().filter(|(_, first)| first != "app_id").collect();
    assert!(off.is_empty(), "keys not led by app_id: {off:?}");

    let hot = [
        "picloud_enqueue",
        "picloud_enqueue_bulk",
        "picloud_emit_kv",
        "picloud_complete",
        "picloud_fail",
        "picloud_extend_lease",
        "picloud_release",
        "picloud_run_sql_handler",
        "picloud_record_abandoned_execution",
        "picloud_replay_dead_letter",
        "picloud_resolve_dead_letter",
        "picloud_open_inbox",
    ];
    for name in hot {
        let first: Vec<String> = c
            .query(
                "SELECT coalesce(p.proargnames[1], '') || ':' || format_type(p.proargtypes[0], NULL)
                 FROM pg_proc p WHERE p.pronamespace = 'picloud'::regnamespace AND p.proname = $1",
                &[&name],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!first.is_empty(), "{name} exists");
        assert!(
            first.iter().all(|f| f == "p_app_id:uuid"),
            "{name} takes the app id first: {first:?}"
        );
    }
}

/// A SET clause holds for everything a function calls. The lanes fetch the rows they locked by
/// address with every other scan method switched off (picloud._outbox_at: the cost model would
/// rather walk the whole due index); a function that did so and called others would have their
/// statements planned without indexes too - the http lane's lock once read an app's newest
/// 1,000 rows for every batch so, and looked handlers and triggers up by reading their whole
/// tables. Only functions that plan nothing else may switch scan methods off
/// (_sql_lane_complete calls only _count_outcome, one INSERT ... ON CONFLICT).
#[test]
fn scan_methods_are_switched_off_only_where_nothing_else_is_planned() {
    let (_db, mut c) = fresh_db("scan_methods");
    let names: Vec<String> = c
        .query(
            "SELECT p.proname::text FROM pg_proc p
             WHERE p.pronamespace = 'picloud'::regnamespace
               AND EXISTS (SELECT 1 FROM unnest(p.proconfig) s
                           WHERE s IN ('enable_seqscan=off', 'enable_indexscan=off',
                                       'enable_bitmapscan=off'))
             ORDER BY 1",
            &[],
        )
        .expect("functions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(names, ["_outbox_at", "_sql_lane_complete"]);
}
