//! Sessions: who signed in, their own database connection and their CSRF token, kept in
//! memory and named by a random id in a signed, HttpOnly, SameSite=Strict cookie. Nothing of
//! the password is kept: the open connection is the proof of the sign-in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, Key, SameSite, SignedCookieJar};
use base64::Engine;
use tokio_postgres::Client;

use crate::error::ConsoleError;
use crate::server::AppState;

pub const COOKIE: &str = "picloud_session";

pub struct Session {
    pub id: String,
    pub role: String,
    pub client: Client,
    pub csrf: String,
    pub expires_at: Instant,
}

pub struct Sessions {
    by_id: Mutex<HashMap<String, Arc<Session>>>,
    lifetime: Duration,
    max: usize,
}

/// 32 random bytes, URL-safe base64: session ids and CSRF tokens.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Sessions {
    pub fn new(lifetime: Duration, max: usize) -> Sessions {
        Sessions {
            by_id: Mutex::new(HashMap::new()),
            lifetime,
            max,
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        // A panic while holding the lock cannot leave the map half-changed (every change is
        // one insert or remove), so a poisoned lock is still good to use.
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self, role: String, client: Client) -> Result<Arc<Session>, ConsoleError> {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| s.expires_at > now && !s.client.is_closed());
        if map.len() >= self.max {
            return Err(ConsoleError::console(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_sessions",
                "the console has as many sessions open as it allows: try again later",
            ));
        }
        let session = Arc::new(Session {
            id: random_token(),
            role,
            client,
            csrf: random_token(),
            expires_at: now + self.lifetime,
        });
        map.insert(session.id.clone(), Arc::clone(&session));
        Ok(session)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let mut map = self.lock();
        let session = map.get(id).cloned()?;
        if session.expires_at <= Instant::now() || session.client.is_closed() {
            map.remove(id);
            return None;
        }
        Some(session)
    }

    pub fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Drops expired sessions (and with them their connections).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.lock()
            .retain(|_, s| s.expires_at > now && !s.client.is_closed());
    }
}

/// The session cookie for `id`.
pub fn cookie(id: String, lifetime: Duration, secure: bool) -> Cookie<'static> {
    Cookie::build((COOKIE, id))
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .path("/")
        .max_age(time::Duration::seconds(lifetime.as_secs() as i64))
        .build()
}

pub fn removal_cookie() -> Cookie<'static> {
    Cookie::build((COOKIE, "")).path("/").build()
}

/// Constant-time comparison of a presented CSRF token with the session's.
pub fn check_csrf(session: &Session, presented: Option<&str>) -> Result<(), ConsoleError> {
    let Some(presented) = presented else {
        return Err(ConsoleError::csrf());
    };
    let (a, b) = (presented.as_bytes(), session.csrf.as_bytes());
    let differs = a.len() != b.len() || a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) != 0;
    if differs {
        return Err(ConsoleError::csrf());
    }
    Ok(())
}

async fn lookup(parts: &mut Parts, state: &AppState) -> Option<Arc<Session>> {
    let jar = SignedCookieJar::<Key>::from_request_parts(parts, state)
        .await
        .ok()?;
    let id = jar.get(COOKIE)?;
    state.sessions.get(id.value())
}

/// The signed-in session of an API request; 401 JSON without one.
pub struct ApiSession(pub Arc<Session>);

impl FromRequestParts<AppState> for ApiSession {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        lookup(parts, state)
            .await
            .map(ApiSession)
            .ok_or_else(ConsoleError::not_signed_in)
    }
}

/// The signed-in session of a page request; a redirect to the sign-in page without one.
pub struct PageSession(pub Arc<Session>);

pub struct ToSignIn;

impl IntoResponse for ToSignIn {
    fn into_response(self) -> Response {
        Redirect::to("/login").into_response()
    }
}

impl FromRequestParts<AppState> for PageSession {
    type Rejection = ToSignIn;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        lookup(parts, state).await.map(PageSession).ok_or(ToSignIn)
    }
}
