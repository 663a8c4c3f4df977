//! Wiring and lifecycle: start the metrics endpoint (if configured), the dispatcher and
//! the summary, wait for SIGTERM/SIGINT, then shut down in order: stop claiming, let
//! running handlers finish within the grace period, release what is still unfinished.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

use crate::config::Config;
use crate::dispatch;
use crate::executor::Pool;
use crate::lane;
use crate::log;
use crate::metrics::Metrics;
use crate::metrics_server;
use crate::summary::{self, Summary};
use crate::EXIT_CONFIG;

/// Time allowed, after the grace period, to cancel handlers and release their rows.
const RELEASE_BUDGET: Duration = Duration::from_secs(5);
/// /health reports unhealthy after max(this, 3 × the poll interval) without a claim.
const MIN_HEALTH_STALE_AFTER: Duration = Duration::from_secs(15);

/// Lifecycle phase, broadcast to the dispatcher and every executor task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Shutdown requested: no more claims; running handlers may finish.
    Draining,
    /// Grace period over: abandon handlers and release their rows.
    Aborting,
}

/// State shared by the dispatcher and the executors.
pub struct Shared {
    pub config: Config,
    pub pool: Pool,
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

struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// Runs the supervisor until a signal asks it to stop. Returns the exit code.
pub async fn run(config: Config) -> u8 {
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            log::error(
                "could not install signal handlers",
                &[("error", e.to_string().into())],
            );
            return 1;
        }
    };
    log_start(&config);

    let listener = match config.metrics_listen {
        Some(address) => match metrics_server::bind(address).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                log::error(
                    "could not listen on the --metrics-listen address",
                    &[
                        ("address", address.to_string().into()),
                        ("error", e.to_string().into()),
                    ],
                );
                return EXIT_CONFIG;
            }
        },
        None => None,
    };

    let concurrency = config.concurrency;
    let metrics = Arc::new(Metrics::new(concurrency));
    let shared = Arc::new(Shared {
        pool: Pool::new(config.db.clone(), Arc::clone(&metrics)),
        slots: Arc::new(Semaphore::new(concurrency)),
        metrics,
        config,
        rescheduled: Notify::new(),
        lanes_wake: Notify::new(),
    });
    let metrics_endpoint = listener.map(|listener| {
        let address = listener
            .local_addr()
            .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
        log::info("serving metrics", &[("address", address.into())]);
        let stale_after = MIN_HEALTH_STALE_AFTER.max(shared.config.poll_interval * 3);
        tokio::spawn(metrics_server::serve(
            listener,
            Arc::clone(&shared.metrics),
            stale_after,
        ))
    });
    {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move { shared.pool.warm(shared.config.concurrency).await });
    }
    let (phase_sender, phase) = watch::channel(Phase::Running);
    let lanes: Vec<_> = (0..shared.config.sql_lanes)
        .map(|index| tokio::spawn(lane::run(Arc::clone(&shared), index, phase.clone())))
        .collect();
    let mut dispatcher = tokio::spawn(dispatch::run(Arc::clone(&shared), phase));
    let summary = Arc::new(Summary::new(Arc::clone(&shared.metrics)));
    let summary_task = tokio::spawn(summary::report_periodically(Arc::clone(&summary)));

    let mut exit_code = 0;
    tokio::select! {
        name = signals.recv() => log::info(
            "shutdown requested; no more claims",
            &[("signal", name.into()), ("grace_ms", json!(shared.config.shutdown_grace.as_millis() as u64))],
        ),
        ended = &mut dispatcher => {
            // The dispatcher only returns on shutdown, so this is a panic.
            log::error(
                "dispatcher stopped unexpectedly; shutting down",
                &[("error", format!("{ended:?}").into())],
            );
            exit_code = 1;
        }
    }
    phase_sender.send_replace(Phase::Draining);
    shared.metrics.dispatcher.set_stopping();
    let deadline = Instant::now() + shared.config.shutdown_grace;

    // A claim already in flight completes, so the rows it returns are
    // released instead of waiting for their leases to expire.
    if !dispatcher.is_finished()
        && tokio::time::timeout_at(deadline, &mut dispatcher)
            .await
            .is_err()
    {
        dispatcher.abort();
        log::warn("dispatcher did not stop within the grace period", &[]);
    }
    // A lane finishes the batch it is running (one transaction); one still running at the
    // deadline is cut off, and its rolled-back events simply stay in the queue.
    for mut lane in lanes {
        if !lane.is_finished() && tokio::time::timeout_at(deadline, &mut lane).await.is_err() {
            lane.abort();
            log::warn("a sql lane did not stop within the grace period", &[]);
        }
    }

    let all_slots = concurrency as u32;
    let drained = tokio::select! {
        finished = tokio::time::timeout_at(deadline, shared.slots.acquire_many(all_slots)) => {
            matches!(finished, Ok(Ok(_)))
        }
        name = signals.recv() => {
            log::info("second signal; not waiting for running handlers", &[("signal", name.into())]);
            false
        }
    };
    if !drained {
        let unfinished = concurrency.saturating_sub(shared.slots.available_permits());
        log::info(
            "releasing unfinished events",
            &[("in_flight", json!(unfinished))],
        );
        phase_sender.send_replace(Phase::Aborting);
        let released =
            tokio::time::timeout(RELEASE_BUDGET, shared.slots.acquire_many(all_slots)).await;
        if !matches!(released, Ok(Ok(_))) {
            let unfinished = concurrency.saturating_sub(shared.slots.available_permits());
            log::warn(
                "exiting with events unreported; their leases will expire",
                &[("in_flight", json!(unfinished))],
            );
        }
    }

    summary_task.abort();
    summary.log();
    if let Some(endpoint) = metrics_endpoint {
        endpoint.abort();
    }
    log::info(
        "stopped",
        &[("worker", shared.config.worker_name.as_str().into())],
    );
    exit_code
}

fn log_start(config: &Config) {
    let allow: Vec<String> = config
        .http_allow
        .entries
        .iter()
        .map(|e| e.to_string())
        .collect();
    let commands: Vec<&str> = config.commands.keys().map(String::as_str).collect();
    log::info(
        "starting",
        &[
            ("version", env!("CARGO_PKG_VERSION").into()),
            ("worker", config.worker_name.as_str().into()),
            ("concurrency", json!(config.concurrency)),
            ("batch_size", json!(config.batch_size)),
            (
                "poll_interval_ms",
                json!(config.poll_interval.as_millis() as u64),
            ),
            ("lease_ms", json!(config.lease_ms)),
            (
                "shutdown_grace_ms",
                json!(config.shutdown_grace.as_millis() as u64),
            ),
            ("http_allow", json!(allow)),
            ("commands", json!(commands)),
            ("max_reply_bytes", json!(config.max_reply_bytes)),
            (
                "metrics_listen",
                json!(config.metrics_listen.map(|a| a.to_string())),
            ),
        ],
    );
}
