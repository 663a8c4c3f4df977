//! The supervisor process under test: the tests' harness (`picloud_tests::Supervisor`) started
//! from the bench's release binary with the bench's flags, and the wait for a drained outbox.

use crate::config::{err, Cfg, Res};
use crate::db::count;
use picloud_tests::Supervisor;
use postgres::Client;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static SUPERVISOR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How long a stopping supervisor gets after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Starts `cfg.supervisor` on `db` with the bench's flags; its log goes to BENCH_OUT/logs.
pub fn start(cfg: &Cfg, db: &str, tag: &str, extra: &[String]) -> Res<Supervisor> {
    let dir = cfg.out.join("logs");
    std::fs::create_dir_all(&dir).map_err(err("create log dir"))?;
    let n = SUPERVISOR_COUNTER.fetch_add(1, Ordering::SeqCst);
    let log = dir.join(format!("supervisor-{n:02}-{tag}.log"));
    let worker_name = format!("bench-{tag}-{n}");
    // Supervisor defaults (--concurrency 16) but for the poll interval.
    let mut args: Vec<&str> = vec!["--poll-interval-ms", "5000", "--worker-name", &worker_name];
    args.extend(cfg.supervisor_args.iter().map(String::as_str));
    args.extend(extra.iter().map(String::as_str));
    Supervisor::spawn(&cfg.supervisor, &cfg.url(db), log, &args)
        .map_err(err(&format!("start {}", cfg.supervisor)))
}

/// SIGTERM, then SIGKILL if it has not exited after 15 s.
pub fn stop(sup: &mut Supervisor) {
    sup.stop(STOP_GRACE);
}

/// An error describing the exit if the supervisor has exited.
pub fn exited(sup: &mut Supervisor) -> Option<String> {
    match sup.child.try_wait() {
        Ok(Some(status)) => Some(format!(
            "supervisor exited early ({status}); log {}: {}",
            sup.log_path.display(),
            sup.log_tail(3)
        )),
        _ => None,
    }
}

/// Waits until `table` is empty. Emptiness is checked every 5 ms with a query that stops at
/// the first row (so the wait adds at most a few ms to a timed drain and little load); the
/// row count, for noticing a stalled supervisor, about once a second. Fails if the supervisor
/// exits, or nothing moves for 60 s, or the overall timeout passes.
pub fn wait_empty(c: &mut Client, table: &str, sup: &mut Supervisor, timeout: Duration) -> Res<()> {
    // Probed in primary-key order: an index scan passes over the entries of deleted rows once
    // (it marks them dead), where a sequential scan would read the whole drained head of the
    // table again every 5 ms - measurement work of up to a sixth of a core during a drain,
    // which a baseline whose clients see the table empty for themselves never pays.
    let any = format!(
        "SELECT count(*) FROM (SELECT 1 FROM {table} ORDER BY app_id, event_id LIMIT 1) AS first"
    );
    let all = format!("SELECT count(*) FROM {table}");
    let start = Instant::now();
    let mut last = i64::MAX;
    let mut last_change = Instant::now();
    let mut last_count = Instant::now();
    loop {
        if count(c, &any)? == 0 {
            return Ok(());
        }
        if let Some(e) = exited(sup) {
            return Err(e);
        }
        if last_count.elapsed() > Duration::from_secs(1) {
            last_count = Instant::now();
            let n = count(c, &all)?;
            if n != last {
                last = n;
                last_change = Instant::now();
            }
            if last_change.elapsed() > Duration::from_secs(60) || start.elapsed() > timeout {
                return Err(format!(
                    "{table} still holds {n} rows after {:.0} s; supervisor log {}: {}",
                    start.elapsed().as_secs_f64(),
                    sup.log_path.display(),
                    sup.log_tail(3)
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
