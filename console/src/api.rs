//! The JSON admin API under /api. Reads need a session cookie; every state-changing request
//! also needs the session's CSRF token in the `X-CSRF-Token` header.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use axum_extra::extract::cookie::SignedCookieJar;
use serde::Deserialize;
use serde_json::json;

use crate::error::ConsoleError;
use crate::inputs::{self, Fields};
use crate::queries;
use crate::server::AppState;
use crate::session::{self, ApiSession};
use crate::signin;

type ApiResult = Result<Response, ConsoleError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/session", post(sign_in).get(whoami).delete(sign_out))
        .route("/api/apps", get(apps))
        .route("/api/apps/{app}/dead-letters", get(dead_letters))
        .route("/api/apps/{app}/dead-letters/count", get(count))
        .route("/api/apps/{app}/dead-letters/groups", get(groups))
        .route("/api/apps/{app}/dead-letters/resolve", post(resolve_bulk))
        .route("/api/apps/{app}/dead-letters/{id}", get(dead_letter))
        .route("/api/apps/{app}/dead-letters/{id}/resolve", post(resolve))
        .route("/api/apps/{app}/dead-letters/{id}/replay", post(replay))
        .route("/api/apps/{app}/outbox", get(outbox))
        .route("/api/apps/{app}/triggers", get(triggers))
        .route("/api/apps/{app}/triggers/{id}/enable", post(enable))
        .route("/api/apps/{app}/triggers/{id}/disable", post(disable))
        .route("/api/apps/{app}/handlers", get(handlers))
        .route("/api/apps/{app}/stats", get(stats))
        .fallback(not_found)
}

async fn not_found() -> ConsoleError {
    ConsoleError::console(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

fn csrf(s: &session::Session, headers: &HeaderMap) -> Result<(), ConsoleError> {
    session::check_csrf(s, headers.get("x-csrf-token").and_then(|v| v.to_str().ok()))
}

#[derive(Deserialize)]
struct Credentials {
    role: String,
    password: String,
}

async fn sign_in(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: SignedCookieJar,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    // A cross-site form cannot send JSON without a CORS preflight, which the console never
    // answers: no one can sign a browser in to someone else's session.
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(ConsoleError::console(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "json_required",
            "sign in with a JSON body: {\"role\": ..., \"password\": ...}",
        ));
    }
    let credentials: Credentials = inputs::json(&body)?;
    let s = signin::sign_in(&state, peer.ip(), &credentials.role, &credentials.password).await?;
    let jar = jar.add(session::cookie(
        s.id.clone(),
        state.sessions.lifetime(),
        state.secure_cookies,
    ));
    Ok((
        jar,
        Json(json!({
            "role": s.role,
            "csrf_token": s.csrf,
            "expires_in_seconds": state.sessions.lifetime().as_secs(),
        })),
    )
        .into_response())
}

async fn whoami(ApiSession(s): ApiSession) -> ApiResult {
    Ok(Json(json!({"role": s.role, "csrf_token": s.csrf})).into_response())
}

async fn sign_out(
    State(state): State<AppState>,
    ApiSession(s): ApiSession,
    jar: SignedCookieJar,
    headers: HeaderMap,
) -> ApiResult {
    csrf(&s, &headers)?;
    state.sessions.close(&s.id);
    tracing::info!(role = %s.role, "signed out");
    Ok((
        jar.remove(session::removal_cookie()),
        StatusCode::NO_CONTENT,
    )
        .into_response())
}

async fn apps(ApiSession(s): ApiSession) -> ApiResult {
    Ok(Json(json!({"apps": queries::apps(&s.client).await?})).into_response())
}

async fn dead_letters(
    ApiSession(s): ApiSession,
    Path(app): Path<String>,
    Query(q): Query<Fields>,
) -> ApiResult {
    let app = inputs::uuid("app", &app)?;
    let filter = inputs::dead_letter_filter(&q)?;
    Ok(Json(queries::dead_letters(&s.client, app, &filter).await?).into_response())
}

async fn count(ApiSession(s): ApiSession, Path(app): Path<String>) -> ApiResult {
    let app = inputs::uuid("app", &app)?;
    let unresolved = queries::dead_letter_count(&s.client, app).await?;
    Ok(Json(json!({"app_id": app, "unresolved": unresolved})).into_response())
}

async fn groups(ApiSession(s): ApiSession, Path(app): Path<String>) -> ApiResult {
    let app = inputs::uuid("app", &app)?;
    Ok(Json(queries::groups(&s.client, app).await?).into_response())
}

async fn dead_letter(
    ApiSession(s): ApiSession,
    Path((app, id)): Path<(String, String)>,
) -> ApiResult {
    let app = inputs::uuid("app", &app)?;
    let id = inputs::uuid("dead letter", &id)?;
    Ok(Json(queries::dead_letter(&s.client, app, id).await?).into_response())
}

async fn resolve(
    ApiSession(s): ApiSession,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    csrf(&s, &headers)?;
    let app = inputs::uuid("app", &app)?;
    let id = inputs::uuid("dead letter", &id)?;
    let fields = inputs::json_fields(&body)?;
    let resolution = inputs::field(&fields, "resolution")
        .ok_or_else(|| ConsoleError::invalid_input("resolution is missing"))?;
    queries::resolve(&s.client, app, id, resolution).await?;
    tracing::info!(role = %s.role, %app, dead_letter = %id, resolution, "resolved a dead letter");
    Ok(Json(json!({"dead_letter_id": id, "resolution": resolution})).into_response())
}

async fn replay(
    ApiSession(s): ApiSession,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    csrf(&s, &headers)?;
    let app = inputs::uuid("app", &app)?;
    let id = inputs::uuid("dead letter", &id)?;
    let event_id = queries::replay(&s.client, app, id).await?;
    tracing::info!(role = %s.role, %app, dead_letter = %id, %event_id, "replayed a dead letter");
    Ok(
        Json(json!({"dead_letter_id": id, "resolution": "replayed", "event_id": event_id}))
            .into_response(),
    )
}

async fn resolve_bulk(
    ApiSession(s): ApiSession,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    csrf(&s, &headers)?;
    let app = inputs::uuid("app", &app)?;
    let fields = inputs::json_fields(&body)?;
    let dry_run = inputs::bool_field(&fields, "dry_run")?;
    let request = inputs::bulk_request(&fields, dry_run)?;
    let result = queries::resolve_bulk(&s.client, app, &request).await?;
    if !dry_run {
        tracing::info!(role = %s.role, %app, count = result.count, resolution = %request.resolution, "bulk-resolved dead letters");
    }
    Ok(Json(result).into_response())
}

async fn outbox(
    ApiSession(s): ApiSession,
    Path(app): Path<String>,
    Query(q): Query<Fields>,
) -> ApiResult {
    let app = inputs::uuid("app", &app)?;
    let limit = match inputs::field(&q, "limit") {
        None => 100,
        Some(t) => t
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=inputs::MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ConsoleError::invalid_input(format!(
                    "limit {t:?} is not between 1 and {}",
                    inputs::MAX_PAGE
                ))
            })?,
    };
    Ok(
        Json(queries::outbox(&s.client, app, inputs::field(&q, "state"), limit).await?)
            .into_response(),
    )
}

async fn triggers(ApiSession(s): ApiSession, Path(app): Path<String>) -> ApiResult {
    let app = inputs::uuid("app", &app)?;
    Ok(Json(json!({"triggers": queries::triggers(&s.client, app).await?})).into_response())
}

async fn set_enabled(
    s: &session::Session,
    app: String,
    id: String,
    headers: &HeaderMap,
    enabled: bool,
) -> ApiResult {
    csrf(s, headers)?;
    let app = inputs::uuid("app", &app)?;
    let id = inputs::uuid("trigger", &id)?;
    queries::set_trigger_enabled(&s.client, app, id, enabled).await?;
    tracing::info!(role = %s.role, %app, trigger = %id, enabled, "set a trigger's enabled flag");
    Ok(Json(json!({"trigger_id": id, "enabled": enabled})).into_response())
}

async fn enable(
    ApiSession(s): ApiSession,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    set_enabled(&s, app, id, &headers, true).await
}

async fn disable(
    ApiSession(s): ApiSession,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    set_enabled(&s, app, id, &headers, false).await
}

async fn handlers(ApiSession(s): ApiSession, Path(app): Path<String>) -> ApiResult {
    let app = inputs::uuid("app", &app)?;
    Ok(Json(json!({"handlers": queries::handlers(&s.client, app).await?})).into_response())
}

pub fn stats_minutes(q: &Fields) -> Result<i32, ConsoleError> {
    match inputs::field(q, "minutes") {
        None => Ok(60),
        Some(t) => t
            .parse::<i32>()
            .ok()
            .filter(|n| (1..=1440).contains(n))
            .ok_or_else(|| {
                ConsoleError::invalid_input(format!("minutes {t:?} is not between 1 and 1440"))
            }),
    }
}

async fn stats(
    ApiSession(s): ApiSession,
    Path(app): Path<String>,
    Query(q): Query<Fields>,
) -> ApiResult {
    let app = inputs::uuid("app", &app)?;
    let minutes = stats_minutes(&q)?;
    Ok(Json(queries::stats(&s.client, app, minutes).await?).into_response())
}
