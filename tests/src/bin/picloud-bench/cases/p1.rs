//! P1: processing throughput.

use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, count, exec, settle};
use crate::harness;
use crate::report::{fmt_num, Row};
use crate::setup::{bulk_enqueue, plain_fill, reset_queues, Main};
use crate::stats::{median_ratio, stat, stat_json};
use postgres::Client;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::Instant;

/// Drains `n` pre-enqueued events through a fresh supervisor; returns events/s.
pub fn drain_with_supervisor(
    cfg: &Cfg,
    c: &mut Client,
    tag: &str,
    n: i64,
    extra: &[String],
    notes: &mut Vec<String>,
) -> Res<f64> {
    let start = Instant::now();
    let mut sup = harness::start(cfg, &cfg.db, tag, extra)?;
    harness::wait_empty(c, "picloud.outbox", &mut sup, cfg.drain_timeout)?;
    let elapsed = start.elapsed().as_secs_f64();
    harness::stop(&mut sup);
    let problems = sup.problems();
    if !problems.is_empty() {
        notes.push(format!(
            "{tag}: supervisor logged {} warning/error lines, e.g. {}",
            problems.len(),
            problems[0]
        ));
    }
    Ok(n as f64 / elapsed)
}

pub fn plain_drain(cfg: &Cfg, clients: usize, batch: i64) -> Res<()> {
    let barrier = Arc::new(Barrier::new(clients));
    let mut handles = vec![];
    for _ in 0..clients {
        let mut c = connect(cfg, &cfg.db)?;
        let barrier = Arc::clone(&barrier);
        handles.push(std::thread::spawn(move || -> Res<()> {
            let sql = format!(
                "DELETE FROM bench_plain_outbox WHERE id IN (
                     SELECT id FROM bench_plain_outbox WHERE due_at <= now()
                     ORDER BY due_at LIMIT {batch} FOR UPDATE SKIP LOCKED)"
            );
            barrier.wait();
            loop {
                let n = c.execute(&sql, &[]).map_err(pg_err("plain delete"))?;
                if n == 0 && count(&mut c, "SELECT count(*) FROM bench_plain_outbox")? == 0 {
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

pub fn bench_p1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>, chart: &mut Value) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let http_allow = vec![
        "--http-allow".to_string(),
        format!("127.0.0.1:{}", m.server.port),
    ];
    let (mut sql, mut http, mut plain, mut plain_single) = (vec![], vec![], vec![], vec![]);
    for run in 0..cfg.runs {
        // picloud SQL, picloud HTTP and plain, rotating which goes first.
        for k in 0..3 {
            let side = (k + run) % 3;
            reset_queues(&mut c)?;
            match side {
                0 => {
                    bulk_enqueue(&mut c, m.app, m.noop, cfg.p1_events)?;
                    exec(&mut c, "ANALYZE picloud.outbox")?;
                    settle(&mut c)?;
                    let rate =
                        drain_with_supervisor(cfg, &mut c, "p1-sql", cfg.p1_events, &[], notes)?;
                    progress(&format!(
                        "P1 run {} picloud sql: {rate:.0} events/s",
                        run + 1
                    ));
                    sql.push(rate);
                }
                1 => {
                    bulk_enqueue(&mut c, m.app, m.http, cfg.p1_http_events)?;
                    exec(&mut c, "ANALYZE picloud.outbox")?;
                    settle(&mut c)?;
                    let before = m.server.hits.load(Ordering::Relaxed);
                    let rate = drain_with_supervisor(
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
                _ => {
                    plain_fill(&mut c, m.app, cfg.p1_events)?;
                    exec(&mut c, "ANALYZE bench_plain_outbox")?;
                    settle(&mut c)?;
                    let start = Instant::now();
                    plain_drain(cfg, 4, 100)?;
                    let rate = cfg.p1_events as f64 / start.elapsed().as_secs_f64();
                    progress(&format!("P1 run {} plain: {rate:.0} events/s", run + 1));
                    plain.push(rate);
                    // For reference only: the same drain one row per transaction from 8
                    // clients, i.e. picloud's transaction shape without picloud.
                    plain_fill(&mut c, m.app, cfg.p1_events)?;
                    exec(&mut c, "ANALYZE bench_plain_outbox")?;
                    settle(&mut c)?;
                    let start = Instant::now();
                    plain_drain(cfg, 8, 1)?;
                    let rate = cfg.p1_events as f64 / start.elapsed().as_secs_f64();
                    progress(&format!(
                        "P1 run {} plain, 1 row per tx, 8 clients: {rate:.0} events/s",
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
        "P1 reference (not a target): the plain drain deleting 1 row per transaction from 8 clients (picloud's \
         transaction shape) runs at {} ev/s (median); picloud sql reaches {:.2}× of that.",
        fmt_num(stat(&plain_single).median), stat(&sql).median / stat(&plain_single).median
    ));
    chart["p1"] = json!({"picloud_sql": stat_json(&sql), "picloud_http": stat_json(&http), "plain": stat_json(&plain)});
    Ok(vec![
        Row::new(
            "P1",
            &format!(
                "process {} ev, sql no-op handler, defaults",
                fmt_num(cfg.p1_events as f64)
            ),
            "ev/s",
        )
        .value(&sql)
        .baseline("plain DELETE×100, 4 cl.", &plain, "ev/s")
        .ratio_of(&sql, &plain)
        .target("≥ 0.50× plain", median_ratio(&sql, &plain) >= 0.5),
        Row::new(
            "P1",
            &format!(
                "process {} ev, http no-op handler, defaults",
                fmt_num(cfg.p1_http_events as f64)
            ),
            "ev/s",
        )
        .value(&http)
        .baseline("plain DELETE×100, 4 cl.", &plain, "ev/s")
        .ratio_of(&http, &plain),
    ])
}
