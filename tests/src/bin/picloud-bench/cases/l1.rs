//! L1: wake-up latency on an idle queue: picloud (one supervisor at its defaults) against a
//! minimal LISTEN/NOTIFY worker on the bigserial plain outbox, measured the same way on both
//! sides.

use super::order;
use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, count, exec, settle, supervisor_idle};
use crate::harness;
use crate::report::{fmt_num, Row};
use crate::setup::{reset_queues, Main};
use crate::stats::{median_ratio, percentile, stat, stat_json};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{FromSql, ToSql};
use postgres::Client;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

pub fn epoch_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(f64::NAN)
}

/// Waits (up to a minute) until no autovacuum worker runs anywhere in the cluster, so that a
/// latency measurement sees an idle machine rather than the clean-up after earlier cases.
pub fn wait_for_quiet(c: &mut Client) -> Res<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let busy = count(
            c,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
        )?;
        if busy == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// One side's samples of one run, in ms: each from the enqueueing client's clock taken just
/// before the enqueue statement (`client`), from clock_timestamp() taken as the last statement
/// before COMMIT (`pre`), and from the client's clock right after COMMIT returned (`post`),
/// each to clock_timestamp() in the handler's first statement.
#[derive(Default)]
struct Samples {
    client: Vec<f64>,
    pre: Vec<f64>,
    post: Vec<f64>,
}

/// One side of L1: how it enqueues and where its stamps are.
struct Side<'a> {
    label: &'a str,
    /// The enqueue statement; returns the event's key.
    enqueue: &'a str,
    params: &'a [&'a (dyn ToSql + Sync)],
    /// Records clock_timestamp() for the key ($1) as the last statement before COMMIT.
    sent: &'a str,
    /// Counts the events handled.
    handled: &'a str,
    /// Per handled event: key, ms from `sent` to the handler's stamp, the stamp (epoch ms).
    rows: &'a str,
}

/// Sends `cfg.l1_samples` events of `side`, one per transaction, `cfg.l1_gap_ms` apart, then
/// waits (up to 30 s) until every one is handled and reads their stamps.
fn sample<K>(
    cfg: &Cfg,
    c: &mut Client,
    side: &Side,
    run: usize,
    notes: &mut Vec<String>,
) -> Res<Samples>
where
    K: Eq + Hash + Copy + ToSql + Sync + for<'a> FromSql<'a>,
{
    let mut sent: Vec<(K, f64, f64)> = Vec::with_capacity(cfg.l1_samples);
    let t0 = Instant::now();
    for i in 0..cfg.l1_samples {
        let due = t0 + Duration::from_millis(cfg.l1_gap_ms * i as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut tx = c.transaction().map_err(pg_err("begin"))?;
        let before = epoch_ms(SystemTime::now());
        let key: K = tx
            .query_one(side.enqueue, side.params)
            .map_err(pg_err("enqueue"))?
            .get(0);
        tx.execute(side.sent, &[&key])
            .map_err(pg_err("record send time"))?;
        tx.commit().map_err(pg_err("commit"))?;
        sent.push((key, before, epoch_ms(SystemTime::now())));
    }
    let done = Instant::now();
    let n = cfg.l1_samples as i64;
    while count(c, side.handled)? < n && done.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let rows = c.query(side.rows, &[]).map_err(pg_err("read latencies"))?;
    if (rows.len() as i64) < n {
        notes.push(format!(
            "L1 run {} {}: only {} of {n} events were handled within 30 s",
            run + 1,
            side.label,
            rows.len()
        ));
    }
    let by_key: HashMap<K, (f64, f64)> = sent.into_iter().map(|(k, b, a)| (k, (b, a))).collect();
    let mut s = Samples::default();
    for r in &rows {
        let started: f64 = r.get(2);
        s.pre.push(r.get(1));
        if let Some((before, after)) = by_key.get(&r.get::<_, K>(0)) {
            s.client.push(started - before);
            s.post.push(started - after);
        }
    }
    Ok(s)
}

/// picloud's side of one run: a fresh supervisor, idle, and the `stamp` handler.
fn picloud_run(
    cfg: &Cfg,
    m: &Main,
    c: &mut Client,
    run: usize,
    notes: &mut Vec<String>,
) -> Res<Samples> {
    let mut sup = harness::start(cfg, &cfg.db, "l1", &[])?;
    // Wait until it has gone idle (its claims come back empty) and past its re-check.
    let start = Instant::now();
    while !supervisor_idle(c) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    if let Some(e) = harness::exited(&mut sup) {
        return Err(e);
    }
    let side = Side {
        label: "picloud",
        enqueue: "SELECT picloud.picloud_enqueue($1, 'queue', 'lat', '{}'::jsonb, $2)",
        params: &[&m.app, &m.stamp],
        sent: "INSERT INTO lat_sent (event_id, sent) VALUES ($1, clock_timestamp())",
        handled: "SELECT count(*) FROM lat",
        rows: "SELECT s.event_id, extract(epoch FROM l.started - s.sent)::float8 * 1000,
                      extract(epoch FROM l.started)::float8 * 1000
               FROM lat_sent s JOIN lat l USING (event_id)",
    };
    let samples = sample::<Uuid>(cfg, c, &side, run, notes);
    harness::stop(&mut sup);
    for problem in sup.problems().iter().take(1) {
        notes.push(format!("L1 run {}: supervisor logged: {problem}", run + 1));
    }
    samples
}

/// The minimal worker's statement: take up to 100 due rows, oldest first, and run the handler
/// (`stamp_plain`, whose first statement stamps clock_timestamp()) on each, in one autocommit
/// statement.
const WORKER_TAKE: &str = "WITH d AS (
     DELETE FROM bench_outbox WHERE id IN (
         SELECT id FROM bench_outbox ORDER BY run_at LIMIT 100 FOR UPDATE SKIP LOCKED)
     RETURNING id, payload)
 SELECT stamp_plain(d.id, d.payload) FROM d";

/// Starts the minimal LISTEN/NOTIFY worker on a connection of its own: it LISTENs on
/// bench_outbox, and each time it is woken (or every 100 ms, to notice `stop`) runs
/// WORKER_TAKE until it takes nothing. Returns once it is listening.
fn start_worker(cfg: &Cfg, stop: Arc<AtomicBool>) -> Res<std::thread::JoinHandle<Res<u64>>> {
    let mut c = connect(cfg, &cfg.db)?;
    exec(&mut c, "LISTEN bench_outbox")?;
    let take = c
        .prepare(WORKER_TAKE)
        .map_err(pg_err("prepare worker statement"))?;
    Ok(std::thread::spawn(move || -> Res<u64> {
        let mut handled = 0u64;
        loop {
            loop {
                let n = c.query(&take, &[]).map_err(pg_err("worker take"))?.len() as u64;
                if n == 0 {
                    break;
                }
                handled += n;
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(handled);
            }
            let mut notifications = c.notifications();
            let woke = notifications
                .timeout_iter(Duration::from_millis(100))
                .next()
                .map_err(pg_err("worker wait"))?
                .is_some();
            if woke {
                // One pass takes everything due: the wake-ups already queued are spent.
                let mut pending = notifications.iter();
                while pending.next().map_err(pg_err("worker wake-ups"))?.is_some() {}
            }
        }
    }))
}

/// The minimal worker's side of one run on the bigserial plain outbox: the enqueue inserts
/// and sends the NOTIFY in one statement of the enqueueing transaction.
fn worker_run(cfg: &Cfg, c: &mut Client, run: usize, notes: &mut Vec<String>) -> Res<Samples> {
    let stop = Arc::new(AtomicBool::new(false));
    let worker = start_worker(cfg, Arc::clone(&stop))?;
    std::thread::sleep(Duration::from_millis(500));
    let side = Side {
        label: "worker",
        enqueue: "WITH i AS (INSERT INTO bench_outbox (payload) VALUES ('{}'::jsonb) RETURNING id)
                  SELECT id, pg_notify('bench_outbox', '') FROM i",
        params: &[],
        sent: "INSERT INTO lat_plain_sent (id, sent) VALUES ($1, clock_timestamp())",
        handled: "SELECT count(*) FROM lat_plain",
        rows: "SELECT s.id, extract(epoch FROM l.started - s.sent)::float8 * 1000,
                      extract(epoch FROM l.started)::float8 * 1000
               FROM lat_plain_sent s JOIN lat_plain l USING (id)",
    };
    let samples = sample::<i64>(cfg, c, &side, run, notes);
    stop.store(true, Ordering::Relaxed);
    worker
        .join()
        .map_err(|_| "L1 worker panicked".to_string())??;
    samples
}

pub fn bench_l1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>, chart: &mut Value) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    exec(&mut c, "VACUUM")?;
    wait_for_quiet(&mut c)?;
    let (mut p50, mut p99, mut post50, mut post99, mut over20) =
        (vec![], vec![], vec![], vec![], vec![]);
    // From the client's clock before the enqueue, picloud and the worker; the worker's figures
    // from before COMMIT, for the notes.
    let (mut c50, mut c99, mut w50, mut w99, mut wpre50, mut wpre99) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for run in 0..cfg.runs {
        for side in order(run) {
            reset_queues(&mut c)?;
            exec(&mut c, "TRUNCATE lat, lat_sent, lat_plain, lat_plain_sent")?;
            settle(&mut c)?;
            if side == 0 {
                let s = picloud_run(cfg, m, &mut c, run, notes)?;
                let pre = &s.pre;
                let slow = pre.iter().filter(|x| **x > 20.0).count() as f64 * 100.0
                    / pre.len().max(1) as f64;
                progress(&format!(
                    "L1 run {} picloud: from before COMMIT p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({slow:.0}% over 20 ms); \
                     from the client before the enqueue p50 {:.2} ms, p99 {:.2} ms",
                    run + 1,
                    percentile(pre, 50.0),
                    percentile(pre, 99.0),
                    percentile(pre, 100.0),
                    percentile(&s.client, 50.0),
                    percentile(&s.client, 99.0)
                ));
                p50.push(percentile(pre, 50.0));
                p99.push(percentile(pre, 99.0));
                post50.push(percentile(&s.post, 50.0));
                post99.push(percentile(&s.post, 99.0));
                c50.push(percentile(&s.client, 50.0));
                c99.push(percentile(&s.client, 99.0));
                over20.push(slow);
            } else {
                let s = worker_run(cfg, &mut c, run, notes)?;
                progress(&format!(
                    "L1 run {} LISTEN/NOTIFY worker: from before COMMIT p50 {:.2} ms, p99 {:.2} ms; \
                     from the client before the enqueue p50 {:.2} ms, p99 {:.2} ms",
                    run + 1,
                    percentile(&s.pre, 50.0),
                    percentile(&s.pre, 99.0),
                    percentile(&s.client, 50.0),
                    percentile(&s.client, 99.0)
                ));
                w50.push(percentile(&s.client, 50.0));
                w99.push(percentile(&s.client, 99.0));
                wpre50.push(percentile(&s.pre, 50.0));
                wpre99.push(percentile(&s.pre, 99.0));
            }
        }
    }
    notes.push(format!(
        "L1 (absolute targets): measured from clock_timestamp() taken as the last statement before COMMIT (so the commit's WAL flush is included). \
         Measured instead from the client's clock right after COMMIT returned: p50 {} ms, p99 {} ms. \
         Share of samples over 20 ms: {}%.",
        fmt_num(stat(&post50).median), fmt_num(stat(&post99).median), fmt_num(stat(&over20).median)
    ));
    notes.push(format!(
        "L1 (ratio targets): from the enqueueing client's clock just before the enqueue statement to clock_timestamp() in the \
         handler's first statement, on both sides. The worker: one connection that LISTENs on bench_outbox and, when woken by \
         the NOTIFY sent in the enqueueing transaction (pg_notify in the INSERT's statement), runs one autocommit statement \
         that deletes up to 100 rows ORDER BY run_at FOR UPDATE SKIP LOCKED and calls the SQL handler on each, until it \
         takes nothing. Both sides also record clock_timestamp() before COMMIT; the worker from there: p50 {} ms, p99 {} ms.",
        fmt_num(stat(&wpre50).median), fmt_num(stat(&wpre99).median)
    ));
    reset_queues(&mut c)?;
    chart["l1"] = json!({"p50": stat_json(&p50), "p99": stat_json(&p99)});
    let samples = format!("{} samples {} ms apart", cfg.l1_samples, cfg.l1_gap_ms);
    let worker = "LISTEN/NOTIFY worker";
    Ok(vec![
        Row::new("L1", &format!("wake-up latency p50, {samples}"), "ms")
            .value(&p50)
            .target("≤ 2.0 ms", stat(&p50).median <= 2.0),
        Row::new("L1", &format!("wake-up latency p99, {samples}"), "ms")
            .value(&p99)
            .target("≤ 3.5 ms", stat(&p99).median <= 3.5),
        Row::new(
            "L1",
            "enqueue → handler p50, from the client before the enqueue",
            "ms",
        )
        .value(&c50)
        .baseline(worker, &w50, "ms")
        .ratio_of(&c50, &w50)
        .target("≤ 1.1× worker", median_ratio(&c50, &w50) <= 1.1),
        Row::new(
            "L1",
            "enqueue → handler p99, from the client before the enqueue",
            "ms",
        )
        .value(&c99)
        .baseline(worker, &w99, "ms")
        .ratio_of(&c99, &w99)
        .target("≤ 1.2× worker", median_ratio(&c99, &w99) <= 1.2),
    ])
}
