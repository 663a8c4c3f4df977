//! Running a SQL handler as its principal, and the depth of the event being handled.
//!
//! `picloud_run_sql_handler` (SQL) brackets the handler call with `_become` and `_unbecome`.
//! `_become` switches the current user to the trigger's registering role the way Postgres
//! does for maintenance commands: as a security-restricted operation, so the handler can
//! neither `SET ROLE`/`RESET ROLE` back to the supervisor's rights nor leave state (temporary
//! tables, LISTEN) in the supervisor's session, and inside a new GUC nest level, so settings the
//! handler changes are undone afterwards. The handler itself is called from PL/pgSQL rather than
//! through SPI here, so its errors keep their own SQLSTATE.
//!
//! `_unbecome` runs as the principal, so it must be callable by tenants; it only acts when
//! given the random token `_become` returned, which handler code never sees.
//!
//! While a handler runs, events it produces are one level deeper than the event being handled.
//! The depth lives here, in backend memory that handler code cannot change, and counts only
//! inside the restricted operation, so a handler error that aborts back to the supervisor's
//! context can never leave a stale depth behind.

use crate::error::PicloudError;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::CString;

#[derive(Clone, Copy)]
struct Invocation {
    token: i64,
    produced_depth: i32,
    saved_user: pg_sys::Oid,
    saved_context: i32,
    guc_nest_level: i32,
}

thread_local! {
    static INVOCATION: Cell<Option<Invocation>> = const { Cell::new(None) };
}

fn in_restricted_operation() -> bool {
    let mut user = pg_sys::InvalidOid;
    let mut context: i32 = 0;
    // SAFETY: plain reads of the backend's current user and security context into locals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut context) };
    context & pg_sys::SECURITY_RESTRICTED_OPERATION as i32 != 0
}

/// Depth given to events enqueued by the current code: 0 at top level, and one more than the
/// event being handled inside a handler.
#[pg_extern(stable, parallel_safe)]
pub fn picloud_current_depth() -> i32 {
    match INVOCATION.with(|i| i.get()) {
        Some(invocation) if in_restricted_operation() => invocation.produced_depth,
        _ => 0,
    }
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

fn random_token() -> i64 {
    let mut bytes = [0u8; 8];
    // SAFETY: fills exactly the 8 bytes of a local buffer.
    let ok = unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) };
    if !ok {
        PicloudError::InvalidParameter {
            what: "random source",
            detail: "pg_strong_random failed".into(),
        }
        .raise()
    }
    i64::from_ne_bytes(bytes)
}

/// Switches to `principal` for running a handler of an event at `event_depth` (internal,
/// supervisor only). Returns the token `_unbecome` needs.
#[pg_extern(volatile, parallel_unsafe, name = "_become")]
pub fn picloud_become(principal: &str, event_depth: i32) -> i64 {
    let role = role_oid(principal);
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context: i32 = 0;
    // SAFETY: plain reads of the backend's current user and security context into locals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context) };
    // SAFETY: opens a GUC nest level that `_unbecome` (or transaction abort) closes.
    let guc_nest_level = unsafe { pg_sys::NewGUCNestLevel() };
    let token = random_token();
    INVOCATION.with(|i| {
        i.set(Some(Invocation {
            token,
            produced_depth: event_depth.saturating_add(1),
            saved_user,
            saved_context,
            guc_nest_level,
        }))
    });
    let restricted = saved_context
        | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
        | pg_sys::SECURITY_RESTRICTED_OPERATION as i32;
    // SAFETY: switches the current user until `_unbecome`; transaction abort restores it too.
    unsafe { pg_sys::SetUserIdAndSecContext(role, restricted) };
    token
}

/// Returns from the principal to the supervisor's own user (internal). Does nothing but raise
/// an error without the token `_become` returned.
#[pg_extern(volatile, parallel_unsafe, name = "_unbecome")]
pub fn picloud_unbecome(token: i64) {
    let Some(invocation) = INVOCATION.with(|i| i.get()) else {
        PicloudError::InvalidParameter {
            what: "token",
            detail: "no handler is running".into(),
        }
        .raise()
    };
    if invocation.token != token {
        PicloudError::InvalidParameter {
            what: "token",
            detail: "it does not match the running handler".into(),
        }
        .raise()
    }
    INVOCATION.with(|i| i.set(None));
    // SAFETY: closes the GUC nest level opened by `_become`, discarding the handler's settings,
    // then restores exactly the user and context read there.
    unsafe {
        pg_sys::AtEOXact_GUC(false, invocation.guc_nest_level);
        pg_sys::SetUserIdAndSecContext(invocation.saved_user, invocation.saved_context);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn depth_is_zero_outside_a_handler() {
        assert_eq!(
            Spi::get_one::<i32>("SELECT picloud.picloud_current_depth()"),
            Ok(Some(0))
        );
    }

    #[pg_test(error = "invalid token: no handler is running")]
    fn unbecome_without_become_is_refused() {
        let result = Spi::run("SELECT picloud._unbecome(42)");
        panic!("expected an error, got {result:?}");
    }

    #[pg_test(error = "principal role \"no_such_role_xyz\" does not exist")]
    fn become_an_unknown_role_is_refused() {
        let result = Spi::run("SELECT picloud._become('no_such_role_xyz', 0)");
        panic!("expected an error, got {result:?}");
    }

    #[pg_test]
    fn become_switches_user_and_depth_until_unbecome() {
        Spi::run("CREATE ROLE picloud_pg_test_principal; GRANT picloud_user TO picloud_pg_test_principal")
            .expect("create role");
        let token = Spi::get_one::<i64>("SELECT picloud._become('picloud_pg_test_principal', 3)")
            .expect("become")
            .expect("a token");
        assert_eq!(
            Spi::get_one::<String>("SELECT current_user::text"),
            Ok(Some("picloud_pg_test_principal".to_string()))
        );
        assert_eq!(
            Spi::get_one::<i32>("SELECT picloud.picloud_current_depth()"),
            Ok(Some(4))
        );
        Spi::run(&format!("SELECT picloud._unbecome({token})")).expect("unbecome");
        assert_ne!(
            Spi::get_one::<String>("SELECT current_user::text"),
            Ok(Some("picloud_pg_test_principal".to_string()))
        );
        assert_eq!(
            Spi::get_one::<i32>("SELECT picloud.picloud_current_depth()"),
            Ok(Some(0))
        );
    }
}
