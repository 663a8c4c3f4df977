//! Handler runners. SQL handlers run inside the database; http and command
//! handlers run here and are then reported with picloud_complete/picloud_fail.

pub mod command;
pub mod http;
pub mod signing;
pub mod sql;
#[cfg(test)]
mod test_support;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::db::Claim;

/// Error texts stored by the database are cut to this many bytes.
pub const MAX_ERROR_BYTES: usize = 4096;

const TRUNCATION_MARK: &str = " [truncated]";

/// What an http or command handler produced: the result (JSON, possibly
/// absent) on success, the failure otherwise.
pub type HandlerResult = Result<Option<Value>, Failure>;

/// A handler's failure: its text, and the time before which it must not run again when the
/// handler said so (an http `Retry-After`).
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub error: String,
    pub retry_at: Option<DateTime<Utc>>,
}

impl From<String> for Failure {
    fn from(error: String) -> Failure {
        Failure {
            error,
            retry_at: None,
        }
    }
}

/// The event document given to http and command handlers (`Claim::event`), as bytes to send.
pub fn event_body(claim: &Claim) -> Vec<u8> {
    claim.event.get().as_bytes().to_vec()
}

/// Turns handler output into a result: valid JSON is used as is, anything
/// else becomes a JSON string, and empty output means "no result" (NULL).
pub fn result_from_output(output: &[u8]) -> Option<Value> {
    let trimmed = output.trim_ascii();
    if trimmed.is_empty() {
        return None;
    }
    match serde_json::from_slice::<Value>(trimmed) {
        Ok(value) => Some(value),
        // jsonb cannot hold NUL characters; replace them so the result stores.
        Err(_) => Some(Value::String(
            String::from_utf8_lossy(output).replace('\0', "\u{FFFD}"),
        )),
    }
}

/// The first `max` bytes of some output as text, for error messages.
pub fn excerpt(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    String::from_utf8_lossy(cut).trim_end().to_owned()
}

/// Bounds an error text to `MAX_ERROR_BYTES`, cutting on a character boundary
/// and marking the cut. NUL characters are replaced because PostgreSQL text
/// cannot store them (the report would otherwise fail).
pub fn bounded_error(text: &str) -> String {
    let text = text.replace('\0', "\u{FFFD}");
    if text.len() <= MAX_ERROR_BYTES {
        return text;
    }
    let mut cut = MAX_ERROR_BYTES - TRUNCATION_MARK.len();
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{TRUNCATION_MARK}", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn short_errors_are_unchanged() {
        assert_eq!(bounded_error("boom"), "boom");
        let exact = "x".repeat(MAX_ERROR_BYTES);
        assert_eq!(bounded_error(&exact), exact);
    }

    #[test]
    fn long_errors_are_cut_to_the_limit_on_a_char_boundary() {
        let long = "é".repeat(5000); // two bytes each
        let bounded = bounded_error(&long);
        assert!(bounded.len() <= MAX_ERROR_BYTES);
        assert!(bounded.ends_with(TRUNCATION_MARK));
        assert!(bounded.starts_with("éé"));
        let ascii = "a".repeat(10_000);
        assert_eq!(bounded_error(&ascii).len(), MAX_ERROR_BYTES);
    }

    #[test]
    fn nul_characters_are_replaced() {
        assert_eq!(bounded_error("a\0b"), "a\u{FFFD}b");
    }

    #[test]
    fn output_becomes_json_or_string() {
        assert_eq!(
            result_from_output(b" {\"ok\":true}\n"),
            Some(json!({"ok": true}))
        );
        assert_eq!(result_from_output(b"42"), Some(json!(42)));
        assert_eq!(result_from_output(b"hello\n"), Some(json!("hello\n")));
        assert_eq!(result_from_output(b""), None);
        assert_eq!(result_from_output(b" \n"), None);
    }

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt(b"abcdef", 3), "abc");
        assert_eq!(excerpt(b"abc\n", 512), "abc");
        assert_eq!(excerpt(&[0xff, b'a'], 10), "\u{FFFD}a");
    }
}
