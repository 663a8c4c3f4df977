//! A handler's budget: its own timeout wherever it runs, and nothing of it left in the
//! supervisor's session afterwards.
//!
//! A handler runs inside a statement the supervisor made (a lane batch, a claimed batch, a
//! single claimed event). Its own `timeout_ms` bounds it there: `_become_event` arms Postgres'
//! statement timer for the earlier of the statement's own deadline and the handler's, and
//! `_unbecome` (or `_after_handler`, on the paths where the handler failed) puts the
//! statement's deadline back. When the handler's deadline passes, Postgres cancels the statement
//! with 57014 as for any statement timeout; the supervisor then settles the events one by one.
//!
//! What a handler could leave in the supervisor's session despite the security-restricted
//! operation it runs in: session-level advisory locks (settings, temporary tables, LISTEN,
//! prepared statements and role switches are undone or refused by Postgres itself). They are
//! released before each handler starts, after it ends, and when its transaction aborts; the
//! supervisor holds none of its own.

use pgrx::{pg_sys, register_xact_callback, PgXactCallbackEvent};
use std::cell::Cell;

/// Postgres' `STATEMENT_TIMEOUT` (utils/timeout.h, PostgreSQL 15: the fourth TimeoutId).
const STATEMENT_TIMEOUT: i32 = 3;

// The timer functions of utils/timeout.h, which pgrx does not bind. None of them raises.
unsafe extern "C-unwind" {
    fn enable_timeout_at(id: i32, fin_time: pg_sys::TimestampTz);
    fn disable_timeout(id: i32, keep_indicator: bool);
    fn get_timeout_active(id: i32) -> bool;
    fn get_timeout_finish_time(id: i32) -> pg_sys::TimestampTz;
}

/// The statement's own deadline, saved while a handler's replaces it.
#[derive(Clone, Copy)]
struct Saved {
    /// Which statement it belongs to: a deadline saved by a statement that was cancelled is
    /// never restored into a later one.
    statement_start: pg_sys::TimestampTz,
    /// The statement's deadline, if it had one.
    deadline: Option<pg_sys::TimestampTz>,
}

thread_local! {
    static SAVED: Cell<Option<Saved>> = const { Cell::new(None) };
    /// The transaction (local id) the abort callback below is registered for.
    static ABORT_CALLBACK_FOR: Cell<u32> = const { Cell::new(0) };
}

fn statement_start() -> pg_sys::TimestampTz {
    // SAFETY: reads the current statement's start time.
    unsafe { pg_sys::GetCurrentStatementStartTimestamp() }
}

/// Arms the handler's deadline, `timeout_ms` from now, unless the statement's own comes first.
pub fn start_handler(timeout_ms: i32) {
    release_session_locks();
    release_session_locks_if_aborted();
    let start = statement_start();
    let saved = match SAVED.with(Cell::get) {
        Some(saved) if saved.statement_start == start => saved,
        _ => {
            // SAFETY: plain reads of the timer's state.
            let deadline = unsafe {
                get_timeout_active(STATEMENT_TIMEOUT)
                    .then(|| get_timeout_finish_time(STATEMENT_TIMEOUT))
            };
            let saved = Saved {
                statement_start: start,
                deadline,
            };
            SAVED.with(|s| s.set(Some(saved)));
            saved
        }
    };
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let own = now.saturating_add(i64::from(timeout_ms.max(1)) * 1000);
    let deadline = saved.deadline.map_or(own, |outer| outer.min(own));
    // SAFETY: re-arms the statement timer, as Postgres does at each statement's start.
    unsafe { enable_timeout_at(STATEMENT_TIMEOUT, deadline) };
}

/// Puts the statement's own deadline back and releases what the handler left.
pub fn end_handler() {
    release_session_locks();
    let Some(saved) = SAVED.with(|s| s.take()) else {
        return;
    };
    if saved.statement_start != statement_start() {
        return;
    }
    // SAFETY: restores the timer to the statement's own state.
    unsafe {
        match saved.deadline {
            Some(deadline) => enable_timeout_at(STATEMENT_TIMEOUT, deadline),
            None => disable_timeout(STATEMENT_TIMEOUT, false),
        }
    }
}

/// A transaction that ran a handler and aborts (the handler's error, its timeout, a lost
/// connection) releases the session-level advisory locks the handler took: an abort keeps
/// them, and another supervisor connection's handler waiting on one would stall its whole
/// batch until its own timeout.
fn release_session_locks_if_aborted() {
    // SAFETY: MyProc is set for every backend before any SQL function can run.
    let lxid = unsafe { (*pg_sys::MyProc).lxid };
    if ABORT_CALLBACK_FOR.with(|registered| registered.replace(lxid)) == lxid {
        return;
    }
    register_xact_callback(PgXactCallbackEvent::Abort, release_session_locks);
}

fn release_session_locks() {
    // SAFETY: releases this backend's session-level advisory locks (user lock method); the
    // supervisor's sessions take none of their own.
    unsafe { pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID) };
}

/// Ends a handler's budget after it failed (internal): the paths that catch a handler's error
/// call this where a successful handler's `_unbecome` would have.
#[pgrx::pg_extern(volatile, parallel_unsafe, name = "_after_handler")]
pub fn picloud_after_handler() {
    end_handler();
}
