//! What every enqueue path asks before writing an outbox row, answered in one call: event
//! ids, and the payload-size and depth limits.
//!
//! Event ids are time-ordered (UUID version 7: milliseconds since the epoch, then random
//! bits). The outbox's primary key is (app_id, event_id), so a random id would land each new
//! row on a random leaf page of that index; a time-ordered one appends to the right-most leaf
//! of its app, which keeps the index small and the WAL per enqueue low. Ids are not secrets:
//! every read of an event is checked by row-level security, so predictability costs nothing.

use crate::api::raw::{self, finfo_v1};
use crate::gucs;
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    /// xorshift64* state for the random part of event ids, seeded from the strong random
    /// source the first time a backend needs it.
    static RANDOM_STATE: Cell<u64> = const { Cell::new(0) };
}

fn next_random() -> u64 {
    RANDOM_STATE.with(|state| {
        let mut x = state.get();
        if x == 0 {
            let mut seed = [0u8; 8];
            // SAFETY: fills exactly the 8 bytes of a local buffer.
            let ok = unsafe { pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) };
            // SAFETY: MyProcPid is set for every backend; mixing it in keeps seeds apart even if
            // the strong source failed.
            let pid = unsafe { pg_sys::MyProcPid } as u64;
            x = if ok {
                u64::from_ne_bytes(seed)
            } else {
                0x9E37_79B9_7F4A_7C15 ^ pid
            };
            x |= 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// Builds a version 7 UUID from milliseconds since the Unix epoch and 128 random bits.
pub fn uuid_v7(unix_ms: u64, random_high: u64, random_low: u64) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    bytes[6..8].copy_from_slice(&random_high.to_be_bytes()[..2]);
    bytes[8..].copy_from_slice(&random_low.to_be_bytes());
    bytes[6] = 0x70 | (bytes[6] & 0x0F);
    bytes[8] = 0x80 | (bytes[8] & 0x3F);
    bytes
}

/// Milliseconds since the Unix epoch, from the clock Postgres' timestamps read.
fn unix_ms_now() -> u64 {
    // SAFETY: reads the system clock as a Postgres timestamp (microseconds since 2000-01-01).
    let micros_since_2000 = unsafe { pg_sys::GetCurrentTimestamp() };
    const UNIX_TO_2000_MS: i64 = 946_684_800_000;
    u64::try_from(micros_since_2000 / 1000 + UNIX_TO_2000_MS).unwrap_or(0)
}

/// A new, time-ordered event id (internal).
#[pg_extern(volatile, parallel_safe, name = "_new_event_id")]
pub fn picloud_new_event_id() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(uuid_v7(unix_ms_now(), next_random(), next_random()))
}

/// Most ids `_new_event_ids` makes at once: a uuid[] of more would pass the 1 GB that one
/// Postgres value may hold.
const MAX_IDS_AT_ONCE: usize = 50_000_000;

/// `picloud._new_event_ids(count)` (internal): `count` new event ids for a bulk enqueue, time-
/// ordered like `_new_event_id`'s, in one call: one `_new_event_id` call per row cost about
/// 1 us each (the function manager and pgrx's guard), a tenth of a 1,000-event
/// `picloud_enqueue_bulk`. Ascending, the order of the rows that take them, so that a bulk
/// enqueue appends to the end of its app's part of outbox_pkey instead of landing at random
/// places in the newest millisecond's. A negative count makes none.
#[pg_extern(volatile, parallel_safe, name = "_new_event_ids")]
pub fn picloud_new_event_ids(count: i32) -> Vec<pgrx::Uuid> {
    let count = usize::try_from(count).unwrap_or(0);
    if count > MAX_IDS_AT_ONCE {
        crate::error::PicloudError::InvalidParameter {
            what: "count",
            detail: format!("at most {MAX_IDS_AT_ONCE} event ids at once, got {count}"),
        }
        .raise()
    }
    let unix_ms = unix_ms_now();
    let mut ids: Vec<[u8; 16]> = (0..count)
        .map(|_| uuid_v7(unix_ms, next_random(), next_random()))
        .collect();
    ids.sort_unstable();
    ids.into_iter().map(pgrx::Uuid::from_bytes).collect()
}

/// A payload's size as its readers will see it: uncompressed (a compressed value of a few
/// kilobytes can hold hundreds of megabytes), without decompressing it.
///
/// # Safety
/// `payload` must be a non-null varlena datum.
pub unsafe fn payload_bytes(payload: pg_sys::Datum) -> usize {
    // SAFETY: the caller passes a varlena; the raw size is read from its header or toast pointer.
    unsafe { pg_sys::toast_raw_datum_size(payload) }
}

/// Deepest nesting of arrays and objects a payload may have. The supervisor reads every event
/// document with serde_json, whose limit is 128 levels; the document adds one level around the
/// payload and each dead-letter fan-out one more (at most `picloud.max_trigger_depth`, 8 by
/// default), so 100 leaves room.
pub const MAX_PAYLOAD_NESTING: u32 = 100;

/// Every jsonb container takes at least a 4-byte header: a payload this small cannot be
/// nested deeper than the limit, and is not walked.
const MIN_BYTES_PER_LEVEL: usize = 4;

/// How deep a jsonb payload of `raw_bytes` is nested, if deeper than `MAX_PAYLOAD_NESTING`.
///
/// # Safety
/// `payload` must be a non-null jsonb datum.
pub unsafe fn payload_too_deep(payload: pg_sys::Datum, raw_bytes: usize) -> Option<u32> {
    if raw_bytes <= MAX_PAYLOAD_NESTING as usize * MIN_BYTES_PER_LEVEL {
        return None;
    }
    use pg_sys::JsonbIteratorToken::{
        WJB_BEGIN_ARRAY, WJB_BEGIN_OBJECT, WJB_DONE, WJB_END_ARRAY, WJB_END_OBJECT,
    };
    // SAFETY: the caller passes a jsonb datum; detoasting it yields a Jsonb whose root
    // container the iterator walks (allocations in the current memory context).
    unsafe {
        let jsonb = pg_sys::pg_detoast_datum(payload.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
        let mut iterator = pg_sys::JsonbIteratorInit(&mut (*jsonb).root);
        let mut value: pg_sys::JsonbValue = std::mem::zeroed();
        let mut depth = 0u32;
        loop {
            match pg_sys::JsonbIteratorNext(&mut iterator, &mut value, false) {
                WJB_DONE => return None,
                WJB_BEGIN_ARRAY | WJB_BEGIN_OBJECT => {
                    depth += 1;
                    if depth > MAX_PAYLOAD_NESTING {
                        return Some(depth);
                    }
                }
                WJB_END_ARRAY | WJB_END_OBJECT => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
}

/// `picloud._payload_bytes(payload)` (internal): what `picloud.max_payload_bytes` limits, the
/// payload's uncompressed size in bytes. Every path that writes a payload measures it here, so
/// this is also where a jsonb payload nested deeper than `MAX_PAYLOAD_NESTING` is refused
/// (22023): the supervisor could not read it.
#[pg_extern(immutable, strict, parallel_safe, name = "_payload_bytes")]
pub fn picloud_payload_bytes(payload: pgrx::AnyElement) -> i32 {
    // SAFETY: a non-null anyelement argument of a varlena type (jsonb at every call site); a
    // fixed-length type would have no varlena header, so it is answered by its own length.
    let typlen = unsafe { pg_sys::get_typlen(payload.oid()) };
    if typlen != -1 {
        return i32::from(typlen.max(0));
    }
    let bytes = if payload.oid() == pg_sys::JSONBOID {
        // SAFETY: a non-null jsonb datum.
        unsafe { jsonb_payload_bytes(payload.datum()) }
    } else {
        // SAFETY: checked above that it is a varlena.
        unsafe { payload_bytes(payload.datum()) }
    };
    i32::try_from(bytes).unwrap_or(i32::MAX)
}

/// A jsonb payload's size (`payload_bytes`), after refusing it if it is nested deeper than
/// `MAX_PAYLOAD_NESTING` (22023): what `_payload_bytes` and `_oversized_payload` measure.
///
/// # Safety
/// `payload` must be a non-null jsonb datum.
unsafe fn jsonb_payload_bytes(payload: pg_sys::Datum) -> usize {
    // SAFETY: the caller passes a non-null jsonb datum.
    let bytes = unsafe { payload_bytes(payload) };
    // SAFETY: as above.
    if let Some(depth) = unsafe { payload_too_deep(payload, bytes) } {
        crate::error::PicloudError::InvalidParameter {
            what: "payload",
            detail: format!(
                "nested more than {MAX_PAYLOAD_NESTING} levels deep (at least {depth})"
            ),
        }
        .raise()
    }
    bytes
}

/// The SQL declaration's argument types, in order (checked against pg_proc: raw::arguments).
const OVERSIZED_ARG_TYPES: [pg_sys::Oid; 2] = [pg_sys::JSONBARRAYOID, pg_sys::INT4OID];

finfo_v1!(pg_finfo_picloud_oversized_payload);

/// `picloud._oversized_payload(payloads jsonb[], max_bytes integer) RETURNS integer`
/// (internal, declared in sql/030_enqueue.sql): the position (from 1) of the first of a bulk
/// enqueue's payloads whose size as `_payload_bytes` measures it passes `max_bytes`, or NULL;
/// a payload nested too deep before it is refused as `_payload_bytes` refuses it (22023), and
/// NULL elements are passed over (the caller refuses them). One call for the whole array: one
/// `_payload_bytes` call per payload cost about 1.5 us each (an `anyelement` argument, its
/// type looked up per call, pgrx's guard), more than a tenth of a 1,000-event bulk enqueue.
/// A C function rather than `#[pg_extern]`, whose array argument would copy every element.
///
/// # Safety
/// Called by Postgres' function manager with a valid `fcinfo` for that declaration.
#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn picloud_oversized_payload(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fcinfo is valid.
    let args = unsafe {
        raw::arguments(
            fcinfo,
            &OVERSIZED_ARG_TYPES,
            OVERSIZED_ARG_TYPES.len(),
            "picloud._oversized_payload",
        )
    };
    let found = if args[0].isnull || args[1].isnull {
        // Declared STRICT; a hand-made declaration without it gets NULL for NULL.
        None
    } else {
        // SAFETY: the first argument is a non-null jsonb[] (the declaration is checked above).
        unsafe { first_oversized(args[0].value, args[1].value.value() as i32) }
    };
    match found {
        Some(position) => pg_sys::Datum::from(position),
        None => {
            // SAFETY: fcinfo is valid; a NULL result.
            unsafe { (*fcinfo).isnull = true };
            pg_sys::Datum::from(0)
        }
    }
}

/// See `picloud_oversized_payload`.
///
/// # Safety
/// `payloads` must be a non-null jsonb[] datum.
unsafe fn first_oversized(payloads: pg_sys::Datum, max_bytes: i32) -> Option<i32> {
    let max_bytes = usize::try_from(max_bytes).unwrap_or(0);
    // SAFETY: a jsonb[] datum, detoasted into the current memory context; its elements are
    // jsonb datums (length -1, not by value, int-aligned) pointing into that copy.
    unsafe {
        let array = pg_sys::pg_detoast_datum(payloads.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
        let mut elements: *mut pg_sys::Datum = std::ptr::null_mut();
        let mut nulls: *mut bool = std::ptr::null_mut();
        let mut count: std::ffi::c_int = 0;
        pg_sys::deconstruct_array(
            array,
            pg_sys::JSONBOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
            &mut elements,
            &mut nulls,
            &mut count,
        );
        let count = usize::try_from(count).unwrap_or(0);
        for i in 0..count {
            if *nulls.add(i) {
                continue;
            }
            if jsonb_payload_bytes(*elements.add(i)) > max_bytes {
                return Some(i32::try_from(i + 1).unwrap_or(i32::MAX));
            }
        }
        None
    }
}

/// Admission of one event (internal): returns the depth the event gets, or -1 when the
/// payload is larger than `picloud.max_payload_bytes`, or -2 when the depth passes
/// `picloud.max_trigger_depth` or the requested depth is negative. The caller raises the
/// precise error for a negative answer. Reads the settings from memory, which is what makes
/// one call cheaper than the equivalent SQL expressions.
#[pg_extern(stable, parallel_safe, name = "_admit")]
pub fn picloud_admit(payload_bytes: i32, requested_depth: Option<i32>) -> i32 {
    if payload_bytes > gucs::MAX_PAYLOAD_BYTES.get() {
        return -1;
    }
    let requested = requested_depth.unwrap_or(0);
    let depth = requested.max(crate::api::principal::picloud_current_depth());
    if requested < 0 || depth > gucs::MAX_TRIGGER_DEPTH.get() {
        return -2;
    }
    depth
}

#[cfg(test)]
mod unit {
    use super::{picloud_outbox_row_valid as valid, uuid_v7};

    #[test]
    fn outbox_row_check() {
        assert!(valid("queue", "x", 0, 0, true, true));
        assert!(valid("dead_letter", &"o".repeat(200), 3, 2, false, false));
        assert!(!valid("mail", "x", 0, 0, true, true), "unknown source");
        assert!(!valid("queue", "", 0, 0, true, true), "empty op");
        assert!(
            !valid("queue", &"o".repeat(201), 0, 0, true, true),
            "op too long"
        );
        assert!(
            valid("queue", &"é".repeat(200), 0, 0, true, true),
            "characters, not bytes"
        );
        assert!(!valid("queue", "x", -1, 0, true, true), "negative depth");
        assert!(!valid("queue", "x", 0, -1, true, true), "negative attempts");
        assert!(
            !valid("queue", "x", 0, 0, false, true),
            "claim without lease"
        );
        assert!(
            !valid("queue", "x", 0, 0, true, false),
            "lease without claim"
        );
    }

    #[test]
    fn version_and_variant_bits_and_time_order() {
        let a = uuid_v7(1_700_000_000_000, u64::MAX, u64::MAX);
        assert_eq!(a[6] >> 4, 7);
        assert_eq!(a[8] >> 6, 0b10);
        let b = uuid_v7(1_700_000_000_001, 0, 0);
        assert!(
            b > a,
            "a later millisecond sorts later whatever the random bits"
        );
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn event_ids_are_version_7_and_increase_across_milliseconds() {
        let first = Spi::get_one::<String>("SELECT picloud._new_event_id()::text")
            .ok()
            .flatten();
        Spi::run("SELECT pg_sleep(0.002)").expect("sleep");
        let second = Spi::get_one::<String>("SELECT picloud._new_event_id()::text")
            .ok()
            .flatten();
        let (Some(first), Some(second)) = (first, second) else {
            panic!("no ids")
        };
        assert_eq!(first.as_bytes()[14], b'7', "{first}");
        assert!(second > first, "{first} then {second}");
    }

    #[pg_test]
    fn admission_applies_the_limits() {
        assert_eq!(
            Spi::get_one::<i32>("SELECT picloud._admit(100, NULL)"),
            Ok(Some(0))
        );
        assert_eq!(
            Spi::get_one::<i32>("SELECT picloud._admit(100, 3)"),
            Ok(Some(3))
        );
        assert_eq!(
            Spi::get_one::<i32>("SELECT picloud._admit(100, -1)"),
            Ok(Some(-2))
        );
        assert_eq!(
            Spi::get_one::<i32>("SELECT picloud._admit(100, 9)"),
            Ok(Some(-2))
        );
        assert_eq!(
            Spi::get_one::<i32>("SELECT picloud._admit(2000000, 0)"),
            Ok(Some(-1))
        );
    }

    /// The outbox's source domain holds exactly EVENT_SOURCES, and refuses anything else
    /// with check_violation.
    #[pg_test]
    fn event_source_domain_matches_the_list() {
        for source in super::EVENT_SOURCES {
            let cast = Spi::get_one_with_args::<String>(
                "SELECT $1::picloud.event_source::text",
                &[source.into()],
            );
            assert_eq!(cast, Ok(Some(source.to_string())));
        }
        // ... and nothing else: its definition lists exactly these.
        let listed: Vec<String> = super::EVENT_SOURCES
            .iter()
            .map(|s| format!("'{s}'::text"))
            .collect();
        let definition = Spi::get_one::<String>(
            "SELECT pg_catalog.pg_get_constraintdef(c.oid) FROM pg_catalog.pg_constraint c
             WHERE c.contypid = 'picloud.event_source'::regtype",
        );
        assert_eq!(
            definition,
            Ok(Some(format!(
                "CHECK ((VALUE = ANY (ARRAY[{}])))",
                listed.join(", ")
            )))
        );
        let refused = PgTryBuilder::new(|| {
            Spi::run("SELECT 'Queue'::picloud.event_source").map(|_| "none".to_string())
        })
        .catch_others(|e| match e {
            pgrx::pg_sys::panic::CaughtError::PostgresError(r) => {
                Ok(format!("{:?}", r.sql_error_code()))
            }
            _ => Ok("other".to_string()),
        })
        .execute();
        assert_eq!(refused, Ok("ERRCODE_CHECK_VIOLATION".to_string()));
    }
}

/// Sources an event may come from: the one list. The outbox's `picloud.event_source` domain
/// (sql/001_schema.sql) spells it out, because a domain check cannot afford a function call per
/// row, and a test holds the two equal; the SQL functions that check a source with a precise
/// error read it through `picloud._event_sources()`.
pub const EVENT_SOURCES: [&str; 7] = [
    "kv",
    "cron",
    "pubsub",
    "queue",
    "email",
    "dead_letter",
    "enqueue",
];

/// `picloud._event_sources()` (internal): EVENT_SOURCES, for the SQL functions that check a
/// source. Immutable, so a constant call is folded when a statement is planned.
#[pg_extern(immutable, parallel_safe, name = "_event_sources")]
pub fn picloud_event_sources() -> Vec<String> {
    EVENT_SOURCES.iter().map(|s| (*s).to_owned()).collect()
}

/// The outbox's row check of releases 0.1.0 and 0.2.0 (constraint `outbox_row_valid`): a known
/// source, an op of 1 to 200 characters, depth and attempt count not negative, and a claim
/// exactly when there is a lease. No longer part of the schema (domains and a policy replaced
/// it, see sql/001_schema.sql), but kept in the library: a database still at 0.1.0 or 0.2.0
/// calls it for every outbox row until ALTER EXTENSION UPDATE drops that check, and those
/// releases' install scripts declare it.
#[pg_extern(
    immutable,
    strict,
    parallel_safe,
    name = "_outbox_row_valid",
    sql = false
)]
pub fn picloud_outbox_row_valid(
    source: &str,
    op: &str,
    depth: i32,
    attempt_count: i32,
    unclaimed: bool,
    unleased: bool,
) -> bool {
    let op_chars = op.chars().count();
    EVENT_SOURCES.contains(&source)
        && (1..=200).contains(&op_chars)
        && depth >= 0
        && attempt_count >= 0
        && unclaimed == unleased
}
