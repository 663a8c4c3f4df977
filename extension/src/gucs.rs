//! Every `picloud.*` setting.
//!
//! Context is chosen per setting: `Postmaster` for what `_PG_init` and the worker's start-up
//! read, `Sighup` for what the background worker rereads, `Suset` for policy that every
//! session must agree on but a superuser may set per database or role. SQL code reads them with
//! `current_setting('picloud.…')`; the accessors here serve the Rust side.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Deepest allowed event: an event produced while handling an event of depth d has depth d+1.
pub static MAX_TRIGGER_DEPTH: GucSetting<i32> = GucSetting::<i32>::new(8);
/// Attempts before an event moves to the dead letters.
pub static RETRY_MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
/// Delay before the second attempt; doubles with each further attempt.
pub static RETRY_BASE_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
/// Upper bound on any retry delay.
pub static RETRY_MAX_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(3_600_000);
/// Resolved dead letters older than this are deleted; 0 keeps them forever.
pub static DEAD_LETTER_RETENTION_DAYS: GucSetting<i32> = GucSetting::<i32>::new(30);
/// Abandoned executions older than this are deleted; 0 keeps them forever.
pub static ABANDONED_EXECUTIONS_RETENTION_DAYS: GucSetting<i32> = GucSetting::<i32>::new(7);
/// Idempotency keys are remembered this long after their event was enqueued.
pub static IDEMPOTENCY_RETENTION_HOURS: GucSetting<i32> = GucSetting::<i32>::new(24);
/// Time between two housekeeping passes of the background worker.
pub static GC_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
/// Rows deleted per housekeeping transaction.
pub static GC_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Largest accepted event payload, in bytes of its stored jsonb.
pub static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// The database the background worker serves.
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

pub fn init() {
    GucRegistry::define_int_guc(
        c"picloud.max_trigger_depth",
        c"Deepest event depth picloud_enqueue accepts.",
        c"Events produced by a handler are one deeper than the event that ran it; an enqueue deeper than this fails with SQLSTATE PC001, which stops trigger loops.",
        &MAX_TRIGGER_DEPTH,
        0,
        1_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"picloud.retry_max_attempts",
        c"Attempts before an event is moved to the dead letters.",
        c"Synchronous events (reply_to set) are never retried, whatever this says.",
        &RETRY_MAX_ATTEMPTS,
        1,
        1_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"picloud.retry_base_delay",
        c"Delay before the first retry; doubles with each further attempt.",
        c"A jitter of up to 25% is added; the result never exceeds picloud.retry_max_delay.",
        &RETRY_BASE_DELAY_MS,
        1,
        86_400_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"picloud.retry_max_delay",
        c"Upper bound on any retry delay.",
        c"",
        &RETRY_MAX_DELAY_MS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"picloud.dead_letter_retention_days",
        c"Days a resolved dead letter is kept; 0 keeps them forever.",
        c"Unresolved dead letters are never deleted by housekeeping.",
        &DEAD_LETTER_RETENTION_DAYS,
        0,
        36_500,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"picloud.abandoned_executions_retention_days",
        c"Days an abandoned execution record is kept; 0 keeps them forever.",
        c"",
        &ABANDONED_EXECUTIONS_RETENTION_DAYS,
        0,
        36_500,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"picloud.idempotency_retention",
        c"Hours an idempotency key is remembered after its event was enqueued.",
        c"",
        &IDEMPOTENCY_RETENTION_HOURS,
        1,
        87_600,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"picloud.gc_interval",
        c"Time between two housekeeping passes of the background worker.",
        c"",
        &GC_INTERVAL_MS,
        100,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"picloud.gc_batch_size",
        c"Rows deleted or rescued per housekeeping transaction.",
        c"Each batch is its own short transaction and skips rows locked by other work.",
        &GC_BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"picloud.max_payload_bytes",
        c"Largest accepted event payload (stored jsonb size).",
        c"",
        &MAX_PAYLOAD_BYTES,
        1_024,
        256 * 1024 * 1024,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"picloud.database",
        c"The database the picloud background worker serves.",
        c"The worker waits quietly until CREATE EXTENSION picloud has run there.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

pub fn gc_interval_ms() -> u64 {
    u64::try_from(GC_INTERVAL_MS.get()).unwrap_or(60_000)
}

pub fn gc_batch_size() -> i32 {
    GC_BATCH_SIZE.get()
}

pub fn database() -> String {
    DATABASE
        .get()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "postgres".to_string())
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn settings_are_registered_with_their_contexts() {
        let context = |name: &str| {
            Spi::get_one::<String>(&format!(
                "SELECT context FROM pg_settings WHERE name = '{name}'"
            ))
        };
        assert_eq!(
            context("picloud.max_trigger_depth"),
            Ok(Some("superuser".to_string()))
        );
        assert_eq!(
            context("picloud.retry_max_attempts"),
            Ok(Some("superuser".to_string()))
        );
        assert_eq!(
            context("picloud.gc_interval"),
            Ok(Some("sighup".to_string()))
        );
        assert_eq!(
            context("picloud.gc_batch_size"),
            Ok(Some("sighup".to_string()))
        );
        assert_eq!(
            context("picloud.dead_letter_retention_days"),
            Ok(Some("sighup".to_string()))
        );
        assert_eq!(
            context("picloud.database"),
            Ok(Some("postmaster".to_string()))
        );
        // The test configuration set the interval to one second.
        assert_eq!(
            Spi::get_one::<String>("SHOW picloud.gc_interval"),
            Ok(Some("1s".to_string()))
        );
    }

    #[pg_test]
    fn housekeeper_is_registered() {
        // At server start the first housekeeper only checks, from no database, that
        // picloud.database exists, and leaves for one connected to it, started a second later.
        // pg_stat_activity is read once per transaction: clear that snapshot before each look.
        let mut workers = Ok(Some(0));
        for _ in 0..100 {
            Spi::run("SELECT pg_stat_clear_snapshot()").expect("clear the activity snapshot");
            workers = Spi::get_one::<i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'picloud housekeeper'",
            );
            if workers == Ok(Some(1)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(workers, Ok(Some(1)));
    }
}
