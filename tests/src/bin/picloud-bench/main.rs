//! picloud-bench: measures picloud against plain-SQL baselines on a running cluster.
//!
//! Run it through scripts/bench.sh, which builds everything, starts a throwaway cluster and
//! passes its coordinates in the environment:
//!   PICLOUD_BENCH_PORT        cluster port (default 55450)
//!   PICLOUD_BENCH_DB          database with CREATE EXTENSION picloud done (default picloud_bench)
//!   PICLOUD_BENCH_SUPERVISOR  picloud-supervisor binary (default target/release/picloud-supervisor)
//!   BENCH_QUICK=1             short smoke run (seconds per case, fewer events)
//!   BENCH_RUNS                runs per case (default 3); every figure is the median with min–max
//!   BENCH_OUT                 output directory (default target/bench)
//!   BENCH_ONLY=E1,L1          run only these cases (for diagnosis)
//!   BENCH_SUPERVISOR_ARGS='--sql-lanes 3'  extra supervisor flags (for trying settings)
//!   BENCH_L1_GAP_MS           gap between L1 samples (default 20)
//!   BENCH_B1_WAIT_S           longest wait for autovacuum in B1 (default 60, quick 20)
//!
//! Each picloud case runs side by side with its baseline in the same run (the order of the
//! two alternates between runs). Output: one table on stdout, results.md and results.json in
//! BENCH_OUT. Progress goes to stderr.

mod cases;
mod config;
mod db;
mod environment;
mod harness;
mod http;
mod report;
mod setup;
mod stats;

use cases::{b1, cron, e1, e2, f1, g1, l1, m1, o1, p1, p1_http};
use config::{progress, Cfg, Res};
use report::{text_table, write_results, Row};
use serde_json::{json, Value};
use std::path::Path;
use std::time::SystemTime;

fn main() {
    let cfg = Cfg::from_env();
    if let Err(e) = std::fs::create_dir_all(&cfg.out) {
        eprintln!("cannot create {}: {e}", cfg.out.display());
        std::process::exit(1);
    }
    if !Path::new(&cfg.supervisor).exists() {
        eprintln!("supervisor binary {} not found (build it: cargo build --release -p picloud-supervisor)", cfg.supervisor);
        std::process::exit(1);
    }
    let started = SystemTime::now();
    let source = environment::source_state();
    let main_db = match setup::setup_main(&cfg) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("setup failed: {e}");
            std::process::exit(1);
        }
    };
    let settings = environment::settings(&cfg).unwrap_or(Value::Null);
    progress(&format!(
        "{} mode, {} runs per case, cluster port {}, database {}",
        if cfg.quick { "QUICK" } else { "full" },
        cfg.runs,
        cfg.port,
        cfg.db
    ));

    let mut rows: Vec<Row> = vec![];
    let mut notes: Vec<String> = vec![];
    let mut chart = json!({});
    let record = |id: &str, what: &str, result: Res<Vec<Row>>, rows: &mut Vec<Row>| match result {
        Ok(r) => rows.extend(r),
        Err(e) => {
            progress(&format!("{id} FAILED: {e}"));
            rows.push(Row::failed(id, what, e));
        }
    };
    // Cases without a supervisor run first, while no supervisor has ever marked itself idle
    // (an idle supervisor makes every enqueue send a NOTIFY at commit).
    if cfg.wants("E1") {
        record(
            "E1",
            "enqueue",
            e1::bench_e1(&cfg, &main_db, &mut notes),
            &mut rows,
        );
    }
    if cfg.wants("E2") {
        record(
            "E2",
            "bulk enqueue",
            e2::bench_e2(&cfg, &main_db),
            &mut rows,
        );
    }
    if cfg.wants("M1") {
        record("M1", "matching", m1::bench_m1(&cfg, &mut notes), &mut rows);
    }
    if cfg.wants("G1") {
        record("G1", "gc", g1::bench_g1(&cfg, &mut notes), &mut rows);
    }
    if cfg.wants("P1") {
        record(
            "P1",
            "processing",
            p1::bench_p1(&cfg, &main_db, &mut notes, &mut chart),
            &mut rows,
        );
    }
    if cfg.wants("O1") {
        record(
            "O1",
            "ordered delivery",
            o1::bench_o1(&cfg, &main_db, &mut notes),
            &mut rows,
        );
    }
    if cfg.wants("F1") {
        record("F1", "fairness", f1::bench_f1(&cfg, &mut notes), &mut rows);
    }
    if cfg.wants("P1-http") {
        record(
            "P1-http",
            "http handlers",
            p1_http::bench_p1_http(&cfg, &main_db, &mut notes),
            &mut rows,
        );
    }
    if cfg.wants("L1") {
        record(
            "L1",
            "latency",
            l1::bench_l1(&cfg, &main_db, &mut notes, &mut chart),
            &mut rows,
        );
    }
    if cfg.wants("C2") {
        record(
            "C2",
            "cron triggers and enqueue",
            cron::bench_c2(&cfg, &main_db),
            &mut rows,
        );
    }
    if cfg.wants("C1") {
        record(
            "C1",
            "cron lateness",
            cron::bench_c1(&cfg, &mut notes),
            &mut rows,
        );
    }
    if cfg.wants("B1") {
        record(
            "B1",
            "bloat",
            b1::bench_b1(&cfg, &main_db, &mut notes),
            &mut rows,
        );
    }

    // The table in the order of the cases' ids as documented: E1 E2 P1 L1 M1 G1 B1.
    let rank = |id: &str| {
        ["E1", "E2", "P1", "L1", "M1", "G1", "B1", "C1", "C2"]
            .iter()
            .position(|x| *x == id)
            .unwrap_or(99)
    };
    rows.sort_by_key(|r| rank(&r.id));
    notes.insert(
        0,
        format!(
            "Every figure: median of {} runs (min–max); ratio = picloud / baseline per run, and a target on a ratio is judged on the median ratio shown. {}",
            cfg.runs,
            if cfg.quick {
                "QUICK smoke run: short durations and fewer events; figures are indicative only."
            } else {
                ""
            }
        ),
    );

    let table = text_table(&rows);
    println!("{table}");
    for n in &notes {
        println!("  * {n}");
    }

    let wrote = write_results(&cfg, started, source, settings, &rows, &notes, chart);
    match wrote {
        Ok((md_path, json_path)) => progress(&format!(
            "wrote {} and {}",
            md_path.display(),
            json_path.display()
        )),
        Err(e) => {
            eprintln!("cannot write results: {e}");
            std::process::exit(1);
        }
    }
    if rows.iter().any(|r| r.error.is_some()) {
        std::process::exit(3);
    }
}
