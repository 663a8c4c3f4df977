//! Is the caller that opened an inbox still connected?
//!
//! An inbox remembers its owner's process id and start time; an answer is sent only while a
//! backend with that pid and that start time exists (a pid can be reused). pg_stat_activity
//! hides both from roles that are not members of the other session's role - the supervisor's
//! role, or a caller after SET ROLE - so these read the backend status table directly. They
//! reveal only the start time of a process the caller names.

use pgrx::prelude::*;

fn timestamp(value: pg_sys::TimestampTz) -> Option<TimestampWithTimeZone> {
    TimestampWithTimeZone::try_from(value).ok()
}

/// When the current backend started (internal; recorded by picloud_open_inbox).
#[pg_extern(stable, parallel_safe, name = "_my_backend_start")]
pub fn picloud_my_backend_start() -> Option<TimestampWithTimeZone> {
    // SAFETY: set once when the backend starts, before any SQL runs.
    timestamp(unsafe { pg_sys::MyStartTimestamp })
}

/// When the backend with process id `pid` started, or NULL if no such backend exists
/// (internal; checked before an answer is sent to an inbox).
#[pg_extern(volatile, strict, name = "_backend_started")]
pub fn picloud_backend_started(pid: i32) -> Option<TimestampWithTimeZone> {
    // SAFETY: these read this transaction's snapshot of the backend status table, which
    // Postgres builds on first use; entries are numbered from 1 and may be NULL.
    unsafe {
        let count = pg_sys::pgstat_fetch_stat_numbackends();
        for id in 1..=count {
            let entry = pg_sys::pgstat_fetch_stat_local_beentry(id);
            if entry.is_null() {
                continue;
            }
            let status = &(*entry).backendStatus;
            if status.st_procpid == pid {
                return timestamp(status.st_proc_start_timestamp);
            }
        }
    }
    None
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn the_current_backend_is_found_with_its_start_time() {
        let found = Spi::get_one::<bool>(
            "SELECT picloud._backend_started(pg_backend_pid()) = picloud._my_backend_start()
                AND picloud._my_backend_start() = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())",
        );
        assert_eq!(found, Ok(Some(true)));
    }

    #[pg_test]
    fn an_unknown_pid_has_no_start_time() {
        let missing = Spi::get_one::<bool>("SELECT picloud._backend_started(-1) IS NULL");
        assert_eq!(missing, Ok(Some(true)));
    }
}
