//! The --metrics-listen endpoint: `GET /metrics` (OpenMetrics text, from prometheus-client)
//! and `GET /health` (or `/healthz`), routed by axum and served by hyper's HTTP/1.1 server:
//! one request per connection, request heads of at most 8 KiB (`431` beyond), 5 s to send one,
//! at most `MAX_CONNECTIONS` connections at once, each in its own task. Answers are built from
//! atomics only, so neither a scrape nor a slow client can hold up claiming.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// Largest request head hyper buffers (its minimum): a scrape sends a few hundred bytes.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once, unanswered.
const MAX_CONNECTIONS: usize = 64;
/// Pause after a failed accept (out of file descriptors, say) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct Endpoint {
    metrics: Arc<Metrics>,
    /// How long without a claim before /health reports unhealthy.
    stale_after: Duration,
}

/// Binds the listening socket. Done before anything else starts, so that an address
/// that cannot be used stops the supervisor at once.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

fn router(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/healthz", get(health))
        .with_state(endpoint)
}

/// Serves until the task is aborted or the runtime shuts down.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stale_after: Duration) {
    let service = TowerToHyperService::new(router(Endpoint {
        metrics,
        stale_after,
    }));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        .keep_alive(false)
        .title_case_headers(true);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint could not accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::debug!(
                max_connections = MAX_CONNECTIONS,
                "metrics endpoint busy; connection closed unanswered"
            );
            continue;
        };
        let connection = http.serve_connection(TokioIo::new(stream), service.clone());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "metrics endpoint connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn metrics(State(endpoint): State<Endpoint>) -> Response {
    match endpoint.metrics.render() {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, METRICS_CONTENT_TYPE),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn health(State(endpoint): State<Endpoint>) -> Response {
    let verdict = endpoint.metrics.dispatcher.verdict(endpoint.stale_after);
    let status = if verdict.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        verdict.body() + "\n",
    )
        .into_response()
}
