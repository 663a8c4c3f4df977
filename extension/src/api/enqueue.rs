//! `picloud_enqueue`, the call every producer makes, with its common case in Rust.
//!
//! Why not PL/pgSQL: a PL/pgSQL function re-initialises each of its expressions once per
//! transaction, and an application typically enqueues one event per transaction, so that
//! set-up was most of an enqueue's cost (about 20 µs of 35–50 µs on the benchmark machine).
//!
//! The common case — a handler given directly; no trigger, inbox or idempotency key; a known
//! source, a valid op, payload and depth within the limits, and an ordering key (if any) of at
//! most 4096 bytes — is checked here from the arguments and written with one INSERT prepared
//! once per backend and kept. The INSERT reads the handler's row (and, for a caller that is not
//! a picloud owner, its producer or admin right in the app), so a missing handler or right
//! simply inserts nothing. An ordered event's INSERT first takes its key's lock and then its
//! place, as `picloud._order_event` does in the general path.
//!
//! `picloud.picloud_enqueue` is the C function `picloud_enqueue` below: it runs the common case
//! (`picloud_enqueue_fast`, also callable as `picloud._enqueue_fast`, which answers NULL for
//! every call it does not write) and hands every other call, with the same arguments, to
//! `picloud._enqueue_general`, the PL/pgSQL implementation of the whole contract, which raises
//! each error with its SQLSTATE. Errors are raised there and not here because an error that
//! passes through pgrx keeps its SQLSTATE only if it is one of Postgres' own, and picloud's are
//! not (class PC); so the call into the general path is made without pgrx's guard. The fast
//! path changes nothing unless it succeeds, and every error is raised in exactly one place.
//!
//! Why not a SQL function `coalesce(_enqueue_fast(...), _enqueue_general(...))`, as this was at
//! first: the second call was parsed, planned and set up in every calling statement although it
//! almost never runs, which cost a one-event transaction about 5% of its throughput (measured).

use crate::api::raw::{self, finfo_v1, text_bytes};
use crate::api::wake::{self, WakeFor};
use crate::api::{access, admission};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::CStr;
use std::thread::LocalKey;

/// The SQL signature's argument positions (see sql/030_enqueue.sql).
const APP: usize = 0;
const SOURCE: usize = 1;
const OP: usize = 2;
const PAYLOAD: usize = 3;
const SCRIPT: usize = 4;
const TRIGGER: usize = 5;
const DEPTH: usize = 6;
const RUN_AT: usize = 7;
const REPLY_TO: usize = 8;
const IDEMPOTENCY_KEY: usize = 9;
const ORDERING_KEY: usize = 10;
const ON_DEAD_LETTER: usize = 11;
const PRIORITY: usize = 12;
const ARGS: usize = 13;
/// Arguments of the declaration a 0.3.0 schema makes (up to IDEMPOTENCY_KEY): taken until
/// `ALTER EXTENSION picloud UPDATE` has run, the missing ones read as NULL.
const ARGS_0_3: usize = 10;

/// The SQL declaration's argument types, in order (checked against pg_proc: raw::arguments).
const ARG_TYPES: [pg_sys::Oid; ARGS] = [
    pg_sys::UUIDOID,        // APP
    pg_sys::TEXTOID,        // SOURCE
    pg_sys::TEXTOID,        // OP
    pg_sys::JSONBOID,       // PAYLOAD
    pg_sys::UUIDOID,        // SCRIPT
    pg_sys::UUIDOID,        // TRIGGER
    pg_sys::INT4OID,        // DEPTH
    pg_sys::TIMESTAMPTZOID, // RUN_AT
    pg_sys::TEXTOID,        // REPLY_TO
    pg_sys::TEXTOID,        // IDEMPOTENCY_KEY
    pg_sys::TEXTOID,        // ORDERING_KEY
    pg_sys::TEXTOID,        // ON_DEAD_LETTER
    pg_sys::INT2OID,        // PRIORITY
];

/// An op is 1 to 200 characters; no encoding needs more than 4 bytes per character.
const MAX_OP_BYTES: usize = 200 * 4;

// Every name and operator in these statements is schema-qualified: their plans are made (and
// remade) under the caller's search_path, where a tenant's schema may shadow a built-in.

/// The key's transaction-level lock, the same as `picloud._order_event` takes (its class and
/// its hash of `app:key`), in FROM so that it is held before the row takes its place
/// (`nextval`, evaluated in the target list, once the row is built). Keep the two in step.
macro_rules! keyed_insert {
    ($($rights:tt)*) => {
        concat!(
            "
    INSERT INTO picloud.outbox (app_id, event_id, source, op, script_id, payload, depth, due_at, priority,
                                ordering_key, ordering_seq, ordering_blocks)
    SELECT $1, $2, $3, $4, s.script_id, $6, $7, coalesce($8, pg_catalog.now()), coalesce($9, 0::pg_catalog.int2),
           $10, pg_catalog.nextval('picloud.ordering_seq'::pg_catalog.regclass), $11
    FROM (SELECT pg_catalog.pg_advisory_xact_lock(1885954924,
              pg_catalog.hashtext($1::pg_catalog.text OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) $10))) l,
         picloud.scripts s
    WHERE s.app_id OPERATOR(pg_catalog.=) $1 AND s.script_id OPERATOR(pg_catalog.=) $5",
            $($rights)*,
            "\0"
        )
    };
}

/// The producer or admin right in the app, for callers that are not picloud owners (what
/// `picloud_has_capability(app, 'enqueue')` asks).
macro_rules! producer_right {
    () => {
        "
      AND EXISTS (SELECT FROM picloud.app_roles r
                  WHERE r.app_id OPERATOR(pg_catalog.=) $1
                    AND r.role_name OPERATOR(pg_catalog.=) CURRENT_USER
                    AND r.capability OPERATOR(pg_catalog.=) ANY ('{admin,producer}'::pg_catalog.text[]))"
    };
}

/// The longest ordering key taken here, in bytes: 4096 bytes are at most 4096 characters, the
/// limit; a longer key goes to the general path, which counts its characters.
const MAX_ORDERING_KEY_BYTES: usize = 4096;

/// The common case, unordered (for the statement's rights, see `producer_right!`).
macro_rules! plain_insert {
    ($($rights:tt)*) => {
        concat!(
            "
    INSERT INTO picloud.outbox (app_id, event_id, source, op, script_id, payload, depth, due_at, priority)
    SELECT $1, $2, $3, $4, s.script_id, $6, $7, coalesce($8, pg_catalog.now()), coalesce($9, 0::pg_catalog.int2)
    FROM picloud.scripts s
    WHERE s.app_id OPERATOR(pg_catalog.=) $1 AND s.script_id OPERATOR(pg_catalog.=) $5",
            $($rights)*,
            "\0"
        )
    };
}

/// A statement as the C string SPI takes.
const fn statement(sql: &'static str) -> &'static CStr {
    match CStr::from_bytes_with_nul(sql.as_bytes()) {
        Ok(sql) => sql,
        Err(_) => panic!("a statement ends with its only NUL"),
    }
}

/// Callers who act on every app (superusers, picloud_admin): the handler must exist in the app.
const OWNER_INSERT: &CStr = statement(plain_insert!(""));
/// Every other caller: as above, and the caller holds the producer or admin right in the app.
const PRODUCER_INSERT: &CStr = statement(plain_insert!(producer_right!()));
/// Ordered events, for the same two kinds of callers (see `keyed_insert!`).
const OWNER_KEYED_INSERT: &CStr = statement(keyed_insert!(""));
const PRODUCER_KEYED_INSERT: &CStr = statement(keyed_insert!(producer_right!()));

/// The parameter types of the keyed statements; the plain ones take the first nine.
const INSERT_TYPES: [pg_sys::Oid; 11] = [
    pg_sys::UUIDOID,
    pg_sys::UUIDOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::UUIDOID,
    pg_sys::JSONBOID,
    pg_sys::INT4OID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::INT2OID,
    pg_sys::TEXTOID,
    pg_sys::BOOLOID,
];
const PLAIN_PARAMS: usize = 9;

thread_local! {
    // Plans prepared on first use and kept for the backend's life. Postgres' plan cache
    // re-plans them by itself when the tables or functions they use change.
    static OWNER_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static PRODUCER_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static OWNER_KEYED_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static PRODUCER_KEYED_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
    static LANE_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kind of lane that takes a handler's first attempts, if any (see `wake_for`).
const LANE_OF_HANDLER: &CStr = c"
    SELECT s.kind FROM picloud.scripts s
    WHERE s.app_id OPERATOR(pg_catalog.=) $1 AND s.script_id OPERATOR(pg_catalog.=) $2
      AND NOT EXISTS (SELECT FROM picloud.handler_limits l
                      WHERE l.app_id OPERATOR(pg_catalog.=) $1 AND l.script_id OPERATOR(pg_catalog.=) $2)";

/// One argument as Postgres passed it.
#[derive(Clone, Copy)]
struct Arg {
    value: pg_sys::Datum,
    is_null: bool,
}

impl Arg {
    fn null_flag(self) -> std::ffi::c_char {
        if self.is_null {
            b'n' as std::ffi::c_char
        } else {
            b' ' as std::ffi::c_char
        }
    }
}

finfo_v1!(pg_finfo_picloud_enqueue_fast);

/// `picloud._enqueue_fast(...)`, declared in sql/030_enqueue.sql with picloud_enqueue's
/// arguments: the new event's id, or NULL when it wrote nothing (see the module comment).
///
/// # Safety
/// Called by Postgres' function manager with a valid `fcinfo` for that declaration.
#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn picloud_enqueue_fast(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fcinfo is valid for this call (see above).
    let args = unsafe { read_args(fcinfo) };
    // SAFETY: the arguments carry the declared SQL types.
    match args.and_then(|args| unsafe { enqueue_common(&args) }) {
        Some(event_id) => event_id,
        None => {
            // SAFETY: fcinfo is valid; marks the result NULL.
            unsafe { (*fcinfo).isnull = true };
            pg_sys::Datum::from(0)
        }
    }
}

/// The call's arguments; None for the declaration of an older schema, whose outbox lacks
/// columns the kept INSERT writes: such a call takes the general path of that schema until
/// `ALTER EXTENSION picloud UPDATE` has run.
///
/// # Safety
/// `fcinfo` must be valid.
unsafe fn read_args(fcinfo: pg_sys::FunctionCallInfo) -> Option<[Arg; ARGS]> {
    // SAFETY: fcinfo is valid.
    let passed = unsafe { raw::arguments(fcinfo, &ARG_TYPES, ARGS_0_3, "picloud._enqueue_fast") };
    if passed.len() < ARGS {
        return None;
    }
    let mut args = [Arg {
        value: pg_sys::Datum::from(0),
        is_null: true,
    }; ARGS];
    for (arg, given) in args.iter_mut().zip(passed) {
        *arg = Arg {
            value: given.value,
            is_null: given.isnull,
        };
    }
    Some(args)
}

/// Is this op 1 to 200 characters long (as `length()` counts them in the database encoding)?
fn op_length_valid(op: &[u8]) -> bool {
    if op.is_empty() || op.len() > MAX_OP_BYTES {
        return false;
    }
    let len = i32::try_from(op.len()).unwrap_or(i32::MAX);
    // SAFETY: counts characters within the given bytes of a valid string.
    let chars = unsafe { pg_sys::pg_mbstrlen_with_len(op.as_ptr().cast(), len) };
    (1..=200).contains(&chars)
}

/// A little less than the general path's 100 calendar years (picloud._check_run_at), so that
/// every due time taken here is one it takes too; the edge cases go to the general path.
const RUN_AT_WINDOW_MICROS: i64 = 36_500 * 86_400 * 1_000_000;

/// Is a requested due time finite and within the window around the transaction's start?
/// (Infinity is i64::MAX/MIN, far outside it.)
fn run_at_in_window(run_at: i64) -> bool {
    // SAFETY: reads the current transaction's start time (what now() returns).
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    run_at
        .checked_sub(now)
        .is_some_and(|offset| offset.abs() < RUN_AT_WINDOW_MICROS)
}

/// Writes the event if the call is the common case and the INSERT takes it; returns its id.
/// `None` means nothing was written: the general path must handle the call.
///
/// # Safety
/// `args` must carry the SQL signature's types.
unsafe fn enqueue_common(args: &[Arg; ARGS]) -> Option<pg_sys::Datum> {
    let required = [APP, SOURCE, OP, PAYLOAD, SCRIPT];
    let absent = [TRIGGER, REPLY_TO, IDEMPOTENCY_KEY];
    if required.iter().any(|&i| args[i].is_null) || absent.iter().any(|&i| !args[i].is_null) {
        return None;
    }
    // SAFETY: ORDERING_KEY and ON_DEAD_LETTER, when given, are text.
    let ordering = unsafe { ordering(args) }?;
    // SAFETY: SOURCE and OP are non-null text.
    let (source, op) = unsafe { (text_bytes(args[SOURCE].value), text_bytes(args[OP].value)) };
    if !admission::EVENT_SOURCES
        .iter()
        .any(|known| known.as_bytes() == source)
        || !op_length_valid(op)
    {
        return None;
    }
    // SAFETY: PAYLOAD is a non-null jsonb (varlena) datum.
    let payload_bytes = unsafe { admission::payload_bytes(args[PAYLOAD].value) };
    // A payload nested too deep goes the general way, which refuses it with its error.
    // SAFETY: PAYLOAD is a non-null jsonb datum.
    if unsafe { admission::payload_too_deep(args[PAYLOAD].value, payload_bytes) }.is_some() {
        return None;
    }
    let requested_depth = if args[DEPTH].is_null {
        None
    } else {
        // Truncation is the int4 datum's own representation.
        Some(args[DEPTH].value.value() as i32)
    };
    let depth = admission::picloud_admit(
        i32::try_from(payload_bytes).unwrap_or(i32::MAX),
        requested_depth,
    );
    if depth < 0 {
        return None;
    }
    // SAFETY: RUN_AT, when given, is a timestamptz datum (int64 microseconds).
    if !args[RUN_AT].is_null && !run_at_in_window(args[RUN_AT].value.value() as i64) {
        return None;
    }

    // Made before connecting to SPI so that it lives in the caller's memory context.
    let new_event_id = admission::picloud_new_event_id();
    let event_id = new_event_id.into_datum()?;
    let owner = access::picloud_is_owner();
    let (slot, sql, types): (_, _, &[pg_sys::Oid]) = match (ordering, owner) {
        (Ordering::None, true) => (&OWNER_PLAN, OWNER_INSERT, &INSERT_TYPES[..PLAIN_PARAMS]),
        (Ordering::None, false) => (
            &PRODUCER_PLAN,
            PRODUCER_INSERT,
            &INSERT_TYPES[..PLAIN_PARAMS],
        ),
        (Ordering::Keyed { .. }, true) => (&OWNER_KEYED_PLAN, OWNER_KEYED_INSERT, &INSERT_TYPES),
        (Ordering::Keyed { .. }, false) => {
            (&PRODUCER_KEYED_PLAN, PRODUCER_KEYED_INSERT, &INSERT_TYPES)
        }
    };
    let blocks = match ordering {
        Ordering::Keyed { blocks } => blocks,
        Ordering::None => None,
    };
    let mut values = [
        args[APP].value,
        event_id,
        args[SOURCE].value,
        args[OP].value,
        args[SCRIPT].value,
        args[PAYLOAD].value,
        pg_sys::Datum::from(depth),
        args[RUN_AT].value,
        args[PRIORITY].value,
        args[ORDERING_KEY].value,
        pg_sys::Datum::from(blocks.unwrap_or(false)),
    ];
    let mut nulls = [b' ' as std::ffi::c_char; 11];
    nulls[7] = args[RUN_AT].null_flag();
    nulls[8] = args[PRIORITY].null_flag();
    nulls[9] = args[ORDERING_KEY].null_flag();
    if blocks.is_none() {
        nulls[10] = b'n' as std::ffi::c_char;
    }

    // SAFETY: connect/finish pair; the plan's parameter types match the first `types.len()`
    // of `values` (SPI reads no more).
    let woken = unsafe {
        spi_connect();
        let plan = kept_plan(slot, sql, types);
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        check_spi(rc, pg_sys::SPI_OK_INSERT as i32, "enqueue");
        let woken = (pg_sys::SPI_processed == 1).then(|| {
            // Due now and some supervisor idle: name the claimer the event is for.
            if args[RUN_AT].is_null && wake::supervisor_idle_here() {
                wake_for(args[APP].value, args[SCRIPT].value)
            } else {
                WakeFor::ANY
            }
        });
        spi_finish();
        woken
    };
    let woken = woken?;
    // An unordered event for a sql lane is named in the wake-up (see api/wake.rs); the key is
    // read only then, so a busy queue pays nothing for it.
    let lone = match ordering {
        Ordering::None if woken == WakeFor::SQL_LANE => {
            // SAFETY: APP is a non-null uuid datum (checked above).
            let app = unsafe { pgrx::Uuid::from_datum(args[APP].value, false) };
            app.map(|app| (app, new_event_id))
        }
        _ => None,
    };
    wake::wake_at_commit_for(woken, lone);
    Some(event_id)
}

/// Which claimer an event due now for handler `script` of `app` is for: a lane of the
/// handler's kind when that lane takes it on its first attempt (a handler without a concurrency
/// limit, as picloud._lock_lane asks; the fast path writes only asynchronous events), else any.
///
/// # Safety
/// Must be called while connected to SPI, with uuid datums.
unsafe fn wake_for(app: pg_sys::Datum, script: pg_sys::Datum) -> WakeFor {
    let mut values = [app, script];
    let nulls = [b' ' as std::ffi::c_char; 2];
    // SAFETY: connected to SPI (see above); two uuid parameters, as declared.
    unsafe {
        let plan = kept_plan(&LANE_PLAN, LANE_OF_HANDLER, &[pg_sys::UUIDOID; 2]);
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), true, 1);
        check_spi(rc, pg_sys::SPI_OK_SELECT as i32, "lane lookup");
        let table = pg_sys::SPI_tuptable;
        if pg_sys::SPI_processed != 1 || table.is_null() {
            return WakeFor::ANY;
        }
        let kind = pg_sys::SPI_getvalue(*(*table).vals, (*table).tupdesc, 1);
        if kind.is_null() {
            return WakeFor::ANY;
        }
        match CStr::from_ptr(kind).to_bytes() {
            b"sql" => WakeFor::SQL_LANE,
            b"http" => WakeFor::HTTP_LANE,
            _ => WakeFor::ANY,
        }
    }
}

/// What an enqueue says about ordering, when the fast path may write it.
#[derive(Clone, Copy)]
enum Ordering {
    None,
    /// `blocks`: the row's ordering_blocks (None when on_dead_letter was not given, which the
    /// general path stores as NULL too).
    Keyed {
        blocks: Option<bool>,
    },
}

/// The call's ordering, or None when the general path must take the call (an on_dead_letter
/// without a key, or one it does not know; a key that is empty or longer than
/// MAX_ORDERING_KEY_BYTES): it raises the precise error or counts the characters.
///
/// # Safety
/// ORDERING_KEY and ON_DEAD_LETTER, when not NULL, must be text datums.
unsafe fn ordering(args: &[Arg; ARGS]) -> Option<Ordering> {
    if args[ORDERING_KEY].is_null {
        return args[ON_DEAD_LETTER].is_null.then_some(Ordering::None);
    }
    // SAFETY: a non-null text datum.
    let key = unsafe { text_bytes(args[ORDERING_KEY].value) };
    if key.is_empty() || key.len() > MAX_ORDERING_KEY_BYTES {
        return None;
    }
    let blocks = if args[ON_DEAD_LETTER].is_null {
        None
    } else {
        // SAFETY: a non-null text datum.
        match unsafe { text_bytes(args[ON_DEAD_LETTER].value) } {
            b"continue" => Some(false),
            b"block" => Some(true),
            _ => return None,
        }
    };
    Some(Ordering::Keyed { blocks })
}

/// # Safety
/// Must be paired with `spi_finish`.
unsafe fn spi_connect() {
    // SAFETY: SPI_connect may be called from any SQL-callable function.
    let rc = unsafe { pg_sys::SPI_connect() };
    check_spi(rc, pg_sys::SPI_OK_CONNECT as i32, "connect");
}

/// # Safety
/// Must follow `spi_connect`.
unsafe fn spi_finish() {
    // SAFETY: closes the connection opened by spi_connect.
    let rc = unsafe { pg_sys::SPI_finish() };
    check_spi(rc, pg_sys::SPI_OK_FINISH as i32, "finish");
}

/// SPI answers failures it does not raise as ERROR with a negative code.
fn check_spi(rc: i32, expected: i32, what: &str) {
    if rc != expected {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("picloud._enqueue_fast: SPI {what} failed with code {rc}")
        );
    }
}

/// The plan kept in `slot`, prepared and kept on first use.
///
/// # Safety
/// Must be called while connected to SPI.
unsafe fn kept_plan(
    slot: &'static LocalKey<Cell<pg_sys::SPIPlanPtr>>,
    sql: &CStr,
    types: &[pg_sys::Oid],
) -> pg_sys::SPIPlanPtr {
    let existing = slot.with(Cell::get);
    if !existing.is_null() {
        return existing;
    }
    let count = i32::try_from(types.len()).unwrap_or(0);
    let mut types = types.to_vec();
    // SAFETY: connected to SPI; `types` has `count` entries. SPI_prepare raises on bad SQL.
    let plan = unsafe { pg_sys::SPI_prepare(sql.as_ptr(), count, types.as_mut_ptr()) };
    // SAFETY: a plan from SPI_prepare; keeping moves it out of SPI's per-call memory.
    if plan.is_null() || unsafe { pg_sys::SPI_keepplan(plan) } != 0 {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "picloud._enqueue_fast: could not prepare its statement"
        );
    }
    slot.with(|s| s.set(plan));
    plan
}

finfo_v1!(pg_finfo_picloud_enqueue);

/// `picloud.picloud_enqueue(...)`, declared in sql/030_enqueue.sql: the common case written by
/// `picloud_enqueue_fast`, every other call handed to `picloud._enqueue_general` with the same
/// arguments (see the module comment).
///
/// Deliberately not `#[pg_guard]`, so that an error the general path raises reaches Postgres as
/// it was raised, SQLSTATE included: a guard would catch it and raise it again with only the
/// codes Postgres itself defines. Everything that can fail in Rust runs inside the two guarded
/// functions this one calls; the one unguarded step is the call into the general path, and when
/// an error leaves it, this frame holds nothing that needs dropping (only a pointer and a
/// function pointer), as for the C functions Postgres' errors pass through.
///
/// # Safety
/// Called by Postgres' function manager with a valid `fcinfo` for that declaration.
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn picloud_enqueue(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fcinfo is valid for this call; picloud_enqueue_fast is guarded (it reports its
    // own failures as Postgres errors) and marks the result NULL when it wrote nothing.
    let event_id = unsafe { picloud_enqueue_fast(fcinfo) };
    // SAFETY: fcinfo is valid.
    if unsafe { !(*fcinfo).isnull } {
        return event_id;
    }
    // SAFETY: guarded; returns a call of the general path with this call's arguments.
    let general = unsafe { prepare_general_call(fcinfo) };
    // SAFETY: `general.call` is a complete call record for `general.invoke` (see
    // prepare_general_call). Unguarded on purpose (see above).
    unsafe {
        let id = (general.invoke)(general.call);
        (*fcinfo).isnull = (*general.call).isnull;
        id
    }
}

/// A ready call of `picloud._enqueue_general`: plain pointers, nothing to drop.
#[repr(C)]
struct GeneralCall {
    call: pg_sys::FunctionCallInfo,
    invoke: unsafe extern "C-unwind" fn(pg_sys::FunctionCallInfo) -> pg_sys::Datum,
}

/// Looks up `picloud._enqueue_general` (at each call that needs it, so that it is always the
/// current function) and builds its call record, in the current memory context, with the
/// arguments of `fcinfo`.
///
/// # Safety
/// `fcinfo` must be picloud_enqueue's valid call information.
#[pg_guard]
unsafe extern "C-unwind" fn prepare_general_call(fcinfo: pg_sys::FunctionCallInfo) -> GeneralCall {
    // SAFETY: fcinfo is valid; the records are allocated zeroed and fully set before use, as
    // InitFunctionCallInfoData does in C.
    unsafe {
        let passed = raw::arguments(fcinfo, &ARG_TYPES, ARGS_0_3, "picloud.picloud_enqueue");
        // The general path of the same schema takes the same arguments.
        let Some(oid) = general_path_oid(passed.len()) else {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
                "picloud._enqueue_general does not exist: run ALTER EXTENSION picloud UPDATE"
            );
        };
        let flinfo: *mut pg_sys::FmgrInfo =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()).cast();
        pg_sys::fmgr_info(oid, flinfo);
        let Some(invoke) = (*flinfo).fn_addr else {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "picloud._enqueue_general has no entry point"
            );
        };
        let nargs = passed.len();
        let size = std::mem::offset_of!(pg_sys::FunctionCallInfoBaseData, args)
            + std::mem::size_of_val(passed);
        let call: pg_sys::FunctionCallInfo = pg_sys::palloc0(size).cast();
        (*call).flinfo = flinfo;
        (*call).fncollation = (*fcinfo).fncollation;
        (*call).nargs = nargs as i16;
        let args = (*call).args.as_mut_slice(nargs);
        args.copy_from_slice(passed);
        GeneralCall { call, invoke }
    }
}

/// The oid of `picloud._enqueue_general` with the first `nargs` of picloud_enqueue's argument
/// types (the extension is not relocatable, so always in schema picloud), if it exists.
fn general_path_oid(nargs: usize) -> Option<pg_sys::Oid> {
    // SAFETY: builds a qualified name list in the current memory context; LookupFuncName with
    // missing_ok answers InvalidOid instead of raising.
    let oid = unsafe {
        let names = pg_sys::lappend(
            pg_sys::lappend(
                std::ptr::null_mut(),
                pg_sys::makeString(pg_sys::pstrdup(c"picloud".as_ptr())).cast(),
            ),
            pg_sys::makeString(pg_sys::pstrdup(c"_enqueue_general".as_ptr())).cast(),
        );
        pg_sys::LookupFuncName(names, nargs as i32, ARG_TYPES.as_ptr(), true)
    };
    (oid != pg_sys::InvalidOid).then_some(oid)
}
