//! The housekeeping background worker.
//!
//! Every `picloud.gc_interval` it returns expired leases to the queue, deletes dead letters
//! and abandoned executions past their retention, and removes expired inboxes and idempotency
//! keys. Each batch is its own short transaction and the SQL picks rows with
//! `FOR UPDATE SKIP LOCKED`, so housekeeping never makes a claimer wait. The steps and their
//! SQL (`picloud._gc_steps()`, `picloud._gc_step`) are the ones `picloud_gc_pass()` runs on
//! demand.
//!
//! It also makes the ticks of cron triggers (sql/055_cron.sql): it sleeps until the earliest
//! tick is due (looking again at least every second, and woken at once when a cron trigger is
//! created or changed) and enqueues the due ticks with `picloud._cron_fire`.

use crate::gucs;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, register_xact_callback, PgAtomic, PgXactCallbackEvent};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

const WORKER_NAME: &str = "picloud housekeeper";

/// The cron step: run whenever a tick may be due, not only once per pass.
const CRON_STEP: &str = "picloud._cron_fire";

/// Longest sleep without looking for due ticks, whatever the next known tick: a trigger
/// created while the housekeeper could not be woken (another database's session, a server
/// without the wake-up) is noticed within it.
const CRON_LOOK_EVERY: Duration = Duration::from_secs(1);

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

/// Runs one step (a function taking the batch size) in batches until a batch comes back
/// short. Returns the rows it handled.
fn run_step(step: &str, batch_size: i32) -> i64 {
    if !step_present(step) {
        return 0;
    }
    let query = format!("SELECT {step}($1)");
    in_batches(batch_size, || {
        Spi::get_one_with_args::<i64>(&query, &[batch_size.into()])
    })
}

/// Runs `batch` (one batch, each in a transaction of its own) until one comes back short or
/// SIGTERM arrives. Returns the rows handled. SQL errors raise (the worker exits and the
/// postmaster starts a new one); a NULL or unconvertible count ends the step.
fn in_batches(
    batch_size: i32,
    batch: impl Fn() -> Result<Option<i64>, pgrx::spi::Error> + std::panic::RefUnwindSafe,
) -> i64 {
    let mut total = 0i64;
    loop {
        let done = BackgroundWorker::transaction(|| batch().ok().flatten().unwrap_or(0));
        total += done;
        if done < i64::from(batch_size) || BackgroundWorker::sigterm_received() {
            return total;
        }
    }
}

/// The housekeeping steps of the installed schema, in order: `picloud._gc_steps()`, the list
/// picloud_gc_pass runs too. None for a schema from before it existed (not yet moved on with
/// ALTER EXTENSION picloud UPDATE).
fn housekeeping_steps() -> Option<Vec<String>> {
    if !BackgroundWorker::transaction(|| {
        Spi::get_one::<bool>("SELECT pg_catalog.to_regprocedure('picloud._gc_steps()') IS NOT NULL")
            .ok()
            .flatten()
            .unwrap_or(false)
    }) {
        return None;
    }
    BackgroundWorker::transaction(|| {
        Spi::get_one::<Vec<String>>("SELECT picloud._gc_steps()")
            .ok()
            .flatten()
    })
}

/// Whether the last housekeeper found (or connected to) picloud.database. Shared memory, so it
/// outlives the worker process: a new worker connects at once when it is set, and otherwise
/// first asks from a connection to no database whether the database exists.
// SAFETY: the name is unique to picloud within this cluster's shared memory.
static DATABASE_SEEN: PgAtomic<AtomicBool> =
    unsafe { PgAtomic::new(c"picloud_housekeeper_database_seen") };

/// The running housekeeper's process id (0: none), so that a session can wake it.
// SAFETY: the name is unique to picloud within this cluster's shared memory.
static HOUSEKEEPER_PID: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"picloud_housekeeper_pid") };

/// Sets up the shared flags (from `_PG_init`).
pub fn init_shared_memory() {
    pg_shmem_init!(DATABASE_SEEN);
    pg_shmem_init!(HOUSEKEEPER_PID);
}

thread_local! {
    /// Local transaction id for which the commit-time wake-up is already registered.
    static WAKE_REGISTERED_FOR: Cell<u32> = const { Cell::new(0) };
}

/// Wakes the housekeeper once the current transaction has committed, so that a new or changed
/// cron trigger's next tick is known to it at once (internal; called by the cron functions).
/// Returns true, so PL/pgSQL can call it as an expression.
#[pg_extern(volatile, parallel_unsafe, name = "_wake_housekeeper_at_commit")]
pub fn picloud_wake_housekeeper_at_commit() -> bool {
    // SAFETY: MyProc is set for every backend before any SQL function can run.
    let lxid = unsafe { (*pg_sys::MyProc).lxid };
    if WAKE_REGISTERED_FOR.with(|registered| registered.replace(lxid)) == lxid {
        return true;
    }
    register_xact_callback(PgXactCallbackEvent::Commit, || {
        let pid = HOUSEKEEPER_PID.get().load(Ordering::Acquire);
        if pid == 0 {
            return;
        }
        // SAFETY: BackendPidGetProc returns the live PGPROC of that pid or NULL, under the
        // ProcArray lock it takes itself; setting a process's latch is how Postgres wakes
        // another process (a pid reused by another backend only gets a spurious wake-up).
        unsafe {
            let process = pg_sys::BackendPidGetProc(pid);
            if !process.is_null() {
                pg_sys::SetLatch(&mut (*process).procLatch);
            }
        }
    });
    true
}

/// How early the housekeeper makes a tick: its event is enqueued this long before the tick,
/// due at the tick's time, so the firing transaction does not make handlers late. Keep in step
/// with v_until in picloud._cron_fire (sql/055_cron.sql).
const CRON_LEAD: Duration = Duration::from_millis(200);

/// How long until the earliest armed cron tick, if the schema has cron triggers and one is
/// armed. Rounded up to the next millisecond: the latch's timeout is in whole milliseconds,
/// and waking a little early would only look again.
fn next_tick_in() -> Option<Duration> {
    if !step_present(CRON_STEP) {
        return None;
    }
    let ms = BackgroundWorker::transaction(|| {
        Spi::get_one::<f64>("SELECT picloud._cron_next_fire_in_ms()")
            .ok()
            .flatten()
    })?;
    Some(Duration::from_millis(ms.max(0.0).ceil() as u64 + 1).saturating_sub(CRON_LEAD))
}

/// Does the database exist? Asked from a connection to no database (pg_database is a shared
/// catalog): connecting to a missing database is FATAL, and the postmaster would start the
/// worker again every second, each time logging the same FATAL.
fn database_exists(database: &str) -> bool {
    BackgroundWorker::transaction(|| {
        // A heap scan of pg_database, as Postgres' own launchers read it without a database
        // (catalog lookups by name need one).
        // SAFETY: the scan and relation are opened and closed within this transaction; each
        // tuple heap_getnext returns is a pg_database row, whose fixed part starts at t_hoff.
        unsafe {
            let relation = pg_sys::table_open(
                pg_sys::DatabaseRelationId,
                pg_sys::AccessShareLock as pg_sys::LOCKMODE,
            );
            let scan = pg_sys::table_beginscan_catalog(relation, 0, std::ptr::null_mut());
            let mut found = false;
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let header = (*tuple).t_data;
                let row = header
                    .cast::<u8>()
                    .add(usize::from((*header).t_hoff))
                    .cast::<pg_sys::FormData_pg_database>();
                let name = std::ffi::CStr::from_ptr((*row).datname.data.as_ptr());
                if name.to_bytes() == database.as_bytes() {
                    found = true;
                    break;
                }
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            found
        }
    })
}

/// Waits, connected to no database, until `database` exists, logging once; then exits so that
/// the postmaster starts a worker that connects to it. Exits on SIGTERM like the main loop.
fn wait_for_database(database: &str) -> ! {
    log!("{WORKER_NAME}: database {database:?} (picloud.database) does not exist; waiting for it");
    while BackgroundWorker::wait_latch(Some(Duration::from_millis(gucs::gc_interval_ms()))) {
        if database_exists(database) {
            log!("{WORKER_NAME}: database {database:?} exists now; restarting to connect to it");
            DATABASE_SEEN.get().store(true, Ordering::Release);
            // SAFETY: ends this process; code 1 makes the postmaster start a new worker.
            unsafe { pg_sys::proc_exit(1) }
        }
    }
    leave()
}

/// Leaves after SIGTERM. The same signal comes from a server shutdown and from
/// pg_terminate_backend (an operator, a tool that ends idle sessions, DROP DATABASE ... WITH
/// (FORCE)); exit code 1 makes the postmaster start a new housekeeper after the restart time in
/// the second case, and starts nothing once a shutdown has begun. Exit code 0 would mean "done
/// for good": leases of crashed supervisors would never be rescued again until a restart.
fn leave() -> ! {
    HOUSEKEEPER_PID.get().store(0, Ordering::Release);
    log!("{WORKER_NAME}: terminated; exiting with code 1 so that the postmaster starts a new one unless the server is shutting down");
    // SAFETY: ends this process the way Postgres processes end.
    unsafe { pg_sys::proc_exit(1) }
}

/// One pass over every housekeeping step, logging what each did: each batch of a step
/// (`picloud._gc_step`) in a transaction of its own. An older schema's pass runs whole, in one
/// transaction (its `picloud_gc_pass()`), until ALTER EXTENSION picloud UPDATE.
fn housekeeping_pass(batch_size: i32) {
    let done: Vec<(String, i64)> = match housekeeping_steps() {
        Some(steps) => steps
            .into_iter()
            .map(|step| {
                let done = in_batches(batch_size, || {
                    Spi::get_one_with_args::<i64>(
                        "SELECT picloud._gc_step($1, $2)",
                        &[step.as_str().into(), batch_size.into()],
                    )
                });
                (step, done)
            })
            .collect(),
        None => BackgroundWorker::transaction(|| {
            Spi::connect(|client| {
                client
                    .select(
                        "SELECT kind, removed FROM picloud.picloud_gc_pass()",
                        None,
                        &[],
                    )
                    .map(|rows| {
                        rows.filter_map(|row| {
                            let kind = row.get::<String>(1).ok().flatten()?;
                            let removed = row.get::<i64>(2).ok().flatten()?;
                            Some((kind, removed))
                        })
                        .collect()
                    })
                    .unwrap_or_default()
            })
        }),
    };
    let report: Vec<String> = done
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(step, n)| format!("{step}={n}"))
        .collect();
    if !report.is_empty() {
        log!("{WORKER_NAME}: {}", report.join(" "));
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn picloud_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database();
    // A missing database would make the connection below FATAL: check from no database first.
    // (A worker connected to no database cannot connect to one later, hence the restart.)
    if !DATABASE_SEEN.get().swap(false, Ordering::AcqRel) {
        // Not known to exist: find out from no database, then start again (connected to no
        // database, this process cannot connect to one any more).
        BackgroundWorker::connect_worker_to_spi(None, None);
        if database_exists(&database) {
            DATABASE_SEEN.get().store(true, Ordering::Release);
            // SAFETY: ends this process; code 1 makes the postmaster start a new worker.
            unsafe { pg_sys::proc_exit(1) }
        }
        wait_for_database(&database);
    }
    // Cleared above until the connection succeeds: if the database was dropped meanwhile, the
    // FATAL below leaves the next worker to find that out without connecting.
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    DATABASE_SEEN.get().store(true, Ordering::Release);
    log!("{WORKER_NAME} started for database {database:?}");
    // SAFETY: MyProcPid is this process's id, set before any worker code runs.
    HOUSEKEEPER_PID
        .get()
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);

    let mut announced_waiting = false;
    let mut wait = Duration::ZERO;
    // The first pass runs at once, not an interval after start: after a promotion (the worker
    // starts when recovery ends) or a restart, leases that expired meanwhile are rescued now.
    // The next is due an interval after the last, read afresh each time round so that a
    // reloaded picloud.gc_interval applies at once.
    let mut last_pass: Option<Instant> = None;
    while BackgroundWorker::wait_latch(Some(wait)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereading postgresql.conf is what a backend does on SIGHUP; we are in the
            // worker's main loop, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let interval = Duration::from_millis(gucs::gc_interval_ms());
        if !extension_installed() {
            if !announced_waiting {
                log!("{WORKER_NAME}: extension picloud is not installed in {database:?}; waiting");
                announced_waiting = true;
            }
            wait = interval.min(CRON_LOOK_EVERY);
            continue;
        }
        announced_waiting = false;
        let batch_size = gucs::gc_batch_size();
        // Ticks are not logged: an every-second trigger would fill the log.
        run_step(CRON_STEP, batch_size);
        let mut next_pass = last_pass.map_or_else(Instant::now, |last| last + interval);
        if Instant::now() >= next_pass {
            housekeeping_pass(batch_size);
            last_pass = Some(Instant::now());
            next_pass = Instant::now() + interval;
        }
        wait = next_pass
            .saturating_duration_since(Instant::now())
            .min(CRON_LOOK_EVERY);
        if let Some(tick) = next_tick_in() {
            wait = wait.min(tick);
        }
    }
    leave()
}
