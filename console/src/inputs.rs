//! Reading what a request carries (path ids, query strings, forms, JSON bodies) into the typed
//! values the queries take; anything malformed is a 422 with SQLSTATE 22P02, never a panic.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ConsoleError;
use crate::queries::{BulkRequest, Cursor, DeadLetterFilter};

pub type Fields = HashMap<String, String>;

pub fn uuid(what: &str, text: &str) -> Result<Uuid, ConsoleError> {
    text.parse()
        .map_err(|_| ConsoleError::invalid_input(format!("{what} {text:?} is not a UUID")))
}

/// A field's value; an empty one (a form's blank input) counts as absent.
pub fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
}

fn opt_uuid(fields: &Fields, name: &str) -> Result<Option<Uuid>, ConsoleError> {
    field(fields, name).map(|t| uuid(name, t)).transpose()
}

fn opt_int(fields: &Fields, name: &str, min: i64, max: i64) -> Result<Option<i64>, ConsoleError> {
    match field(fields, name) {
        None => Ok(None),
        Some(t) => match t.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ConsoleError::invalid_input(format!(
                "{name} {t:?} is not a whole number between {min} and {max}"
            ))),
        },
    }
}

fn opt_time(fields: &Fields, name: &str) -> Result<Option<DateTime<Utc>>, ConsoleError> {
    match field(fields, name) {
        None => Ok(None),
        Some(t) => DateTime::parse_from_rfc3339(t)
            .map(|d| Some(d.with_timezone(&Utc)))
            .map_err(|_| {
                ConsoleError::invalid_input(format!("{name} {t:?} is not an RFC 3339 time"))
            }),
    }
}

pub const MAX_PAGE: i64 = 500;

/// `status=unresolved|all`, `error_class`, `trigger_id`, `source`, `older_than_minutes`,
/// `newer_than_minutes`, `limit` (1-500, default 50), `after` (a page's `next` cursor).
pub fn dead_letter_filter(fields: &Fields) -> Result<DeadLetterFilter, ConsoleError> {
    let include_resolved = match field(fields, "status") {
        None | Some("unresolved") => false,
        Some("all") => true,
        Some(other) => {
            return Err(ConsoleError::invalid_input(format!(
                "status {other:?} is neither unresolved nor all"
            )))
        }
    };
    let after = match field(fields, "after") {
        None => None,
        Some(t) => Some(Cursor::decode(t).ok_or_else(|| {
            ConsoleError::invalid_input(format!("after {t:?} is not a page cursor"))
        })?),
    };
    let minutes = |name| opt_int(fields, name, 0, 60 * 24 * 3650).map(|m| m.map(|m| m as i32));
    Ok(DeadLetterFilter {
        include_resolved,
        error_class: field(fields, "error_class").map(str::to_string),
        trigger_id: opt_uuid(fields, "trigger_id")?,
        source: field(fields, "source").map(str::to_string),
        older_than_minutes: minutes("older_than_minutes")?,
        newer_than_minutes: minutes("newer_than_minutes")?,
        limit: opt_int(fields, "limit", 1, MAX_PAGE)?.unwrap_or(50),
        after,
    })
}

/// The most dead letters one bulk resolution through the console takes (the SQL function
/// allows up to 1,000,000; a dry run of that many would not fit a page).
pub const MAX_BULK: i64 = 10_000;

/// The bulk resolution's fields (the form's or the JSON body's, as strings).
pub fn bulk_request(fields: &Fields, dry_run: bool) -> Result<BulkRequest, ConsoleError> {
    let resolution = field(fields, "resolution")
        .ok_or_else(|| ConsoleError::invalid_input("resolution is missing"))?
        .to_string();
    Ok(BulkRequest {
        resolution,
        source: field(fields, "source").map(str::to_string),
        script_id: opt_uuid(fields, "script_id")?,
        trigger_id: opt_uuid(fields, "trigger_id")?,
        error_contains: fields
            .get("error_contains")
            .filter(|s| !s.is_empty())
            .cloned(),
        created_before: opt_time(fields, "created_before")?,
        limit: opt_int(fields, "limit", 1, MAX_BULK)?.unwrap_or(MAX_BULK) as i32,
        dry_run,
    })
}

/// A JSON body as `T`; a malformed one is a 422 like any other bad input.
pub fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ConsoleError> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}")
            .map_err(|e| ConsoleError::invalid_input(format!("a JSON body is needed: {e}")));
    }
    serde_json::from_slice(body).map_err(|e| {
        ConsoleError::invalid_input(format!("the body is not valid JSON for this request: {e}"))
    })
}

/// A JSON object's values as strings (numbers, booleans and strings; null means absent).
pub fn json_fields(body: &[u8]) -> Result<Fields, ConsoleError> {
    let map: serde_json::Map<String, serde_json::Value> = json(body)?;
    let mut fields = Fields::new();
    for (k, v) in map {
        match v {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => {
                fields.insert(k, s);
            }
            serde_json::Value::Number(n) => {
                fields.insert(k, n.to_string());
            }
            serde_json::Value::Bool(b) => {
                fields.insert(k, b.to_string());
            }
            _ => {
                return Err(ConsoleError::invalid_input(format!(
                    "{k} must be a string, number or boolean"
                )))
            }
        }
    }
    Ok(fields)
}

pub fn bool_field(fields: &Fields, name: &str) -> Result<bool, ConsoleError> {
    match field(fields, name) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ConsoleError::invalid_input(format!(
            "{name} {other:?} is not true or false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            dead_letter_id: Uuid::nil(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in [
            "",
            "_",
            "x_y",
            "1_notauuid",
            "99999999999999999999_00000000-0000-0000-0000-000000000000",
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn filters_parse_and_refuse() {
        let mut f = Fields::new();
        f.insert("status".into(), "all".into());
        f.insert("limit".into(), "7".into());
        f.insert("source".into(), "".into());
        let parsed = dead_letter_filter(&f).unwrap();
        assert!(parsed.include_resolved);
        assert_eq!(parsed.limit, 7);
        assert_eq!(parsed.source, None);
        f.insert("limit".into(), "501".into());
        assert_eq!(
            dead_letter_filter(&f).unwrap_err().sqlstate.as_deref(),
            Some("22P02")
        );
    }
}
