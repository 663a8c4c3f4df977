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

use crate::api::budget;
use crate::error::PicloudError;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgBuiltInOids, PgOid};
use std::cell::{Cell, RefCell};
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

/// The 0.1.0-0.3.0 declaration `picloud._become(name, integer)`, which switched to any role
/// by name. Kept in the library only for databases not yet updated to 0.4.0 (their install
/// scripts declare it); 0.4.0 drops it in favour of `_become_event`.
#[pg_extern(volatile, parallel_unsafe, name = "_become", sql = false)]
pub fn picloud_become(principal: &str, event_depth: i32) -> i64 {
    become_role(role_oid(principal), event_depth)
}

/// Who runs an event's handler and at what depth, looked up from the event itself: the
/// principal is the role that registered the event's trigger (or its handler), never a name
/// the caller chooses.
const EVENT_PRINCIPAL: &str = "
    SELECT o.depth::pg_catalog.int4, h.principal::pg_catalog.text, h.problem,
           (SELECT s.timeout_ms FROM picloud.scripts s
            WHERE s.app_id OPERATOR(pg_catalog.=) o.app_id
              AND s.script_id OPERATOR(pg_catalog.=) o.script_id)
    FROM picloud.outbox o
    CROSS JOIN LATERAL picloud._handler_principal(o.app_id, o.trigger_id, o.script_id) h
    WHERE o.app_id OPERATOR(pg_catalog.=) $1 AND o.event_id OPERATOR(pg_catalog.=) $2";

/// What `_become_event` needs to know of an event.
struct EventPrincipal {
    depth: i32,
    principal: Option<String>,
    problem: Option<String>,
    timeout_ms: i32,
}

thread_local! {
    /// EVENT_PRINCIPAL, prepared on first use and kept for the backend's life: a sql lane calls
    /// `_become_event` once per batch, and parsing and planning the lookup each time cost more
    /// than running it. Postgres' plan cache re-plans it when what it uses changes.
    static EVENT_PRINCIPAL_PLAN: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
}

fn event_principal(app_id: pgrx::Uuid, event_id: pgrx::Uuid) -> Option<EventPrincipal> {
    Spi::connect(|client| {
        let rows = EVENT_PRINCIPAL_PLAN.with(|slot| {
            let mut slot = slot.borrow_mut();
            if slot.is_none() {
                let uuid = PgOid::BuiltIn(PgBuiltInOids::UUIDOID);
                *slot = Some(client.prepare(EVENT_PRINCIPAL, &[uuid, uuid]).ok()?.keep());
            }
            client
                .select(slot.as_ref()?, Some(1), &[app_id.into(), event_id.into()])
                .ok()
        })?;
        if rows.is_empty() {
            return None;
        }
        let row = rows.first();
        Some(EventPrincipal {
            depth: row.get::<i32>(1).ok().flatten().unwrap_or(0),
            principal: row.get::<String>(2).ok().flatten(),
            problem: row.get::<String>(3).ok().flatten(),
            timeout_ms: row.get::<i32>(4).ok().flatten().unwrap_or(30_000),
        })
    })
}

/// Switches to the principal of the event `(app_id, event_id)` for running its handler
/// (internal; only picloud's own SECURITY DEFINER functions may call it). The principal is the
/// role that registered the event's trigger or handler, so the switch can reach a superuser
/// or a role with BYPASSRLS or CREATEROLE only when that very role registered the handler.
/// The handler's own timeout bounds it from here (api/budget.rs). Returns the token
/// `_unbecome` needs.
#[pg_extern(volatile, parallel_unsafe, name = "_become_event")]
pub fn picloud_become_event(app_id: pgrx::Uuid, event_id: pgrx::Uuid) -> i64 {
    let Some(event) = event_principal(app_id, event_id) else {
        PicloudError::InvalidParameter {
            what: "event",
            detail: format!("event {event_id} of app {app_id} does not exist"),
        }
        .raise()
    };
    if let Some(problem) = event.problem {
        PicloudError::PrincipalCannotRun {
            event: event_id.to_string(),
            problem,
        }
        .raise()
    }
    let Some(principal) = event.principal else {
        PicloudError::PrincipalCannotRun {
            event: event_id.to_string(),
            problem: "the handler no longer exists".into(),
        }
        .raise()
    };
    let role = role_oid(&principal);
    budget::start_handler(event.timeout_ms);
    become_role(role, event.depth)
}

fn become_role(role: pg_sys::Oid, event_depth: i32) -> i64 {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context: i32 = 0;
    // SAFETY: plain reads of the backend's current user and security context into locals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context) };
    // SAFETY: opens a GUC nest level that `_unbecome` (or transaction abort) closes.
    let guc_nest_level = unsafe { pg_sys::NewGUCNestLevel() };
    // The handler runs with the session's default search_path (what RESET would restore: the
    // database's or role's setting, else "$user", public), as it would in any session, not with
    // the fixed path of the picloud function that calls it; the nest level undoes this too.
    // SAFETY: both names are valid C strings; the reset string is a GUC-owned value that
    // set_config_option copies; GUC_ACTION_SAVE ties the change to the nest level opened above.
    unsafe {
        let reset = pg_sys::GetConfigOptionResetString(c"search_path".as_ptr());
        if !reset.is_null() {
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                reset,
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                pgrx::pg_sys::elog::PgLogLevel::ERROR as i32,
                false,
            );
        }
    }
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
    budget::end_handler();
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

    #[pg_test(
        error = "invalid event: event 00000000-0000-0000-0000-000000000002 of app 00000000-0000-0000-0000-000000000001 does not exist"
    )]
    fn become_an_unknown_event_is_refused() {
        let result = Spi::run(
            "SELECT picloud._become_event('00000000-0000-0000-0000-000000000001',
                                          '00000000-0000-0000-0000-000000000002')",
        );
        panic!("expected an error, got {result:?}");
    }

    #[pg_test]
    fn become_switches_to_the_events_principal_until_unbecome() {
        Spi::run(
            "CREATE ROLE picloud_pg_test_principal;
             CREATE FUNCTION public.pg_test_handler(jsonb) RETURNS void LANGUAGE sql AS 'SELECT NULL';
             GRANT EXECUTE ON FUNCTION public.pg_test_handler(jsonb) TO picloud_pg_test_principal",
        )
        .expect("create role and handler");
        let app = Spi::get_one::<pgrx::Uuid>("SELECT picloud.picloud_create_app('pg_test')")
            .expect("create app")
            .expect("an app id");
        Spi::run(&format!(
            "SELECT picloud.picloud_grant_app_role('{app}', 'picloud_pg_test_principal', 'admin')"
        ))
        .expect("grant");
        Spi::run("SET ROLE picloud_pg_test_principal").expect("set role");
        let script = Spi::get_one::<pgrx::Uuid>(&format!(
            "SELECT picloud.picloud_create_script('{app}', 'h', 'sql', 'public.pg_test_handler')"
        ))
        .expect("create script")
        .expect("a script id");
        let event = Spi::get_one::<pgrx::Uuid>(&format!(
            "SELECT picloud.picloud_enqueue('{app}', 'queue', 'x', '{{}}', '{script}', p_depth => 3)"
        ))
        .expect("enqueue")
        .expect("an event id");
        Spi::run("RESET ROLE").expect("reset role");
        let token =
            Spi::get_one::<i64>(&format!("SELECT picloud._become_event('{app}', '{event}')"))
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
