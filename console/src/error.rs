//! One error type for the API and the pages: the SQLSTATE and message of the SQL API, and the
//! HTTP status that fits them.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// What a request failed with. `sqlstate` is the database's code when the database refused;
/// `code` names a refusal of the console's own (no session, a missing CSRF token, ...).
#[derive(Debug, Clone, Serialize)]
pub struct ConsoleError {
    #[serde(skip)]
    pub status: StatusCode,
    pub sqlstate: Option<String>,
    pub code: Option<&'static str>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl ConsoleError {
    pub fn console(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ConsoleError {
            status,
            sqlstate: None,
            code: Some(code),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A value in the URL or the body that is not what it must be; reported like the
    /// database's own 22P02 (invalid text representation), so clients branch on one code.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        ConsoleError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            sqlstate: Some("22P02".into()),
            code: None,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn not_signed_in() -> Self {
        Self::console(StatusCode::UNAUTHORIZED, "not_signed_in", "sign in first")
    }

    pub fn csrf() -> Self {
        Self::console(
            StatusCode::FORBIDDEN,
            "csrf_token_invalid",
            "the request carries no valid CSRF token for this session",
        )
    }

    /// Whether the session's database connection is gone (the session must end).
    pub fn is_connection_lost(&self) -> bool {
        self.code == Some("connection_lost")
    }
}

/// The HTTP status for a SQLSTATE of the SQL API.
pub fn status_for(sqlstate: &str) -> StatusCode {
    match sqlstate {
        "42501" => StatusCode::FORBIDDEN,
        "P0002" => StatusCode::NOT_FOUND,
        "PC003" => StatusCode::CONFLICT,
        "28P01" | "28000" => StatusCode::UNAUTHORIZED,
        "57014" => StatusCode::SERVICE_UNAVAILABLE,
        "53300" => StatusCode::SERVICE_UNAVAILABLE,
        // Data exceptions (22xxx: invalid or NULL arguments, out-of-range values) and
        // integrity constraint violations (23xxx: an unknown resolution) are the request's fault.
        s if s.starts_with("22") || s.starts_with("23") => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<tokio_postgres::Error> for ConsoleError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let sqlstate = db.code().code().to_string();
            return ConsoleError {
                status: status_for(&sqlstate),
                sqlstate: Some(sqlstate),
                code: None,
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
            };
        }
        if e.is_closed() {
            return Self::console(
                StatusCode::SERVICE_UNAVAILABLE,
                "connection_lost",
                "the session's database connection is closed: sign in again",
            );
        }
        Self::console(
            StatusCode::BAD_GATEWAY,
            "database_unreachable",
            format!("database error: {e}"),
        )
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_the_statuses_the_readme_lists() {
        for (sqlstate, status) in [
            ("42501", 403),
            ("P0002", 404),
            ("PC003", 409),
            ("22023", 422),
            ("23514", 422),
            ("22004", 422),
            ("28P01", 401),
            ("57014", 503),
            ("XX000", 500),
        ] {
            assert_eq!(status_for(sqlstate).as_u16(), status, "{sqlstate}");
        }
    }
}
