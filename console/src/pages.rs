//! The server-rendered dashboard: the same queries as the API, as HTML. Forms post with the
//! session's CSRF token in a hidden field; every value is escaped by the templates.

// A page handler fails with the error page itself (an axum Response), as axum handlers do.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use axum_extra::extract::cookie::SignedCookieJar;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::ConsoleError;
use crate::inputs::{self, Fields};
use crate::queries::{self, Stats};
use crate::server::AppState;
use crate::session::{self, PageSession, Session};
use crate::signin;

type Page = Result<Response, Response>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/apps") }))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/apps", get(apps))
        .route("/apps/{app}", get(overview))
        .route("/apps/{app}/dead-letters", get(list))
        .route("/apps/{app}/dead-letters/{id}", get(detail))
        .route("/apps/{app}/dead-letters/{id}/confirm", get(confirm))
        .route("/apps/{app}/dead-letters/{id}/replay", post(replay))
        .route("/apps/{app}/dead-letters/{id}/resolve", post(resolve))
        .route("/apps/{app}/bulk", get(bulk_form).post(bulk))
        .route("/apps/{app}/outbox", get(outbox))
        .route("/apps/{app}/triggers", get(triggers))
        .route("/apps/{app}/triggers/{id}/{action}", post(set_enabled))
        .route("/apps/{app}/stats", get(stats))
}

/// Renders `template`, or the error page.
fn render(state: &AppState, template: &str, context: Value) -> Page {
    match state.views.render(template, context) {
        Ok(html) => Ok(html.into_response()),
        Err(e) => Err(e.into_response()),
    }
}

/// The error page for `e`, with its status.
fn failure(state: &AppState, s: Option<&Session>, e: ConsoleError) -> Response {
    let status = e.status;
    let context = json!({
        "status": format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")),
        "error": e,
        "role": s.map(|s| s.role.clone()),
        "csrf": s.map(|s| s.csrf.clone()),
    });
    match state.views.render("error.html", context) {
        Ok(html) => (status, html).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The context every page of an app shares.
async fn app_context(
    state: &AppState,
    s: &Session,
    app: &str,
    section: &str,
) -> Result<(Uuid, Value), Response> {
    let app_id = inputs::uuid("app", app).map_err(|e| failure(state, Some(s), e))?;
    let name = queries::app_name(&s.client, app_id)
        .await
        .map_err(|e| failure(state, Some(s), e))?;
    Ok((
        app_id,
        json!({
            "role": s.role, "csrf": s.csrf, "app_id": app_id,
            "app_name": name.unwrap_or_else(|| "app".to_string()), "section": section,
        }),
    ))
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

fn query_string(fields: &[(&str, String)]) -> String {
    fields
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
        .collect::<Vec<_>>()
        .join("&")
}

// Signing in ----------------------------------------------------------------------------------

async fn login_form(State(state): State<AppState>) -> Page {
    render(&state, "login.html", json!({}))
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: SignedCookieJar,
    headers: axum::http::HeaderMap,
    Form(form): Form<Fields>,
) -> Page {
    // Another site must not sign a visitor in to a session of its choosing (login CSRF):
    // browsers mark such a form post cross-site.
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if matches!(fetch_site, Some("cross-site") | Some("same-site")) {
        return Err(failure(&state, None, ConsoleError::csrf()));
    }
    let role = form.get("role").cloned().unwrap_or_default();
    let password = form.get("password").cloned().unwrap_or_default();
    match signin::sign_in(&state, peer.ip(), role.trim(), &password).await {
        Ok(s) => {
            let jar = jar.add(session::cookie(
                s.id.clone(),
                state.sessions.lifetime(),
                state.secure_cookies,
            ));
            Ok((jar, Redirect::to("/apps")).into_response())
        }
        Err(e) => {
            let page = state
                .views
                .render(
                    "login.html",
                    json!({"error": e.message, "role_value": role}),
                )
                .map_err(IntoResponse::into_response)?;
            Ok((e.status, page).into_response())
        }
    }
}

async fn logout(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    jar: SignedCookieJar,
    Form(form): Form<Fields>,
) -> Page {
    session::check_csrf(&s, form.get("csrf").map(String::as_str))
        .map_err(|e| failure(&state, Some(&s), e))?;
    state.sessions.close(&s.id);
    Ok((
        jar.remove(session::removal_cookie()),
        Redirect::to("/login"),
    )
        .into_response())
}

// Apps and dead letters -----------------------------------------------------------------------

async fn apps(State(state): State<AppState>, PageSession(s): PageSession) -> Page {
    let apps = queries::apps(&s.client)
        .await
        .map_err(|e| failure(&state, Some(&s), e))?;
    render(
        &state,
        "apps.html",
        json!({"role": s.role, "csrf": s.csrf, "apps": apps}),
    )
}

async fn overview(
    state: State<AppState>,
    s: PageSession,
    app: Path<String>,
    q: Query<Fields>,
) -> Page {
    dead_letters_page(state, s, app, q, true).await
}

async fn list(state: State<AppState>, s: PageSession, app: Path<String>, q: Query<Fields>) -> Page {
    dead_letters_page(state, s, app, q, false).await
}

async fn dead_letters_page(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path(app): Path<String>,
    Query(q): Query<Fields>,
    with_groups: bool,
) -> Page {
    let (app_id, base) = app_context(&state, &s, &app, "dead_letters").await?;
    let fail = |e| failure(&state, Some(&s), e);
    let filter = inputs::dead_letter_filter(&q).map_err(fail)?;
    let page = queries::dead_letters(&s.client, app_id, &filter)
        .await
        .map_err(fail)?;
    let (unresolved, unresolved_more) = queries::badge(&s.client, app_id).await.map_err(fail)?;
    let groups = match with_groups {
        true => Some(queries::groups(&s.client, app_id).await.map_err(fail)?),
        false => None,
    };
    let keep: Vec<(&str, String)> = [
        "status",
        "error_class",
        "trigger_id",
        "source",
        "older_than_minutes",
        "newer_than_minutes",
        "limit",
    ]
    .into_iter()
    .map(|k| (k, inputs::field(&q, k).unwrap_or_default().to_string()))
    .collect();
    let list_url = format!("/apps/{app_id}/dead-letters");
    let next_url = page.next.as_ref().map(|next| {
        let mut fields = keep.clone();
        fields.push(("after", next.clone()));
        format!("{list_url}?{}", query_string(&fields))
    });
    let first_url = filter
        .after
        .map(|_| format!("{list_url}?{}", query_string(&keep)));
    let filter_values: serde_json::Map<String, Value> = keep
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::String(v)))
        .collect();
    render(
        &state,
        "dead_letters.html",
        merge(
            base,
            json!({"page": page, "groups": groups, "unresolved": unresolved, "unresolved_more": unresolved_more, "filter": filter_values,
                   "next_url": next_url, "first_url": first_url}),
        ),
    )
}

fn notice(q: &Fields) -> Option<String> {
    match inputs::field(q, "notice") {
        Some("replayed") => Some(format!(
            "Replayed: the event runs again as {}.",
            inputs::field(q, "event").unwrap_or("a new event")
        )),
        Some(r) if queries::RESOLUTIONS.contains(&r) => Some(format!("Resolved as {r}.")),
        _ => None,
    }
}

async fn detail(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<Fields>,
) -> Page {
    let (app_id, base) = app_context(&state, &s, &app, "dead_letters").await?;
    let fail = |e| failure(&state, Some(&s), e);
    let id = inputs::uuid("dead letter", &id).map_err(fail)?;
    let d = queries::dead_letter(&s.client, app_id, id)
        .await
        .map_err(fail)?;
    let payload_pretty =
        serde_json::to_string_pretty(&d.payload).unwrap_or_else(|_| d.payload.to_string());
    render(
        &state,
        "dead_letter.html",
        merge(
            base,
            json!({"d": d, "payload_pretty": payload_pretty, "resolutions": queries::RESOLUTIONS, "notice": notice(&q)}),
        ),
    )
}

async fn confirm(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<Fields>,
) -> Page {
    let (app_id, base) = app_context(&state, &s, &app, "dead_letters").await?;
    let fail = |e| failure(&state, Some(&s), e);
    let id = inputs::uuid("dead letter", &id).map_err(fail)?;
    // Reading it first: a dead letter the role may not see gets its 403/404 here already.
    let d = queries::dead_letter(&s.client, app_id, id)
        .await
        .map_err(fail)?;
    let (question, button, action_url, resolution) = match inputs::field(&q, "action") {
        Some("replay") => (
            "Replay this dead letter? Its handler runs again with the same payload.".to_string(),
            "Replay".to_string(),
            format!("/apps/{app_id}/dead-letters/{id}/replay"),
            None,
        ),
        Some("resolve") => {
            let r = inputs::field(&q, "resolution").unwrap_or("");
            (
                format!("Mark this dead letter as {r}? Nothing runs again."),
                format!("Mark {r}"),
                format!("/apps/{app_id}/dead-letters/{id}/resolve"),
                Some(r.to_string()),
            )
        }
        _ => {
            return Err(fail(ConsoleError::invalid_input(
                "action is neither replay nor resolve",
            )))
        }
    };
    render(
        &state,
        "confirm.html",
        merge(
            base,
            json!({"question": question, "button": button, "action_url": action_url, "resolution": resolution,
                   "dead_letter_id": id, "error_class": d.error_class}),
        ),
    )
}

async fn replay(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path((app, id)): Path<(String, String)>,
    Form(form): Form<Fields>,
) -> Page {
    let fail = |e| failure(&state, Some(&s), e);
    session::check_csrf(&s, form.get("csrf").map(String::as_str)).map_err(fail)?;
    let app_id = inputs::uuid("app", &app).map_err(fail)?;
    let id = inputs::uuid("dead letter", &id).map_err(fail)?;
    let event = queries::replay(&s.client, app_id, id).await.map_err(fail)?;
    tracing::info!(role = %s.role, app = %app_id, dead_letter = %id, %event, "replayed a dead letter");
    Ok(Redirect::to(&format!(
        "/apps/{app_id}/dead-letters/{id}?notice=replayed&event={event}"
    ))
    .into_response())
}

async fn resolve(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path((app, id)): Path<(String, String)>,
    Form(form): Form<Fields>,
) -> Page {
    let fail = |e| failure(&state, Some(&s), e);
    session::check_csrf(&s, form.get("csrf").map(String::as_str)).map_err(fail)?;
    let app_id = inputs::uuid("app", &app).map_err(fail)?;
    let id = inputs::uuid("dead letter", &id).map_err(fail)?;
    let resolution = inputs::field(&form, "resolution").unwrap_or("");
    queries::resolve(&s.client, app_id, id, resolution)
        .await
        .map_err(fail)?;
    tracing::info!(role = %s.role, app = %app_id, dead_letter = %id, resolution, "resolved a dead letter");
    let notice = utf8_percent_encode(resolution, NON_ALPHANUMERIC);
    Ok(Redirect::to(&format!("/apps/{app_id}/dead-letters/{id}?notice={notice}")).into_response())
}

// Bulk resolution -----------------------------------------------------------------------------

async fn bulk_form(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path(app): Path<String>,
    Query(q): Query<Fields>,
) -> Page {
    let (_, base) = app_context(&state, &s, &app, "bulk").await?;
    render(
        &state,
        "bulk.html",
        merge(
            base,
            json!({"form": q, "resolutions": queries::RESOLUTIONS, "max_bulk": inputs::MAX_BULK}),
        ),
    )
}

/// `step=dry_run` shows what would be resolved and a button to apply exactly that (the
/// dry run's time becomes `created_before`, so later dead letters are not swept in);
/// `step=apply` resolves.
async fn bulk(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path(app): Path<String>,
    Form(form): Form<Fields>,
) -> Page {
    let (app_id, base) = app_context(&state, &s, &app, "bulk").await?;
    let fail = |e| failure(&state, Some(&s), e);
    session::check_csrf(&s, form.get("csrf").map(String::as_str)).map_err(fail)?;
    let dry_run = inputs::field(&form, "step") != Some("apply");
    let mut request = inputs::bulk_request(&form, dry_run).map_err(fail)?;
    if dry_run && request.created_before.is_none() {
        request.created_before = Some(chrono::Utc::now());
    }
    let result = queries::resolve_bulk(&s.client, app_id, &request)
        .await
        .map_err(fail)?;
    if !dry_run {
        tracing::info!(role = %s.role, app = %app_id, count = result.count, resolution = %request.resolution, "bulk-resolved dead letters");
    }
    render(
        &state,
        "bulk.html",
        merge(
            base,
            json!({"form": form_without_secret(&form), "result": result, "resolutions": queries::RESOLUTIONS, "max_bulk": inputs::MAX_BULK}),
        ),
    )
}

fn form_without_secret(form: &Fields) -> Fields {
    form.iter()
        .filter(|(k, _)| k.as_str() != "csrf")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

// Outbox, triggers, stats ---------------------------------------------------------------------

async fn outbox(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path(app): Path<String>,
    Query(q): Query<Fields>,
) -> Page {
    let (app_id, base) = app_context(&state, &s, &app, "outbox").await?;
    let outbox = queries::outbox(&s.client, app_id, inputs::field(&q, "state"), 200)
        .await
        .map_err(|e| failure(&state, Some(&s), e))?;
    render(
        &state,
        "outbox.html",
        merge(base, json!({"outbox": outbox})),
    )
}

async fn triggers(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path(app): Path<String>,
) -> Page {
    let (app_id, base) = app_context(&state, &s, &app, "triggers").await?;
    let fail = |e| failure(&state, Some(&s), e);
    let triggers = queries::triggers(&s.client, app_id).await.map_err(fail)?;
    let handlers = queries::handlers(&s.client, app_id).await.map_err(fail)?;
    render(
        &state,
        "triggers.html",
        merge(base, json!({"triggers": triggers, "handlers": handlers})),
    )
}

async fn set_enabled(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path((app, id, action)): Path<(String, String, String)>,
    Form(form): Form<Fields>,
) -> Page {
    let fail = |e| failure(&state, Some(&s), e);
    session::check_csrf(&s, form.get("csrf").map(String::as_str)).map_err(fail)?;
    let app_id = inputs::uuid("app", &app).map_err(fail)?;
    let id = inputs::uuid("trigger", &id).map_err(fail)?;
    let enabled = match action.as_str() {
        "enable" => true,
        "disable" => false,
        _ => {
            return Err(fail(ConsoleError::console(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such action",
            )))
        }
    };
    queries::set_trigger_enabled(&s.client, app_id, id, enabled)
        .await
        .map_err(fail)?;
    tracing::info!(role = %s.role, app = %app_id, trigger = %id, enabled, "set a trigger's enabled flag");
    Ok(Redirect::to(&format!("/apps/{app_id}/triggers")).into_response())
}

async fn stats(
    State(state): State<AppState>,
    PageSession(s): PageSession,
    Path(app): Path<String>,
    Query(q): Query<Fields>,
) -> Page {
    let (app_id, base) = app_context(&state, &s, &app, "stats").await?;
    let fail = |e| failure(&state, Some(&s), e);
    let minutes = crate::api::stats_minutes(&q).map_err(fail)?;
    let stats = queries::stats(&s.client, app_id, minutes)
        .await
        .map_err(fail)?;
    let chart = chart(&stats);
    render(
        &state,
        "stats.html",
        merge(base, json!({"stats": stats, "chart": chart})),
    )
}

/// The chart's geometry: one polyline per outcome, scaled to the busiest minute.
fn chart(stats: &Stats) -> Value {
    let (width, height, left, right, top, bottom) = (640.0, 220.0, 40.0, 630.0, 12.0, 195.0);
    let points = &stats.per_minute;
    let max = points
        .iter()
        .map(|m| m.completed.max(m.failed).max(m.dead_lettered))
        .max()
        .unwrap_or(0)
        .max(1);
    let step = if points.len() > 1 {
        (right - left) / (points.len() - 1) as f64
    } else {
        0.0
    };
    let line = |value: fn(&queries::Minute) -> i64| {
        points
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let x = left + step * i as f64;
                let y = bottom - (bottom - top) * value(m) as f64 / max as f64;
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let label = |m: Option<&queries::Minute>| {
        m.map(|m| m.minute.format("%H:%M").to_string())
            .unwrap_or_default()
    };
    json!({
        "width": width, "height": height, "left": left, "right": right, "top": top, "bottom": bottom,
        "max": max,
        "completed": line(|m| m.completed), "failed": line(|m| m.failed), "dead_lettered": line(|m| m.dead_lettered),
        "total_completed": points.iter().map(|m| m.completed).sum::<i64>(),
        "total_failed": points.iter().map(|m| m.failed).sum::<i64>(),
        "total_dead_lettered": points.iter().map(|m| m.dead_lettered).sum::<i64>(),
        "first_label": label(points.first()), "last_label": label(points.last()),
    })
}
