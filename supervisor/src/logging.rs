//! Logging on `tracing`: one line per event on stderr, as a JSON object (the default, for log
//! collectors) or as text for people (`--log-format text`). Every line starts with `ts`,
//! `level` and `msg`, followed by the event's fields in the order written at the call site;
//! the two formats are `tracing-subscriber` event formatters, so spans can later add trace ids.

use std::fmt;

use chrono::{SecondsFormat, Utc};
use clap::ValueEnum;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    #[value(alias = "warning")]
    Warn,
    Info,
    Debug,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `{"ts":…,"level":…,"msg":…,"key":value,…}`
    Json,
    /// `ts level msg key=value …`
    Text,
}

/// Installs the subscriber for the whole process. Only this crate's events are written:
/// the libraries' own diagnostics would not follow the documented fields.
pub fn init(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
    };
    let filter = Targets::new().with_target(env!("CARGO_CRATE_NAME"), level);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(Lines { format });
    // A second initialisation (only possible in tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .try_init();
}

struct Lines {
    format: LogFormat,
}

/// The fields of one event, in call-site order, as JSON values.
#[derive(Default)]
struct Fields {
    msg: String,
    values: Map<String, Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.msg = match value {
                Value::String(text) => text,
                other => other.to_string(),
            };
        } else {
            self.values.insert(field.name().to_owned(), value);
        }
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        _ => "debug",
    }
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let level = level_name(event.metadata().level());
        let line = match self.format {
            LogFormat::Json => json_line(ts, level, fields),
            LogFormat::Text => text_line(&ts, level, &fields),
        };
        writeln!(writer, "{line}")
    }
}

fn json_line(ts: String, level: &str, fields: Fields) -> String {
    let mut object = Map::new();
    object.insert("ts".to_owned(), Value::from(ts));
    object.insert("level".to_owned(), Value::from(level));
    object.insert("msg".to_owned(), Value::from(fields.msg));
    object.extend(fields.values);
    Value::Object(object).to_string()
}

/// `ts level msg key=value …`, the level padded so messages line up. Strings are written bare
/// when that cannot be misread and JSON-quoted otherwise; the message is quoted only if it
/// holds a control character, so that an entry never spans two lines.
fn text_line(ts: &str, level: &str, fields: &Fields) -> String {
    let msg = if fields.msg.chars().any(char::is_control) {
        Value::from(fields.msg.as_str()).to_string()
    } else {
        fields.msg.clone()
    };
    let mut line = format!("{ts} {level:<5} {msg}");
    for (key, value) in &fields.values {
        let text = match value {
            Value::String(text) if is_bare(text) => text.clone(),
            _ => value.to_string(),
        };
        line.push_str(&format!(" {key}={text}"));
    }
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

    fn fields(msg: &str, values: &[(&str, Value)]) -> Fields {
        Fields {
            msg: msg.to_owned(),
            values: values
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }
    }

    #[test]
    fn json_lines_keep_the_documented_names_and_order() {
        let line = json_line(
            "2024-05-01T10:00:00.000Z".to_owned(),
            "warn",
            fields(
                "lease \"lost\"",
                &[("event_id", json!("e1")), ("ms", json!(12))],
            ),
        );
        assert_eq!(
            line,
            r#"{"ts":"2024-05-01T10:00:00.000Z","level":"warn","msg":"lease \"lost\"","event_id":"e1","ms":12}"#
        );
    }

    #[test]
    fn text_lines_are_readable_and_stay_on_one_line() {
        let line = text_line(
            "2024-05-01T10:00:00.000Z",
            "info",
            &fields(
                "event",
                &[
                    ("event_id", json!("6f1c")),
                    ("error", json!("handler failed\non purpose")),
                    ("ms", json!(12)),
                    ("empty", json!("")),
                    ("eq", json!("a=b")),
                ],
            ),
        );
        assert_eq!(
            line,
            "2024-05-01T10:00:00.000Z info  event event_id=6f1c \
             error=\"handler failed\\non purpose\" ms=12 empty=\"\" eq=\"a=b\""
        );
        let line = text_line("t", "warn", &fields("two\nlines", &[]));
        assert_eq!(line, "t warn  \"two\\nlines\"");
    }
}
