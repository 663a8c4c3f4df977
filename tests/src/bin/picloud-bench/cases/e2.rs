//! E2: bulk enqueue.

use super::order;
use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, settle};
use crate::report::{fmt_num, Row};
use crate::setup::{reset_queues, Main};
use crate::stats::median_ratio;
use std::time::Instant;

pub fn bench_e2(cfg: &Cfg, m: &Main) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let n = cfg.e2_events;
    let (mut p, mut b) = (vec![], vec![]);
    for run in 0..cfg.runs {
        for side in order(run) {
            reset_queues(&mut c)?;
            settle(&mut c)?;
            let start = Instant::now();
            let inserted: i64 = if side == 0 {
                c.query_one(
                    "SELECT count(*) FROM picloud.picloud_enqueue_bulk($1, 'queue', 'x',
                         ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series(1, $2::bigint) g), $3)",
                    &[&m.app, &n, &m.noop],
                )
                .map_err(pg_err("enqueue_bulk"))?
                .get(0)
            } else {
                c.execute(
                    "INSERT INTO bench_plain_outbox (app_id, source, op, payload)
                     SELECT $1, 'queue', 'x', jsonb_build_object('i', g) FROM generate_series(1, $2::bigint) g",
                    &[&m.app, &n],
                )
                .map_err(pg_err("plain bulk insert"))? as i64
            };
            let rate = inserted as f64 / start.elapsed().as_secs_f64();
            if inserted != n {
                return Err(format!("E2: inserted {inserted} of {n}"));
            }
            progress(&format!(
                "E2 run {} {}: {:.0} events/s",
                run + 1,
                if side == 0 { "picloud" } else { "plain" },
                rate
            ));
            if side == 0 {
                p.push(rate)
            } else {
                b.push(rate)
            }
        }
    }
    reset_queues(&mut c)?;
    Ok(vec![Row::new(
        "E2",
        &format!("bulk enqueue, {} events in 1 call", fmt_num(n as f64)),
        "ev/s",
    )
    .value(&p)
    .baseline("INSERT…SELECT", &b, "ev/s")
    .ratio_of(&p, &b)
    .target("≥ 0.80× plain", median_ratio(&p, &b) >= 0.8)])
}
