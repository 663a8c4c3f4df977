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

/// The call's arguments, which must be exactly `expected` (its SQL declaration's count).
///
/// # Safety
/// `fcinfo` must be the valid call information Postgres passed in.
pub unsafe fn arguments<'a>(
    fcinfo: pg_sys::FunctionCallInfo,
    expected: usize,
    function: &str,
) -> &'a [pg_sys::NullableDatum] {
    // SAFETY: fcinfo is valid; `args` is a flexible array member with `nargs` entries.
    unsafe {
        let nargs = usize::try_from((*fcinfo).nargs).unwrap_or(0);
        if nargs != expected {
            // Only a hand-made declaration with another signature could get here.
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_FUNCTION_DEFINITION,
                format!("{function} expects {expected} arguments, got {nargs}")
            );
        }
        (*fcinfo).args.as_slice(nargs)
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
