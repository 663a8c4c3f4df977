//! Text arguments of picloud's C functions, read as UTF-8 with a clear error.
//!
//! pgrx's `&str` argument panics (SQLSTATE XX000, an internal error) on text that is not valid
//! UTF-8, which a database with `SQL_ASCII` encoding lets any client store. `Utf8` refuses it
//! instead with `22021` (character not in repertoire), like Postgres's own conversions, before
//! the function body runs.

use crate::error::PicloudError;
use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::FromDatum;
use std::ops::Deref;

/// A `text` argument known to be valid UTF-8.
#[derive(Debug, Clone, Copy)]
pub struct Utf8<'a>(pub &'a str);

impl Deref for Utf8<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        self.0
    }
}

impl FromDatum for Utf8<'_> {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: a non-null text datum; detoasting returns a varlena that lives for the rest
        // of the call (palloc'd in the function's memory context, or the datum itself).
        let bytes = unsafe {
            let varlena = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
            pgrx::varlena::varlena_to_byte_slice(varlena)
        };
        match std::str::from_utf8(bytes) {
            Ok(text) => Some(Utf8(text)),
            Err(e) => PicloudError::InvalidUtf8 {
                at_byte: e.valid_up_to(),
            }
            .raise(),
        }
    }
}

// SAFETY: the argument is declared `text` (SqlTranslatable below) and Utf8 reads it as one.
unsafe impl<'fcx> ArgAbi<'fcx> for Utf8<'fcx> {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the caller guarantees the argument is a text datum.
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: as above.
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

// SAFETY: Utf8 is Postgres `text`, as &str is.
unsafe impl SqlTranslatable for Utf8<'_> {
    const TYPE_IDENT: &'static str = <&str as SqlTranslatable>::TYPE_IDENT;
    const TYPE_ORIGIN: TypeOrigin = <&str as SqlTranslatable>::TYPE_ORIGIN;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> =
        <&str as SqlTranslatable>::ARGUMENT_SQL;
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> = <&str as SqlTranslatable>::RETURN_SQL;
}
