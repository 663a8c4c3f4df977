//! The operator's views and tools: picloud.stats on a known workload run by a real supervisor,
//! the dead-letter runbook views, bulk resolution with a dry run, and outcome-count GC.

use picloud_tests::*;
use std::time::Duration;
use uuid::Uuid;

const FAST: &[&str] = &["--poll-interval-ms", "200"];

#[derive(Debug, PartialEq)]
struct StatsRow {
    app_name: String,
    source: String,
    due: i64,
    claimed: i64,
    delayed: i64,
    retrying: i64,
    dead_letters_unresolved: i64,
    completed: i64,
    failed: i64,
    dead_lettered: i64,
}

fn stats(c: &mut postgres::Client, sql: &str) -> Vec<StatsRow> {
    c.query(sql, &[])
        .expect("stats")
        .iter()
        .map(|r| StatsRow {
            app_name: r.get("app_name"),
            source: r.get("source"),
            due: r.get("due"),
            claimed: r.get("claimed"),
            delayed: r.get("delayed"),
            retrying: r.get("retrying"),
            dead_letters_unresolved: r.get("dead_letters_unresolved"),
            completed: r.get("completed"),
            failed: r.get("failed"),
            dead_lettered: r.get("dead_lettered"),
        })
        .collect()
}

fn row(app: &str, source: &str, q: [i64; 4], dead: i64, outcomes: [i64; 3]) -> StatsRow {
    StatsRow {
        app_name: app.into(),
        source: source.into(),
        due: q[0],
        claimed: q[1],
        delayed: q[2],
        retrying: q[3],
        dead_letters_unresolved: dead,
        completed: outcomes[0],
        failed: outcomes[1],
        dead_lettered: outcomes[2],
    }
}

fn enqueue(c: &mut postgres::Client, app: Uuid, script: Uuid, source: &str, payload: &str) -> Uuid {
    c.query_one(
        "SELECT picloud_enqueue($1, $2, 'op', $3::text::jsonb, $4)",
        &[&app, &source, &payload, &script],
    )
    .expect("enqueue")
    .get(0)
}

#[test]
fn stats_view_counts_a_known_workload() {
    let (db, mut c) = fresh_db("ops_stats");
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET picloud.retry_max_attempts = 2;
         ALTER DATABASE {db} SET picloud.retry_base_delay = '20ms';
         ALTER DATABASE {db} SET picloud.retry_max_delay = '50ms';"
    ))
    .expect("retry policy");
    let (app, script) = ledger_app(&mut c);
    // An app nobody sends anything to does not appear.
    c.execute("SELECT picloud_create_app('quiet')", &[])
        .expect("app");

    let mut sup = Supervisor::start(&db, FAST);
    for i in 0..20 {
        enqueue(&mut c, app, script, "queue", &format!(r#"{{"i": {i}}}"#));
    }
    for _ in 0..3 {
        enqueue(&mut c, app, script, "kv", r#"{"fail": "always"}"#);
    }
    assert!(
        eventually(Duration::from_secs(30), || {
            count(&mut c, "SELECT count(*) FROM ledger") == 20
                && count(&mut c, "SELECT count(*) FROM picloud.dead_letters") == 3
        }),
        "workload did not settle; log: {}",
        sup.log()
    );
    sup.terminate(Duration::from_secs(10));

    // 20 completed; 3 events failed both attempts: 6 failed attempts, 3 dead-lettered.
    assert_eq!(
        stats(&mut c, "SELECT * FROM picloud.stats"),
        vec![
            row("ledger", "kv", [0, 0, 0, 0], 3, [0, 6, 3]),
            row("ledger", "queue", [0, 0, 0, 0], 0, [20, 0, 0]),
        ]
    );

    // With no supervisor: 1 event claimed by hand and failed once with a long backoff (delayed
    // and retrying), 1 claimed and held, then 4 due and 2 scheduled for later.
    let failing = enqueue(&mut c, app, script, "pubsub", "{}");
    let held = enqueue(&mut c, app, script, "pubsub", "{}");
    c.batch_execute("SET picloud.retry_base_delay = '1h'; SET picloud.retry_max_delay = '1h'")
        .expect("long backoff");
    let claimed = c
        .query(
            "SELECT event_id FROM picloud_claim('by-hand', 10, 600000)",
            &[],
        )
        .expect("claim");
    assert_eq!(claimed.len(), 2);
    c.execute(
        "SELECT * FROM picloud_fail($1, $2, 'by-hand', 'not yet')",
        &[&app, &failing],
    )
    .expect("fail once");
    for _ in 0..4 {
        enqueue(&mut c, app, script, "queue", "{}");
    }
    for _ in 0..2 {
        c.execute(
            "SELECT picloud_enqueue($1, 'queue', 'op', '{}', $2, p_run_at => now() + interval '1 hour')",
            &[&app, &script],
        )
        .expect("delayed enqueue");
    }
    std::thread::sleep(Duration::from_millis(20));

    let now = stats(&mut c, "SELECT * FROM picloud_stats('1 hour')");
    assert_eq!(
        now,
        vec![
            row("ledger", "kv", [0, 0, 0, 0], 3, [0, 6, 3]),
            row("ledger", "pubsub", [0, 1, 1, 1], 0, [0, 1, 0]),
            row("ledger", "queue", [4, 0, 2, 0], 0, [20, 0, 0]),
        ]
    );
    let oldest_due_ms: f64 = c
        .query_one(
            "SELECT (extract(epoch FROM oldest_due_age) * 1000)::float8 FROM picloud.stats WHERE source = 'queue'",
            &[],
        )
        .expect("oldest due")
        .get::<_, Option<f64>>(0)
        .expect("queue has due events");
    assert!(oldest_due_ms > 0.0, "oldest_due_age {oldest_due_ms}");
    let held_is_claimed = count(
        &mut c,
        &format!("SELECT count(*) FROM picloud.outbox WHERE event_id = '{held}' AND claimed_by = 'by-hand'"),
    );
    assert_eq!(held_is_claimed, 1);

    // Outcome counts older than the interval are left out; bad intervals are refused.
    c.batch_execute(
        "UPDATE picloud.event_counts SET minute = minute - interval '2 hours' WHERE source = 'kv'",
    )
    .expect("age counts");
    let recent = stats(
        &mut c,
        "SELECT * FROM picloud_stats('1 hour') WHERE source = 'kv'",
    );
    assert_eq!(
        recent,
        vec![row("ledger", "kv", [0, 0, 0, 0], 3, [0, 0, 0])]
    );
    assert_eq!(
        sqlstate(c.query("SELECT * FROM picloud_stats('0 seconds')", &[])),
        "22023"
    );
    assert_eq!(
        sqlstate(c.query("SELECT * FROM picloud_stats('2 days')", &[])),
        "22023"
    );
    assert_eq!(
        sqlstate(c.query("SELECT * FROM picloud_stats(NULL)", &[])),
        "22004"
    );
}

#[test]
fn stats_and_runbook_views_show_a_tenant_only_its_apps() {
    let (db, mut c) = fresh_db("ops_tenant");
    let (app, script) = ledger_app(&mut c);
    let other: Uuid = c
        .query_one("SELECT picloud_create_app('other')", &[])
        .expect("other app")
        .get(0);
    let other_script: Uuid = c
        .query_one(
            "SELECT picloud_create_script($1, 'h', 'sql', 'ledger_handler')",
            &[&other],
        )
        .expect("other script")
        .get(0);
    enqueue(&mut c, app, script, "queue", "{}");
    enqueue(&mut c, other, other_script, "queue", "{}");
    dead_letter(&mut c, app, "one");
    dead_letter(&mut c, other, "two");

    let role = format!("ops_tenant_{}", std::process::id());
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN"
    ))
    .expect("role");
    c.execute(
        "SELECT picloud_grant_app_role($1, $2, 'admin')",
        &[&app, &role],
    )
    .expect("grant");
    let mut tenant = connect_as(&db, &role);
    for view in [
        "picloud.stats",
        "picloud.dead_letter_summary",
        "picloud.dead_letter_errors",
        "picloud.dead_letters_by_trigger",
    ] {
        let names: Vec<String> = tenant
            .query(&format!("SELECT DISTINCT app_name FROM {view}"), &[])
            .unwrap_or_else(|e| panic!("{view}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(names, vec!["ledger".to_string()], "{view}");
        let all = count(
            &mut c,
            &format!("SELECT count(DISTINCT app_name) FROM {view}"),
        );
        assert_eq!(all, 2, "{view} as superuser");
    }
    // A producer may enqueue but not read the operator's views of the app.
    let producer = format!("ops_producer_{}", std::process::id());
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {producer}; CREATE ROLE {producer} LOGIN"
    ))
    .expect("role");
    c.execute(
        "SELECT picloud_grant_app_role($1, $2, 'producer')",
        &[&app, &producer],
    )
    .expect("grant");
    let mut p = connect_as(&db, &producer);
    assert_eq!(count(&mut p, "SELECT count(*) FROM picloud.stats"), 0);
    assert_eq!(
        count(&mut p, "SELECT count(*) FROM picloud.dead_letter_summary"),
        0
    );
    assert_eq!(
        sqlstate(p.query(
            "SELECT * FROM picloud_resolve_dead_letters($1, 'ignored')",
            &[&app]
        )),
        "42501"
    );
    drop(tenant);
    drop(p);
    c.batch_execute(&format!(
        "DROP OWNED BY {role} CASCADE; DROP ROLE {role}; DROP OWNED BY {producer} CASCADE; DROP ROLE {producer}"
    ))
    .expect("drop roles");
}

/// Makes one dead letter in `app` by claiming an event and failing it past the last attempt.
fn dead_letter(c: &mut postgres::Client, app: Uuid, error: &str) -> Uuid {
    let script: Uuid = c
        .query_one(
            "SELECT script_id FROM picloud.scripts WHERE app_id = $1 ORDER BY created_at LIMIT 1",
            &[&app],
        )
        .expect("script")
        .get(0);
    let event = enqueue(c, app, script, "queue", r#"{"for": "dead letter"}"#);
    c.batch_execute("SET picloud.retry_max_attempts = 1")
        .expect("one attempt");
    let worker = format!("dl-{event}");
    c.execute(
        "UPDATE picloud.outbox SET claimed_by = $3, lease_expires_at = now() + interval '1 minute', attempt_count = 1
         WHERE app_id = $1 AND event_id = $2",
        &[&app, &event, &worker],
    )
    .expect("claim by hand");
    let id: Uuid = c
        .query_one(
            "SELECT dead_letter_id FROM picloud_fail($1, $2, $3, $4)",
            &[&app, &event, &worker, &error],
        )
        .expect("fail")
        .get(0);
    c.batch_execute("RESET picloud.retry_max_attempts")
        .expect("reset");
    id
}

#[test]
fn runbook_views_group_dead_letters_by_app_error_and_trigger() {
    let (_db, mut c) = fresh_db("ops_views");
    let (app, script) = ledger_app(&mut c);
    let trigger: Uuid = c
        .query_one(
            "SELECT picloud_create_kv_trigger($1, 'orders:*', $2, ARRAY['insert'])",
            &[&app, &script],
        )
        .expect("trigger")
        .get(0);
    // Two errors that differ only by an id group together; a third is different.
    let a = dead_letter(
        &mut c,
        app,
        &format!("timeout talking to {}", Uuid::new_v4()),
    );
    let b = dead_letter(
        &mut c,
        app,
        &format!("timeout talking to {}\nsecond line", Uuid::new_v4()),
    );
    let other = dead_letter(&mut c, app, "bad payload");
    c.execute(
        "UPDATE picloud.dead_letters SET trigger_id = $2, created_at = created_at - interval '2 hours' WHERE dead_letter_id = $1",
        &[&a, &trigger],
    )
    .expect("attribute to trigger");
    c.execute(
        "SELECT picloud_resolve_dead_letter($1, $2, 'ignored')",
        &[&app, &other],
    )
    .expect("resolve");

    let summary = c
        .query_one(
            "SELECT unresolved, oldest_age >= interval '2 hours', last_error FROM picloud.dead_letter_summary WHERE app_id = $1",
            &[&app],
        )
        .expect("summary");
    assert_eq!(summary.get::<_, i64>(0), 2);
    assert!(summary.get::<_, bool>(1));
    assert!(summary
        .get::<_, String>(2)
        .starts_with("timeout talking to"));
    let b_error: String = c
        .query_one(
            "SELECT last_error FROM picloud.dead_letters WHERE dead_letter_id = $1",
            &[&b],
        )
        .expect("b")
        .get(0);
    assert_eq!(
        summary.get::<_, String>(2),
        b_error,
        "the newest unresolved error"
    );

    let errors: Vec<(String, i64, i64)> = c
        .query(
            "SELECT error_class, unresolved, total FROM picloud.dead_letter_errors WHERE app_id = $1 ORDER BY unresolved DESC, error_class",
            &[&app],
        )
        .expect("errors")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        errors,
        vec![
            ("timeout talking to <id>".to_string(), 2, 2),
            ("bad payload".to_string(), 0, 1),
        ]
    );

    // (trigger_id, trigger_kind, pattern, script_name, unresolved, total)
    type ByTrigger = (
        Option<Uuid>,
        Option<String>,
        Option<String>,
        String,
        i64,
        i64,
    );
    let by_trigger: Vec<ByTrigger> = c
        .query(
            "SELECT trigger_id, trigger_kind, pattern, script_name, unresolved, total
             FROM picloud.dead_letters_by_trigger WHERE app_id = $1 ORDER BY total",
            &[&app],
        )
        .expect("by trigger")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(
        by_trigger,
        vec![
            (
                Some(trigger),
                Some("kv".into()),
                Some("orders:*".into()),
                "ledger".into(),
                1,
                1
            ),
            (None, None, None, "ledger".into(), 1, 2),
        ]
    );
}

#[test]
fn bulk_resolution_dry_run_changes_nothing_and_says_what_it_would_do() {
    let (_db, mut c) = fresh_db("ops_bulk");
    let (app, _script) = ledger_app(&mut c);
    let timeouts: Vec<Uuid> = (0..3)
        .map(|_| dead_letter(&mut c, app, "timeout after 5000 ms"))
        .collect();
    let bad = dead_letter(&mut c, app, "bad payload");
    let snapshot = "SELECT count(*) FILTER (WHERE resolved_at IS NULL) * 1000 + (SELECT count(*) FROM picloud.outbox) FROM picloud.dead_letters";
    let before = count(&mut c, snapshot);
    assert_eq!(before, 4000);

    let dry: Vec<(Uuid, String, bool, Option<Uuid>)> = c
        .query(
            "SELECT dead_letter_id, resolution, applied, replay_event_id
             FROM picloud_resolve_dead_letters($1, 'replayed', p_error_contains => 'timeout', p_dry_run => true)",
            &[&app],
        )
        .expect("dry run")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        dry,
        timeouts
            .iter()
            .map(|id| (*id, "replayed".to_string(), false, None))
            .collect::<Vec<_>>()
    );
    assert_eq!(count(&mut c, snapshot), before, "a dry run changes nothing");

    // The same call for real: the three timeouts are replayed, the bad payload stays.
    let done: Vec<(Uuid, bool, Option<Uuid>)> = c
        .query(
            "SELECT dead_letter_id, applied, replay_event_id
             FROM picloud_resolve_dead_letters($1, 'replayed', p_error_contains => 'timeout', p_limit => 2)",
            &[&app],
        )
        .expect("replay")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(done.len(), 2, "p_limit caps the batch");
    for (i, (id, applied, replay)) in done.iter().enumerate() {
        assert_eq!(*id, timeouts[i], "oldest first");
        assert!(applied);
        let replay = replay.expect("replayed event id");
        assert_eq!(
            count(&mut c, &format!("SELECT count(*) FROM picloud.outbox WHERE event_id = '{replay}' AND attempt_count = 0")),
            1
        );
    }
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM picloud.dead_letters WHERE resolution = 'replayed'"
        ),
        2
    );
    // Another resolution marks without enqueueing; resolved rows are never taken twice.
    let marked = count(
        &mut c,
        &format!("SELECT count(*) FROM picloud_resolve_dead_letters('{app}', 'handled_by_script')"),
    );
    assert_eq!(marked, 2);
    assert_eq!(
        count(&mut c, &format!("SELECT count(*) FROM picloud.dead_letters WHERE dead_letter_id = '{bad}' AND resolution = 'handled_by_script' AND resolved_by = current_user")),
        1
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM picloud.outbox"), 2);
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM picloud_resolve_dead_letters('{app}', 'ignored')")
        ),
        0
    );

    // Bad input: an error with a SQLSTATE, and nothing changed.
    let fresh = dead_letter(&mut c, app, "late");
    let before = count(&mut c, snapshot);
    for (sql, code) in [
        (
            "SELECT * FROM picloud_resolve_dead_letters($1, 'fixed')",
            "23514",
        ),
        (
            "SELECT * FROM picloud_resolve_dead_letters($1, NULL)",
            "22004",
        ),
        (
            "SELECT * FROM picloud_resolve_dead_letters($1, 'ignored', p_limit => 0)",
            "22023",
        ),
        (
            "SELECT * FROM picloud_resolve_dead_letters($1, 'ignored', p_error_contains => '')",
            "22023",
        ),
        (
            "SELECT * FROM picloud_resolve_dead_letters($1, 'ignored', p_dry_run => NULL)",
            "22004",
        ),
    ] {
        assert_eq!(sqlstate(c.query(sql, &[&app])), code, "{sql}");
    }
    let unknown = Uuid::new_v4();
    assert_eq!(
        sqlstate(c.query(
            "SELECT * FROM picloud_resolve_dead_letters($1, 'ignored')",
            &[&unknown]
        )),
        "P0002"
    );
    assert_eq!(count(&mut c, snapshot), before);
    assert_eq!(
        count(&mut c, &format!("SELECT count(*) FROM picloud.dead_letters WHERE dead_letter_id = '{fresh}' AND resolved_at IS NULL")),
        1
    );
}

#[test]
fn outcome_counts_older_than_a_day_are_collected() {
    let (_db, mut c) = fresh_db("ops_gc");
    let (app, _script) = ledger_app(&mut c);
    c.execute(
        "INSERT INTO picloud.event_counts (app_id, source, minute, backend_pid, completed)
         VALUES ($1, 'queue', date_trunc('minute', now() - interval '25 hours'), 1, 5),
                ($1, 'queue', date_trunc('minute', now() - interval '23 hours'), 1, 7)",
        &[&app],
    )
    .expect("counts");
    let removed: i64 = c
        .query_one(
            "SELECT removed FROM picloud_gc_pass() WHERE kind = 'event_counts'",
            &[],
        )
        .expect("gc pass")
        .get(0);
    assert_eq!(removed, 1);
    assert_eq!(
        count(
            &mut c,
            "SELECT sum(completed)::bigint FROM picloud.event_counts"
        ),
        7
    );
}
