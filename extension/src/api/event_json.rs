//! The JSON document a handler receives for an event, built directly as jsonb: the C function
//! `picloud_event_jsonb` that schemas 0.3.0 declare as `picloud._event_jsonb`. From 0.4.0 the
//! schema declares `_event_jsonb` as an inlined `jsonb_build_object` instead (sql/031_claims.sql:
//! measured faster in release builds, where each of this builder's calls into the server pays
//! pgrx's error guard); this one stays so that the library keeps serving a 0.3.0 schema until
//! `ALTER EXTENSION picloud UPDATE`, and because the 0.2.0 to 0.3.0 upgrade script declares it.
//! `payload` is copied in as the jsonb it already is. The result equals
//! `jsonb_build_object('event_id', .., 'app_id', .., 'source', .., 'op', .., 'payload', ..,
//! 'depth', .., 'attempt', .., 'trigger_id', .., 'script_id', ..)` (tested).

use crate::api::raw::{self, finfo_v1, text_bytes};
use pgrx::pg_sys;
use pgrx::prelude::*;

const EVENT_ID: usize = 0;
const APP_ID: usize = 1;
const SOURCE: usize = 2;
const OP: usize = 3;
const PAYLOAD: usize = 4;
const DEPTH: usize = 5;
const ATTEMPT: usize = 6;
const TRIGGER_ID: usize = 7;
const SCRIPT_ID: usize = 8;
const ARGS: usize = 9;

/// The SQL declaration's argument types, in order (checked against pg_proc: raw::arguments).
const ARG_TYPES: [pg_sys::Oid; ARGS] = [
    pg_sys::UUIDOID,  // EVENT_ID
    pg_sys::UUIDOID,  // APP_ID
    pg_sys::TEXTOID,  // SOURCE
    pg_sys::TEXTOID,  // OP
    pg_sys::JSONBOID, // PAYLOAD
    pg_sys::INT4OID,  // DEPTH
    pg_sys::INT4OID,  // ATTEMPT
    pg_sys::UUIDOID,  // TRIGGER_ID
    pg_sys::UUIDOID,  // SCRIPT_ID
];

finfo_v1!(pg_finfo_picloud_event_jsonb);

/// `picloud._event_jsonb(event_id uuid, app_id uuid, source text, op text, payload jsonb,
/// depth integer, attempt integer, trigger_id uuid, script_id uuid) RETURNS jsonb`, as
/// sql/upgrades/picloud--0.2.0--0.3.0.sql declares it. A NULL argument becomes a JSON null.
///
/// # Safety
/// Called by Postgres' function manager with a valid `fcinfo` for that declaration.
#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn picloud_event_jsonb(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fcinfo is valid.
    let args =
        unsafe { raw::arguments(fcinfo, &ARG_TYPES, ARG_TYPES.len(), "picloud._event_jsonb") };
    let arg = |i: usize| (!args[i].isnull).then_some(args[i].value);
    let mut doc = Builder::new();
    // SAFETY: each argument carries the declared SQL type.
    unsafe {
        doc.uuid(c"event_id", arg(EVENT_ID));
        doc.uuid(c"app_id", arg(APP_ID));
        doc.text(c"source", arg(SOURCE));
        doc.text(c"op", arg(OP));
        doc.jsonb(c"payload", arg(PAYLOAD));
        doc.int(c"depth", arg(DEPTH));
        doc.int(c"attempt", arg(ATTEMPT));
        doc.uuid(c"trigger_id", arg(TRIGGER_ID));
        doc.uuid(c"script_id", arg(SCRIPT_ID));
        doc.finish()
    }
}

/// A jsonb object under construction (Postgres' JsonbParseState), in the current memory
/// context.
struct Builder {
    state: *mut pg_sys::JsonbParseState,
}

impl Builder {
    fn new() -> Builder {
        let mut builder = Builder {
            state: std::ptr::null_mut(),
        };
        // SAFETY: starts an object in a fresh parse state.
        unsafe {
            pg_sys::pushJsonbValue(
                &mut builder.state,
                pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT,
                std::ptr::null_mut(),
            );
        }
        builder
    }

    /// A string value (or key) from bytes, copied into the current memory context.
    fn string(bytes: &[u8]) -> pg_sys::JsonbValue {
        // SAFETY: palloc'd copy of exactly `bytes.len()` bytes.
        let copy = unsafe {
            let copy: *mut u8 = pg_sys::palloc(bytes.len().max(1)).cast();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), copy, bytes.len());
            copy
        };
        pg_sys::JsonbValue {
            type_: pg_sys::jbvType::jbvString,
            val: pg_sys::JsonbValue__bindgen_ty_1 {
                string: pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
                    len: i32::try_from(bytes.len()).unwrap_or(i32::MAX),
                    val: copy.cast(),
                },
            },
        }
    }

    fn null() -> pg_sys::JsonbValue {
        pg_sys::JsonbValue {
            type_: pg_sys::jbvType::jbvNull,
            val: pg_sys::JsonbValue__bindgen_ty_1 { boolean: false },
        }
    }

    /// Adds `key: value`.
    ///
    /// # Safety
    /// `value` must be a scalar or a binary container valid for this call.
    unsafe fn put(&mut self, key: &std::ffi::CStr, mut value: pg_sys::JsonbValue) {
        let mut key = Builder::string(key.to_bytes());
        // SAFETY: the object was begun in `new`; pushJsonbValue copies what it keeps.
        unsafe {
            pg_sys::pushJsonbValue(
                &mut self.state,
                pg_sys::JsonbIteratorToken::WJB_KEY,
                &mut key,
            );
            pg_sys::pushJsonbValue(
                &mut self.state,
                pg_sys::JsonbIteratorToken::WJB_VALUE,
                &mut value,
            );
        }
    }

    /// # Safety
    /// `value` must be a uuid datum.
    unsafe fn uuid(&mut self, key: &std::ffi::CStr, value: Option<pg_sys::Datum>) {
        let json = match value {
            None => Builder::null(),
            Some(datum) => {
                // SAFETY: a uuid datum points to its 16 bytes.
                let bytes: &[u8; 16] = unsafe { &*datum.cast_mut_ptr::<[u8; 16]>() };
                Builder::string(hyphenated(bytes).as_bytes())
            }
        };
        // SAFETY: a scalar.
        unsafe { self.put(key, json) };
    }

    /// # Safety
    /// `value` must be a text datum.
    unsafe fn text(&mut self, key: &std::ffi::CStr, value: Option<pg_sys::Datum>) {
        let json = match value {
            None => Builder::null(),
            // SAFETY: a non-null text datum.
            Some(datum) => Builder::string(unsafe { text_bytes(datum) }),
        };
        // SAFETY: a scalar.
        unsafe { self.put(key, json) };
    }

    /// # Safety
    /// `value` must be an int4 datum.
    unsafe fn int(&mut self, key: &std::ffi::CStr, value: Option<pg_sys::Datum>) {
        let json = match value {
            None => Builder::null(),
            Some(datum) => {
                // Truncation is the int4 datum's own representation.
                let n = datum.value() as i32;
                // SAFETY: builds a numeric in the current memory context.
                let numeric = unsafe { pg_sys::int64_to_numeric(i64::from(n)) };
                pg_sys::JsonbValue {
                    type_: pg_sys::jbvType::jbvNumeric,
                    val: pg_sys::JsonbValue__bindgen_ty_1 { numeric },
                }
            }
        };
        // SAFETY: a scalar.
        unsafe { self.put(key, json) };
    }

    /// # Safety
    /// `value` must be a jsonb datum.
    unsafe fn jsonb(&mut self, key: &std::ffi::CStr, value: Option<pg_sys::Datum>) {
        let json = match value {
            None => Builder::null(),
            Some(datum) => {
                // SAFETY: detoasted (aligned, with a 4-byte header) so its container can be read
                // in place; pushJsonbValue copies its contents into the new document.
                unsafe {
                    let jsonb: *mut pg_sys::Jsonb =
                        pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast();
                    let size = pgrx::varlena::varsize_any(jsonb.cast());
                    pg_sys::JsonbValue {
                        type_: pg_sys::jbvType::jbvBinary,
                        val: pg_sys::JsonbValue__bindgen_ty_1 {
                            binary: pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_4 {
                                len: i32::try_from(size.saturating_sub(pg_sys::VARHDRSZ))
                                    .unwrap_or(i32::MAX),
                                data: &mut (*jsonb).root,
                            },
                        },
                    }
                }
            }
        };
        // SAFETY: a binary container valid for this call.
        unsafe { self.put(key, json) };
    }

    /// Ends the object and returns it as a jsonb datum.
    ///
    /// # Safety
    /// Called once, after the fields.
    unsafe fn finish(mut self) -> pg_sys::Datum {
        // SAFETY: closes the object begun in `new` and serialises it.
        unsafe {
            let value = pg_sys::pushJsonbValue(
                &mut self.state,
                pg_sys::JsonbIteratorToken::WJB_END_OBJECT,
                std::ptr::null_mut(),
            );
            pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(value))
        }
    }
}

/// A uuid in its canonical text form (lower-case hex, hyphenated 8-4-4-4-12).
fn hyphenated(bytes: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod unit {
    #[test]
    fn uuid_text() {
        let bytes = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(
            super::hyphenated(&bytes),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// The builder (as a 0.3.0 schema declares it) equals jsonb_build_object, which the 0.4.0
    /// schema's `_event_jsonb` is, for every kind of payload and for NULLs.
    #[pg_test]
    fn same_document_as_jsonb_build_object() {
        Spi::run(
            "CREATE FUNCTION pg_temp.event_jsonb_c(uuid, uuid, text, text, jsonb, integer, integer,
                                                   uuid, uuid) RETURNS jsonb
             LANGUAGE c IMMUTABLE AS '$libdir/picloud', 'picloud_event_jsonb'",
        )
        .expect("declare the builder");
        let same = Spi::get_one::<bool>(
            "SELECT bool_and(pg_temp.event_jsonb_c(e, a, s, o, p, d, n, t, c)
                             = jsonb_build_object('event_id', e, 'app_id', a, 'source', s, 'op', o,
                                 'payload', p, 'depth', d, 'attempt', n, 'trigger_id', t, 'script_id', c)
                             AND picloud._event_jsonb(e, a, s, o, p, d, n, t, c)
                                 = pg_temp.event_jsonb_c(e, a, s, o, p, d, n, t, c))
             FROM (VALUES
                 (gen_random_uuid(), gen_random_uuid(), 'kv', 'set', '{\"a\": [1, 2, {\"b\": null}]}'::jsonb, 0, 1, NULL::uuid, gen_random_uuid()),
                 (gen_random_uuid(), gen_random_uuid(), 'queue', 'élan \"quoted\"\\n', '5'::jsonb, 3, 7, gen_random_uuid(), gen_random_uuid()),
                 (gen_random_uuid(), gen_random_uuid(), 'cron', repeat('x', 200), '\"text\"'::jsonb, 8, 2147483647, NULL, gen_random_uuid()),
                 (gen_random_uuid(), gen_random_uuid(), 'email', 'o', '[]'::jsonb, 1, 1, NULL, gen_random_uuid()),
                 (gen_random_uuid(), gen_random_uuid(), 'pubsub', 'o', jsonb_build_object('big', repeat('y', 100000)), 1, 1, NULL, gen_random_uuid()),
                 (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
             ) AS v(e, a, s, o, p, d, n, t, c)",
        );
        assert_eq!(same, Ok(Some(true)));
    }
}
