//! Wiring and lifecycle: start the metrics endpoint (if configured), the dispatcher, the sql
//! lanes and the summary, watch them, wait for SIGTERM/SIGINT, then shut down in order: stop
//! claiming, let running handlers finish within the grace period, release what is still
//! unfinished.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Config;
use crate::dispatch::{self, Ended};
use crate::endpoint;
use crate::handlers::http::HttpClient;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::ready::Ready;
use crate::state::{Completions, LaneBatches, Phase, Shared};
use crate::summary::{self, Summary};
use crate::EXIT_CONFIG;
use crate::{http_lane, lane};

/// Time allowed, after the grace period, to cancel handlers and release their rows.
const RELEASE_BUDGET: Duration = Duration::from_secs(5);
/// /health reports unhealthy after max(this, 3 × the poll interval) without a claim.
const MIN_HEALTH_STALE_AFTER: Duration = Duration::from_secs(15);

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

/// The lanes' tasks: the sql lanes, then the http lanes. A lane that panics is started again,
/// so lane events are never left to a lane that is gone (its connection count was already
/// dropped with it); a lane that returns (shutdown, or a schema without lanes) is not.
struct Lanes {
    tasks: Vec<Option<JoinHandle<()>>>,
}

/// Starts lane `index` of `Lanes`: a sql lane below `--sql-lanes`, an http lane after.
fn spawn_lane(
    shared: &Arc<Shared>,
    index: usize,
    phase: &watch::Receiver<Phase>,
) -> JoinHandle<()> {
    let sql_lanes = shared.config.sql_lanes;
    if index < sql_lanes {
        tokio::spawn(lane::run(Arc::clone(shared), index, phase.clone()))
    } else {
        tokio::spawn(http_lane::run(
            Arc::clone(shared),
            index - sql_lanes,
            phase.clone(),
        ))
    }
}

impl Lanes {
    fn start(shared: &Arc<Shared>, phase: &watch::Receiver<Phase>) -> Lanes {
        let count = shared.config.sql_lanes + shared.config.http_lanes;
        let tasks = (0..count)
            .map(|index| Some(spawn_lane(shared, index, phase)))
            .collect();
        Lanes { tasks }
    }

    /// Resolves when a lane panicked; returns its index. Lanes that returned are forgotten.
    async fn panicked(&mut self) -> usize {
        loop {
            let running: Vec<(usize, &mut JoinHandle<()>)> = self
                .tasks
                .iter_mut()
                .enumerate()
                .filter_map(|(index, task)| task.as_mut().map(|task| (index, task)))
                .collect();
            if running.is_empty() {
                return std::future::pending().await;
            }
            let (indexes, handles): (Vec<usize>, Vec<&mut JoinHandle<()>>) =
                running.into_iter().unzip();
            let (ended, position, _) = futures_util::future::select_all(handles).await;
            let index = indexes[position];
            self.tasks[index] = None;
            if ended.as_ref().is_err_and(|e| e.is_panic()) {
                return index;
            }
        }
    }

    fn restart(&mut self, index: usize, shared: &Arc<Shared>, phase: &watch::Receiver<Phase>) {
        if let Some(task) = self.tasks.get_mut(index) {
            *task = Some(spawn_lane(shared, index, phase));
        }
    }
}

/// Runs the supervisor until a signal asks it to stop. Returns the exit code.
pub async fn run(config: Config) -> u8 {
    let mut signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!(error = %e, "could not install signal handlers");
            return 1;
        }
    };
    log_start(&config);

    let listener = match config.metrics_listen {
        Some(address) => match endpoint::bind(address).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::error!(
                    address = %address,
                    error = %e,
                    "could not listen on the --metrics-listen address"
                );
                return EXIT_CONFIG;
            }
        },
        None => None,
    };
    let http = match HttpClient::new(
        config.http_allow.clone(),
        &config.http_roots,
        config.max_reply_bytes,
    ) {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "could not set up the http client");
            return EXIT_CONFIG;
        }
    };

    let concurrency = config.concurrency;
    let lanes = config.sql_lanes;
    let metrics = Arc::new(Metrics::new(concurrency));
    // Events waiting for a slot are given back a third of a lease after their claim.
    let ready = Ready::new(
        config.max_running_per_app,
        std::time::Duration::from_millis(config.lease_ms as u64 / 3),
    );
    let shared = Arc::new(Shared {
        pool: Pool::new(config.database.clone(), Arc::clone(&metrics)),
        http,
        slots: Arc::new(Semaphore::new(concurrency)),
        metrics,
        config,
        rescheduled: Notify::new(),
        finished: Notify::new(),
        lanes_wake: Notify::new(),
        http_lanes_wake: Notify::new(),
        lane_batches: LaneBatches::new(lanes),
        completions: Completions::new(),
        ready,
    });
    let metrics_endpoint = listener.map(|listener| {
        let address = listener
            .local_addr()
            .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
        tracing::info!(address, "serving metrics");
        let stale_after = MIN_HEALTH_STALE_AFTER.max(shared.config.poll_interval * 3);
        tokio::spawn(endpoint::serve(
            listener,
            Arc::clone(&shared.metrics),
            stale_after,
        ))
    });
    let warm = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move { shared.pool.warm(shared.config.concurrency).await })
    };
    let (phase_sender, phase) = watch::channel(Phase::Running);
    let mut lanes = Lanes::start(&shared, &phase);
    let mut dispatcher = tokio::spawn(dispatch::run(Arc::clone(&shared), phase.clone()));
    let summary = Arc::new(Summary::new(Arc::clone(&shared.metrics)));
    let summary_task = tokio::spawn(summary::report_periodically(Arc::clone(&summary)));

    let mut exit_code = 0;
    loop {
        tokio::select! {
            name = signals.recv() => {
                tracing::info!(
                    signal = name,
                    grace_ms = shared.config.shutdown_grace.as_millis() as u64,
                    "shutdown requested; no more claims"
                );
                break;
            }
            ended = &mut dispatcher => {
                match ended {
                    Ok(Ended::Misconfigured(error)) => {
                        tracing::error!(error = %error, "cannot connect to the database; stopping");
                        exit_code = EXIT_CONFIG;
                    }
                    // The dispatcher only returns on shutdown otherwise, so this is a panic.
                    other => {
                        let error = other.err().map(|e| e.to_string()).unwrap_or_default();
                        tracing::error!(error, "dispatcher stopped unexpectedly; shutting down");
                        exit_code = 1;
                    }
                }
                break;
            }
            index = lanes.panicked() => {
                tracing::error!(lane = index, "lane panicked; starting it again");
                lanes.restart(index, &shared, &phase);
            }
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
        tracing::warn!("dispatcher did not stop within the grace period");
    }
    // A lane finishes the batch it is running (one transaction); one still running at the
    // deadline is cut off, and its rolled-back events simply stay in the queue.
    for mut lane in lanes.tasks.into_iter().flatten() {
        if !lane.is_finished() && tokio::time::timeout_at(deadline, &mut lane).await.is_err() {
            lane.abort();
            tracing::warn!("a lane did not stop within the grace period");
        }
    }
    warm.abort();

    let all_slots = concurrency as u32;
    let drained = tokio::select! {
        finished = tokio::time::timeout_at(deadline, shared.slots.acquire_many(all_slots)) => {
            matches!(finished, Ok(Ok(_)))
        }
        name = signals.recv() => {
            tracing::info!(signal = name, "second signal; not waiting for running handlers");
            false
        }
    };
    if !drained {
        let unfinished = concurrency.saturating_sub(shared.slots.available_permits());
        tracing::info!(in_flight = unfinished, "releasing unfinished events");
        phase_sender.send_replace(Phase::Aborting);
        let released =
            tokio::time::timeout(RELEASE_BUDGET, shared.slots.acquire_many(all_slots)).await;
        if !matches!(released, Ok(Ok(_))) {
            let unfinished = concurrency.saturating_sub(shared.slots.available_permits());
            tracing::warn!(
                in_flight = unfinished,
                "exiting with events unreported; their leases will expire"
            );
        }
    }

    summary_task.abort();
    summary.log();
    if let Some(endpoint) = metrics_endpoint {
        endpoint.abort();
    }
    tracing::info!(worker = shared.config.worker_name.as_str(), "stopped");
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
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        worker = config.worker_name.as_str(),
        concurrency = config.concurrency,
        batch_size = config.batch_size,
        prefetch = config.prefetch,
        poll_interval_ms = config.poll_interval.as_millis() as u64,
        lease_ms = config.lease_ms,
        shutdown_grace_ms = config.shutdown_grace.as_millis() as u64,
        sslmode = config.sslmode.as_str(),
        http_allow = allow.join(","),
        http_ca_certificates = config.http_roots.len(),
        commands = commands.join(","),
        max_reply_bytes = config.max_reply_bytes,
        metrics_listen = config.metrics_listen.map(|a| a.to_string()),
        "starting"
    );
    for what in &config.deprecated {
        tracing::warn!("{what}");
    }
}
