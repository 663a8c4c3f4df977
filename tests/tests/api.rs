//! The SQL API, function by function, against a real cluster.

use picloud_tests::postgres::fallible_iterator::FallibleIterator;
use picloud_tests::*;
use postgres::Client;
use serde_json::json;
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;
use uuid::Uuid;

/// The wake-up flag lives in shared memory, cluster-wide: tests that claim serialise here.
static CLAIMERS: Mutex<()> = Mutex::new(());

fn claimers() -> std::sync::MutexGuard<'static, ()> {
    CLAIMERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn uuid_of(c: &mut Client, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> Uuid {
    c.query_one(sql, params)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[test]
fn scripts_validate_their_target() {
    let (_db, mut c) = fresh_db("scripts");
    let (app, _) = ledger_app(&mut c);
    let create = "SELECT picloud_create_script($1, $2, $3, $4, $5)";
    let cases: &[(&str, &str, &str, i32, &str)] = &[
        ("a", "sql", "no_such_function", 1000, "42883"),
        ("b", "rust", "x", 1000, "22023"),
        ("c", "http", "ftp://example.com", 1000, "22023"),
        ("d", "command", "rm -rf /", 1000, "22023"),
        ("e", "command", "ok;reboot", 1000, "22023"),
        ("f", "command", "ok", 0, "22023"),
        ("g", "command", "ok", 3_600_001, "22023"),
        ("", "command", "ok", 1000, "22023"),
        ("ledger", "command", "ok", 1000, "23505"),
    ];
    for (name, kind, target, timeout, code) in cases {
        let got = sqlstate(c.query_one(create, &[&app, name, kind, target, timeout]));
        assert_eq!(&got, code, "{name} {kind} {target}");
    }
    assert_eq!(
        sqlstate(c.query_one(create, &[&app, &None::<String>, &"sql", &"x", &1000])),
        "22004"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.scripts"), 1);
    let http = uuid_of(
        &mut c,
        "SELECT picloud_create_script($1, 'hook', 'http', 'http://example.com/hook')",
        &[&app],
    );
    let cmd = uuid_of(
        &mut c,
        "SELECT picloud_create_script($1, 'cmd', 'command', 'resize-image', 5000)",
        &[&app],
    );
    let listed: Vec<Uuid> = c
        .query("SELECT script_id FROM picloud_list_scripts($1)", &[&app])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(listed.contains(&http) && listed.contains(&cmd) && listed.len() == 3);
    c.execute("SELECT picloud_drop_script($1, $2)", &[&app, &cmd])
        .unwrap();
    assert_eq!(
        sqlstate(c.execute("SELECT picloud_drop_script($1, $2)", &[&app, &cmd])),
        "P0002"
    );
}

#[test]
fn kv_trigger_bad_patterns_ops_and_handlers_are_refused() {
    let (_db, mut c) = fresh_db("kvtrig_bad");
    let (app, script) = ledger_app(&mut c);
    let create = "SELECT picloud_create_kv_trigger($1, $2, $3)";
    for bad in ["", "a*b", "**", "user*", ":*", "*:*"] {
        assert_eq!(
            sqlstate(c.query_one(create, &[&app, &bad, &script])),
            "22023",
            "{bad:?}"
        );
    }
    assert_eq!(
        sqlstate(c.query_one(create, &[&app, &"x", &Uuid::new_v4()])),
        "P0002"
    );
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT picloud_create_kv_trigger($1, 'x', $2, ARRAY['explode'])",
            &[&app, &script]
        )),
        "22023"
    );
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT picloud_create_kv_trigger($1, 'x', $2, ARRAY[]::text[])",
            &[&app, &script]
        )),
        "22023"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.triggers"), 0);
}

/// Three KV triggers of `app`: on every collection, on the `user:` prefix, and on inserts into
/// `orders` only. Returns (all, prefix, exact).
fn three_kv_triggers(c: &mut Client, app: Uuid, script: Uuid) -> (Uuid, Uuid, Uuid) {
    let create = "SELECT picloud_create_kv_trigger($1, $2, $3)";
    let all = uuid_of(c, create, &[&app, &"*", &script]);
    let prefix = uuid_of(c, create, &[&app, &"user:*", &script]);
    let exact = uuid_of(
        c,
        "SELECT picloud_create_kv_trigger($1, 'orders', $2, ARRAY['insert'])",
        &[&app, &script],
    );
    (all, prefix, exact)
}

/// The triggers of `app` that picloud_match_kv_triggers finds for a write.
fn matching(c: &mut Client, app: Uuid, coll: &str, op: &str) -> HashSet<Uuid> {
    c.query(
        "SELECT trigger_id FROM picloud_match_kv_triggers($1, $2, $3)",
        &[&app, &coll, &op],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn kv_triggers_match_by_exact_prefix_and_wildcard_pattern() {
    let (_db, mut c) = fresh_db("kvtrig_match");
    let (app, script) = ledger_app(&mut c);
    let (all, prefix, exact) = three_kv_triggers(&mut c, app, script);
    assert_eq!(
        matching(&mut c, app, "orders", "insert"),
        HashSet::from([all, exact])
    );
    assert_eq!(
        matching(&mut c, app, "orders", "delete"),
        HashSet::from([all])
    );
    assert_eq!(
        matching(&mut c, app, "user:42", "set"),
        HashSet::from([all, prefix])
    );
    assert_eq!(matching(&mut c, app, "user", "set"), HashSet::from([all]));
}

#[test]
fn kv_triggers_are_read_back_and_listed() {
    let (_db, mut c) = fresh_db("kvtrig_get");
    let (app, script) = ledger_app(&mut c);
    let (_, _, exact) = three_kv_triggers(&mut c, app, script);
    let info = c.query_one("SELECT kind, collection_pattern, ops, registered_by_principal::text, enabled FROM picloud_get_trigger($1, $2)", &[&app, &exact]).unwrap();
    assert_eq!(info.get::<_, String>(0), "kv");
    assert_eq!(info.get::<_, String>(1), "orders");
    assert_eq!(info.get::<_, Vec<String>>(2), vec!["insert".to_string()]);
    assert_eq!(info.get::<_, String>(3), "postgres");
    assert!(info.get::<_, bool>(4));
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT * FROM picloud_get_trigger($1, $2)",
            &[&app, &Uuid::new_v4()]
        )),
        "P0002"
    );
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM picloud_list_triggers('{app}')")
        ),
        3
    );
}

#[test]
fn disabled_kv_triggers_do_not_match_until_enabled() {
    let (_db, mut c) = fresh_db("kvtrig_toggle");
    let (app, script) = ledger_app(&mut c);
    let (all, _, exact) = three_kv_triggers(&mut c, app, script);
    c.execute("SELECT picloud_disable_trigger($1, $2)", &[&app, &all])
        .unwrap();
    assert_eq!(
        matching(&mut c, app, "orders", "insert"),
        HashSet::from([exact])
    );
    c.execute("SELECT picloud_enable_trigger($1, $2)", &[&app, &all])
        .unwrap();
    assert_eq!(
        matching(&mut c, app, "orders", "insert"),
        HashSet::from([all, exact])
    );
    assert_eq!(
        sqlstate(c.execute(
            "SELECT picloud_enable_trigger($1, $2)",
            &[&app, &Uuid::new_v4()]
        )),
        "P0002"
    );
}

#[test]
fn emit_kv_enqueues_an_event_per_matching_trigger() {
    let (_db, mut c) = fresh_db("kvtrig_emit");
    let (app, script) = ledger_app(&mut c);
    three_kv_triggers(&mut c, app, script);
    let n: i32 = c
        .query_one(
            "SELECT picloud_emit_kv($1, 'user:7', 'set', 'k', '{\"v\":1}')",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let payload: serde_json::Value = c
        .query_one("SELECT payload FROM picloud.outbox LIMIT 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        payload,
        json!({"collection": "user:7", "op": "set", "key": "k", "value": {"v": 1}})
    );
    assert_eq!(
        sqlstate(c.query_one("SELECT picloud_emit_kv($1, '', 'set', 'k', '{}')", &[&app])),
        "22023"
    );
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT picloud_emit_kv($1, 'x', 'upsert', 'k', '{}')",
            &[&app]
        )),
        "22023"
    );
}

#[test]
fn matching_uses_the_index_with_100k_triggers() {
    let (_db, mut c) = fresh_db("match100k");
    c.batch_execute(
        "CREATE FUNCTION noop(e jsonb) RETURNS void LANGUAGE sql AS '';
         INSERT INTO picloud.apps (app_id, name)
           SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'app' || g FROM generate_series(1, 1000) g;
         INSERT INTO picloud.scripts (app_id, script_id, name, kind, target, sql_function)
           SELECT app_id, app_id, 'noop', 'sql', 'noop', 'noop(jsonb)'::regprocedure FROM picloud.apps;
         INSERT INTO picloud.triggers (app_id, trigger_id, kind, script_id)
           SELECT a.app_id, gen_random_uuid(), 'kv', a.app_id FROM picloud.apps a, generate_series(1, 100);
         INSERT INTO picloud.kv_trigger_details (app_id, trigger_id, collection_pattern, match_key, ops)
           SELECT t.app_id, t.trigger_id, p.pattern, picloud._pattern_match_key(p.pattern), ARRAY['set']
           FROM (SELECT app_id, trigger_id, row_number() OVER (PARTITION BY app_id ORDER BY trigger_id) AS n FROM picloud.triggers) t
           CROSS JOIN LATERAL (SELECT CASE WHEN t.n = 1 THEN '*' WHEN t.n % 2 = 0 THEN 'c' || t.n ELSE 'p' || t.n || ':*' END AS pattern) p;
         ANALYZE picloud.triggers; ANALYZE picloud.kv_trigger_details;",
    )
    .unwrap();
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.triggers"),
        100_000
    );
    let app = "00000000-0000-0000-0000-000000000500";
    let plan: Vec<String> = c
        .query(
            &format!("EXPLAIN (ANALYZE, COSTS OFF) SELECT * FROM picloud.picloud_match_kv_triggers('{app}', 'c10', 'set')"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The function is inlined; the plan must probe the match index, not scan all patterns.
    let text = plan.join("\n");
    assert!(text.contains("kv_trigger_details_match_idx"), "{text}");
    assert!(!text.contains("Seq Scan on kv_trigger_details"), "{text}");
    let matched = count(
        &mut c,
        &format!("SELECT count(*) FROM picloud.picloud_match_kv_triggers('{app}', 'c10', 'set')"),
    );
    assert_eq!(matched, 2); // the exact trigger and '*'
    let matched = count(
        &mut c,
        &format!("SELECT count(*) FROM picloud.picloud_match_kv_triggers('{app}', 'p11:x', 'set')"),
    );
    assert_eq!(matched, 2); // the prefix trigger and '*'
}

#[test]
fn enqueue_records_a_due_unclaimed_event_of_depth_zero() {
    let (_db, mut c) = fresh_db("enqueue");
    let (app, script) = ledger_app(&mut c);
    let id = uuid_of(
        &mut c,
        "SELECT picloud_enqueue($1, 'queue', 'send', '{\"n\":1}', $2)",
        &[&app, &script],
    );
    let row = c
        .query_one("SELECT source, op, depth, attempt_count, claimed_by IS NULL, due_at <= now() FROM picloud.outbox WHERE event_id = $1", &[&id])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "queue");
    assert_eq!(row.get::<_, String>(1), "send");
    assert_eq!(row.get::<_, i32>(2), 0);
    assert_eq!(row.get::<_, i32>(3), 0);
    assert!(row.get::<_, bool>(4) && row.get::<_, bool>(5));
}

#[test]
fn enqueue_refuses_bad_arguments_with_their_sqlstate() {
    let (_db, mut c) = fresh_db("enqueue_bad");
    let (app, script) = ledger_app(&mut c);
    let e = "SELECT picloud_enqueue($1, $2, $3, $4::text::jsonb, $5)";
    let bad: &[(&str, &str, &str, &str)] =
        &[("nope", "x", "{}", "22023"), ("queue", "", "{}", "22023")];
    for (source, op, payload, code) in bad {
        assert_eq!(
            &sqlstate(c.query_one(e, &[&app, source, op, payload, &script])),
            code
        );
    }
    assert_eq!(
        sqlstate(c.query_one(e, &[&app, &"queue", &"x", &"{", &script])),
        "22P02"
    );
    assert_eq!(
        sqlstate(c.query_one(e, &[&None::<Uuid>, &"queue", &"x", &"{}", &script])),
        "22004"
    );
    assert_eq!(
        sqlstate(c.query_one(e, &[&app, &"queue", &"x", &"{}", &Uuid::new_v4()])),
        "P0002"
    );
    assert_eq!(
        sqlstate(c.query_one(e, &[&Uuid::new_v4(), &"queue", &"x", &"{}", &script])),
        "P0002"
    );
    assert_eq!(
        sqlstate(c.query_one("SELECT picloud_enqueue($1, 'queue', 'x', '{}')", &[&app])),
        "22023"
    );
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_trigger_id => $3)",
            &[&app, &script, &Uuid::new_v4()]
        )),
        "P0002"
    );
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_reply_to => 'nobody')",
            &[&app, &script]
        )),
        "22023"
    );
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_depth => -1)",
            &[&app, &script]
        )),
        "22023"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
}

#[test]
fn enqueue_refuses_payloads_over_the_limit() {
    let (_db, mut c) = fresh_db("enqueue_limit");
    let (app, script) = ledger_app(&mut c);
    c.batch_execute("SET picloud.max_payload_bytes = 2048")
        .unwrap();
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(10_000));
    let err = c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', $2::text::jsonb, $3)",
        &[&app, &big, &script],
    );
    assert_eq!(sqlstate(err), "PC004");
    c.batch_execute("RESET picloud.max_payload_bytes").unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
}

#[test]
fn enqueue_beyond_the_depth_limit_is_refused_naming_depth_and_limit() {
    let (_db, mut c) = fresh_db("enqueue_depth");
    let (app, script) = ledger_app(&mut c);
    c.batch_execute("SET picloud.max_trigger_depth = 3")
        .unwrap();
    uuid_of(
        &mut c,
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_depth => 3)",
        &[&app, &script],
    );
    let err = c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_depth => 4)",
        &[&app, &script],
    );
    let message = match &err {
        Err(e) => e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default(),
        Ok(_) => String::new(),
    };
    assert_eq!(sqlstate(err), "PC001");
    assert!(
        message.contains("depth 4") && message.contains("(3)"),
        "{message}"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 1);
}

#[test]
fn enqueue_with_run_at_is_due_then() {
    let (_db, mut c) = fresh_db("enqueue_later");
    let (app, script) = ledger_app(&mut c);
    let later = uuid_of(
        &mut c,
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_run_at => now() + interval '1 hour')",
        &[&app, &script],
    );
    let delay: f64 = c
        .query_one("SELECT extract(epoch FROM due_at - now())::float8 FROM picloud.outbox WHERE event_id = $1", &[&later])
        .unwrap()
        .get(0);
    assert!((3590.0..=3600.0).contains(&delay), "{delay}");
}

/// The second enqueue with a key returns the first id and enqueues nothing, even after the
/// first event ran.
#[test]
fn enqueue_with_an_idempotency_key_returns_the_first_event_even_after_it_ran() {
    let (_db, mut c) = fresh_db("enqueue_key");
    let (app, script) = ledger_app(&mut c);
    let q = "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_idempotency_key => 'order-17')";
    let first = uuid_of(&mut c, q, &[&app, &script]);
    let before = count(&mut c, "SELECT count(*) FROM picloud.outbox");
    assert_eq!(uuid_of(&mut c, q, &[&app, &script]), first);
    c.execute("DELETE FROM picloud.outbox WHERE event_id = $1", &[&first])
        .unwrap();
    assert_eq!(uuid_of(&mut c, q, &[&app, &script]), first);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.outbox"),
        before - 1
    );
}

#[test]
fn bulk_enqueue_returns_ids_in_order() {
    let (_db, mut c) = fresh_db("bulk");
    let (app, script) = ledger_app(&mut c);
    let payloads: Vec<serde_json::Value> = (0..1000).map(|i| json!({ "i": i })).collect();
    let ids: Vec<Uuid> = c
        .query(
            "SELECT * FROM picloud_enqueue_bulk($1, 'queue', 'bulk', $2, $3)",
            &[&app, &payloads, &script],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 1000);
    // Ascending in payload order: the rows of one call append to the end of the app's part of
    // outbox_pkey.
    let mut ascending = ids.clone();
    ascending.sort();
    assert_eq!(ids, ascending, "event ids ascend with the payloads");
    for (i, id) in ids.iter().enumerate().step_by(97) {
        let p: serde_json::Value = c
            .query_one(
                "SELECT payload FROM picloud.outbox WHERE event_id = $1",
                &[id],
            )
            .unwrap()
            .get(0);
        assert_eq!(p, json!({ "i": i }));
    }
    let with_null = vec![Some(json!({})), None];
    assert_eq!(
        sqlstate(c.query(
            "SELECT * FROM picloud_enqueue_bulk($1, 'queue', 'bulk', $2, $3)",
            &[&app, &with_null, &script]
        )),
        "22004"
    );
    // One payload over the limit, anywhere in the array, refuses the whole call.
    c.batch_execute("SET picloud.max_payload_bytes = 1024")
        .unwrap();
    let mut oversized: Vec<serde_json::Value> = (0..10).map(|i| json!({ "i": i })).collect();
    oversized[7] = json!({ "b": "x".repeat(2000) });
    let refused = c.query(
        "SELECT * FROM picloud_enqueue_bulk($1, 'queue', 'bulk', $2, $3)",
        &[&app, &oversized, &script],
    );
    let message = error_message(c.query(
        "SELECT * FROM picloud_enqueue_bulk($1, 'queue', 'bulk', $2, $3)",
        &[&app, &oversized, &script],
    ));
    assert_eq!(sqlstate(refused), "PC004");
    assert!(message.contains("1024"), "{message}");
    oversized[7] = json!({ "b": "x".repeat(900) });
    let taken = c
        .query(
            "SELECT * FROM picloud_enqueue_bulk($1, 'queue', 'bulk', $2, $3)",
            &[&app, &oversized, &script],
        )
        .unwrap();
    assert_eq!(taken.len(), 10);
    c.batch_execute("RESET picloud.max_payload_bytes").unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 1010);
}

#[test]
fn enqueue_is_transactional_and_notifies_only_on_commit() {
    let _serial = claimers();
    let (db, mut c) = fresh_db("txn");
    let (app, script) = ledger_app(&mut c);
    let mut listener = connect(&db);
    listener.batch_execute("LISTEN picloud_wake").unwrap();
    // An empty claim marks a supervisor as idle, so enqueues notify.
    c.query("SELECT * FROM picloud_claim('idle-worker', 10, 1000)", &[])
        .unwrap();
    assert!(c
        .query_one("SELECT picloud_supervisor_idle()", &[])
        .unwrap()
        .get::<_, bool>(0));

    let mut tx = c.transaction().unwrap();
    tx.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &script],
    )
    .unwrap();
    tx.rollback().unwrap();
    let mut seen = 0;
    {
        let mut notes = listener.notifications();
        let mut it = notes.timeout_iter(Duration::from_millis(500));
        while let Ok(Some(_)) = it.next() {
            seen += 1;
        }
    }
    assert_eq!(seen, 0, "a rolled-back enqueue must not notify");
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);

    let mut tx = c.transaction().unwrap();
    tx.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &script],
    )
    .unwrap();
    tx.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'y', '{}', $2)",
        &[&app, &script],
    )
    .unwrap();
    tx.commit().unwrap();
    let mut channels = Vec::new();
    {
        let mut notes = listener.notifications();
        let mut it = notes.timeout_iter(Duration::from_millis(1000));
        while let Ok(Some(n)) = it.next() {
            channels.push(n.channel().to_string());
        }
    }
    assert_eq!(
        channels,
        vec!["picloud_wake".to_string()],
        "one coalesced notification per commit"
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 2);

    // While a supervisor is busy (its last claim returned rows), enqueues do not notify.
    c.query("SELECT * FROM picloud_claim('busy-worker', 1, 1000)", &[])
        .unwrap();
    assert!(!c
        .query_one("SELECT picloud_supervisor_idle()", &[])
        .unwrap()
        .get::<_, bool>(0));
    c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'z', '{}', $2)",
        &[&app, &script],
    )
    .unwrap();
    let mut seen = 0;
    {
        let mut notes = listener.notifications();
        let mut it = notes.timeout_iter(Duration::from_millis(500));
        while let Ok(Some(_)) = it.next() {
            seen += 1;
        }
    }
    assert_eq!(seen, 0);
}

#[test]
fn two_claimers_never_share_a_row() {
    let _serial = claimers();
    let (db, mut c) = fresh_db("claim2");
    let (app, script) = ledger_app(&mut c);
    c.execute(
        "SELECT count(*) FROM picloud_enqueue_bulk($1, 'queue', 'x', ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series(1, 4000) g), $2)",
        &[&app, &script],
    )
    .unwrap();
    let claim = |worker: &'static str, db: String| {
        std::thread::spawn(move || {
            let mut c = connect(&db);
            let mut got = Vec::new();
            loop {
                let rows = c
                    .query(
                        "SELECT event_id FROM picloud_claim($1, 37, 60000)",
                        &[&worker],
                    )
                    .unwrap();
                if rows.is_empty() {
                    break;
                }
                got.extend(rows.iter().map(|r| r.get::<_, Uuid>(0)));
            }
            got
        })
    };
    let a = claim("worker-a", db.clone());
    let b = claim("worker-b", db.clone());
    let a = a.join().unwrap();
    let b = b.join().unwrap();
    let sa: HashSet<Uuid> = a.iter().copied().collect();
    let sb: HashSet<Uuid> = b.iter().copied().collect();
    assert_eq!(sa.len(), a.len(), "worker a got a row twice");
    assert_eq!(sb.len(), b.len(), "worker b got a row twice");
    assert!(sa.is_disjoint(&sb), "a row was claimed by both workers");
    assert_eq!(sa.len() + sb.len(), 4000);
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both claimers took work: {} / {}",
        a.len(),
        b.len()
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM picloud.outbox WHERE claimed_by IS NULL OR attempt_count <> 1"
        ),
        0
    );
}

#[test]
fn complete_many_completes_what_the_worker_holds_and_leaves_out_the_rest() {
    let _serial = claimers();
    let (_db, mut c) = fresh_db("complete_many");
    let (app, script) = ledger_app(&mut c);
    let ids: Vec<Uuid> = (0..3)
        .map(|_| {
            uuid_of(
                &mut c,
                "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
                &[&app, &script],
            )
        })
        .collect();
    let claimed = c
        .query("SELECT event_id FROM picloud_claim('w', 10, 60000)", &[])
        .unwrap();
    assert_eq!(claimed.len(), 3);
    // The third's lease went to another worker; a fourth id was never an event.
    c.execute(
        "UPDATE picloud.outbox SET claimed_by = 'other' WHERE event_id = $1",
        &[&ids[2]],
    )
    .unwrap();
    let unknown = Uuid::new_v4();
    let all = vec![ids[0], ids[1], ids[2], unknown];
    let apps = vec![app; 4];
    let (two, apps_two, apps_three) = (all[..2].to_vec(), vec![app; 2], vec![app; 3]);
    let counted = "SELECT coalesce(sum(completed), 0)::bigint FROM picloud.event_counts";
    let completed_before = count(&mut c, counted);

    // Bad calls change nothing.
    let bad: Vec<(&str, Vec<&(dyn postgres::types::ToSql + Sync)>, &str)> = vec![
        (
            "SELECT * FROM picloud_complete_many($1, $2, NULL)",
            vec![&apps, &all],
            "22004",
        ),
        (
            "SELECT * FROM picloud_complete_many($1, $2, 'w')",
            vec![&apps_three, &all],
            "22023",
        ),
        (
            "SELECT * FROM picloud_complete_many($1, $2, 'w', ARRAY['{}'::jsonb])",
            vec![&apps, &all],
            "22023",
        ),
        (
            "SELECT * FROM picloud_complete_many(
                 array_fill($1::uuid, ARRAY[10001]), array_fill($1::uuid, ARRAY[10001]), 'w')",
            vec![&app],
            "22023",
        ),
    ];
    for (sql, params, state) in bad {
        assert_eq!(sqlstate(c.query(sql, &params)), state, "{sql}");
    }
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 3);

    let done: HashSet<Uuid> = c
        .query(
            "SELECT * FROM picloud_complete_many($1, $2, 'w')",
            &[&apps, &all],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(done, HashSet::from([ids[0], ids[1]]));
    let left: Vec<Uuid> = c
        .query("SELECT event_id FROM picloud.outbox", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec![ids[2]], "the other worker's event stays");
    assert_eq!(count(&mut c, counted), completed_before + 2);
    // Completing them again completes nothing; the single call says why.
    assert_eq!(
        c.query(
            "SELECT * FROM picloud_complete_many($1, $2, 'w')",
            &[&apps_two, &two],
        )
        .unwrap()
        .len(),
        0
    );
    assert_eq!(
        sqlstate(c.execute("SELECT picloud_complete($1, $2, 'w')", &[&app, &ids[0]])),
        "PC002"
    );
}

#[test]
fn retry_schedule_then_one_dead_letter() {
    let _serial = claimers();
    let (_db, mut c) = fresh_db("retry");
    let (app, script) = ledger_app(&mut c);
    c.batch_execute(
        "SET picloud.retry_max_attempts = 5; SET picloud.retry_base_delay = '100ms'; SET picloud.retry_max_delay = '1s'",
    )
    .unwrap();
    let id = uuid_of(
        &mut c,
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2)",
        &[&app, &script],
    );
    let mut last_delay = 0.0;
    for attempt in 1..=5 {
        let claimed = c
            .query(
                "SELECT event_id, attempt_count FROM picloud_claim('w', 10, 60000)",
                &[],
            )
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].get::<_, i32>(1), attempt);
        // Someone else cannot settle it.
        assert_eq!(
            sqlstate(c.query(
                "SELECT * FROM picloud_fail($1, $2, 'intruder', 'x')",
                &[&app, &id]
            )),
            "PC002"
        );
        assert_eq!(
            sqlstate(c.execute("SELECT picloud_complete($1, $2, 'intruder')", &[&app, &id])),
            "PC002"
        );
        let row = c
            .query_one(
                "SELECT outcome, extract(epoch FROM next_due_at - now())::float8, dead_letter_id FROM picloud_fail($1, $2, 'w', $3)",
                &[&app, &id, &format!("boom {attempt}")],
            )
            .unwrap();
        let outcome: String = row.get(0);
        if attempt < 5 {
            assert_eq!(outcome, "retry");
            let delay: f64 = row.get(1);
            let base = 0.1 * 2f64.powi(attempt - 1);
            assert!(
                delay >= base.min(1.0) - 0.001 && delay <= (base * 1.25).min(1.0) + 0.001,
                "attempt {attempt}: {delay}"
            );
            assert!(
                delay >= last_delay,
                "delays must not shrink: {last_delay} then {delay}"
            );
            last_delay = delay;
            c.execute(
                "UPDATE picloud.outbox SET due_at = now() WHERE event_id = $1",
                &[&id],
            )
            .unwrap();
        } else {
            assert_eq!(outcome, "dead_letter");
            assert!(row.get::<_, Option<Uuid>>(2).is_some());
        }
    }
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
    let dl = c
        .query_one(
            "SELECT original_event_id, attempt_count, last_error FROM picloud.dead_letters",
            &[],
        )
        .unwrap();
    assert_eq!(dl.get::<_, Uuid>(0), id);
    assert_eq!(dl.get::<_, i32>(1), 5);
    assert_eq!(dl.get::<_, String>(2), "boom 5");
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM picloud.dead_letters"),
        1
    );
}

#[test]
fn a_self_feeding_chain_stops_at_the_depth_limit() {
    let _serial = claimers();
    let (_db, mut c) = fresh_db("depth");
    let (app, _) = ledger_app(&mut c);
    c.batch_execute(&format!(
        "CREATE FUNCTION again(e jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM picloud.picloud_enqueue('{app}', 'queue', 'again', e->'payload', (e->>'script_id')::uuid);
         END $$;
         SET picloud.max_trigger_depth = 4;"
    ))
    .unwrap();
    let script = uuid_of(
        &mut c,
        "SELECT picloud_create_script($1, 'again', 'sql', 'again')",
        &[&app],
    );
    c.query_one(
        "SELECT picloud_enqueue($1, 'queue', 'again', '{}', $2)",
        &[&app, &script],
    )
    .unwrap();
    let mut depths = Vec::new();
    let mut last_error = String::new();
    for _ in 0..10 {
        let rows = c
            .query(
                "SELECT app_id, event_id, depth FROM picloud_claim('w', 1, 60000)",
                &[],
            )
            .unwrap();
        let Some(row) = rows.first() else { break };
        let (a, e, d): (Uuid, Uuid, i32) = (row.get(0), row.get(1), row.get(2));
        depths.push(d);
        let mut tx = c.transaction().unwrap();
        let result = tx.query_one("SELECT picloud_run_sql_handler($1, $2, 'w')", &[&a, &e]);
        match result {
            Ok(_) => tx.commit().unwrap(),
            Err(err) => {
                last_error = err.code().map(|s| s.code().to_string()).unwrap_or_default();
                eprintln!("chain stopped: {err:?}");
                tx.rollback().unwrap();
                c.execute("UPDATE picloud.outbox SET claimed_by = NULL, lease_expires_at = NULL WHERE event_id = $1", &[&e]).unwrap();
                break;
            }
        }
    }
    assert_eq!(depths, vec![0, 1, 2, 3, 4]);
    assert_eq!(last_error, "PC001");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM picloud.outbox WHERE depth > 4"
        ),
        0
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 1);
}

/// A database whose app has a dead-letter trigger on queue events and five queue events that
/// each failed once with retries off: five dead letters, each fanned out to the trigger.
/// Returns (client, app, script, dead-letter trigger). Callers hold `claimers()`.
fn five_dead_letters(tag: &str) -> (Client, Uuid, Uuid, Uuid) {
    let (_db, mut c) = fresh_db(tag);
    let (app, script) = ledger_app(&mut c);
    c.batch_execute("SET picloud.retry_max_attempts = 1")
        .unwrap();
    let notify_script = uuid_of(
        &mut c,
        "SELECT picloud_create_script($1, 'on-dead', 'command', 'alert')",
        &[&app],
    );
    let dl_trigger = uuid_of(
        &mut c,
        "SELECT picloud_create_dead_letter_trigger($1, $2, 'queue')",
        &[&app, &notify_script],
    );
    for i in 0..5 {
        let id = uuid_of(
            &mut c,
            "SELECT picloud_enqueue($1, 'queue', 'x', jsonb_build_object('i', $2::int), $3)",
            &[&app, &i, &script],
        );
        // Earlier fan-out rows are due too; only this event is failed.
        c.query("SELECT 1 FROM picloud_claim('w', 100, 60000)", &[])
            .unwrap();
        c.query(
            "SELECT * FROM picloud_fail($1, $2, 'w', 'nope')",
            &[&app, &id],
        )
        .unwrap();
    }
    (c, app, script, dl_trigger)
}

/// Two of the app's dead letters, by picloud_list_dead_letters (first page of two).
fn two_dead_letters(c: &mut Client, app: Uuid) -> Vec<Uuid> {
    let ids: Vec<Uuid> = c
        .query(
            "SELECT dead_letter_id FROM picloud_list_dead_letters($1, true, 2, 0)",
            &[&app],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 2);
    ids
}

fn dead_letter_count(c: &mut Client, app: Uuid) -> i64 {
    c.query_one("SELECT picloud_dead_letter_count($1)", &[&app])
        .unwrap()
        .get::<_, i64>(0)
}

#[test]
fn dead_letters_fan_out_to_the_dead_letter_trigger_one_level_deeper() {
    let _serial = claimers();
    let (mut c, _, _, dl_trigger) = five_dead_letters("dl_fanout");
    let fanned = c
        .query(
            "SELECT source, depth, trigger_id, payload->>'last_error' FROM picloud.outbox",
            &[],
        )
        .unwrap();
    assert_eq!(fanned.len(), 5);
    for r in &fanned {
        assert_eq!(r.get::<_, String>(0), "dead_letter");
        assert_eq!(r.get::<_, i32>(1), 1);
        assert_eq!(r.get::<_, Uuid>(2), dl_trigger);
        assert_eq!(r.get::<_, String>(3), "nope");
    }
}

#[test]
fn dead_letters_are_counted_listed_in_pages_and_fetched() {
    let _serial = claimers();
    let (mut c, app, _, _) = five_dead_letters("dl_list");
    assert_eq!(dead_letter_count(&mut c, app), 5);
    let ids = two_dead_letters(&mut c, app);
    assert_eq!(
        sqlstate(c.query(
            "SELECT * FROM picloud_list_dead_letters($1, true, -1, 0)",
            &[&app]
        )),
        "22023"
    );
    assert_eq!(
        sqlstate(c.query(
            "SELECT * FROM picloud_list_dead_letters($1, true, 10, -5)",
            &[&app]
        )),
        "22023"
    );
    let got: Uuid = c
        .query_one(
            "SELECT dead_letter_id FROM picloud_get_dead_letter($1, $2)",
            &[&app, &ids[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(got, ids[0]);
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT * FROM picloud_get_dead_letter($1, $2)",
            &[&app, &Uuid::new_v4()]
        )),
        "P0002"
    );
}

/// A resolution must be a known one; a resolved dead letter can be neither resolved again nor
/// replayed.
#[test]
fn a_dead_letter_is_resolved_once() {
    let _serial = claimers();
    let (mut c, app, _, _) = five_dead_letters("dl_resolve");
    let ids = two_dead_letters(&mut c, app);
    let resolve = "SELECT picloud_resolve_dead_letter($1, $2, $3)";
    assert_eq!(
        sqlstate(c.execute(resolve, &[&app, &ids[0], &"lost"])),
        "23514"
    );
    assert_eq!(
        sqlstate(c.execute(resolve, &[&app, &Uuid::new_v4(), &"ignored"])),
        "P0002"
    );
    c.execute(resolve, &[&app, &ids[0], &"handled_by_script"])
        .unwrap();
    assert_eq!(
        sqlstate(c.execute(resolve, &[&app, &ids[0], &"ignored"])),
        "PC003"
    );
    assert_eq!(
        sqlstate(c.query_one(
            "SELECT picloud_replay_dead_letter($1, $2)",
            &[&app, &ids[0]]
        )),
        "PC003"
    );
    assert_eq!(dead_letter_count(&mut c, app), 4);
}

#[test]
fn a_replayed_dead_letter_is_enqueued_afresh_and_marked_replayed() {
    let _serial = claimers();
    let (mut c, app, script, _) = five_dead_letters("dl_replay");
    c.execute("DELETE FROM picloud.outbox", &[]).unwrap();
    let ids = two_dead_letters(&mut c, app);
    let new_event = uuid_of(
        &mut c,
        "SELECT picloud_replay_dead_letter($1, $2)",
        &[&app, &ids[1]],
    );
    let r = c
        .query_one(
            "SELECT attempt_count, script_id FROM picloud.outbox WHERE event_id = $1",
            &[&new_event],
        )
        .unwrap();
    assert_eq!(r.get::<_, i32>(0), 0);
    assert_eq!(r.get::<_, Uuid>(1), script);
    let res: String = c
        .query_one(
            "SELECT resolution FROM picloud.dead_letters WHERE dead_letter_id = $1",
            &[&ids[1]],
        )
        .unwrap()
        .get(0);
    assert_eq!(res, "replayed");
    assert_eq!(dead_letter_count(&mut c, app), 4);
}

/// After one is resolved and one replayed, ignoring by a source with no dead letters ignores
/// none, and replaying by source replays the other three.
#[test]
fn dead_letters_are_ignored_and_replayed_in_bulk_by_source() {
    let _serial = claimers();
    let (mut c, app, _, _) = five_dead_letters("dl_bulk");
    c.execute("DELETE FROM picloud.outbox", &[]).unwrap();
    let ids = two_dead_letters(&mut c, app);
    c.execute(
        "SELECT picloud_resolve_dead_letter($1, $2, 'handled_by_script')",
        &[&app, &ids[0]],
    )
    .unwrap();
    uuid_of(
        &mut c,
        "SELECT picloud_replay_dead_letter($1, $2)",
        &[&app, &ids[1]],
    );
    assert_eq!(dead_letter_count(&mut c, app), 3);
    let ignored: i32 = c
        .query_one(
            "SELECT picloud_ignore_dead_letters($1, p_source => 'kv')",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert_eq!(ignored, 0);
    let replayed: i32 = c
        .query_one("SELECT picloud_replay_dead_letters($1, 'queue')", &[&app])
        .unwrap()
        .get(0);
    assert_eq!(replayed, 3);
    assert_eq!(dead_letter_count(&mut c, app), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 4);
}

#[test]
fn capture_trigger_turns_row_changes_into_events() {
    let (_db, mut c) = fresh_db("capture");
    let (app, script) = ledger_app(&mut c);
    c.query_one(
        "SELECT picloud_create_kv_trigger($1, 'orders', $2)",
        &[&app, &script],
    )
    .unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric);
         CREATE TRIGGER orders_events AFTER INSERT OR UPDATE OR DELETE ON orders
           FOR EACH ROW EXECUTE FUNCTION picloud.capture('{app}');
         CREATE TABLE unwatched (id int PRIMARY KEY);
         CREATE TRIGGER unwatched_events AFTER INSERT ON unwatched
           FOR EACH ROW EXECUTE FUNCTION picloud.capture('{app}');
         INSERT INTO orders VALUES (1, 10);
         UPDATE orders SET total = 12 WHERE id = 1;
         DELETE FROM orders WHERE id = 1;
         INSERT INTO unwatched VALUES (1);"
    ))
    .unwrap();
    let rows = c
        .query(
            "SELECT op, payload FROM picloud.outbox ORDER BY created_at, op DESC",
            &[],
        )
        .unwrap();
    let got: Vec<(String, serde_json::Value)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got.len(), 3);
    let by_op = |op: &str| {
        got.iter()
            .find(|(o, _)| o == op)
            .map(|(_, p)| p.clone())
            .unwrap()
    };
    assert_eq!(
        by_op("insert")["value"],
        json!({"old": null, "new": {"id": 1, "total": 10}})
    );
    assert_eq!(
        by_op("update")["value"],
        json!({"old": {"id": 1, "total": 10}, "new": {"id": 1, "total": 12}})
    );
    assert_eq!(
        by_op("delete")["value"],
        json!({"old": {"id": 1, "total": 12}, "new": null})
    );
    assert_eq!(by_op("delete")["key"], json!("1"));
    assert_eq!(by_op("insert")["collection"], json!("orders"));
    // A rolled-back write enqueues nothing.
    let mut tx = c.transaction().unwrap();
    tx.execute("INSERT INTO orders VALUES (2, 1)", &[]).unwrap();
    tx.rollback().unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 3);
}

/// A caller connection listening on a fresh inbox of `app`; returns it and the inbox.
fn listening_caller(db: &str, app: Uuid) -> (Client, String) {
    let mut caller = connect(db);
    let inbox: String = caller
        .query_one("SELECT picloud_open_inbox($1)", &[&app])
        .unwrap()
        .get(0);
    caller
        .batch_execute(&format!("LISTEN \"{inbox}\""))
        .unwrap();
    (caller, inbox)
}

/// The answers that reach `caller` within two seconds.
fn answers(caller: &mut Client) -> Vec<serde_json::Value> {
    let mut answers = Vec::new();
    let mut notes = caller.notifications();
    let mut it = notes.timeout_iter(Duration::from_secs(2));
    while let Ok(Some(n)) = it.next() {
        answers.push(serde_json::from_str::<serde_json::Value>(n.payload()).unwrap());
    }
    answers
}

#[test]
fn a_synchronous_call_gets_its_answer_on_the_inbox() {
    let _serial = claimers();
    let (db, mut c) = fresh_db("sync");
    let (app, script) = ledger_app(&mut c);
    let (mut caller, inbox) = listening_caller(&db, app);
    let id = uuid_of(
        &mut caller,
        "SELECT picloud_enqueue($1, 'queue', 'x', '{\"q\":1}', $2, p_reply_to => $3)",
        &[&app, &script, &inbox],
    );
    c.query("SELECT 1 FROM picloud_claim('w', 10, 60000)", &[])
        .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.query_one("SELECT picloud_run_sql_handler($1, $2, 'w')", &[&app, &id])
        .unwrap();
    tx.commit().unwrap();
    let answers = answers(&mut caller);
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0]["ok"], json!(true));
    assert_eq!(answers[0]["event_id"], json!(id.to_string()));
    assert_eq!(answers[0]["result"], json!({"echo": {"q": 1}}));
}

#[test]
fn a_failing_synchronous_call_is_dead_lettered_at_once_and_answers_the_error() {
    let _serial = claimers();
    let (db, mut c) = fresh_db("sync_fail");
    let (app, script) = ledger_app(&mut c);
    let (mut caller, inbox) = listening_caller(&db, app);
    let id = uuid_of(
        &mut caller,
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_reply_to => $3)",
        &[&app, &script, &inbox],
    );
    c.query("SELECT 1 FROM picloud_claim('w', 10, 60000)", &[])
        .unwrap();
    let outcome: String = c
        .query_one(
            "SELECT outcome FROM picloud_fail($1, $2, 'w', 'bad input')",
            &[&app, &id],
        )
        .unwrap()
        .get(0);
    assert_eq!(outcome, "dead_letter");
    let answers = answers(&mut caller);
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0]["ok"], json!(false));
    assert_eq!(answers[0]["error"], json!("bad input"));
}

#[test]
fn an_answer_to_a_disconnected_caller_is_recorded_as_abandoned() {
    let _serial = claimers();
    let (db, mut c) = fresh_db("sync_gone");
    let (app, script) = ledger_app(&mut c);
    let (mut caller, inbox) = listening_caller(&db, app);
    let id = uuid_of(
        &mut caller,
        "SELECT picloud_enqueue($1, 'queue', 'x', '{}', $2, p_reply_to => $3)",
        &[&app, &script, &inbox],
    );
    drop(caller);
    std::thread::sleep(Duration::from_millis(300));
    c.query("SELECT 1 FROM picloud_claim('w', 10, 60000)", &[])
        .unwrap();
    c.execute(
        "SELECT picloud_complete($1, $2, 'w', '{\"late\": true}')",
        &[&app, &id],
    )
    .unwrap();
    let row = c
        .query_one(
            "SELECT event_id, succeeded, reason, result FROM picloud_list_abandoned_executions($1)",
            &[&app],
        )
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), id);
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, String>(2), "caller disconnected");
    assert_eq!(row.get::<_, serde_json::Value>(3), json!({"late": true}));
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 0);
}
