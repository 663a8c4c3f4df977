//! L1: wake-up latency.

use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, count, exec, settle, supervisor_idle};
use crate::harness;
use crate::report::{fmt_num, Row};
use crate::setup::{reset_queues, Main};
use crate::stats::{percentile, stat, stat_json};
use postgres::Client;
use serde_json::{json, Value};
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

pub fn bench_l1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>, chart: &mut Value) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    exec(&mut c, "VACUUM")?;
    wait_for_quiet(&mut c)?;
    let (mut p50, mut p99, mut post50, mut post99, mut over20) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..cfg.runs {
        reset_queues(&mut c)?;
        exec(&mut c, "TRUNCATE lat, lat_sent")?;
        settle(&mut c)?;
        let mut sup = harness::start(cfg, &cfg.db, "l1", &[])?;
        // Wait until it has gone idle (its claims come back empty) and past its re-check.
        let start = Instant::now();
        while !supervisor_idle(&mut c) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        if let Some(e) = harness::exited(&mut sup) {
            return Err(e);
        }
        let mut client_commit: Vec<(Uuid, f64)> = Vec::with_capacity(cfg.l1_samples);
        let t0 = Instant::now();
        for i in 0..cfg.l1_samples {
            let due = t0 + Duration::from_millis(cfg.l1_gap_ms * i as u64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let mut tx = c.transaction().map_err(pg_err("begin"))?;
            let id: Uuid = tx
                .query_one(
                    "SELECT picloud.picloud_enqueue($1, 'queue', 'lat', '{}'::jsonb, $2)",
                    &[&m.app, &m.stamp],
                )
                .map_err(pg_err("enqueue"))?
                .get(0);
            tx.execute(
                "INSERT INTO lat_sent (event_id, sent) VALUES ($1, clock_timestamp())",
                &[&id],
            )
            .map_err(pg_err("record send time"))?;
            tx.commit().map_err(pg_err("commit"))?;
            client_commit.push((id, epoch_ms(SystemTime::now())));
        }
        let done = Instant::now();
        let n = cfg.l1_samples as i64;
        while count(&mut c, "SELECT count(*) FROM lat")? < n
            && done.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        harness::stop(&mut sup);
        let rows = c
            .query(
                "SELECT s.event_id, extract(epoch FROM l.started - s.sent)::float8 * 1000,
                        extract(epoch FROM l.started)::float8 * 1000
                 FROM lat_sent s JOIN lat l USING (event_id)",
                &[],
            )
            .map_err(pg_err("read latencies"))?;
        if (rows.len() as i64) < n {
            notes.push(format!(
                "L1 run {}: only {} of {n} events were handled within 30 s",
                run + 1,
                rows.len()
            ));
        }
        let commit_by_id: std::collections::HashMap<Uuid, f64> =
            client_commit.into_iter().collect();
        let pre: Vec<f64> = rows.iter().map(|r| r.get::<_, f64>(1)).collect();
        let post: Vec<f64> = rows
            .iter()
            .filter_map(|r| {
                commit_by_id
                    .get(&r.get::<_, Uuid>(0))
                    .map(|t| r.get::<_, f64>(2) - t)
            })
            .collect();
        let slow =
            pre.iter().filter(|x| **x > 20.0).count() as f64 * 100.0 / pre.len().max(1) as f64;
        progress(&format!(
            "L1 run {}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({slow:.0}% over 20 ms)",
            run + 1,
            percentile(&pre, 50.0),
            percentile(&pre, 99.0),
            percentile(&pre, 100.0)
        ));
        p50.push(percentile(&pre, 50.0));
        p99.push(percentile(&pre, 99.0));
        post50.push(percentile(&post, 50.0));
        post99.push(percentile(&post, 99.0));
        over20.push(slow);
        for problem in sup.problems().iter().take(1) {
            notes.push(format!("L1 run {}: supervisor logged: {problem}", run + 1));
        }
    }
    notes.push(format!(
        "L1: measured from clock_timestamp() taken as the last statement before COMMIT (so the commit's WAL flush is included). \
         Measured instead from the client's clock right after COMMIT returned: p50 {} ms, p99 {} ms. \
         Share of samples over 20 ms: {}%.",
        fmt_num(stat(&post50).median), fmt_num(stat(&post99).median), fmt_num(stat(&over20).median)
    ));
    reset_queues(&mut c)?;
    chart["l1"] = json!({"p50": stat_json(&p50), "p99": stat_json(&p99)});
    let samples = format!("{} samples {} ms apart", cfg.l1_samples, cfg.l1_gap_ms);
    Ok(vec![
        Row::new("L1", &format!("wake-up latency p50, {samples}"), "ms")
            .value(&p50)
            .target("≤ 2.0 ms", stat(&p50).median <= 2.0),
        Row::new("L1", &format!("wake-up latency p99, {samples}"), "ms")
            .value(&p99)
            .target("≤ 3.5 ms", stat(&p99).median <= 3.5),
    ])
}
