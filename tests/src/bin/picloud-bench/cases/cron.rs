//! C1, C2: cron.

use super::order;
use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, exec, pgbench, settle};
use crate::harness;
use crate::report::Row;
use crate::setup::{reset_queues, Main};
use crate::stats::{median_ratio, percentile};
use postgres::Client;
use std::time::Duration;
use uuid::Uuid;

/// An app of its own for the cron cases (dropped and made afresh).
pub fn cron_app(c: &mut Client, name: &str, handler: &str) -> Res<(Uuid, Uuid)> {
    exec(
        c,
        &format!("SELECT picloud.picloud_drop_app(app_id) FROM picloud.apps WHERE name = '{name}'"),
    )?;
    let app: Uuid = c
        .query_one("SELECT picloud.picloud_create_app($1)", &[&name])
        .map_err(pg_err("create cron app"))?
        .get(0);
    let script: Uuid = c
        .query_one(
            "SELECT picloud.picloud_create_script($1, 'cron', 'sql', $2)",
            &[&app, &handler],
        )
        .map_err(pg_err("create cron script"))?
        .get(0);
    Ok((app, script))
}

/// C1: how late cron ticks start on an idle system: 100 triggers every second, lateness =
/// the handler's start (clock_timestamp() in the handler) minus the tick's scheduled_for.
pub fn bench_c1(cfg: &Cfg, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    exec(
        &mut c,
        "DROP TABLE IF EXISTS cron_late;
         CREATE TABLE cron_late (ms double precision NOT NULL);
         CREATE OR REPLACE FUNCTION cron_late(e jsonb) RETURNS void LANGUAGE sql AS $$
             INSERT INTO cron_late VALUES (extract(epoch FROM clock_timestamp()
                 - (e->'payload'->>'scheduled_for')::timestamptz) * 1000) $$;",
    )?;
    reset_queues(&mut c)?;
    let mut sup = harness::start(cfg, &cfg.db, "c1", &[])?;
    let (app, script) = cron_app(&mut c, "bench-cron", "cron_late")?;
    c.execute(
        "SELECT picloud.picloud_create_cron_trigger($1, 'every 1 second', $2) FROM generate_series(1, 100)",
        &[&app, &script],
    )
    .map_err(pg_err("create 100 cron triggers"))?;
    // The first ticks of new triggers wait for the supervisor's first claims: measure after.
    std::thread::sleep(Duration::from_secs(2));
    exec(&mut c, "TRUNCATE cron_late")?;
    let secs: u64 = if cfg.quick { 10 } else { 60 };
    progress(&format!("C1: 100 cron triggers every second for {secs} s"));
    std::thread::sleep(Duration::from_secs(secs));
    exec(&mut c, &format!("SELECT picloud.picloud_drop_app('{app}')"))?;
    if let Some(e) = harness::exited(&mut sup) {
        return Err(e);
    }
    harness::stop(&mut sup);
    let samples: Vec<f64> = c
        .query("SELECT ms FROM cron_late", &[])
        .map_err(pg_err("read lateness"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if samples.is_empty() {
        return Err("no cron tick ran".into());
    }
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    notes.push(format!(
        "C1: {} ticks of 100 every-second cron triggers in {secs} s, one window (not 3 runs); lateness = handler start - scheduled_for.",
        samples.len()
    ));
    Ok(vec![
        Row::new("C1", "cron tick lateness p50, 100 triggers/s", "ms").value(&[p50]),
        Row::new("C1", "cron tick lateness p99, 100 triggers/s", "ms")
            .value(&[p99])
            .target("p99 < 50 ms", p99 < 50.0),
    ])
}

/// C2: E1 with 10,000 idle cron triggers in the database against E1 without them.
pub fn bench_c2(cfg: &Cfg, m: &Main) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    exec(
        &mut c,
        "CREATE OR REPLACE FUNCTION cron_idle(e jsonb) RETURNS void LANGUAGE sql AS ''",
    )?;
    let script = format!(
        "SELECT picloud.picloud_enqueue('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb, '{}'::uuid);\n",
        m.app, m.noop
    );
    let (mut with, mut without) = (vec![], vec![]);
    for run in 0..cfg.runs {
        for side in order(run) {
            reset_queues(&mut c)?;
            if side == 0 {
                let (app, cron) = cron_app(&mut c, "bench-cron-idle", "cron_idle")?;
                // Yearly: present and armed, not firing during the run.
                c.execute(
                    "SELECT picloud.picloud_create_cron_trigger($1, '0 0 1 1 *', $2) FROM generate_series(1, 10000)",
                    &[&app, &cron],
                )
                .map_err(pg_err("create 10,000 cron triggers"))?;
            } else {
                exec(
                    &mut c,
                    "SELECT picloud.picloud_drop_app(app_id) FROM picloud.apps WHERE name = 'bench-cron-idle'",
                )?;
            }
            settle(&mut c)?;
            let name = if side == 0 { "c2_with" } else { "c2_without" };
            let r = pgbench(cfg, &cfg.db, name, &script, 4, 2, cfg.e1_secs, "simple")?;
            progress(&format!("C2 run {} {name}: {:.0} tps", run + 1, r.tps));
            if side == 0 {
                with.push(r.tps)
            } else {
                without.push(r.tps)
            }
        }
    }
    exec(
        &mut c,
        "SELECT picloud.picloud_drop_app(app_id) FROM picloud.apps WHERE name = 'bench-cron-idle'",
    )?;
    reset_queues(&mut c)?;
    Ok(vec![Row::new("C2", "E1 with 10,000 cron triggers", "tx/s")
        .value(&with)
        .baseline("E1 without", &without, "tx/s")
        .ratio_of(&with, &without)
        .target("≥ 0.97×", median_ratio(&with, &without) >= 0.97)])
}
