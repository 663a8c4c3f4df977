//! Signing in: the role and password are checked by Postgres itself (the console connects as
//! that role, SCRAM over TLS when the server asks for it), attempts are rate-limited per
//! client address, and the password is dropped as soon as the connection is open.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::http::StatusCode;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ConsoleError;
use crate::server::AppState;
use crate::session::Session;

pub struct LoginLimiter(DefaultKeyedRateLimiter<IpAddr>);

impl LoginLimiter {
    pub fn per_minute(n: u32) -> LoginLimiter {
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        LoginLimiter(RateLimiter::keyed(Quota::per_minute(n)))
    }

    fn admit(&self, ip: IpAddr) -> Result<(), ConsoleError> {
        self.0.check_key(&ip).map_err(|_| {
            ConsoleError::console(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sign_ins",
                "too many sign-in attempts from this address: wait a minute",
            )
        })
    }

    pub fn forget_idle(&self) {
        self.0.retain_recent();
    }
}

pub async fn sign_in(
    state: &AppState,
    ip: IpAddr,
    role: &str,
    password: &str,
) -> Result<Arc<Session>, ConsoleError> {
    state.limiter.admit(ip)?;
    if role.is_empty() || role.len() > 63 || password.is_empty() {
        return Err(ConsoleError::invalid_input(
            "a role (1-63 bytes) and a password are needed to sign in",
        ));
    }
    match state.target.connect_as(role, password).await {
        Ok(client) => {
            let session = state.sessions.open(role.to_string(), client)?;
            tracing::info!(role, client = %ip, "signed in");
            Ok(session)
        }
        Err(e) => {
            let sqlstate = e.code().map(|c| c.code().to_string());
            match sqlstate.as_deref() {
                // Wrong password, unknown role, no pg_hba.conf entry: one answer for all, so
                // the console tells nobody which roles exist.
                Some("28P01") | Some("28000") => {
                    tracing::info!(role, client = %ip, "sign-in refused by the database");
                    Err(ConsoleError {
                        status: StatusCode::UNAUTHORIZED,
                        sqlstate,
                        code: None,
                        message: "the role or the password is wrong".into(),
                        detail: None,
                        hint: None,
                    })
                }
                _ => {
                    tracing::warn!(role, client = %ip, error = %e, "sign-in failed");
                    Err(ConsoleError::from(e))
                }
            }
        }
    }
}
