//! Running a SQL handler as its principal, and the depth of the event being handled.
//!
//! The supervisor calls `picloud_run_sql_handler`, which calls `_invoke_as` here. It switches
//! the current user to the trigger's registering role the way Postgres does for maintenance
//! commands: as a security-restricted operation, so the handler can neither `SET ROLE` /
//! `RESET ROLE` its way back to the supervisor's rights nor leave state behind (temporary
//! tables, LISTEN) in the supervisor's session. While it runs, events it produces are one
//! level deeper than the event being handled; the depth is held here, in backend memory that
//! handler code cannot change.

use crate::error::PicloudError;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::CString;

thread_local! {
    /// Depth of events produced right now: the handled event's depth + 1 while a handler runs.
    static PRODUCED_DEPTH: Cell<Option<i32>> = const { Cell::new(None) };
}

/// Depth given to events enqueued by the current code: 0 at top level, and one more than the
/// event being handled inside a handler.
#[pg_extern(stable, parallel_safe)]
pub fn picloud_current_depth() -> i32 {
    PRODUCED_DEPTH.with(|depth| depth.get()).unwrap_or(0)
}

fn role_oid(principal: &str) -> pg_sys::Oid {
    let Ok(name) = CString::new(principal) else {
        PicloudError::UnknownPrincipal {
            principal: principal.to_string(),
        }
        .raise()
    };
    // SAFETY: get_role_oid reads the syscache with a valid C string; missing_ok avoids an ERROR
    // so that we can report the principal in our own words.
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        PicloudError::UnknownPrincipal {
            principal: principal.to_string(),
        }
        .raise()
    }
    oid
}

/// Calls `handler(event)` as `principal` and returns its result as text (internal).
///
/// `handler` must be a function name as printed by `regproc` (quoted where needed): the
/// calling SQL derives it from the stored function oid, never from user text.
#[pg_extern(volatile, parallel_unsafe, name = "_invoke_as")]
pub fn picloud_invoke_as(
    principal: &str,
    handler: &str,
    event: pgrx::JsonB,
    event_depth: i32,
) -> Option<String> {
    let role = role_oid(principal);
    let query = format!("SELECT {handler}($1)::text");

    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context: i32 = 0;
    // SAFETY: plain reads of the backend's current user and security context into locals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context) };
    let previous_depth =
        PRODUCED_DEPTH.with(|depth| depth.replace(Some(event_depth.saturating_add(1))));

    let restricted = saved_context
        | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
        | pg_sys::SECURITY_RESTRICTED_OPERATION as i32;
    // SAFETY: switching the current user for the duration of the call; restored in `finally`
    // below, and by transaction abort if the handler raises.
    unsafe { pg_sys::SetUserIdAndSecContext(role, restricted) };

    PgTryBuilder::new(|| Spi::get_one_with_args::<String>(&query, &[event.into()]))
        .finally(|| {
            // SAFETY: restores exactly the values read above.
            unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_context) };
            PRODUCED_DEPTH.with(|depth| depth.set(previous_depth));
        })
        .execute()
        .unwrap_or_else(|error| {
            PicloudError::InvalidParameter {
                what: "handler result",
                detail: error.to_string(),
            }
            .raise()
        })
}
