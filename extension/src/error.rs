//! picloud's errors raised from Rust, each mapped to one SQLSTATE.
//!
//! Errors raised from the SQL files use the project class `PC` (see docs/sql-api.md, "Errors"); the Rust side only
//! needs standard codes.

use pgrx::pg_sys::elog::PgLogLevel;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PicloudError {
    /// A collection pattern that is not `*`, `prefix:*` or an exact name.
    InvalidPattern {
        pattern: String,
        reason: &'static str,
    },
    /// A role named as principal does not exist.
    UnknownPrincipal { principal: String },
    /// A value passed to a function is outside what it accepts.
    InvalidParameter { what: &'static str, detail: String },
    /// An event's principal may not run its handler (the SQL paths check first and raise PC005;
    /// this is the library's own refusal when asked anyway).
    PrincipalCannotRun { event: String, problem: String },
    /// A tenant tried to take a table lock on picloud's tables.
    LockRefused { relation: String },
    /// A cron schedule that does not parse, with the 1-based position of the problem.
    InvalidSchedule {
        schedule: String,
        position: usize,
        reason: String,
    },
    /// A time zone that is not an IANA name.
    UnknownTimeZone { reason: String },
    /// A required argument is NULL.
    NullArgument { name: &'static str },
    /// A text argument that is not valid UTF-8 (possible in a SQL_ASCII database).
    InvalidUtf8 { at_byte: usize },
}

impl PicloudError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            PicloudError::InvalidPattern { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            PicloudError::UnknownPrincipal { .. } => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            PicloudError::InvalidParameter { .. } => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            PicloudError::PrincipalCannotRun { .. } => {
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE
            }
            PicloudError::LockRefused { .. } => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            PicloudError::InvalidSchedule { .. } | PicloudError::UnknownTimeZone { .. } => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            PicloudError::NullArgument { .. } => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            PicloudError::InvalidUtf8 { .. } => PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
        }
    }

    fn message(&self) -> String {
        match self {
            PicloudError::InvalidPattern { pattern, reason } => {
                format!("invalid collection pattern {pattern:?}: {reason}")
            }
            PicloudError::UnknownPrincipal { principal } => {
                format!("principal role {principal:?} does not exist")
            }
            PicloudError::InvalidParameter { what, detail } => format!("invalid {what}: {detail}"),
            PicloudError::PrincipalCannotRun { event, problem } => {
                format!("cannot run handler of event {event}: {problem}")
            }
            PicloudError::LockRefused { relation } => format!(
                "permission denied: LOCK TABLE on picloud table {relation} is reserved to picloud administrators"
            ),
            PicloudError::InvalidSchedule {
                schedule,
                position,
                reason,
            } => format!("invalid schedule {schedule:?} at position {position}: {reason}"),
            PicloudError::UnknownTimeZone { reason } => reason.clone(),
            PicloudError::NullArgument { name } => format!("{name} must not be NULL"),
            PicloudError::InvalidUtf8 { at_byte } => {
                format!("invalid UTF-8 in a text argument at byte {at_byte}")
            }
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            PicloudError::InvalidPattern { .. } => Some(
                "Use '*' for every collection, 'prefix:*' for names starting with 'prefix:', or an exact name without '*'.",
            ),
            PicloudError::UnknownPrincipal { .. } => {
                Some("The role that registered the trigger was dropped; re-register the trigger.")
            }
            PicloudError::InvalidParameter { .. } | PicloudError::PrincipalCannotRun { .. } => None,
            PicloudError::LockRefused { .. } => Some(
                "A lock held by one tenant would stall every app; picloud's functions take the locks they need.",
            ),
            PicloudError::InvalidSchedule { .. } => Some(
                "A schedule is five cron fields (minute hour day-of-month month day-of-week), a nickname such as @hourly or @daily, or 'every N seconds|minutes|hours'.",
            ),
            PicloudError::UnknownTimeZone { .. } => {
                Some("SELECT name FROM pg_timezone_names lists the zone names.")
            }
            PicloudError::NullArgument { .. } => None,
            PicloudError::InvalidUtf8 { .. } => Some(
                "picloud reads names, patterns and schedules as UTF-8; a SQL_ASCII database accepts other bytes.",
            ),
        }
    }

    /// Raises this error as a Postgres ERROR; never returns.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.message(), "picloud");
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR-level reports do not return")
    }
}
