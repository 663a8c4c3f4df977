//! The console's state, its router and its listener (plain http, or https with rustls).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use axum::http::{header, HeaderValue};
use axum::Router;
use axum_extra::extract::cookie::Key;

use crate::config::Config;
use crate::db::Target;
use crate::session::Sessions;
use crate::signin::LoginLimiter;
use crate::{api, pages, probe, views};

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub target: Target,
    pub sessions: Sessions,
    pub limiter: LoginLimiter,
    pub views: views::Views,
    /// The key that signs session cookies: new at every start, as sessions live in memory.
    key: Key,
    /// Session cookies carry `Secure` when the console serves https.
    pub secure_cookies: bool,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl FromRef<AppState> for Key {
    fn from_ref(state: &AppState) -> Key {
        state.0.key.clone()
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(pages::routes())
        .with_state(state)
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::from_fn(server_timing))
}

/// `Server-Timing: app;dur=<ms>`: how long the console took, database included (what the
/// benchmark reads; browsers show it in their network panel).
async fn server_timing(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let start = std::time::Instant::now();
    let mut response = next.run(request).await;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if let Ok(value) = HeaderValue::from_str(&format!("app;dur={ms:.3}")) {
        response.headers_mut().insert("server-timing", value);
    }
    response
}

/// Pages may not be framed or sniffed, and no script, style or image comes from anywhere but
/// the console itself (the pages use none but an inline style sheet).
async fn security_headers(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, name, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "same-origin");
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(headers, header::CACHE_CONTROL, "no-store");
    response
}

pub async fn run(config: Config) -> Result<(), String> {
    let target = Target::parse(&config.database_url)?;
    let probe_role = config
        .probe_role
        .clone()
        .or_else(|| target.default_user.clone())
        .unwrap_or_else(|| "postgres".to_string());
    let verdict = probe::probe(&target, &probe_role).await;
    match &verdict {
        probe::Verdict::PasswordsChecked => {
            tracing::info!(role = %probe_role, "the database refuses a wrong password: sign-ins are checked")
        }
        probe::Verdict::PasswordsIgnored => tracing::warn!(
            role = %probe_role,
            "the database accepted a wrong password (trust authentication?): anyone who reaches the console can sign in as any such role, so it listens on loopback only"
        ),
        probe::Verdict::Unknown(why) => {
            tracing::warn!(role = %probe_role, %why, "could not check that the database refuses a wrong password")
        }
    }
    probe::allows(&verdict, config.listen, &probe_role)?;

    let tls = match (&config.console_tls_cert, &config.console_tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
        _ => None,
    };
    let state = AppState(Arc::new(Inner {
        target,
        sessions: Sessions::new(
            Duration::from_secs(config.session_minutes * 60),
            config.max_sessions as usize,
        ),
        limiter: LoginLimiter::per_minute(config.login_per_minute),
        views: views::Views::new()?,
        key: Key::generate(),
        secure_cookies: tls.is_some(),
    }));
    let sweeper = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            sweeper.sessions.sweep();
            sweeper.limiter.forget_idle();
        }
    });
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        shutdown.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    let scheme = if tls.is_some() { "https" } else { "http" };
    match tls {
        Some(tls) => {
            let server = axum_server::bind_rustls(config.listen, tls).handle(handle.clone());
            announce(&handle, scheme).await;
            server.serve(app).await
        }
        None => {
            let server = axum_server::bind(config.listen).handle(handle.clone());
            announce(&handle, scheme).await;
            server.serve(app).await
        }
    }
    .map_err(|e| format!("cannot serve on {}: {e}", config.listen))
}

/// Logs the address once the listener is bound (port 0 picks a free one).
async fn announce(handle: &axum_server::Handle, scheme: &'static str) {
    let handle = handle.clone();
    tokio::spawn(async move {
        if let Some(addr) = handle.listening().await {
            tracing::info!(url = %format!("{scheme}://{addr}/"), "console listening");
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                ctrl_c.await.ok();
            }
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c.await.ok();
    }
}
