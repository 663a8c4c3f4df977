//! Failover to a streaming standby. Each test builds a primary and a standby of its own on
//! 127.0.0.1 with PostgreSQL's own tools (initdb, pg_basebackup -R, pg_ctl promote), with the
//! installed picloud preloaded, runs real supervisors and producers against them, SIGKILLs the
//! primary's postmaster mid-load and promotes the standby. Ports 55490-55499 are this file's.
//!
//! The figures (resume times, losses under asynchronous replication) are printed; run with
//! `--nocapture` to see them.

use picloud_tests::*;
use postgres::{Client, NoTls};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

const DB: &str = "picloud_failover";
/// The housekeeper's interval on both servers: lease rescue after the failover takes up to this
/// much past the lease, and the first pass after promotion must come within it.
const GC_INTERVAL: Duration = Duration::from_secs(2);
/// The supervisors' lease: claims that survive on the new primary come back after it.
const LEASE_MS: &str = "2000";
/// Between the primary's death and the standby's promotion.
const FAILOVER_DELAY: Duration = Duration::from_millis(1500);

/// The tests take turns: each runs two clusters and several processes on a small machine, and
/// their timings are only meaningful alone.
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn pg_bin(tool: &str) -> String {
    let out = Command::new("/usr/bin/pg_config")
        .arg("--bindir")
        .output()
        .expect("pg_config");
    format!("{}/{tool}", String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs a PostgreSQL tool as the postgres OS user (Postgres refuses to run as root).
fn as_postgres(tool: &str, args: &[&str]) {
    assert!(try_as_postgres(tool, args), "{tool} {args:?} failed");
}

/// As `as_postgres`; whether the tool succeeded.
fn try_as_postgres(tool: &str, args: &[&str]) -> bool {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg_bin(tool))
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
        .success()
}

fn conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname={DB} connect_timeout=2")
}

fn connect_to(port: u16) -> Client {
    let mut client = Client::connect(&conninfo(port), NoTls)
        .unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
    client
        .batch_execute("SET search_path = public, picloud")
        .expect("search_path");
    client
}

/// A primary and its streaming standby, both stopped when dropped (the primary only if it still
/// runs: the tests SIGKILL it).
struct Pair {
    dir: PathBuf,
    primary_port: u16,
    standby_port: u16,
}

impl Pair {
    /// initdb a primary, start it, create the database and the extension, then clone it with
    /// `pg_basebackup -R` and start the standby. With `synchronous`, the primary waits for the
    /// standby's flush before acknowledging a commit (synchronous_standby_names).
    fn start(tag: &str, primary_port: u16, standby_port: u16, synchronous: bool) -> Pair {
        let dir = scratch_dir(&format!("failover-{tag}"));
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        let pair = Pair {
            dir,
            primary_port,
            standby_port,
        };
        let primary = pair.primary_dir();
        let primary_text = primary.to_string_lossy().into_owned();
        as_postgres(
            "initdb",
            &[
                "-D",
                &primary_text,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        );
        append(
            &primary.join("postgresql.conf"),
            &format!(
                "shared_preload_libraries = 'picloud'\n\
                 picloud.database = '{DB}'\n\
                 picloud.gc_interval = '{}ms'\n\
                 listen_addresses = '127.0.0.1'\n\
                 port = {primary_port}\n\
                 unix_socket_directories = '/tmp'\n\
                 max_connections = 100\n\
                 shared_buffers = '128MB'\n\
                 synchronous_commit = on\n\
                 wal_keep_size = '512MB'\n\
                 log_min_messages = warning\n",
                GC_INTERVAL.as_millis()
            ),
        );
        pair.pg_ctl_start(&primary);
        let mut admin = Client::connect(
            &format!("host=127.0.0.1 port={primary_port} user=postgres dbname=postgres"),
            NoTls,
        )
        .expect("connect to the new primary");
        admin
            .batch_execute(&format!("CREATE DATABASE {DB}"))
            .expect("create database");
        connect_to(primary_port)
            .batch_execute("CREATE EXTENSION picloud")
            .expect("create extension");

        let standby = pair.standby_dir();
        let standby_text = standby.to_string_lossy().into_owned();
        as_postgres(
            "pg_basebackup",
            &[
                "-d",
                &format!(
                    "host=127.0.0.1 port={primary_port} user=postgres application_name=standby"
                ),
                "-D",
                &standby_text,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        // The copy carries the primary's settings; the standby differs in its port, and its
        // walreceiver names itself "standby" (what synchronous_standby_names waits for).
        append(
            &standby.join("postgresql.conf"),
            &format!("port = {standby_port}\ncluster_name = 'standby'\n"),
        );
        pair.pg_ctl_start(&standby);
        let mut primary_client = connect_to(primary_port);
        // Only now: with a synchronous standby named before it exists, every commit would wait.
        if synchronous {
            primary_client
                .batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'standby'")
                .expect("synchronous_standby_names");
            primary_client
                .batch_execute("SELECT pg_reload_conf()")
                .expect("reload");
        }
        let expected = if synchronous { "sync" } else { "async" };
        assert!(
            eventually(Duration::from_secs(30), || count(
                &mut primary_client,
                &format!(
                    "SELECT count(*) FROM pg_stat_replication \
                     WHERE application_name = 'standby' AND state = 'streaming' \
                     AND sync_state = '{expected}'"
                )
            ) == 1),
            "the standby streams ({expected})"
        );
        pair
    }

    fn primary_dir(&self) -> PathBuf {
        self.dir.join("primary")
    }

    fn standby_dir(&self) -> PathBuf {
        self.dir.join("standby")
    }

    fn pg_ctl_start(&self, data: &Path) {
        let data_text = data.to_string_lossy().into_owned();
        // Outside the data directory, so that pg_basebackup does not copy the primary's log.
        let log = self.log_path(data).to_string_lossy().into_owned();
        let args = ["-D", &data_text, "-l", &log, "-w", "-t", "60", "start"];
        // The test's ports lie in the kernel's range for outgoing connections: a client
        // socket of anything else running may hold one for a moment ("Address already in
        // use"). A few tries a second apart ride that out.
        for _ in 0..4 {
            if try_as_postgres("pg_ctl", &args) {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        as_postgres("pg_ctl", &args);
    }

    /// Both servers' hosts, primary first, as a key=value string and as a URL.
    fn multi_host(&self) -> (String, String) {
        let (p, s) = (self.primary_port, self.standby_port);
        (
            format!(
                "host=127.0.0.1,127.0.0.1 port={p},{s} user=postgres dbname={DB} \
                 target_session_attrs=read-write connect_timeout=2"
            ),
            format!(
                "postgres://postgres@127.0.0.1:{p},127.0.0.1:{s}/{DB}\
                 ?target_session_attrs=read-write&connect_timeout=2"
            ),
        )
    }

    /// SIGKILL of the primary's postmaster: no shutdown checkpoint, no goodbye to the standby.
    /// Its backends notice the postmaster's death and exit by themselves.
    fn kill_primary(&self) {
        let pid_file = std::fs::read_to_string(self.primary_dir().join("postmaster.pid"))
            .expect("primary's postmaster.pid");
        let pid = pid_file
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let status = Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill");
        assert!(
            status.success(),
            "SIGKILL of the primary's postmaster {pid}"
        );
    }

    /// `pg_ctl promote -w`: returns once the standby accepts writes. Returns the moment it
    /// did, as its log says ("database system is ready to accept connections", a timestamp
    /// with milliseconds): pg_ctl itself notices only at its next poll.
    fn promote(&self) -> String {
        let standby = self.standby_dir().to_string_lossy().into_owned();
        as_postgres("pg_ctl", &["-D", &standby, "-w", "-t", "60", "promote"]);
        // pg_ctl returns when the control file says "in production", which the server writes
        // a moment before it logs the line.
        let ready = |log: &str| {
            log.lines()
                .rev()
                .find(|line| line.contains("database system is ready to accept connections"))
                .map(str::to_owned)
        };
        let found = eventually(Duration::from_secs(10), || {
            ready(&self.standby_log()).is_some()
        });
        let log = self.standby_log();
        let line = ready(&log)
            .filter(|_| found)
            .unwrap_or_else(|| panic!("promotion not in the standby's log: {log}"));
        // "2026-12-05 05:59:35.768 UTC [pid] LOG: ..."
        line.split(" [").next().unwrap_or_default().to_owned()
    }

    fn log_path(&self, data: &Path) -> PathBuf {
        let name = data.file_name().unwrap_or_default().to_string_lossy();
        self.dir.join(format!("{name}.log"))
    }

    fn standby_log(&self) -> String {
        std::fs::read_to_string(self.log_path(&self.standby_dir())).unwrap_or_default()
    }

    fn stop(&self, data: &Path) {
        if data.join("postmaster.pid").exists() {
            let data_text = data.to_string_lossy().into_owned();
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_bin("pg_ctl"))
                .args(["-D", &data_text, "-m", "fast", "-w", "-t", "60", "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .ok();
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // A killed primary's pg_ctl stop finds no postmaster and does nothing.
        self.stop(&self.standby_dir());
        self.stop(&self.primary_dir());
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(text.as_bytes()).expect("append");
}

/// Lines of a server log at level ERROR (or worse: FATAL and PANIC are counted separately by
/// callers that expect some, e.g. the walreceiver's once the primary is gone).
fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|line| line.contains("ERROR:")).collect()
}

/// What the producers saw. An event is `acknowledged` when its COMMIT returned; `in_doubt`
/// when the COMMIT was sent but no answer came (the primary died); `rolled_back` when the
/// producer rolled back on purpose. Each acknowledged event also carries the WAL position the
/// primary reported right after the commit, and that server's port.
#[derive(Default)]
struct Produced {
    acknowledged: Vec<(Uuid, Option<i64>, u16)>,
    in_doubt: Vec<Uuid>,
    rolled_back: Vec<Uuid>,
}

/// Producer threads enqueuing into the ledger app through a multi-host connection string,
/// reconnecting every 100 ms while no primary answers. Every seventh transaction rolls back.
struct Producers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Produced>>,
}

impl Producers {
    fn start(url: &str, app: Uuid, script: Uuid, count: usize) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..count)
            .map(|producer| {
                let (url, stop) = (url.to_owned(), Arc::clone(&stop));
                std::thread::spawn(move || produce(&url, app, script, producer, &stop))
            })
            .collect();
        Producers { stop, threads }
    }

    fn finish(self) -> Produced {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Produced::default();
        for thread in self.threads {
            let produced = thread.join().expect("producer thread");
            all.acknowledged.extend(produced.acknowledged);
            all.in_doubt.extend(produced.in_doubt);
            all.rolled_back.extend(produced.rolled_back);
        }
        all
    }
}

fn produce(url: &str, app: Uuid, script: Uuid, producer: usize, stop: &AtomicBool) -> Produced {
    let mut produced = Produced::default();
    let mut open: Option<(Client, u16)> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let Some((client, port)) = open.as_mut() else {
            open = connect_producer(url);
            if open.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        };
        n += 1;
        let payload = serde_json::json!({ "producer": producer, "n": n });
        if !enqueue_one(
            client,
            *port,
            app,
            script,
            &payload,
            n.is_multiple_of(7),
            &mut produced,
        ) {
            open = None;
        }
    }
    produced
}

/// A producer's connection and the port of the server it reached (the multi-host string picks
/// whichever accepts writes).
fn connect_producer(url: &str) -> Option<(Client, u16)> {
    let mut client = Client::connect(url, NoTls).ok()?;
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .ok()?
        .get(0);
    Some((client, u16::try_from(port).ok()?))
}

/// One transaction that enqueues one event and commits (or rolls back, with `rollback`),
/// recorded in `produced`. Returns false when the connection is to be dropped.
fn enqueue_one(
    client: &mut Client,
    port: u16,
    app: Uuid,
    script: Uuid,
    payload: &serde_json::Value,
    rollback: bool,
    produced: &mut Produced,
) -> bool {
    let Ok(mut transaction) = client.transaction() else {
        return false;
    };
    let id: Uuid = match transaction.query_one(
        "SELECT picloud.picloud_enqueue($1, 'queue', 'failover', $2::jsonb, $3)",
        &[&app, payload, &script],
    ) {
        Ok(row) => row.get(0),
        Err(_) => return false,
    };
    if rollback {
        // Never committed, whatever the rollback's answer.
        let rolled_back = transaction.rollback().is_ok();
        produced.rolled_back.push(id);
        return rolled_back;
    }
    if transaction.commit().is_err() {
        produced.in_doubt.push(id);
        return false;
    }
    let lsn = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
        .ok()
        .map(|row| row.get::<_, i64>(0));
    produced.acknowledged.push((id, lsn, port));
    true
}

/// How many times each event ran, from the new primary's ledger.
fn ledger_counts(client: &mut Client) -> HashMap<Uuid, i64> {
    client
        .query(
            "SELECT event_id, count(*) FROM ledger GROUP BY event_id",
            &[],
        )
        .expect("ledger")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until the new primary's outbox is empty: claims that survived the failover come back
/// when their lease expires (the new primary's housekeeper returns them) and run then.
fn drained(client: &mut Client) -> bool {
    eventually(Duration::from_secs(60), || {
        count(client, "SELECT count(*) FROM picloud.outbox") == 0
    })
}

/// How long after the promotion (`promoted`, that server's timestamp) each supervisor (by the
/// application_name of its connections) opened its first connection still open on the new
/// primary. Polled for up to 30 s.
fn resumed(client: &mut Client, names: &[&str], promoted: &str) -> Vec<Duration> {
    names
        .iter()
        .map(|name| {
            let query = format!(
                "SELECT extract(epoch FROM min(backend_start) - '{promoted}'::timestamptz)::float8 \
                 FROM pg_stat_activity WHERE application_name = '{name}' \
                 AND backend_start >= '{promoted}'::timestamptz"
            );
            let mut seconds = None;
            eventually(Duration::from_secs(30), || {
                seconds = client
                    .query_one(&query, &[])
                    .ok()
                    .and_then(|row| row.get::<_, Option<f64>>(0));
                seconds.is_some()
            });
            let seconds = seconds.unwrap_or_else(|| panic!("{name} never came back"));
            Duration::from_secs_f64(seconds.max(0.0))
        })
        .collect()
}

/// Time from the promotion (`promoted`, that server's timestamp) to the first event the new
/// primary's ledger ran.
fn first_run_after(client: &mut Client, promoted: &str) -> Duration {
    let query = format!(
        "SELECT extract(epoch FROM min(at) - '{promoted}'::timestamptz)::float8 \
         FROM ledger WHERE at > '{promoted}'::timestamptz"
    );
    let mut seconds = None;
    eventually(Duration::from_secs(30), || {
        seconds = client
            .query_one(&query, &[])
            .ok()
            .and_then(|row| row.get::<_, Option<f64>>(0));
        seconds.is_some()
    });
    let seconds = seconds.unwrap_or_else(|| panic!("no event ran on the new primary"));
    Duration::from_secs_f64(seconds.max(0.0))
}

/// Time since `promoted` (a timestamp of the server `client` is connected to, on this machine).
fn since(client: &mut Client, promoted: &str) -> Duration {
    let seconds: f64 = client
        .query_one(
            &format!(
                "SELECT extract(epoch FROM clock_timestamp() - '{promoted}'::timestamptz)::float8"
            ),
            &[],
        )
        .expect("clock")
        .get(0);
    Duration::from_secs_f64(seconds.max(0.0))
}

/// The ledger app, two supervisors with multi-host URLs (one key=value, one postgres://),
/// producers through a multi-host URL; SIGKILL of the primary's postmaster mid-load, then
/// promotion of the standby. Returns what the test needs to check.
struct Failover {
    produced: Produced,
    ledger: HashMap<Uuid, i64>,
    /// The standby's last received WAL position when the primary died.
    standby_received: i64,
    resumed: Vec<Duration>,
    first_run: Duration,
    /// When the new primary's housekeeper was seen collecting, after promotion.
    collected: Duration,
    supervisor_logs: Vec<String>,
    client: Client,
}

fn fail_over(pair: &Pair, tag: &str) -> Failover {
    let mut primary = connect_to(pair.primary_port);
    let (app, script) = ledger_app(&mut primary);
    let (key_value, url) = pair.multi_host();
    let names = [format!("{tag}-a"), format!("{tag}-b")];
    let args = [
        "--lease-ms",
        LEASE_MS,
        "--poll-interval-ms",
        "500",
        "--concurrency",
        "8",
        "--log-format",
        "text",
    ];
    let supervisors = [
        Supervisor::start_url(
            &format!("{key_value} application_name={}", names[0]),
            &names[0],
            &[&args[..], &["--worker-name", &names[0]]].concat(),
        ),
        Supervisor::start_url(
            &format!("{url}&application_name={}", names[1]),
            &names[1],
            // Every event of this one goes through claims, so some are in flight at the crash.
            &[&args[..], &["--worker-name", &names[1], "--sql-lanes", "0"]].concat(),
        ),
    ];
    let producers = Producers::start(&key_value, app, script, 4);
    // Load: events flow through both supervisors before the primary dies.
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut primary,
            "SELECT count(*) FROM ledger"
        ) >= 500),
        "events run before the failover; logs: {}",
        supervisors[0].log()
    );
    std::thread::sleep(Duration::from_secs(2));

    // The housekeeper on the standby: never started while in recovery, so nothing of it in
    // the standby's log. The window is this test's load (several seconds, a few housekeeper
    // intervals of the primary) rather than a minute: the housekeeper is not started on a
    // standby at all (a background worker that starts at recovery end), which the process
    // list shows, so a longer window would add time but no evidence.
    let mut standby = connect_to(pair.standby_port);
    assert_eq!(
        count(
            &mut standby,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'picloud housekeeper'"
        ),
        0,
        "no housekeeper on the standby"
    );
    let standby_log = pair.standby_log();
    assert!(
        error_lines(&standby_log).is_empty(),
        "no ERROR in the standby's log: {standby_log}"
    );
    drop(primary);

    pair.kill_primary();
    let standby_received: i64 = standby
        .query_one("SELECT (pg_last_wal_receive_lsn() - '0/0')::int8", &[])
        .expect("standby's received position")
        .get(0);
    // A failover manager takes a moment to decide; meanwhile the supervisors find only the
    // standby and back off.
    std::thread::sleep(FAILOVER_DELAY);
    let promoted = pair.promote();
    let mut client = connect_to(pair.standby_port);

    // Housekeeping on the new primary: an old resolved dead letter is collected within one
    // interval of the promotion.
    let dead_letter: Uuid = client
        .query_one(
            "INSERT INTO picloud.dead_letters (app_id, original_event_id, source, op, payload, \
             attempt_count, created_at, resolved_at, resolution) \
             VALUES ($1, gen_random_uuid(), 'queue', 'x', '{}', 5, now() - interval '40 days', \
             now(), 'ignored') RETURNING dead_letter_id",
            &[&app],
        )
        .expect("old dead letter")
        .get(0);
    let names_ref: Vec<&str> = names.iter().map(String::as_str).collect();
    let resumed = resumed(&mut client, &names_ref, &promoted);
    let first_run = first_run_after(&mut client, &promoted);
    assert!(
        eventually(Duration::from_secs(10), || count(
            &mut client,
            &format!(
                "SELECT count(*) FROM picloud.dead_letters WHERE dead_letter_id = '{dead_letter}'"
            )
        ) == 0),
        "the new primary's housekeeper collects"
    );
    let collected = since(&mut client, &promoted);
    println!(
        "{tag}: first housekeeping pass on the new primary seen {collected:?} after promotion \
         (picloud.gc_interval {GC_INTERVAL:?})"
    );

    // Producers keep going on the new primary for a moment, then stop.
    std::thread::sleep(Duration::from_secs(2));
    let produced = producers.finish();
    assert!(
        drained(&mut client),
        "the outbox empties on the new primary; logs: {}",
        supervisors[0].log()
    );
    let ledger = ledger_counts(&mut client);
    let supervisor_logs = supervisors.iter().map(Supervisor::log).collect();
    Failover {
        produced,
        ledger,
        standby_received,
        resumed,
        first_run,
        collected,
        supervisor_logs,
        client,
    }
}

/// What every failover shows, synchronous or not: nothing ran twice, nothing ran that was not
/// committed, nothing is left behind, and each supervisor said at most once that it waited.
fn check_common(tag: &str, f: &mut Failover) {
    let in_doubt_ran = f
        .produced
        .in_doubt
        .iter()
        .filter(|id| f.ledger.contains_key(id))
        .count();
    println!(
        "{tag}: {} events acknowledged, {} in doubt (commit sent, no answer; {} of them \
         committed and ran), {} rolled back (none ran); supervisors back on the new primary \
         {:?} after promotion, first event run after {:?}",
        f.produced.acknowledged.len(),
        f.produced.in_doubt.len(),
        in_doubt_ran,
        f.produced.rolled_back.len(),
        f.resumed,
        f.first_run
    );
    let duplicates: Vec<_> = f.ledger.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "{tag}: ran twice: {duplicates:?}");
    let committed_or_maybe: HashSet<Uuid> = f
        .produced
        .acknowledged
        .iter()
        .map(|(id, _, _)| *id)
        .chain(f.produced.in_doubt.iter().copied())
        .collect();
    let uncommitted: Vec<_> = f
        .ledger
        .keys()
        .filter(|id| !committed_or_maybe.contains(id))
        .collect();
    assert!(
        uncommitted.is_empty(),
        "{tag}: ran without a commit: {uncommitted:?}"
    );
    for id in &f.produced.rolled_back {
        assert!(!f.ledger.contains_key(id), "{tag}: a rolled-back event ran");
    }
    assert_eq!(
        count(
            &mut f.client,
            "SELECT count(*) FROM picloud.dead_letters WHERE resolved_at IS NULL"
        ),
        0,
        "{tag}: no dead letters"
    );
    for log in &f.supervisor_logs {
        // While the primary is dead and the standby not yet promoted, every connection finds
        // only the standby: said once, and once that the wait is over.
        assert_eq!(
            log.matches("waiting for a primary").count(),
            1,
            "{tag}: one waiting line: {log}"
        );
        assert!(log.contains("connected to a primary"), "{tag}: {log}");
        assert!(!log.contains("panicked"), "{tag}: {log}");
    }
}

/// The new primary's housekeeper starts at promotion and collects within one interval; checked
/// last, after the event figures are printed.
fn check_housekeeper(tag: &str, pair: &Pair, f: &Failover) {
    let rescued: i64 = pair
        .standby_log()
        .lines()
        .filter_map(|line| line.split(" rescue_leases=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<i64>().ok())
        .sum();
    println!(
        "{tag}: leases rescued by the new primary's housekeeper (claims in flight at the crash): \
         {rescued}"
    );
    assert!(
        f.collected <= GC_INTERVAL,
        "{tag}: the housekeeper collected {:?} after promotion, more than one interval ({GC_INTERVAL:?})",
        f.collected
    );
}

#[test]
fn synchronous_failover_loses_nothing_acknowledged_and_runs_nothing_twice() {
    let _turn = turn();
    let pair = Pair::start("sync", 55490, 55491, true);
    let mut f = fail_over(&pair, "sync");
    check_common("sync", &mut f);
    let lost: Vec<_> = f
        .produced
        .acknowledged
        .iter()
        .filter(|(id, _, _)| f.ledger.get(id) != Some(&1))
        .collect();
    assert!(
        lost.is_empty(),
        "sync: acknowledged events that did not run exactly once: {} of {}",
        lost.len(),
        f.produced.acknowledged.len()
    );
    let slowest = f.resumed.iter().max().copied().unwrap_or_default();
    assert!(
        slowest <= Duration::from_secs(5) && f.first_run <= Duration::from_secs(5),
        "sync: supervisors resume within 5 s of promotion: {:?}, first run {:?}",
        f.resumed,
        f.first_run
    );
    check_housekeeper("sync", &pair, &f);
}

#[test]
fn asynchronous_failover_loses_at_most_what_the_standby_had_not_received() {
    let _turn = turn();
    let pair = Pair::start("async", 55492, 55493, false);
    let mut f = fail_over(&pair, "async");
    check_common("async", &mut f);
    let old_primary = pair.primary_port;
    let lost: Vec<&(Uuid, Option<i64>, u16)> = f
        .produced
        .acknowledged
        .iter()
        .filter(|(id, _, _)| !f.ledger.contains_key(id))
        .collect();
    // A lost event was acknowledged by the old primary, at a WAL position the standby had not
    // received when the primary died.
    for (id, lsn, port) in &lost {
        assert_eq!(*port, old_primary, "async: lost {id} on the new primary");
        if let Some(lsn) = lsn {
            assert!(
                *lsn > f.standby_received,
                "async: lost {id} although the standby had received its commit ({lsn} <= {})",
                f.standby_received
            );
        }
    }
    let beyond = f
        .produced
        .acknowledged
        .iter()
        .filter(|(_, lsn, port)| {
            *port == old_primary && lsn.is_some_and(|l| l > f.standby_received)
        })
        .count();
    println!(
        "async: {} acknowledged events lost of {} (acknowledged past the standby's received \
         position: {beyond}); no event ran twice",
        lost.len(),
        f.produced.acknowledged.len()
    );
    check_housekeeper("async", &pair, &f);
}

#[test]
fn a_supervisor_on_a_standby_waits_and_starts_at_promotion() {
    let _turn = turn();
    let pair = Pair::start("standby-only", 55494, 55495, true);
    let mut primary = connect_to(pair.primary_port);
    let (app, script) = ledger_app(&mut primary);
    primary
        .execute(
            "SELECT picloud_enqueue($1, 'queue', 'waiting', jsonb_build_object('i', i), $2) \
             FROM generate_series(1, 50) AS i",
            &[&app, &script],
        )
        .expect("enqueue");
    // A single host, the standby, with libpq's default target_session_attrs (any): the
    // supervisor itself recognises the standby.
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname={DB} application_name=on-standby",
        pair.standby_port
    );
    let supervisor = Supervisor::start_url(
        &url,
        "standby-only",
        &["--log-format", "text", "--lease-ms", LEASE_MS],
    );
    std::thread::sleep(Duration::from_secs(4));
    let log = supervisor.log();
    assert_eq!(
        log.matches("waiting for a primary").count(),
        1,
        "said once that it waits: {log}"
    );
    assert_eq!(
        count(
            &mut primary,
            "SELECT count(*) FROM picloud.outbox WHERE claimed_by IS NULL"
        ),
        50,
        "nothing claimed"
    );
    assert_eq!(count(&mut primary, "SELECT count(*) FROM ledger"), 0);
    let standby_log = pair.standby_log();
    assert!(
        error_lines(&standby_log).is_empty(),
        "the supervisor never tried to claim on the standby: {standby_log}"
    );

    // A planned switchover: the primary stops cleanly, the standby is promoted.
    pair.stop(&pair.primary_dir());
    let promoted = pair.promote();
    let mut client = connect_to(pair.standby_port);
    let first_run = first_run_after(&mut client, &promoted);
    assert!(
        eventually(Duration::from_secs(30), || count(
            &mut client,
            "SELECT count(*) FROM ledger"
        ) == 50),
        "events run after promotion: {}",
        supervisor.log()
    );
    let started = since(&mut client, &promoted);
    println!(
        "standby-only: first event ran {first_run:?} after promotion, all 50 within {started:?}"
    );
    // The reconnect backoff's largest step is 10 s; after 4 s of waiting the step is smaller.
    assert!(
        started <= Duration::from_secs(10),
        "started within one backoff step of the promotion: {started:?}"
    );
    let log = supervisor.log();
    assert_eq!(log.matches("waiting for a primary").count(), 1, "{log}");
    assert!(log.contains("connected to a primary"), "{log}");
}
