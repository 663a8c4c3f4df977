//! Test harness for picloud's integration tests.
//!
//! The test command (scripts/test.sh) starts one throwaway cluster with picloud preloaded and
//! passes its port in `PICLOUD_TEST_PORT`. Each test works in a database of its own
//! (`fresh_db`), so tests never see each other's rows; tests of the background worker use the
//! database it serves (`PICLOUD_TEST_WORKER_DB`) with apps of their own.

use postgres::{Client, NoTls};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use postgres;
pub use serde_json;
pub use uuid;

pub mod console;

pub fn port() -> u16 {
    std::env::var("PICLOUD_TEST_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("PICLOUD_TEST_PORT must name the port of the test cluster (run scripts/test.sh)")
}

pub fn worker_db() -> String {
    std::env::var("PICLOUD_TEST_WORKER_DB").unwrap_or_else(|_| "picloud_it".to_string())
}

pub fn url(db: &str, user: &str) -> String {
    format!("host=127.0.0.1 port={} user={user} dbname={db}", port())
}

pub fn connect(db: &str) -> Client {
    connect_as(db, "postgres")
}

pub fn connect_as(db: &str, user: &str) -> Client {
    let mut client = Client::connect(&url(db, user), NoTls)
        .unwrap_or_else(|e| panic!("connect to {db} as {user}: {e}"));
    client
        .batch_execute("SET search_path = public, picloud")
        .expect("set search_path");
    client
}

/// Every table the extension creates in schema picloud.
pub const TABLES: [&str; 15] = [
    "apps",
    "app_roles",
    "scripts",
    "triggers",
    "kv_trigger_details",
    "dead_letter_trigger_details",
    "cron_trigger_details",
    "outbox",
    "idempotency_keys",
    "dead_letters",
    "inboxes",
    "abandoned_executions",
    "event_counts",
    "key_blocks",
    "handler_limits",
];

static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Creates a new database with the extension and returns its name and a superuser client.
pub fn fresh_db(tag: &str) -> (String, Client) {
    fresh_db_with("CREATE EXTENSION picloud", tag)
}

/// Like fresh_db, but with the extension created at an earlier released version.
pub fn fresh_db_at_version(tag: &str, version: &str) -> (String, Client) {
    fresh_db_with(
        &format!("CREATE EXTENSION picloud VERSION '{version}'"),
        tag,
    )
}

fn fresh_db_with(create_extension: &str, tag: &str) -> (String, Client) {
    let n = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("t_{tag}_{}_{n}", std::process::id());
    let mut admin = connect("postgres");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .expect("drop old test database");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create test database");
    let mut client = connect(&name);
    client
        .batch_execute(create_extension)
        .expect("create extension");
    (name, client)
}

/// The SQLSTATE of a failed call, e.g. "42501".
pub fn sqlstate(result: Result<impl std::fmt::Debug, postgres::Error>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| panic!("error without SQLSTATE: {e}")),
    }
}

/// The message of a failed call.
pub fn error_message(result: Result<impl std::fmt::Debug, postgres::Error>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string()),
    }
}

pub fn count(client: &mut Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).expect(sql).get::<_, i64>(0)
}

/// Polls `check` until it returns true or `timeout` passes; returns whether it did.
/// Whether some supervisor of the database goes idle within 10 s: its claims came back empty,
/// so its connections are up and enqueues now wake it.
pub fn goes_idle(client: &mut Client) -> bool {
    eventually(Duration::from_secs(10), || {
        client
            .query_one("SELECT picloud_supervisor_idle()", &[])
            .is_ok_and(|row| row.get::<_, bool>(0))
    })
}

pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

pub fn supervisor_bin() -> String {
    std::env::var("PICLOUD_SUPERVISOR_BIN").unwrap_or_else(|_| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        root.join("target/debug/picloud-supervisor")
            .to_string_lossy()
            .into_owned()
    })
}

/// A running picloud-supervisor process, killed when dropped.
pub struct Supervisor {
    pub child: Child,
    pub log_path: std::path::PathBuf,
}

impl Supervisor {
    pub fn start(db: &str, extra: &[&str]) -> Supervisor {
        Supervisor::start_as(db, "postgres", extra)
    }

    pub fn start_as(db: &str, user: &str, extra: &[&str]) -> Supervisor {
        Supervisor::start_url(&url(db, user), db, extra)
    }

    /// Starts a supervisor on any connection string; `tag` names its log file.
    pub fn start_url(database_url: &str, tag: &str, extra: &[&str]) -> Supervisor {
        let log_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/it-logs");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let n = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let log_path = log_dir.join(format!("supervisor-{tag}-{n}.log"));
        Supervisor::spawn(&supervisor_bin(), database_url, log_path, extra)
            .expect("start picloud-supervisor (build it first: cargo build -p picloud-supervisor)")
    }

    /// Starts the supervisor binary `bin` (e.g. a release build) on any connection string,
    /// its stderr written to `log_path`; an error instead of a panic if it cannot start.
    pub fn spawn(
        bin: &str,
        database_url: &str,
        log_path: std::path::PathBuf,
        extra: &[&str],
    ) -> std::io::Result<Supervisor> {
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(bin)
            .arg("--database-url")
            .arg(database_url)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Supervisor { child, log_path })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        // Already-exited children make kill fail; either way it is gone afterwards.
        self.child.kill().ok();
        self.child.wait().ok();
    }

    /// SIGTERM, then wait up to `grace` for a clean exit; returns the exit status if it exited.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().ok();
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits up to `timeout` for the process to exit by itself; its status if it did.
    pub fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        eventually(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM unless it has already exited, then SIGKILL if it is still running after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if self.terminate(grace).is_none() {
            self.kill();
        }
    }

    /// The last `n` lines of its log, joined by " / ".
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().rev().take(n).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }

    /// The warning and error lines of its (JSON) log.
    pub fn problems(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("\"level\":\"error\"") || l.contains("\"level\":\"warn\""))
            .map(String::from)
            .collect()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates an app with a SQL handler that appends each event id to `ledger` and a KV
/// trigger on every collection. Returns (app_id, script_id).
pub fn ledger_app(client: &mut Client) -> (uuid::Uuid, uuid::Uuid) {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS ledger (event_id uuid NOT NULL, payload jsonb, at timestamptz DEFAULT clock_timestamp());
             CREATE OR REPLACE FUNCTION ledger_handler(e jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
             BEGIN
                 IF e->'payload'->>'fail' = 'always' THEN
                     RAISE EXCEPTION 'handler failed on purpose';
                 END IF;
                 INSERT INTO ledger (event_id, payload) VALUES ((e->>'event_id')::uuid, e->'payload');
                 RETURN jsonb_build_object('echo', e->'payload');
             END $$;",
        )
        .expect("ledger schema");
    let app: uuid::Uuid = client
        .query_one("SELECT picloud_create_app('ledger')", &[])
        .expect("create app")
        .get(0);
    let script: uuid::Uuid = client
        .query_one(
            "SELECT picloud_create_script($1, 'ledger', 'sql', 'ledger_handler')",
            &[&app],
        )
        .expect("create script")
        .get(0);
    (app, script)
}

/// A directory of its own under target/, that the postgres OS user can read (TLS files for
/// a cluster, PgBouncer's configuration). Emptied first.
pub fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/it-scratch")
        .join(format!("{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let mut reach = Some(dir.as_path());
    while let Some(d) = reach {
        Command::new("chmod").args(["o+rx"]).arg(d).status().ok();
        reach = d.parent();
    }
    dir
}

/// A certificate authority made for one test, and the server certificates it signs.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate and its key (PEM) for these DNS names and IP addresses.
    pub fn server_cert(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).expect("server params");
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A port nothing listens on right now: bound to port 0, then released (so something else may
/// take it before the caller does: callers that can retry on another port should).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}
