//! E1: enqueue, one event per transaction.

use super::order;
use crate::config::{progress, Cfg, Res};
use crate::db::{connect, pgbench, settle, supervisor_idle};
use crate::report::Row;
use crate::setup::{reset_queues, Main};
use crate::stats::median_ratio;

pub fn bench_e1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let picloud_script = format!(
        "SELECT picloud.picloud_enqueue('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb, '{}'::uuid);\n",
        m.app, m.noop
    );
    let plain_script = format!(
        "INSERT INTO bench_plain_outbox (app_id, source, op, payload) VALUES ('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb);\n",
        m.app
    );
    notes.push(format!(
        "E1: wake-up flag (picloud_supervisor_idle) at start = {}; when true every enqueue also sends a NOTIFY at commit.",
        supervisor_idle(&mut c)
    ));
    // Untimed warm-up of both sides: a fresh cluster creates its WAL segment files as the
    // first writes need them (later runs recycle them), and caches start cold; without it the
    // side that runs first pays for that (in each of three E1 measurements without it, the
    // first run's ratio was the lowest of its three).
    let warm_up_secs = (cfg.e1_secs / 4).max(1);
    for (name, script) in [
        ("e1_warm_up_picloud", &picloud_script),
        ("e1_warm_up_plain", &plain_script),
    ] {
        reset_queues(&mut c)?;
        pgbench(cfg, &cfg.db, name, script, 4, 2, warm_up_secs)?;
    }
    notes.push(format!(
        "E1: both sides warmed up first, untimed ({warm_up_secs} s each)."
    ));
    let (mut p, mut b) = (vec![], vec![]);
    for run in 0..cfg.runs {
        for side in order(run) {
            reset_queues(&mut c)?;
            settle(&mut c)?;
            let (name, script) = if side == 0 {
                ("e1_picloud", &picloud_script)
            } else {
                ("e1_plain", &plain_script)
            };
            let r = pgbench(cfg, &cfg.db, name, script, 4, 2, cfg.e1_secs)?;
            if r.failed > 0 {
                notes.push(format!(
                    "E1 run {}: {name}: {} failed transactions",
                    run + 1,
                    r.failed
                ));
            }
            progress(&format!(
                "E1 run {} {name}: {:.0} tps ({} txns)",
                run + 1,
                r.tps,
                r.txns
            ));
            if side == 0 {
                p.push(r.tps)
            } else {
                b.push(r.tps)
            }
        }
    }
    reset_queues(&mut c)?;
    Ok(vec![Row::new("E1", "enqueue, 1 per tx, 4 clients", "tx/s")
        .value(&p)
        .baseline("plain INSERT", &b, "tx/s")
        .ratio_of(&p, &b)
        .target("≥ 0.90× plain", median_ratio(&p, &b) >= 0.9)])
}
