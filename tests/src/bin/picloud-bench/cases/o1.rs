//! O1: ordered delivery. P1's drain (sql no-op handler, one supervisor at its defaults) of
//! events with ordering keys over 1,000 and over 10 keys, against the same number of unordered
//! events in the same run; and E1 (one enqueue per transaction, 4 pgbench clients) with an
//! ordering key against E1 without.

use super::p1::drain_with_supervisor;
use crate::config::{pg_err, progress, Cfg, Res};
use crate::db::{connect, exec, pgbench, settle};
use crate::report::{fmt_num, Row};
use crate::setup::{bulk_enqueue, reset_queues, Main};
use crate::stats::median_ratio;
use postgres::Client;
use uuid::Uuid;

/// Enqueues `n` events whose ordering keys cycle through `keys` keys, in batches (each key's
/// events in enqueue order).
fn ordered_enqueue(c: &mut Client, app: Uuid, script: Uuid, n: i64, keys: i64) -> Res<()> {
    let mut done = 0i64;
    while done < n {
        let k = (n - done).min(10_000);
        c.execute(
            "SELECT count(*) FROM picloud.picloud_enqueue_bulk($1, 'queue', 'x',
                 ARRAY(SELECT jsonb_build_object('i', g) FROM generate_series($2::bigint + 1, $2::bigint + $3::bigint) g), $4,
                 p_ordering_keys => ARRAY(SELECT 'k' || (g % $5::bigint) FROM generate_series($2::bigint + 1, $2::bigint + $3::bigint) g))",
            &[&app, &done, &k, &script, &keys],
        )
        .map_err(pg_err("ordered enqueue_bulk"))?;
        done += k;
    }
    Ok(())
}

pub fn bench_o1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    // A fortieth of P1's events (5,000): ordered events run one per key per lane batch, so a
    // drain over 10 keys is far slower than the unordered one.
    let n = (cfg.p1_events / 40).max(1_000);
    let (mut unordered, mut keys_1000, mut keys_10) = (vec![], vec![], vec![]);
    for run in 0..cfg.runs {
        for k in 0..3 {
            let side = (k + run) % 3;
            reset_queues(&mut c)?;
            match side {
                0 => bulk_enqueue(&mut c, m.app, m.noop, n)?,
                1 => ordered_enqueue(&mut c, m.app, m.noop, n, 1_000)?,
                _ => ordered_enqueue(&mut c, m.app, m.noop, n, 10)?,
            }
            exec(&mut c, "ANALYZE picloud.outbox")?;
            settle(&mut c)?;
            let tag = ["o1-unordered", "o1-keys-1000", "o1-keys-10"][side];
            let (rate, _) = drain_with_supervisor(cfg, &mut c, tag, n, &[], notes)?;
            progress(&format!("O1 run {} {tag}: {rate:.0} events/s", run + 1));
            [&mut unordered, &mut keys_1000, &mut keys_10][side].push(rate);
        }
    }

    let plain = format!(
        "SELECT picloud.picloud_enqueue('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb, '{}'::uuid);\n",
        m.app, m.noop
    );
    let keyed = format!(
        "\\set key random(1, 1000)\nSELECT picloud.picloud_enqueue('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb, '{}'::uuid, p_ordering_key => 'k' || :key);\n",
        m.app, m.noop
    );
    let (mut e1_plain, mut e1_keyed) = (vec![], vec![]);
    for run in 0..cfg.runs {
        for side in super::order(run) {
            reset_queues(&mut c)?;
            settle(&mut c)?;
            let (name, script) = if side == 0 {
                ("o1_e1_keyed", &keyed)
            } else {
                ("o1_e1_plain", &plain)
            };
            let r = pgbench(cfg, &cfg.db, name, script, 4, 2, cfg.e1_secs, "simple")?;
            if r.failed > 0 {
                notes.push(format!(
                    "O1 run {}: {name}: {} failed transactions",
                    run + 1,
                    r.failed
                ));
            }
            progress(&format!("O1 run {} {name}: {:.0} tps", run + 1, r.tps));
            if side == 0 {
                e1_keyed.push(r.tps);
            } else {
                e1_plain.push(r.tps);
            }
        }
    }
    reset_queues(&mut c)?;
    notes.push(
        "O1: the ordered drains enqueue with picloud_enqueue_bulk(..., p_ordering_keys => one of 1,000 or 10 keys per \
         event, cycling); the sql lanes take each key's first event (one event per key per batch); E1 keyed \
         draws one of 1,000 keys per transaction (the enqueue fast path takes the key's lock and place)."
            .into(),
    );
    let drained = fmt_num(n as f64);
    Ok(vec![
        Row::new(
            "O1",
            &format!("process {drained} ev with 1,000 ordering keys"),
            "ev/s",
        )
        .value(&keys_1000)
        .baseline("the same, unordered", &unordered, "ev/s")
        .ratio_of(&keys_1000, &unordered)
        .target(
            "≥ 0.5× unordered",
            median_ratio(&keys_1000, &unordered) >= 0.5,
        ),
        Row::new(
            "O1",
            &format!("process {drained} ev with 10 ordering keys"),
            "ev/s",
        )
        .value(&keys_10)
        .baseline("the same, unordered", &unordered, "ev/s")
        .ratio_of(&keys_10, &unordered),
        Row::new("O1", "enqueue with an ordering key, 4 clients", "tx/s")
            .value(&e1_keyed)
            .baseline("E1 without a key", &e1_plain, "tx/s")
            .ratio_of(&e1_keyed, &e1_plain)
            .target("≥ 0.90× without", median_ratio(&e1_keyed, &e1_plain) >= 0.9),
    ])
}
