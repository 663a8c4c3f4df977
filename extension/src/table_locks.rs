//! Refuses `LOCK TABLE` on picloud's tables to everyone but picloud's owners.
//!
//! Tenants hold row-level-security-narrowed DELETE on a few picloud tables (dropping their own
//! triggers and handlers, closing their inboxes), and Postgres lets any table-level UPDATE,
//! DELETE or TRUNCATE right take every lock mode with `LOCK TABLE`. One producer holding
//! `ACCESS EXCLUSIVE` on a picloud table in an open transaction would stall every app's
//! enqueues, claims and lanes. picloud's own functions take the row locks they need, so no
//! tenant ever needs an explicit table lock on picloud's tables: this utility hook refuses
//! them (42501) unless the current user is a superuser or a member of picloud_admin.
//!
//! The hook itself carries no pgrx guard, for the same reason as `picloud_enqueue` (see
//! api/enqueue.rs): every utility statement passes through it, and an error raised further in
//! (a procedure's `PC001`, say) must reach the client with its own SQLSTATE. The check runs in
//! a guarded function; the unguarded frame holds only copies of the arguments.

use crate::api::access;
use crate::error::PicloudError;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

// Postgres' own utility processing, declared here rather than called through pgrx's binding:
// pgrx wraps each binding so that a Postgres ERROR becomes a Rust panic, which would then have
// to unwind through this unguarded hook into Postgres' C frames. Called directly, an ERROR
// longjmps past the hook exactly as it does past any C hook.
unsafe extern "C-unwind" {
    fn standard_ProcessUtility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

/// Installs the hook (from `_PG_init`, while the postmaster loads the library).
pub fn install() {
    // SAFETY: _PG_init runs once per process before any statement, single-threaded; the
    // previous hook is kept and called, as every ProcessUtility hook must.
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: Postgres passes a valid planned utility statement.
    unsafe { check_statement(pstmt) };
    // SAFETY: the hook chain's contract: pass every argument on unchanged.
    unsafe {
        match PREVIOUS_HOOK {
            Some(previous) => previous(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
}

/// Raises 42501 for a `LOCK TABLE` naming a picloud table, unless the user owns picloud.
///
/// # Safety
/// `pstmt` must be the valid statement Postgres passed to the hook.
#[pg_guard]
unsafe extern "C-unwind" fn check_statement(pstmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: a valid PlannedStmt; its utilityStmt is a node or NULL.
    let statement = unsafe { (*pstmt).utilityStmt };
    // SAFETY: statement is a valid node when not NULL.
    if statement.is_null() || unsafe { (*statement).type_ } != pg_sys::NodeTag::T_LockStmt {
        return;
    }
    // SAFETY: get_namespace_oid with missing_ok answers InvalidOid when picloud is absent.
    let picloud = unsafe { pg_sys::get_namespace_oid(c"picloud".as_ptr(), true) };
    if picloud == pg_sys::InvalidOid || access::picloud_is_owner() {
        return;
    }
    let lock = statement.cast::<pg_sys::LockStmt>();
    // SAFETY: a LockStmt's relations is a non-empty List of RangeVar pointers (PG15's array
    // list: `length` cells at `elements`).
    let relations = unsafe { (*lock).relations };
    if relations.is_null() {
        return;
    }
    // SAFETY: as above.
    let length = usize::try_from(unsafe { (*relations).length }).unwrap_or(0);
    for index in 0..length {
        // SAFETY: index < length; every cell of this list holds a pointer.
        let relation = unsafe { (*(*relations).elements.add(index)).ptr_value };
        let range_var = relation.cast::<pg_sys::RangeVar>();
        // SAFETY: resolves the name without locking; a missing relation answers InvalidOid and
        // is left to Postgres' own error.
        let relid = unsafe {
            pg_sys::RangeVarGetRelidExtended(
                range_var,
                pg_sys::NoLock as pg_sys::LOCKMODE,
                pg_sys::RVROption::RVR_MISSING_OK,
                None,
                std::ptr::null_mut(),
            )
        };
        // SAFETY: get_rel_namespace reads the syscache for a valid or invalid oid.
        if relid != pg_sys::InvalidOid && unsafe { pg_sys::get_rel_namespace(relid) } == picloud {
            // SAFETY: get_rel_name answers a palloc'd copy or NULL.
            let name = unsafe { pg_sys::get_rel_name(relid) };
            let relation = if name.is_null() {
                relid.to_u32().to_string()
            } else {
                // SAFETY: a NUL-terminated string from the syscache copy.
                format!(
                    "picloud.{}",
                    unsafe { CStr::from_ptr(name) }.to_string_lossy()
                )
            };
            PicloudError::LockRefused { relation }.raise()
        }
    }
}
