//! Waking supervisors without paying for NOTIFY on every enqueue.
//!
//! A NOTIFY takes a cluster-wide lock at commit that serialises committing writers. A
//! supervisor that is busy claiming does not need it: it will claim again anyway. So a flag
//! in shared memory records whether the last claim came back empty (some supervisor is about
//! to sleep), and an enqueueing transaction sends the generic `picloud_wake` notification at
//! commit only while that flag is up. The flag is read in the pre-commit callback, as late as
//! possible, so that a supervisor that went idle while the transaction ran still gets woken.
//! The small remaining window (flag raised between our pre-commit and our commit becoming
//! visible) is closed by the supervisor re-claiming once shortly after going idle, and in the
//! worst case by its poll interval.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, register_xact_callback, PgAtomic, PgXactCallbackEvent};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// The channel supervisors LISTEN on. The payload is always empty so Postgres coalesces
/// duplicate notifications within a transaction.
pub const WAKE_CHANNEL: &str = "picloud_wake";

// SAFETY: the name is unique to picloud within this cluster's shared memory.
static SUPERVISOR_IDLE: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"picloud_supervisor_idle") };

thread_local! {
    /// Local transaction id for which the pre-commit check is already registered, so that a
    /// transaction enqueueing many events registers it once.
    static REGISTERED_FOR: Cell<u32> = const { Cell::new(0) };
}

pub fn init_shared_memory() {
    pg_shmem_init!(SUPERVISOR_IDLE = AtomicBool::new(false));
}

fn current_local_xid() -> u32 {
    // SAFETY: MyProc is set for every backend before any SQL function can run.
    unsafe { (*pg_sys::MyProc).lxid }
}

fn notify_supervisors() {
    let channel = WAKE_CHANNEL.into_datum();
    let payload = "".into_datum();
    if let (Some(channel), Some(payload)) = (channel, payload) {
        // SAFETY: pg_notify takes two non-null text arguments, which we pass; it only queues the
        // notification, which Postgres delivers once this transaction has committed.
        unsafe {
            pgrx::direct_function_call_as_datum(pg_sys::pg_notify, &[Some(channel), Some(payload)]);
        }
    }
}

/// Arranges for supervisors to be woken when the current transaction commits, if any of them
/// is idle at that moment (internal; called by every enqueue path).
#[pg_extern(volatile, parallel_unsafe, name = "_wake_at_commit")]
pub fn picloud_wake_at_commit() {
    let lxid = current_local_xid();
    if REGISTERED_FOR.with(|registered| registered.replace(lxid)) == lxid {
        return;
    }
    register_xact_callback(PgXactCallbackEvent::PreCommit, || {
        if SUPERVISOR_IDLE.get().load(Ordering::Acquire) {
            notify_supervisors();
        }
    });
}

/// Records the outcome of a claim: an empty claim means its supervisor is about to wait for
/// a notification (internal; called by `picloud_claim`).
#[pg_extern(volatile, parallel_unsafe, name = "_note_claim")]
pub fn picloud_note_claim(claimed: i32) {
    SUPERVISOR_IDLE.get().store(claimed == 0, Ordering::Release);
}

/// Whether enqueues currently send a wake-up notification (some supervisor is idle).
#[pg_extern(volatile, parallel_safe)]
pub fn picloud_supervisor_idle() -> bool {
    SUPERVISOR_IDLE.get().load(Ordering::Acquire)
}
