//! The housekeeping background worker, observed from outside: it runs in the database
//! picloud.database names, collects what retention says, rescues expired leases, rereads its
//! settings on reload and comes back after being killed.

use picloud_tests::*;
use postgres::Client;
use std::sync::Mutex;
use std::time::Duration;
use uuid::Uuid;

/// The worker and its settings are shared by the whole cluster: these tests take turns.
static WORKER: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    WORKER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn set_interval(c: &mut Client, interval: &str) {
    // ALTER SYSTEM cannot share an implicit transaction with other statements.
    c.batch_execute(&format!(
        "ALTER SYSTEM SET picloud.gc_interval = '{interval}'"
    ))
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
}

fn worker_pid(c: &mut Client) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'picloud housekeeper' AND datname = current_database()",
        &[],
    )
    .ok()
    .flatten()
    .map(|r| r.get(0))
}

fn new_app(c: &mut Client) -> (Uuid, Uuid) {
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION public.noop(e jsonb) RETURNS void LANGUAGE sql AS ''",
    )
    .unwrap();
    let app: Uuid = c
        .query_one("SELECT picloud.picloud_create_app('worker-test')", &[])
        .unwrap()
        .get(0);
    let script: Uuid = c
        .query_one(
            "SELECT picloud.picloud_create_script($1, 'noop', 'sql', 'public.noop')",
            &[&app],
        )
        .unwrap()
        .get(0);
    (app, script)
}

fn dead_letter(c: &mut Client, app: Uuid, age_days: i32, resolved: bool) -> Uuid {
    c.query_one(
        "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, attempt_count, created_at, resolved_at, resolution)
         VALUES ($1, gen_random_uuid(), 'queue', 'x', '{}', 5, now() - make_interval(days => $2),
                 CASE WHEN $3 THEN now() END, CASE WHEN $3 THEN 'ignored' END)
         RETURNING dead_letter_id",
        &[&app, &age_days, &resolved],
    )
    .unwrap()
    .get(0)
}

fn abandoned(c: &mut Client, app: Uuid, age_days: i32) -> Uuid {
    c.query_one(
        "INSERT INTO picloud.abandoned_executions (app_id, event_id, reply_to, succeeded, reason, created_at)
         VALUES ($1, gen_random_uuid(), 'gone', true, 'caller disconnected', now() - make_interval(days => $2))
         RETURNING abandoned_id",
        &[&app, &age_days],
    )
    .unwrap()
    .get(0)
}

fn exists(c: &mut Client, table: &str, column: &str, id: Uuid) -> bool {
    count(
        c,
        &format!("SELECT count(*) FROM picloud.{table} WHERE {column} = '{id}'"),
    ) == 1
}

#[test]
fn worker_runs_and_collects_by_retention() {
    let _serial = serial();
    let mut c = connect(&worker_db());
    assert!(
        worker_pid(&mut c).is_some(),
        "the housekeeper is running in {}",
        worker_db()
    );
    set_interval(&mut c, "300ms");
    let (app, _) = new_app(&mut c);
    let old_resolved = dead_letter(&mut c, app, 40, true);
    let old_unresolved = dead_letter(&mut c, app, 40, false);
    let fresh_resolved = dead_letter(&mut c, app, 1, true);
    let old_abandoned = abandoned(&mut c, app, 8);
    let fresh_abandoned = abandoned(&mut c, app, 1);
    // Two intervals, with room for a slow machine.
    assert!(eventually(Duration::from_secs(5), || {
        !exists(&mut c, "dead_letters", "dead_letter_id", old_resolved)
            && !exists(
                &mut c,
                "abandoned_executions",
                "abandoned_id",
                old_abandoned,
            )
    }));
    assert!(
        exists(&mut c, "dead_letters", "dead_letter_id", old_unresolved),
        "unresolved dead letters are kept"
    );
    assert!(exists(
        &mut c,
        "dead_letters",
        "dead_letter_id",
        fresh_resolved
    ));
    assert!(exists(
        &mut c,
        "abandoned_executions",
        "abandoned_id",
        fresh_abandoned
    ));

    // Retention 0 keeps everything.
    c.batch_execute("ALTER SYSTEM SET picloud.dead_letter_retention_days = 0")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let kept = dead_letter(&mut c, app, 4000, true);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        exists(&mut c, "dead_letters", "dead_letter_id", kept),
        "retention 0 keeps dead letters forever"
    );
    c.batch_execute("ALTER SYSTEM RESET picloud.dead_letter_retention_days")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    set_interval(&mut c, "1min");
}

#[test]
fn expired_lease_returns_to_the_queue() {
    let _serial = serial();
    let mut c = connect(&worker_db());
    set_interval(&mut c, "300ms");
    let (app, script) = new_app(&mut c);
    let id: Uuid = c
        .query_one(
            "SELECT picloud.picloud_enqueue($1, 'queue', 'lease', '{}', $2)",
            &[&app, &script],
        )
        .unwrap()
        .get(0);
    // Claim it under a short lease and "crash": never report back.
    let claimed = c
        .query("SELECT event_id FROM picloud.picloud_claim('crashed-worker', 1000, 100) WHERE app_id = $1", &[&app])
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(eventually(Duration::from_secs(5), || {
        count(&mut c, &format!("SELECT count(*) FROM picloud.outbox WHERE event_id = '{id}' AND claimed_by IS NULL")) == 1
    }));
    let row = c
        .query_one(
            "SELECT attempt_count, last_error FROM picloud.outbox WHERE event_id = $1",
            &[&id],
        )
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1, "the lost attempt counts");
    assert!(row.get::<_, String>(1).contains("crashed-worker"));
    let again = c
        .query("SELECT event_id, attempt_count FROM picloud.picloud_claim('next-worker', 1000, 60000) WHERE app_id = $1", &[&app])
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].get::<_, Uuid>(0), id);
    assert_eq!(again[0].get::<_, i32>(1), 2);
    c.execute(
        "SELECT picloud.picloud_complete($1, $2, 'next-worker')",
        &[&app, &id],
    )
    .unwrap();
    set_interval(&mut c, "1min");
}

#[test]
fn reload_changes_the_interval_without_restart() {
    let _serial = serial();
    let mut c = connect(&worker_db());
    let pid = worker_pid(&mut c);
    set_interval(&mut c, "1h");
    std::thread::sleep(Duration::from_millis(500));
    let (app, _) = new_app(&mut c);
    let first = dead_letter(&mut c, app, 40, true);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        exists(&mut c, "dead_letters", "dead_letter_id", first),
        "with a 1h interval nothing runs yet"
    );
    set_interval(&mut c, "300ms");
    assert!(eventually(Duration::from_secs(5), || !exists(
        &mut c,
        "dead_letters",
        "dead_letter_id",
        first
    )));
    // The short interval is now in force: a later row goes within a few intervals too.
    std::thread::sleep(Duration::from_secs(1));
    let second = dead_letter(&mut c, app, 40, true);
    assert!(eventually(Duration::from_secs(3), || !exists(
        &mut c,
        "dead_letters",
        "dead_letter_id",
        second
    )));
    assert_eq!(worker_pid(&mut c), pid, "same worker process, no restart");
    set_interval(&mut c, "1min");
}

#[test]
fn killed_worker_is_restarted() {
    let _serial = serial();
    let mut c = connect(&worker_db());
    set_interval(&mut c, "300ms");
    let pid = worker_pid(&mut c).expect("worker running");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    drop(c);
    // SIGKILL of a backend makes the postmaster reinitialise; connections come back after it.
    let mut new_pid = None;
    assert!(eventually(Duration::from_secs(30), || {
        match postgres::Client::connect(&url(&worker_db(), "postgres"), postgres::NoTls) {
            Ok(mut c) => {
                new_pid = worker_pid(&mut c);
                new_pid.is_some() && new_pid != Some(pid)
            }
            Err(_) => false,
        }
    }));
    let mut c = connect(&worker_db());
    let (app, _) = new_app(&mut c);
    let old = dead_letter(&mut c, app, 40, true);
    assert!(eventually(Duration::from_secs(10), || !exists(
        &mut c,
        "dead_letters",
        "dead_letter_id",
        old
    )));
    set_interval(&mut c, "1min");
}

#[test]
fn a_terminated_housekeeper_comes_back_every_time() {
    let _serial = serial();
    let mut c = connect(&worker_db());
    set_interval(&mut c, "300ms");
    let mut slowest = Duration::ZERO;
    for round in 1..=10 {
        let mut pid = None;
        assert!(eventually(Duration::from_secs(10), || {
            pid = worker_pid(&mut c);
            pid.is_some()
        }));
        let pid = pid.expect("worker running");
        let started = std::time::Instant::now();
        let ended: bool = c
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap()
            .get(0);
        assert!(ended, "round {round}: terminated");
        let mut new_pid = None;
        assert!(
            eventually(Duration::from_secs(10), || {
                new_pid = worker_pid(&mut c);
                new_pid.is_some_and(|p| p != pid)
            }),
            "round {round}: no new housekeeper"
        );
        slowest = slowest.max(started.elapsed());
    }
    println!("housekeeper back after pg_terminate_backend: slowest of 10 rounds {slowest:?}");
    // And it still does its work: an expired lease is rescued.
    let (app, script) = new_app(&mut c);
    c.execute(
        "SELECT picloud.picloud_enqueue($1, 'queue', 'lease', '{}', $2)",
        &[&app, &script],
    )
    .unwrap();
    let claimed = c
        .query(
            "SELECT event_id FROM picloud.picloud_claim('gone', 1000, 100) WHERE app_id = $1",
            &[&app],
        )
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(eventually(Duration::from_secs(10), || count(
        &mut c,
        &format!(
            "SELECT count(*) FROM picloud.outbox WHERE app_id = '{app}' AND claimed_by IS NULL"
        )
    ) == 1));
    set_interval(&mut c, "1min");
}

/// A cluster of this test's own, whose picloud.database names a database that does not exist.
#[test]
fn a_missing_database_is_awaited_quietly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts/cluster.sh");
    let dir = root.join("target/it-missing-database");
    let port = 55441;
    let cluster = |args: &[&str]| {
        let status = std::process::Command::new("bash")
            .arg(&script)
            .args(args)
            .status()
            .expect("cluster.sh");
        assert!(status.success(), "cluster.sh {args:?}");
    };
    let dir_text = dir.to_string_lossy().to_string();
    cluster(&["stop", &dir_text]);
    let _ = std::fs::remove_dir_all(&dir);
    cluster(&["start", &dir_text, &port.to_string(), "postgres"]);
    let url = |db: &str| format!("host=127.0.0.1 port={port} user=postgres dbname={db}");
    let mut c = postgres::Client::connect(&url("postgres"), postgres::NoTls).unwrap();
    c.batch_execute("ALTER SYSTEM SET picloud.database = 'later_db'")
        .unwrap();
    c.batch_execute("ALTER SYSTEM SET picloud.gc_interval = '200ms'")
        .unwrap();
    drop(c);
    cluster(&["stop", &dir_text]);
    cluster(&["start", &dir_text, &port.to_string(), "postgres"]);
    let since_restart = || {
        let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        // The postmaster's first line: it starts background workers before it logs "database
        // system is ready", so the housekeeper's line can come before that one.
        let restart = log.rfind("starting PostgreSQL").unwrap_or(0);
        log[restart..].to_string()
    };
    let waiting_line = "\"later_db\" (picloud.database) does not exist; waiting";
    // Said within a few seconds (longer on a loaded machine), and then not again: a few more
    // seconds cover many of the housekeeper's 200 ms rounds.
    assert!(
        eventually(Duration::from_secs(30), || since_restart()
            .contains(waiting_line)),
        "the housekeeper said it waits: {}",
        since_restart()
    );
    std::thread::sleep(Duration::from_secs(3));
    let log = since_restart();
    let log = log.as_str();
    assert_eq!(log.matches(waiting_line).count(), 1, "logged once: {log}");
    assert!(!log.contains("FATAL"), "no FATAL: {log}");
    let mut c = postgres::Client::connect(&url("postgres"), postgres::NoTls).unwrap();
    let waiting = c
        .query(
            "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'picloud housekeeper' AND datname IS NULL",
            &[],
        )
        .unwrap();
    assert_eq!(
        waiting.len(),
        1,
        "the housekeeper waits, connected to no database"
    );
    c.batch_execute("CREATE DATABASE later_db").unwrap();
    let mut later = postgres::Client::connect(&url("later_db"), postgres::NoTls).unwrap();
    later.batch_execute("CREATE EXTENSION picloud").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            c.query(
                "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'picloud housekeeper' AND datname = 'later_db'",
                &[],
            )
            .map(|rows| rows.len() == 1)
            .unwrap_or(false)
        }),
        "the housekeeper serves the database once it exists"
    );
    drop(later);
    drop(c);
    cluster(&["stop", &dir_text]);
    let _ = std::fs::remove_dir_all(&dir);
}
