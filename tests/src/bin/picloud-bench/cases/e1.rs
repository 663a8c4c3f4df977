//! E1: enqueue, one event per transaction, 4 pgbench clients: picloud against the bigserial
//! plain outbox in pgbench's simple and prepared protocols (each with its own target), with
//! WAL and CPU per event; the random-UUID plain outbox as a reference, and picloud enqueued by a
//! tenant's producer role (through row-level security, which the superuser passes by).

use super::order;
use crate::config::{progress, Cfg, Res};
use crate::db::{connect, pgbench, pgbench_as, settle, supervisor_idle, Meter, Shape};
use crate::report::{fmt_num, Row};
use crate::setup::{reset_queues, Main, PRODUCER};
use crate::stats::{median_ratio, stat};

/// The figures of one pgbench run.
#[derive(Default)]
struct Runs {
    tps: Vec<f64>,
    /// WAL bytes per transaction (one event each).
    wal: Vec<f64>,
    /// Busy CPU microseconds of the whole machine per transaction.
    cpu_us: Vec<f64>,
}

pub fn bench_e1(cfg: &Cfg, m: &Main, notes: &mut Vec<String>) -> Res<Vec<Row>> {
    let mut c = connect(cfg, &cfg.db)?;
    let picloud_script = format!(
        "SELECT picloud.picloud_enqueue('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb, '{}'::uuid);\n",
        m.app, m.noop
    );
    let bigserial_script = "INSERT INTO bench_outbox (payload) VALUES ('{\"n\":1}');\n".to_string();
    let uuid_script = format!(
        "INSERT INTO bench_plain_outbox (app_id, source, op, payload) VALUES ('{}'::uuid, 'queue', 'x', '{{\"n\":1}}'::jsonb);\n",
        m.app
    );
    notes.push(format!(
        "E1: wake-up flag (picloud_supervisor_idle) at start = {}; when true every enqueue also sends a NOTIFY at commit.",
        supervisor_idle(&mut c)
    ));
    // Untimed warm-up of every side: a fresh cluster creates its WAL segment files as the
    // first writes need them (later runs recycle them), and caches start cold; without it the
    // side that runs first pays for that (in each of three E1 measurements without it, the
    // first run's ratio was the lowest of its three).
    let warm_up_secs = (cfg.e1_secs / 4).max(1);
    for (name, script) in [
        ("e1_warm_up_picloud", &picloud_script),
        ("e1_warm_up_bigserial", &bigserial_script),
        ("e1_warm_up_uuid", &uuid_script),
    ] {
        reset_queues(&mut c)?;
        pgbench(cfg, &cfg.db, name, script, 4, 2, warm_up_secs, "simple")?;
    }
    notes.push(format!(
        "E1: every side warmed up first, untimed ({warm_up_secs} s each)."
    ));
    // [protocol][side]: side 0 picloud, 1 the bigserial plain INSERT; then the reference.
    let protocols = ["simple", "prepared"];
    let mut runs: [[Runs; 2]; 2] = Default::default();
    let mut uuid = Runs::default();
    let mut producer = Runs::default();
    for run in 0..cfg.runs {
        // Both protocols in every run, which one first alternating between runs, and within
        // each the two sides in alternating order; the random-UUID reference last.
        let proto_order = if run.is_multiple_of(2) {
            [0, 1]
        } else {
            [1, 0]
        };
        let mut steps: Vec<(usize, usize)> = vec![];
        for p in proto_order {
            for side in order(run) {
                steps.push((p, side));
            }
        }
        steps.push((0, 2));
        steps.push((1, 3));
        for (p, side) in steps {
            let protocol = protocols[p];
            let (label, script) = match side {
                0 => ("picloud", &picloud_script),
                1 => ("bigserial", &bigserial_script),
                2 => ("uuid", &uuid_script),
                _ => ("producer", &picloud_script),
            };
            let name = format!("e1_{label}_{protocol}");
            reset_queues(&mut c)?;
            settle(&mut c)?;
            let meter = Meter::start(&mut c)?;
            let user = if side == 3 { PRODUCER } else { "postgres" };
            let shape = Shape {
                clients: 4,
                jobs: 2,
                secs: cfg.e1_secs,
                protocol,
            };
            let r = pgbench_as(cfg, &cfg.db, user, &name, script, shape)?;
            let (wal, cpu) = meter.finish(&mut c)?;
            if r.failed > 0 {
                notes.push(format!(
                    "E1 run {}: {name}: {} failed transactions",
                    run + 1,
                    r.failed
                ));
            }
            let txns = r.txns.max(1) as f64;
            progress(&format!(
                "E1 run {} {name}: {:.0} tps ({} txns), {:.0} WAL bytes/event, {:.0} µs CPU/event",
                run + 1,
                r.tps,
                r.txns,
                wal / txns,
                cpu * 1e6 / txns
            ));
            let into = match side {
                2 => &mut uuid,
                3 => &mut producer,
                _ => &mut runs[p][side],
            };
            into.tps.push(r.tps);
            into.wal.push(wal / txns);
            into.cpu_us.push(cpu * 1e6 / txns);
        }
    }
    reset_queues(&mut c)?;
    let [simple, prepared] = &runs;
    notes.push(format!(
        "E1 WAL per event in the prepared protocol (same rows, no target): picloud {} B, bigserial plain {} B. \
         WAL = pg_current_wal_lsn() after minus before the pgbench run, over its transactions (one event each).",
        fmt_num(stat(&prepared[0].wal).median),
        fmt_num(stat(&prepared[1].wal).median)
    ));
    notes.push(
        "E1, P1 CPU per event: busy CPU seconds of the whole machine (/proc/stat: user, nice, system, irq, softirq, steal) \
         over the run, over its events; it counts postgres, the supervisor and the clients (pgbench, the bench) alike, \
         and anything else running on the machine at the time."
            .into(),
    );
    let mut rows = vec![];
    for (p, sides) in [simple, prepared].into_iter().enumerate() {
        let protocol = protocols[p];
        let (pic, big) = (&sides[0], &sides[1]);
        rows.push(
            Row::new(
                "E1",
                &format!("enqueue, 1 per tx, 4 clients, -M {protocol}"),
                "tx/s",
            )
            .value(&pic.tps)
            .baseline("plain INSERT, bigserial", &big.tps, "tx/s")
            .ratio_of(&pic.tps, &big.tps)
            .target("≥ 0.90× plain", median_ratio(&pic.tps, &big.tps) >= 0.9),
        );
        rows.push(
            Row::new(
                "E1",
                &format!("  CPU per event (whole machine), -M {protocol}"),
                "µs",
            )
            .value(&pic.cpu_us)
            .baseline("plain INSERT, bigserial", &big.cpu_us, "µs")
            .ratio_of(&pic.cpu_us, &big.cpu_us),
        );
    }
    let (pic, big) = (&simple[0], &simple[1]);
    rows.push(
        Row::new("E1", "WAL per event, -M simple", "B")
            .value(&pic.wal)
            .baseline("plain INSERT, bigserial", &big.wal, "B")
            .ratio_of(&pic.wal, &big.wal)
            .target("≤ 1.2× plain", median_ratio(&pic.wal, &big.wal) <= 1.2),
    );
    rows.push(
        Row::new(
            "E1",
            "reference: random-UUID plain outbox, -M simple",
            "tx/s",
        )
        .value(&pic.tps)
        .baseline("plain INSERT, uuid key", &uuid.tps, "tx/s")
        .ratio_of(&pic.tps, &uuid.tps),
    );
    let superuser = &prepared[0];
    rows.push(
        Row::new(
            "E1",
            "reference: enqueue as a tenant's producer role, -M prepared",
            "tx/s",
        )
        .value(&producer.tps)
        .baseline("picloud as the superuser", &superuser.tps, "tx/s")
        .ratio_of(&producer.tps, &superuser.tps),
    );
    Ok(rows)
}
