//! SQL functions of cron triggers: previewing a schedule, and the checks and tick arithmetic
//! that sql/055_cron.sql builds the triggers and the housekeeper's firing on. The schedule
//! language itself is in `crate::schedule`.

use crate::error::PicloudError;
use crate::schedule::{self, Schedule};
use crate::text::Utf8;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use pgrx::prelude::*;

/// Microseconds from the Unix epoch to Postgres's (2000-01-01 00:00:00 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Most ticks `picloud_cron_next` returns at once.
const MAX_PREVIEW: i32 = 1000;

fn to_chrono(t: TimestampWithTimeZone, what: &'static str) -> DateTime<Utc> {
    let micros = if t.is_finite() {
        pg_sys::TimestampTz::from(t).checked_add(POSTGRES_EPOCH_MICROS)
    } else {
        None
    };
    match micros.and_then(DateTime::from_timestamp_micros) {
        Some(time) => time,
        None => PicloudError::InvalidParameter {
            what,
            detail: "must be a finite time".to_owned(),
        }
        .raise(),
    }
}

fn to_postgres(t: DateTime<Utc>) -> Option<TimestampWithTimeZone> {
    TimestampWithTimeZone::try_from(t.timestamp_micros() - POSTGRES_EPOCH_MICROS).ok()
}

/// The schedule and zone, or the error that says what is wrong with them.
fn parsed(schedule_text: &str, timezone: &str) -> (Schedule, Tz) {
    let schedule = match schedule::parse(schedule_text) {
        Ok(schedule) => schedule,
        Err(e) => PicloudError::InvalidSchedule {
            schedule: schedule_text.chars().take(200).collect(),
            position: e.position,
            reason: e.reason,
        }
        .raise(),
    };
    match schedule::zone(timezone) {
        Ok(zone) => (schedule, zone),
        Err(reason) => PicloudError::UnknownTimeZone { reason }.raise(),
    }
}

fn required<T>(value: Option<T>, name: &'static str) -> T {
    match value {
        Some(value) => value,
        None => PicloudError::NullArgument { name }.raise(),
    }
}

/// The next `p_n` ticks of a schedule after `p_from`, in time order: a preview.
#[pg_extern(stable, parallel_safe)]
pub fn picloud_cron_next(
    p_schedule: Option<Utf8>,
    p_timezone: default!(Option<Utf8>, "'UTC'"),
    p_from: default!(Option<TimestampWithTimeZone>, "now()"),
    p_n: default!(Option<i32>, 5),
) -> SetOfIterator<'static, TimestampWithTimeZone> {
    let (schedule, zone) = parsed(
        &required(p_schedule, "schedule"),
        &required(p_timezone, "timezone"),
    );
    let from = to_chrono(required(p_from, "from"), "from");
    let n = required(p_n, "n");
    if !(1..=MAX_PREVIEW).contains(&n) {
        PicloudError::InvalidParameter {
            what: "n",
            detail: format!("must be between 1 and {MAX_PREVIEW}, got {n}"),
        }
        .raise()
    }
    let mut ticks = Vec::new();
    let mut cursor = from;
    while ticks.len() < n as usize {
        match schedule
            .next_after(zone, cursor)
            .and_then(|t| to_postgres(t).map(|p| (t, p)))
        {
            Some((tick, tick_pg)) => {
                ticks.push(tick_pg);
                cursor = tick;
            }
            None => break,
        }
    }
    SetOfIterator::new(ticks)
}

/// Raises 22023 unless the schedule parses, its zone exists and it has a tick to come.
#[pg_extern(stable, parallel_safe, name = "_cron_check")]
pub fn picloud_cron_check(p_schedule: Option<Utf8>, p_timezone: Option<Utf8>) {
    let schedule_text = required(p_schedule, "schedule");
    let (schedule, zone) = parsed(&schedule_text, &required(p_timezone, "timezone"));
    // SAFETY: reads the system clock as a Postgres timestamp (microseconds since 2000).
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let never = DateTime::<Utc>::from_timestamp_micros(now.saturating_add(POSTGRES_EPOCH_MICROS))
        .and_then(|now| schedule.next_after(zone, now))
        .is_none();
    if never {
        PicloudError::InvalidSchedule {
            schedule: schedule_text.chars().take(200).collect(),
            position: 1,
            reason: "it never fires".to_owned(),
        }
        .raise()
    }
}

/// The first tick strictly after `p_after`, or NULL if there is none.
#[pg_extern(stable, strict, parallel_safe, name = "_cron_next_after")]
pub fn picloud_cron_next_after(
    p_schedule: Utf8,
    p_timezone: Utf8,
    p_after: TimestampWithTimeZone,
) -> Option<TimestampWithTimeZone> {
    let (schedule, zone) = parsed(&p_schedule, &p_timezone);
    schedule
        .next_after(zone, to_chrono(p_after, "after"))
        .and_then(to_postgres)
}

/// The ticks in `[p_from, p_until]`: the latest `p_limit` in time order, and how many earlier
/// ones were left out (cron expressions count at most 10,000 of them).
#[pg_extern(stable, strict, parallel_safe, name = "_cron_due")]
pub fn picloud_cron_due(
    p_schedule: Utf8,
    p_timezone: Utf8,
    p_from: TimestampWithTimeZone,
    p_until: TimestampWithTimeZone,
    p_limit: i32,
) -> TableIterator<
    'static,
    (
        name!(ticks, Vec<TimestampWithTimeZone>),
        name!(earlier, i64),
    ),
> {
    let (schedule, zone) = parsed(&p_schedule, &p_timezone);
    let limit = usize::try_from(p_limit).unwrap_or(0).max(1);
    let (ticks, earlier) = schedule.due(
        zone,
        to_chrono(p_from, "from"),
        to_chrono(p_until, "until"),
        limit,
    );
    let ticks = ticks.into_iter().filter_map(to_postgres).collect();
    TableIterator::once((ticks, earlier))
}
