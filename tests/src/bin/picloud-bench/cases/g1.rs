//! G1: garbage collection of dead letters beside claims.

use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, ensure_db, exec, settle};
use crate::report::{fmt_num, Row};
use crate::setup::bulk_enqueue;
use crate::stats::stat;
use postgres::Client;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub struct ClaimSample {
    pub at_ms: f64,
    pub took_ms: f64,
}

/// Loops picloud_claim(10) on its own connection until `stop`, completing what it claims and
/// enqueueing as many new events so the outbox never runs dry.
pub fn claimer(
    mut c: Client,
    app: Uuid,
    script: Uuid,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Res<Vec<ClaimSample>> {
    let mut samples = vec![];
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let rows = c
            .query(
                "SELECT app_id, event_id FROM picloud.picloud_claim('bench-claimer', 10, 30000)",
                &[],
            )
            .map_err(pg_err("claim"))?;
        let took = start.elapsed();
        samples.push(ClaimSample {
            at_ms: start.duration_since(t0).as_secs_f64() * 1000.0,
            took_ms: took.as_secs_f64() * 1000.0,
        });
        let mut tx = c.transaction().map_err(pg_err("begin"))?;
        for r in &rows {
            let (a, e): (Uuid, Uuid) = (r.get(0), r.get(1));
            tx.execute(
                "SELECT picloud.picloud_complete($1, $2, 'bench-claimer')",
                &[&a, &e],
            )
            .map_err(pg_err("complete"))?;
        }
        let k = rows.len().max(1) as i64;
        tx.execute(
            "SELECT count(*) FROM picloud.picloud_enqueue_bulk($1, 'queue', 'x',
                 ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series(1, $2::bigint) g), $3)",
            &[&app, &k, &script],
        )
        .map_err(pg_err("refill"))?;
        tx.commit().map_err(pg_err("commit"))?;
    }
    Ok(samples)
}

pub fn bench_g1(cfg: &Cfg, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let db = format!("{}_gc", cfg.db);
    let mut c = ensure_db(cfg, &db)?;
    exec(&mut c, "CREATE OR REPLACE FUNCTION noop(e jsonb) RETURNS void LANGUAGE sql AS ''; DELETE FROM picloud.apps")?;
    let app: Uuid = c
        .query_one("SELECT picloud.picloud_create_app('gc')", &[])
        .map_err(pg_err("create app"))?
        .get(0);
    let script: Uuid = c
        .query_one(
            "SELECT picloud.picloud_create_script($1, 'noop', 'sql', 'noop')",
            &[&app],
        )
        .map_err(pg_err("create script"))?
        .get(0);
    let batch: i64 = 10_000;
    let n = cfg.g1_rows;
    let (mut rates, mut worst, mut batch_med, mut worst_before) = (vec![], vec![], vec![], vec![]);
    let mut pass_runs = 0;
    for run in 0..cfg.runs {
        exec(
            &mut c,
            "TRUNCATE picloud.dead_letters, picloud.outbox CASCADE",
        )?;
        c.execute(
            "INSERT INTO picloud.dead_letters (app_id, dead_letter_id, original_event_id, source, op, script_id, payload,
                 depth, attempt_count, first_attempt_at, last_attempt_at, last_error, created_at,
                 resolved_at, resolved_by, resolution)
             SELECT $1, gen_random_uuid(), gen_random_uuid(), 'queue', 'x', $2, jsonb_build_object('i', g),
                 0, 5, now() - interval '40 days', now() - interval '40 days', 'handler failed',
                 now() - interval '40 days' - g * interval '1 ms',
                 now() - interval '39 days', 'postgres', 'ignored'
             FROM generate_series(1, $3::bigint) g",
            &[&app, &script, &n],
        )
        .map_err(pg_err("insert dead letters"))?;
        exec(&mut c, "VACUUM ANALYZE picloud.dead_letters")?;
        bulk_enqueue(&mut c, app, script, 100)?;
        settle(&mut c)?;

        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let claim_client = connect(cfg, &db)?;
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::spawn(move || claimer(claim_client, app, script, t0, stop2));
        std::thread::sleep(Duration::from_secs(1));
        let gc_start = t0.elapsed().as_secs_f64() * 1000.0;
        let mut batches = vec![];
        let mut total = 0i64;
        let start = Instant::now();
        loop {
            let b0 = Instant::now();
            let done: i64 = c
                .query_one(
                    "SELECT picloud._gc_step('dead_letters', $1)",
                    &[&(batch as i32)],
                )
                .map_err(pg_err("_gc_step dead_letters"))?
                .get(0);
            batches.push(b0.elapsed().as_secs_f64() * 1000.0);
            total += done;
            if done < batch {
                break;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let gc_end = t0.elapsed().as_secs_f64() * 1000.0;
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let samples = handle
            .join()
            .map_err(|_| "claimer panicked".to_string())??;
        if total != n {
            notes.push(format!(
                "G1 run {}: GC removed {total} of {n} dead letters",
                run + 1
            ));
        }
        let during: Vec<f64> = samples
            .iter()
            .filter(|s| s.at_ms + s.took_ms >= gc_start && s.at_ms <= gc_end)
            .map(|s| s.took_ms)
            .collect();
        let before: Vec<f64> = samples
            .iter()
            .filter(|s| s.at_ms + s.took_ms < gc_start)
            .map(|s| s.took_ms)
            .collect();
        let w = during.iter().cloned().fold(0.0, f64::max);
        let med = stat(&batches).median;
        progress(&format!(
            "G1 run {}: {:.0} rows/s in {} batches (median batch {:.1} ms); {} claims during GC, worst {:.2} ms (before GC: worst {:.2} ms)",
            run + 1, total as f64 / elapsed, batches.len(), med, during.len(), w,
            before.iter().cloned().fold(0.0, f64::max)
        ));
        if w <= med {
            pass_runs += 1;
        }
        rates.push(total as f64 / elapsed);
        worst.push(w);
        batch_med.push(med);
        worst_before.push(before.iter().cloned().fold(0.0, f64::max));
    }
    notes.push(format!(
        "G1: worst claim in the second before GC started (no GC running): median {} ms.",
        fmt_num(stat(&worst_before).median)
    ));
    exec(
        &mut c,
        "TRUNCATE picloud.dead_letters, picloud.outbox CASCADE",
    )?;
    let rate = stat(&rates).median;
    Ok(vec![
        Row::new(
            "G1",
            &format!(
                "GC of {} resolved dead letters, batches of 10k",
                fmt_num(n as f64)
            ),
            "rows/s",
        )
        .value(&rates)
        .target("≥ 100,000 rows/s", rate >= 100_000.0),
        Row::new("G1", "worst picloud_claim(10) wait during GC", "ms")
            .value(&worst)
            .baseline("GC batch (median)", &batch_med, "ms")
            .ratio_of(&worst, &batch_med)
            .target(
                "≤ 1 GC batch",
                stat(&worst).median <= stat(&batch_med).median && pass_runs * 2 > cfg.runs,
            ),
    ])
}
