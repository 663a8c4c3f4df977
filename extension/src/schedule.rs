//! Cron schedules: what a cron trigger's `schedule` and `timezone` mean, and its ticks.
//!
//! Two forms (docs/sql-api.md, "Cron triggers"):
//! - the standard five fields (minute hour day-of-month month day-of-week, with ranges, lists,
//!   steps and names) and the `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly` (and
//!   `@annually`, `@midnight`) nicknames, read in the trigger's IANA time zone. Parsing and
//!   matching are croner's, which follows Vixie cron, daylight-saving changes included: a
//!   fixed time skipped by a change fires once at the first valid time after it, a fixed time
//!   that occurs twice fires once (at its first occurrence); `*` and step fields keep their
//!   rhythm in real time.
//! - `every N seconds|minutes|hours` (1 second to 24 hours) for sub-minute schedules: ticks at
//!   the multiples of the interval since the Unix epoch, whatever the time zone. A sixth
//!   seconds field was not taken: cron dialects disagree on where it goes (first in Quartz and
//!   croner, absent in Vixie cron), while an interval says what it means.
//!
//! Times are Postgres `timestamptz` microseconds; the pure functions here take chrono values.

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use std::collections::VecDeque;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    Cron(Box<Cron>),
    /// Every `seconds` seconds since the Unix epoch.
    Every {
        seconds: i64,
    },
}

/// Why a schedule does not parse: what, and where (1-based character position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleError {
    pub position: usize,
    pub reason: String,
}

const FIELD_NAMES: [&str; 5] = ["minute", "hour", "day of month", "month", "day of week"];

/// Longest accepted schedule text: a schedule is a short expression, not a document.
const MAX_SCHEDULE_CHARS: usize = 200;

/// At most this many earlier ticks are counted one by one when a catch-up skips them.
const MAX_COUNTED_SKIPS: i64 = 10_000;

fn error(position: usize, reason: impl Into<String>) -> ScheduleError {
    ScheduleError {
        position,
        reason: reason.into(),
    }
}

fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
}

/// The words of `text` with their 1-based character positions.
fn words(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start: Option<(usize, usize)> = None; // (char position, byte offset)
    for (chars, (byte, c)) in text.char_indices().enumerate() {
        match (c.is_whitespace(), start) {
            (true, Some((position, from))) => {
                out.push((position, &text[from..byte]));
                start = None;
            }
            (false, None) => start = Some((chars + 1, byte)),
            _ => {}
        }
    }
    if let Some((position, from)) = start {
        out.push((position, &text[from..]));
    }
    out
}

/// Parses a schedule; the error names the first offending position.
pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
    let length = text.chars().count();
    if length > MAX_SCHEDULE_CHARS {
        return Err(error(
            MAX_SCHEDULE_CHARS + 1,
            format!("a schedule is at most {MAX_SCHEDULE_CHARS} characters"),
        ));
    }
    let parts = words(text);
    let Some(&(first_position, first)) = parts.first() else {
        return Err(error(1, "the schedule is empty"));
    };
    if first.eq_ignore_ascii_case("every") {
        return parse_every(&parts, length);
    }
    if first.starts_with('@') {
        if parts.len() > 1 {
            return Err(error(parts[1].0, "nothing may follow a @nickname"));
        }
        let nickname = first.to_ascii_lowercase();
        if !matches!(
            nickname.as_str(),
            "@yearly" | "@annually" | "@monthly" | "@weekly" | "@daily" | "@midnight" | "@hourly"
        ) {
            return Err(error(
                first_position,
                format!("unknown nickname {first:?} (expected @hourly, @daily, @weekly, @monthly or @yearly)"),
            ));
        }
        return cron_parser()
            .parse(&nickname)
            .map(|cron| Schedule::Cron(Box::new(cron)))
            .map_err(|e| error(first_position, e.to_string()));
    }
    if parts.len() != 5 {
        let (position, what) = match parts.get(5) {
            Some(&(position, _)) => (position, "too many fields"),
            None => (length + 1, "too few fields"),
        };
        return Err(error(
            position,
            format!(
                "{what}: expected 5 (minute hour day-of-month month day-of-week), found {}",
                parts.len()
            ),
        ));
    }
    // Each field on its own first, so the error can say which one.
    for (index, &(position, field)) in parts.iter().enumerate() {
        let mut alone = ["*"; 5];
        alone[index] = field;
        if let Err(e) = cron_parser().parse(&alone.join(" ")) {
            return Err(error(
                position,
                format!("invalid {} field {field:?}: {e}", FIELD_NAMES[index]),
            ));
        }
    }
    let joined: Vec<&str> = parts.iter().map(|&(_, field)| field).collect();
    let cron = cron_parser()
        .parse(&joined.join(" "))
        .map_err(|e| error(first_position, e.to_string()))?;
    Ok(Schedule::Cron(Box::new(cron)))
}

fn parse_every(parts: &[(usize, &str)], length: usize) -> Result<Schedule, ScheduleError> {
    let expected = "expected 'every N seconds', 'every N minutes' or 'every N hours'";
    let Some(&(count_position, count)) = parts.get(1) else {
        return Err(error(length + 1, format!("missing interval: {expected}")));
    };
    let Some(&(unit_position, unit)) = parts.get(2) else {
        return Err(error(length + 1, format!("missing unit: {expected}")));
    };
    if let Some(&(position, _)) = parts.get(3) {
        return Err(error(position, format!("unexpected text: {expected}")));
    }
    let n: i64 = count.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
        error(
            count_position,
            format!("{count:?} is not a whole number of at least 1"),
        )
    })?;
    let unit_seconds = match unit.to_ascii_lowercase().as_str() {
        "second" | "seconds" => 1,
        "minute" | "minutes" => 60,
        "hour" | "hours" => 3600,
        _ => {
            return Err(error(
                unit_position,
                format!("unknown unit {unit:?}: {expected}"),
            ))
        }
    };
    match n.checked_mul(unit_seconds) {
        Some(seconds) if seconds <= 86_400 => Ok(Schedule::Every { seconds }),
        _ => Err(error(
            count_position,
            "the interval must be at most 24 hours (use a cron expression for longer ones)",
        )),
    }
}

/// The IANA time zone named `name`.
pub fn zone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!(
            "unknown time zone {:?} (expected an IANA name such as 'UTC' or 'Europe/Berlin')",
            name.chars().take(100).collect::<String>()
        )
    })
}

impl Schedule {
    /// The first tick strictly after `after`, or None if there is none croner can find.
    pub fn next_after(&self, zone: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every { seconds } => {
                let next = after.timestamp().div_euclid(*seconds).checked_add(1)? * seconds;
                Utc.timestamp_opt(next, 0).single()
            }
            Schedule::Cron(cron) => cron
                .find_next_occurrence(&after.with_timezone(&zone), false)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// The last tick at or before `until`, or None.
    fn last_at_or_before(&self, zone: Tz, until: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every { seconds } => {
                let last = until.timestamp().div_euclid(*seconds) * seconds;
                Utc.timestamp_opt(last, 0).single()
            }
            Schedule::Cron(cron) => cron
                .find_previous_occurrence(&until.with_timezone(&zone), true)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// The tick before `tick` (strictly), or None.
    fn previous(&self, zone: Tz, tick: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every { seconds } => Utc
                .timestamp_opt(tick.timestamp().checked_sub(*seconds)?, 0)
                .single(),
            Schedule::Cron(cron) => cron
                .find_previous_occurrence(&tick.with_timezone(&zone), false)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// The ticks in `[from, until]`: the latest `limit` of them in time order, and how many
    /// earlier ones there are (counted up to a bound for cron expressions). Work is bounded by
    /// `limit`, however long the span.
    pub fn due(
        &self,
        zone: Tz,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> (Vec<DateTime<Utc>>, i64) {
        let mut latest = VecDeque::with_capacity(limit.min(1024));
        let mut cursor = self.last_at_or_before(zone, until);
        while let Some(tick) = cursor {
            if tick < from || latest.len() >= limit {
                break;
            }
            latest.push_front(tick);
            cursor = self.previous(zone, tick);
        }
        let earlier = match cursor {
            Some(tick) if tick >= from => self.count_between(zone, from, tick),
            _ => 0,
        };
        (latest.into(), earlier)
    }

    /// How many ticks lie in `[from, last]`, `last` being a tick.
    fn count_between(&self, zone: Tz, from: DateTime<Utc>, last: DateTime<Utc>) -> i64 {
        match self {
            Schedule::Every { seconds } => {
                let first = from.timestamp().div_euclid(*seconds)
                    + i64::from(
                        from.timestamp().rem_euclid(*seconds) != 0
                            || from.timestamp_subsec_nanos() != 0,
                    );
                (last.timestamp().div_euclid(*seconds) - first + 1).max(0)
            }
            Schedule::Cron(_) => {
                let mut count = 1;
                let mut cursor = self.previous(zone, last);
                while let Some(tick) = cursor {
                    if tick < from || count >= MAX_COUNTED_SKIPS {
                        break;
                    }
                    count += 1;
                    cursor = self.previous(zone, tick);
                }
                count
            }
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("test time")
            .with_timezone(&Utc)
    }

    #[pg_test]
    fn errors_name_the_position() {
        let cases = [
            ("", 1),
            ("* * *", 6),
            ("* * * * * *", 11),
            ("61 * * * *", 1),
            ("* 24 * * *", 3),
            ("* * 0 * *", 5),
            ("* * * 13 *", 7),
            ("* * * * funday", 9),
            ("*/0 * * * *", 1),
            ("@often", 1),
            ("every 0 seconds", 7),
            ("every 10 fortnights", 10),
            ("every 25 hours", 7),
            ("every", 6),
        ];
        for (text, position) in cases {
            match parse(text) {
                Err(e) => assert_eq!(e.position, position, "{text:?}: {}", e.reason),
                Ok(s) => panic!("{text:?} parsed as {s:?}"),
            }
        }
    }

    #[pg_test]
    fn every_n_seconds_ticks_on_multiples_of_the_interval() {
        let Ok(every) = parse("every 10 seconds") else {
            panic!("parses")
        };
        let utc = zone("UTC").expect("UTC");
        assert_eq!(
            every.next_after(utc, at("2026-01-01T00:00:05.5Z")),
            Some(at("2026-01-01T00:00:10Z"))
        );
        assert_eq!(
            every.next_after(utc, at("2026-01-01T00:00:10Z")),
            Some(at("2026-01-01T00:00:20Z"))
        );
        let (ticks, earlier) = every.due(
            utc,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:01:05Z"),
            2,
        );
        assert_eq!(
            ticks,
            [at("2026-01-01T00:00:50Z"), at("2026-01-01T00:01:00Z")]
        );
        assert_eq!(earlier, 5);
    }

    #[pg_test]
    fn due_counts_the_ticks_it_leaves_out() {
        let Ok(hourly) = parse("@hourly") else {
            panic!("parses")
        };
        let utc = zone("UTC").expect("UTC");
        let (ticks, earlier) = hourly.due(
            utc,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T10:30:00Z"),
            3,
        );
        assert_eq!(
            ticks,
            [
                at("2026-01-01T08:00:00Z"),
                at("2026-01-01T09:00:00Z"),
                at("2026-01-01T10:00:00Z")
            ]
        );
        assert_eq!(earlier, 8);
    }
}
