//! picloud: a transactional outbox with event triggers, retries and dead letters.
//!
//! The schema and most of the SQL surface live in `sql/` (plain SQL and PL/pgSQL, pulled in
//! below in dependency order). Rust owns what SQL cannot do: settings, shared memory for the
//! wake-up decision, running a handler as its principal, and the background worker.

use pgrx::prelude::*;

mod api;
mod error;
mod gucs;
mod schedule;
mod table_locks;
mod text;
mod worker;

pgrx::pg_module_magic!();

extension_sql_file!(
    "../../sql/001_schema.sql",
    name = "schema",
    requires = [api::admission::picloud_new_event_id]
);
extension_sql_file!(
    "../../sql/010_access.sql",
    name = "access",
    requires = [
        "schema",
        api::matching::picloud_collection_matches,
        api::access::picloud_is_owner,
        api::access::picloud_role_standing
    ]
);
extension_sql_file!(
    "../../sql/020_triggers.sql",
    name = "triggers",
    requires = [
        "access",
        api::admission::picloud_event_sources,
        api::matching::picloud_collection_match_keys,
        api::matching::picloud_pattern_match_key
    ]
);
extension_sql_file!(
    "../../sql/030_enqueue.sql",
    name = "enqueue",
    requires = [
        "triggers",
        api::wake::picloud_wake_at_commit,
        api::wake::picloud_note_claim,
        api::principal::picloud_current_depth,
        api::admission::picloud_admit,
        api::admission::picloud_payload_bytes,
        api::admission::picloud_new_event_ids,
        api::principal::picloud_become_event,
        api::principal::picloud_unbecome,
        api::budget::picloud_after_handler,
        api::backends::picloud_my_backend_start,
        api::backends::picloud_backend_started
    ]
);
extension_sql_file!(
    "../../sql/031_claims.sql",
    name = "claims",
    requires = ["enqueue"]
);
extension_sql_file!(
    "../../sql/032_sql_handlers.sql",
    name = "sql_handlers",
    requires = ["claims"]
);
extension_sql_file!(
    "../../sql/033_inboxes.sql",
    name = "inboxes",
    requires = ["sql_handlers"]
);
extension_sql_file!(
    "../../sql/035_sql_lane.sql",
    name = "sql_lane",
    requires = ["inboxes"]
);
extension_sql_file!(
    "../../sql/036_http_lane.sql",
    name = "http_lane",
    requires = ["sql_lane"]
);
extension_sql_file!(
    "../../sql/040_dead_letters.sql",
    name = "dead_letters",
    requires = ["http_lane"]
);
extension_sql_file!(
    "../../sql/050_housekeeping.sql",
    name = "housekeeping",
    requires = ["dead_letters"]
);
extension_sql_file!(
    "../../sql/055_cron.sql",
    name = "cron",
    requires = [
        "housekeeping",
        api::cron::picloud_cron_check,
        api::cron::picloud_cron_next_after,
        api::cron::picloud_cron_due,
        worker::picloud_wake_housekeeper_at_commit
    ]
);
extension_sql_file!(
    "../../sql/060_operations.sql",
    name = "operations",
    requires = ["cron"]
);
extension_sql_file!(
    "../../sql/070_signing.sql",
    name = "signing",
    requires = ["operations"]
);
extension_sql_file!(
    "../../sql/090_privileges.sql",
    name = "privileges",
    finalize
);

/// Loads settings, shared memory and the background worker. picloud's wake-up flag lives in
/// shared memory and its housekeeping runs in a background worker, and both can only be set
/// up while the postmaster loads `shared_preload_libraries`.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reading a postmaster-owned global that is only written during start-up.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if !preloading {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "picloud must be loaded via shared_preload_libraries",
            "Add 'picloud' to shared_preload_libraries in postgresql.conf and restart PostgreSQL."
        );
    }
    // A Rust panic turned into an ERROR carries a backtrace in its DETAIL whenever the
    // postmaster's environment asks Rust for backtraces (RUST_BACKTRACE=1, common on developer
    // machines): file paths and code layout a client must never see. The library-level setting
    // wins over RUST_BACKTRACE for captured backtraces. Set once here, in the postmaster,
    // before any backend or thread exists.
    // SAFETY (of set_var): the postmaster is single-threaded while it loads libraries.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    gucs::init();
    api::wake::init_shared_memory();
    table_locks::install();
    worker::init_shared_memory();
    worker::register();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'picloud'",
            "picloud.gc_interval = '1s'",
        ]
    }
}
