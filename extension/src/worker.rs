//! The housekeeping background worker.
//!
//! Every `picloud.gc_interval` it returns expired leases to the queue, deletes dead letters
//! and abandoned executions past their retention, and removes expired inboxes and idempotency
//! keys. Each batch is its own short transaction and the SQL picks rows with
//! `FOR UPDATE SKIP LOCKED`, so housekeeping never makes a claimer wait. The SQL functions it
//! calls (`picloud._gc_*`) are the same ones `picloud_gc_pass()` runs on demand.

use crate::gucs;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

const WORKER_NAME: &str = "picloud housekeeper";

/// The batch steps of one pass, in order. Lease rescue first: it is what unblocks work.
const STEPS: &[&str] = &[
    "picloud._gc_rescue_leases",
    "picloud._gc_dead_letters",
    "picloud._gc_abandoned_executions",
    "picloud._gc_inboxes",
    "picloud._gc_idempotency_keys",
    "picloud._gc_event_counts",
];

pub fn register() {
    BackgroundWorkerBuilder::new(WORKER_NAME)
        .set_type(WORKER_NAME)
        .set_function("picloud_worker_main")
        .set_library("picloud")
        .enable_spi_access()
        // pgrx's default is never to restart; a crashed housekeeper must come back.
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

fn extension_installed() -> bool {
    // A failing query raises a Postgres ERROR (the worker exits and the postmaster restarts
    // it); the Result only carries conversion errors, which mean "not installed" here.
    BackgroundWorker::transaction(|| {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'picloud')",
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}

/// Whether the installed schema has this step. The library serves every schema version it
/// can be installed with: a database not yet moved on with ALTER EXTENSION picloud UPDATE lacks
/// the steps later versions added, and those are skipped rather than failing every pass.
fn step_present(step: &str) -> bool {
    BackgroundWorker::transaction(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.to_regprocedure($1 || '(integer)') IS NOT NULL",
            &[step.into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}

/// Runs one step in batches until a batch comes back short. Returns the rows it handled.
fn run_step(step: &str, batch_size: i32) -> i64 {
    if !step_present(step) {
        return 0;
    }
    let query = format!("SELECT {step}($1)");
    let mut total = 0i64;
    loop {
        // As above: SQL errors raise; a NULL or unconvertible count ends the step.
        let done = BackgroundWorker::transaction(|| {
            Spi::get_one_with_args::<i64>(&query, &[batch_size.into()])
                .ok()
                .flatten()
                .unwrap_or(0)
        });
        total += done;
        if done < i64::from(batch_size) || BackgroundWorker::sigterm_received() {
            return total;
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn picloud_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    log!("{WORKER_NAME} started for database {database:?}");

    let mut announced_waiting = false;
    while BackgroundWorker::wait_latch(Some(Duration::from_millis(gucs::gc_interval_ms()))) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereading postgresql.conf is what a backend does on SIGHUP; we are in the
            // worker's main loop, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if !extension_installed() {
            if !announced_waiting {
                log!("{WORKER_NAME}: extension picloud is not installed in {database:?}; waiting");
                announced_waiting = true;
            }
            continue;
        }
        announced_waiting = false;
        let batch_size = gucs::gc_batch_size();
        let mut report = Vec::new();
        for step in STEPS {
            let done = run_step(step, batch_size);
            if done > 0 {
                report.push(format!("{step}={done}"));
            }
        }
        if !report.is_empty() {
            log!("{WORKER_NAME}: {}", report.join(" "));
        }
    }
    log!("{WORKER_NAME} exiting");
}
