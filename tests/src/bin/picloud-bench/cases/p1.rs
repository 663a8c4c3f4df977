//! P1: processing throughput.

use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{busy_cpu_secs, connect, count, exec, settle};
use crate::harness;
use crate::report::{fmt_num, Row};
use crate::setup::{bigserial_fill, bulk_enqueue, plain_fill, reset_queues, Main};
use crate::stats::{median_ratio, stat, stat_json};
use postgres::Client;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::Instant;

/// Drains `n` pre-enqueued events through a fresh supervisor; returns events/s and the busy
/// CPU seconds of the whole machine over the drain (start-up included).
pub fn drain_with_supervisor(
    cfg: &Cfg,
    c: &mut Client,
    tag: &str,
    n: i64,
    extra: &[String],
    notes: &mut Vec<String>,
) -> Res<(f64, f64)> {
    let cpu = busy_cpu_secs();
    let start = Instant::now();
    let mut sup = harness::start(cfg, &cfg.db, tag, extra)?;
    harness::wait_empty(c, "picloud.outbox", &mut sup, cfg.drain_timeout)?;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = busy_cpu_secs() - cpu;
    harness::stop(&mut sup);
    let problems = sup.problems();
    if !problems.is_empty() {
        notes.push(format!(
            "{tag}: supervisor logged {} warning/error lines, e.g. {}",
            problems.len(),
            problems[0]
        ));
    }
    Ok((n as f64 / elapsed, cpu))
}

/// The baseline drain: `clients` connections run `sql` (prepared once each) until `table` is
/// empty. With `returning`, `sql` returns the deleted rows and the client reads them.
pub fn plain_drain(cfg: &Cfg, clients: usize, table: &str, sql: &str, returning: bool) -> Res<()> {
    let barrier = Arc::new(Barrier::new(clients));
    let mut handles = vec![];
    for _ in 0..clients {
        let mut c = connect(cfg, &cfg.db)?;
        let barrier = Arc::clone(&barrier);
        let statement = c.prepare(sql).map_err(pg_err("prepare plain delete"))?;
        let remaining = format!("SELECT count(*) FROM {table}");
        handles.push(std::thread::spawn(move || -> Res<()> {
            barrier.wait();
            loop {
                let n = if returning {
                    c.query(&statement, &[])
                        .map_err(pg_err("plain delete"))?
                        .len() as u64
                } else {
                    c.execute(&statement, &[]).map_err(pg_err("plain delete"))?
                };
                if n == 0 && count(&mut c, &remaining)? == 0 {
                    return Ok(());
                }
            }
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| "plain drain thread panicked".to_string())??;
    }
    Ok(())
}

/// The plain drain the target compares with: 10 clients, 100 rows a transaction, oldest
/// first, the deleted rows returned to the client.
const BIGSERIAL_DRAIN: &str = "DELETE FROM bench_outbox WHERE id IN (
     SELECT id FROM bench_outbox ORDER BY run_at LIMIT 100 FOR UPDATE SKIP LOCKED)
 RETURNING *";

/// The random-UUID reference drain, `batch` rows a transaction (as before the bigserial
/// baseline): its sub-select has WHERE due_at <= now() so the partial index on due rows can
/// serve it, as picloud's claim does.
fn uuid_drain(batch: i64) -> String {
    format!(
        "DELETE FROM bench_plain_outbox WHERE id IN (
             SELECT id FROM bench_plain_outbox WHERE due_at <= now()
             ORDER BY due_at LIMIT {batch} FOR UPDATE SKIP LOCKED)"
    )
}

pub fn bench_p1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>, chart: &mut Value) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let http_allow = vec![
        "--http-allow".to_string(),
        format!("127.0.0.1:{}", m.server.port),
    ];
    let (mut sql, mut http, mut plain, mut uuid, mut plain_single) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut sql_cpu, mut plain_cpu) = (vec![], vec![]);
    let n = cfg.p1_events;
    for run in 0..cfg.runs {
        // picloud SQL, picloud HTTP, the bigserial plain drain and the random-UUID reference,
        // rotating which goes first.
        for k in 0..4 {
            let side = (k + run) % 4;
            reset_queues(&mut c)?;
            match side {
                0 => {
                    bulk_enqueue(&mut c, m.app, m.noop, n)?;
                    exec(&mut c, "ANALYZE picloud.outbox")?;
                    settle(&mut c)?;
                    let (rate, cpu) = drain_with_supervisor(cfg, &mut c, "p1-sql", n, &[], notes)?;
                    let cpu_us = cpu * 1e6 / n as f64;
                    progress(&format!(
                        "P1 run {} picloud sql: {rate:.0} events/s, {cpu_us:.1} µs CPU/event",
                        run + 1
                    ));
                    sql.push(rate);
                    sql_cpu.push(cpu_us);
                }
                1 => {
                    bulk_enqueue(&mut c, m.app, m.http, cfg.p1_http_events)?;
                    exec(&mut c, "ANALYZE picloud.outbox")?;
                    settle(&mut c)?;
                    let before = m.server.hits.load(Ordering::Relaxed);
                    let (rate, _) = drain_with_supervisor(
                        cfg,
                        &mut c,
                        "p1-http",
                        cfg.p1_http_events,
                        &http_allow,
                        notes,
                    )?;
                    let hits = m.server.hits.load(Ordering::Relaxed) - before;
                    let dead = count(
                        &mut c,
                        &format!(
                            "SELECT count(*) FROM picloud.dead_letters WHERE script_id = '{}'",
                            m.http
                        ),
                    )?;
                    if hits as i64 != cfg.p1_http_events || dead > 0 {
                        notes.push(format!("P1 http run {}: server saw {hits} requests for {} events; {dead} dead letters",
                            run + 1, cfg.p1_http_events));
                    }
                    progress(&format!(
                        "P1 run {} picloud http: {rate:.0} events/s",
                        run + 1
                    ));
                    http.push(rate);
                }
                2 => {
                    bigserial_fill(&mut c, n)?;
                    exec(&mut c, "ANALYZE bench_outbox")?;
                    settle(&mut c)?;
                    let cpu = busy_cpu_secs();
                    let start = Instant::now();
                    plain_drain(cfg, 10, "bench_outbox", BIGSERIAL_DRAIN, true)?;
                    let rate = n as f64 / start.elapsed().as_secs_f64();
                    let cpu_us = (busy_cpu_secs() - cpu) * 1e6 / n as f64;
                    progress(&format!(
                        "P1 run {} plain bigserial, 10 clients: {rate:.0} events/s, {cpu_us:.1} µs CPU/event",
                        run + 1
                    ));
                    plain.push(rate);
                    plain_cpu.push(cpu_us);
                }
                _ => {
                    plain_fill(&mut c, m.app, n)?;
                    exec(&mut c, "ANALYZE bench_plain_outbox")?;
                    settle(&mut c)?;
                    let start = Instant::now();
                    plain_drain(cfg, 4, "bench_plain_outbox", &uuid_drain(100), false)?;
                    let rate = n as f64 / start.elapsed().as_secs_f64();
                    progress(&format!(
                        "P1 run {} plain uuid, 4 clients: {rate:.0} events/s",
                        run + 1
                    ));
                    uuid.push(rate);
                    // For reference only: the same drain one row per transaction from 8
                    // clients, i.e. picloud's transaction shape without picloud.
                    plain_fill(&mut c, m.app, n)?;
                    exec(&mut c, "ANALYZE bench_plain_outbox")?;
                    settle(&mut c)?;
                    let start = Instant::now();
                    plain_drain(cfg, 8, "bench_plain_outbox", &uuid_drain(1), false)?;
                    let rate = n as f64 / start.elapsed().as_secs_f64();
                    progress(&format!(
                        "P1 run {} plain uuid, 1 row per tx, 8 clients: {rate:.0} events/s",
                        run + 1
                    ));
                    plain_single.push(rate);
                }
            }
        }
    }
    let dead = count(&mut c, "SELECT count(*) FROM picloud.dead_letters")?;
    if dead > 0 {
        notes.push(format!("P1: {dead} events ended in the dead letters"));
    }
    reset_queues(&mut c)?;
    notes.push(format!(
        "P1 reference (not a target): the random-UUID plain drain deleting 1 row per transaction from 8 clients \
         (picloud's transaction shape) runs at {} ev/s (median); picloud sql reaches {:.2}× of that.",
        fmt_num(stat(&plain_single).median), stat(&sql).median / stat(&plain_single).median
    ));
    notes.push("P1 baseline (the target): 10 clients each running DELETE FROM bench_outbox WHERE id IN (SELECT id … ORDER BY run_at \
         LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING * (prepared) until the table is empty; picloud's figure includes the \
         supervisor's start-up. The random-UUID reference adds WHERE due_at <= now() to its sub-select so the partial index on \
         due rows (predicate due_at IS NOT NULL) can serve it, as picloud's claim does.".into());
    chart["p1"] = json!({"picloud_sql": stat_json(&sql), "picloud_http": stat_json(&http), "plain": stat_json(&plain)});
    let baseline = "plain DELETE…RETURNING ×100, bigserial, 10 cl.";
    Ok(vec![
        Row::new(
            "P1",
            &format!(
                "process {} ev, sql no-op handler, defaults",
                fmt_num(n as f64)
            ),
            "ev/s",
        )
        .value(&sql)
        .baseline(baseline, &plain, "ev/s")
        .ratio_of(&sql, &plain)
        .target("≥ 0.75× plain", median_ratio(&sql, &plain) >= 0.75),
        Row::new("P1", "  CPU per event (whole machine), sql no-op", "µs")
            .value(&sql_cpu)
            .baseline(baseline, &plain_cpu, "µs")
            .ratio_of(&sql_cpu, &plain_cpu),
        Row::new(
            "P1",
            &format!(
                "process {} ev, http no-op handler, defaults",
                fmt_num(cfg.p1_http_events as f64)
            ),
            "ev/s",
        )
        .value(&http)
        .baseline(baseline, &plain, "ev/s")
        .ratio_of(&http, &plain),
        Row::new(
            "P1",
            "reference: random-UUID plain outbox, sql no-op",
            "ev/s",
        )
        .value(&sql)
        .baseline("plain DELETE×100, uuid key, 4 cl.", &uuid, "ev/s")
        .ratio_of(&sql, &uuid),
    ])
}
