//! What the few functions written against Postgres' C calling convention share (those that
//! pass datums through untouched, which `#[pg_extern]`'s conversions would copy or parse):
//! the info record Postgres looks up, their arguments, and reading text without a copy.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Declares the version-1 info record Postgres looks up as `pg_finfo_<name>` for the C function
/// `<name>` (what `PG_FUNCTION_INFO_V1(name)` does in C).
macro_rules! finfo_v1 {
    ($info:ident) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $info() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            const V1: ::pgrx::pg_sys::Pg_finfo_record =
                ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
pub(crate) use finfo_v1;

thread_local! {
    /// Functions whose declared argument types this backend has checked (by oid).
    static CHECKED: std::cell::RefCell<Vec<pg_sys::Oid>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The call's arguments, whose declared types (in pg_proc) must be the first `nargs` of
/// `expected`, for `oldest` <= `nargs` <= `expected.len()`: the declaration a schema of an
/// earlier release made is a prefix of today's (new parameters are added at the end, and read
/// as NULL when absent), which keeps the library working between a server restart and
/// `ALTER EXTENSION picloud UPDATE`. These functions read their arguments by position as raw
/// datums: a declaration out of step with the Rust side (a parameter reordered or retyped by
/// hand) would read one type as another and could crash the server, so it is refused instead
/// (42P13), checked once per backend and function.
///
/// # Safety
/// `fcinfo` must be the valid call information Postgres passed in.
pub unsafe fn arguments<'a>(
    fcinfo: pg_sys::FunctionCallInfo,
    expected: &[pg_sys::Oid],
    oldest: usize,
    function: &str,
) -> &'a [pg_sys::NullableDatum] {
    // SAFETY: fcinfo is valid; `args` is a flexible array member with `nargs` entries.
    unsafe {
        let nargs = usize::try_from((*fcinfo).nargs).unwrap_or(0);
        if nargs < oldest || nargs > expected.len() {
            // Only a hand-made declaration with another signature could get here.
            let wanted = if oldest == expected.len() {
                oldest.to_string()
            } else {
                format!("{oldest} to {}", expected.len())
            };
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_FUNCTION_DEFINITION,
                format!("{function} expects {wanted} arguments, got {nargs}")
            );
        }
        let oid = if (*fcinfo).flinfo.is_null() {
            pg_sys::InvalidOid
        } else {
            (*(*fcinfo).flinfo).fn_oid
        };
        if !CHECKED.with(|checked| checked.borrow().contains(&oid)) {
            check_declaration(oid, &expected[..nargs], function);
            CHECKED.with(|checked| checked.borrow_mut().push(oid));
        }
        (*fcinfo).args.as_slice(nargs)
    }
}

/// Raises 42P13 unless function `oid` is declared with exactly the argument types `expected`.
fn check_declaration(oid: pg_sys::Oid, expected: &[pg_sys::Oid], function: &str) {
    // SAFETY: the syscache lookup returns a pinned pg_proc tuple or NULL; its fixed part is a
    // FormData_pg_proc whose proargtypes holds pronargs oids; released before returning.
    let declared: Option<Vec<pg_sys::Oid>> = unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            pg_sys::Datum::from(oid),
        );
        if tuple.is_null() {
            None
        } else {
            let header = (*tuple).t_data;
            let proc_ = header
                .cast::<u8>()
                .add(usize::from((*header).t_hoff))
                .cast::<pg_sys::FormData_pg_proc>();
            let count = usize::try_from((*proc_).pronargs).unwrap_or(0);
            let types = (*proc_).proargtypes.values.as_slice(count).to_vec();
            pg_sys::ReleaseSysCache(tuple);
            Some(types)
        }
    };
    if declared.as_deref() != Some(expected) {
        let name = |oids: &[pg_sys::Oid]| {
            oids.iter()
                .map(|&t| {
                    // SAFETY: format_type_be names any type oid (or says it is unknown).
                    unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_be(t)) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_FUNCTION_DEFINITION,
            format!(
                "{function} is declared with arguments ({}), but its C code reads ({})",
                declared
                    .as_deref()
                    .map_or_else(|| "unknown".to_owned(), name),
                name(expected)
            ),
            "Drop the hand-made declaration, or reinstall the extension."
        );
    }
}

/// The bytes of a text argument (detoasted if it is stored compressed or out of line; an
/// argument written in the query comes back as it is).
///
/// # Safety
/// `value` must be a non-null text datum.
pub unsafe fn text_bytes<'a>(value: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: a text datum is a varlena; a detoasted copy lives in the current memory context,
    // which lasts for this function call.
    unsafe {
        let text = pg_sys::pg_detoast_datum_packed(value.cast_mut_ptr());
        pgrx::varlena::varlena_to_byte_slice(text)
    }
}
