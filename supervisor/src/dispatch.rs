//! The dispatcher: claims due rows on its own connection, only as many as
//! there are free executor slots, and hands each to an executor task at once.
//! Claimed rows never wait in a local queue.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::backoff::Backoff;
use crate::db::{self, ConnectError};
use crate::executor::{self, accept_claimed};
use crate::idle::{idle_wait, DueWait, DUE_BUT_LOCKED_WAIT, RECHECK_DELAY};
use crate::metrics::Connection;
use crate::state::{pause_before_reconnect, stopping, Phase, Shared};
use crate::wake::{self, WakeConnection};

/// How the dispatcher ended.
pub enum Ended {
    /// Shutdown was requested.
    Stopped,
    /// The configuration cannot work (the database's certificate does not verify): retrying
    /// would not help.
    Misconfigured(String),
}

/// How long every sql lane must have been in its current batch before claims take sql events
/// too. A lane batch of fast handlers takes tens of milliseconds.
const LANES_HELD: Duration = Duration::from_millis(500);

/// Runs until shutdown is requested, reconnecting with backoff whenever the
/// connection or a claim fails; then reports the successes still queued.
pub async fn run(shared: Arc<Shared>, phase: watch::Receiver<Phase>) -> Ended {
    let ended = serve(&shared, phase).await;
    let left = shared.completions.close();
    if !left.is_empty() {
        match shared.pool.get().await {
            Ok(client) => {
                executor::report_completed(&shared, &client, None, left).await;
                shared.pool.put(client);
            }
            // Unreported: their leases expire and the events run again.
            Err(e) => tracing::warn!(
                error = %e,
                events = left.len(),
                "finished events could not be reported; their leases will expire"
            ),
        }
    }
    ended
}

async fn serve(shared: &Arc<Shared>, mut phase: watch::Receiver<Phase>) -> Ended {
    let mut backoff = Backoff::new();
    let mut ever_connected = false;
    loop {
        if *phase.borrow() != Phase::Running {
            return Ended::Stopped;
        }
        // None: only a standby answered, which `Database` has said once for every connection.
        let failure = match wake::connect(shared.pool.database(), true).await {
            Ok(connection) => {
                shared.metrics.set_db_connected(true);
                tracing::info!(channel = wake::WAKE_CHANNEL, "dispatcher connected");
                if !ever_connected {
                    ever_connected = true;
                    wake::warn_if_pooled(shared.pool.database(), &connection).await;
                }
                match claim_loop(shared, &connection, &mut phase, &mut backoff).await {
                    Ok(()) => return Ended::Stopped,
                    Err(e) => Some(format!(
                        "dispatcher connection failed: {}",
                        db::error_text(&e)
                    )),
                }
            }
            Err(e) if !ever_connected && e.is_certificate_error() => {
                return Ended::Misconfigured(format!(
                    "the database server's certificate does not verify (sslmode={}): {e}",
                    shared.config.sslmode.as_str(),
                ));
            }
            Err(ConnectError::Standby) => None,
            Err(e) => Some(format!("dispatcher could not connect: {e}")),
        };
        shared.metrics.set_db_connected(false);
        if pause_before_reconnect(
            shared,
            Connection::Dispatcher,
            "dispatcher",
            failure,
            &mut backoff,
            &mut phase,
        )
        .await
        {
            return Ended::Stopped;
        }
    }
}

/// Claims and dispatches until shutdown (`Ok`) or a database error (`Err`).
async fn claim_loop(
    shared: &Arc<Shared>,
    connection: &WakeConnection,
    phase: &mut watch::Receiver<Phase>,
    backoff: &mut Backoff,
) -> Result<(), tokio_postgres::Error> {
    let config = &shared.config;
    let metrics = &shared.metrics;
    let schema = shared.pool.database().schema();
    let claim_statements = db::ClaimStatements::prepare(&connection.client, schema).await?;
    let mut rechecked = false;
    // While events are due but none is claimable (sql lanes hold them, or another claimer),
    // each look costs a claim: wait longer and longer, up to the poll interval.
    let mut due_wait = DueWait::new(DUE_BUT_LOCKED_WAIT, config.poll_interval);
    loop {
        // Wait for a free executor slot before claiming anything. Not claiming then is
        // by design, which /health must know.
        let saturated = shared.slots.available_permits() == 0;
        if saturated {
            metrics.dispatcher.set_waiting_for_slot(true);
        }
        let first = tokio::select! {
            permit = Arc::clone(&shared.slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; if it were, nothing could run.
                Err(_) => return Ok(()),
            },
            _ = stopping(phase) => return Ok(()),
        };
        if saturated {
            metrics.dispatcher.set_waiting_for_slot(false);
        }
        if *phase.borrow() != Phase::Running {
            return Ok(());
        }
        gather(shared, phase).await;
        let mut permits: Vec<OwnedSemaphorePermit> = vec![first];
        while permits.len() < config.batch_size {
            match Arc::clone(&shared.slots).try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }

        // While a sql lane is connected, it runs the first attempts of sql events; unless every
        // lane has been in one batch for long (slow handlers hold them until their timeout):
        // then claims take those events too, fairly between apps.
        let leave_sql_lane = metrics.lanes_connected.load(Ordering::Relaxed) > 0
            && !shared.lane_batches.all_held_longer_than(LANES_HELD);
        let request = db::ClaimRequest {
            worker: &config.worker_name,
            batch: permits.len() as i32,
            lease_ms: config.lease_ms,
            leave_sql_lane,
            app_cap: config.max_running_per_app as i32,
        };
        // The successes queued since the last claim are reported first, in the same round
        // trip: their rows are gone before the claim counts what each app has running.
        let done = shared.completions.take();
        let (_, rows) = tokio::join!(
            executor::report_completed(
                shared,
                &connection.client,
                claim_statements.complete_many.as_ref(),
                done
            ),
            db::claim(&connection.client, &claim_statements, &request),
        );
        let rows = rows?;
        backoff.reset();
        metrics.dispatcher.claimed();
        let claimed = rows.len();
        metrics.claim_batch_size.observe(claimed as f64);
        for claim in accept_claimed(metrics, rows) {
            let Some(permit) = take_permit(shared, &mut permits).await else {
                return Ok(());
            };
            tokio::spawn(executor::run_event(
                Arc::clone(shared),
                claim,
                permit,
                phase.clone(),
            ));
        }
        // Unused permits go back here, before any waiting.
        drop(permits);

        if claimed > 0 {
            rechecked = false;
            due_wait.reset();
            continue;
        }
        if !rechecked {
            rechecked = true;
            // A wake-up during the recheck delay ends it at once: an event enqueued right
            // after the supervisor went idle must not wait out the delay.
            tokio::select! {
                _ = connection.wake.notified() => {}
                _ = tokio::time::sleep(RECHECK_DELAY) => {}
                _ = stopping(phase) => return Ok(()),
            }
            continue;
        }
        rechecked = false;
        let wait = idle_wait(&connection.client, config.poll_interval, schema).await?;
        let wait = due_wait.stretch(wait);
        tokio::select! {
            _ = connection.wake.notified() => due_wait.reset(),
            _ = shared.rescheduled.notified() => due_wait.reset(),
            _ = shared.finished.notified() => due_wait.reset(),
            _ = tokio::time::sleep(wait) => {}
            _ = stopping(phase) => return Ok(()),
        }
    }
}

/// With most executor slots busy, a claim now would take only the one or two events that just
/// finished, and the next claim the rest a moment later: every claim costs about the same
/// however many events it takes, so such a stream of small claims halves what a busy
/// supervisor runs. Waits, up to `GATHER`, until a batch's worth of slots is free. The events
/// that finished meanwhile are reported in the round trip of that claim.
async fn gather(shared: &Shared, phase: &mut watch::Receiver<Phase>) {
    // A whole batch free; the configuration keeps batch_size within concurrency.
    let enough = shared.config.batch_size.max(1);
    let deadline = tokio::time::Instant::now() + GATHER;
    loop {
        // The permit the caller holds counts as free.
        if shared.slots.available_permits() + 1 >= enough {
            return;
        }
        tokio::select! {
            _ = shared.finished.notified() => {}
            _ = tokio::time::sleep_until(deadline) => return,
            _ = stopping(phase) => return,
        }
    }
}

/// The longest `gather` waits: about what one claim costs.
const GATHER: Duration = Duration::from_millis(2);

/// One of the permits taken for this claim or, if the database returned more rows than were
/// asked for, a permit waited for now: those rows then run as slots free up. None only if the
/// semaphore was closed, which never happens while the supervisor runs.
async fn take_permit(
    shared: &Arc<Shared>,
    permits: &mut Vec<OwnedSemaphorePermit>,
) -> Option<OwnedSemaphorePermit> {
    if let Some(permit) = permits.pop() {
        return Some(permit);
    }
    tracing::warn!("claim returned more rows than requested");
    Arc::clone(&shared.slots).acquire_owned().await.ok()
}
