//! B1: outbox bloat and autovacuum.

use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, exec, settle};
use crate::harness;
use crate::report::{fmt_num, Row};
use crate::setup::{bulk_enqueue, reset_queues, Main};
use crate::stats::stat;
use postgres::Client;
use std::time::{Duration, Instant};

pub struct OutboxSize {
    pub total_kb: f64,
    pub heap_kb: f64,
    /// Heap with its free-space and visibility maps (pg_table_size): what autovacuum gives
    /// back. Indexes keep their emptied pages for reuse and are reported apart.
    pub table_kb: f64,
    pub dead: i64,
    pub autovacuums: i64,
}

pub fn outbox_size(c: &mut Client) -> Res<OutboxSize> {
    exec(c, "SELECT pg_stat_clear_snapshot()")?;
    let r = c
        .query_one(
            "SELECT pg_total_relation_size('picloud.outbox')::float8 / 1024, pg_relation_size('picloud.outbox')::float8 / 1024,
                    coalesce(s.n_dead_tup, 0), coalesce(s.autovacuum_count, 0),
                    pg_table_size('picloud.outbox')::float8 / 1024
             FROM pg_stat_user_tables s WHERE s.relid = 'picloud.outbox'::regclass",
            &[],
        )
        .map_err(pg_err("outbox size"))?;
    Ok(OutboxSize {
        total_kb: r.get(0),
        heap_kb: r.get(1),
        dead: r.get(2),
        autovacuums: r.get(3),
        table_kb: r.get(4),
    })
}

pub fn bench_b1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let (mut before, mut after, mut settled, mut waited) = (vec![], vec![], vec![], vec![]);
    let (mut dead_before, mut dead_after, mut dead_settled, mut heap_settled) =
        (vec![], vec![], vec![], vec![]);
    let mut ratios = vec![];
    let mut total_settled = vec![];
    let mut pass_runs = 0;
    for run in 0..cfg.runs {
        reset_queues(&mut c)?;
        std::thread::sleep(Duration::from_millis(1500)); // let the statistics catch up
        let b = outbox_size(&mut c)?;
        bulk_enqueue(&mut c, m.app, m.noop, cfg.b1_events)?;
        settle(&mut c)?;
        let mut sup = harness::start(cfg, &cfg.db, "b1", &[])?;
        harness::wait_empty(&mut c, "picloud.outbox", &mut sup, cfg.drain_timeout)?;
        harness::stop(&mut sup);
        std::thread::sleep(Duration::from_millis(1500)); // supervisor backends flush their statistics on exit
        let a = outbox_size(&mut c)?;
        // Poll until the size is back within 2x, or autovacuum has processed the outbox since
        // the run ended and the size has stopped changing, or the wait is over.
        let start = Instant::now();
        // The table (heap) must come back within 2x its starting size; an emptied table
        // starts at a few pages, so the bound has a floor of 64 kB.
        let limit = (2.0 * b.table_kb).max(64.0);
        let mut s = outbox_size(&mut c)?;
        let mut vacuumed_at: Option<f64> = None;
        while s.table_kb > limit && start.elapsed() < cfg.b1_wait {
            if vacuumed_at.is_none() && s.autovacuums > a.autovacuums {
                vacuumed_at = Some(start.elapsed().as_secs_f64());
            }
            if vacuumed_at.is_some_and(|t| start.elapsed().as_secs_f64() > t + 3.0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            s = outbox_size(&mut c)?;
        }
        let wait = start.elapsed().as_secs_f64();
        progress(&format!(
            "B1 run {}: size {:.0} kB -> {:.0} kB after {} events (n_dead_tup {} -> {}) -> {:.0} kB (heap {:.0} kB, n_dead_tup {}) after {:.1} s; autovacuum of the outbox after the run: {}",
            run + 1, b.total_kb, a.total_kb, cfg.b1_events, b.dead, a.dead, s.total_kb, s.heap_kb, s.dead, wait,
            match vacuumed_at { Some(t) => format!("seen after {t:.1} s"), None if s.autovacuums > a.autovacuums => "yes".into(), None => "none".into() }
        ));
        if s.autovacuums == a.autovacuums {
            notes.push(format!("B1 run {}: autovacuum did not process picloud.outbox within {:.0} s after the run (autovacuum_naptime applies)", run + 1, wait));
        }
        if s.table_kb <= limit {
            pass_runs += 1;
        }
        before.push(b.table_kb);
        after.push(a.table_kb);
        settled.push(s.table_kb);
        total_settled.push(s.total_kb);
        heap_settled.push(s.heap_kb);
        waited.push(wait);
        dead_before.push(b.dead as f64);
        dead_after.push(a.dead as f64);
        dead_settled.push(s.dead as f64);
        ratios.push(s.table_kb / b.table_kb.max(32.0));
    }
    reset_queues(&mut c)?;
    let ev = fmt_num(cfg.b1_events as f64);
    let mut settled_row = Row::new("B1", "outbox table size after autovacuum", "kB")
        .value(&settled)
        .baseline("before", &before, "kB")
        .target(
            &format!(
                "≤ 2× before, floor 64 kB (waited ≤ {} s)",
                cfg.b1_wait.as_secs()
            ),
            pass_runs * 2 > cfg.runs,
        );
    settled_row.ratio = Some(stat(&ratios));
    Ok(vec![
        Row::new(
            "B1",
            &format!("outbox table size right after {ev} events"),
            "kB",
        )
        .value(&after)
        .baseline("before", &before, "kB"),
        Row::new(
            "B1",
            &format!("outbox n_dead_tup right after {ev} events"),
            "",
        )
        .value(&dead_after)
        .baseline("before", &dead_before, ""),
        settled_row,
        Row::new("B1", "  of which heap, after autovacuum", "kB").value(&heap_settled),
        Row::new(
            "B1",
            "  with indexes (pages kept for reuse), after autovacuum",
            "kB",
        )
        .value(&total_settled),
        Row::new("B1", "outbox n_dead_tup after autovacuum", "").value(&dead_settled),
        Row::new("B1", "waited (size back, or autovacuum done)", "s").value(&waited),
    ])
}
