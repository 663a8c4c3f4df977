//! Delivery guarantees under faults (SPEC §7): real clusters, real supervisor processes,
//! killed, restarted and cut off. Every scenario prints its figures and fails on any loss or
//! duplicate. `PICLOUD_SOAK=1` makes the loads larger.
//!
//! These scenarios run in the database the housekeeper serves, because lease rescue after a
//! crash is its job; each works on its own app and ledger table.

use picloud_tests::*;
use postgres::Client;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn soak() -> bool {
    std::env::var("PICLOUD_SOAK")
        .map(|v| v == "1")
        .unwrap_or(false)
}

/// Small deterministic generator so a failing run can be replayed from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }
}

fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("seed {s}");
    s | 1
}

fn system_set(c: &mut Client, setting: &str, value: &str) {
    c.batch_execute(&format!("ALTER SYSTEM SET {setting} = '{value}'"))
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// Faults need a quick housekeeper and enough attempts that repeated kills of the same
/// event never exhaust them.
fn fault_settings(c: &mut Client) {
    system_set(c, "picloud.gc_interval", "200ms");
    system_set(c, "picloud.retry_max_attempts", "100");
    system_set(c, "picloud.retry_base_delay", "20ms");
    system_set(c, "picloud.retry_max_delay", "200ms");
}

fn reset_settings(c: &mut Client) {
    for s in [
        "picloud.gc_interval",
        "picloud.retry_max_attempts",
        "picloud.retry_base_delay",
        "picloud.retry_max_delay",
    ] {
        c.batch_execute(&format!("ALTER SYSTEM RESET {s}")).unwrap();
    }
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// An app whose SQL handler appends the event id to its own ledger table.
fn ledger(c: &mut Client, tag: &str) -> (Uuid, Uuid, String) {
    let table = format!("ledger_{tag}_{}", std::process::id());
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (event_id uuid NOT NULL, marker text);
         CREATE OR REPLACE FUNCTION {table}_handler(e jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO {table} VALUES ((e->>'event_id')::uuid, e->'payload'->>'marker') $$;"
    ))
    .unwrap();
    let app: Uuid = c
        .query_one("SELECT picloud.picloud_create_app($1)", &[&tag])
        .unwrap()
        .get(0);
    let script: Uuid = c
        .query_one(
            "SELECT picloud.picloud_create_script($1, 'ledger', 'sql', $2, 10000)",
            &[&app, &format!("{table}_handler")],
        )
        .unwrap()
        .get(0);
    (app, script, table)
}

fn enqueue_committed(c: &mut Client, app: Uuid, script: Uuid, n: usize) -> Vec<Uuid> {
    let payloads: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({ "marker": "committed", "i": i }))
        .collect();
    c.query(
        "SELECT * FROM picloud.picloud_enqueue_bulk($1, 'queue', 'x', $2, $3)",
        &[&app, &payloads, &script],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn supervisor_args<'a>() -> Vec<&'a str> {
    vec![
        "--poll-interval-ms",
        "300",
        "--lease-ms",
        "1000",
        "--concurrency",
        "4",
        "--shutdown-grace-ms",
        "2000",
    ]
}

fn outbox_of(c: &mut Client, app: Uuid) -> i64 {
    count(
        c,
        &format!("SELECT count(*) FROM picloud.outbox WHERE app_id = '{app}'"),
    )
}

/// Waits for the app's outbox to drain, then checks the ledger holds each committed id once.
/// Returns (lost, duplicates).
fn settle_and_check(
    c: &mut Client,
    app: Uuid,
    table: &str,
    committed: &[Uuid],
    within: Duration,
) -> (usize, usize) {
    let drained = eventually(within, || outbox_of(c, app) == 0);
    let rows = c
        .query(&format!("SELECT event_id FROM {table}"), &[])
        .unwrap();
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for r in rows {
        *seen.entry(r.get(0)).or_default() += 1;
    }
    let lost = committed.iter().filter(|id| !seen.contains_key(id)).count();
    let duplicates = seen.values().filter(|n| **n > 1).map(|n| n - 1).sum();
    let dead = count(
        c,
        &format!("SELECT count(*) FROM picloud.dead_letters WHERE app_id = '{app}'"),
    );
    assert!(drained, "outbox did not drain: {} left", outbox_of(c, app));
    assert_eq!(dead, 0, "no event may end as a dead letter here");
    (lost, duplicates)
}

#[test]
fn supervisor_killed_twenty_times_loses_and_duplicates_nothing() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    fault_settings(&mut c);
    let (app, script, table) = ledger(&mut c, "crash");
    let events = if soak() { 20_000 } else { 3_000 };
    // A steady producer runs while the supervisor is being killed.
    let producer = {
        let db = db.clone();
        std::thread::spawn(move || {
            // Small commits spread over the whole kill period (about 7 s), so that kills
            // land while events are being enqueued, claimed and handled.
            let mut p = connect(&db);
            let mut ids = Vec::new();
            for _ in 0..(events / 20) {
                ids.extend(enqueue_committed(&mut p, app, script, 20));
                std::thread::sleep(Duration::from_millis(45));
            }
            ids
        })
    };
    let mut rng = Rng(seed());
    let mut sup = Supervisor::start(&db, &supervisor_args());
    let kills = 20;
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.between(100, 600)));
        sup.kill();
        sup = Supervisor::start(&db, &supervisor_args());
    }
    let backlog_at_last_kill = outbox_of(&mut c, app);
    let committed = producer.join().unwrap();
    let start = Instant::now();
    let (lost, duplicates) =
        settle_and_check(&mut c, app, &table, &committed, Duration::from_secs(120));
    println!(
        "supervisor-crash: events={} kills={kills} lost={lost} duplicates={duplicates} backlog_at_last_kill={backlog_at_last_kill} drain_after_last_kill={:.1}s",
        committed.len(),
        start.elapsed().as_secs_f64()
    );
    drop(sup);
    reset_settings(&mut c);
    assert_eq!((lost, duplicates), (0, 0));
}

fn pg_ctl(args: &[&str]) {
    let data = std::env::var("PICLOUD_TEST_DATA")
        .expect("PICLOUD_TEST_DATA names the test cluster's data directory");
    let status = std::process::Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pg_ctl",
            "-D",
            &data,
            "-w",
            "-t",
            "60",
        ])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "pg_ctl {args:?}");
}

#[test]
fn postgres_restarts_fast_and_immediate() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    fault_settings(&mut c);
    let (app, script, table) = ledger(&mut c, "restart");
    // A handler slow enough that the restarts land in the middle of the load.
    c.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {table}_handler(e jsonb) RETURNS void LANGUAGE sql AS $$
             SELECT pg_sleep(0.002);
             INSERT INTO {table} VALUES ((e->>'event_id')::uuid, e->'payload'->>'marker') $$;"
    ))
    .unwrap();
    let events = if soak() { 20_000 } else { 4_000 };
    let committed = enqueue_committed(&mut c, app, script, events);
    drop(c);
    let _sup = Supervisor::start(&db, &supervisor_args());
    let mut restarts = 0;
    for mode in ["fast", "immediate"] {
        let mut probe = connect(&db);
        assert!(eventually(Duration::from_secs(30), || count(
            &mut probe,
            &format!("SELECT count(*) FROM {table}")
        ) > 0));
        drop(probe);
        let port = port().to_string();
        pg_ctl(&["-m", mode, "-o", &format!("-p {port}"), "restart"]);
        restarts += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut c = connect(&db);
    let (lost, duplicates) =
        settle_and_check(&mut c, app, &table, &committed, Duration::from_secs(180));
    println!("postgres-restart: events={} restarts={restarts} (fast, immediate) lost={lost} duplicates={duplicates}", committed.len());
    reset_settings(&mut c);
    assert_eq!((lost, duplicates), (0, 0));
}

#[test]
fn connections_cut_while_handlers_run() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    fault_settings(&mut c);
    let (app, script, table) = ledger(&mut c, "cut");
    c.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {table}_handler(e jsonb) RETURNS void LANGUAGE sql AS $$
             SELECT pg_sleep(0.002);
             INSERT INTO {table} VALUES ((e->>'event_id')::uuid, e->'payload'->>'marker') $$;"
    ))
    .unwrap();
    let events = if soak() { 20_000 } else { 3_000 };
    let committed = enqueue_committed(&mut c, app, script, events);
    let _sup = Supervisor::start(&db, &supervisor_args());
    let mut cuts = 0;
    let mut terminated = 0i64;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        terminated += count(
            &mut c,
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'picloud-supervisor' AND pid <> pg_backend_pid()) t",
        );
        cuts += 1;
    }
    let (lost, duplicates) =
        settle_and_check(&mut c, app, &table, &committed, Duration::from_secs(120));
    println!("connection-cut: events={} cuts={cuts} connections_terminated={terminated} lost={lost} duplicates={duplicates}", committed.len());
    reset_settings(&mut c);
    assert!(terminated > 0, "the test must actually cut connections");
    assert_eq!((lost, duplicates), (0, 0));
}

#[test]
fn three_supervisors_share_the_work() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    fault_settings(&mut c);
    // SQL handlers: exactly once across three supervisors.
    let (app, script, table) = ledger(&mut c, "three");
    let events = if soak() { 20_000 } else { 4_000 };
    let committed = enqueue_committed(&mut c, app, script, events);
    let sups: Vec<Supervisor> = (0..3)
        .map(|_| Supervisor::start(&db, &supervisor_args()))
        .collect();
    let (lost, duplicates) =
        settle_and_check(&mut c, app, &table, &committed, Duration::from_secs(120));
    let workers = count(
        &mut c,
        "SELECT count(DISTINCT claimed_by) FROM picloud.outbox",
    );
    println!(
        "three-supervisors-sql: events={} lost={lost} duplicates={duplicates}",
        committed.len()
    );
    assert_eq!((lost, duplicates), (0, 0));
    assert_eq!(workers, 0);

    // HTTP handlers: at least once, keyed by the event id; one supervisor is killed mid-way.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    {
        let received = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let received = received.clone();
                std::thread::spawn(move || {
                    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    let mut reader = BufReader::new(match stream.try_clone() {
                        Ok(s) => s,
                        Err(_) => return,
                    });
                    let mut id = None;
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("picloud-event-id:") {
                            id = Some(v.trim().to_string());
                        }
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if let Some(id) = id {
                        received.lock().unwrap().push(id);
                    }
                    stream
                        .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                        .ok();
                });
            }
        });
    }
    drop(sups);
    let url = format!("http://127.0.0.1:{port}/");
    let hook: Uuid = c
        .query_one(
            "SELECT picloud.picloud_create_script($1, 'hook', 'http', $2, 5000)",
            &[&app, &url],
        )
        .unwrap()
        .get(0);
    let http_events = if soak() { 5_000 } else { 1_000 };
    let committed = enqueue_committed(&mut c, app, hook, http_events);
    let allow = format!("127.0.0.1:{port}");
    let mut args = supervisor_args();
    args.extend(["--http-allow", &allow]);
    let mut sups: Vec<Supervisor> = (0..3).map(|_| Supervisor::start(&db, &args)).collect();
    std::thread::sleep(Duration::from_millis(300));
    sups[0].kill();
    assert!(eventually(Duration::from_secs(120), || outbox_of(
        &mut c, app
    ) == 0));
    let got = received.lock().unwrap().clone();
    let distinct: HashSet<&String> = got.iter().collect();
    let lost = committed
        .iter()
        .filter(|id| !distinct.contains(&id.to_string()))
        .count();
    let duplicates = got.len() - distinct.len();
    println!("three-supervisors-http: events={} deliveries={} lost={lost} duplicates={duplicates} (at-least-once; one supervisor killed)", committed.len(), got.len());
    reset_settings(&mut c);
    assert_eq!(lost, 0);
}

#[test]
fn rolled_back_events_never_run() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    let (app, script, table) = ledger(&mut c, "rollback");
    let _sup = Supervisor::start(&db, &supervisor_args());
    let mut committed = Vec::new();
    for i in 0..400 {
        let mut tx = c.transaction().unwrap();
        let marker = if i % 2 == 0 {
            "committed"
        } else {
            "rolled-back"
        };
        let id: Uuid = tx
            .query_one(
                "SELECT picloud.picloud_enqueue($1, 'queue', 'x', jsonb_build_object('marker', $2::text), $3)",
                &[&app, &marker, &script],
            )
            .unwrap()
            .get(0);
        if i % 2 == 0 {
            tx.commit().unwrap();
            committed.push(id);
        } else {
            tx.rollback().unwrap();
        }
    }
    let (lost, duplicates) =
        settle_and_check(&mut c, app, &table, &committed, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let ran_rolled_back = count(
        &mut c,
        &format!("SELECT count(*) FROM {table} WHERE marker = 'rolled-back'"),
    );
    println!("rollback: committed={} rolled_back=200 ran_rolled_back={ran_rolled_back} lost={lost} duplicates={duplicates}", committed.len());
    assert_eq!((lost, duplicates, ran_rolled_back), (0, 0, 0));
}

#[test]
fn poison_handlers_do_not_stall_the_rest() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    system_set(&mut c, "picloud.retry_max_attempts", "2");
    system_set(&mut c, "picloud.retry_base_delay", "20ms");
    let (app, script, table) = ledger(&mut c, "poison");
    let hang: Uuid = c
        .query_one(
            "SELECT picloud.picloud_create_script($1, 'hang', 'command', 'hang', 300)",
            &[&app],
        )
        .unwrap()
        .get(0);
    let crash: Uuid = c
        .query_one(
            "SELECT picloud.picloud_create_script($1, 'crash', 'command', 'crash', 5000)",
            &[&app],
        )
        .unwrap()
        .get(0);
    let mut args = supervisor_args();
    args.extend([
        "--command",
        "hang=/bin/sleep 30",
        "--command",
        "crash=/bin/false",
    ]);
    let _sup = Supervisor::start(&db, &args);
    for _ in 0..8 {
        c.query_one(
            "SELECT picloud.picloud_enqueue($1, 'queue', 'x', '{}', $2)",
            &[&app, &hang],
        )
        .unwrap();
        c.query_one(
            "SELECT picloud.picloud_enqueue($1, 'queue', 'x', '{}', $2)",
            &[&app, &crash],
        )
        .unwrap();
    }
    let committed = enqueue_committed(&mut c, app, script, 500);
    let start = Instant::now();
    assert!(eventually(Duration::from_secs(60), || count(
        &mut c,
        &format!("SELECT count(*) FROM {table}")
    ) == 500));
    let normal_done = start.elapsed();
    assert!(eventually(Duration::from_secs(60), || outbox_of(
        &mut c, app
    ) == 0));
    let timed_out = count(&mut c, &format!("SELECT count(*) FROM picloud.dead_letters WHERE app_id = '{app}' AND last_error LIKE '%timed out%'"));
    let crashed = count(&mut c, &format!("SELECT count(*) FROM picloud.dead_letters WHERE app_id = '{app}' AND last_error LIKE '%exited%'"));
    println!(
        "poison: normal_events={} done_in={:.1}s hung_dead_lettered={timed_out} crashed_dead_lettered={crashed}",
        committed.len(),
        normal_done.as_secs_f64()
    );
    reset_settings(&mut c);
    assert_eq!((timed_out, crashed), (8, 8));
}

#[test]
fn outbox_size_returns_to_a_small_bound_after_a_sustained_run() {
    let _s = serial();
    let db = worker_db();
    let mut c = connect(&db);
    let (app, script, table) = ledger(&mut c, "bloat");
    c.batch_execute("VACUUM picloud.outbox").unwrap();
    // The heap is what autovacuum gives back (it truncates empty trailing pages); indexes keep
    // their pages for reuse, so they are reported but not bounded.
    let table_size = |c: &mut Client| count(c, "SELECT pg_table_size('picloud.outbox')");
    let index_size = |c: &mut Client| count(c, "SELECT pg_indexes_size('picloud.outbox')");
    let dead = |c: &mut Client| {
        count(c, "SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relid = 'picloud.outbox'::regclass")
    };
    let before = table_size(&mut c);
    let events = if soak() { 200_000 } else { 30_000 };
    let _sup = Supervisor::start(
        &db,
        &[
            "--poll-interval-ms",
            "300",
            "--concurrency",
            "8",
            "--batch-size",
            "8",
        ],
    );
    let mut committed = Vec::new();
    for _ in 0..(events / 5000) {
        committed.extend(enqueue_committed(&mut c, app, script, 5000));
    }
    let (lost, duplicates) =
        settle_and_check(&mut c, app, &table, &committed, Duration::from_secs(600));
    let peak = table_size(&mut c);
    let dead_after_run = dead(&mut c);
    let start = Instant::now();
    let bound = (before * 2).max(256 * 1024);
    let shrank = eventually(Duration::from_secs(120), || table_size(&mut c) <= bound);
    println!(
        "bloat: events={} lost={lost} duplicates={duplicates} table_size_before={before} table_size_after_run={peak} dead_tuples_after_run={dead_after_run} table_size_after_autovacuum={} index_size={} dead_tuples_now={} waited={:.1}s",
        committed.len(),
        table_size(&mut c),
        index_size(&mut c),
        dead(&mut c),
        start.elapsed().as_secs_f64()
    );
    assert_eq!((lost, duplicates), (0, 0));
    assert!(
        shrank,
        "outbox heap stayed at {} bytes (bound {bound})",
        table_size(&mut c)
    );
}
