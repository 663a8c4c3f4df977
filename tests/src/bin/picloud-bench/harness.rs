//! The supervisor process under test: the tests' harness (`picloud_tests::Supervisor`) started
//! from the bench's release binary with the bench's flags, and the wait for a drained outbox.

use crate::config::{err, pg_err, Cfg, Res};
use crate::db::count;
use picloud_tests::Supervisor;
use postgres::Client;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

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
    // Probed in primary-key order, each probe from the key the last one found: event ids are
    // time-ordered, so a drain empties the index from its start, and a probe from the start
    // would walk the whole drained head again every 5 ms (up to a seventh of a core during a
    // 300,000-event drain, measured) - measurement work a baseline whose clients see the table
    // empty for themselves never pays. Only when nothing is left from that key on is the whole
    // table probed again (events behind it may still wait: retried, or claimed).
    let first = format!("SELECT app_id, event_id FROM {table} ORDER BY app_id, event_id LIMIT 1");
    let next = format!(
        "SELECT app_id, event_id FROM {table} WHERE (app_id, event_id) >= ($1, $2)
         ORDER BY app_id, event_id LIMIT 1"
    );
    let all = format!("SELECT count(*) FROM {table}");
    let start = Instant::now();
    let mut last = i64::MAX;
    let mut last_change = Instant::now();
    let mut last_count = Instant::now();
    let mut from: Option<(Uuid, Uuid)> = None;
    loop {
        let found = match &from {
            Some((app_id, event_id)) => c.query_opt(next.as_str(), &[app_id, event_id]),
            None => c.query_opt(first.as_str(), &[]),
        }
        .map_err(pg_err("probe the outbox"))?;
        match (found, from.is_some()) {
            (Some(row), _) => from = Some((row.get(0), row.get(1))),
            (None, true) => {
                from = None;
                continue;
            }
            (None, false) => return Ok(()),
        }
        if let Some(e) = exited(sup) {
            return Err(e);
        }
        // The whole count (a scan of the table) only for the stall check, every few seconds.
        if last_count.elapsed() > Duration::from_secs(5) {
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
