//! Refuses `LOCK TABLE` on picloud's tables to everyone but picloud's owners.
//!
//! Tenants hold row-level-security-narrowed DELETE on a few picloud tables (dropping their own
//! triggers and handlers, closing their inboxes), and Postgres lets any table-level UPDATE,
//! DELETE or TRUNCATE right take every lock mode with `LOCK TABLE`. One producer holding
//! `ACCESS EXCLUSIVE` on a picloud table in an open transaction would stall every app's
//! enqueues, claims and lanes. picloud's own functions take the row locks they need, so no
//! tenant ever needs an explicit table lock on picloud's tables: this utility hook refuses
//! them (42501) unless the current user is a superuser or a member of picloud_admin, also
//! through a view (LOCK on a view locks every relation its query reads, with the view owner's
//! rights, so a tenant's own view over a picloud table would otherwise do).
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
        if relid == pg_sys::InvalidOid {
            continue;
        }
        // SAFETY: get_rel_namespace reads the syscache for a valid oid.
        let in_picloud = unsafe { pg_sys::get_rel_namespace(relid) } == picloud;
        // LOCK on a view locks every relation its query reads, views within views included.
        // SAFETY: get_rel_relkind reads the syscache for a valid oid.
        let is_view =
            unsafe { pg_sys::get_rel_relkind(relid) } == pg_sys::RELKIND_VIEW as std::ffi::c_char;
        if in_picloud || (is_view && view_reads_picloud(relid, picloud)) {
            // SAFETY: get_rel_name answers a palloc'd copy or NULL.
            let name = unsafe { pg_sys::get_rel_name(relid) };
            let relation = if name.is_null() {
                relid.to_u32().to_string()
            } else {
                // SAFETY: a NUL-terminated string from the syscache copy.
                let name = unsafe { CStr::from_ptr(name) };
                format!("picloud.{}", name.to_string_lossy())
            };
            PicloudError::LockRefused { relation }.raise()
        }
    }
}

/// The relations a view's query reads, and theirs in turn, found through the dependencies of
/// the views' rewrite rules. Every name and operator is qualified: this runs under the
/// caller's search_path.
const VIEW_READS_PICLOUD: &str = "
    WITH RECURSIVE reads(relid) AS (
        SELECT $1
        UNION
        SELECT d.refobjid
        FROM reads
        JOIN pg_catalog.pg_rewrite r ON r.ev_class OPERATOR(pg_catalog.=) reads.relid
        JOIN pg_catalog.pg_depend d
          ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
         AND d.objid OPERATOR(pg_catalog.=) r.oid
         AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
    )
    SELECT EXISTS (SELECT FROM reads JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) reads.relid
                   WHERE c.relnamespace OPERATOR(pg_catalog.=) $2)";

fn view_reads_picloud(view: pg_sys::Oid, picloud: pg_sys::Oid) -> bool {
    Spi::get_one_with_args::<bool>(VIEW_READS_PICLOUD, &[view.into(), picloud.into()])
        .ok()
        .flatten()
        // When in doubt, refuse: a tenant never needs to lock a view over picloud's tables.
        .unwrap_or(true)
}
