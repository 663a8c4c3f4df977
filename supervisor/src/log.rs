//! Structured logging: one line per entry on stderr, as a JSON object (the default, for
//! log collectors) or as text for people (`--log-format text`).
//!
//! Every line starts with `ts`, `level` and `msg`, followed by the fields of the
//! call site in the order given, so lines stay easy to read by eye as well as by
//! log collectors.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    pub fn parse(text: &str) -> Option<Level> {
        match text.trim().to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"ts":…,"level":…,"msg":…,"key":value,…}`
    Json = 0,
    /// `ts level msg key=value …`
    Text = 1,
}

impl Format {
    pub fn parse(text: &str) -> Option<Format> {
        match text.trim().to_ascii_lowercase().as_str() {
            "json" => Some(Format::Json),
            "text" => Some(Format::Text),
            _ => None,
        }
    }
}

/// The most verbose level written; set once at startup from the configuration.
static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
/// The line format; set once at startup from the configuration.
static FORMAT: AtomicU8 = AtomicU8::new(Format::Json as u8);

pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn set_format(format: Format) {
    FORMAT.store(format as u8, Ordering::Relaxed);
}

fn format() -> Format {
    if FORMAT.load(Ordering::Relaxed) == Format::Text as u8 {
        Format::Text
    } else {
        Format::Json
    }
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

pub fn error(msg: &str, fields: &[(&str, Value)]) {
    write(Level::Error, msg, fields);
}

pub fn warn(msg: &str, fields: &[(&str, Value)]) {
    write(Level::Warn, msg, fields);
}

pub fn info(msg: &str, fields: &[(&str, Value)]) {
    write(Level::Info, msg, fields);
}

pub fn debug(msg: &str, fields: &[(&str, Value)]) {
    write(Level::Debug, msg, fields);
}

pub fn write(level: Level, msg: &str, fields: &[(&str, Value)]) {
    if !enabled(level) {
        return;
    }
    let line = match format() {
        Format::Json => format_line(Utc::now(), level, msg, fields),
        Format::Text => format_text_line(Utc::now(), level, msg, fields),
    };
    let mut stderr = std::io::stderr().lock();
    // A log line that cannot be written to stderr has nowhere else to go;
    // dropping it is the only option and must not stop the supervisor.
    let _ = stderr.write_all(line.as_bytes());
}

/// Builds one log line, newline included. The line is assembled by hand rather
/// than through a JSON map so the field order is the one written at the call site.
fn format_line(ts: DateTime<Utc>, level: Level, msg: &str, fields: &[(&str, Value)]) -> String {
    let mut line = String::with_capacity(128);
    line.push_str("{\"ts\":");
    push_str_value(&mut line, &ts.to_rfc3339_opts(SecondsFormat::Millis, true));
    line.push_str(",\"level\":");
    push_str_value(&mut line, level.as_str());
    line.push_str(",\"msg\":");
    push_str_value(&mut line, msg);
    for (key, value) in fields {
        line.push(',');
        push_str_value(&mut line, key);
        line.push(':');
        line.push_str(&value.to_string());
    }
    line.push_str("}\n");
    line
}

fn push_str_value(line: &mut String, text: &str) {
    line.push_str(&Value::String(text.to_owned()).to_string());
}

/// Builds one human-readable line, newline included: `ts level msg key=value …`, the level
/// padded so messages line up. Strings are written bare when that cannot be misread, and
/// JSON-quoted otherwise (spaces, quotes, `=`, control characters, or empty); other values
/// are written as JSON. The message is written bare unless it holds a control character,
/// so that an entry never spans two lines.
fn format_text_line(
    ts: DateTime<Utc>,
    level: Level,
    msg: &str,
    fields: &[(&str, Value)],
) -> String {
    let mut line = String::with_capacity(128);
    line.push_str(&ts.to_rfc3339_opts(SecondsFormat::Millis, true));
    line.push(' ');
    line.push_str(&format!("{:<5}", level.as_str()));
    line.push(' ');
    if msg.chars().any(char::is_control) {
        push_str_value(&mut line, msg);
    } else {
        line.push_str(msg);
    }
    for (key, value) in fields {
        line.push(' ');
        line.push_str(key);
        line.push('=');
        match value {
            Value::String(text) if is_bare(text) => line.push_str(text),
            _ => line.push_str(&value.to_string()),
        }
    }
    line.push('\n');
    line
}

fn is_bare(text: &str) -> bool {
    !text.is_empty()
        && !text
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control() || matches!(ch, '"' | '=' | '\\'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn line_is_one_json_object_with_fields_in_order() {
        let ts = DateTime::parse_from_rfc3339("2024-05-01T10:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        let line = format_line(
            ts,
            Level::Warn,
            "lease \"lost\"",
            &[("event_id", json!("e1")), ("ms", json!(12))],
        );
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(
            line.trim_end(),
            r#"{"ts":"2024-05-01T10:00:00.000Z","level":"warn","msg":"lease \"lost\"","event_id":"e1","ms":12}"#
        );
        let parsed: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        assert_eq!(parsed["level"], "warn");
    }

    #[test]
    fn text_line_is_readable_and_stays_on_one_line() {
        let ts = DateTime::parse_from_rfc3339("2024-05-01T10:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        let line = format_text_line(
            ts,
            Level::Info,
            "event",
            &[
                ("event_id", json!("6f1c")),
                ("outcome", json!("retry")),
                ("error", json!("handler failed\non purpose")),
                ("target", json!(null)),
                ("ms", json!(12)),
                ("empty", json!("")),
                ("allow", json!(["a.example", "b"])),
                ("eq", json!("a=b")),
            ],
        );
        assert_eq!(
            line,
            "2024-05-01T10:00:00.000Z info  event event_id=6f1c outcome=retry \
             error=\"handler failed\\non purpose\" target=null ms=12 empty=\"\" \
             allow=[\"a.example\",\"b\"] eq=\"a=b\"\n"
        );
        let line = format_text_line(ts, Level::Warn, "two\nlines", &[]);
        assert_eq!(line, "2024-05-01T10:00:00.000Z warn  \"two\\nlines\"\n");
        let line = format_text_line(ts, Level::Error, "dispatcher reconnecting", &[]);
        assert_eq!(
            line,
            "2024-05-01T10:00:00.000Z error dispatcher reconnecting\n"
        );
    }

    #[test]
    fn format_parsing() {
        assert_eq!(Format::parse("JSON"), Some(Format::Json));
        assert_eq!(Format::parse(" text "), Some(Format::Text));
        assert_eq!(Format::parse("logfmt"), None);
    }

    #[test]
    fn level_parsing() {
        assert_eq!(Level::parse("DEBUG"), Some(Level::Debug));
        assert_eq!(Level::parse("warn"), Some(Level::Warn));
        assert_eq!(Level::parse("trace"), None);
        assert!(Level::Error < Level::Debug);
    }
}
