//! The runtime state every service of the supervisor shares (configuration, connection pool,
//! executor slots, metrics) and the lifecycle phase they all follow. The orchestrator
//! (`supervise`) builds it; the services (`dispatch`, `lane`, `executor`) only use it, so
//! dependencies run one way.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};

use crate::config::Config;
use crate::handlers::http::HttpClient;
use crate::metrics::Metrics;
use crate::pool::Pool;

/// Lifecycle phase, broadcast to the dispatcher, the lanes and every executor task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Shutdown requested: no more claims; running handlers may finish.
    Draining,
    /// Grace period over: abandon handlers and release their rows.
    Aborting,
}

/// State shared by the dispatcher, the lanes and the executors.
pub struct Shared {
    pub config: Config,
    pub pool: Pool,
    /// The one http client (connection pool, TLS configuration) every http handler uses.
    pub http: HttpClient,
    /// One permit per executor slot (`concurrency` in total).
    pub slots: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    /// Signalled when an event this supervisor ran was rescheduled for a retry.
    pub rescheduled: Notify,
    /// Wakes the sql lanes that do not listen for notifications: lane 0 listens, and calls
    /// the others when it finds a full batch (one wake-up per event would wake them all).
    pub lanes_wake: Notify,
}

/// Resolves once shutdown has been requested.
pub async fn stopping(phase: &mut watch::Receiver<Phase>) {
    if phase.wait_for(|p| *p != Phase::Running).await.is_err() {
        // The sender lives for the whole run; once it is gone no change can come.
        std::future::pending::<()>().await;
    }
}

/// Resolves once running handlers must be abandoned.
pub async fn aborted(phase: &mut watch::Receiver<Phase>) {
    if phase.wait_for(|p| *p == Phase::Aborting).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sleeps for `delay`; returns true if shutdown was requested meanwhile.
pub async fn sleep_unless_stopping(delay: Duration, phase: &mut watch::Receiver<Phase>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *phase.borrow() != Phase::Running,
        _ = stopping(phase) => true,
    }
}
