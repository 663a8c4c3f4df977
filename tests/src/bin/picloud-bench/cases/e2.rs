//! E2: bulk enqueue, 1,000 events per transaction: picloud_enqueue_bulk against an
//! `INSERT … SELECT` of the same payloads into the bigserial plain outbox; the random-UUID
//! plain outbox as a reference.

use super::order;
use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, settle};
use crate::report::{fmt_num, Row};
use crate::setup::{reset_queues, Main};
use crate::stats::median_ratio;
use std::time::Instant;

/// Events per transaction (one statement each, autocommit).
const PER_TX: i64 = 1_000;

pub fn bench_e2(cfg: &Cfg, m: &Main) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let n = cfg.e2_events;
    // Whole transactions of 1,000: n rounded up.
    let total = (n as u64).div_ceil(PER_TX as u64) as i64 * PER_TX;
    // Each side's statement is prepared once and run n / 1,000 times; $1 is the offset of
    // the batch in generate_series, so every side inserts the same payloads.
    let picloud = c
        .prepare(
            "SELECT count(*) FROM picloud.picloud_enqueue_bulk($2, 'queue', 'x',
                 ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series($1::bigint + 1, $1::bigint + 1000) g), $3)",
        )
        .map_err(pg_err("prepare enqueue_bulk"))?;
    let bigserial = c
        .prepare(
            "INSERT INTO bench_outbox (payload)
             SELECT jsonb_build_object('i', g) FROM generate_series($1::bigint + 1, $1::bigint + 1000) g",
        )
        .map_err(pg_err("prepare bigserial insert"))?;
    let uuid = c
        .prepare(
            "INSERT INTO bench_plain_outbox (app_id, source, op, payload)
             SELECT $2, 'queue', 'x', jsonb_build_object('i', g) FROM generate_series($1::bigint + 1, $1::bigint + 1000) g",
        )
        .map_err(pg_err("prepare uuid insert"))?;
    let (mut p, mut b, mut u) = (vec![], vec![], vec![]);
    for run in 0..cfg.runs {
        // picloud and the bigserial plain outbox in alternating order, the reference last.
        let mut steps = order(run).to_vec();
        steps.push(2);
        for side in steps {
            reset_queues(&mut c)?;
            settle(&mut c)?;
            let start = Instant::now();
            let mut inserted = 0i64;
            let mut offset = 0i64;
            while offset < n {
                inserted += match side {
                    0 => c
                        .query_one(&picloud, &[&offset, &m.app, &m.noop])
                        .map_err(pg_err("enqueue_bulk"))?
                        .get::<_, i64>(0),
                    1 => c
                        .execute(&bigserial, &[&offset])
                        .map_err(pg_err("bigserial bulk insert"))? as i64,
                    _ => c
                        .execute(&uuid, &[&offset, &m.app])
                        .map_err(pg_err("uuid bulk insert"))? as i64,
                };
                offset += PER_TX;
            }
            let rate = inserted as f64 / start.elapsed().as_secs_f64();
            if inserted != total {
                return Err(format!("E2: inserted {inserted} of {total}"));
            }
            progress(&format!(
                "E2 run {} {}: {:.0} events/s",
                run + 1,
                ["picloud", "plain bigserial", "plain uuid"][side],
                rate
            ));
            [&mut p, &mut b, &mut u][side].push(rate);
        }
    }
    reset_queues(&mut c)?;
    let what = format!(
        "bulk enqueue, {} events, {} per tx",
        fmt_num(total as f64),
        fmt_num(PER_TX as f64)
    );
    Ok(vec![
        Row::new("E2", &what, "ev/s")
            .value(&p)
            .baseline("INSERT…SELECT, bigserial", &b, "ev/s")
            .ratio_of(&p, &b)
            .target("≥ 0.80× plain", median_ratio(&p, &b) >= 0.8),
        Row::new("E2", "reference: random-UUID plain outbox", "ev/s")
            .value(&p)
            .baseline("INSERT…SELECT, uuid key", &u, "ev/s")
            .ratio_of(&p, &u),
    ])
}
